"""
The client side of the HTTP pipe (docs/protocol.md, "HTTP pipe"): relay
protocol v1 over plain HTTP/1.1 requests, for networks whose proxy refuses
or breaks the WebSocket upgrade.

L{open_http_relay_socket} is L{pluresync.pipes.websocket.open_relay_socket}
over HTTP: the same hello, the same answers (C{ready} and C{incoming} on a
listener's control socket, C{paired} on a connector's or an acceptor's),
and an L{HttpRelaySocket} that offers what the relay endpoints use of a
WebSocket (C{becomePipe}, C{decline}, C{sendClose}, its cap and how it
ended), so nothing above the pipe knows which kind it holds.

Requests go through Twisted's HTTP client (L{Agent}) over the same
connection a WebSocket would use: TCP, or a tunnel through the proxy
(CONNECT), then TLS verified against C{ca=} or the system's store; to a
plain C{ws://} relay through a proxy, the proxy forwards the requests
themselves (absolute URIs, no tunnel), as it does for any C{http://} URL.  One
request, the downstream, carries everything from the relay as a chunked
response, read with backpressure (C{pauseReading} pauses its transport).
The upstream (L{pluresync.pipes.httpupstream}, an Automat machine) streams
a chunked request body registered with the TCP transport as a streaming
producer, so the session's writer is paused when the connection is full;
if the relay's answer to the upstream's first ping does not come within
C{probe} seconds, a proxy is holding the body: it ends it and sends bounded
POSTs from then on, one at a time, pausing the writer while more than one
POST's worth waits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ProxyAgent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from pluresync.dial.proxy import ProxyConfig, ProxyTunnelEndpoint
from pluresync.dial.tcp import tcp_endpoint
from pluresync.errors import (
    RelayBusyError,
    RelayError,
    RelayLostError,
    RelayUnreachableError,
)
from pluresync.interfaces import IPipe, IPipeReceiver
from pluresync.pipes.httpupstream import BytesBody, HttpUpstream
from pluresync.pipes.websocket import Answer, RelayURL, auth_error, busy_error, carrier_end
from pluresync.relay.core.httpwire import (
    BINARY,
    CLOSE,
    CONTENT_TYPE,
    CONTINUATION,
    DOWNSTREAM_KINDS,
    OPEN,
    PING,
    PIPE_PATH,
    PONG,
    TEXT,
    FrameBreach,
    FrameReader,
    encode_close,
    frame,
    frame_head,
    parse_close,
    parse_open,
)
from pluresync.relay.core.wire import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    ErrorCode,
    Incoming,
    Paired,
    Ready,
    RelayErrorMessage,
    RelayMessageError,
    encode_decline,
    parse_relay_message,
)

log = Logger(namespace="pluresync.relay.client")

#: How long the first upstream may stream before the relay's pong proves it
#: is not held by a proxy (then the client steps down to bounded POSTs).
DEFAULT_PROBE = 1.0
#: The payload of the probe ping.
PROBE = b"probe"
#: The largest data message we accept from the relay (as on a WebSocket, with the relay's announced room).
MAX_INCOMING_MESSAGE = 4 * 1024 * 1024
#: A pipe that ends without the relay's close frame (as a WebSocket's 1006).
CLOSE_ABNORMAL = 1006
#: How long after the relay's announced ping interval a silent downstream is dropped.
PING_GRACE = 10.0


def pipe_url(relay: RelayURL) -> bytes:
    """The HTTP pipe's URL for C{relay}: its path joined with C{pipe}, C{ws} become C{http}."""
    scheme = "https" if relay.secure else "http"
    rest = relay.url.split("://", 1)[1]
    authority, _, path = rest.partition("/")
    base = "/" + path
    if not base.endswith("/"):
        base += "/"
    return f"{scheme}://{authority}{base}{PIPE_PATH}".encode("ascii")


