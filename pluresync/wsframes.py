"""
WebSocket data frames on the hot path, for both ends of a relay hop.

Autobahn runs the opening handshake, the control messages, pings and the
closing handshake; but its per-frame Python work (and debug-log formatting)
costs more than the encryption of a 64 KiB record. Once a socket is paired
only binary frames carry the stream, so the relay and its clients switch to
this small codec for them and hand every control frame (ping, pong, close)
back to Autobahn, whose state stays valid because it only ever sees whole
frames between data frames.

Only RFC 6455 framing without extensions is handled (compression is never
negotiated on pluresync sockets).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from autobahn.websocket.protocol import WebSocketProtocol as _WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker

try:
    # One pass in C, straight from a memoryview: 1.2 µs per 64 KiB and 0.07 µs
    # per 64 B on this machine, against 5.2 and 2.4 µs for Autobahn's NVX
    # masker (two objects, a zero-filled buffer, a copy in and a copy out).
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    _apply_mask = None


def apply_mask(data: bytes | memoryview, mask: bytes) -> bytes:
    """XOR C{data} with the 4-byte C{mask} repeated (RFC 6455 section 5.3): masking and unmasking alike."""
    return create_xor_masker(mask, len(data)).process(bytes(data))


if _apply_mask is not None:
    apply_mask = _apply_mask  # noqa: F811


class AutobahnInternal(NamedTuple):
    """
    One piece of Autobahn's private state or hook that pluresync relies on.

    Autobahn documents none of these; a release may rename or repurpose any
    of them without notice, and the fast path would then misparse a stream
    rather than fail. So each one is listed here, once, with what pluresync
    assumes of it; C{tests/test_autobahn_contract.py} checks every entry
    against the installed Autobahn (and docs/relay.md lists them).
    """

    #: the attribute or method name
    name: str
    #: where it lives: C{"protocol"} (server and client protocols; attributes
    #: are set up by C{_connectionMade}), C{"server protocol"},
    #: C{"client protocol"} or C{"factory"}
    owner: str
    #: the parameters after C{self} of a method, or C{None} for an attribute
    parameters: tuple[str, ...] | None
    #: the pluresync modules that use it
    users: tuple[str, ...]
    #: what pluresync assumes of it
    assumption: str


_FAST = ("pluresync/wsframes.py",)
_RELAY = ("pluresync/relay/server/websocket.py",)
_CLIENT = ("pluresync/pipes/websocket.py",)

#: Every private or undocumented Autobahn name (not in
#: C{autobahn.websocket.interfaces}) that pluresync reads, writes, calls or
#: overrides.
AUTOBAHN_INTERNALS: tuple[AutobahnInternal, ...] = (
    AutobahnInternal(
        "current_frame",
        "protocol",
        None,
        _FAST,
        "None between frames; not None while Autobahn holds a frame header whose payload is incomplete",
    ),
    AutobahnInternal(
        "inside_message", "protocol", None, _FAST, "True between the first and the final frame of a fragmented message"
    ),
    AutobahnInternal(
        "data", "protocol", None, _FAST, "the bytes received and not yet parsed (the start of the next frame)"
    ),
    AutobahnInternal(
        "_dataReceived", "protocol", ("data",), _FAST, "appends to data and parses: bytes handed back are framed there"
    ),
    AutobahnInternal(
        "autoPingTimeoutCall",
        "protocol",
        None,
        _FAST + _RELAY,
        "the pending ping timeout (None when no ping is unanswered); cleared to defer a timeout",
    ),
    AutobahnInternal(
        "_cancelAutoPingTimeoutCall",
        "protocol",
        (),
        _FAST,
        "incoming traffic counts as a pong: cancels the timeout and schedules the next ping",
    ),
    AutobahnInternal(
        "autoPingPending",
        "protocol",
        None,
        _FAST + _RELAY,
        "the payload of the unanswered ping (None: no ping pending, and a pong is then ignored by Autobahn)",
    ),
    AutobahnInternal(
        "autoPingPendingCall",
        "protocol",
        None,
        _RELAY,
        "the timer of the next automatic ping (a Timer from the factory)",
    ),
    AutobahnInternal(
        "_sendAutoPing",
        "protocol",
        (),
        _RELAY,
        "sends one automatic ping and schedules its timeout (onAutoPingTimeout)",
    ),
    AutobahnInternal(
        "_max_message_size_exceeded",
        "protocol",
        ("msg_size", "max_msg_size", "reason"),
        _RELAY,
        "called (overridden by the relay) for a frame or message over maxMessagePayloadSize",
    ),
    AutobahnInternal(
        "closeHandshakeTimeoutCall",
        "protocol",
        None,
        _RELAY + _CLIENT,
        "the close-handshake timer, still running after connectionLost; cancelled in onClose",
    ),
    AutobahnInternal(
        "onAutoPingTimeout",
        "protocol",
        (),
        _RELAY,
        "called when a ping went unanswered (overridden by the relay to spare a socket it stopped reading)",
    ),
    AutobahnInternal(
        "sendCloseFrame",
        "protocol",
        ("code", "reasonUtf8", "isReply"),
        _RELAY,
        "starts the closing handshake with a code and a UTF-8 reason of at most 123 bytes",
    ),
    AutobahnInternal(
        "dropConnection", "protocol", ("abort",), _RELAY + _CLIENT, "closes the TCP connection (abort=True: at once)"
    ),
    AutobahnInternal(
        "failHandshake",
        "server protocol",
        ("reason", "code", "responseHeaders"),
        _RELAY,
        "every refused upgrade passes through it (overridden by the relay to count refusals)",
    ),
    AutobahnInternal(
        "sendHttpErrorResponse",
        "server protocol",
        ("code", "reason", "responseHeaders"),
        _RELAY,
        "writes the HTTP answer of a refused upgrade (overridden by the relay)",
    ),
    AutobahnInternal(
        "closedByMe", "protocol", None, _RELAY, "True once this side started the closing handshake (not as a reply)"
    ),
    AutobahnInternal(
        "failedByMe",
        "protocol",
        None,
        _RELAY,
        "once set (by the relay's oversize hook), the rest of the message is dropped, never delivered",
    ),
    AutobahnInternal(
        "wasNotCleanReason", "protocol", None, _CLIENT, "a text of why the connection did not close cleanly, or None"
    ),
    AutobahnInternal(
        "http_status_line",
        "client protocol",
        None,
        _CLIENT,
        "the status line of the upgrade response (e.g. 'HTTP/1.1 401 Unauthorized'), once received",
    ),
    AutobahnInternal(
        "http_headers",
        "client protocol",
        None,
        _CLIENT,
        "the upgrade response's headers (a dict, lower-case names), once received: Retry-After of a 429/503",
    ),
    AutobahnInternal(
        "onCloseFrame",
        "protocol",
        ("code", "reasonRaw"),
        _FAST + _RELAY,
        "called with each close frame's code and raw reason; validates the code against CLOSE_STATUS_CODES_ALLOWED, "
        "then answers (echoing the code with echoCloseCodeReason) or, on a server, drops TCP",
    ),
    AutobahnInternal(
        "CLOSE_STATUS_CODES_ALLOWED",
        "protocol",
        None,
        _FAST,
        "the close codes 1000-2999 onCloseFrame accepts, read from WebSocketProtocol itself (1014 is missing)",
    ),
    AutobahnInternal(
        "CONFIG_ATTRS",
        "protocol",
        None,
        _RELAY,
        "the factory options _connectionMade copies into a protocol that lacks them (hasattr); "
        "a relay socket reads them from its factory instead (__getattr__)",
    ),
    AutobahnInternal(
        "send_queue",
        "protocol",
        None,
        _RELAY,
        "the queue of chopped or synchronous writes, appended to only for sendData(sync=True) or a chopsize; "
        "one shared empty queue on relay sockets",
    ),
    AutobahnInternal(
        "_batched_timer",
        "factory",
        None,
        _RELAY + _CLIENT,
        "every Autobahn timer is scheduled by its call_later(delay, func, *args); replaced by pluresync.reactortimers",
    ),
)

#: The close codes below 3000 a peer may send (RFC 6455 7.4.1 and IANA's
#: registry): 1004-1006 and 1015 are reserved and never sent.
REGISTERED_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
_OP_PONG = 0xA

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


#: L{FrameError.code} of a breach of RFC 6455 itself (not of the relay
#: protocol): the connection is dropped without a close frame, as Autobahn
#: does before pairing (docs/protocol.md, "WebSocket protocol violations").
PROTOCOL = "protocol"


class FrameError(Exception):
    """
    The peer broke the framing rules.

    @ivar code: L{PROTOCOL} for a breach of RFC 6455, else the relay error
        code that fits (C{bad-request}: a text message after pairing;
        C{too-large}).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def payload_length(buf, pos: int, n: int) -> tuple[int, int] | None:
    """
    A frame header's payload length and where its header's length field
    ends (the mask, if any, follows), from the frame starting at C{pos} of
    C{buf} (C{n} bytes are there); C{None} while the length field is not
    all there.  Both frame readers' path, once per frame.

    @raise FrameError: a length not in its shortest form (RFC 6455 5.2).
    """
    length = buf[pos + 1] & 0x7F
    h = pos + 2
    if length == 126:
        if n - h < 2:
            return None
        length = (buf[h] << 8) | buf[h + 1]
        if length < 126:
            raise FrameError(PROTOCOL, "a WebSocket frame length not in its shortest form")
        return length, h + 2
    if length == 127:
        if n - h < 8:
            return None
        length = _U64.unpack_from(buf, h)[0]
        if length < 0x10000 or length >> 63:
            raise FrameError(PROTOCOL, "a WebSocket frame length not in its shortest form")
        return length, h + 8
    return length, h


