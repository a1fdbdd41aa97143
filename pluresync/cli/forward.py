"""
C{pluresync expose} and C{pluresync forward}: port forwarding through peers.

Both are one L{Forwarder}: listen on one endpoint and, for every incoming
connection, connect to another and splice the two. C{expose} listens on a
pluresync endpoint (peers come in) and connects to a local service
(C{--to tcp:localhost:22}); C{forward} listens on a local port
(C{--listen tcp:2222:interface=127.0.0.1}) and connects to the peer. Every
connection is its own encrypted stream, any number at once, all of them
streams of one session to the peer (C{forward} keeps it
L{FORWARD_REUSE} seconds after its last connection for the next one); each is
logged when it opens and closes.
"""

from __future__ import annotations

from itertools import count

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from pluresync.cli.base import BaseOptions, EndpointArgument, describe_address
from pluresync.cli.home import with_identity
from pluresync.cli.progress import format_bytes, format_duration
from pluresync.cli.splice import Splice
from pluresync.endpoints.strings import client_from_string, server_from_string, split_endpoint_string

_log = Logger(namespace="pluresync.cli.forward")

#: Seconds C{pluresync forward} keeps its idle session to the peer for the
#: next local connection (an endpoint string's own C{reuse=} wins).
FORWARD_REUSE = 30


def with_reuse(description: str, seconds: float = FORWARD_REUSE) -> str:
    """
    C{description} with C{:reuse=SECONDS} added, if it is a C{relay:},
    C{direct:} or C{auto:} string without a C{reuse=} of its own: local
    connections that come one after another (a client that connects per
    request) then share one session, as simultaneous ones always do.
    """
    args, kwargs = split_endpoint_string(description)
    if args[0] not in ("relay", "direct", "auto") or "reuse" in kwargs:
        return description
    return f"{description}{'' if description.endswith(':') else ':'}reuse={seconds:g}"


class Forwarder(Factory):
    """
    For each connection accepted, connect to C{target} and splice them.

    The accepted connection is held paused (the splice does that) until the
    target answers; if it cannot be reached the accepted one is aborted, so
    the far side sees a failure rather than an empty, clean stream.

    @ivar splices: the connections open now.
    """

    noisy = False

    def __init__(self, reactor, target, target_name: str) -> None:
        self._reactor = reactor
        self._target = target
        self._target_name = target_name
        self._numbers = count(1)
        self.splices: set[Splice] = set()

    def buildProtocol(self, addr):
        number = next(self._numbers)
        where = describe_address(addr)
        splice = Splice(f"the connection from {where}", f"the connection to {self._target_name}")
        started = self._reactor.seconds()
        connecting: list[Deferred] = []

        def connected(end) -> None:
            if end is splice.a:
                connecting.append(self._connect(splice, number, where))

        splice.on_connected = connected
        self.splices.add(splice)

        def ended(result) -> None:
            self.splices.discard(splice)
            for d in connecting:
                if not d.called:
                    d.cancel()
            took = format_duration(self._reactor.seconds() - started)
            moved = f"{format_bytes(splice.a.count)} in, {format_bytes(splice.b.count)} out"
            if isinstance(result, Failure):
                _log.warn(
                    "connection {n} failed after {took} ({moved}): {why}",
                    n=number,
                    took=took,
                    moved=moved,
                    why=result.getErrorMessage(),
                )
            else:
                _log.info("connection {n} closed after {took} ({moved})", n=number, took=took, moved=moved)

        splice.done.addBoth(ended)
        return splice.a

    def _connect(self, splice: Splice, number: int, where: str) -> Deferred:
        d = self._target.connect(_EndFactory(splice))

        def opened(protocol) -> None:
            _log.info(
                "connection {n} from {where} opened to {to}",
                n=number,
                where=where,
                to=describe_address(protocol.transport.getPeer()),
            )

        def failed(failure: Failure) -> None:
            if not splice.done.called:  # else the accepted side left first: this is the cancellation
                splice.unreachable(splice.b, failure)  # aborts the accepted end; `ended` logs it

        d.addCallbacks(opened, failed)
        return d

    def stop(self) -> None:
        """Cut every open connection."""
        for splice in list(self.splices):
            splice.abort()


class _EndFactory(Factory):
    noisy = False

    def __init__(self, splice: Splice) -> None:
        self._splice = splice

    def buildProtocol(self, addr):
        return self._splice.b


async def serve(reactor, listen: str, target: str, target_name: str) -> int:
    """
    Listen on C{listen} and forward every connection to C{target} (both
    endpoint strings, parsed first so that a bad key or string fails at once);
    runs until the process is stopped.
    """
    client = client_from_string(reactor, target)
    server = server_from_string(reactor, listen)
    forwarder = Forwarder(reactor, client, target_name)
    port = await server.listen(forwarder)
    host = port.getHost()
    peer_id = getattr(host, "peer_id", None)
    where = f"{host.transport} as peer {peer_id}" if peer_id else describe_address(host)
    _log.info("listening on {where}; forwarding each connection to {to}", where=where, to=target_name)
    reactor.addSystemEventTrigger("before", "shutdown", forwarder.stop)
    await Deferred()  # until the process is stopped (Ctrl-C, SIGTERM)
    return 0


def _redacted(description: str) -> str:
    """An endpoint string fit for a log line: the relay type only, never a key= value."""
    return description.split(":", 1)[0] + ":..." if "key=" in description else description


class ExposeOptions(EndpointArgument, BaseOptions):
    synopsis = "--to CLIENT-ENDPOINT ENDPOINT"
    longdesc = (
        "Make a local service reachable by peers: listen on ENDPOINT (a server endpoint "
        "string, e.g. auto:keyfile=~/.pluresync/key) and, for each peer that connects, "
        "open a connection to --to (a client endpoint string, e.g. tcp:localhost:22) and "
        "copy bytes both ways. Any number of peers at once. Runs until stopped."
    )
    optParameters = [["to", "t", None, "Where each peer's connection goes (a client endpoint string)."]]

    def postOptions(self) -> None:
        if not self["to"]:
            raise usage.UsageError("--to is required (e.g. --to tcp:localhost:22)")


class ForwardOptions(EndpointArgument, BaseOptions):
    synopsis = "--listen SERVER-ENDPOINT ENDPOINT"
    longdesc = (
        "Reach a peer's exposed service through a local port: listen on --listen (a "
        "server endpoint string; use tcp:2222:interface=127.0.0.1 so only this machine "
        "can connect) and, for each local connection, connect to the peer at ENDPOINT "
        "(a client endpoint string) and copy bytes both ways. Any number of connections "
        "at once, each its own encrypted stream. Runs until stopped."
    )
    optParameters = [["listen", "l", None, "Where to accept local connections (a server endpoint string)."]]

    def postOptions(self) -> None:
        if not self["listen"]:
            raise usage.UsageError("--listen is required (e.g. --listen tcp:2222:interface=127.0.0.1)")


def expose_command(reactor, options: ExposeOptions) -> Deferred[int]:
    return Deferred.fromCoroutine(
        serve(reactor, with_identity(options.endpoint), options["to"], _redacted(options["to"]))
    )


def forward_command(reactor, options: ForwardOptions) -> Deferred[int]:
    target = with_reuse(with_identity(options.endpoint))
    return Deferred.fromCoroutine(serve(reactor, options["listen"], target, "the peer"))
