"""
The Autobahn adapter of the relay: one L{RelayProtocol} per WebSocket.

Each socket has one control phase (exactly one JSON text message from the
client: C{listen}, C{connect} or C{accept}); a C{listen} socket then stays
the listener's control channel, and a C{connect} socket and the matching
C{accept} socket become a pair that forwards binary messages unchanged.
The pairing rules live in L{pluresync.relay.core.pairing}; this module only
moves messages, enforces the timeouts and limits, and couples the two TCP
transports of a pair as producer and consumer so a slow reader slows its
writer.

This is the only module of the relay that imports Autobahn.
"""

from __future__ import annotations

import enum
from typing import Any

from autobahn.exception import Disconnected
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pluresync.relay.core.auth import Authenticator, OpenAuth
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.core.pairing import Connector, Listener, Registry
from pluresync.relay.core.ratelimit import (
    UNLIMITED,
    ConnectionLimiter,
    SessionBudget,
    SessionMeter,
    TokenBucket,
    client_address,
)
from pluresync.relay.core.wire import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    SUBPROTOCOL,
    Accept,
    Connect,
    ErrorCode,
    Listen,
    ProtocolError,
    encode_error,
    encode_incoming,
    encode_paired,
    encode_ready,
    parse_control,
    short_id,
)
from pluresync.relay.server.metrics import RelayMetrics
from pluresync.wsframes import FastDataPath, FrameError, frame_header

log = Logger(namespace="pluresync.relay")

#: The HTTP 401 reason phrase (the refusal's reason code is appended).
UNAUTHORIZED_REASON = "Unauthorized: this relay requires a valid token"

_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CLOSED = WebSocketProtocol.STATE_CLOSED


class Phase(enum.Enum):
    """Where one relay socket is."""

    OPENING = "opening"
    """The WebSocket opening handshake is under way."""
    HELLO = "hello"
    """Open; waiting for the client's one control message."""
    LISTENING = "listening"
    """A listener's control channel."""
    CONNECTING = "connecting"
    """A connector waiting for a listener or for its accept."""
    PAIRED = "paired"
    """One end of a pair: binary messages are forwarded."""
    CLOSED = "closed"
    """The relay is closing or has closed this socket (absorbing)."""


