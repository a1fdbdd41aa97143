"""
C{relay:} endpoints: end-to-end encrypted streams through a pluresync relay.

A client endpoint asks the relay to pair it with a listener of the same
rendezvous id, then runs the Noise handshake through the pair as initiator.
A server endpoint registers a listener (a control WebSocket); for each
connector the relay announces, it opens a new WebSocket, accepts the session
and runs the handshake as responder. User protocols are built only once the
peer is authenticated, and get a L{SecureChannel} as their transport.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.ssl import Certificate
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.address import PeerAddress
from pluresync.dial.proxy import ProxyConfig
from pluresync.errors import ConnectionTimeoutError, NotChosenError, PeerGoneError, RelayError
from pluresync.interfaces import IPath, IPathClient, IPathListener
from pluresync.keys import PeerIdentity, Topic, format_peer_id
from pluresync.pipes.websocket import RelayURL, open_relay_socket
from pluresync.relay.core.wire import CLOSE_NORMAL, ErrorCode, encode_accept, encode_connect, encode_listen
from pluresync.secure.channel import SecureChannel
from pluresync.secure.establish import attach, secure_pipe

#: The seed's relays. C{url=} overrides either.
PRESETS = {
    "azure": "wss://pluresdb-relay.azurewebsites.net",
    "vercel": "wss://pluresdb-relay.vercel.app",
}


@implementer(IPath)
@dataclass(frozen=True)
class RelayConfig:
    """
    Everything a relay endpoint needs, already validated.

    @ivar name: the transport's name as peers' addresses report it, e.g.
        C{"relay:azure"}.
    @ivar wait: how long the relay should hold a connector waiting for a
        listener to appear.
    @ivar timeout: how long a whole connection attempt (relay, pairing and
        handshake) may take.
    """

    name: str
    relay: RelayURL
    topic: Topic
    identity: PeerIdentity
    peer: bytes | None = None
    wait: float = 30.0
    timeout: float = 30.0
    ca: tuple[Certificate, ...] | None = None
    ping_interval: float = 25.0
    ping_timeout: float = 10.0
    proxy: ProxyConfig | None = None
    #: The relay token (C{token=}, C{tokenfile=}, C{PLURESYNC_RELAY_TOKEN}); never in a repr.
    token: str | None = field(default=None, repr=False)

    def open(self, reactor, hello: bytes, **callbacks) -> Deferred:
        return open_relay_socket(
            reactor,
            self.relay,
            hello,
            ca=list(self.ca) if self.ca else None,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            proxy=self.proxy,
            token=self.token,
            **callbacks,
        )

    @property
    def rendezvous_hex(self) -> str:
        return self.topic.rendezvous_id.hex()

    # IPath (pluresync.endpoints.auto): a relay is one of auto:'s paths.

    @property
    def cache_key(self) -> str:
        return self.peer.hex() if self.peer is not None else self.rendezvous_hex[:32]

    def client(self, reactor) -> RelayClientEndpoint:
        return RelayClientEndpoint(reactor, self)

    def listener(self, reactor, factory) -> RelayListeningPort:
        return RelayListeningPort(reactor, self, factory)


def _with_timeout(reactor, d: Deferred, seconds: float, what: str, address) -> Deferred:
    """
    Give C{d} a deadline, and turn its cancellation into the errors Twisted
    programs expect: L{ConnectionTimeoutError} when the deadline passed,
    C{ConnectingCancelledError} when the caller cancelled.
    """
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    timer = reactor.callLater(seconds, expire)

    def finish(result):
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure) and result.check(CancelledError):
            if timed_out:
                return Failure(ConnectionTimeoutError(f"{what} timed out after {seconds:g} s"))
            return Failure(ConnectingCancelledError(address))
        return result

    d.addBoth(finish)
    return d


def _secure(config: RelayConfig, protocol, initiator: bool) -> Deferred[SecureChannel]:
    """Run the handshake over a paired relay socket."""
    return secure_pipe(
        protocol.becomePipe,
        initiator=initiator,
        name=config.name,
        identity=config.identity,
        topic=config.topic,
        expected_peer=config.peer,
    )


@implementer(IStreamClientEndpoint, IPathClient)
class RelayClientEndpoint:
    """Connects to a peer listening through a relay."""

    def __init__(self, reactor, config: RelayConfig) -> None:
        self._reactor = reactor
        self._config = config

    @property
    def name(self) -> str:
        return self._config.name

    def connect(self, protocolFactory):
        try:
            d = self.secure()
        except BaseException:
            return fail()
        return d.addCallback(attach, protocolFactory)

    def secure(self) -> Deferred[SecureChannel]:
        """
        Pair through the relay and complete the handshake, but build no
        protocol yet: the channel is C{attach}ed by the caller, or
        C{discard}ed if another path won a race (the C{auto:} transport).
        """
        return _with_timeout(
            self._reactor,
            Deferred.fromCoroutine(self._secure()),
            self._config.timeout,
            f"connecting through {self._config.name}",
            PeerAddress(self._config.name, None),
        )

    async def _secure(self) -> SecureChannel:
        config = self._config
        hello = encode_connect(
            config.rendezvous_hex,
            peer=format_peer_id(config.peer) if config.peer is not None else None,
            from_=config.identity.peer_id,
            # Ask the relay to give up a moment before our own deadline, so
            # the user sees its explanation (no-listener), not a bare timeout.
            wait=max(0.0, min(config.wait, config.timeout - 1.0)),
        )
        try:
            protocol, _ = await config.open(self._reactor, hello)
        except RelayError as e:
            if e.code == ErrorCode.NO_LISTENER.value:
                # Peers with different keys have different rendezvous ids, so
                # they never meet at a relay: a wrong key looks exactly like this.
                raise RelayError(
                    f"{e}; no peer {'with that peer id ' if config.peer else ''}is listening with this "
                    "sync key and topic: check that the listener runs and that both sides use the same "
                    "key file and topic",
                    ErrorCode.NO_LISTENER.value,
                ) from None
            raise
        return await _secure(config, protocol, initiator=True)


@implementer(IStreamServerEndpoint)
class RelayServerEndpoint:
    """Listens for peers through a relay."""

    def __init__(self, reactor, config: RelayConfig) -> None:
        self._reactor = reactor
        self._config = config

    def listen(self, protocolFactory):
        port = RelayListeningPort(self._reactor, self._config, protocolFactory)
        return port.startListening()


@implementer(IPathListener)
class RelayListeningPort:
    """
    A listener registered at a relay.

    It holds the control WebSocket, answers every C{incoming} with a new
    paired WebSocket and a handshake, and, if the relay drops or restarts,
    registers again with exponential backoff and jitter until
    L{stopListening}. Connections already established are not affected by
    either.
    """

    _log = Logger()
    initial_delay = 1.0
    max_delay = 60.0

    def __init__(self, reactor, config: RelayConfig, factory) -> None:
        self._reactor = reactor
        self._config = config
        self._factory = factory
        self._control = None
        self._registering: Deferred | None = None
        self._retry = None
        self._delay = self.initial_delay
        self._accepting: set[Deferred] = set()
        self._stopping = False
        self._stopped: Deferred | None = None
        self.connected = False

    def getHost(self) -> PeerAddress:
        return PeerAddress(self._config.name, self._config.identity.peer_id)

    @property
    def _where(self) -> str:
        """How logs name this registration: the path and the relay's address."""
        relay = self._config.relay
        return f"{self._config.name} ({relay.host}:{relay.port})"

    def startListening(self, keep_trying: bool = False) -> Deferred:
        """
        Register at the relay; fires with this port once the relay is ready.

        @param keep_trying: if the first registration fails, report it and
            go on trying with backoff in the background (C{auto:} listeners
            use this for relays that are down when they start).
        """
        d = self._register()

        def failed(failure: Failure) -> Failure:
            if keep_trying:
                self._registrationFailed(failure)
            return failure

        d.addCallbacks(lambda _: self, failed)
        return d

    def _register(self) -> Deferred:
        config = self._config
        hello = encode_listen(config.rendezvous_hex, config.identity.peer_id)
        d = config.open(self._reactor, hello, on_incoming=self._incoming, on_lost=self._controlLost)
        d = _with_timeout(self._reactor, d, config.timeout, f"registering at {config.name}", self.getHost())
        self._registering = d

        def ready(result):
            self._registering = None
            self._control, _ = result
            self._delay = self.initial_delay
            self.connected = True
            self._log.info(
                "listening through {relay} as peer {peer}",
                relay=self._where,
                peer=config.identity.peer_id[:12],
            )

        def failed(failure):
            self._registering = None
            return failure

        d.addCallbacks(ready, failed)
        return d

    def _controlLost(self, reason: Failure) -> None:
        self._control = None
        self.connected = False
        if self._stopping:
            if self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        self._log.warn(
            "lost the listener registration at {relay} ({why}); registering again in {delay:.1f} s",
            relay=self._where,
            why=reason.getErrorMessage(),
            delay=self._delay,
        )
        self._scheduleRetry()

    def _scheduleRetry(self) -> None:
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, self.max_delay)
        self._retry = self._reactor.callLater(delay, self._retryNow)

    def _retryNow(self) -> None:
        self._retry = None
        self._register().addErrback(self._registrationFailed)

    def _registrationFailed(self, failure: Failure) -> None:
        """Log a failed registration and try again later (unless stopping)."""
        if self._stopping:
            return
        self._log.warn(
            "registering at {relay} failed ({why}); next try in {delay:.1f} s",
            relay=self._where,
            why=failure.getErrorMessage(),
            delay=self._delay,
        )
        self._scheduleRetry()

    def _incoming(self, session: str, peer: str | None) -> None:
        if self._stopping:
            return
        d = Deferred.fromCoroutine(self._accept(session))
        d = _with_timeout(self._reactor, d, self._config.timeout, "accepting a peer", self.getHost())
        self._accepting.add(d)

        def done(result):
            self._accepting.discard(d)
            if not isinstance(result, Failure) or self._stopping:
                return None
            if result.check(NotChosenError, PeerGoneError):
                # Before the handshake ends, a connector racing several
                # paths (auto:) drops the ones it does not choose: routine.
                self._log.debug(
                    "{relay}: a connecting peer chose another path ({why})",
                    relay=self._where,
                    why=result.getErrorMessage(),
                )
            else:
                self._log.warn(
                    "{relay}: an incoming connection failed: {why}", relay=self._where, why=result.getErrorMessage()
                )
            return None

        d.addBoth(done)

    async def _accept(self, session: str):
        config = self._config
        protocol, _ = await config.open(self._reactor, encode_accept(session))
        channel = await _secure(config, protocol, initiator=False)
        return attach(channel, self._factory)

    def stopListening(self) -> Deferred:
        """
        Unregister from the relay and abandon connections still in their
        handshake; established connections stay open.
        """
        if self._stopping:
            return self._stopped if self._stopped is not None else succeed(None)
        self._stopping = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._registering is not None:
            self._registering.cancel()
        for d in list(self._accepting):
            d.cancel()
        if self._control is None:
            self._stopped = succeed(None)
        else:
            self._stopped = Deferred()
            self._control.sendClose(CLOSE_NORMAL)
        return self._stopped
