"""
The Twisted front of the relay: one L{RelayProtocol} per WebSocket, served by
Autobahn through twisted.web.

What a socket may do and how it ends is decided by its
L{pluresync.relay.core.session.RelaySession}, the rules every relay front
shares; the registry (L{pluresync.relay.core.pairing}) decides who pairs
with whom.  This module is the adapter between them and Autobahn: it admits
upgrades (auth, per-address limits), feeds each socket's events to its
session, does what the session asks (send, close, register), and once two
sockets are paired it is each one's L{IPairEnd}: data frames are read by the
lean frame reader (L{pluresync.wsframes}) and written to the partner
unchanged, and the two TCP transports are coupled as producer and consumer
(L{pluresync.relay.server.pair}) so a slow reader slows its writer.

This is the only module of the relay that imports Autobahn's server side.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pluresync.interfaces import IPairEnd
from pluresync.reactortimers import BatchedTimers
from pluresync.relay.core.auth import Authenticator, OpenAuth
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.core.pairing import Connector, Registry
from pluresync.relay.core.ratelimit import (
    ConnectionLimiter,
    SessionBudget,
    TokenBucket,
    client_address,
)
from pluresync.relay.core.session import Phase, RelaySession
from pluresync.relay.core.wire import (
    CLOSE_NORMAL,
    SUBPROTOCOL,
    Accept,
    ErrorCode,
    ProtocolError,
)
from pluresync.relay.server.logpolicy import RELAY_LIBRARY_LOG
from pluresync.relay.server.metrics import RelayMetrics
from pluresync.relay.server.opening import OpeningConnections
from pluresync.relay.server.pair import Pair, TransportEnd
from pluresync.relay.server.pairlimits import PairLimits
from pluresync.relay.server.rendezvous import RendezvousFront
from pluresync.wsframes import OP_BINARY, PROTOCOL, FastDataPath, FrameError

log = Logger(namespace="pluresync.relay")

#: The HTTP 401 reason phrase (the refusal's reason code is appended).
UNAUTHORIZED_REASON = "Unauthorized: this relay requires a valid token"

_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CLOSED = WebSocketProtocol.STATE_CLOSED
_STATE_CLOSING = WebSocketProtocol.STATE_CLOSING


#: What the upgrade alone reads (Autobahn's handshake parse and answer): a
#: relay socket drops them once open.  Each reads C{None} afterwards.
_HANDSHAKE_ONLY = (
    "http_request_data",
    "http_response_data",
    "http_headers",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
    "_wskey",
    "current_frame_masker",
)

#: The value every relay socket starts with, for Autobahn's per-socket flags
#: and slots (set in its C{_connectionMade} and handshake) that stay at it
#: through most of a socket's life: as class attributes, a socket's own
#: dict need not hold them (L{RelayProtocol._compact}).
_SHARED_START = {
    **dict.fromkeys(_HANDSHAKE_ONLY),
    **dict.fromkeys(
        (
            "_perMessageCompress",
            "trackedTimings",
            "wasNotCleanReason",
            "localCloseCode",
            "localCloseReason",
            "remoteCloseCode",
            "remoteCloseReason",
            "openHandshakeTimeoutCall",
            "closeHandshakeTimeoutCall",
            "autoPingTimeoutCall",
            "autoPingPending",
            "autoPingPendingSent",
            "current_frame",
            "message_data",
            "frame_data",
            "tenant",
        )
    ),
    **dict.fromkeys(
        (
            "triggered",
            "wasMaxFramePayloadSizeExceeded",
            "wasMaxMessagePayloadSizeExceeded",
            "closedByMe",
            "failedByMe",
            "droppedByMe",
            "wasClean",
            "wasServerConnectionDropTimeout",
            "wasOpenHandshakeTimeout",
            "wasCloseHandshakeTimeout",
            "wasServingFlashSocketPolicyFile",
            "inside_message",
            "_isMessageCompressed",
            "message_is_binary",
        ),
        False,
    ),
    "send_state": WebSocketProtocol.SEND_STATE_GROUND,
    "autoPingPendingSeq": 0,
    "data": b"",
}

#: Autobahn's factory options, which its C{_connectionMade} copies into
#: every protocol that lacks them (about 30 dict entries a socket): a relay
#: socket reads them from its factory instead (L{RelayProtocol.__getattr__}).
_FACTORY_OPTIONS = frozenset(WebSocketServerProtocol.CONFIG_ATTRS)


class _NoWriteQueue(deque):
    """
    Autobahn's queue of chopped or synchronous writes (C{send_queue}),
    which the relay never makes: one empty queue shared by every socket
    (an empty C{deque} costs 0.75 KiB a socket), refusing any entry.
    """

    __slots__ = ()

    def append(self, item: Any) -> None:
        raise RuntimeError("relay sockets never queue writes (no sync or chopsize)")


_NO_WRITE_QUEUE = _NoWriteQueue()


@implementer(IPairEnd)
class RelayProtocol(RendezvousFront, PairLimits, TransportEnd, FastDataPath, WebSocketServerProtocol):
    """
    One relay WebSocket: the L{SessionFront} of its L{RelaySession}, and,
    once paired, an L{IPairEnd} of its pair.
    """

    factory: RelayFactory
    #: Autobahn's own lines, without client addresses (logpolicy.py).
    log = RELAY_LIBRARY_LOG
    #: The authenticated tenant's name (C{None}: open relay), for logs.
    tenant: str | None = None
    #: Bytes of data frames read from this client while paired.
    received = 0
    #: The address counted against the per-address limits (never logged).
    _address: str | None = None
    _retry_after = 1
    _pair: Pair | None = None
    _partner: IPairEnd | None = None

    def __init__(self) -> None:
        super().__init__()
        self.session: RelaySession | None = None

    def __getattr__(self, name: str) -> Any:
        # Only reached for what neither the socket nor its class holds.
        if name in _FACTORY_OPTIONS:
            factory = self.__dict__.get("factory")
            if factory is not None:
                return getattr(factory, name)
        raise AttributeError(name)

    def _compact(self) -> None:
        """
        Keep in this socket's own dict only what differs from every other
        socket's: a relay holds tens of thousands of idle ones, and a dict
        of Autobahn's 100-odd entries costs 3.3 KiB where one of 40 costs 1.
        (Deleting entries never shrinks a dict; a new one is sized to fit.)
        """
        cls = type(self)
        missing = object()
        if self.send_queue is not _NO_WRITE_QUEUE and not self.send_queue:
            self.send_queue = _NO_WRITE_QUEUE
        self.__dict__ = {k: v for k, v in self.__dict__.items() if getattr(cls, k, missing) is not v}

    # -- Autobahn callbacks ----------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        factory = self.factory
        factory.sockets.add(self)
        factory.metrics.connection_opened()
        self.session = RelaySession(
            self,
            factory.reactor.callLater,
            hello_timeout=factory.limits.hello_timeout,
            announced_limits=factory.announced_limits,
            default_retry=factory.limits.rate.retry,
            log=_log_line,
        )

    def onConnect(self, request: Any) -> str:
        if self.factory.shutting_down:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "relay shutting down")
        # Connections still reading their request hold slots too (opening.py).
        if self.factory.opening.full(1):
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "relay at its connection limit")
        self._admit(request)
        # Before anything else: an unauthorised client learns nothing more.
        # The header is handed to the authenticator and never logged.
        result = self.factory.authenticator.check(request.headers.get("authorization"), self.factory.reactor.seconds())
        if not result.ok:
            log.info("refused upgrade: unauthorized ({reason})", reason=result.reason)
            raise ConnectionDeny(401, f"{UNAUTHORIZED_REASON} ({result.reason})")
        self.tenant = result.tenant
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(
                ConnectionDeny.BAD_REQUEST,
                f"the WebSocket subprotocol {SUBPROTOCOL} is required",
            )
        return SUBPROTOCOL

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        # ConnectionDeny carries no headers; a 401 must say how to authenticate.
        if code == 401:
            responseHeaders = [*(responseHeaders or ()), ("WWW-Authenticate", 'Bearer realm="pluresync-relay"')]
        elif code == 429:
            responseHeaders = [*(responseHeaders or ()), ("Retry-After", str(self._retry_after))]
        super().sendHttpErrorResponse(code, reason, responseHeaders)

    def onOpen(self) -> None:
        # The upgrade's request and response are read only during the
        # handshake; a relay holds tens of thousands of idle sockets.
        for name in _HANDSHAKE_ONLY:
            setattr(self, name, None)
        self._compact()
        self.session.opened(self.tenant)

    def framingFailed(self, error: FrameError) -> None:
        if error.code == PROTOCOL:
            # A breach of RFC 6455 itself: the same answer as Autobahn's before
            # pairing (failByDrop), TCP dropped without a close frame; the
            # partner hears 4010 (docs/protocol.md, "WebSocket protocol violations").
            self.wasNotCleanReason = error.message
            self.dropConnection(abort=True)
            return
        # The relay protocol's own rules (a text message after pairing, too
        # large): send the close frame with the error code, then end the TCP
        # connection once it is written (the rest of the stream cannot be
        # parsed: we may be inside an oversize frame).
        self.session.failed(ProtocolError(ErrorCode(error.code), error.message))
        if self.transport is not None:
            self.transport.loseConnection()

    def _forward(self, payload: bytes, opcode: int, fin: bool) -> None:
        partner = self._partner
        if partner is not None:
            self.received += len(payload)
            partner.writeData(payload, opcode, fin)
            delay = self._bucket.take(len(payload))
            if delay:
                self._rate_wait(delay)

    def _forward_frames(self, frames: list, moved: int) -> None:
        partner = self._partner
        if partner is not None:
            self.received += moved
            partner.writeFrames(frames)
            delay = self._bucket.take(moved)
            if delay:
                self._rate_wait(delay)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Binary messages come here only if they arrived before the fast
        # path took over (see dataReceived); no logging, no JSON.
        if self._partner is not None and isBinary:
            self._forward(payload, OP_BINARY, True)
            return
        self.session.control(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.sockets.discard(self)
        # Autobahn leaves this timer running after the connection is gone.
        if getattr(self, "closeHandshakeTimeoutCall", None) is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        if self.session is not None:
            self.session.client_closed(wasClean and code == CLOSE_NORMAL and not self.closedByMe)
        self.factory.socket_closed()

    _answering_our_close = False

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        # The answer to a close we started ends the closing handshake, and
        # Autobahn's server then aborts the TCP connection (a reset the
        # client reports as an error); end it with a FIN instead.
        self._answering_our_close = self.state == _STATE_CLOSING
        try:
            return super().onCloseFrame(code, reasonRaw)
        finally:
            self._answering_our_close = False

    def dropConnection(self, abort: bool = False) -> None:
        super().dropConnection(abort and not self._answering_our_close)

    def onAutoPingTimeout(self) -> None:
        """
        A ping went unanswered.  If we stopped reading this socket ourselves
        (its partner reads slowly) the pong is simply unread: ping again
        later instead of dropping a healthy writer.
        """
        gate = self._gate
        if gate is not None and (gate.paused or gate.limited):
            self.autoPingTimeoutCall = None
            self.autoPingPending = None
            self.autoPingPendingCall = self.factory._batched_timer.call_later(self.autoPingInterval, self._sendAutoPing)
            return
        super().onAutoPingTimeout()

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        # Autobahn's hook for frames/messages above max_message: report
        # too-large (4009) instead of Autobahn's bare 1009 drop.
        self.failedByMe = True
        self.session.failed(
            ProtocolError(ErrorCode.TOO_LARGE, f"messages are at most {self.factory.limits.max_message} bytes")
        )

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # Every refused upgrade passes here (ConnectionDeny from onConnect,
        # Autobahn's max-connections 503): count auth/limit refusals.
        if not self.factory.shutting_down:
            self.factory.metrics.handshake_refused(code)
        super().failHandshake(reason, code, responseHeaders)

    # -- the session's front (pluresync.relay.core.session.SessionFront) --------

    def send_control(self, message: bytes) -> None:
        if self.state == _STATE_OPEN:
            self.sendMessage(message, False)

    def close(self, code: int, reason: str) -> None:
        """Close this socket with C{code} (no error message); idempotent."""
        if self.state == _STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        elif self.state != _STATE_CLOSED and self.state != _STATE_CLOSING:
            self.dropConnection(abort=True)

    def accept(self, session: RelaySession, message: Accept) -> None:
        factory = self.factory
        try:
            pairing = factory.registry.accept(message.session)
        except ProtocolError as error:
            if error.code is ErrorCode.NO_SESSION and factory.cluster is not None:
                # Maybe another instance holds the connector (relay.cluster).
                factory.cluster.remote_accept(self, message.session)
                return
            session.failed(error)
            return
        other_session = pairing.connector.channel
        other = other_session.front
        if not isinstance(other, RelayProtocol):
            # Another kind of relay socket (an HTTP pipe, httppipe.py) pairs itself with this one.
            other.accepted_by(self, pairing)
            return
        if not other.can_pair:
            # The connector's client is closing this very moment.
            factory.registry.unpair(pairing.connector)
            session.failed(ProtocolError(ErrorCode.PEER_GONE, "the connector went away"))
            return
        factory.metrics.paired(factory.reactor.seconds() - other.connect_at)
        # Both sides are named after the connector (rdv, from), then the session.
        connector_label = other_session.label
        other_session.paired(self, pairing.listener_peer, pairing.session)
        session.paired(other, pairing.connector_peer, pairing.session, label=connector_label)
        pair = self._couple(other, pairing.connector, other_session.label)
        other._join(pair, self)
        log.info("paired {label}", label=pair.label)

    def unpaired(self, how: str) -> None:
        self._partner = None
        self._stop_limits()
        pair, self._pair = self._pair, None
        if pair is not None:
            pair.end(how, self)

    # -- pairing ---------------------------------------------------------------

    @property
    def can_pair(self) -> bool:
        """Whether this socket is open and still waiting to be paired (a connector, or an accept)."""
        return self.state == _STATE_OPEN and self.session is not None and self.session.phase is Phase.CONNECTING

    def pair_remote(self, end: IPairEnd, peer: str | None, connector: Connector | None, session: str) -> None:
        """
        Pair this socket with C{end}, a cluster link standing for a socket on
        another relay instance (L{pluresync.relay.cluster}): the same
        coupling as a local pair.  C{connector} is this socket's registry
        entry when this instance owns the session.
        """
        factory = self.factory
        if connector is not None:
            factory.metrics.paired(factory.reactor.seconds() - self.connect_at)
        self.session.paired(end, peer, session)
        pair = self._couple(end, connector, self.session.label)
        log.info("paired {label} (cluster link)", label=pair.label)

    def _couple(self, end: IPairEnd, connector: Connector | None, label: str) -> Pair:
        """Couple this socket with C{end} and take this side's data path off Autobahn."""
        factory = self.factory
        pair = Pair(
            self,
            end,
            label=label,
            connector=connector,
            unpair=factory.registry.unpair,
            closed=factory.metrics.pair_closed,
            budget=SessionBudget(factory.limits.rate.session_bytes),
            seconds=factory.reactor.seconds,
        )
        self._join(pair, end)
        return pair

    def _join(self, pair: Pair, partner: IPairEnd) -> None:
        """
        This side's part of a pair: its partner, its limits, and from now on
        each read costs a header parse per frame, one unmasking pass and one
        write (L{pluresync.wsframes.FrameForwarder}); Autobahn sees only
        control frames.
        """
        self._pair = pair
        self._partner = partner
        self._start_limits(pair.budget)
        max_message = self.factory.limits.max_message
        if isinstance(partner, TransportEnd):
            # A socket or a cluster link: both take server frames as they are.
            self.startForwarding(max_message=max_message, on_frames=self._forward_frames)
        else:
            self.startFastDataPath(masked=True, max_message=max_message, on_data=self._forward)
        # The socket is now what it stays until the pair ends: idle, mostly.
        self.current_frame_masker = None
        self._compact()

    # -- IPairEnd --------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self.state == _STATE_OPEN

    def pauseProducing(self) -> None:
        if self._gate is not None:
            self._gate.pause()

    def resumeProducing(self) -> None:
        if self._gate is not None:
            self._gate.resume()

    def stopProducing(self) -> None:
        # A pair ends with close codes (end), never by a dropped connection.
        pass

    def end(self, code: int, reason: str) -> None:
        self.session.partner_ended(code, reason)

    def go_away(self) -> None:
        """Relay shutdown: close with 1001 "going away", no error message."""
        self.session.go_away()

    # -- rate limits (pluresync.relay.core.ratelimit) --------------------------

    def connectionLost(self, reason: Any) -> None:
        if self._address is not None:
            self.factory.connection_limiter.release(self._address)
            self._address = None
        super().connectionLost(reason)

    def _admit(self, request: Any) -> None:
        """Count this upgrade against its client address, or refuse it with HTTP 429."""
        factory = self.factory
        limiter = factory.connection_limiter
        if not limiter.enabled or self.transport is None:
            return
        peer = getattr(self.transport.getPeer(), "host", None) or "local"
        address = client_address(peer, request.headers.get("x-forwarded-for"), factory.limits.rate.trusted_proxies)
        wait, why = limiter.admit(address)
        if wait:
            retry = factory.limits.rate.retry if wait == float("inf") else wait
            self._retry_after = max(1, int(retry + 0.999))
            log.debug("refused upgrade: rate-limited ({why})", why=why)
            raise ConnectionDeny(429, f"Too Many Requests ({why} limit per client address)")
        self._address = address

    def _read_source(self) -> Any:
        """What a rate limit or a full partner pauses: this socket's transport."""
        return self.transport