def frame_header(length: int, opcode: int = OP_BINARY, fin: bool = True, mask: bytes | None = None) -> bytes:
    """The header of one frame (with its masking key when C{mask} is given)."""
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask is not None else 0
    if length < 126:
        header = bytes((first, bit | length))
    elif length < 0x10000:
        header = bytes((first, bit | 126)) + _U16.pack(length)
    else:
        header = bytes((first, bit | 127)) + _U64.pack(length)
    return header + mask if mask is not None else header


def client_frame(payload: bytes) -> tuple[bytes, bytes]:
    """One masked binary frame, as a client must send it: (header, masked payload)."""
    mask = os.urandom(4)
    return frame_header(len(payload), mask=mask), apply_mask(payload, mask)


class FrameReader:
    """
    Splits a WebSocket byte stream into frames, without copying more than once.

    @param masked: whether frames must be masked (a server reading a client)
        or must not be (a client reading a server).
    @param max_message: the largest message, summed over its fragments; a
        larger one is refused before its payload is buffered, so memory
        stays bounded by one frame.
    @param on_data: called with each data frame's (unmasked) payload, its
        opcode (binary or continuation) and its FIN bit.
    @param on_control: called with the raw bytes of each ping or pong frame.
    """

    __slots__ = (
        "_parts",
        "_have",
        "_need",
        "_masked",
        "_max_message",
        "_message_size",
        "_in_message",
        "_on_data",
        "_on_control",
    )

    def __init__(
        self,
        *,
        masked: bool,
        max_message: int,
        on_data: Callable[[bytes, int, bool], None],
        on_control: Callable[[bytes], None],
    ) -> None:
        self._parts: list[bytes] = []  # a frame that is still arriving
        self._have = 0
        self._need = 0  # bytes that frame needs in all, when its header is known
        self._masked = masked
        self._max_message = max_message
        self._message_size = 0
        self._in_message = False
        self._on_data = on_data
        self._on_control = on_control

    def feed(self, data: bytes) -> bytes | None:
        """
        Take bytes from the network and deliver every complete frame.

        @return: C{None}, or, when a close frame arrives, that frame and
            everything after it, for Autobahn to run the closing handshake.
        @raise FrameError: the stream breaks the rules; stop reading it.
        """
        # Whole frames are sliced straight out of the chunk; a frame split
        # across reads is joined once, when its last part has arrived.
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return None
            buf = b"".join(self._parts)
            self._parts = []
        else:
            buf = data
        n = len(buf)
        pos = 0
        need = 0
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            header = payload_length(buf, pos, n)
            if header is None:
                break
            length, h = header
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise FrameError(PROTOCOL, "reserved WebSocket frame bits are set")
            if opcode >= 0x8:
                if length > 125 or not b0 & 0x80:
                    raise FrameError(PROTOCOL, "malformed WebSocket control frame")
            elif self._message_size + length > self._max_message:
                raise FrameError("too-large", f"messages are at most {self._max_message} bytes")
            if b1 & 0x80:
                if not self._masked:
                    raise FrameError(PROTOCOL, "masked frame from the server")
                if n - h < 4:
                    break
                mask = buf[h : h + 4]
                h += 4
            elif self._masked:
                raise FrameError(PROTOCOL, "unmasked frame from a client")
            else:
                mask = None
            end = h + length
            if end > n:
                need = end - pos
                break
            if opcode >= 0x8:
                if opcode == OP_CLOSE:
                    return buf[pos:]
                self._on_control(buf[pos:end])
                pos = end
                continue
            if opcode == OP_TEXT:
                raise FrameError("bad-request", "text message after pairing")
            if (opcode == OP_CONTINUATION) != self._in_message:
                raise FrameError(PROTOCOL, "WebSocket fragments out of order")
            if opcode > OP_BINARY:
                raise FrameError(PROTOCOL, f"unknown WebSocket opcode {opcode}")
            if mask is not None:
                payload = apply_mask(memoryview(buf)[h:end], mask)
            else:
                payload = buf[h:end]
            fin = bool(b0 & 0x80)
            if fin:
                self._message_size = 0
                self._in_message = False
            else:
                self._message_size += length
                self._in_message = True
            pos = end
            self._on_data(payload, opcode, fin)
        if pos < n:
            rest = buf[pos:]
            self._parts = [rest]
            self._have = len(rest)
            self._need = need
        return None


