"""
QUIC on a (punched) UDP socket as one more kind of pipe (an L{IPipe}).

One QUIC connection to one peer address carries one link: its first
bidirectional stream (stream 0) carries the link's bytes both ways.  qh3's
sans-I/O C{QuicConnection} is driven by the reactor, with no asyncio loop
and no thread: the owner of the UDP socket (an L{IDatagramSocket}, shared
with STUN and the punching probes) hands QUIC datagrams to
L{QuicPipe.datagramReceived} and sends what the pipe gives it.  Datagrams
received in one reactor turn are fed to qh3 together and what qh3 wants to
send is flushed once per turn (the study behind issue 10 measured batching
as twice as fast as a flush per datagram); one C{callLater} follows qh3's
timer.

Roles: L{connect} (the QUIC client) and L{accept} (the QUIC server, which
takes one connection, from the expected address only) both fire with the
pipe once the peer is authenticated both ways (L{pluresync.pipes.quiccert}
explains the certificate pinning): the server's certificate by TLS, the
client's by a proof on its control stream.

Flow control, end to end, and why the pipe grants its own credit: qh3 2.1
extends QUIC's stream and connection credit (MAX_STREAM_DATA, MAX_DATA) by
itself as soon as its core hands received bytes up as events, and offers no
call to hold it back (its core has no "consumed" or credit API, and the
events are drained into a Python queue inside C{receive_datagram}).  A
reader that stops would leave the peer's writer free to fill that queue
without bound (measured: 1.5 GB queued against a reader that did not read).
So each side also opens one unidirectional control stream, and the reader
grants the writer credit on it, in stream bytes it has handed up to its
receiver (L{docs/protocol.md}, "QUIC pipe").  What bounds memory:

 - receiving: at most C{window} bytes received and not yet delivered (the
   credit granted beyond what was delivered; a peer that sends more breaks
   the protocol and the pipe fails), plus qh3's own reassembly of
   out-of-order packets, bounded by QUIC's windows;
 - sending: qh3 is given at most C{send_buffer} bytes beyond what it has
   sent, and never beyond the peer's credit; the writer's producer is paused
   while the bytes written and not yet handed to qh3 plus qh3's queue exceed
   C{send_buffer}, and resumed below half of it (what a producer writes
   after it was paused is still kept, as a TCP transport keeps it).

Closing: L{QuicPipe.close} ends stream 0 (FIN) after what was written; the
peer, once it has delivered everything before that FIN, reports
C{ConnectionDone} and ends its side the same way; the first side to hold
both FINs closes the connection (NO_ERROR), since then both have
everything.  L{QuicPipe.abort} closes the connection at once with an error
code; QUIC's idle timeout (with keep-alive PINGs well inside it while the
pipe is quiet) ends a pipe whose peer vanished.  The receiver hears
C{pipeLost} exactly once: C{ConnectionDone} for an orderly end, a
L{DirectPipeLostError} otherwise.

The peer's address is fixed for the pipe's life: datagrams from any other
address are counted (C{strangers}) and dropped, so a NAT that rebinds the
peer's port ends the pipe (the session moves to another path).
"""

from __future__ import annotations

import ssl
import struct
from collections import deque
from dataclasses import dataclass
from enum import Enum, IntEnum, auto
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.errors import (
    CertificateMismatchError,
    ConfigurationError,
    DirectPathError,
    DirectPipeLostError,
    PluresyncError,
)
from pluresync.interfaces import IDatagramReceiver, IDatagramSocket, IPipe, IPipeReceiver
from pluresync.pipes.quiccert import QuicCertificate, check_fingerprint, fingerprint_of, short, verify_proof

try:
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection, QuicConnectionError
    from qh3.quic.events import (
        ConnectionTerminated,
        HandshakeCompleted,
        StopSendingReceived,
        StreamDataReceived,
        StreamReset,
    )
    from qh3.tls import load_pem_private_key, load_pem_x509_certificates
except ImportError as e:  # pragma: no cover - the extra is part of the test install
    raise ImportError("the direct path needs qh3: install pluresync[direct]") from e

log = Logger(namespace="pluresync.pipes.quic")

#: A peer's UDP address.
Address = tuple[str, int]

#: The one application protocol this pipe speaks (TLS ALPN).
ALPN = "pluresync/1"
#: The bidirectional stream that carries the link's bytes (the client's first).
DATA_STREAM = 0
#: Each side's unidirectional control stream (the first of its kind each may open).
CLIENT_CONTROL = 2
SERVER_CONTROL = 3
#: What the client writes first on the data stream: it opens the stream for
#: the server (which cannot send on a client stream before it exists) and
#: names this layout's version.  Not counted in credit.
PREAMBLE = b"\x01"

#: Control messages: a type byte, then a fixed or length-prefixed body.
CREDIT = 0x01  # u64: the data-stream offset up to which the peer may send
PROOF = 0x02  # (client) u16 length + certificate DER, u16 length + signature
_CREDIT = struct.Struct("!BQ")
_U16 = struct.Struct("!H")
#: Most unparsed control bytes held (a proof is about 450 bytes).
MAX_CONTROL = 4096


