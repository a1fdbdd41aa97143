"""
One rule for WebSocket protocol violations in both phases of a relay socket
(issue 15, item 4; docs/protocol.md, "WebSocket protocol violations"), held
against a real relay process by raw clients: before pairing (Autobahn
parses) and after (the fast path, L{pluresync.wsframes}, parses).

 - A breach of RFC 6455 drops the TCP connection without a close frame; a
   paired partner gets 4010.
 - A client's close is answered with its own code; 1014 is a valid code.
 - After a close the relay started is answered, the relay ends TCP with a
   FIN, never a reset.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from .relayprocess import start_relay

RDV = "ab" * 32
PEER = "cd" * 32


def frame(
    payload: bytes, opcode: int = 0x2, *, fin: bool = True, rsv: int = 0, length_form: int | None = None
) -> bytes:
    """A masked client frame; C{length_form} 126 or 127 forces a longer length encoding than needed."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    form = length_form or (n if n < 126 else 126 if n < 0x10000 else 127)
    if form == 126:
        header = bytes((first, 0x80 | 126)) + struct.pack(">H", n)
    elif form == 127:
        header = bytes((first, 0x80 | 127)) + struct.pack(">Q", n)
    else:
        header = bytes((first, 0x80 | n))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(struct.pack(">H", code) + reason, 0x8)


class RawSocket(Protocol):
    """A raw WebSocket client: upgrade, then frames from the relay, parsed."""

    def __init__(self) -> None:
        self.buffer = b""
        self.upgraded: Deferred[None] = Deferred()
        self.frames: list[tuple[int, bytes]] = []
        self.lost: Deferred[Any] = Deferred()
        self._waiters: list[tuple[Any, Deferred]] = []
        self._head = True

    def connectionMade(self) -> None:
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: pluresync.v1\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self._head:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self._head = False
            assert head.startswith(b"HTTP/1.1 101"), head
            self.upgraded.callback(None)
        while len(self.buffer) >= 2:
            b0, b1 = self.buffer[0], self.buffer[1]
            n, h = b1 & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    return
                n, h = struct.unpack(">H", self.buffer[2:4])[0], 4
            elif n == 127:
                if len(self.buffer) < 10:
                    return
                n, h = struct.unpack(">Q", self.buffer[2:10])[0], 10
            if len(self.buffer) < h + n:
                return
            self.frames.append((b0 & 0x0F, self.buffer[h : h + n]))
            self.buffer = self.buffer[h + n :]
            self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            test, d = waiter
            found = next((f for f in self.frames if test(f)), None)
            if found is not None:
                self._waiters.remove(waiter)
                d.callback(found)

    def next_frame(self, test) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append((test, d))
        self._check()
        return d.addTimeout(10, reactor)

    def json(self, op: str) -> Deferred:
        return self.next_frame(lambda f: f[0] == 0x1 and json.loads(f[1]).get("op") == op).addCallback(
            lambda f: json.loads(f[1])
        )

    def close_code(self) -> int | None:
        for opcode, payload in self.frames:
            if opcode == 0x8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
        return None

    def send_json(self, obj: dict) -> None:
        self.transport.write(frame(json.dumps(obj).encode(), 0x1))

    def connectionLost(self, reason: Any) -> None:
        self.reason = reason
        self.lost.callback(None)


