"""The lean WebSocket frame codec used on paired sockets."""

from __future__ import annotations

import os

from autobahn.websocket.xormasker import create_xor_masker
from twisted.trial.unittest import SynchronousTestCase

from pluresync.wsframes import (
    OP_BINARY,
    OP_CONTINUATION,
    FrameError,
    FrameReader,
    client_frame,
    frame_header,
)


def server_frame(payload: bytes, opcode: int = OP_BINARY, fin: bool = True) -> bytes:
    return frame_header(len(payload), opcode, fin) + payload


def masked_frame(payload: bytes, opcode: int = OP_BINARY, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    return frame_header(len(payload), opcode, fin, mask) + create_xor_masker(mask, len(payload)).process(payload)


class Reader:
    def __init__(self, masked: bool, max_message: int = 1 << 20) -> None:
        self.data: list[tuple[bytes, int, bool]] = []
        self.control: list[bytes] = []
        self.reader = FrameReader(
            masked=masked,
            max_message=max_message,
            on_data=lambda p, o, f: self.data.append((bytes(p), o, f)),
            on_control=self.control.append,
        )


class FrameReaderTests(SynchronousTestCase):
    """Parsing, at every split, and refusing what breaks the rules."""

    def test_header_sizes(self):
        """7-bit, 16-bit and 64-bit lengths round-trip through header and reader."""
        for size in (0, 125, 126, 65535, 65536, 200_000):
            r = Reader(masked=False)
            payload = os.urandom(size)
            self.assertIsNone(r.reader.feed(server_frame(payload)))
            self.assertEqual(r.data, [(payload, OP_BINARY, True)])

    def test_every_split(self):
        """Frames split at any byte arrive whole and in order."""
        stream = b"".join(masked_frame(p) for p in (b"a" * 3, b"b" * 300, b"c" * 70000))
        for cut in list(range(0, 20)) + [300, 310, len(stream) - 1]:
            r = Reader(masked=True)
            r.reader.feed(stream[:cut])
            r.reader.feed(stream[cut:])
            self.assertEqual([p for p, _, _ in r.data], [b"a" * 3, b"b" * 300, b"c" * 70000], cut)

    def test_byte_by_byte(self):
        """Even one byte at a time."""
        stream = client_frame(b"hello")
        r = Reader(masked=True)
        for i in range(len(b"".join(stream))):
            r.reader.feed(b"".join(stream)[i : i + 1])
        self.assertEqual(r.data, [(b"hello", OP_BINARY, True)])

    def test_client_frame_is_masked(self):
        """client_frame masks its payload: the plaintext is not on the wire."""
        header, body = client_frame(b"secret bytes here")
        self.assertTrue(header[1] & 0x80)
        self.assertNotEqual(body, b"secret bytes here")

    def test_fragments_keep_opcode_and_fin(self):
        """A fragmented message is delivered as fragments with their opcode and FIN."""
        r = Reader(masked=False)
        r.reader.feed(server_frame(b"1", OP_BINARY, False) + server_frame(b"2", OP_CONTINUATION, True))
        self.assertEqual(r.data, [(b"1", OP_BINARY, False), (b"2", OP_CONTINUATION, True)])

    def test_control_frames_go_to_autobahn(self):
        """Pings and pongs are handed over raw, between the data frames around them."""
        ping = frame_header(4, 0x9) + b"ping"
        r = Reader(masked=False)
        r.reader.feed(server_frame(b"x") + ping + server_frame(b"y"))
        self.assertEqual(r.control, [ping])
        self.assertEqual([p for p, _, _ in r.data], [b"x", b"y"])

    def test_close_hands_off_the_rest(self):
        """A close frame stops the reader: it and everything after it are returned."""
        close = frame_header(2, 0x8) + b"\x03\xe8"
        r = Reader(masked=False)
        self.assertEqual(r.reader.feed(server_frame(b"x") + close + b"trailing"), close + b"trailing")
        self.assertEqual(r.data, [(b"x", OP_BINARY, True)])

    def assertRefused(self, stream: bytes, code: str, masked: bool = True, max_message: int = 1 << 20):
        r = Reader(masked=masked, max_message=max_message)
        with self.assertRaises(FrameError) as e:
            r.reader.feed(stream)
        self.assertEqual(e.exception.code, code)
        return r

    def test_refusals(self):
        """
        A text message after pairing breaks the relay protocol (bad-request);
        masking mistakes, reserved bits, bad fragments, unknown opcodes, bad
        control frames and lengths not in their shortest form break RFC 6455
        (protocol: the connection is dropped, as Autobahn does before pairing).
        """
        self.assertRefused(masked_frame(b"hi", opcode=0x1), "bad-request")
        self.assertRefused(server_frame(b"unmasked"), "protocol", masked=True)
        self.assertRefused(masked_frame(b"masked"), "protocol", masked=False)
        self.assertRefused(bytes([0x80 | 0x40 | OP_BINARY, 0x80, 0, 0, 0, 0]), "protocol")
        self.assertRefused(masked_frame(b"x", OP_CONTINUATION), "protocol")
        self.assertRefused(masked_frame(b"x", OP_BINARY, False) + masked_frame(b"y", OP_BINARY), "protocol")
        self.assertRefused(masked_frame(b"x", 0x3), "protocol")
        self.assertRefused(masked_frame(b"p" * 126, 0x9), "protocol")

    def test_non_minimal_lengths(self):
        """
        A length in a longer form than it needs is refused like any other
        breach (Autobahn refuses it before pairing; the fast path forwarded it).
        """
        mask = b"\0\0\0\0"
        self.assertRefused(bytes([0x80 | OP_BINARY, 0x80 | 126]) + (5).to_bytes(2, "big") + mask + b"hello", "protocol")
        self.assertRefused(bytes([0x80 | OP_BINARY, 0x80 | 127]) + (5).to_bytes(8, "big") + mask + b"hello", "protocol")
        self.assertRefused(bytes([0x80 | OP_BINARY, 0x80 | 127]) + (1 << 63).to_bytes(8, "big") + mask, "protocol")
        # The shortest forms pass.
        r = Reader(masked=True)
        r.reader.feed(bytes([0x80 | OP_BINARY, 0x80 | 126]) + (126).to_bytes(2, "big") + mask + b"x" * 126)
        self.assertEqual([len(p) for p, _, _ in r.data], [126])

    def test_oversize_refused_before_buffering(self):
        """An oversize frame is refused from its header alone, before its payload arrives."""
        header = frame_header(10_000_000, mask=b"\0\0\0\0")
        self.assertRefused(header, "too-large", max_message=1 << 20)

    def test_oversize_fragmented_message(self):
        """The limit applies to a message summed over its fragments."""
        stream = masked_frame(b"a" * 600, OP_BINARY, False) + masked_frame(b"b" * 600, OP_CONTINUATION)
        r = self.assertRefused(stream, "too-large", max_message=1000)
        self.assertEqual(len(r.data), 1)