class CloseCode(IntEnum):
    """The pipe's QUIC application close codes (CONNECTION_CLOSE, type 0x1d)."""

    NO_ERROR = 0x0  # both sides ended stream 0: everything was delivered
    ABORTED = 0x1  # abort(), a cancelled attempt, a close that timed out
    PROTOCOL = 0x2  # the peer broke this pipe's rules (credit, streams, messages)
    CERTIFICATE = 0x3  # (server) the client's certificate or proof was refused


#: QUIC transport error codes for TLS alerts are 0x100 + the alert (RFC 9001 4.8).
_CRYPTO_ERROR = 0x100
_ALERT_BAD_CERTIFICATE = 42
_ALERT_NO_APPLICATION_PROTOCOL = 120
#: L{DirectPathError} reasons of this pipe's failed attempts.
NO_ANSWER = "no-answer"
HANDSHAKE = "quic-handshake"
#: Longest wait for qh3's closing period once a connection that carried
#: data was closed (it lasts three probe timeouts, so this is only a cap).
DRAIN_CAP = 3.0


@dataclass(frozen=True)
class QuicParams:
    """
    The QUIC pipe's knobs.

    @ivar idle_timeout: QUIC's idle timeout: a pipe that hears nothing from
        its peer this long is lost (keep-alive PINGs keep a quiet pipe and
        its NAT mapping alive).
    @ivar keepalive: seconds of silence before a PING (default: a third of
        C{idle_timeout}, well inside the NAT mapping timeouts seen in the
        field, 30 s and more).
    @ivar handshake_timeout: how long L{connect} or L{accept} may take.
    @ivar window: the credit granted to the peer's writer beyond what this
        side has delivered: the most received bytes held for a paused or
        slow reader.
    @ivar send_buffer: the most bytes queued for sending before the writer's
        producer is paused.
    @ivar close_timeout: how long an orderly close waits for the peer's end
        of stream 0.
    """

    idle_timeout: float = 15.0
    keepalive: float | None = None
    handshake_timeout: float = 10.0
    window: int = 4 * 1024 * 1024
    send_buffer: int = 1024 * 1024
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "handshake_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"QUIC pipe {name} must be positive")
        if self.keepalive is not None and not 0 < self.keepalive < self.idle_timeout:
            raise ConfigurationError("QUIC pipe keepalive must be positive and shorter than idle_timeout")
        if self.window < 64 * 1024 or self.send_buffer < 64 * 1024:
            raise ConfigurationError("QUIC pipe window and send_buffer must be at least 64 KiB")

    @property
    def keepalive_interval(self) -> float:
        return self.keepalive if self.keepalive is not None else self.idle_timeout / 3


def initial_destination_cid(data: bytes) -> bytes | None:
    """
    The destination connection id of a client's first datagram, or C{None}
    when it is not one: a QUIC v1 Initial (long header, type 0) in a
    datagram of at least 1200 bytes (RFC 9000 14.1, 17.2.2), whose id is 8
    to 20 bytes long (RFC 9000 7.2).
    """
    if len(data) < 1200 or data[0] & 0xF0 != 0xC0 or data[1:5] != b"\x00\x00\x00\x01":
        return None
    length = data[5]
    if not 8 <= length <= 20:
        return None
    return data[6 : 6 + length]


class _State(Enum):
    HANDSHAKE = auto()  # QUIC/TLS handshake, then the client's proof and the first credit
    OPEN = auto()  # ready fired: the pipe carries bytes
    DONE = auto()  # the QUIC connection is gone; the socket is detached