@implementer(IPushProducer)
class _ReadThrottle:
    """
    Pauses and resumes reading from one socket's transport.

    Registered as the streaming producer of the partner's transport: when
    the partner's send buffer fills up, we stop reading from this socket, so
    TCP pushes back on its writer.  C{stopProducing} does nothing: the end
    of a pair is handled by L{RelayProtocol.onClose}, which sends a proper
    close frame instead of dropping the connection.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.paused = False  # flow control: the partner's send buffer is full
        self.limited = False  # rate limit: a bucket asked us to wait
        self._until = 0.0
        self._call: Any = None

    # The transport is paused while either reason holds: a flow-control
    # resume never lifts a rate-limit pause, nor the other way round.

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            if not self.limited:
                self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if not self.limited:
                self._transport.resumeProducing()

    def limit(self, delay: float, reactor: Any) -> None:
        """Stop reading for C{delay} seconds (extending a pause under way)."""
        until = reactor.seconds() + delay
        if self._call is not None:
            if until > self._until:
                self._until = until
                self._call.reset(delay)
            return
        self._until = until
        self._call = reactor.callLater(delay, self._unlimit)
        self.limited = True
        if not self.paused:
            self._transport.pauseProducing()

    def _unlimit(self) -> None:
        self._call = None
        if self.limited:
            self.limited = False
            if not self.paused:
                self._transport.resumeProducing()

    def release(self) -> None:
        """The pair ended: cancel any rate-limit pause and read again."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self.paused or self.limited:
            self.paused = self.limited = False
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class RelayProtocol(FastDataPath, WebSocketServerProtocol):
    """
    One relay WebSocket.  Its I{channel} methods (C{incoming}, C{failed})
    are what the L{Registry} calls.
    """

    factory: RelayFactory
    #: The authenticated tenant's name (C{None}: open relay), for logs.
    tenant: str | None = None
    #: What each forwarded frame draws from (L{pluresync.relay.core.ratelimit}).
    _bucket: Any = UNLIMITED
    #: The address counted against the per-address limits (never logged).
    _address: str | None = None
    _cap_call: Any = None
    _retry_after = 1

    def __init__(self) -> None:
        super().__init__()
        self.phase = Phase.OPENING
        self._partner: RelayProtocol | None = None
        self._throttle: _ReadThrottle | None = None
        self._hello_call: Any = None
        self._listener: Listener | None = None
        self._connector: Connector | None = None
        self._pair: Connector | None = None
        self._received = 0
        self._paired_at = 0.0
        self._connect_at = 0.0
        self._label = "-"

    # -- Autobahn callbacks ----------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.sockets.add(self)
        self.factory.metrics.connection_opened()

    def onConnect(self, request: Any) -> str:
        if self.factory.shutting_down:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "relay shutting down")
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

    @property
    def _tenant_tag(self) -> str:
        """C{" tenant=NAME"} for log labels (the tenant's name only, never its token)."""
        return f" tenant={self.tenant}" if self.tenant else ""

    def onOpen(self) -> None:
        if self.phase is not Phase.OPENING:
            return
        self.phase = Phase.HELLO
        timeout = self.factory.limits.hello_timeout
        if timeout > 0:
            self._hello_call = self.factory.reactor.callLater(timeout, self._hello_expired)

    def framingFailed(self, error: FrameError) -> None:
        # The rest of the stream cannot be parsed (we may be inside an
        # oversize frame): send the close frame with the error code, then end
        # the TCP connection once it is written.
        self.fail(ProtocolError(ErrorCode(error.code), error.message))
        if self.transport is not None:
            self.transport.loseConnection()

    def _forward(self, payload: bytes, opcode: int, fin: bool) -> None:
        partner = self._partner
        if partner is not None and partner.state == _STATE_OPEN:
            self._received += len(payload)
            partner.transport.writeSequence((frame_header(len(payload), opcode, fin), payload))
            delay = self._bucket.take(len(payload))
            if delay:
                self._rate_wait(delay)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Binary messages come here only if they arrived before the fast
        # path took over (see dataReceived); no logging, no JSON.
        partner = self._partner
        if partner is not None and isBinary:
            self._received += len(payload)
            try:
                partner.sendMessage(payload, True)
            except Disconnected:
                pass
            delay = self._bucket.take(len(payload))
            if delay:
                self._rate_wait(delay)
            return
        self._control_frame(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.sockets.discard(self)
        self._cancel_hello()
        # Autobahn leaves this timer running after the connection is gone.
        if getattr(self, "closeHandshakeTimeoutCall", None) is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        partner = self._partner
        if partner is not None:
            clean = wasClean and code == CLOSE_NORMAL and not self.closedByMe
            self._end_pair(partner, f"closed {code}" if clean else "peer-gone")
            if clean:
                partner.close(CLOSE_NORMAL, "peer closed")
            else:
                self.factory.metrics.error(ErrorCode.PEER_GONE.value)
                partner.close(ErrorCode.PEER_GONE.close_code, ErrorCode.PEER_GONE.value)
        self.phase = Phase.CLOSED
        self._unregister()
        self.factory.socket_closed()

    def onAutoPingTimeout(self) -> None:
        """
        A ping went unanswered.  If we stopped reading this socket ourselves
        (its partner reads slowly) the pong is simply unread: ping again
        later instead of dropping a healthy writer.
        """
        throttle = self._throttle
        timer = getattr(self.factory, "_batched_timer", None)
        if throttle is not None and (throttle.paused or throttle.limited) and timer is not None:
            self.autoPingTimeoutCall = None
            self.autoPingPending = None
            self.autoPingPendingCall = timer.call_later(self.autoPingInterval, self._sendAutoPing)
            return
        super().onAutoPingTimeout()

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        # Autobahn's hook for frames/messages above max_message: report
        # too-large (4009) instead of Autobahn's bare 1009 drop.
        self.failedByMe = True
        self.fail(
            ProtocolError(
                ErrorCode.TOO_LARGE,
                f"messages are at most {self.factory.limits.max_message} bytes",
            )
        )

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # Every refused upgrade passes here (ConnectionDeny from onConnect,
        # Autobahn's max-connections 503): count auth/limit refusals.
        if not self.factory.shutting_down:
            self.factory.metrics.handshake_refused(code)
        super().failHandshake(reason, code, responseHeaders)

    # -- the control phase -----------------------------------------------------

    def _control_frame(self, payload: bytes, isBinary: bool) -> None:
        if self.phase is Phase.HELLO:
            self._cancel_hello()
            if isBinary:
                self.fail(ProtocolError(ErrorCode.BAD_REQUEST, "binary message before pairing"))
                return
            try:
                message = parse_control(payload)
            except ProtocolError as error:
                self.fail(error)
                return
            if isinstance(message, Listen):
                self._listen(message)
            elif isinstance(message, Connect):
                self._connect(message)
            else:
                self._accept(message)
        elif self.phase is Phase.PAIRED:
            # A text frame after pairing (binary ones never get here).
            self.fail(ProtocolError(ErrorCode.BAD_REQUEST, "text message after pairing"))
        elif self.phase in (Phase.LISTENING, Phase.CONNECTING):
            if isBinary:
                reason = "binary message before pairing"
            else:
                reason = "only one control message per socket"
            self.fail(ProtocolError(ErrorCode.BAD_REQUEST, reason))
        # OPENING cannot receive messages; CLOSED ignores them.

    def _listen(self, message: Listen) -> None:
        self.phase = Phase.LISTENING
        self._label = f"rdv={short_id(message.rdv)} peer={short_id(message.peer)}{self._tenant_tag}"
        cap = self.factory.limits.rate.listeners_per_rdv
        if cap and self.factory.registry.listeners_of(message.rdv) >= cap:
            self.fail(ProtocolError(ErrorCode.RATE_LIMITED, f"at most {cap} listeners per rendezvous id"))
            return
        self.sendMessage(encode_ready(self.factory.announced_limits), False)
        log.info("listener ready {label}", label=self._label)
        self._listener = self.factory.registry.listen(message.rdv, message.peer, self)

    def _connect(self, message: Connect) -> None:
        self.phase = Phase.CONNECTING
        self._connect_at = self.factory.reactor.seconds()
        self._label = f"rdv={short_id(message.rdv)} from={short_id(message.from_)}{self._tenant_tag}"
        log.info(
            "connect {label} want={want} wait={wait}",
            label=self._label,
            want=short_id(message.peer),
            wait=message.wait,
        )
        try:
            self._connector = self.factory.registry.connect(
                message.rdv, message.peer, message.from_, message.wait, self
            )
        except ProtocolError as error:
            self.fail(error)

    def _accept(self, message: Accept) -> None:
        try:
            pairing = self.factory.registry.accept(message.session)
        except ProtocolError as error:
            self._label = f"session={short_id(message.session)}"
            if error.code is ErrorCode.NO_SESSION and self.factory.cluster is not None:
                # Maybe another instance holds the connector (cluster.py).
                self.factory.cluster.remote_accept(self, message.session)
                return
            self.fail(error)
            return
        other = pairing.connector.channel
        assert isinstance(other, RelayProtocol)
        if other.state != _STATE_OPEN:
            # The connector's client is closing this very moment.
            self.factory.registry.unpair(pairing.connector)
            self.fail(ProtocolError(ErrorCode.PEER_GONE, "the connector went away"))
            return
        self._label = f"{other._label} session={short_id(pairing.session)}"
        other._label = self._label
        now = self.factory.reactor.seconds()
        self.factory.metrics.paired(now - other._connect_at)
        for side, partner in ((self, other), (other, self)):
            side.phase = Phase.PAIRED
            side._partner = partner
            side._pair = pairing.connector
            side._paired_at = now
            side._throttle = _ReadThrottle(side.transport)
        budget = SessionBudget(self.factory.limits.rate.session_bytes)
        self._start_limits(budget)
        other._start_limits(budget)
        # When one side's send buffer is full, stop reading the other side.
        self.transport.registerProducer(other._throttle, True)
        other.transport.registerProducer(self._throttle, True)
        other.sendMessage(encode_paired(pairing.listener_peer, self.factory.announced_limits), False)
        self.sendMessage(encode_paired(pairing.connector_peer, self.factory.announced_limits), False)
        # From now on each frame costs a header parse, an unmask and one
        # write (wsframes); Autobahn sees only control frames.
        for side in (self, other):
            side.startFastDataPath(masked=True, max_message=self.factory.limits.max_message, on_data=side._forward)
        log.info("paired {label}", label=self._label)

    def pair_remote(self, partner: Any, peer: str | None, connector: Connector | None, session: str) -> None:
        """
        Pair this socket with C{partner}, a cluster link standing for a
        socket on another relay instance (L{pluresync.relay.cluster.link}):
        same coupling as a local pair.  C{connector} is this socket's
        registry entry when this instance owns the session.
        """
        self._label = f"{self._label} session={short_id(session)}"
        now = self.factory.reactor.seconds()
        if connector is not None:
            self.factory.metrics.paired(now - self._connect_at)
        self.phase = Phase.PAIRED
        self._partner = partner
        self._pair = connector
        self._paired_at = now
        self._throttle = _ReadThrottle(self.transport)
        self._start_limits(SessionBudget(self.factory.limits.rate.session_bytes))
        self.transport.registerProducer(partner._throttle, True)
        partner.transport.registerProducer(self._throttle, True)
        self.sendMessage(encode_paired(peer, self.factory.announced_limits), False)
        self.startFastDataPath(masked=True, max_message=self.factory.limits.max_message, on_data=self._forward)
        log.info("paired {label} (cluster link)", label=self._label)

    def _hello_expired(self) -> None:
        self._hello_call = None
        if self.phase is Phase.HELLO:
            self.fail(
                ProtocolError(
                    ErrorCode.TIMEOUT,
                    f"no control message within {self.factory.limits.hello_timeout:g} s",
                )
            )

    def _cancel_hello(self) -> None:
        if self._hello_call is not None:
            self._hello_call.cancel()
            self._hello_call = None

    # -- rate limits (pluresync.relay.core.ratelimit) -------------------------------

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

    def _retry_hint(self, error: ProtocolError) -> float | None:
        if error.retry is not None or error.code is not ErrorCode.RATE_LIMITED:
            return error.retry
        return self.factory.limits.rate.retry

    def _start_limits(self, budget: SessionBudget) -> None:
        """Pairing: set up what this side's frames draw from, and the duration cap."""
        factory = self.factory
        rate = factory.limits.rate
        if rate.session_bytes_per_second or factory.global_bucket is not None or budget.cap:
            bucket = None
            if rate.session_bytes_per_second:
                bucket = TokenBucket(rate.session_bytes_per_second, None, factory.reactor.seconds)
            self._bucket = SessionMeter(bucket, factory.global_bucket, budget)
        if rate.session_seconds:
            self._cap_call = factory.reactor.callLater(rate.session_seconds, self._rate_close, "duration")

    def _stop_limits(self) -> None:
        self._bucket = UNLIMITED
        if self._cap_call is not None:
            if self._cap_call.active():
                self._cap_call.cancel()
            self._cap_call = None
        if self._throttle is not None:
            self._throttle.release()

    def _rate_wait(self, delay: float) -> None:
        """A bucket asked this side to wait C{delay} seconds (C{inf}: byte cap reached)."""
        if delay == float("inf"):
            self._rate_close("bytes")
        elif self._throttle is not None:
            self._throttle.limit(delay, self.factory.reactor)

    def _rate_close(self, what: str) -> None:
        """A session cap (C{bytes} or C{duration}) is reached: close both sides with 4029."""
        self._cap_call = None
        partner = self._partner
        if partner is None:
            return
        retry = self.factory.limits.rate.retry
        self.factory.metrics.error(ErrorCode.RATE_LIMITED.value)
        log.info("rate-limited {label}: session {what} cap reached", label=self._label, what=what)
        self._end_pair(partner, f"rate-limited {what}")
        reason = f"{ErrorCode.RATE_LIMITED.value} retry={retry:g}"
        partner.close(ErrorCode.RATE_LIMITED.close_code, reason)
        self.close(ErrorCode.RATE_LIMITED.close_code, reason)

    # -- registry channel methods --------------------------------------------

    def incoming(self, session: str, peer: str | None) -> None:
        """A connector waits for this listener in C{session}."""
        if self.phase is Phase.LISTENING:
            self.sendMessage(encode_incoming(session, peer), False)
            log.info(
                "incoming {label} session={session} from={peer}",
                label=self._label,
                session=short_id(session),
                peer=short_id(peer),
            )

    def failed(self, error: ProtocolError) -> None:
        """The registry gave up on this connector."""
        self.fail(error)

    # -- ending ----------------------------------------------------------------

    def fail(self, error: ProtocolError) -> None:
        """
        Report C{error} and close with its close code.  Before pairing the
        client first gets the error message; after pairing it only gets the
        close code, and its partner is closed with C{peer-gone}.
        """
        if self.phase is Phase.CLOSED:
            return
        self._cancel_hello()
        self.factory.metrics.error(error.code.value)
        partner = self._partner
        log.info(
            "error {code} {label}: {message}",
            code=error.code.value,
            label=self._label,
            message=error.message,
        )
        if partner is not None:
            self._end_pair(partner, error.code.value)
            partner.close(ErrorCode.PEER_GONE.close_code, ErrorCode.PEER_GONE.value)
        elif self.state == _STATE_OPEN:
            self.sendMessage(encode_error(error.code, error.message, self._retry_hint(error)), False)
        self.close(error.code.close_code, error.code.value)
        self._unregister()

    def close(self, code: int, reason: str) -> None:
        """Close this socket with C{code} (no error message); idempotent."""
        self.phase = Phase.CLOSED
        self._cancel_hello()
        if self.state == _STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        elif self.state != _STATE_CLOSED and self.state != WebSocketProtocol.STATE_CLOSING:
            self.dropConnection(abort=True)

    def go_away(self) -> None:
        """Relay shutdown: close with 1001 "going away", no error message."""
        partner = self._partner
        if partner is not None:
            self._end_pair(partner, "shutdown")
        self.close(CLOSE_GOING_AWAY, "going away")

    def _end_pair(self, partner: RelayProtocol, how: str) -> None:
        """
        Unlink this pair (unregister the producers, resume both readers,
        unpair in the registry) and log its end.
        """
        for side in (self, partner):
            side._partner = None
            side.phase = Phase.CLOSED
            if side.transport is not None:
                side.transport.unregisterProducer()
            if side._throttle is not None:
                side._throttle.resumeProducing()
            if isinstance(side, RelayProtocol):
                side._stop_limits()
        if self._pair is not None:
            self.factory.registry.unpair(self._pair)
        self.factory.metrics.pair_closed(self._received, partner._received)
        log.info(
            "closed {label} ({how}) bytes={sent}/{received} duration={duration:.1f}s",
            label=self._label,
            how=how,
            sent=self._received,
            received=partner._received,
            duration=self.factory.reactor.seconds() - self._paired_at,
        )

    def _unregister(self) -> None:
        registry = self.factory.registry
        if self._listener is not None:
            listener, self._listener = self._listener, None
            registry.remove_listener(listener)
            log.info("listener gone {label}", label=self._label)
        if self._connector is not None:
            connector, self._connector = self._connector, None
            registry.remove_connector(connector)


class RelayFactory(WebSocketServerFactory):
    """
    Builds L{RelayProtocol}s and holds what they share: the registry, the
    limits, the reactor and the set of live sockets.
    """

    protocol = RelayProtocol
    noisy = False
    #: the L{pluresync.relay.cluster.service.Cluster} when clustered (C{--redis})
    cluster: Any = None

    def __init__(
        self, reactor: IReactorTime, limits: RelayLimits | None = None, authenticator: Authenticator | None = None
    ) -> None:
        super().__init__(url=None, protocols=[SUBPROTOCOL], reactor=reactor)
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
            tcpNoDelay=True,
            allowedOrigins=["*"],
            allowNullOrigin=True,
            maxConnections=limits.max_connections,
        )

    def stats(self) -> dict[str, int]:
        """Live counts for C{/health} (never an id)."""
        return {
            "connections": len(self.sockets),
            "listeners": self.registry.listener_count,
            "sessions": self.registry.paired_count,
            "pending": self.registry.pending_count,
        }

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
            for protocol in list(self.sockets):
                protocol.phase = Phase.CLOSED
            for protocol in list(self.sockets):
                protocol.go_away()
            for protocol in list(self.sockets):
                protocol._unregister()
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
        return super().render(request)