class FrameForwarder:
    """
    The relay's data path: a client's masked frames, forwarded to the partner
    as unmasked server frames.

    Each data frame's header is replaced by the header a server writes (the
    same length, opcode and FIN, no mask) and its payload is unmasked piece
    by piece as it arrives, straight from the received bytes (memoryviews):
    one pass over each byte and nothing joined here.  Whole frames only are
    forwarded, so that a close frame the relay writes to the partner (the
    pair ended) always falls between frames: the pieces of a frame still
    arriving are held (at most one frame, bounded by C{max_message}) and go
    out with the read that completes it.  What one read completes goes out
    in one C{writeSequence}.

    The rules are L{FrameReader}'s (masked, as from a client), checked from
    each header before its payload is taken in.

    @param max_message: the largest message, summed over its fragments.
    @param on_frames: called once per read that completed data frames, with
        the list of byte strings to write to the partner and the number of
        payload bytes among them; also before a L{FrameError} is raised or a
        close frame handed back, with the frames that came before.
    @param on_control: called with the raw bytes of each ping or pong frame.
    """

    __slots__ = (
        "_head",
        "_pending",
        "_left",
        "_length",
        "_mask",
        "_max_message",
        "_message_size",
        "_in_message",
        "_on_frames",
        "_on_control",
    )

    def __init__(
        self,
        *,
        max_message: int,
        on_frames: Callable[[list, int], None],
        on_control: Callable[[bytes], None],
    ) -> None:
        self._head = b""  # a header or control frame split across reads
        self._pending: list = []  # the frame still arriving: its new header, its unmasked pieces
        self._left = 0  # payload bytes of that frame still to come
        self._length = 0  # its payload length
        self._mask = b""  # its mask, rotated to the next byte to come
        self._max_message = max_message
        self._message_size = 0
        self._in_message = False
        self._on_frames = on_frames
        self._on_control = on_control

    def feed(self, data: bytes) -> bytes | None:
        """
        Take bytes from the network and forward the frames they complete.

        @return: C{None}, or, when a close frame arrives, that frame and
            everything after it, for Autobahn to run the closing handshake.
        @raise FrameError: the stream breaks the rules; stop reading it.
        """
        if self._head:
            data = self._head + data
            self._head = b""
        n = len(data)
        left = self._left
        if left > n:
            # Inside a frame that began in an earlier read, and not its end.
            self._pending.append(apply_mask(data, self._mask))
            self._left = left - n
            k = n & 3
            if k:
                mask = self._mask
                self._mask = mask[k:] + mask[:k]
            return None
        out: list = []
        moved = 0
        pos = 0
        try:
            if left:
                out = self._pending
                out.append(apply_mask(memoryview(data)[:left], self._mask))
                self._pending = []
                self._left = 0
                moved = self._length
                pos = left
            while n - pos >= 2:
                b0 = data[pos]
                b1 = data[pos + 1]
                header = payload_length(data, pos, n)
                if header is None:
                    break
                length, h = header
                opcode = b0 & 0x0F
                if b0 & 0x70:
                    raise FrameError(PROTOCOL, "reserved WebSocket frame bits are set")
                if not b1 & 0x80:
                    raise FrameError(PROTOCOL, "unmasked frame from a client")
                if opcode >= 0x8:
                    if length > 125 or not b0 & 0x80:
                        raise FrameError(PROTOCOL, "malformed WebSocket control frame")
                    end = h + 4 + length
                    if end > n:
                        break  # a control frame is handed over whole
                    if opcode == OP_CLOSE:
                        return data[pos:]
                    self._on_control(data[pos:end])
                    pos = end
                    continue
                if opcode == OP_TEXT:
                    raise FrameError("bad-request", "text message after pairing")
                if (opcode == OP_CONTINUATION) != self._in_message:
                    raise FrameError(PROTOCOL, "WebSocket fragments out of order")
                if opcode > OP_BINARY:
                    raise FrameError(PROTOCOL, f"unknown WebSocket opcode {opcode}")
                if self._message_size + length > self._max_message:
                    raise FrameError("too-large", f"messages are at most {self._max_message} bytes")
                if n - h < 4:
                    break
                mask = data[h : h + 4]
                h += 4
                fin = b0 & 0x80
                if fin:
                    self._message_size = 0
                    self._in_message = False
                else:
                    self._message_size += length
                    self._in_message = True
                # The server's header: the client's without the mask bit and key.
                if length < 126:
                    header = bytes((b0, length))
                else:
                    header = bytes((b0, b1 & 0x7F)) + data[pos + 2 : h - 4]
                end = h + length
                if end > n:
                    # The frame goes on in the next reads: hold what is here.
                    take = n - h
                    pending = [header]
                    if take:
                        pending.append(apply_mask(memoryview(data)[h:], mask))
                        k = take & 3
                        if k:
                            mask = mask[k:] + mask[:k]
                    self._pending = pending
                    self._left = length - take
                    self._length = length
                    self._mask = mask
                    pos = n
                    break
                out.append(header)
                if length:
                    out.append(apply_mask(memoryview(data)[h:end], mask))
                    moved += length
                pos = end
            if pos < n:
                self._head = data[pos:]
            return None
        finally:
            if out:
                self._on_frames(out, moved)


