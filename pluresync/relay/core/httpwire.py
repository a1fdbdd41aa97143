"""
The HTTP pipe's wire rules, both sides (docs/protocol.md, "HTTP pipe").

Where a proxy refuses the WebSocket upgrade, relay protocol v1 runs over
plain HTTP/1.1 requests: a long-lived chunked downstream response and a
sequence of upstream request bodies.  Inside those byte streams the
messages a WebSocket would carry are frames of a fixed 5-byte head (FIN and
kind, then a 4-byte length); this module encodes and parses them, the
C{open} frame that hands the client its pipe token, and the request headers
that bind upstreams to a pipe.  The Twisted relay, a second relay front and
the client all use it, so the frame rules are written once.

Pure Python: no Twisted, no Autobahn, no asyncio.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

#: What the downstream response says it is; anything else is not a relay.
CONTENT_TYPE = b"application/x-pluresync-pipe"
#: The path of every pipe request, joined to the relay URL's path.
PIPE_PATH = "pipe"
#: The upstream's binding to its downstream (the pipe token).
PIPE_HEADER = b"Pluresync-Pipe"
#: The upstream's number (0, 1, 2, ...).
SEQ_HEADER = b"Pluresync-Seq"
#: The largest upstream number (JSON-safe integers, as the spec says).
MAX_SEQ = 2**53

#: The head of every frame: FIN and kind in one byte, the length in four.
HEAD = struct.Struct(">BI")
HEAD_SIZE = HEAD.size
FIN = 0x80

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
OPEN = 0x3
CLOSE = 0x8
PING = 0x9
PONG = 0xA
PAD = 0xB

#: The largest payload of each control kind (data kinds: the max message size).
MAX_CONTROL = 4096
MAX_PING = 125
MAX_CLOSE = 125
MAX_PAD = 16384
_CONTROL_LIMITS = {TEXT: MAX_CONTROL, OPEN: MAX_CONTROL, CLOSE: MAX_CLOSE, PING: MAX_PING, PONG: MAX_PING, PAD: MAX_PAD}

#: The largest bounded upstream body a pluresync relay takes (C{max_post} in C{open}).
DEFAULT_MAX_POST = 1024 * 1024

_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


class FrameBreach(ValueError):
    """A frame breaks the HTTP pipe's rules; the pipe ends (a WebSocket's 1006/4010)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        #: a data frame over the max message size: C{too-large} (4009), not a drop
        self.too_large = too_large


