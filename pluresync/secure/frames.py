"""
Framing of the end-to-end byte stream: length-prefixed frames, then records.

Every transport below (a relay's WebSocket, later a TCP or QUIC stream) is
treated as a plain byte stream, so one framing serves them all and a new kind
of pipe needs no framing of its own.

Wire format (all integers big-endian)::

    frame   = length:u16 body[length]
    handshake phase:  body = a Noise handshake message (>= 32 bytes)
                      or an abort notice: 1 byte reason code
    record phase:     body = seq:u64 ciphertext
                      ciphertext = ChaChaPoly(k, nonce=seq, ad="", type:u8 payload)

The sequence number is the link's Noise nonce, sent in clear, and each
link checks it strictly: a record lost, repeated or reordered on a link
fails that link.  A session that moves between links numbers its own
records inside the plaintext instead (L{pluresync.session.wire}), so a
record resent on another link is recognised by its session number, never
by this one.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from pluresync.errors import RecordError

MAX_FRAME_BODY = 0xFFFF
SEQ = struct.Struct(">Q")
LENGTH = struct.Struct(">H")
TAG_LENGTH = 16
#: The largest payload one record can carry (Noise's 65535-byte message limit
#: minus the sequence number, the type byte and the AEAD tag).
MAX_RECORD_PAYLOAD = MAX_FRAME_BODY - SEQ.size - 1 - TAG_LENGTH
#: Shortest possible record body: a sequence number and an empty sealed type byte.
MIN_RECORD_BODY = SEQ.size + 1 + TAG_LENGTH


class RecordType(IntEnum):
    """The first plaintext byte of each record."""

    DATA = 0x00  #: part of the byte stream / of a message that goes on
    END = 0x01  #: the last part of a message (message-oriented API)
    CLOSE = 0x02  #: authenticated clean close: nothing follows
    READY = 0x03  #: the responder accepted the handshake (first record it sends)
    USE = 0x04  #: the initiator chose this connection (first record it sends)
    SHUTDOWN = 0x05  #: authenticated end of the sender's direction (half-close); the other may go on
    # Version 2 (pluresync.session.wire): a session's bookkeeping on its links.
    ACK = 0x06  #: recv_next, max_offset: what arrived, and how far the peer may send
    PING = 0x07  #: an id the peer echoes in a PONG (liveness of this link)
    PONG = 0x08  #: the echo of a PING
    START = 0x09  #: the next numbered record on this link has this number
    RESYNC = 0x0A  #: send again from this number (a link that held records is gone)
    CONTROL = 0x0B  #: reserved: path signaling (the direct path)
    DETACH = 0x0C  #: the sender retires this link (a reason byte); nothing follows on it
    ABORT = 0x0D  #: the sender ended the session without a clean close (a reason byte)
    # Streams on one session (caps bit 3; pluresync.session.streams).
    OPEN = 0x0E  #: the initiator opens a stream (its id)
    RESET = 0x0F  #: a stream ends at once, both ways, without a clean end (id, a reason byte)
    WINDOW = 0x10  #: a stream's credit: how far the peer may send on it (id, max offset)
    FINISH = 0x11  #: a stream's clean end from the sender: it writes and reads no more there (id)


class AbortReason(IntEnum):
    """Why a peer gave up a handshake (sent in clear; advisory only)."""

    WRONG_KEY = 0x01
    REFUSED = 0x02
    MALFORMED = 0x03
    VERSION = 0x04  #: the peer speaks another end-to-end protocol version


def frame(body: bytes) -> bytes:
    """Prefix C{body} with its length."""
    return LENGTH.pack(len(body)) + body


class FrameDecoder:
    """
    Split a byte stream into frame bodies.

    Memory is bounded: at most one partial frame (64 KiB) is held besides
    whatever the caller has not yet taken. The common case, a chunk holding
    whole frames, costs one copy per frame (its body).
    """

    __slots__ = ("_buffer", "_pos")

    def __init__(self) -> None:
        self._buffer = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos >= len(self._buffer):
            self._buffer = data
        else:
            self._buffer = self._buffer[self._pos :] + data
        self._pos = 0

    def next(self) -> bytes | None:
        """The next complete frame body, or C{None} if more bytes are needed."""
        buf = self._buffer
        pos = self._pos
        if len(buf) - pos < 2:
            return None
        end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
        if len(buf) < end:
            return None
        self._pos = end
        return buf[pos + 2 : end]

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos


def split_record(body: bytes) -> tuple[int, bytes]:
    """Separate a record body into its sequence number and ciphertext."""
    if len(body) < MIN_RECORD_BODY:
        raise RecordError(f"malformed record: {len(body)} bytes is too short")
    return SEQ.unpack_from(body)[0], body[SEQ.size :]