#: A socket whose stream broke the framing rules: what it sends is ignored.
_DISCARD = object()


class FastDataPath:
    """
    Mixed into an Autobahn WebSocket protocol: once C{startFastDataPath}
    was called (after pairing), data frames bypass Autobahn.

    It takes over between frames only, since Autobahn may hold the start of a
    frame that arrived together with the last control message; it hands every
    control frame back to Autobahn (C{_dataReceived}), and counts any traffic
    as proof of life for Autobahn's ping timeout. Subclasses implement
    C{framingFailed(error)}; after it, the socket's input is ignored (the rest
    of the stream cannot be parsed).
    """

    _frames: FrameReader | FrameForwarder | object | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        set_no_delay(self.transport)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        """
        Take every close code IANA registered (RFC 6455 section 7.4.2) as
        valid: Autobahn's table lacks 1014 (bad gateway) and would fail the
        connection as a protocol violation.  Its table is read from its base
        class, not from the protocol, so it is widened for this one call.
        """
        base = _WebSocketProtocol
        allowed = base.CLOSE_STATUS_CODES_ALLOWED
        if code is None or code in allowed or code not in REGISTERED_CLOSE_CODES:
            return super().onCloseFrame(code, reasonRaw)
        base.CLOSE_STATUS_CODES_ALLOWED = [*allowed, code]
        try:
            return super().onCloseFrame(code, reasonRaw)
        finally:
            base.CLOSE_STATUS_CODES_ALLOWED = allowed

    def startFastDataPath(self, *, masked: bool, max_message: int, on_data: Callable[[bytes, int, bool], None]) -> None:
        self._frames = FrameReader(
            masked=masked, max_message=max_message, on_data=on_data, on_control=self._controlFrame
        )

    def startForwarding(self, *, max_message: int, on_frames: Callable[[list, int], None]) -> None:
        """Like C{startFastDataPath} for a relay socket whose partner takes server frames (L{FrameForwarder})."""
        self._frames = FrameForwarder(max_message=max_message, on_frames=on_frames, on_control=self._controlFrame)

    def _controlFrame(self, frame: bytes) -> None:
        """
        A ping or pong frame, for Autobahn, but for a pong that answers no
        ping: the traffic it arrived with already counted as the answer
        (C{dataReceived} cleared C{autoPingPending}), so Autobahn would parse
        it only to find nothing to do.  A relay pings each of tens of
        thousands of idle sockets every 25 s: this is most of its idle work.
        """
        if frame[0] & 0x0F == _OP_PONG and self.autoPingPending is None:
            return
        self._dataReceived(frame)

    def dataReceived(self, data: bytes) -> None:
        frames = self._frames
        if frames is _DISCARD:
            return
        if frames is None or self.current_frame is not None or self.inside_message:
            super().dataReceived(data)
            return
        if self.data:
            data, self.data = self.data + data, b""
        if self.autoPingTimeoutCall is not None:
            self._cancelAutoPingTimeoutCall()
        try:
            handoff = frames.feed(data)
        except FrameError as error:
            self._frames = _DISCARD
            self.framingFailed(error)
            return
        if handoff is not None:
            self._frames = None
            self._dataReceived(handoff)

    def framingFailed(self, error: FrameError) -> None:
        raise NotImplementedError


def set_no_delay(transport) -> None:
    """
    Turn Nagle's algorithm off on C{transport}'s TCP socket (through a TLS
    or proxy wrapper), if it has one.

    Autobahn means to (option C{tcpNoDelay}), but calls C{setTcpNoDelay}
    with the option before it has copied it from the factory, and swallows
    the C{AttributeError}: without this, small records (acks, a message's
    last frame) wait up to 40 ms for a delayed ack from the other end.
    """
    set_it = getattr(transport, "setTcpNoDelay", None)
    if set_it is None:
        return
    try:
        set_it(True)
    except (AttributeError, OSError, NotImplementedError):
        pass  # not a TCP socket (UNIX sockets, memory transports in tests)
