"""
The HTTP pipe's frames and headers (relay/core/httpwire.py), pure: what
docs/protocol.md "HTTP pipe" specifies byte by byte.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from pluresync.relay.core import httpwire as w


def _read(data: bytes, pieces: int | None = None, kinds=w.DOWNSTREAM_KINDS, max_data: int = 1 << 20):
    got = []
    reader = w.FrameReader(lambda fin, kind, payload: got.append((fin, kind, payload)), max_data, kinds)
    if pieces is None:
        reader.feed(data)
    else:
        for i in range(0, len(data), pieces):
            reader.feed(data[i : i + pieces])
    return got, reader


class FrameTests(TestCase):
    def test_head_bytes(self):
        """The head is FIN|kind then a 4-byte big-endian length, whatever the length."""
        self.assertEqual(w.frame(w.TEXT, b"{}"), b"\x81\x00\x00\x00\x02{}")
        self.assertEqual(w.frame_head(w.BINARY, 65_560), b"\x82\x00\x01\x00\x18")
        self.assertEqual(w.frame_head(w.CONTINUATION, 3, fin=False), b"\x00\x00\x00\x00\x03")
        self.assertEqual(w.encode_close(1000), b"\x88\x00\x00\x00\x02\x03\xe8")

    def test_split_anywhere(self):
        """Frames come out whole and in order however the stream is cut (one byte at a time, or at once)."""
        stream = (
            w.frame(w.TEXT, b'{"op":"ready"}')
            + w.frame(w.BINARY, bytes(range(256)) * 300)
            + w.frame_head(w.CONTINUATION, 2, fin=False)
            + b"ab"
            + w.frame(w.PING, b"p")
            + w.frame(w.PAD)
        )
        expected = [
            (True, w.TEXT, b'{"op":"ready"}'),
            (True, w.BINARY, bytes(range(256)) * 300),
            (False, w.CONTINUATION, b"ab"),
            (True, w.PING, b"p"),
            (True, w.PAD, b""),
        ]
        for pieces in (None, 1, 4, 5, 6, 7, 1000, 65_536):
            got, reader = _read(stream, pieces)
            self.assertEqual(got, expected, pieces)
            self.assertTrue(reader.at_boundary)

    def test_half_frame_is_not_a_boundary(self):
        _, reader = _read(w.frame(w.BINARY, b"abc")[:6])
        self.assertFalse(reader.at_boundary)

    def test_breaches(self):
        """Each rule of the spec's frame table, broken, is a breach; a big data frame is too-large."""
        cases = {
            "reserved bit": b"\xc2\x00\x00\x00\x00",
            "unknown kind": b"\x84\x00\x00\x00\x00",
            "control without FIN": b"\x09\x00\x00\x00\x00",
            "ping too long": w.frame_head(w.PING, 126),
            "text too long": w.frame_head(w.TEXT, 4097),
            "open upstream": w.frame(w.OPEN, b"{}"),
            "continuation upstream": w.frame(w.CONTINUATION, b"x"),
        }
        for name, data in cases.items():
            with self.assertRaises(w.FrameBreach, msg=name) as e:
                _read(data, kinds=w.UPSTREAM_KINDS)
            self.assertFalse(e.exception.too_large, name)
        with self.assertRaises(w.FrameBreach) as e:
            _read(w.frame_head(w.BINARY, 1001), max_data=1000)
        self.assertTrue(e.exception.too_large)

    def test_open(self):
        token = w.new_pipe_token()
        self.assertTrue(w.valid_token(token))
        self.assertEqual(len(token), 43)
        [(fin, kind, payload)], _ = _read(w.encode_open(token, 1 << 20, 25.0))
        self.assertEqual((fin, kind), (True, w.OPEN))
        self.assertEqual(w.parse_open(payload), w.PipeOpen(token, 1 << 20, 25.0))
        for bad in (b"[]", b"{", b'{"v":2}', b'{"v":1,"pipe":"short","max_post":2048,"ping":1}'):
            with self.assertRaises(w.FrameBreach):
                w.parse_open(bad)

    def test_close(self):
        self.assertEqual(w.parse_close(w.encode_close(4010, "peer-gone")[5:]), (4010, "peer-gone"))
        # A long reason is cut on a character boundary to fit 125 bytes.
        payload = w.encode_close(1000, "é" * 100)[5:]
        self.assertLessEqual(len(payload), 125)
        self.assertEqual(w.parse_close(payload)[0], 1000)
        for bad in (b"", b"\x00", b"\x03\xe7", b"\x13\x88", b"\x03\xe8\xff"):
            with self.assertRaises(w.FrameBreach):
                w.parse_close(bad)

    def test_seq(self):
        self.assertEqual(w.parse_seq(b"0"), 0)
        self.assertEqual(w.parse_seq(b"42"), 42)
        for bad in (b"", b"-1", b"1.0", b"x", b"9" * 17, str(2**53 + 1).encode()):
            self.assertIsNone(w.parse_seq(bad))
