"""
C{pluresync listen} and C{pluresync connect}: netcat over any endpoint string.

stdin goes to the peer and the peer's bytes to stdout, unchanged (binary
safe), through a L{Splice} whose ends are the connection and the process's
stdin/stdout (Twisted's C{StandardIO}, on the injected reactor). So memory
stays bounded whichever side is faster, stdin's end is sent as a half-close
(C{loseWriteConnection()}), the peer's end closes stdout, and the command
exits 0 once both directions are done, or 1 with one line saying how the
connection was cut.

C{listen} serves one connection and exits, like C{nc -l}. With
C{--keep-open} it serves connections one after another, like C{nc -lk}:
while one is open it is not listening (a connector with C{wait=} waits for
its turn at the relay), stdout stays open across connections, and once
stdin has ended every later connection gets an immediate end of input.
"""

from __future__ import annotations

import sys

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.cli.base import BaseOptions, CommandError, EndpointArgument, describe_address
from pluresync.cli.home import with_identity
from pluresync.cli.progress import Progress
from pluresync.cli.splice import End, Splice, SpliceFailed
from pluresync.endpoints.strings import client_from_string, server_from_string

#: How a connection that simply ended is reported.
_DONE = Failure(ConnectionDone())
_log = Logger(namespace="pluresync.cli.netcat")

STDIO_NAME = "standard input/output"


class _PipeAddress:
    def __str__(self) -> str:
        return "stdio"