@implementer(IStreamClientEndpoint)
class QuietEndpoint:
    """
    An endpoint whose connections' factories log nothing as they start and
    stop: Agent makes one per connection, and a pipe in bounded POSTs may
    open many.
    """

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred:
        factory.noisy = False
        return self._endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class RelayEndpoints:
    """Every request of a pipe goes the way a WebSocket to the relay would: direct or CONNECT, then TLS."""

    def __init__(self, reactor, relay: RelayURL, ca: list[Certificate] | None, proxy: ProxyConfig | None) -> None:
        self._reactor = reactor
        self._relay = relay
        self._ca = ca
        self._proxy = proxy

    def endpointForURI(self, uri: Any) -> Any:
        relay = self._relay
        if self._proxy is not None:
            endpoint = ProxyTunnelEndpoint(self._reactor, self._proxy, relay.host, relay.port)
        else:
            endpoint = tcp_endpoint(self._reactor, relay.host, relay.port)
        if relay.secure:
            trust = None
            if self._ca:
                from twisted.internet.ssl import trustRootFromCertificates

                trust = trustRootFromCertificates(self._ca)
            endpoint = wrapClientTLS(optionsForClientTLS(relay.host, trustRoot=trust), endpoint)
        return QuietEndpoint(endpoint)


class Downstream(Protocol):
    """The downstream response's body: frames to the socket."""

    def __init__(self, socket: HttpRelaySocket) -> None:
        self._socket = socket

    def connectionMade(self) -> None:
        self._socket.downstream_connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._socket.downstream_data(data)

    def connectionLost(self, reason: Failure) -> None:
        self._socket.downstream_ended(reason)


@implementer(IPipe)
class HttpPipe:
    """A paired HTTP relay socket seen as an L{IPipe}: one binary frame per write."""

    __slots__ = ("_socket",)

    def __init__(self, socket: HttpRelaySocket) -> None:
        self._socket = socket

    def write(self, data: bytes) -> None:
        self._socket.send(frame_head(BINARY, len(data)) + data)

    def pauseReading(self) -> None:
        self._socket.pause_reading()

    def resumeReading(self) -> None:
        self._socket.resume_reading()

    def registerProducer(self, producer, streaming: bool) -> None:
        self._socket.register_producer(producer)

    def unregisterProducer(self) -> None:
        self._socket.register_producer(None)

    def close(self) -> None:
        self._socket.sendClose(CLOSE_NORMAL)

    def abort(self) -> None:
        self._socket.abort()

    @property
    def expires_at(self) -> float | None:
        """Reactor seconds when the relay will end this pipe at its announced cap (C{None}: no cap)."""
        return self._socket.expires_at


