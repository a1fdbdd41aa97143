"""
C{relay:} endpoints: end-to-end encrypted streams through a pluresync relay.

A client endpoint asks the relay to pair it with a listener of the same
rendezvous id, then runs the Noise handshake through the pair as initiator.
A server endpoint registers a listener (a control WebSocket); for each
connector the relay announces, it opens a new WebSocket, accepts the session
and runs the handshake as responder. User protocols are built only once the
peer is authenticated, and get a L{pluresync.session.stream.Stream} as their
transport: when the relay drops the pair, the client pairs again through
the same relay and the session resumes (L{pluresync.session}).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from pluresync.address import PeerAddress
from pluresync.dial.proxy import ProxyConfig
from pluresync.endpoints import pathcache
from pluresync.endpoints.deadline import with_timeout
from pluresync.endpoints.relaylistener import RelayListeningPort
from pluresync.errors import RelayBusyError, RelayError, RelayUnreachableError
from pluresync.interfaces import IPath, IPathClient
from pluresync.keys import PeerIdentity, Topic, format_peer_id
from pluresync.pipes.http import open_http_relay_socket
from pluresync.pipes.websocket import RelaySocketProtocol, RelayURL, open_relay_socket, websocket_refused
from pluresync.relay.core.wire import ErrorCode, encode_connect
from pluresync.secure.establish import secure_link
from pluresync.secure.link import Link
from pluresync.session import attach, pool
from pluresync.session.params import SessionParams
from pluresync.session.session import new_hello

#: The seed's relays. C{url=} overrides either.
PRESETS = {
    "azure": "wss://pluresdb-relay.azurewebsites.net",
    "vercel": "wss://pluresdb-relay.vercel.app",
}


#: How many times one relay socket is tried while the relay answers 429/503.
MAX_BUSY_TRIES = 8
#: Time kept, after a retry's wait, for the upgrade itself (seconds).
BUSY_MARGIN = 0.5
#: The wait before a retry when a busy relay gave no C{Retry-After} (doubles each time).
BUSY_FIRST_DELAY = 0.25

#: C{pipe=}'s values: a WebSocket first and the HTTP pipe where it is refused, or either alone.
PIPES = ("auto", "ws", "http")

log = Logger(namespace="pluresync.relay.client")


def _digest(secret: str | None) -> bytes | None:
    """A relay token as a pool key holds it: its hash, never the token."""
    return None if secret is None else hashlib.blake2b(secret.encode(), digest_size=16).digest()


def busy_delay(retry_after: float | None, attempt: int, uniform=random.uniform) -> float:
    """
    How long to wait before trying a busy relay again: its C{Retry-After}
    (else a doubling delay), stretched by up to half at random so that a
    pool refused together does not come back together.
    """
    base = retry_after if retry_after is not None else BUSY_FIRST_DELAY * 2**attempt
    return base * uniform(1.0, 1.5)


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
    #: The session's knobs (C{resume=}, C{window=}, C{stall=}, C{ping=}, C{rotate=}).
    session: SessionParams = SessionParams()
    #: Which pipe carries the relay protocol (C{pipe=}): C{auto}, C{ws} or C{http}.
    pipe: str = "auto"
    #: Where C{pipe=auto} remembers, per network, a relay whose WebSocket was refused.
    pipes: pathcache.PathCache = field(default_factory=lambda: pathcache.pipes, compare=False, repr=False)

    def open(self, reactor, hello: bytes, *, within: float | None = None, **callbacks) -> Deferred:
        """
        Open a relay socket and send C{hello}, trying again while the relay
        answers the upgrade with 429 or 503 (L{RelayBusyError}), as long as
        its C{Retry-After} (jittered) still fits in C{within} seconds
        (default: C{timeout}); then the last refusal is the error, at once.
        """
        return Deferred.fromCoroutine(self._open(reactor, hello, self.timeout if within is None else within, callbacks))

    async def _open(self, reactor, hello: bytes, within: float, callbacks: dict):
        deadline = reactor.seconds() + within
        for attempt in range(MAX_BUSY_TRIES):
            try:
                return await self._open_pipe(reactor, hello, callbacks)
            except RelayBusyError as error:
                delay = busy_delay(error.retry_after, attempt)
                if attempt + 1 >= MAX_BUSY_TRIES or reactor.seconds() + delay > deadline - BUSY_MARGIN:
                    raise RelayBusyError(
                        f"{error} (tried {attempt + 1} time{'s' if attempt else ''} within {within:g} s)",
                        error.code,
                        error.retry_after,
                    ) from None
                await deferLater(reactor, delay, lambda: None)
        raise AssertionError("unreachable")

    async def _open_pipe(self, reactor, hello: bytes, callbacks: dict):
        """
        One relay socket on the pipe C{pipe=} asks for: with C{auto}, a
        WebSocket unless this network refused one to this relay lately, and
        the HTTP pipe when something in the way refuses or breaks the
        WebSocket (remembered, and said once).
        """
        choice = self.pipe
        relay = self.relay
        where = f"{relay.host}:{relay.port}"
        if choice == "auto" and self.pipes.order(("ws", "http"), where, reactor.seconds())[0] == "http":
            choice = "http"
        if choice == "auto":
            try:
                return await self._open_with(open_relay_socket, reactor, hello, callbacks)
            except RelayError as error:
                if not self._http_may_pass(error):
                    raise
                refused = error
            try:
                opened = await self._open_with(open_http_relay_socket, reactor, hello, callbacks)
            except RelayUnreachableError as error:
                # Neither got through: the WebSocket's failure says more.
                raise RelayUnreachableError(
                    f"{refused}; the relay's HTTP pipe did not get through either: {error}"
                ) from None
            log.info(
                "{name}: the WebSocket to {where} was refused or broken on the way ({why}); "
                "using the relay's HTTP pipe on this network",
                name=self.name,
                where=where,
                why=str(refused),
            )
            self.pipes.remember("http", where, reactor.seconds())
            return opened
        opener = open_http_relay_socket if choice == "http" else open_relay_socket
        return await self._open_with(opener, reactor, hello, callbacks)

    def _http_may_pass(self, error: RelayError) -> bool:
        """
        Whether the HTTP pipe may get through where this WebSocket did not:
        something on the way refused or broke the WebSocket itself; or, to a
        plain relay through a proxy, the proxy refused its tunnel (the HTTP
        pipe needs none: the proxy forwards its requests).  A refusal by the
        relay itself (401, 429, 503) is never one.
        """
        if websocket_refused(error):
            return True
        return (
            not self.relay.secure
            and self.proxy is not None
            and type(error) is RelayUnreachableError  # not RelayAuthError, RelayBusyError
        )

    def _open_with(self, opener, reactor, hello: bytes, callbacks: dict):
        return opener(
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
    def pool_key(self):
        """
        What connects that may share a session agree on (L{pluresync.session.pool}):
        everything that decides who the peer is and how it is reached; C{None}: never shared.
        """
        if not self.session.share:
            return None
        return (
            "relay",
            self.name,
            self.relay.url,
            self.topic.rendezvous_id,
            self.identity.pool_key,
            self.peer,
            self.session,
            self.pipe,
            self.proxy,
            tuple(cert.digest() for cert in self.ca) if self.ca else None,
            _digest(self.token),
        )

    @property
    def rendezvous_hex(self) -> str:
        return self.topic.rendezvous_id.hex()

    # IPath (pluresync.endpoints.auto): a relay is one of auto:'s paths.

    @property
    def cache_key(self) -> str:
        return self.peer.hex() if self.peer is not None else self.rendezvous_hex[:32]

    def secure(self, protocol: RelaySocketProtocol, initiator: bool, *, hello=None, resolver=None) -> Deferred[Link]:
        """Run the handshake over C{protocol}, a relay socket the relay has just paired."""
        return secure_link(
            protocol.becomePipe,
            initiator=initiator,
            name=self.name,
            identity=self.identity,
            topic=self.topic,
            expected_peer=self.peer,
            hello=hello,
            resolver=resolver,
        )

    def client(self, reactor) -> RelayClientEndpoint:
        return RelayClientEndpoint(reactor, self)

    def listener(self, reactor, factory, sessions: attach.SessionTable | None = None) -> RelayListeningPort:
        return RelayListeningPort(reactor, self, factory, sessions=sessions)


@implementer(IStreamClientEndpoint, IPathClient)
class RelayClientEndpoint(pool.SharingClient):
    """Connects to a peer listening through a relay."""

    def __init__(self, reactor, config: RelayConfig) -> None:
        self._reactor = reactor
        self._config = config

    @property
    def name(self) -> str:
        return self._config.name

    def _connect(self, protocolFactory, on_session):
        try:
            d = self.secure()
        except BaseException:
            return fail()
        config = self._config
        return d.addCallback(
            attach.connect,
            protocolFactory,
            clock=self._reactor,
            params=config.session,
            local_id=config.identity.peer_id,
            reconnect=self.secure if config.session.resume > 0 else None,
            on_session=on_session,
        )

    def secure(self, hello=None) -> Deferred[Link]:
        """
        Pair through the relay and complete the handshake, but start no
        session yet: the link is used by the caller, or C{discard}ed if
        another path won a race (the C{auto:} transport).

        @param hello: makes the session hello (a resume of an existing
            session); a new session's by default.
        """
        config = self._config
        if hello is None:
            params = config.session

            def hello():
                return new_hello(params)

        return with_timeout(
            self._reactor,
            Deferred.fromCoroutine(self._secure(hello)),
            config.timeout,
            f"connecting through {config.name}",
            PeerAddress(config.name, None),
        )

    async def _secure(self, hello) -> Link:
        config = self._config
        request = encode_connect(
            config.rendezvous_hex,
            peer=format_peer_id(config.peer) if config.peer is not None else None,
            from_=config.identity.peer_id,
            # Ask the relay to give up a moment before our own deadline, so
            # the user sees its explanation (no-listener), not a bare timeout.
            wait=max(0.0, min(config.wait, config.timeout - 1.0)),
        )
        try:
            protocol, _ = await config.open(self._reactor, request)
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
        return await config.secure(protocol, initiator=True, hello=hello)


@implementer(IStreamServerEndpoint)
class RelayServerEndpoint:
    """Listens for peers through a relay."""

    def __init__(self, reactor, config: RelayConfig) -> None:
        self._reactor = reactor
        self._config = config

    def listen(self, protocolFactory):
        port = RelayListeningPort(self._reactor, self._config, protocolFactory)
        return port.startListening()
