"""
The client side of relay protocol v1: one WebSocket to a relay.

This is the only client module that knows Autobahn. It opens a WebSocket
(through TLS for C{wss://}, verifying the relay's certificate), sends the one
control message it is given (encoded by L{pluresync.relay.core.wire}, which
also parses every answer), and reports the relay's answer:

 - a listener's control socket fires C{ready}, then calls C{on_incoming} for
   each connector;
 - a connector's (or an accepting listener's) socket fires C{paired}, after
   which it is an L{IPipe} for the end-to-end layer, one binary WebSocket
   message per write.

Either answer may announce a cap on the socket's life (C{session_seconds}
in its C{limits}): the socket keeps it, and its C{expires_at} says when,
at the earliest, the relay will end it.

Failures become L{RelayError}s that say what the relay said (its code), or
L{RelayUnreachableError} when no WebSocket could be opened at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectionResponse
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.dial.proxy import ProxyConfig, ProxyTunnelEndpoint
from pluresync.dial.tcp import tcp_endpoint
from pluresync.dial.tlserrors import describe_tls_failure
from pluresync.errors import (
    ConfigurationError,
    PeerGoneError,
    RelayAuthError,
    RelayBusyError,
    RelayError,
    RelayLostError,
    RelayUnreachableError,
)
from pluresync.interfaces import IPipe, IPipeReceiver
from pluresync.reactortimers import ReactorTimers
from pluresync.relay.core.wire import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    SUBPROTOCOL,
    ErrorCode,
    Incoming,
    Paired,
    Ready,
    RelayErrorMessage,
    RelayMessageError,
    encode_decline,
    parse_relay_message,
)
from pluresync.tcpwrite import send_now
from pluresync.wsframes import FastDataPath, FrameError, client_frame

#: What the relay answers a hello with: C{ready} to a listener, C{paired}
#: to a connector or an acceptor.
Answer = Ready | Paired
#: Largest WebSocket message we accept from the relay: one record frame
#: (64 KiB) with room to spare; anything larger is not ours.
MAX_INCOMING_MESSAGE = 256 * 1024
#: How much a paired socket's TCP transport buffers before it pauses the
#: session writing to it.  Twisted's default (64 KiB) is less than one
#: 64 KiB write's message, so the writer was paused and resumed after every
#: write; four writes' worth measured +10-19 % throughput and less CPU on
#: both peers (docs/benchmarks.md), and still bounds memory per connection.
PIPE_BUFFER = 256 * 1024
#: The most a paired socket accepts in one message when its relay announces
#: a larger max_message: enough for any relay's use, and a bound on what one
#: message can make us buffer, whatever a relay claims.
MAX_ANNOUNCED_MESSAGE = 4 * 1024 * 1024
#: How long after the upgrade a frame from the relay (the pong to the ping
#: we send at once, or its answer) must arrive; else something on the way
#: holds the WebSocket's frames (L{websocket_refused}).
FLOW_PROBE = 5.0
#: The probe ping's payload.
_FLOW_PING = b"pluresync-flow"

_STATE_OPEN = WebSocketClientProtocol.STATE_OPEN
#: The relay's refusal reason code at the end of its 401 reason phrase.
_AUTH_REASON = re.compile(r"\(([a-z][a-z-]{0,30})\)\s*$")


def auth_error(host: str, sent_token: bool, status_line: str) -> RelayAuthError:
    """The error for a 401 answer to our upgrade (never quoting our token)."""
    match = _AUTH_REASON.search(status_line)
    why = f" ({match.group(1)})" if match else ""
    if sent_token:
        problem = f"the relay at {host} refused our relay token (HTTP 401{why})"
    else:
        problem = f"the relay at {host} requires a relay token and none was given (HTTP 401{why})"
    return RelayAuthError(
        f"{problem}: give a valid token with tokenfile=PATH in the endpoint string or the "
        "PLURESYNC_RELAY_TOKEN environment variable (the token itself, or a file holding it); "
        "ask the relay's operator for one (`pluresync relay-token` mints signed tokens)"
    )


#: The longest C{Retry-After} we take from a relay (a larger one is capped).
MAX_RETRY_AFTER = 10.0


def busy_error(host: str, status: int, headers: dict, status_text: str = "") -> RelayBusyError:
    """The error for a 429 or 503 answer to our upgrade, with its C{Retry-After} (seconds)."""
    retry_after = None
    try:
        value = float(str(headers.get("retry-after", "")).strip())
        if value >= 0 and value == value:
            retry_after = min(value, MAX_RETRY_AFTER)
    except ValueError:
        pass
    after = f", retry after {retry_after:g} s" if retry_after is not None else ""
    if status == 429:
        return RelayBusyError(
            f"the relay at {host} refused the connection: too many connections from this address "
            f"(HTTP 429, rate-limited{after}); fewer at once, or ask the relay's operator for higher limits",
            "rate-limited",
            retry_after,
        )
    return RelayBusyError(
        f"the relay at {host} is at its connection limit or shutting down "
        f"(upgrade failed [503]: {status_text.partition(' ')[2] or 'Service Unavailable'}{after})",
        "busy",
        retry_after,
    )


def websocket_refused(error: Exception) -> bool:
    """
    Whether C{error} (from L{open_relay_socket}) says that something between
    us and the relay refused or broke the WebSocket itself (a proxy's 4xx/5xx
    or a 200 instead of the 101, a reset during or right after the upgrade),
    rather than that the relay could not be reached or refused us: then the
    HTTP pipe (L{pluresync.pipes.http}) may get through where it did not.
    """
    return getattr(error, "websocket_refused", False) is True


def _refused(error: RelayError) -> RelayError:
    error.websocket_refused = True
    return error


def _status_text(status_line: str) -> str:
    """C{"200 OK"} of C{"HTTP/1.0 200 OK"} (at most 80 characters)."""
    return status_line.strip().partition(" ")[2][:80]


def _upgrade_status(status_line: str | None) -> int | None:
    parts = (status_line or "").split()
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


@dataclass(frozen=True)
class RelayURL:
    """A parsed relay URL: where to connect and what to show in messages."""

    url: str
    secure: bool
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> RelayURL:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ConfigurationError(f"relay url must start with wss:// (or ws:// for a local relay), got {url!r}")
        if not parts.hostname:
            raise ConfigurationError(f"relay url has no host: {url!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigurationError("relay url must not carry credentials, a query or a fragment")
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"relay url has a bad port: {url!r}") from None
        if port is None:
            port = 443 if parts.scheme == "wss" else 80
        elif port == 0:
            # urlsplit takes :0, and "or the default" would turn it into 80.
            raise ConfigurationError(f"relay url has a bad port (0): {url!r}")
        path = parts.path or "/"
        host = parts.hostname
        netloc = f"[{host}]" if ":" in host else host
        return cls(f"{parts.scheme}://{netloc}:{port}{path}", parts.scheme == "wss", host, port)

    def __str__(self) -> str:
        return self.url


class _AutobahnLog(Logger):
    """
    Autobahn's own lines about a relay socket: its debug lines dropped (they
    quote the upgrade request, token included), its info and warning lines
    demoted to debug, since every way a socket fails is reported once, as the error of the call that opened it
    (L{RelaySocketProtocol._refusal}); Autobahn's warning before it
    ("dropping connection to peer ...") only said the same thing worse.
    """

    def __get__(self, oself: object, type: object = None) -> _AutobahnLog:
        return self

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level < LogLevel.info:
            # Autobahn's own debug lines carry whole upgrade requests, the
            # Authorization header (our relay token) included: never emitted.
            return
        # Errors stay errors: a failure inside our own callbacks must show.
        super().emit(level if level >= LogLevel.error else LogLevel.debug, format, **kwargs)

    def trace(self, *args: object, **kwargs: object) -> None:
        """txaio's level below debug: never logged."""