@implementer(IPipe, IDatagramReceiver)
class QuicPipe:
    """
    One QUIC connection to one peer address, seen as an L{IPipe}.

    Made by L{connect} or L{accept}; the owner of the socket feeds it
    through L{datagramReceived} (it attaches itself to the socket).

    @ivar ready: fires with this pipe once the peer is authenticated (or
        fails with a L{DirectPathError} once the attempt is over and the
        socket is free of it); cancelling it aborts the attempt.
    @ivar finished: fires once the QUIC connection is gone (closed, drained,
        detached from the socket, no timer left).
    @ivar strangers: datagrams dropped because they came from another address.
    @ivar malformed: datagrams qh3 could not take, and first datagrams
        (server) that were not a client's Initial.
    @ivar inbox_peak: most bytes received and not yet delivered, at any time.
    @ivar backlog_peak: most bytes written and not yet sent by qh3, at any time.
    """

    #: No carrier cap: a direct path lasts as long as both peers keep it.
    expires_at = None

    def __init__(
        self,
        reactor: Any,
        socket: IDatagramSocket,
        peer: Address,
        *,
        client: bool,
        certificate: QuicCertificate,
        peer_fingerprint: bytes,
        params: QuicParams,
    ) -> None:
        self._reactor = reactor
        self._socket = socket
        self.peer: Address = (peer[0], int(peer[1]))
        self.name = f"quic:{self.peer[0]}:{self.peer[1]}"
        self._client = client
        self._certificate = certificate
        self._peer_fingerprint = check_fingerprint(peer_fingerprint)
        self._params = params
        self._conn: QuicConnection | None = None
        self._state = _State.HANDSHAKE
        self.ready: Deferred[QuicPipe] = Deferred(self._cancel)
        self.finished: Deferred[None] = Deferred()
        self._handshake_done = False
        self._authenticated = False  # server: the client's proof; client: the server's first credit
        self._heard = False
        self._started_at = reactor.seconds()
        self._last_heard = self._started_at
        # receiving
        self._datagrams: list[bytes] = []
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._received = 0
        self._consumed = 0
        self._granted = 0
        self._preamble_seen = client  # only the server receives one
        self._peer_fin = False
        self._reading = True
        self._receiver: IPipeReceiver | None = None
        self._control = bytearray()
        # sending
        self._pending: deque[bytes | memoryview] = deque()
        self._pending_bytes = 0
        self._queued = 0  # qh3's send buffer on the data stream, as last seen
        self._sent = 0
        self._send_limit = 0
        self._data_open = client  # the server sends once the client opened the stream
        self._closing = False
        self._fin_sent = False
        self._producer: Any = None
        self._streaming = False
        self._producer_paused = False
        # the end
        self._reported = False
        self._lost: Failure | None = None
        self._closed_conn = False
        self._peer_closed = False
        self._failure: PluresyncError | None = None
        self._cancelled = False
        # reactor calls
        self._flush_call: Any = None
        self._timer: Any = None
        self._timer_at: float | None = None
        self._deadline: Any = None
        self._keepalive_call: Any = None
        self._close_call: Any = None
        self._drain_call: Any = None
        self._ping = 0
        # counters
        self.strangers = 0
        self.malformed = 0
        self.inbox_peak = 0
        self.backlog_peak = 0

    def __repr__(self) -> str:
        role = "client" if self._client else "server"
        return f"<QuicPipe {role} {self.peer[0]}:{self.peer[1]} {self._state.name.lower()}>"

    # -- starting --------------------------------------------------------------

    def start(self) -> Deferred[QuicPipe]:
        """Attach to the socket and (client) send the first flight; returns L{ready}."""
        self._socket.attach(self)
        self._deadline = self._reactor.callLater(self._params.handshake_timeout, self._handshakeTimedOut)
        if self._client:
            self._conn = QuicConnection(configuration=self._configuration())
            self._conn.connect(self.peer, now=self._reactor.seconds())
            self._schedule()
        return self.ready

    def _configuration(self) -> QuicConfiguration:
        window = self._params.window
        config = QuicConfiguration(
            is_client=self._client,
            alpn_protocols=[ALPN],
            idle_timeout=self._params.idle_timeout,
            # QUIC's own windows stay above the pipe's credit, so that only
            # the credit (which qh3 cannot withhold) decides when a writer waits.
            max_stream_data=2 * window,
            max_data=4 * window,
        )
        if self._client:
            # No CA can vouch for a peer: the fingerprint from the secure
            # channel is the whole trust (and TLS still proves the key).
            config.verify_mode = ssl.CERT_NONE
            config.verify_hostname = False
            config.assert_fingerprint = self._peer_fingerprint.hex()
        else:
            config.certificate = load_pem_x509_certificates(self._certificate.certificate_pem())[0]
            config.private_key = load_pem_private_key(self._certificate.private_key_pem())
        return config

    # -- IDatagramReceiver: the socket's owner feeds us ---------------------------

    def datagramReceived(self, data: bytes, address: Address) -> None:
        if (address[0], address[1]) != self.peer:
            self.strangers += 1
            return
        if self._state is _State.DONE:
            return
        if self._conn is None:
            # The server's connection begins with the client's Initial: its
            # destination connection id keys the Initial secrets.
            if self._client or self._closed_conn:
                return
            self._open(data)
            return
        self._datagrams.append(data)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _open(self, data: bytes) -> None:
        """
        (server) Start the connection on a client's first datagram, unless
        qh3 cannot make an Initial of it: junk that merely looks like one
        must not take the place of the real client's connection.
        """
        odcid = initial_destination_cid(data)
        if odcid is None:
            self.malformed += 1
            return
        conn = QuicConnection(configuration=self._configuration(), original_destination_connection_id=odcid)
        now = self._reactor.seconds()
        try:
            conn.receive_datagram(data, self.peer, now)
            # A client's real Initial is answered at once (the server's
            # Initial and Handshake); junk that only looks like one, whose
            # packet qh3 could not open, is answered with nothing.
            answer = conn.datagrams_to_send(now)
        except QuicConnectionError:
            answer = None
        if not answer:
            self.malformed += 1
            return
        self._conn = conn
        self._heard = True
        self._last_heard = now
        self._socket.sendDatagrams(answer)
        self._schedule()

    # -- the pump: once per reactor turn ----------------------------------------------

    def _schedule(self) -> None:
        if self._flush_call is None and (self._state is not _State.DONE or self._lateDelivery):
            self._flush_call = self._reactor.callLater(0, self._flush)

    @property
    def _lateDelivery(self) -> bool:
        """Whether the connection is gone but the peer's last bytes and FIN wait for a paused reader."""
        return self._peer_fin and not self._reported

    def _flush(self) -> None:
        self._flush_call = None
        conn = self._conn
        if self._state is _State.DONE:
            self._deliver()
            return
        if conn is None:
            return
        now = self._reactor.seconds()
        if self._datagrams:
            batch, self._datagrams = self._datagrams, []
            self._heard = True
            self._last_heard = now
            try:
                conn.receive_many_datagrams(batch, self.peer, now)
            except QuicConnectionError:  # qh3's core refused a datagram; its state says what follows
                self.malformed += 1
        self._events()
        if self._state is _State.DONE:
            return
        self._deliver()
        if self._state is _State.DONE:
            return
        self._grant()
        self._push()
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        conn = self._conn
        if self._state is _State.DONE:
            return
        datagrams = conn.datagrams_to_send(now)
        if datagrams:
            self._socket.sendDatagrams(datagrams)
        at = conn.get_timer()
        if at != self._timer_at or (at is not None and self._timer is None):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = at
            if at is not None:
                self._timer = self._reactor.callLater(max(0.0, at - now), self._onTimer)
        if self._data_open and self._state is _State.OPEN:
            queued = self._queued = conn.get_send_buffer_size(DATA_STREAM)
            backlog = self._pending_bytes + queued
            if backlog > self.backlog_peak:
                self.backlog_peak = backlog
            self._throttle(backlog)
            # qh3 sent part of its queue: hand it more next turn while the
            # peer's credit allows (acks and credit wake us otherwise).
            if self._pending and self._sent < self._send_limit and queued < self._params.send_buffer // 2:
                self._schedule()

    def _onTimer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._conn is not None and self._state is not _State.DONE:
            try:
                self._conn.handle_timer(self._reactor.seconds())
            except QuicConnectionError as e:  # qh3's core failed: nothing this connection can go on with
                self._fail(self._error(f"QUIC failed: {e}"), CloseCode.ABORTED)
            self._cancelCall("_flush_call")
            self._flush()

    # -- events from qh3 -------------------------------------------------------------------

    def _events(self) -> None:
        conn = self._conn
        while self._state is not _State.DONE:
            event = conn.next_event()
            if event is None:
                return
            if isinstance(event, StreamDataReceived):
                self._streamData(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, HandshakeCompleted):
                self._handshakeCompleted(event.alpn_protocol)
            elif isinstance(event, ConnectionTerminated):
                self._terminated(event)
            elif isinstance(event, (StreamReset, StopSendingReceived)):
                if event.stream_id in (DATA_STREAM, self._peerControl):
                    self._fail(self._error("the peer reset the direct path's stream"), CloseCode.ABORTED)

    @property
    def _peerControl(self) -> int:
        return SERVER_CONTROL if self._client else CLIENT_CONTROL

    def _handshakeCompleted(self, alpn: str | None) -> None:
        if alpn != ALPN:
            self._broke(f"the peer does not speak {ALPN} (ALPN {alpn!r})")
            return
        self._handshake_done = True
        if self._client:
            # qh3 checked the server's certificate against the pin; check the
            # certificate it kept too, so a change there cannot go unnoticed.
            certificate = self._conn.get_peercert()
            if certificate is None or fingerprint_of(certificate.public_bytes()) != self._peer_fingerprint:
                self._fail(self._theirCertificateRefused(), CloseCode.CERTIFICATE)
                return
            proof = self._certificate.prove(self._conn.original_destination_connection_id, self._peer_fingerprint)
            der = self._certificate.der
            self._granted = self._params.window
            self._send(
                CLIENT_CONTROL,
                b"".join((bytes([PROOF]), _U16.pack(len(der)), der, _U16.pack(len(proof)), proof))
                + _CREDIT.pack(CREDIT, self._granted),
            )
            self._send(DATA_STREAM, PREAMBLE)
        self._maybeOpen()

    def _maybeOpen(self) -> None:
        if self._state is not _State.HANDSHAKE or not (self._handshake_done and self._authenticated):
            return
        if not self._client:
            # Accepting the proof is answered with the first credit, which
            # is what tells the client it was accepted.
            self._granted = self._params.window
            self._send(SERVER_CONTROL, _CREDIT.pack(CREDIT, self._granted))
        self._state = _State.OPEN
        self._cancelCall("_deadline")
        self._keepalive_call = self._reactor.callLater(self._params.keepalive_interval, self._keepalive)
        elapsed = self._reactor.seconds() - self._started_at
        log.info(
            "direct QUIC pipe {role} {peer} open ({ms:.0f} ms)",
            role="to" if self._client else "from",
            peer=self._where,
            ms=elapsed * 1000,
        )
        self.ready.callback(self)

    def _streamData(self, stream_id: int, data: bytes, fin: bool) -> None:
        if self._closed_conn:
            return
        if stream_id == DATA_STREAM:
            self._data_open = True
            if not self._preamble_seen:
                if not data:
                    if fin:
                        self._broke("the peer ended the stream before opening it")
                    return
                if data[:1] != PREAMBLE:
                    self._broke("the peer opened the stream with an unknown version")
                    return
                self._preamble_seen = True
                data = data[1:]
            if data:
                self._received += len(data)
                if self._received > self._granted:
                    self._broke("the peer sent more than this side's credit")
                    return
                self._inbox.append(data)
                self._inbox_bytes += len(data)
                if self._inbox_bytes > self.inbox_peak:
                    self.inbox_peak = self._inbox_bytes
            if fin:
                self._peer_fin = True
                self._cancelCall("_close_call")
                if self._fin_sent:
                    # Both ends of stream 0 are done and this side holds
                    # everything (delivered or not yet: a paused reader gets
                    # the rest later); the peer waits for this close.
                    self._closeConnection(CloseCode.NO_ERROR, "closed")
        elif stream_id == self._peerControl:
            self._controlData(data)
        else:
            self._broke(f"the peer used stream {stream_id}, which this pipe has not")

    def _controlData(self, data: bytes) -> None:
        buffer = self._control
        buffer += data
        if len(buffer) > MAX_CONTROL:
            self._broke("the peer sent an oversized control message")
            return
        while buffer and self._state is not _State.DONE:
            kind = buffer[0]
            if kind == CREDIT:
                if len(buffer) < _CREDIT.size:
                    return
                _, limit = _CREDIT.unpack_from(buffer)
                del buffer[: _CREDIT.size]
                self._credit(limit)
            elif kind == PROOF and not self._client and not self._authenticated:
                parsed = self._parseProof(buffer)
                if parsed is None:
                    return
                der, signature, size = parsed
                del buffer[:size]
                self._proof(der, signature)
            else:
                self._broke(f"the peer sent an unexpected control message ({kind})")

    @staticmethod
    def _parseProof(buffer: bytearray) -> tuple[bytes, bytes, int] | None:
        """A complete proof message at the start of C{buffer}: (DER, signature, its size), or C{None}."""
        offset = 1
        fields = []
        for _ in range(2):
            if len(buffer) < offset + _U16.size:
                return None
            (length,) = _U16.unpack_from(buffer, offset)
            offset += _U16.size
            if len(buffer) < offset + length:
                return None
            fields.append(bytes(buffer[offset : offset + length]))
            offset += length
        return fields[0], fields[1], offset

    def _proof(self, der: bytes, signature: bytes) -> None:
        try:
            verify_proof(
                der,
                signature,
                expected=self._peer_fingerprint,
                connection_id=self._conn.original_destination_connection_id,
                server_fingerprint=self._certificate.fingerprint,
            )
        except CertificateMismatchError as e:
            self._fail(e, CloseCode.CERTIFICATE)
            return
        self._authenticated = True
        self._maybeOpen()

    def _credit(self, limit: int) -> None:
        if not self._authenticated:
            if not self._client:
                self._broke("the peer sent credit before proving its certificate")
                return
            self._authenticated = True  # the server accepted our proof
            self._maybeOpen()
        if limit > self._send_limit:
            self._send_limit = limit

    # -- receiving: delivery and credit ------------------------------------------------------

    def _deliver(self) -> None:
        receiver = self._receiver
        if receiver is None or self._reported or self._state is _State.HANDSHAKE:
            return
        inbox = self._inbox
        while inbox and self._reading and not self._reported:
            data = inbox.popleft()
            self._inbox_bytes -= len(data)
            self._consumed += len(data)
            receiver.pipeDataReceived(data)
        if self._peer_fin and not inbox and not self._reported:
            self._peerEnded()

    def _grant(self) -> None:
        if self._state is not _State.OPEN or self._peer_fin or self._reported or self._closed_conn or self._peer_closed:
            return
        window = self._params.window
        if self._granted - self._consumed <= window // 2:
            self._granted = self._consumed + window
            self._send(self._ownControl, _CREDIT.pack(CREDIT, self._granted))

    @property
    def _ownControl(self) -> int:
        return CLIENT_CONTROL if self._client else SERVER_CONTROL

    def _peerEnded(self) -> None:
        """The peer's FIN, after everything before it was delivered: an orderly end."""
        self._report(Failure(ConnectionDone("the direct path was closed")))
        self._closing = True  # answer with our own FIN, after what was written
        self._schedule()

    # -- sending -----------------------------------------------------------------------------------

    def _send(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> bool:
        """
        Queue bytes on a stream; C{False} once qh3 refuses because the peer
        closed the connection (its code and reason arrive with qh3's
        ConnectionTerminated, after the closing period).
        """
        try:
            self._conn.send_stream_data(stream_id, data, end_stream)
        except QuicConnectionError:
            self._peer_closed = True
            return False
        return True

    def _push(self) -> None:
        if self._state is not _State.OPEN or not self._data_open or self._closed_conn or self._peer_closed:
            return
        conn = self._conn
        pending = self._pending
        if pending:
            room = min(self._send_limit - self._sent, self._params.send_buffer - conn.get_send_buffer_size(DATA_STREAM))
            while pending and room > 0:
                item = pending[0]
                size = len(item)
                if size <= room:
                    if not self._send(DATA_STREAM, item):
                        return
                    pending.popleft()
                else:
                    view = item if isinstance(item, memoryview) else memoryview(item)
                    if not self._send(DATA_STREAM, view[:room]):
                        return
                    pending[0] = view[room:]
                    size = room
                self._sent += size
                self._pending_bytes -= size
                room -= size
        if self._closing and not pending and not self._fin_sent:
            if not self._send(DATA_STREAM, b"", end_stream=True):
                return
            self._fin_sent = True
            # Wait for the peer's FIN (it closes the connection once it has
            # both), or, when its FIN came first, for its close.
            if self._close_call is None:
                self._close_call = self._reactor.callLater(self._params.close_timeout, self._closeTimedOut)

    def _throttle(self, backlog: int) -> None:
        producer = self._producer
        if producer is None:
            return
        high = self._params.send_buffer
        if self._streaming:
            if backlog > high and not self._producer_paused:
                self._producer_paused = True
                producer.pauseProducing()
            elif backlog <= high // 2 and self._producer_paused:
                self._producer_paused = False
                producer.resumeProducing()
        elif backlog <= high // 2:
            producer.resumeProducing()

    # -- IPipe --------------------------------------------------------------------------------------

    def attach(self, receiver: IPipeReceiver) -> QuicPipe:
        """
        Deliver to C{receiver} from now on (what arrived before waits for it,
        within the credit); returns this pipe, as C{secure_link}'s
        C{bind_pipe} wants.
        """
        self._receiver = receiver
        if self._lost is not None:
            self._reactor.callLater(0, self._deliverLoss)
        else:
            self._schedule()
        return self

    def _deliverLoss(self) -> None:
        lost, self._lost = self._lost, None
        if lost is not None and self._receiver is not None:
            self._receiver.pipeLost(lost)

    def write(self, data: bytes) -> None:
        if self._closing or self._reported or self._state is not _State.OPEN or not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if (
            self._streaming
            and not self._producer_paused
            and self._producer is not None
            and self._pending_bytes + self._queued > self._params.send_buffer
        ):
            self._producer_paused = True
            self._producer.pauseProducing()
        self._schedule()

    def pauseReading(self) -> None:
        self._reading = False

    def resumeReading(self) -> None:
        if not self._reading:
            self._reading = True
            self._schedule()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"Cannot register producer {producer!r}, because {self._producer!r} is registered")
        self._producer = producer
        self._streaming = bool(streaming)
        self._producer_paused = False
        if self._reported:
            producer.stopProducing()
            self._producer = None
        elif not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    def close(self) -> None:
        """
        End stream 0 after what was written; the peer's answering FIN ends
        the pipe.  A peer that has not answered within C{close_timeout}
        (counted from now: what is still queued must get through by then,
        or the peer has stopped granting credit) is aborted.
        """
        if self._closing or self._reported or self._state is not _State.OPEN:
            return
        self._closing = True
        self._close_call = self._reactor.callLater(self._params.close_timeout, self._closeTimedOut)
        self._schedule()

    def abort(self) -> None:
        """Close the connection at once (error code ABORTED); the receiver hears it as a loss."""
        if self._reported or self._state is _State.DONE:
            return
        self._fail(DirectPipeLostError("this side aborted the direct path"), CloseCode.ABORTED)

    def stop(self) -> None:
        """
        Abort, and be done at once, without the draining period: the owner
        is closing the socket, so nothing more could be sent or heard.
        """
        if self._state is _State.DONE:
            return
        self.abort()
        self._finish()

    # -- the end -----------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"

    def _error(self, text: str) -> PluresyncError:
        """A failed attempt before the pipe opened, a lost pipe after."""
        if self._state is _State.OPEN:
            return DirectPipeLostError(text)
        return DirectPathError(text, HANDSHAKE)

    def _broke(self, text: str) -> None:
        """The peer broke this pipe's rules."""
        self._fail(self._error(text), CloseCode.PROTOCOL)

    def _fail(self, error: PluresyncError, code: CloseCode) -> None:
        """Something went wrong here: tell our side, and the peer (close with C{code})."""
        if self._closed_conn:
            return
        reason = str(error) if code in (CloseCode.PROTOCOL, CloseCode.CERTIFICATE) else code.name.lower()
        self._end(error)
        self._closeConnection(code, reason[:200])

    def _end(self, error: PluresyncError) -> None:
        """Report C{error}: to C{ready}'s caller before it fired, to the receiver after."""
        if self._state is _State.OPEN or self.ready.called:
            self._report(Failure(error))
        elif self._failure is None:
            self._failure = error  # ready fails once the connection is gone

    def _report(self, reason: Failure) -> None:
        """
        The receiver hears the end, once.  After an error, what was not
        delivered or not sent is dropped; after the peer's orderly end, what
        was written still goes out before this side's FIN.
        """
        if self._reported:
            return
        self._reported = True
        self._inbox.clear()
        self._inbox_bytes = 0
        if not reason.check(ConnectionDone):
            self._pending.clear()
            self._pending_bytes = 0
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        if reason.check(ConnectionDone):
            log.info("direct QUIC pipe with {peer} closed", peer=self._where)
        else:
            log.info("direct QUIC pipe with {peer} lost: {why}", peer=self._where, why=reason.value)
        if self._receiver is not None:
            self._receiver.pipeLost(reason)
        else:
            self._lost = reason

    def _closeConnection(self, code: CloseCode, reason: str) -> None:
        """Send CONNECTION_CLOSE (once) and let qh3's closing period run, capped."""
        if self._closed_conn:
            return
        self._closed_conn = True
        conn = self._conn
        if conn is None or self._state is _State.DONE:
            self._finish()
            return
        conn.close(error_code=int(code), reason_phrase=reason)
        self._socket.sendDatagrams(conn.datagrams_to_send(self._reactor.seconds()))
        if not self._handshake_done:
            # Nothing was carried, and the peer may never answer: no need to
            # linger for retransmissions of the close.
            self._finish()
        else:
            self._drain_call = self._reactor.callLater(DRAIN_CAP, self._finish)
            self._schedule()

    def _terminated(self, event: ConnectionTerminated) -> None:
        """qh3's connection is over (closed by either side, timed out, refused)."""
        if not self._closed_conn:
            self._closed_conn = True
            orderly = event.frame_type is None and event.error_code == CloseCode.NO_ERROR and self._peer_fin
            if not orderly:
                if self._state is _State.OPEN and not self._reported:
                    self._deliver()
                self._end(self._describe(event))
        self._finish()

    def _describe(self, event: ConnectionTerminated) -> PluresyncError:
        """The error a closed or failed connection means, as a person can act on it."""
        code, reason = event.error_code, (event.reason_phrase or "")[:200]
        peer = self._where
        if event.frame_type is None:  # the peer's application close
            if code == CloseCode.CERTIFICATE:
                return CertificateMismatchError(f"the peer at {peer} refused this side's QUIC certificate: {reason}")
            if code == CloseCode.NO_ERROR:
                return self._error(f"the peer at {peer} closed the direct path before ending its stream")
            if code == CloseCode.PROTOCOL:
                return self._error(f"the peer at {peer} found this side broke the QUIC pipe's rules: {reason}")
            return self._error(f"the peer at {peer} aborted the direct path")
        if "idle" in reason.lower():
            if not self._heard:
                return DirectPathError(f"no answer from the peer at {peer} (QUIC idle timeout)", NO_ANSWER)
            return DirectPipeLostError(
                f"nothing heard from the peer at {peer} for {self._params.idle_timeout:g} s (QUIC idle timeout): "
                "the direct path is gone"
            )
        if code == _CRYPTO_ERROR + _ALERT_BAD_CERTIFICATE:
            if self._client:
                return self._theirCertificateRefused()
            return CertificateMismatchError(f"the peer at {peer} refused this side's QUIC certificate")
        if code == _CRYPTO_ERROR + _ALERT_NO_APPLICATION_PROTOCOL:
            return DirectPathError(f"the peer at {peer} does not speak {ALPN} (no common ALPN)", HANDSHAKE)
        if _CRYPTO_ERROR <= code < _CRYPTO_ERROR + 0x100:
            alert = code - _CRYPTO_ERROR
            return DirectPathError(f"the QUIC handshake with {peer} failed (TLS alert {alert}: {reason})", HANDSHAKE)
        return self._error(f"the QUIC connection with {peer} failed (error {code:#x}: {reason})")

    def _theirCertificateRefused(self) -> CertificateMismatchError:
        return CertificateMismatchError(
            f"the QUIC certificate of the peer at {self.peer[0]}:{self.peer[1]} is not the one exchanged in the "
            f"secure channel (expected sha256 {short(self._peer_fingerprint)}...): someone else answered there"
        )

    def _finish(self) -> None:
        """
        The connection is gone: no timer, no socket, and the attempt's
        outcome.  A paused reader may still get the peer's last bytes (all
        of them arrived, FIN included) when it resumes.
        """
        if self._state is _State.DONE:
            return
        was_open = self._state is _State.OPEN
        self._state = _State.DONE
        self._closed_conn = True
        for name in ("_flush_call", "_timer", "_deadline", "_keepalive_call", "_close_call", "_drain_call"):
            self._cancelCall(name)
        self._datagrams = []
        self._socket.detach(self)
        if was_open and not self._reported and not self._peer_fin:
            self._report(Failure(DirectPipeLostError("the direct path ended")))
        if not self.ready.called and not self._cancelled:
            self.ready.errback(Failure(self._failure or DirectPathError("the direct path attempt ended", HANDSHAKE)))
        self.finished.callback(None)

    def _cancelCall(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None:
            if call.active():
                call.cancel()
            setattr(self, name, None)

    def _cancel(self, _: Deferred) -> None:
        # The Deferred machinery fails ready with CancelledError; the
        # connection closes behind it.
        self._cancelled = True
        self._closeConnection(CloseCode.ABORTED, "cancelled")
        self._finish()

    def _handshakeTimedOut(self) -> None:
        self._deadline = None
        peer = self._where
        if not self._heard:
            error = DirectPathError(
                f"no answer from the peer at {peer} within {self._params.handshake_timeout:g} s "
                "(its NAT may drop our packets, or it is not listening)",
                NO_ANSWER,
            )
        else:
            error = DirectPathError(
                f"the QUIC handshake with {peer} did not complete within {self._params.handshake_timeout:g} s",
                HANDSHAKE,
            )
        self._fail(error, CloseCode.ABORTED)

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self._state is not _State.OPEN or self._closed_conn or self._peer_closed:
            return
        now = self._reactor.seconds()
        interval = self._params.keepalive_interval
        if now - self._last_heard >= interval:
            # A PING is ack-eliciting: the peer's answer keeps both idle
            # timers and every NAT mapping on the way alive.
            self._ping += 1
            try:
                self._conn.send_ping(self._ping)
            except QuicConnectionError:
                self._peer_closed = True
                return
            self._schedule()
            delay = interval
        else:
            delay = self._last_heard + interval - now
        self._keepalive_call = self._reactor.callLater(delay, self._keepalive)

    def _closeTimedOut(self) -> None:
        self._close_call = None
        if self._reported:
            self._closeConnection(CloseCode.NO_ERROR, "closed")
        else:
            self._fail(
                DirectPipeLostError(
                    f"the peer did not finish closing the direct path within {self._params.close_timeout:g} s"
                ),
                CloseCode.ABORTED,
            )


def connect(
    reactor: Any,
    socket: IDatagramSocket,
    peer: Address,
    *,
    certificate: QuicCertificate,
    peer_fingerprint: bytes,
    params: QuicParams | None = None,
) -> Deferred[QuicPipe]:
    """
    Open a QUIC pipe to C{peer} as the QUIC client, from C{socket}.

    @param socket: the UDP socket (usually the punched one); the pipe
        attaches itself to it for QUIC datagrams and sends through it.
    @param peer: the peer's address as this socket reaches it (the punched one).
    @param certificate: this side's ephemeral certificate, whose
        C{fingerprint} the peer was given through the secure channel.
    @param peer_fingerprint: the peer's certificate fingerprint (32 bytes),
        received through the secure channel.
    @return: a Deferred firing with the L{QuicPipe} once the peer is
        authenticated (its certificate by TLS, ours by its acceptance of our
        proof), or failing with a L{DirectPathError} (a
        L{CertificateMismatchError} for a wrong certificate on either side)
        once the attempt is over; cancelling it abandons the attempt.
    """
    return _start(reactor, socket, peer, True, certificate, peer_fingerprint, params)


def accept(
    reactor: Any,
    socket: IDatagramSocket,
    peer: Address,
    *,
    certificate: QuicCertificate,
    peer_fingerprint: bytes,
    params: QuicParams | None = None,
) -> Deferred[QuicPipe]:
    """
    Accept one QUIC pipe from C{peer} as the QUIC server, on C{socket}:
    the first client Initial from that address starts it, and datagrams
    from any other address are dropped (and counted in the pipe's
    C{strangers}).  Parameters and result as for L{connect}.
    """
    return _start(reactor, socket, peer, False, certificate, peer_fingerprint, params)


def _start(
    reactor: Any,
    socket: IDatagramSocket,
    peer: Address,
    client: bool,
    certificate: QuicCertificate,
    peer_fingerprint: bytes,
    params: QuicParams | None,
) -> Deferred[QuicPipe]:
    try:
        pipe = QuicPipe(
            reactor,
            socket,
            peer,
            client=client,
            certificate=certificate,
            peer_fingerprint=peer_fingerprint,
            params=params or QuicParams(),
        )
    except ConfigurationError as e:
        failed: Deferred[QuicPipe] = Deferred()
        failed.errback(Failure(e))
        return failed
    return pipe.start()
