"""
The Twisted relay's HTTP pipe (docs/protocol.md, "HTTP pipe"): relay
protocol v1 over plain HTTP/1.1 requests, for clients behind a proxy that
refuses WebSockets.

Each pipe is one relay socket to the rest of the relay: it runs the same
L{RelaySession} (phases, errors, close codes), sits in the same registry,
counts in the same metrics, limits and shutdown as a WebSocket, and once
paired it is an L{IPairEnd}, so a WebSocket peer pairs with an HTTP peer and
the two are coupled as producer and consumer like any pair.  Only the I/O
differs: what the relay sends goes as frames on the pipe's one long-lived
chunked downstream response; what the client sends arrives in the bodies of
a sequence of upstream requests, read as they stream in (not buffered by
twisted.web: L{PipeRequest}) and paused while the partner cannot take more.

Memory per pipe is bounded by one frame being read (the max message size)
and the TCP buffers; nothing here logs a token, an address or a full id.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from pluresync.interfaces import IPairEnd
from pluresync.relay.core.httpwire import (
    BINARY,
    CLOSE,
    CONTENT_TYPE,
    CONTINUATION,
    DEFAULT_MAX_POST,
    FIN,
    HEAD,
    PING,
    PIPE_HEADER,
    PONG,
    SEQ_HEADER,
    TEXT,
    UPSTREAM_KINDS,
    FrameBreach,
    FrameReader,
    encode_close,
    encode_open,
    frame,
    new_pipe_token,
    parse_close,
    parse_seq,
)
from pluresync.relay.core.pairing import Connector, Pairing
from pluresync.relay.core.ratelimit import SessionBudget, client_address
from pluresync.relay.core.session import Phase, RelaySession
from pluresync.relay.core.wire import (
    CLOSE_NORMAL,
    Accept,
    ErrorCode,
    ProtocolError,
)
from pluresync.relay.server.pair import Pair
from pluresync.relay.server.pairlimits import PairLimits
from pluresync.relay.server.rendezvous import RendezvousFront
from pluresync.relay.server.websocket import UNAUTHORIZED_REASON, RelayFactory, RelayProtocol

log = Logger(namespace="pluresync.relay")

#: The close a pipe gets when its client broke the frame rules (as a dropped WebSocket).
CLOSE_ABNORMAL = 1006


def _log_line(text: str) -> None:
    log.info("{text}", text=text)


class UpstreamValve:
    """
    Whether a pipe's upstream is read: the transport of whichever upstream
    request is open is paused and resumed, and one that opens while the
    valve is shut starts paused.  A L{ReadGate} drives it (flow control and
    rate limits, as for a WebSocket).
    """

    __slots__ = ("transport", "paused")

    def __init__(self) -> None:
        self.transport: Any = None
        self.paused = False

    def attach(self, transport: Any) -> None:
        self.transport = transport
        if self.paused and transport is not None:
            transport.pauseProducing()

    def detach(self) -> None:
        transport, self.transport = self.transport, None
        if self.paused and transport is not None:
            transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()


@implementer(IPairEnd)
class HttpPipe(RendezvousFront, PairLimits):
    """
    One HTTP pipe at the relay: the L{SessionFront} of its L{RelaySession}
    and, once paired, an L{IPairEnd}.
    """

    received = 0
    _pair: Pair | None = None
    _partner: IPairEnd | None = None
    front_label = " (HTTP pipe)"
    #: the registry entry of this pipe's connector when a WebSocket accepted it (unpaired here)
    _own_pairing: Connector | None = None

    def __init__(self, pipes: HttpPipes, request: Any, tenant: str | None, address: str | None) -> None:
        factory = pipes.factory
        self.pipes = pipes
        self.factory = factory
        self.token = new_pipe_token()
        self.tenant = tenant
        self._address = address
        self._request = request
        #: the downstream's TCP transport (what shutdown aborts when time is up)
        self.transport = request.channel.transport
        self._closed = False
        self._lost = False
        self._valve = UpstreamValve()
        self._upstream: Any = None
        self._completed = -1
        self._channels: set[Any] = set()
        self._reader = FrameReader(self._frame, factory.limits.max_message, UPSTREAM_KINDS)
        self._last_heard = factory.reactor.seconds()
        self._ping_call: Any = None
        self.session = RelaySession(
            self,
            factory.reactor.callLater,
            hello_timeout=factory.limits.hello_timeout,
            announced_limits=factory.announced_limits,
            default_retry=factory.limits.rate.retry,
            log=_log_line,
        )

    # -- the downstream ----------------------------------------------------------

    def start(self) -> None:
        """Answer the downstream request: headers, the C{open} frame; the socket is open."""
        request = self._request
        channel = request.channel
        # Not twisted.web's idle timer nor the opening deadline: the pipe has
        # its own hello timer and pings, like a WebSocket.
        channel.setTimeout(None)
        upgrading = getattr(channel, "upgrading", None)
        if upgrading is not None:
            upgrading()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        request.setHeader(b"Cache-Control", b"no-store, no-transform")
        request.setHeader(b"X-Accel-Buffering", b"no")
        limits = self.factory.limits
        request.write(encode_open(self.token, self.pipes.max_post, limits.ping_interval))
        request.notifyFinish().addErrback(self._downstream_lost)
        self.factory.sockets.add(self)
        self.factory.metrics.connection_opened()
        self.session.opened(self.tenant)
        if limits.ping_interval > 0:
            self._ping_call = self.factory.reactor.callLater(limits.ping_interval, self._tick)

    def _send(self, data: bytes) -> None:
        if not self._closed:
            self._request.write(data)

    def _downstream_lost(self, reason: Any) -> None:
        self._lost = True
        if not self._closed:
            self.session.client_closed(False)
            self._end()

    def _tick(self) -> None:
        """Ping the client; drop a pipe that was silent for longer than a ping interval and its timeout."""
        self._ping_call = None
        if self._closed:
            return
        limits = self.factory.limits
        now = self.factory.reactor.seconds()
        held = self._gate is not None and (self._gate.paused or self._gate.limited)
        if not held and now - self._last_heard > limits.ping_interval + limits.ping_timeout:
            self._drop()
            return
        self._send(frame(PING))
        self._ping_call = self.factory.reactor.callLater(limits.ping_interval, self._tick)

    def _drop(self) -> None:
        """End the pipe without a close frame (a dead or misbehaving client): the partner hears 4010."""
        if self._closed:
            return
        self.session.client_closed(False)
        transport = self.transport
        self._end()
        if transport is not None:
            transport.abortConnection()

    def _end(self, keep: Any = None) -> None:
        """
        The pipe is over: finish the downstream, forget the token, close its
        upstream connections (all but C{keep}, the one that carried the
        client's close and is still to be answered).
        """
        if self._closed:
            return
        self._closed = True
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        self._stop_limits()
        self.pipes.forget(self)
        self.factory.sockets.discard(self)
        if self._address is not None:
            self.factory.connection_limiter.release(self._address)
            self._address = None
        request = self._request
        if not request.finished and not self._lost:
            request.unregisterProducer()
            request.finish()
        self._valve.detach()
        for channel in self._channels:
            if channel is not keep and channel.transport is not None:
                channel.transport.loseConnection()
        self._channels.clear()
        self.factory.socket_closed()

    # -- upstreams -----------------------------------------------------------------

    def begin_upstream(self, request: Any, seq: int | None) -> int:
        """
        An upstream request's head arrived: 0 when its body is this pipe's
        next frames, else the HTTP status it is answered with (204: a
        proxy's retry of the last one, read and dropped).
        """
        if self._closed:
            return 404
        if self._upstream is None and seq is not None and seq == self._completed and seq >= 0:
            return 204
        if self._upstream is not None or seq != self._completed + 1:
            self.session.failed(ProtocolError(ErrorCode.BAD_REQUEST, "an upstream out of order"))
            return 409
        self._upstream = request
        channel = request.channel
        channel.setTimeout(None)
        upgrading = getattr(channel, "upgrading", None)
        if upgrading is not None:
            upgrading()
        self._channels.add(channel)
        self._valve.attach(channel.transport)
        self._last_heard = self.factory.reactor.seconds()
        return 0

    def upstream_data(self, request: Any, data: bytes) -> None:
        if request is not self._upstream or self._closed:
            return
        self._last_heard = self.factory.reactor.seconds()
        try:
            self._reader.feed(data)
        except FrameBreach as breach:
            self._breach(breach)

    def end_upstream(self, request: Any) -> int:
        """The upstream's body ended: the status it is answered with."""
        if request is not self._upstream:
            return 204
        self._upstream = None
        self._completed += 1
        self._valve.detach()
        if not self._closed and not self._reader.at_boundary:
            self._breach(FrameBreach("an upstream body ended inside a frame"))
        return 204

    def _breach(self, breach: FrameBreach) -> None:
        if breach.too_large:
            self.session.failed(ProtocolError(ErrorCode.TOO_LARGE, breach.message))
        else:
            log.info("dropped an HTTP pipe: {why}", why=breach.message)
            self._drop()

    def _frame(self, fin: bool, kind: int, payload: bytes) -> None:
        if self._closed:
            return
        if kind == BINARY or kind == CONTINUATION:
            partner = self._partner
            if partner is not None:
                self.received += len(payload)
                partner.writeData(payload, kind, fin)
                delay = self._bucket.take(len(payload))
                if delay:
                    self._rate_wait(delay)
            else:
                self.session.control(payload, True)
        elif kind == TEXT:
            self.session.control(payload, False)
        elif kind == PING:
            self._send(frame(PONG, payload))
        elif kind == CLOSE:
            try:
                code, reason = parse_close(payload)
            except FrameBreach as breach:
                self._breach(breach)
                return
            self.session.client_closed(code == CLOSE_NORMAL)
            self._send(encode_close(code, reason))
            self._end(keep=self._upstream.channel if self._upstream is not None else None)
        # PONG and PAD: heard, nothing to do

    # -- SessionFront ----------------------------------------------------------------

    def send_control(self, message: bytes) -> None:
        self._send(frame(TEXT, message))

    def close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._send(encode_close(code, reason))
            self._end()

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
        if not other.can_pair:
            factory.registry.unpair(pairing.connector)
            session.failed(ProtocolError(ErrorCode.PEER_GONE, "the connector went away"))
            return
        connector_label = other_session.label
        if isinstance(other, RelayProtocol):
            # The WebSocket connector couples itself with this pipe (and
            # counts the pairing, and gives the registry its entry back).
            other.pair_remote(self, pairing.listener_peer, pairing.connector, pairing.session)
            session.paired(other, pairing.connector_peer, pairing.session, label=connector_label)
            self._join(None, other)
            log.info("paired {label} (HTTP pipe and WebSocket)", label=connector_label)
            return
        factory.metrics.paired(factory.reactor.seconds() - other.connect_at)
        other_session.paired(self, pairing.listener_peer, pairing.session)
        session.paired(other, pairing.connector_peer, pairing.session, label=connector_label)
        pair = Pair(
            self,
            other,
            label=other_session.label,
            connector=pairing.connector,
            unpair=factory.registry.unpair,
            closed=factory.metrics.pair_closed,
            budget=SessionBudget(factory.limits.rate.session_bytes),
            seconds=factory.reactor.seconds,
        )
        self._join(pair, other)
        other.joined(pair, self)
        log.info("paired {label} (HTTP pipes)", label=pair.label)

    def accepted_by(self, acceptor: RelayProtocol, pairing: Pairing) -> None:
        """
        A WebSocket accepted this pipe's connector: the WebSocket couples
        itself with this pipe; this side counts the pairing and gives the
        registry its entry back when the pair ends.
        """
        factory = self.factory
        if not self.can_pair:
            factory.registry.unpair(pairing.connector)
            acceptor.session.failed(ProtocolError(ErrorCode.PEER_GONE, "the connector went away"))
            return
        factory.metrics.paired(factory.reactor.seconds() - self.connect_at)
        label = self.session.label
        self.session.paired(acceptor, pairing.listener_peer, pairing.session)
        self._own_pairing = pairing.connector
        acceptor.pair_remote(self, pairing.connector_peer, None, pairing.session)
        self._join(None, acceptor)
        log.info("paired {label} (WebSocket and HTTP pipe)", label=label)

    def pair_remote(self, end: IPairEnd, peer: str | None, connector: Connector | None, session: str) -> None:
        """
        Pair this pipe with C{end}, a cluster link standing for a socket on
        another relay instance (L{pluresync.relay.cluster}), as a WebSocket
        pairs: C{connector} is this pipe's registry entry when this instance
        owns the session.
        """
        factory = self.factory
        if connector is not None:
            factory.metrics.paired(factory.reactor.seconds() - self.connect_at)
        self.session.paired(end, peer, session)
        pair = Pair(
            self,
            end,
            label=self.session.label,
            connector=connector,
            unpair=factory.registry.unpair,
            closed=factory.metrics.pair_closed,
            budget=SessionBudget(factory.limits.rate.session_bytes),
            seconds=factory.reactor.seconds,
        )
        self._join(pair, end)
        log.info("paired {label} (HTTP pipe, cluster link)", label=pair.label)

    def joined(self, pair: Pair, partner: IPairEnd) -> None:
        """The other pipe of an HTTP pair made C{pair}: this side's part of it."""
        self._join(pair, partner)

    def _join(self, pair: Pair | None, partner: IPairEnd) -> None:
        self._pair = pair
        self._partner = partner
        self._start_limits(pair.budget if pair is not None else SessionBudget(self.factory.limits.rate.session_bytes))

    def unpaired(self, how: str) -> None:
        self._partner = None
        self._stop_limits()
        pair, self._pair = self._pair, None
        if pair is not None:
            pair.end(how, self)
        owned, self._own_pairing = self._own_pairing, None
        if owned is not None:
            self.factory.registry.unpair(owned)

    @property
    def can_pair(self) -> bool:
        """Whether this pipe is open and waiting to be paired."""
        return not self._closed and self.session.phase is Phase.CONNECTING

    # -- IPairEnd ----------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return not self._closed

    def writeData(self, payload: bytes, opcode: int, fin: bool) -> None:
        if not self._closed:
            self._request.write(HEAD.pack((FIN if fin else 0) | opcode, len(payload)) + payload)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if not self._closed:
            self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self._request.finished and not self._lost:
            self._request.unregisterProducer()

    def pauseProducing(self) -> None:
        if self._gate is not None:
            self._gate.pause()

    def resumeProducing(self) -> None:
        if self._gate is not None:
            self._gate.resume()

    def stopProducing(self) -> None:
        pass

    def end(self, code: int, reason: str) -> None:
        self.session.partner_ended(code, reason)

    def go_away(self) -> None:
        self.session.go_away()

    # -- rate limits -----------------------------------------------------------------

    def _read_source(self) -> Any:
        """What a rate limit or a full partner pauses: the valve on this pipe's upstream requests."""
        return self._valve


class HttpPipes:
    """
    The relay's HTTP pipes by token, and the admission of a new one (the
    same checks, in the same order, as a WebSocket upgrade).
    """

    def __init__(self, factory: RelayFactory, max_post: int = DEFAULT_MAX_POST) -> None:
        self.factory = factory
        self.max_post = max_post
        self._by_token: dict[str, HttpPipe] = {}

    def __len__(self) -> int:
        return len(self._by_token)

    def find(self, token: str) -> HttpPipe | None:
        """The live pipe with C{token}, if any."""
        return self._by_token.get(token)

    def open(self, request: Any) -> Any:
        factory = self.factory
        if factory.shutting_down:
            return self._refuse(request, 503, b"Service Unavailable: relay shutting down")
        if factory.opening.full(1):
            return self._refuse(request, 503, b"Service Unavailable: relay at its connection limit")
        # From here the connection counts as a relay socket, not as one
        # reading its request (opening.py), as an upgrade does.
        channel = request.channel
        upgrading = getattr(channel, "upgrading", None)
        if upgrading is not None:
            upgrading()
        address = None
        limiter = factory.connection_limiter
        if limiter.enabled:
            peer = getattr(request.getClientAddress(), "host", None) or "local"
            forwarded = request.getHeader(b"x-forwarded-for")
            address = client_address(
                peer, forwarded.decode("latin-1") if forwarded else None, factory.limits.rate.trusted_proxies
            )
            wait, why = limiter.admit(address)
            if wait:
                retry = factory.limits.rate.retry if wait == float("inf") else wait
                return self._refuse(
                    request, 429, f"Too Many Requests ({why} limit per client address)".encode(), retry=retry
                )
        header = request.getHeader(b"authorization")
        result = factory.authenticator.check(
            header.decode("latin-1") if header is not None else None, factory.reactor.seconds()
        )
        if not result.ok:
            if address is not None:
                limiter.release(address)
            log.info("refused an HTTP pipe: unauthorized ({reason})", reason=result.reason)
            return self._refuse(request, 401, f"{UNAUTHORIZED_REASON} ({result.reason})".encode())
        pipe = HttpPipe(self, request, result.tenant, address)
        self._by_token[pipe.token] = pipe
        pipe.start()
        return NOT_DONE_YET

    def _refuse(self, request: Any, status: int, reason: bytes, retry: float = 1.0) -> bytes:
        if not self.factory.shutting_down:
            self.factory.metrics.handshake_refused(status)
        # A refused upgrade closes its connection; so does a refused pipe.
        request.channel.persistent = False
        request.setResponseCode(status, reason)
        request.setHeader(b"Cache-Control", b"no-store")
        if status == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="pluresync-relay"')
        else:
            request.setHeader(b"Retry-After", str(max(1, int(retry + 0.999))).encode())
        return b""

    def upstream(self, request: Any, token: bytes, seq: bytes, length: int | None) -> HttpPipe | int:
        """The pipe an upstream request's body goes to, or the HTTP status it is refused with."""
        pipe = self.find(token.decode("ascii", "replace"))
        if pipe is None:
            return 404
        if length is not None and length > self.max_post:
            pipe.session.failed(
                ProtocolError(ErrorCode.TOO_LARGE, f"upstream bodies are at most {self.max_post} bytes")
            )
            return 413
        status = pipe.begin_upstream(request, parse_seq(seq))
        return pipe if status == 0 else status

    def forget(self, pipe: HttpPipe) -> None:
        self._by_token.pop(pipe.token, None)


_STATUS_TEXT = {404: b"Not Found", 409: b"Conflict", 413: b"Payload Too Large"}


class PipeRequest(Request):
    """
    twisted.web's request, except that the body of an HTTP pipe's upstream
    (a request carrying C{Pluresync-Pipe}) goes to its pipe as it arrives
    instead of into a buffer: a streaming upstream never ends, and a
    bounded one is read only as fast as the partner takes it.
    """

    #: C{None}: not an upstream; else the status it is answered with.
    pipe_status: int | None = None
    _pipe: HttpPipe | None = None

    def gotLength(self, length: int | None) -> None:
        pipes = getattr(getattr(self.channel, "site", None), "pipes", None)
        token = self.requestHeaders.getRawHeaders(PIPE_HEADER)
        if pipes is None or not token:
            super().gotLength(length)
            return
        self.content = BytesIO()
        seq = (self.requestHeaders.getRawHeaders(SEQ_HEADER) or [b""])[0]
        outcome = pipes.upstream(self, token[0], seq, length)
        if isinstance(outcome, HttpPipe):
            self._pipe = outcome
            self.pipe_status = 204
            return
        self.pipe_status = outcome
        if outcome != 204:
            # Refused before its body is read (a streaming body never ends):
            # answer at once and close the connection.
            transport = self.channel.transport
            if transport is not None:
                transport.write(
                    b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    % (outcome, _STATUS_TEXT.get(outcome, b"Error"))
                )
                transport.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        if self.pipe_status is None:
            super().handleContentChunk(data)
        elif self._pipe is not None:
            self._pipe.upstream_data(self, data)

    def end_upstream(self) -> int:
        """The body is read: tell the pipe, and the status to answer with."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            return pipe.end_upstream(self)
        return self.pipe_status or 404

    def connectionLost(self, reason: Any) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.end_upstream(self)
        super().connectionLost(reason)


class PipeResource(Resource):
    """C{/pipe}: a downstream opens a pipe; an upstream (read by L{PipeRequest}) is answered."""

    isLeaf = True

    def __init__(self, pipes: HttpPipes) -> None:
        super().__init__()
        self.pipes = pipes

    def render_POST(self, request: Any) -> Any:
        if isinstance(request, PipeRequest) and request.pipe_status is not None:
            request.setResponseCode(request.end_upstream())
            request.setHeader(b"Cache-Control", b"no-store, no-transform")
            return b""
        return self.pipes.open(request)
