"""
Whole programs over C{relay:}: the README's quickstart, and Twisted's own
C{twist web}, both as real processes talking through a real relay.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from pluresync.keys import SyncKey

from .localrelay import LocalRelay
from .processes import ROOT, spawn


class _RelayEndpoints:
    """An Agent endpoint factory: every URL goes to the peer behind the relay."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.connected: list = []

    def endpointForURI(self, uri):
        return _Recorded(clientFromString(reactor, self.description), self.connected)


class _Recorded:
    """A client endpoint that remembers the transports it connected."""

    def __init__(self, endpoint, connected: list) -> None:
        self._endpoint = endpoint
        self._connected = connected

    def connect(self, factory):
        return self._endpoint.connect(factory).addCallback(self._record)

    def _record(self, protocol):
        self._connected.append(protocol.transport)
        return protocol


class ProgramTests(TestCase):
    timeout = 60

    def setUp(self):
        self.relay = LocalRelay(self)
        self.keyfile = str(Path(self.mktemp()).resolve())
        SyncKey.generate().write(self.keyfile)
        url = self.relay.url.replace(":", "\\:")
        self.description = f"relay:url={url}:keyfile={self.keyfile}"

    async def test_quickstart(self):
        """The README's quickstart, as two processes, prints the peer's answer."""
        readme = (ROOT / "README.md").read_text()
        example = (ROOT / "docs" / "examples" / "quickstart.py").read_text()
        self.assertIn(example, readme)
        env = {"RELAY": self.description}
        listener = spawn(self, ["docs/examples/quickstart.py", "listen"], b"listening", env)
        await listener.ready
        connector = spawn(self, ["docs/examples/quickstart.py", "connect"], env=env)
        self.assertEqual(await connector.ended, 0, connector.err.decode()[-2000:])
        self.assertEqual(connector.out.strip(), b"HELLO, PEER")

    async def test_twist_web_over_relay(self):
        """
        `twist web --listen relay:...` serves files, unmodified, to Twisted's
        HTTP client connecting through `relay:`.
        """
        site = Path(self.mktemp()).resolve()
        site.mkdir()
        (site / "hello.txt").write_bytes(b"served through an end-to-end encrypted relay\n")
        spawn(self, ["-m", "twisted", "web", "--listen", self.description, "--path", str(site)])
        # wait=20: the relay holds us until the twist process has registered.
        pool = HTTPConnectionPool(reactor, persistent=False)
        endpoints = _RelayEndpoints(self.description + ":wait=20")
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool)
        response = await agent.request(b"GET", b"http://peer/hello.txt")
        self.assertEqual(response.code, 200)
        self.assertEqual(await readBody(response), b"served through an end-to-end encrypted relay\n")
        response = await agent.request(b"GET", b"http://peer/missing")
        self.assertEqual(response.code, 404)
        await readBody(response)
        # Each connection closes once the server confirmed it (not before).
        for transport in endpoints.connected:
            await transport.session.whenEnded()