class HttpRelaySocket:
    """
    One HTTP pipe to the relay, from the downstream request to the end: the
    HTTP counterpart of L{pluresync.pipes.websocket.RelaySocketProtocol}.
    """

    #: the C{session_seconds} the relay announced (C{None}: no cap)
    session_seconds: float | None = None
    #: reactor seconds when the relay's answer arrived
    answered_at: float | None = None
    #: the close code the pipe ended with (1006: without a close frame), once it has
    close_code: int | None = None
    #: whether the relay's C{ready} said it takes C{decline}
    takes_decline = False

    def __init__(
        self,
        reactor,
        relay: RelayURL,
        hello: bytes,
        *,
        ca: list[Certificate] | None = None,
        proxy: ProxyConfig | None = None,
        token: str | None = None,
        on_incoming: Callable[[str, str | None], None] | None = None,
        on_lost: Callable[[Failure], None] | None = None,
        probe: float = DEFAULT_PROBE,
    ) -> None:
        self._reactor = reactor
        self.relay = relay
        self._hello = hello
        self._token = token
        self._on_incoming = on_incoming
        self._on_lost = on_lost
        self._probe = probe
        self._url = pipe_url(relay)
        self._down_pool = HTTPConnectionPool(reactor, persistent=False)
        self._up_pool = HTTPConnectionPool(reactor, persistent=True)
        self._up_pool.maxPersistentPerHost = 1
        #: C{Proxy-Authorization} for a proxy that forwards our requests (never sent to the relay itself)
        self._proxy_authorization: bytes | None = None
        if proxy is not None and not relay.secure:
            # A plain http:// relay through a proxy: the proxy forwards the
            # requests themselves (absolute URIs), as it does for curl and
            # browsers; no tunnel, which such proxies often allow only to 443.
            to_proxy = QuietEndpoint(tcp_endpoint(reactor, proxy.host, proxy.port))
            self._down_agent = ProxyAgent(to_proxy, reactor, pool=self._down_pool)
            self._up_agent = ProxyAgent(to_proxy, reactor, pool=self._up_pool)
            self._proxy_authorization = proxy.authorization()
        else:
            endpoints = RelayEndpoints(reactor, relay, ca, proxy)
            self._down_agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._down_pool)
            self._up_agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._up_pool)
        self.answer: Deferred[tuple[HttpRelaySocket, Answer]] = Deferred()
        self._reader = FrameReader(self._frame, MAX_INCOMING_MESSAGE, DOWNSTREAM_KINDS)
        self._pipe_token: str | None = None
        self._downstream: Deferred | None = None
        self._down_transport: Any = None
        self._reading_paused = False
        self._upstream: HttpUpstream | None = None
        self._producer: Any = None
        self._live_call: Any = None
        self._ping_interval = 0.0
        self._last_heard = reactor.seconds()
        self._sent_at: float | None = None
        self._answered = False
        self._closing = False
        self._ended = False
        self._relay_error: RelayError | None = None
        self._channel: IPipeReceiver | None = None

    # -- opening ----------------------------------------------------------------

    def start(self) -> Deferred[tuple[HttpRelaySocket, Answer]]:
        """Open the downstream; the Deferred fires with the relay's answer to the hello."""
        headers = Headers({b"Cache-Control": [b"no-store"]})
        if self._proxy_authorization is not None:
            headers.addRawHeader(b"Proxy-Authorization", self._proxy_authorization)
        if self._token:
            # Only on the downstream, only in this header (docs/protocol.md).
            headers.addRawHeader(b"Authorization", f"Bearer {self._token}".encode("latin-1"))
        self._sent_at = self._reactor.seconds()
        d = self._down_agent.request(b"POST", self._url, headers, BytesBody(b""))
        self._downstream = d
        d.addCallbacks(self._responded, self._unreachable)
        return self.answer

    def _unreachable(self, failure: Failure) -> None:
        self._downstream = None
        if self._ended:
            return
        relay = self.relay
        self._fail_opening(
            RelayUnreachableError(
                f"could not reach the relay at {relay.host}:{relay.port} over HTTP: {failure.getErrorMessage()}"
            )
        )

    def _responded(self, response: Any) -> None:
        self._downstream = None
        if self._ended:
            response.deliverBody(Protocol())
            return
        relay = self.relay
        code = response.code
        headers = response.headers
        if code != 200:
            readBody(response).addErrback(lambda _: None)
            phrase = response.phrase.decode("latin-1", "replace")
            status_line = f"HTTP/1.1 {code} {phrase}"
            if code == 401:
                self._fail_opening(auth_error(relay.host, bool(self._token), status_line))
            elif code in (429, 503):
                retry = (headers.getRawHeaders(b"retry-after") or [b""])[0].decode("latin-1", "replace")
                self._fail_opening(busy_error(relay.host, code, {"retry-after": retry}, f"{code} {phrase}"))
            else:
                self._fail_opening(
                    RelayUnreachableError(
                        f"HTTP {code} {phrase[:80]} instead of the relay's HTTP pipe from {relay.host}:{relay.port}: "
                        "a proxy refused the request, or this is not a pluresync relay"
                    )
                )
            return
        content_type = (headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
        if content_type != CONTENT_TYPE:
            response.deliverBody(Protocol())
            self._fail_opening(
                RelayUnreachableError(
                    f"{relay.host}:{relay.port} answered the HTTP pipe with a page, not a pipe "
                    "(a proxy's or a captive portal's): this is not a pluresync relay, or a proxy is in the way"
                )
            )
            return
        response.deliverBody(Downstream(self))

    def _fail_opening(self, error: RelayError) -> None:
        self._relay_error = error
        self._finish(CLOSE_ABNORMAL, "")

    # -- the downstream -------------------------------------------------------------

    def downstream_data(self, data: bytes) -> None:
        if self._ended:
            return
        self._last_heard = self._reactor.seconds()
        try:
            self._reader.feed(data)
        except FrameBreach as breach:
            self._protocol_error(f"the relay broke the HTTP pipe's framing: {breach.message}")

    def downstream_ended(self, reason: Failure) -> None:
        self._down_transport = None
        if not self._ended:
            self._finish(CLOSE_ABNORMAL, reason.getErrorMessage())

    def _frame(self, fin: bool, kind: int, payload: bytes) -> None:
        if self._ended:
            return
        if kind == BINARY or kind == CONTINUATION:
            if self._channel is not None:
                self._channel.pipeDataReceived(payload)
            else:
                self._protocol_error("the relay sent data before pairing")
        elif kind == TEXT:
            self._control(payload)
        elif kind == OPEN:
            self._opened(payload)
        elif kind == PING:
            self.send(frame(PONG, payload))
        elif kind == PONG:
            if payload == PROBE and self._upstream is not None:
                self._upstream.probe_answered()
        elif kind == CLOSE:
            try:
                code, reason = parse_close(payload)
            except FrameBreach as breach:
                self._protocol_error(breach.message)
                return
            self._finish(code, reason)

    def _opened(self, payload: bytes) -> None:
        if self._pipe_token is not None:
            self._protocol_error("the relay opened the pipe twice")
            return
        try:
            opened = parse_open(payload)
        except FrameBreach as breach:
            self._protocol_error(breach.message)
            return
        self._pipe_token = opened.pipe
        self._ping_interval = opened.ping
        if opened.ping > 0:
            self._live_call = self._reactor.callLater(opened.ping + PING_GRACE, self._check_live)
        relay = self.relay
        self._upstream = HttpUpstream(
            self._reactor,
            self._up_agent,
            self._url,
            opened.pipe,
            opened.max_post,
            f"{relay.host}:{relay.port}",
            self._upstream_failed,
            self._proxy_authorization,
        )
        self._upstream.register_producer(self._producer)
        # The first upstream streams, and opens with the probe.
        self._upstream.start(frame(PING, PROBE) + frame(TEXT, self._hello), self._probe)

    def _upstream_failed(self, error: Exception) -> None:
        if not self._ended and not self._closing:
            self._relay_error = error
            self.abort()

    def _check_live(self) -> None:
        self._live_call = None
        if self._ended:
            return
        silent = self._reactor.seconds() - self._last_heard
        limit = self._ping_interval + PING_GRACE
        if silent > limit and not self._reading_paused:
            self._relay_error = RelayLostError(
                f"the relay at {self.relay.host} sent nothing on the HTTP pipe for {silent:.0f} s"
            )
            self.abort()
            return
        self._live_call = self._reactor.callLater(max(1.0, limit - silent), self._check_live)

    def _control(self, payload: bytes) -> None:
        try:
            message = parse_relay_message(payload)
        except RelayMessageError as e:
            self._protocol_error(f"the relay sent a malformed control message ({e})")
            return
        if isinstance(message, RelayErrorMessage):
            self._relay_error = RelayError(
                f"the relay at {self.relay.host} refused: {message.code}: {message.message[:200]}", message.code
            )
        elif isinstance(message, Incoming) and self._answered and self._on_incoming is not None:
            self._on_incoming(message.session, message.peer)
        elif isinstance(message, Ready | Paired) and not self._answered:
            self._answered = True
            self.takes_decline = isinstance(message, Ready) and message.decline
            self.session_seconds = message.session_seconds
            self.answered_at = self._reactor.seconds()
            if not self.answer.called:
                self.answer.callback((self, message))
        else:
            self._protocol_error(f"the relay sent an unexpected {message.op!r} message")

    def _protocol_error(self, text: str) -> None:
        self._relay_error = RelayError(f"protocol error: {text}", ErrorCode.BAD_REQUEST.value)
        self.abort()

    # -- writing and reading ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send whole frames to the relay, on whichever upstream runs."""
        if self._upstream is not None and not self._ended and not self._closing:
            self._upstream.send(data)

    def register_producer(self, producer: Any) -> None:
        """Pause C{producer} (or C{None}) while the upstream is full."""
        self._producer = producer
        if self._upstream is not None:
            self._upstream.register_producer(producer)

    def pause_reading(self) -> None:
        self._reading_paused = True
        if self._down_transport is not None:
            self._down_transport.pauseProducing()

    def resume_reading(self) -> None:
        self._reading_paused = False
        self._last_heard = self._reactor.seconds()
        if self._down_transport is not None:
            self._down_transport.resumeProducing()

    def downstream_connected(self, transport: Any) -> None:
        self._down_transport = transport
        if self._reading_paused:
            transport.pauseProducing()

    # -- what the relay endpoints use of a relay socket ------------------------------------

    @property
    def expires_at(self) -> float | None:
        """Reactor seconds when the relay will end this pipe at its cap (from our first request)."""
        if self.session_seconds is None or self._sent_at is None:
            return None
        return self._sent_at + self.session_seconds

    @property
    def closed_on_purpose(self) -> bool:
        """Whether the relay ended the pipe on purpose: going away (1001) or a cap (4029)."""
        return self.close_code in (CLOSE_GOING_AWAY, ErrorCode.RATE_LIMITED.close_code)

    def becomePipe(self, channel: IPipeReceiver) -> HttpPipe:
        """After C{paired}: deliver data to C{channel} from now on."""
        self._channel = channel
        return HttpPipe(self)

    def decline(self, session: str, error: RelayError) -> bool:
        """On a listener's control pipe: tell the relay we could not accept C{session}."""
        if not self.takes_decline or self._ended or self._closing:
            return False
        busy = isinstance(error, RelayBusyError)
        code = ErrorCode.RATE_LIMITED if busy else ErrorCode.PEER_GONE
        retry = error.retry_after if busy else None
        self.send(frame(TEXT, encode_decline(session, code, str(error), retry)))
        return True

    def sendClose(self, code: int = CLOSE_NORMAL) -> None:
        """End the pipe in order: a close frame after what was written; the relay answers and ends it."""
        if self._ended or self._closing:
            return
        self._closing = True
        if self._upstream is not None:
            self._upstream.close(encode_close(code))
        else:
            # Not open yet: nothing to close in order.
            self.abort()

    def abort(self) -> None:
        """Drop the pipe at once."""
        if self._ended:
            return
        transport = self._down_transport
        self._finish(CLOSE_ABNORMAL, "")
        if self._downstream is not None:
            self._downstream.cancel()
        if transport is not None:
            transport.stopProducing()

    def _finish(self, code: int, reason: str) -> None:
        """The pipe is over: stop its requests and timers, and tell whoever waits how it ended."""
        if self._ended:
            return
        self._ended = True
        self.close_code = code
        if self._live_call is not None and self._live_call.active():
            self._live_call.cancel()
        self._live_call = None
        if self._upstream is not None:
            self._upstream.stop()
        self._up_pool.closeCachedConnections()
        transport = self._down_transport
        if transport is not None and code != CLOSE_ABNORMAL:
            # The relay ends the response after its close frame; don't wait for it.
            transport.stopProducing()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            channel.pipeLost(self._pipe_end(code))
            return
        if not self._answered:
            if not self.answer.called:
                self.answer.errback(Failure(self._refusal(code, reason)))
        elif self._on_lost is not None:
            self._on_lost(self._pipe_end(code))

    def _refusal(self, code: int, reason: str) -> RelayError:
        relay = self.relay
        if self._relay_error is not None:
            return self._relay_error
        if code == CLOSE_GOING_AWAY:
            return RelayError(f"the relay at {relay.host} is shutting down", "going-away")
        if code == CLOSE_ABNORMAL:
            return RelayUnreachableError(f"the HTTP pipe to the relay at {relay.host} ended before it was open")
        return RelayError(f"the relay at {relay.host} closed the HTTP pipe (code {code}: {reason})")

    def _pipe_end(self, code: int) -> Failure:
        # An HTTP pipe has no close handshake: its end is clean unless the relay reported an error.
        return carrier_end(self.relay.host, self._relay_error is None, code, self._relay_error, "the HTTP pipe")


def open_http_relay_socket(
    reactor,
    relay: RelayURL,
    hello: bytes,
    *,
    ca: list[Certificate] | None = None,
    ping_interval: float = 25.0,
    ping_timeout: float = 10.0,
    on_incoming: Callable[[str, str | None], None] | None = None,
    on_lost: Callable[[Failure], None] | None = None,
    proxy: ProxyConfig | None = None,
    token: str | None = None,
    probe: float = DEFAULT_PROBE,
) -> Deferred[tuple[HttpRelaySocket, Answer]]:
    """
    Open an HTTP pipe to C{relay}, send C{hello}, and wait for the relay's
    C{ready} or C{paired}: L{pluresync.pipes.websocket.open_relay_socket}
    over plain HTTP requests (the same parameters; the relay's pings set
    the pipe's liveness, so C{ping_interval} and C{ping_timeout} are not
    used).  Cancelling the Deferred drops the pipe.
    """
    socket = HttpRelaySocket(
        reactor,
        relay,
        hello,
        ca=ca,
        proxy=proxy,
        token=token,
        on_incoming=on_incoming,
        on_lost=on_lost,
        probe=probe,
    )
    cancelled = []

    def cancel(_: Deferred) -> None:
        # Our caller gets CancelledError; how the pipe ends on its way down is not news.
        cancelled.append(True)
        socket.abort()

    result: Deferred[tuple[HttpRelaySocket, Answer]] = Deferred(cancel)

    def answered(outcome: Any) -> None:
        if not cancelled:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

    socket.start().addBoth(answered)
    return result
