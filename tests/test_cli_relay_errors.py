"""
What the `pluresync` command prints when the relay refuses it or is not a
relay at all (issue 15, item 4): one clear line, no Autobahn warning
before it, and "this is not a pluresync relay" where so.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from .processes import spawn
from .relayprocess import escaped_url, start_relay


class _HTTP10(Protocol):
    """A web server that is no relay: HTTP/1.0, a page, then the end."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hello</html>")
            self.transport.loseConnection()


class CommandLineRelayErrorTests(TestCase):
    timeout = 60

    async def run_connect(self, url: str) -> str:
        home = Path(self.mktemp()).resolve()
        home.mkdir(parents=True)
        key = spawn(self, ["-m", "pluresync", "keygen", "--out", str(home / "k.key")])
        self.assertEqual(await key.ended, 0)
        child = spawn(
            self,
            ["-m", "pluresync", "connect", f"relay:url={url}:keyfile={home / 'k.key'}:timeout=10:wait=0"],
            env={"PLURESYNC_HOME": str(home)},
        )
        self.assertEqual(await child.ended, 1)
        lines = child.err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, child.err.decode())
        self.assertTrue(lines[0].startswith("pluresync: error: "), lines)
        return lines[0]

    async def test_not_a_relay(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(_HTTP10), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        line = await self.run_connect(escaped_url(port.getHost().port))
        self.assertIn("this is not a pluresync relay", line)
        self.assertIn("HTTP 200 OK instead of the WebSocket upgrade", line)

    async def test_unauthorized(self) -> None:
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        secret = work / "relay.secret"
        secret.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        secret.chmod(0o600)
        relay = await start_relay(self, ["--auth", "signed", "--auth-secret-file", str(secret)])
        line = await self.run_connect(relay.escaped_url)
        self.assertIn("requires a relay token and none was given (HTTP 401 (missing))", line)