_AUTOBAHN_LOG = _AutobahnLog(namespace="pluresync.relay.client.autobahn")


@implementer(IPipe)
class WebSocketPipe:
    """A paired relay WebSocket seen as an L{IPipe}: one message per write."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, protocol: RelaySocketProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport
        # The socket's own transport: under TLS (wss://, a proxy's tunnel) it
        # is a few wrappers down, and it is the one that pauses producers.
        carrier = protocol.transport
        for _ in range(4):
            if carrier is None:
                break
            if hasattr(carrier, "bufferSize"):
                carrier.bufferSize = PIPE_BUFFER
                break
            carrier = getattr(carrier, "transport", None)

    def write(self, data: bytes) -> None:
        if self._protocol.state == _STATE_OPEN:
            # Sent in this reactor turn when nothing waits (tcpwrite.py): a
            # small record is not held for the next turn.
            send_now(self._transport, list(client_frame(data)))

    def pauseReading(self) -> None:
        self._transport.pauseProducing()

    def resumeReading(self) -> None:
        self._transport.resumeProducing()

    def registerProducer(self, producer, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def close(self) -> None:
        self._protocol.sendClose(CLOSE_NORMAL)

    def abort(self) -> None:
        self._transport.abortConnection()

    @property
    def expires_at(self) -> float | None:
        """
        Reactor seconds when the relay will end this pipe at its announced
        cap, or C{None} when it announced none (L{RelaySocketProtocol.expires_at}).
        """
        return self._protocol.expires_at


class RelaySocketProtocol(FastDataPath, WebSocketClientProtocol):
    """One WebSocket to the relay, from the upgrade to the close."""

    factory: RelaySocketFactory
    log = _AUTOBAHN_LOG
    #: The C{session_seconds} the relay announced in its answer (C{None}: no cap).
    session_seconds: float | None = None
    #: Reactor seconds when the relay's answer (C{ready} or C{paired}) arrived.
    answered_at: float | None = None
    #: The close code the socket ended with (1006: without a close frame), once it has.
    close_code: int | None = None
    #: Reactor seconds when we sent the upgrade request.
    _upgrade_sent_at: float | None = None
    #: Whether the relay's C{ready} said it takes C{decline} on this control socket.
    takes_decline = False

    def __init__(self) -> None:
        super().__init__()
        self._opened = False
        self._answered = False
        self._relay_error: RelayError | None = None
        self._channel: IPipeReceiver | None = None
        self._lost_reason: Failure | None = None
        self._flow_call = None

    def connectionLost(self, reason: Failure) -> None:
        # Autobahn keeps only a text of why (wasNotCleanReason); a TLS
        # failure needs the real exception to be explained.
        self._lost_reason = reason
        super().connectionLost(reason)

    def startHandshake(self) -> None:
        # No relay can count a socket's life from before it got our upgrade request.
        self._upgrade_sent_at = self.factory.reactor.seconds()
        super().startHandshake()

    @property
    def expires_at(self) -> float | None:
        """
        Reactor seconds when the relay will end this socket at its announced
        C{session_seconds}, or C{None} when it announced no cap.

        Counted, conservatively, from when we sent the upgrade request: the
        Twisted relay counts from the pairing, the Vercel function from its
        side of the upgrade, both later (docs/protocol.md).  On the Vercel
        function a pair also ends when its other socket reaches its own
        cap, which for an accepting socket can come sooner.
        """
        if self.session_seconds is None or self._upgrade_sent_at is None:
            return None
        return self._upgrade_sent_at + self.session_seconds

    @property
    def closed_on_purpose(self) -> bool:
        """
        Whether the relay ended this socket with one of the closes it gives
        on purpose rather than for an error: 1001 C{going away} (shutdown,
        the Vercel function's cap) or 4029 (a cap).
        """
        return self.close_code in (CLOSE_GOING_AWAY, ErrorCode.RATE_LIMITED.close_code)

    def onConnect(self, response: ConnectionResponse) -> None:
        if response.protocol != SUBPROTOCOL:
            self._relay_error = RelayUnreachableError(
                f"{self.factory.relay.host} is not a pluresync relay (it did not accept {SUBPROTOCOL})"
            )
            self.dropConnection(abort=True)

    def onOpen(self) -> None:
        if self.state != _STATE_OPEN:
            # onConnect refused the server and dropped the socket, but
            # Autobahn opens it anyway: sending would raise into its Deferred.
            return
        self._opened = True
        self.sendMessage(self.factory.hello, isBinary=False)
        if FLOW_PROBE > 0:
            # A connector's answer may take its whole wait; a pong comes at once.
            self.sendPing(_FLOW_PING)
            self._flow_call = self.factory.reactor.callLater(FLOW_PROBE, self._no_flow)

    def onPong(self, payload: bytes) -> None:
        if payload == _FLOW_PING:
            self._flowing()

    def _flowing(self) -> None:
        call, self._flow_call = self._flow_call, None
        if call is not None and call.active():
            call.cancel()

    def _no_flow(self) -> None:
        """Nothing came back after the upgrade: something on the way holds the WebSocket's frames."""
        self._flow_call = None
        if self._answered or self.state != _STATE_OPEN:
            return
        relay = self.factory.relay
        self._relay_error = _refused(
            RelayUnreachableError(
                f"no WebSocket frame came back from {relay.host}:{relay.port} within {FLOW_PROBE:g} s of the "
                "upgrade: something on the way holds WebSocket traffic"
            )
        )
        self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._flow_call is not None:
            self._flowing()
        if isBinary:
            if self._channel is not None:
                self._channel.pipeDataReceived(payload)
            else:
                self._protocolError("the relay sent data before pairing")
            return
        try:
            message = parse_relay_message(payload)
        except RelayMessageError as e:
            self._protocolError(f"the relay sent a malformed control message ({e})")
            return
        if isinstance(message, RelayErrorMessage):
            self._relay_error = RelayError(
                f"the relay at {self.factory.relay.host} refused: {message.code}: {message.message[:200]}",
                message.code,
            )
        elif isinstance(message, Incoming) and self._answered and self.factory.on_incoming is not None:
            self.factory.on_incoming(message.session, message.peer)
        elif isinstance(message, (Ready, Paired)) and not self._answered:
            self._answered = True
            self.takes_decline = isinstance(message, Ready) and message.decline
            self.session_seconds = message.session_seconds
            limits = message.limits if isinstance(message.limits, Mapping) else {}
            announced = limits.get("max_message")
            if isinstance(announced, int) and not isinstance(announced, bool) and announced > MAX_INCOMING_MESSAGE:
                # What the relay forwards, it let the peer send: accept it (protocol.md, "Message size").
                self.max_incoming = min(announced, MAX_ANNOUNCED_MESSAGE)
            self.answered_at = self.factory.reactor.seconds()
            self.factory.answered(self, message)
        else:
            self._protocolError(f"the relay sent an unexpected {message.op!r} message")

    def decline(self, session: str, error: RelayError) -> bool:
        """
        On a listener's control socket: tell the relay we could not accept
        C{session} (C{error}: why), so its connector hears it at once rather
        than at the relay's accept timeout.  Only to a relay that said it
        takes it; returns whether it was sent.
        """
        if not self.takes_decline or self.state != _STATE_OPEN:
            return False
        busy = isinstance(error, RelayBusyError)
        code = ErrorCode.RATE_LIMITED if busy else ErrorCode.PEER_GONE
        retry = error.retry_after if busy else None
        self.sendMessage(encode_decline(session, code, str(error), retry), isBinary=False)
        return True

    def _protocolError(self, text: str) -> None:
        self._relay_error = RelayError(f"protocol error: {text}", ErrorCode.BAD_REQUEST.value)
        self.dropConnection(abort=True)

    def becomePipe(self, channel: IPipeReceiver) -> WebSocketPipe:
        """
        After C{paired}: deliver binary messages to C{channel} from now on,
        through the lean frame reader (L{pluresync.wsframes}).
        """
        self._channel = channel
        self.startFastDataPath(
            masked=False,
            max_message=getattr(self, "max_incoming", MAX_INCOMING_MESSAGE),
            on_data=lambda payload, opcode, fin: channel.pipeDataReceived(payload),
        )
        return WebSocketPipe(self)

    def framingFailed(self, error: FrameError) -> None:
        self._protocolError(f"the relay broke the WebSocket framing: {error.message}")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # Autobahn keeps its close-handshake timer when the TCP connection
        # ends before the relay's close reply; nothing is left to time out.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        self._flowing()
        self.close_code = code
        if self._channel is not None:
            channel, self._channel = self._channel, None
            channel.pipeLost(self._pipeEnd(wasClean, code))
            return
        if not self._answered:
            self.factory.failed(self._refusal(code, reason))
        elif self.factory.on_lost is not None:
            self.factory.on_lost(Failure(self._pipeEnd(wasClean, code).value))

    def _refusal(self, code: int | None, reason: str | None) -> RelayError:
        relay = self.factory.relay
        if self._relay_error is not None:
            return self._relay_error
        if not self._opened:
            if relay.secure and self._lost_reason is not None:
                tls = describe_tls_failure(self._lost_reason, relay.host, relay.port, transport=self.transport)
                if tls is not None:
                    return RelayUnreachableError(tls)
            status_line = getattr(self, "http_status_line", None)
            status = _upgrade_status(status_line)
            if status == 401:
                return auth_error(relay.host, self.factory.sent_token, status_line)
            if status in (429, 503):
                return busy_error(
                    relay.host, status, getattr(self, "http_headers", None) or {}, _status_text(status_line)
                )
            detail = getattr(self, "wasNotCleanReason", None) or reason or "connection failed"
            if status_line and status != 101:
                # It answered in HTTP, but not as a relay does (a web server,
                # a proxy's page, an HTTP/1.0 server): say so, once.
                return _refused(
                    RelayUnreachableError(
                        f"HTTP {_status_text(status_line)} instead of the WebSocket upgrade from "
                        f"{relay.host}:{relay.port}: this is not a pluresync relay (check the relay URL), "
                        "or a proxy refused the WebSocket"
                    )
                )
            return _refused(RelayUnreachableError(f"could not open a WebSocket to the relay at {relay.host}: {detail}"))
        if code == CLOSE_GOING_AWAY:
            return RelayError(f"the relay at {relay.host} is shutting down", "going-away")
        error = RelayError(f"the relay at {relay.host} closed the connection (code {code}: {reason})")
        # Dropped without a close frame before the relay said anything: a
        # proxy that lets the upgrade through and then cuts the socket.
        return _refused(error) if code in (None, 1006) else error

    def _pipeEnd(self, wasClean: bool, code: int | None) -> Failure:
        return carrier_end(self.factory.relay.host, wasClean, code, self._relay_error, "the connection")


def carrier_end(relay: str, clean: bool, code: int | None, relay_error: Exception | None, carrier: str) -> Failure:
    """
    How a paired relay socket's end reaches its link, whatever carried it
    (C{carrier}: "the connection" for a WebSocket, "the HTTP pipe"): clean,
    the peer gone, the relay's own error, the relay going away, or lost.
    """
    if clean and code == CLOSE_NORMAL:
        return Failure(ConnectionDone())
    if ErrorCode.from_close_code(code) is ErrorCode.PEER_GONE:
        return Failure(PeerGoneError("the peer vanished (its connection to the relay ended without a clean close)"))
    if relay_error is not None:
        return Failure(RelayLostError(str(relay_error)))
    if code == CLOSE_GOING_AWAY:
        return Failure(RelayLostError(f"the relay at {relay} is shutting down (going away)"))
    return Failure(RelayLostError(f"{carrier} to the relay at {relay} was lost (close code {code})"))


class RelaySocketFactory(WebSocketClientFactory):
    """
    Makes one L{RelaySocketProtocol} that sends C{hello} (an encoded control
    message: L{pluresync.relay.core.wire.encode_listen} and its siblings)
    and reports the answer.
    """

    protocol = RelaySocketProtocol
    noisy = False
    log = _AUTOBAHN_LOG  # one socket per connection: "Starting factory" lines are noise

    def __init__(
        self,
        reactor,
        relay: RelayURL,
        hello: bytes,
        *,
        ping_interval: float,
        ping_timeout: float,
        on_incoming: Callable[[str, str | None], None] | None = None,
        on_lost: Callable[[Failure], None] | None = None,
        token: str | None = None,
    ) -> None:
        # The token travels only in this header (RFC 6750), never in the URL.
        headers = {"Authorization": f"Bearer {token}"} if token else None
        super().__init__(relay.url, protocols=[SUBPROTOCOL], reactor=reactor, headers=headers)
        self.sent_token = bool(token)
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_INCOMING_MESSAGE,
            maxMessagePayloadSize=MAX_INCOMING_MESSAGE,
            autoFragmentSize=0,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=5,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            autoPingRestartOnAnyTraffic=True,
            perMessageCompressionOffers=[],
            tcpNoDelay=True,
        )
        # Autobahn's pings and timeouts on our reactor, not the global one; a
        # client holds only a few sockets, so batching would buy nothing.
        self._batched_timer = ReactorTimers(reactor)
        self.relay = relay
        self.hello = hello
        self.on_incoming = on_incoming
        self.on_lost = on_lost
        self.answer: Deferred[tuple[RelaySocketProtocol, Answer]] = Deferred()

    def answered(self, protocol: RelaySocketProtocol, message: Answer) -> None:
        if not self.answer.called:
            self.answer.callback((protocol, message))

    def failed(self, error: Exception) -> None:
        if not self.answer.called:
            self.answer.errback(Failure(error))