class _Lease:
    """
    The process's stdio as one connection's transport: the end of a splice
    writes to it, pauses it and shuts it as it would a socket, and the lease
    decides what that means for the real stdin/stdout (which may outlive it).
    """

    def __init__(self, shared: SharedStdio, end: End) -> None:
        self._shared = shared
        self.end = end
        self.released = False

    @property
    def _stdio(self):
        return self._shared.stdio

    def write(self, data: bytes) -> None:
        if not self.released:
            self._stdio.write(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        if self.released:
            return
        if self._shared.keep_open:
            self.end.writeConnectionLost()  # stdout stays open for the next connection
        else:
            self._stdio.loseWriteConnection()  # writeConnectionLost once flushed

    def loseConnection(self) -> None:
        if self.released:
            return
        if self._shared.keep_open or self._shared.stdout_ended:
            self.release(Failure(ConnectionDone()))
        else:
            self._stdio.loseConnection()  # connectionLost once stdout is flushed

    abortConnection = loseConnection

    def release(self, reason: Failure) -> None:
        self.released = True
        self._shared.returned(self)
        self.end.connectionLost(reason)

    def pauseProducing(self) -> None:
        if not self.released:
            self._stdio.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.released:
            self._stdio.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def registerProducer(self, producer, streaming: bool) -> None:
        if not self.released:
            self._stdio.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self.released:
            self._stdio.unregisterProducer()

    def getPeer(self):
        return _PipeAddress()

    getHost = getPeer


@implementer(IHalfCloseableProtocol)
class _StdioProtocol(Protocol):
    """The real StandardIO's protocol: hands every event to the current lease."""

    def __init__(self, shared: SharedStdio) -> None:
        self._shared = shared

    def _end(self) -> End | None:
        lease = self._shared.lease
        return None if lease is None or lease.released else lease.end

    def dataReceived(self, data: bytes) -> None:
        end = self._end()
        if end is None:
            self._shared.early.append(data)
        else:
            end.dataReceived(data)

    def readConnectionLost(self) -> None:
        self._shared.stdin_ended = True
        end = self._end()
        if end is not None:
            end.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self._shared.stdout_ended = True
        end = self._end()
        if end is not None:
            end.writeConnectionLost()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._shared.stdin_ended = self._shared.stdout_ended = True
        lease = self._shared.lease
        if lease is not None and not lease.released:
            lease.release(reason)


class SharedStdio:
    """
    stdin and stdout, lent to one splice at a time.

    StandardIO is made at the first loan, not before: until a peer is there,
    stdin is not read at all (nothing to send it to).

    @param make: builds the real stdio from a protocol (tests pass a fake).
    """

    def __init__(self, reactor, keep_open: bool = False, make=None) -> None:
        self.keep_open = keep_open
        self._make = make or (lambda protocol: StandardIO(protocol, reactor=reactor))
        self.stdio = None
        self.lease: _Lease | None = None
        self.early: list[bytes] = []
        self.stdin_ended = False
        self.stdout_ended = False

    def lend(self, end: End) -> None:
        """Connect C{end} to stdio, and tell it what happened while nobody held it."""
        if self.stdio is None:
            self.stdio = self._make(_StdioProtocol(self))
        lease = self.lease = _Lease(self, end)
        end.makeConnection(lease)
        early, self.early = self.early, []
        for data in early:
            if not lease.released:
                end.dataReceived(data)
        if self.stdin_ended and not lease.released:
            end.readConnectionLost()
        if self.stdout_ended and not lease.released:
            end.writeConnectionLost()

    def returned(self, lease: _Lease) -> None:
        if self.lease is lease:
            self.lease = None
            if self.stdio is not None and not self.stdin_ended:
                self.stdio.pauseProducing()  # nobody to send stdin to meanwhile


def stdio_splice(shared: SharedStdio, peer_name: str) -> Splice:
    """A splice whose end C{a} is stdio, lent as soon as end C{b} (the peer) connects."""
    splice = Splice(STDIO_NAME, peer_name)

    def connected(end: End) -> None:
        if end is splice.b:
            shared.lend(splice.a)

    splice.on_connected = connected
    return splice


class _Refuse(Protocol):
    """For a connection that arrives while another is being served."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


class _Once(Factory):
    """Hands out one protocol (the peer end of a splice)."""

    noisy = False

    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return _Refuse()
        protocol.factory = self
        return protocol


def _progress(reactor, options, splice: Splice) -> Progress | None:
    if not options["progress"]:
        return None
    progress = Progress.for_stream(reactor, sys.stderr, lambda: (splice.a.count, splice.b.count))
    progress.start()
    return progress


async def _outcome(done: Deferred) -> CommandError | None:
    """
    Wait for a splice (or a server's last one): C{None} if it ended cleanly,
    the one-line error if it was cut. (Returned, not raised, so the caller
    can close up before failing; no C{finally} that awaits, which would
    misbehave when the process exits with the coroutine suspended.)
    """
    try:
        await done
    except SpliceFailed as e:
        return CommandError(str(e))
    return None


class NetcatOptions(EndpointArgument, BaseOptions):
    optFlags = [["progress", "p", "Show bytes sent and received, rate and elapsed time on stderr."]]


class ListenOptions(NetcatOptions):
    synopsis = "[--keep-open] [--progress] ENDPOINT"
    longdesc = (
        "Wait for a peer on ENDPOINT (a server endpoint string: relay:..., direct:..., auto:..., "
        "or any Twisted one such as tcp:2222:interface=127.0.0.1), then copy stdin to it "
        "and what it sends to stdout, byte for byte. Serves one connection and exits "
        "when it is over (0 if it ended cleanly, 1 if it was cut). relay:/direct:/auto: "
        "endpoints use this machine's identity (see peer-id) unless they give identity=."
    )
    optFlags = [["keep-open", "k", "After a connection, wait for the next one (one at a time) instead of exiting."]]


class ConnectOptions(NetcatOptions):
    synopsis = "[--progress] ENDPOINT"
    longdesc = (
        "Connect to the peer at ENDPOINT (a client endpoint string: relay:..., direct:..., auto:..., "
        "tcp:HOST:PORT, ...), copy stdin to it and what it sends to stdout, byte for byte. "
        "The end of stdin is sent as a half-close; exits 0 when both directions are done, "
        "1 with one line on stderr if connecting failed or the connection was cut."
    )


async def connect_command(reactor, options: ConnectOptions) -> int:
    """Connect, splice with stdio, wait until both directions are done."""
    endpoint = client_from_string(reactor, with_identity(options.endpoint))
    shared = SharedStdio(reactor)
    splice = stdio_splice(shared, "the connection to the peer")
    protocol = await endpoint.connect(_Once(splice.b))
    _log.info("connected to {peer}", peer=describe_address(protocol.transport.getPeer()))
    progress = _progress(reactor, options, splice)
    error = await _outcome(splice.done)
    if progress is not None:
        progress.stop()
    # The connection's connectionLost came after its pipe had sent
    # everything (a session's clean end waits for that), so exiting now
    # cuts nothing off.
    if error is not None:
        raise error
    return 0


class _StdioServer(Factory):
    """
    Serves peers on stdio one at a time: it stops listening when one
    arrives and, with --keep-open, listens again when it is gone.
    """

    noisy = False

    def __init__(self, reactor, endpoint, options: ListenOptions) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._options = options
        self._keep_open = bool(options["keep-open"])
        self._shared = SharedStdio(reactor, keep_open=self._keep_open)
        self._port = None
        self._busy = False
        self.finished: Deferred[None] = Deferred()

    async def listen(self) -> None:
        self._port = await self._endpoint.listen(self)
        host = self._port.getHost()
        peer_id = getattr(host, "peer_id", None)
        if peer_id:
            _log.info("listening on {where} as peer {peer}", where=host.transport, peer=peer_id)
        else:
            _log.info("listening on {where}", where=describe_address(host))

    def buildProtocol(self, addr):
        if self._busy:
            _log.warn("refused a connection from {peer}: already serving one", peer=describe_address(addr))
            return _Refuse()
        self._busy = True
        port, self._port = self._port, None
        if port is not None:
            # Not from inside buildProtocol: the port is still accepting this one.
            self._reactor.callLater(0, port.stopListening)
        where = describe_address(addr)
        splice = stdio_splice(self._shared, f"the connection from {where}")
        _log.info("connection from {peer}", peer=where)
        progress = _progress(self._reactor, self._options, splice)
        splice.done.addBoth(self._ended, progress, where)
        return splice.b

    def _ended(self, result, progress: Progress | None, where: str) -> None:
        if progress is not None:
            progress.stop()
        self._busy = False
        if not self._keep_open:
            if isinstance(result, Failure):
                self.finished.errback(result)
            else:
                self.finished.callback(None)
            return
        if isinstance(result, Failure):
            _log.warn("{why}", why=result.getErrorMessage())
        else:
            _log.info("connection from {peer} closed", peer=where)
        Deferred.fromCoroutine(self.listen()).addErrback(self._relistenFailed)

    async def stop(self) -> None:
        """Stop listening, if still listening."""
        port, self._port = self._port, None
        if port is not None:
            await maybeDeferred(port.stopListening)  # TCP ports may return None

    def _relistenFailed(self, failure: Failure) -> None:
        if not self.finished.called:
            self.finished.errback(failure)


async def listen_command(reactor, options: ListenOptions) -> int:
    """Listen, serve one peer (or, with --keep-open, one after another)."""
    endpoint = server_from_string(reactor, with_identity(options.endpoint))
    server = _StdioServer(reactor, endpoint, options)
    await server.listen()
    error = await _outcome(server.finished)
    await server.stop()
    if error is not None:
        raise error
    return 0