for _name, _value in _SHARED_START.items():
    setattr(RelayProtocol, _name, _value)
del _name, _value


def _log_line(text: str) -> None:
    log.info("{text}", text=text)


class RelayFactory(WebSocketServerFactory):
    """
    Builds L{RelayProtocol}s and holds what they share: the registry, the
    limits, the reactor and the set of live sockets.
    """

    protocol = RelayProtocol
    noisy = False
    log = RELAY_LIBRARY_LOG
    #: the L{pluresync.relay.cluster.service.Cluster} when clustered (C{--redis})
    cluster: Any = None

    def __init__(
        self, reactor: IReactorTime, limits: RelayLimits | None = None, authenticator: Authenticator | None = None
    ) -> None:
        super().__init__(url=None, protocols=[SUBPROTOCOL], reactor=reactor)
        # Pings and handshake timeouts on our reactor, not batched on the global one.
        self._batched_timer = BatchedTimers(reactor)
        #: Who may upgrade (L{pluresync.relay.core.auth}); open by default.
        self.authenticator: Authenticator = authenticator if authenticator is not None else OpenAuth()
        self.limits = limits = limits or RelayLimits()
        self.registry = Registry(
            reactor.callLater,
            max_pending=limits.max_pending,
            accept_timeout=limits.accept_timeout,
            max_wait=limits.max_wait,
            default_wait=limits.default_wait,
        )
        self.sockets: set[RelayProtocol] = set()
        rate = limits.rate
        self.connection_limiter = ConnectionLimiter(
            rate.connections_per_second, rate.connections_burst, rate.connections_per_address, reactor.seconds
        )
        self.global_bucket = (
            TokenBucket(rate.global_bytes_per_second, None, reactor.seconds) if rate.global_bytes_per_second else None
        )
        #: the C{limits} object of C{ready} and C{paired}
        self.announced_limits = rate.announced(limits.max_message)
        #: TCP connections not upgraded yet (their deadline, their count: opening.py)
        self.opening = OpeningConnections(
            reactor,
            limits.open_timeout,
            limits.max_connections,
            self.sockets.__len__,
            self.connection_limiter,
            rate.trusted_proxies,
        )
        self.metrics = RelayMetrics(self.stats)
        self.shutting_down = False
        self._closed_waiters: list[Deferred[None]] = []
        self._shutdown_call: Any = None
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=limits.max_message,
            maxMessagePayloadSize=limits.max_message,
            # Frames are forwarded as they come (wsframes); never re-split.
            autoFragmentSize=0,
            openHandshakeTimeout=limits.open_timeout,
            closeHandshakeTimeout=limits.close_timeout,
            autoPingInterval=limits.ping_interval,
            autoPingTimeout=limits.ping_timeout,
            autoPingRestartOnAnyTraffic=True,
            perMessageCompressionAccept=lambda offers: None,
            failByDrop=True,
            # A client's close is answered with its own code (RFC 6455 5.5.1).
            echoCloseCodeReason=True,
            tcpNoDelay=True,
            allowedOrigins=["*"],
            allowNullOrigin=True,
            maxConnections=limits.max_connections,
        )

    def stats(self) -> dict[str, int]:
        """Live counts for C{/health} (never an id)."""
        return {"connections": len(self.sockets), "opening": self.opening.count, **self.registry.counts()}

    def socket_closed(self) -> None:
        if self.shutting_down and not self.sockets:
            self._all_closed()

    def close_all(self) -> Deferred[None]:
        """
        Shut down: close every WebSocket with 1001 "going away" and refuse
        new ones.  The Deferred fires when all are closed, or after
        C{shutdown_timeout} seconds, when the remaining ones are dropped.
        """
        self.shutting_down = True
        if not self.sockets:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        if self._shutdown_call is None:
            log.info("closing {count} WebSockets: going away", count=len(self.sockets))
            for protocol in _listeners_last(self.sockets):
                protocol.go_away()
            self._shutdown_call = self.reactor.callLater(self.limits.shutdown_timeout, self._drop_all)
        return waiter

    def _drop_all(self) -> None:
        self._shutdown_call = None
        for protocol in list(self.sockets):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        self.sockets.clear()
        self._all_closed()

    def _all_closed(self) -> None:
        if self._shutdown_call is not None:
            self._shutdown_call.cancel()
            self._shutdown_call = None
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class RelayResource(WebSocketResource):
    """
    The WebSocket at C{/}: Autobahn's resource, plus the hand-over of the
    connection from twisted.web (its idle timeout and its producer).
    """

    def render(self, request: Any) -> Any:
        channel = request.channel
        transport = channel.transport
        if transport is not None:
            # The HTTP channel registered itself as the transport's producer
            # and runs an idle timeout; neither may outlive the upgrade (the
            # pair registers its own producer, and the WebSocket has its own
            # timeouts).
            channel.setTimeout(None)
            transport.unregisterProducer()
        upgrading = getattr(channel, "upgrading", None)
        if upgrading is not None:
            upgrading()
        return super().render(request)


def _listeners_last(sockets: set[RelayProtocol]) -> list[RelayProtocol]:
    """
    The order to close sockets in at shutdown: a listener that went first
    would fail its offered connectors with no-listener before their own
    1001 (shutdown is 1001 in every phase, docs/protocol.md).
    """
    return sorted(sockets, key=lambda socket: socket.session is not None and socket.session.phase is Phase.LISTENING)