def open_relay_socket(
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
) -> Deferred[tuple[RelaySocketProtocol, Answer]]:
    """
    Open a WebSocket to C{relay}, send C{hello} (an encoded control message),
    and wait for the relay's C{ready} or C{paired}.

    @param ca: trust these CA certificates instead of the system's (for a
        private relay). Verification is never switched off.
    @param proxy: reach the relay through this HTTP proxy (CONNECT).
    @param token: the relay token, sent as C{Authorization: Bearer} on the
        upgrade (a 401 answer fails with L{RelayAuthError}).
    @return: a Deferred firing with the protocol and the relay's answer (a
        L{Ready} or L{Paired}); cancelling it aborts the socket.
    """
    factory = RelaySocketFactory(
        reactor,
        relay,
        hello,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        on_incoming=on_incoming,
        on_lost=on_lost,
        token=token,
    )
    if proxy is not None:
        # TCP to the proxy, CONNECT relay.host:relay.port; TLS (below) runs
        # inside the tunnel, so the proxy sees only the host name and port.
        endpoint = ProxyTunnelEndpoint(reactor, proxy, relay.host, relay.port)
    else:
        endpoint = tcp_endpoint(reactor, relay.host, relay.port)
    if relay.secure:
        trust = None
        if ca:
            from twisted.internet.ssl import trustRootFromCertificates

            trust = trustRootFromCertificates(ca)
        endpoint = wrapClientTLS(optionsForClientTLS(relay.host, trustRoot=trust), endpoint)
    connecting = endpoint.connect(factory)
    protocols: list[RelaySocketProtocol] = []
    cancelled = []

    def cancel(_: Deferred) -> None:
        # Our caller gets CancelledError from the Deferred machinery; what
        # the connection attempt reports on its way down is not news.
        cancelled.append(True)
        factory.answer.addErrback(lambda _: None)
        connecting.cancel()
        for protocol in protocols:
            protocol.transport.abortConnection()

    result: Deferred[tuple[RelaySocketProtocol, Answer]] = Deferred(cancel)

    def connected(protocol: RelaySocketProtocol) -> None:
        protocols.append(protocol)
        factory.answer.chainDeferred(result)

    def unreachable(failure: Failure) -> None:
        if result.called or cancelled:
            return
        result.errback(
            Failure(
                RelayUnreachableError(
                    f"could not reach the relay at {relay.host}:{relay.port}: {failure.getErrorMessage()}"
                )
            )
        )

    connecting.addCallbacks(connected, unreachable)
    return result