class ViolationTests(unittest.TestCase):
    timeout = 60

    async def _relay(self):
        if not hasattr(self, "relay"):
            self.relay = await start_relay(self)
        return self.relay

    async def _socket(self) -> RawSocket:
        relay = await self._relay()
        raw = RawSocket()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), raw)
        self.addCleanup(lambda: raw.transport.abortConnection() if not raw.lost.called else None)
        await raw.upgraded
        return raw

    async def _pair(self) -> tuple[RawSocket, RawSocket]:
        """A connector and an accept socket, paired (and the listener's control socket)."""
        rdv = os.urandom(32).hex()
        listener = await self._socket()
        listener.send_json({"v": 1, "op": "listen", "rdv": rdv, "peer": PEER})
        await listener.json("ready")
        connector = await self._socket()
        connector.send_json({"v": 1, "op": "connect", "rdv": rdv, "wait": 5})
        incoming = await listener.json("incoming")
        acceptor = await self._socket()
        acceptor.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
        await connector.json("paired")
        await acceptor.json("paired")
        return connector, acceptor

    async def _assert_dropped(self, raw: RawSocket) -> None:
        await raw.lost.addTimeout(10, reactor)
        self.assertIsNone(raw.close_code(), f"a close frame was sent: {raw.frames}")

    VIOLATIONS = {
        "reserved bit": frame(b"x", rsv=0x40),
        "reserved opcode": frame(b"x", 0x3),
        "unmasked frame": bytes((0x82, 1)) + b"x",
        "16-bit length for 5 bytes": frame(b"hello", length_form=126),
        "64-bit length for 5 bytes": frame(b"hello", length_form=127),
        "long ping": frame(b"p" * 126, 0x9),
        "fragmented ping": frame(b"p", 0x9, fin=False),
        "continuation first": frame(b"x", 0x0),
    }

    async def test_before_pairing(self) -> None:
        """Each breach, sent by a socket in its hello phase: TCP dropped, no close frame."""
        for name, data in self.VIOLATIONS.items():
            raw = await self._socket()
            raw.transport.write(data)
            try:
                await self._assert_dropped(raw)
            except Exception as e:
                raise AssertionError(f"{name}: {e}") from e

    async def test_after_pairing(self) -> None:
        """The same breaches from a paired socket: TCP dropped, no close frame; its partner gets 4010."""
        for name, data in self.VIOLATIONS.items():
            connector, acceptor = await self._pair()
            connector.transport.write(data)
            try:
                await self._assert_dropped(connector)
                code = await acceptor.next_frame(lambda f: f[0] == 0x8)
                self.assertEqual(struct.unpack(">H", code[1][:2])[0], 4010)
                # Nothing of the malformed frame was forwarded.
                self.assertEqual([f for f in acceptor.frames if f[0] == 0x2], [])
            except Exception as e:
                raise AssertionError(f"{name}: {e}") from e

    async def test_close_code_answered(self) -> None:
        """A client's close is answered with its own code, before and after pairing; 1014 is one."""
        for code in (1000, 1001, 1014, 3000, 4321):
            raw = await self._socket()
            raw.transport.write(close_frame(code, b"bye"))
            answer = await raw.next_frame(lambda f: f[0] == 0x8)
            self.assertEqual(struct.unpack(">H", answer[1][:2])[0], code)
            connector, acceptor = await self._pair()
            connector.transport.write(close_frame(code))
            answer = await connector.next_frame(lambda f: f[0] == 0x8)
            self.assertEqual(struct.unpack(">H", answer[1][:2])[0], code)

    async def test_no_reset_after_the_relays_close(self) -> None:
        """
        A close the relay starts (the partner closed with 1000), answered by
        the client: the relay then ends TCP with a FIN (ConnectionDone), not a
        reset.
        """
        connector, acceptor = await self._pair()
        acceptor.transport.write(close_frame(1000))
        answer = await connector.next_frame(lambda f: f[0] == 0x8)
        self.assertEqual(struct.unpack(">H", answer[1][:2])[0], 1000)
        connector.transport.write(close_frame(1000))
        await connector.lost.addTimeout(10, reactor)
        self.assertTrue(connector.reason.check(ConnectionDone), connector.reason)


class FrameSizeTests(unittest.TestCase):
    """
    What docs/relay.md and docs/protocol.md say of the relay's frames (issue
    15 found 131,074-byte frames where the docs said at most 64 KiB): each
    data frame is forwarded as its sender framed it, at most --max-message.
    """

    timeout = 60

    _relay = ViolationTests._relay
    _socket = ViolationTests._socket
    _pair = ViolationTests._pair

    async def test_forwarded_as_framed(self) -> None:
        connector, acceptor = await self._pair()
        message = os.urandom(131_074)
        connector.transport.write(frame(message))
        opcode, payload = await acceptor.next_frame(lambda f: f[0] == 0x2)
        self.assertEqual(payload, message)  # one frame, not re-split
        connector.transport.write(frame(b"a" * 1000, fin=False) + frame(b"b" * 10, 0x0))
        await acceptor.next_frame(lambda f: f[0] == 0x0)
        self.assertEqual([len(p) for o, p in acceptor.frames if o in (0x0, 0x2)], [131_074, 1000, 10])

    def test_docs_agree(self) -> None:
        from .relayprocess import ROOT

        relay = (ROOT / "docs" / "relay.md").read_text()
        protocol = (ROOT / "docs" / "protocol.md").read_text()
        self.assertNotIn("frames of at\nmost 64 KiB", relay)
        self.assertNotIn("64 KiB per frame", protocol)
        self.assertIn("never splitting or joining frames", protocol)
