"""
The lean WebSocket frame codec used on paired sockets, and the relay's
streamed forwarding, held against the C{websockets} library's framing.
"""

from __future__ import annotations

import os

from autobahn.websocket.xormasker import create_xor_masker
from twisted.trial.unittest import SynchronousTestCase
from websockets.protocol import Protocol, Side, State

from pluresync.wsframes import (
    OP_BINARY,
    OP_CONTINUATION,
    FastDataPath,
    FrameError,
    FrameForwarder,
    FrameReader,
    apply_mask,
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


def websockets_client_stream() -> tuple[bytes, list[tuple[int, bytes, bool]], list[bytes]]:
    """
    A client's masked stream, framed by the C{websockets} library (not by
    pluresync): every length form, empty frames, a fragmented message with a
    ping and a pong between its fragments.  Returns the bytes, the data
    frames as sent (opcode, payload, FIN) and the control frames' payloads.
    """
    client = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
    data: list[tuple[int, bytes, bool]] = []
    control: list[bytes] = []
    for size in (0, 1, 125, 126, 65535, 65536, 70000):
        payload = os.urandom(size)
        client.send_binary(payload)
        data.append((OP_BINARY, payload, True))
    first, middle, last = os.urandom(3000), os.urandom(70000), b""
    client.send_binary(first, fin=False)
    client.send_ping(b"between")
    client.send_continuation(middle, fin=False)
    client.send_pong(b"unsolicited")
    client.send_continuation(last, fin=True)
    data += [(OP_BINARY, first, False), (OP_CONTINUATION, middle, False), (OP_CONTINUATION, last, True)]
    control += [b"between", b"unsolicited"]
    return b"".join(client.data_to_send()), data, control


class Forwarder:
    """A L{FrameForwarder} whose output a C{websockets} client parses, as the partner would."""

    def __init__(self, max_message: int = 1 << 20) -> None:
        self.partner = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
        self.control: list[bytes] = []
        self.moved = 0
        self.held = 0  # the most bytes the forwarder held between reads
        self.forwarder = FrameForwarder(max_message=max_message, on_frames=self.frames, on_control=self.control.append)

    def frames(self, frames: list, moved: int) -> None:
        self.moved += moved
        self.partner.receive_data(b"".join(frames))

    def feed(self, data: bytes) -> bytes | None:
        handoff = self.forwarder.feed(data)
        self.held = max(self.held, len(self.forwarder._head))
        return handoff

    def received(self) -> list[tuple[int, bytes, bool]]:
        """The data frames the partner parsed, exactly as framed."""
        return [(int(e.opcode), bytes(e.data), e.fin) for e in self.partner.events_received()]

    def control_payloads(self) -> list[bytes]:
        """The payloads of the control frames handed over, parsed by a C{websockets} server."""
        server = Protocol(Side.SERVER, state=State.OPEN)
        server.receive_data(b"".join(self.control))
        return [bytes(e.data) for e in server.events_received()]


class FrameForwarderTests(SynchronousTestCase):
    """
    The relay's streamed forwarding, against an independent WebSocket
    implementation (C{websockets}) on both sides: it frames what a client
    sends and parses what the partner receives.
    """

    def test_websockets_stream(self):
        """Every frame kind arrives as framed, whatever the read sizes; a control frame is handed over whole."""
        stream, data, control = websockets_client_stream()
        for size in (1, 2, 3, 7, 13, 139, 4096, 65536, 65536 + 7, len(stream)):
            f = Forwarder()
            for at in range(0, len(stream), size):
                self.assertIsNone(f.feed(stream[at : at + size]))
            self.assertEqual(f.received(), data, size)
            self.assertEqual(f.control_payloads(), control, size)
            self.assertEqual(f.moved, sum(len(p) for _, p, _ in data))
            self.assertLessEqual(f.held, 14 + 125)

    def test_every_split(self):
        """A stream cut in two at any byte (headers, masks, control frames) arrives whole."""
        client = Protocol(Side.CLIENT, state=State.OPEN)
        client.send_binary(b"a" * 3, fin=False)
        client.send_ping(b"p" * 125)
        client.send_continuation(b"b" * 300, fin=True)
        client.send_binary(b"c" * 70)
        stream = b"".join(client.data_to_send())
        expected = [(OP_BINARY, b"a" * 3, False), (OP_CONTINUATION, b"b" * 300, True), (OP_BINARY, b"c" * 70, True)]
        for cut in range(len(stream) + 1):
            f = Forwarder()
            f.feed(stream[:cut])
            f.feed(stream[cut:])
            self.assertEqual(f.received(), expected, cut)
            self.assertEqual(f.control_payloads(), [b"p" * 125], cut)

    def test_whole_frames_only(self):
        """
        A frame is forwarded once whole, unmasked piece by piece as it came:
        a close frame the relay writes to the partner always falls between
        frames.
        """
        client = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
        payload = os.urandom(200_000)
        client.send_binary(payload)
        client.send_binary(b"next")
        stream = b"".join(client.data_to_send())
        f = Forwarder()
        writes: list[tuple[bytes, int]] = []
        f.forwarder._on_frames = lambda frames, moved: writes.append((b"".join(frames), moved))
        f.feed(stream[:1000])
        f.feed(stream[1000:70_000])
        self.assertEqual(writes, [])
        f.feed(stream[70_000:])
        self.assertEqual(writes, [(frame_header(200_000) + payload + frame_header(4) + b"next", 200_004)])
        self.assertEqual(f.held, 0)

    def test_close_hands_off_the_rest(self):
        """A close frame stops the forwarder: the data before it is forwarded, it and the rest handed back."""
        client = Protocol(Side.CLIENT, state=State.OPEN)
        client.send_binary(b"x" * 200)
        before = b"".join(client.data_to_send())
        client.send_close(1000, "bye")
        close = b"".join(client.data_to_send())
        for cut in range(len(before), len(before) + len(close)):
            f = Forwarder()
            stream = before + close + b"trailing"
            handoff = f.feed(stream[:cut])
            if handoff is None:
                handoff = f.feed(stream[cut:])
            self.assertEqual(handoff, close + b"trailing", cut)
            self.assertEqual(f.received(), [(OP_BINARY, b"x" * 200, True)])

    def assertRefused(self, stream: bytes, code: str, max_message: int = 1 << 20) -> Forwarder:
        f = Forwarder(max_message)
        with self.assertRaises(FrameError) as e:
            f.feed(stream)
        self.assertEqual(e.exception.code, code)
        return f

    def test_refusals(self):
        """The rules of L{FrameReader} for a client's frames, from each header, before its payload."""
        self.assertRefused(masked_frame(b"hi", opcode=0x1), "bad-request")
        self.assertRefused(server_frame(b"unmasked"), "protocol")
        self.assertRefused(bytes([0x80 | 0x40 | OP_BINARY, 0x80, 0, 0, 0, 0]), "protocol")
        self.assertRefused(masked_frame(b"x", OP_CONTINUATION), "protocol")
        self.assertRefused(masked_frame(b"x", OP_BINARY, False) + masked_frame(b"y", OP_BINARY), "protocol")
        self.assertRefused(masked_frame(b"x", 0x3), "protocol")
        self.assertRefused(masked_frame(b"p" * 126, 0x9), "protocol")
        self.assertRefused(masked_frame(b"p", 0x9, fin=False), "protocol")
        mask = b"\0\0\0\0"
        self.assertRefused(bytes([0x80 | OP_BINARY, 0x80 | 126]) + (5).to_bytes(2, "big") + mask + b"hello", "protocol")
        self.assertRefused(bytes([0x80 | OP_BINARY, 0x80 | 127]) + (5).to_bytes(8, "big") + mask + b"hello", "protocol")
        self.assertRefused(frame_header(10_000_000, mask=mask), "too-large")

    def test_refusal_forwards_what_came_before(self):
        """Frames before the offending one are forwarded (the partner gets them, then the close)."""
        stream = masked_frame(b"a" * 600, OP_BINARY, False) + masked_frame(b"b" * 600, OP_CONTINUATION)
        f = self.assertRefused(stream, "too-large", max_message=1000)
        self.assertEqual(f.received(), [(OP_BINARY, b"a" * 600, False)])

    def test_apply_mask(self):
        """The unmasking function is its own inverse and agrees with Autobahn's masker, from a memoryview too."""
        data, mask = os.urandom(1001), os.urandom(4)
        masked = create_xor_masker(mask, len(data)).process(data)
        self.assertEqual(apply_mask(data, mask), masked)
        self.assertEqual(apply_mask(memoryview(b"--" + masked)[2:], mask), data)


class ControlFrameTests(SynchronousTestCase):
    """What the fast path hands back to Autobahn."""

    def handed(self, frame: bytes, pending: bytes | None) -> list[bytes]:
        class Socket(FastDataPath):
            autoPingPending = pending

            def __init__(self) -> None:
                self.parsed: list[bytes] = []

            def _dataReceived(self, data: bytes) -> None:
                self.parsed.append(data)

        socket = Socket()
        socket._controlFrame(frame)
        return socket.parsed

    def test_pong_answering_nothing_dropped(self) -> None:
        """A pong when no ping is pending (traffic already counted as the answer) is not parsed."""
        pong = frame_header(4, 0xA, mask=b"\0\0\0\0") + b"pong"
        self.assertEqual(self.handed(pong, None), [])

    def test_pong_for_pending_ping_and_pings_handed_over(self) -> None:
        """A pong for a pending ping, and every ping, go to Autobahn (it answers pings)."""
        pong = frame_header(4, 0xA, mask=b"\0\0\0\0") + b"pong"
        ping = frame_header(4, 0x9, mask=b"\0\0\0\0") + b"ping"
        self.assertEqual(self.handed(pong, b"pong"), [pong])
        self.assertEqual(self.handed(ping, None), [ping])
