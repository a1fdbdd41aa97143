"""
The end-to-end session protocol, version 2: what a session says inside its
links' sealed records (docs/protocol.md, "End-to-end layer v2").

Pure: bytes in, values out, no Twisted.  A link seals and opens records;
this module gives their plaintext a meaning.  Every record's plaintext is
C{type:u8 body}; the types are L{pluresync.secure.frames.RecordType}.

Two kinds of record:

 - I{numbered} records (DATA, END, SHUTDOWN, CLOSE) belong to the session:
   each direction numbers them 0, 1, 2, ... across every link the session
   ever uses, they are kept until the peer acknowledges them, and resent on
   another link if the one they went out on is lost.  The number is not on
   the wire: a START record on a link says which number the next numbered
   record on that link has, and the ones after it count up from there.
 - I{link} records (ACK, PING, PONG, START, RESYNC, DETACH, ABORT) concern
   the link they travel on or the session's bookkeeping; they are never resent.

Numbered records that carry user bytes name their stream (a 32-bit id; the
single stream of a connection is 0), so that many streams can share one
session later without a new wire version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pluresync.secure.frames import MAX_RECORD_PAYLOAD, RecordType

VERSION = 2
MAGIC = b"PS"
_HELLO = struct.Struct(">2sBB16sQQI")
_READY = struct.Struct(">2sBBQQI")
_U64 = struct.Struct(">Q")
_TWO_U64 = struct.Struct(">QQ")
_STREAM = struct.Struct(">I")
HELLO_SIZE = _HELLO.size
READY_SIZE = _READY.size
SESSION_ID_SIZE = 16
#: The largest user payload of one DATA/END record (the stream id takes 4 bytes).
MAX_DATA_PAYLOAD = MAX_RECORD_PAYLOAD - _STREAM.size
#: Types whose records are numbered, kept and resent.
NUMBERED = frozenset(
    {
        RecordType.DATA,
        RecordType.END,
        RecordType.SHUTDOWN,
        RecordType.CLOSE,
        RecordType.OPEN,
        RecordType.RESET,
        RecordType.FINISH,
    }
)
#: Numbered records that belong to one stream (a stream id follows the type byte).
STREAM_RECORDS = frozenset(
    {RecordType.DATA, RecordType.END, RecordType.SHUTDOWN, RecordType.OPEN, RecordType.RESET, RecordType.FINISH}
)


class WireError(ValueError):
    """A session record or negotiation payload that breaks the protocol."""


class VersionMismatch(WireError):
    """
    A hello or answer of another end-to-end version: the peer is told
    "version" (abort 0x04), not "malformed", so a later version's peer
    reports an upgrade to make, not a broken peer.
    """


class Intent(IntEnum):
    """What the initiator wants from a new link (the hello's C{kind})."""

    NEW = 0x01  #: start a new session
    RESUME = 0x02  #: carry the existing session C{session_id}


class Status(IntEnum):
    """The responder's answer to a hello (the READY payload's C{status})."""

    OK = 0x00
    UNKNOWN_SESSION = 0x01  #: no such session here (it ended long ago, or another listener holds it)
    NOT_YOURS = 0x02  #: the session belongs to another peer id
    ENDED = 0x03  #: the session has ended (its C{recv_next} says how far it got)


class DetachReason(IntEnum):
    """Why a link is being retired (the DETACH record's payload)."""

    MOVED = 0x01  #: the session moved to another link
    ROTATING = 0x02  #: the relay will end this link soon (its session cap)
    SHUTTING_DOWN = 0x04  #: the session ended


class Caps(IntEnum):
    """Capability bits in hello and READY; unknown bits are ignored."""

    RESUME = 1 << 0
    DIRECT = 1 << 1  #: understands CONTROL's direct-path signals (and may be offered one)
    AESGCM = 1 << 2  #: has hardware AES: records after READY may be sealed with AES-GCM
    STREAMS = 1 << 3  #: carries many streams on the session (OPEN, RESET, WINDOW, FINISH)
    KEEP = 1 << 4  #: (initiator, with STREAMS) keeps the session for new streams after its last one ends


class ControlKind(IntEnum):
    """
    What a CONTROL record carries: its first byte.  A receiver ignores kinds
    it does not know, so later features add kinds, not a wire version.
    """

    DIRECT_OFFER = 0x01  #: the initiator's direct-path candidates (pluresync.direct.signal)
    DIRECT_ANSWER = 0x02  #: the responder's, in reply to an offer
    DIRECT_FAILED = 0x03  #: a direct attempt is over on the sender's side (why: one byte)


@dataclass(frozen=True)
class Hello:
    """
    The initiator's frame-3 payload.

    @ivar recv_next: the number of the next record the initiator expects
        from the responder (0 for a new session).
    @ivar max_offset: how far (in record bytes: plaintext lengths, type byte included) the
        responder may send: its credit.
    """

    intent: Intent
    session_id: bytes
    recv_next: int
    max_offset: int
    caps: int = Caps.RESUME

    def encode(self) -> bytes:
        return _HELLO.pack(MAGIC, VERSION, self.intent, self.session_id, self.recv_next, self.max_offset, self.caps)


@dataclass(frozen=True)
class ReadyAnswer:
    """The responder's READY payload: whether it takes the hello, and its side of the session."""

    status: Status
    recv_next: int
    max_offset: int
    caps: int = Caps.RESUME

    def encode(self) -> bytes:
        return _READY.pack(MAGIC, VERSION, self.status, self.recv_next, self.max_offset, self.caps)


def parse_hello(payload: bytes) -> Hello | None:
    """
    The hello in a frame-3 payload, or C{None} for an empty one (a version 1
    peer).

    @raise WireError: a payload that is not a version 2 hello.
    """
    if not payload:
        return None
    if len(payload) < HELLO_SIZE or payload[:2] != MAGIC:
        raise WireError("the handshake payload is not a pluresync hello")
    magic, version, kind, session_id, recv_next, max_offset, caps = _HELLO.unpack_from(payload)
    if version != VERSION:
        raise VersionMismatch(f"the peer speaks end-to-end protocol version {version}, this side {VERSION}")
    try:
        intent = Intent(kind)
    except ValueError:
        raise WireError(f"unknown hello kind {kind}") from None
    return Hello(intent, session_id, recv_next, max_offset, caps)


def parse_ready(payload: bytes) -> ReadyAnswer | None:
    """The answer in a READY payload, or C{None} for an empty one (a version 1 peer)."""
    if not payload:
        return None
    if len(payload) < READY_SIZE or payload[:2] != MAGIC:
        raise WireError("the READY payload is not a pluresync answer")
    magic, version, status, recv_next, max_offset, caps = _READY.unpack_from(payload)
    if version != VERSION:
        raise WireError(f"the peer speaks end-to-end protocol version {version}, this side {VERSION}")
    try:
        answer = Status(status)
    except ValueError:
        raise WireError(f"unknown READY status {status}") from None
    return ReadyAnswer(answer, recv_next, max_offset, caps)


# -- numbered records -----------------------------------------------------------


def record_head(kind: RecordType, stream: int) -> bytes:
    """What precedes the payload in a DATA or END record's plaintext (a stream keeps its own)."""
    return bytes((kind,)) + _STREAM.pack(stream)


#: bytes of a DATA/END/SHUTDOWN record's plaintext before its payload
STREAM_HEAD_SIZE = 1 + _STREAM.size


def data_record(kind: RecordType, stream: int, payload) -> bytes:
    """The plaintext of a DATA or END record."""
    return record_head(kind, stream) + payload


def shutdown_record(stream: int) -> bytes:
    return bytes((RecordType.SHUTDOWN,)) + _STREAM.pack(stream)


CLOSE_RECORD = bytes((RecordType.CLOSE,))


class ResetReason(IntEnum):
    """Why a stream ended without its clean end (the RESET record's reason byte)."""

    ABORTED = 0x01  #: the application aborted the stream
    REFUSED = 0x02  #: the listener's application refused it (its factory built no protocol)
    TOO_MANY = 0x03  #: the listener holds as many streams on this session as it allows
    TOO_FAST = 0x04  #: streams were opened faster than the listener allows
    PROTOCOL = 0x05  #: the stream's records broke the protocol (the session carries on)


_STREAM_REASON = struct.Struct(">IB")
_STREAM_OFFSET = struct.Struct(">IQ")


def open_record(stream: int) -> bytes:
    return bytes((RecordType.OPEN,)) + _STREAM.pack(stream)


def finish_record(stream: int) -> bytes:
    return bytes((RecordType.FINISH,)) + _STREAM.pack(stream)


def reset_record(stream: int, why: ResetReason) -> bytes:
    return bytes((RecordType.RESET,)) + _STREAM_REASON.pack(stream, why)


def parse_reset(body: bytes) -> tuple[int, int]:
    """A RESET's stream id and reason byte (a reason this side does not know is kept as a number)."""
    if len(body) != _STREAM_REASON.size:
        raise WireError("a RESET record must carry 5 bytes")
    return _STREAM_REASON.unpack(body)


def window_record(stream: int, max_offset: int) -> bytes:
    return bytes((RecordType.WINDOW,)) + _STREAM_OFFSET.pack(stream, max_offset)


def parse_window(body: bytes) -> tuple[int, int]:
    if len(body) != _STREAM_OFFSET.size:
        raise WireError("a WINDOW record must carry 12 bytes")
    return _STREAM_OFFSET.unpack(body)


def stream_of(plaintext: bytes) -> int:
    """The stream id of a stream record's plaintext (after its type byte)."""
    if len(plaintext) < STREAM_HEAD_SIZE:
        raise WireError("a stream record too short for its stream id")
    return _STREAM.unpack_from(plaintext, 1)[0]


# -- link records -----------------------------------------------------------------


def control_record(kind: ControlKind, body: bytes) -> bytes:
    return bytes((RecordType.CONTROL, kind)) + body


def ack_record(recv_next: int, max_offset: int) -> bytes:
    return bytes((RecordType.ACK,)) + _TWO_U64.pack(recv_next, max_offset)


def parse_ack(body: bytes) -> tuple[int, int]:
    if len(body) != _TWO_U64.size:
        raise WireError("an ACK record must carry 16 bytes")
    return _TWO_U64.unpack(body)


def _u64_record(kind: RecordType, value: int) -> bytes:
    return bytes((kind,)) + _U64.pack(value)


def ping_record(ident: int) -> bytes:
    return _u64_record(RecordType.PING, ident)


def pong_record(ident: int) -> bytes:
    return _u64_record(RecordType.PONG, ident)


def start_record(seq: int) -> bytes:
    return _u64_record(RecordType.START, seq)


def resync_record(seq: int) -> bytes:
    return _u64_record(RecordType.RESYNC, seq)


def parse_u64(body: bytes, what: str) -> int:
    if len(body) != _U64.size:
        raise WireError(f"a {what} record must carry 8 bytes")
    return _U64.unpack(body)[0]


def detach_record(reason: DetachReason) -> bytes:
    return bytes((RecordType.DETACH, reason))


class AbortReason(IntEnum):
    """Why a session ended without a clean close (the ABORT record's payload)."""

    ABORTED = 0x01  #: the application aborted (C{abortConnection})
    PROTOCOL = 0x02  #: the peer broke the protocol
    REFUSED = 0x03  #: the application refused the connection (its factory built no protocol)


def abort_record(reason: AbortReason) -> bytes:
    return bytes((RecordType.ABORT, reason))