def frame(kind: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One whole frame (for control frames and tests; data goes head and payload apart)."""
    return HEAD.pack((FIN if fin else 0) | kind, len(payload)) + payload


def frame_head(kind: int, length: int, fin: bool = True) -> bytes:
    """The 5-byte head of a frame of C{length} payload bytes."""
    return HEAD.pack((FIN if fin else 0) | kind, length)


def new_pipe_token() -> str:
    """An unguessable pipe token: 32 bytes of the CSPRNG, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def valid_token(token: str) -> bool:
    """Whether C{token} has the form of a pipe token (nothing else is looked up)."""
    return _TOKEN.fullmatch(token) is not None


def parse_seq(text: bytes) -> int | None:
    """An upstream's C{Pluresync-Seq}, or C{None} when it is not a number in range."""
    if not text or len(text) > 16 or not text.isdigit():
        return None
    seq = int(text)
    return seq if seq <= MAX_SEQ else None


@dataclass(frozen=True)
class PipeOpen:
    """What the relay's C{open} frame says."""

    pipe: str
    max_post: int
    ping: float


def encode_open(pipe: str, max_post: int, ping: float) -> bytes:
    """The C{open} frame, whole."""
    body = json.dumps({"v": 1, "pipe": pipe, "max_post": max_post, "ping": ping}, separators=(",", ":"))
    return frame(OPEN, body.encode("ascii"))


def parse_open(payload: bytes) -> PipeOpen:
    """
    Read an C{open} payload.

    @raise FrameBreach: it is not one.
    """
    try:
        message = json.loads(payload)
    except ValueError:
        raise FrameBreach("the open frame is not JSON") from None
    if not isinstance(message, dict) or message.get("v") != 1:
        raise FrameBreach("the open frame is not version 1")
    pipe, max_post, ping = message.get("pipe"), message.get("max_post"), message.get("ping")
    if not isinstance(pipe, str) or not valid_token(pipe):
        raise FrameBreach("the open frame has no valid pipe token")
    if not isinstance(max_post, int) or isinstance(max_post, bool) or max_post < 1024:
        raise FrameBreach("the open frame has no valid max_post")
    if not isinstance(ping, int | float) or isinstance(ping, bool) or not 0 <= ping <= 3600:
        raise FrameBreach("the open frame has no valid ping interval")
    return PipeOpen(pipe, max_post, float(ping))


def encode_close(code: int, reason: str = "") -> bytes:
    """A C{close} frame, whole (the reason cut to fit)."""
    raw = reason.encode("utf-8")[: MAX_CLOSE - 2]
    while raw:
        try:
            raw.decode("utf-8")
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return frame(CLOSE, struct.pack(">H", code) + raw)


def parse_close(payload: bytes) -> tuple[int, str]:
    """
    The code and reason of a C{close} payload.

    @raise FrameBreach: it is not one.
    """
    if len(payload) < 2:
        raise FrameBreach("a close frame without a code")
    (code,) = struct.unpack(">H", payload[:2])
    if not (1000 <= code <= 1014 or 3000 <= code <= 4999):
        raise FrameBreach(f"a close frame with code {code}")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameBreach("a close reason that is not UTF-8") from None


class FrameReader:
    """
    Frames out of a byte stream that arrives in pieces (HTTP chunks, TCP
    reads), each handed to C{on_frame(fin, kind, payload)} as soon as it is
    whole.  It holds at most one frame being read, so a pipe's memory is
    bounded by C{max_data} whatever the sender does.

    @param max_data: the largest data (binary, continuation) payload.
    @param kinds: the kinds this side may receive (L{UPSTREAM_KINDS} at a
        relay, L{DOWNSTREAM_KINDS} at a client).
    """

    __slots__ = ("_buffer", "_on_frame", "_max_data", "_kinds")

    def __init__(self, on_frame: Callable[[bool, int, bytes], None], max_data: int, kinds: frozenset[int]) -> None:
        self._buffer = bytearray()
        self._on_frame = on_frame
        self._max_data = max_data
        self._kinds = kinds

    @property
    def at_boundary(self) -> bool:
        """Whether no frame is half read (an upstream body must end here)."""
        return not self._buffer

    def feed(self, data: bytes) -> None:
        """
        Read C{data}; hand on every frame it completes.

        @raise FrameBreach: a frame breaks the rules (the rest is not read).
        """
        buffer = self._buffer
        if buffer:
            # Finish the frame under way first.
            if len(buffer) < HEAD_SIZE:
                need = HEAD_SIZE - len(buffer)
                buffer += data[:need]
                data = data[need:]
                if len(buffer) < HEAD_SIZE:
                    return
            first, length = HEAD.unpack_from(buffer)
            self._check(first, length)
            missing = HEAD_SIZE + length - len(buffer)
            if len(data) < missing:
                buffer += data
                return
            buffer += data[:missing]
            data = data[missing:]
            payload = bytes(buffer[HEAD_SIZE:])
            buffer.clear()
            self._on_frame(bool(first & FIN), first & 0x0F, payload)
        view = memoryview(data)
        offset = self._whole(view)
        if offset < len(view):
            buffer += view[offset:]

    def _whole(self, view: memoryview) -> int:
        """Hand on the whole frames at the start of C{view}; return where the rest begins."""
        offset = 0
        size = len(view)
        while size - offset >= HEAD_SIZE:
            first, length = HEAD.unpack_from(view, offset)
            self._check(first, length)
            end = offset + HEAD_SIZE + length
            if end > size:
                break
            self._on_frame(bool(first & FIN), first & 0x0F, bytes(view[offset + HEAD_SIZE : end]))
            offset = end
        return offset

    def _check(self, first: int, length: int) -> int:
        kind = first & 0x0F
        if first & 0x70:
            raise FrameBreach("a frame with a reserved bit set")
        if kind not in self._kinds:
            raise FrameBreach(f"a frame of kind {kind:#x}, not allowed here")
        limit = _CONTROL_LIMITS.get(kind)
        if limit is None:
            if length > self._max_data:
                raise FrameBreach(f"messages are at most {self._max_data} bytes", too_large=True)
        else:
            if not first & FIN:
                raise FrameBreach(f"a control frame (kind {kind:#x}) without FIN")
            if length > limit:
                raise FrameBreach(f"a control frame (kind {kind:#x}) of {length} bytes (at most {limit})")
        return length


#: What a relay reads from a client (upstream), and what a client reads from a relay (downstream).
UPSTREAM_KINDS = frozenset({TEXT, BINARY, CLOSE, PING, PONG, PAD})
DOWNSTREAM_KINDS = frozenset({CONTINUATION, TEXT, BINARY, OPEN, CLOSE, PING, PONG, PAD})
