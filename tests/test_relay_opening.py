"""
Connections that are not WebSockets yet (issue 15, item 2: slowloris): a
deadline from the accept, a count on /health and /metrics, the limits, and a
bounded request head, against real relay processes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.trial import unittest

from .relayprocess import poll, start_relay

#: One byte at a time, never the end of the request head.
REQUEST = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + b"X-Slow: " + b"a" * 4000
)


class Dribbler(Protocol):
    """Sends L{REQUEST} one byte every C{interval} seconds; records when it was cut."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.received = b""
        self.opened_at: float | None = None
        self.lost: Deferred[float] = Deferred()
        self._sent = 0
        self._loop = LoopingCall(self._dribble)
        self._loop.clock = reactor

    def connectionMade(self) -> None:
        self.opened_at = reactor.seconds()
        self.port = self.transport.getHost().port
        self._loop.start(self.interval)

    def _dribble(self) -> None:
        if self._sent < len(REQUEST):
            self.transport.write(REQUEST[self._sent : self._sent + 1])
            self._sent += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        if self._loop.running:
            self._loop.stop()
        self.lost.callback(reactor.seconds() - self.opened_at)


class OpeningDeadlineTests(unittest.TestCase):
    timeout = 60

    async def _dribblers(self, relay, count: int) -> list[Dribbler]:
        dribblers = []
        for _ in range(count):
            dribbler = Dribbler()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), dribbler)
            self.addCleanup(lambda d=dribbler: d.transport.abortConnection() if not d.lost.called else None)
            dribblers.append(dribbler)
        return dribblers

    async def test_dribbling_requests_are_cut(self) -> None:
        """
        20 connections sending their request a byte every 0.2 s (each byte
        would restart an idle timer) are counted while they dribble, and all
        cut within the open timeout plus a second of their accept.
        """
        relay = await start_relay(self, ["--open-timeout", "2"])
        dribblers = await self._dribblers(relay, 20)
        health = await _opening(relay, 20)
        self.assertGreaterEqual(health["opening"], 20)
        lasted = [await d.lost for d in dribblers]
        self.assertTrue(all(1.5 <= t <= 3.0 for t in lasted), lasted)
        self.assertTrue(all(d.received == b"" for d in dribblers))
        health = await relay.health()
        self.assertEqual(health["opening"], 1)  # the /health request itself
        # Nothing logged per connection, and never a client's address or port.
        self.assertNotIn("Timing out", relay.output)
        self.assertNotIn("IPv4Address", relay.output)
        for d in dribblers:
            self.assertNotIn(f"{d.port}", relay.output.split("Starting reactor")[-1])

    async def test_count_on_metrics(self) -> None:
        """The gauge pluresync_relay_opening_connections counts them too."""
        import treq

        relay = await start_relay(self, ["--open-timeout", "5"])
        await self._dribblers(relay, 3)

        async def gauge() -> float | None:
            response = await treq.get(f"http://127.0.0.1:{relay.port}/metrics".encode(), persistent=False)
            text = (await response.text()).splitlines()
            line = next(line for line in text if line.startswith("pluresync_relay_opening_connections "))
            value = float(line.split()[1])
            return value if value >= 3 else None

        self.assertGreaterEqual(await poll(gauge, timeout=3, what="the gauge counting 3"), 3)

    async def test_per_address_limit(self) -> None:
        """Connections still reading their request count against --connections-per-address."""
        relay = await start_relay(self, ["--open-timeout", "5", "--connections-per-address", "5"])
        # (a /health request would be one more from this address: none here)
        await self._dribblers(relay, 5)
        refused = Dribbler()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), refused)
        lasted = await refused.lost
        self.assertLess(lasted, 1.0)
        self.assertTrue(refused.received.startswith(b"HTTP/1.1 429 "), refused.received)
        self.assertIn(b"Retry-After: 1", refused.received)

    async def test_max_connections(self) -> None:
        """They count against --max-connections: a WebSocket upgrade is then refused with 503."""
        relay = await start_relay(self, ["--open-timeout", "5", "--max-connections", "3"])
        await self._dribblers(relay, 3)
        await _opening(relay, 3)
        answer = await _exchange(
            relay.port,
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: pluresync.v1\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)

    async def test_request_head_bounded(self) -> None:
        """A request head over 8192 bytes is answered 400 and closed at once."""
        relay = await start_relay(self)
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 200) for i in range(50))
        answer = await _exchange(relay.port, head)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)


class _Exchange(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(self.received)


async def _exchange(port: int, request: bytes) -> bytes:
    """Send C{request} on a new connection; what came back once the relay closed it."""
    exchange = _Exchange(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), exchange)
    return await exchange.lost


async def _opening(relay, count: int) -> dict:
    """Wait until /health counts at least C{count} opening connections."""

    async def check() -> dict | None:
        health = await relay.health()
        return health if health["opening"] >= count else None

    return await poll(check, timeout=3, what=f"/health counting {count} opening connections")
