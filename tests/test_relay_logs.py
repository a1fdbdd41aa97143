"""
The relay never logs a client's address or port, not even in Autobahn's or
twisted.web's own lines (issue 15, item 4), with real relay processes.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from pluresync.relay.server.logpolicy import scrub

from .relayprocess import poll, start_relay

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: pluresync.v1\r\n"
)


class _Exchange(Protocol):
    def __init__(self, request: bytes, then: bytes = b"") -> None:
        self.request = request
        self.then = then
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.port = self.transport.getHost().port
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.then and b"\r\n\r\n" in self.received:
            self.transport.write(self.then)
            self.then = b""

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(self.received)


async def _exchange(port: int, request: bytes, then: bytes = b"") -> _Exchange:
    exchange = _Exchange(request, then)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), exchange)
    await exchange.lost
    return exchange


class NoClientAddressTests(unittest.TestCase):
    timeout = 60

    def _assert_no_address(self, relay, exchanges: list[_Exchange]) -> None:
        logged = relay.output.split("Starting reactor", 1)[-1]
        self.assertNotIn("127.0.0.1", logged)
        for exchange in exchanges:
            self.assertNotIn(str(exchange.port), logged)

    async def test_refused_token(self) -> None:
        """Upgrades refused for a missing or unknown token log their reason, never the client."""
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        secret = work / "relay.secret"
        secret.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        secret.chmod(0o600)
        relay = await start_relay(self, ["--auth", "signed", "--auth-secret-file", str(secret)])
        missing = await _exchange(relay.port, UPGRADE + b"\r\n")
        unknown = await _exchange(relay.port, UPGRADE + b"Authorization: Bearer psrt1.nope\r\n\r\n")
        self.assertTrue(missing.received.startswith(b"HTTP/1.1 401"), missing.received)
        await poll(lambda: "refused upgrade" in relay.output, timeout=3, what="the refusal logged")
        self._assert_no_address(relay, [missing, unknown])

    async def test_protocol_violation_and_timeouts(self) -> None:
        """A client that breaks the WebSocket protocol, and one too slow for the hello, stay anonymous."""
        relay = await start_relay(self, ["--hello-timeout", "0.5", "--open-timeout", "1"])
        # An unmasked client frame: Autobahn drops the connection and says so.
        violation = await _exchange(relay.port, UPGRADE + b"\r\n", then=b"\x81\x02hi")
        silent = await _exchange(relay.port, UPGRADE + b"\r\n")
        slow = await _exchange(relay.port, b"GET / HTT")
        await poll(lambda: "dropping connection" in relay.output, timeout=3, what="Autobahn's drop logged")
        self._assert_no_address(relay, [violation, silent, slow])


class ScrubTests(unittest.TestCase):
    def test_addresses(self) -> None:
        for text in (
            "dropping connection to peer tcp:203.0.113.7:51234 with abort=True",
            "Timing out client: IPv4Address(type='TCP', host='203.0.113.7', port=51234)",
            "peer tcp6:[2001:db8::1]:443 went away",
            "from 203.0.113.7:51234",
        ):
            self.assertNotIn("203.0.113.7", scrub(text))
            self.assertNotIn("2001:db8", scrub(text))
            self.assertNotIn("51234", scrub(text))
