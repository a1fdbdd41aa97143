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

The sequence number is the Noise nonce, sent in clear.  Today a receiver
only checks that each record carries the nonce it expects (a record lost,
repeated or reordered fails), since a connection lives and dies with one
pipe; carrying it is what will let a receiver recognise records it already
has once a connection can move between pipes (issue 9).
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


class AbortReason(IntEnum):
    """Why a peer gave up a handshake (sent in clear; advisory only)."""

    WRONG_KEY = 0x01
    REFUSED = 0x02
    MALFORMED = 0x03


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
