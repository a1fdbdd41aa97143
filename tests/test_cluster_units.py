"""
Unit tests of the clustering pieces that need no Redis: the registry
additions (pure), the options, and the cluster link's authentication
(in-process, on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from pluresync.relay.cluster.link import LinkClient, LinkClosed, LinkServerFactory
from pluresync.relay.cluster.redisstore import RedisAddress
from pluresync.relay.cluster.service import cluster_config, default_address, read_secret
from pluresync.relay.core.pairing import ConnectorState, Registry
from pluresync.relay.core.wire import ErrorCode, ProtocolError

RDV = "ab" * 32
PEER = "cd" * 32
SECRET = b"s" * 32


class _Listener:
    def __init__(self) -> None:
        self.offers: list[tuple[str, str | None]] = []

    def incoming(self, session: str, peer: str | None) -> None:
        self.offers.append((session, peer))


class _Connector:
    def __init__(self) -> None:
        self.errors: list[ProtocolError] = []

    def failed(self, error: ProtocolError) -> None:
        self.errors.append(error)


class RegistryAdditionsTests(unittest.TestCase):
    """C{retire_listener}, C{has_listener}, C{cancel_session} of the pure registry."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.callLater)

    def test_retired_stand_in_keeps_its_offers(self) -> None:
        """
        A listener registered and retired at once gets the waiting
        connectors; their sessions stay acceptable, new connectors no
        longer see it.
        """
        connector = _Connector()
        entry = self.registry.connect(RDV, None, None, 10, connector)
        stand_in = _Listener()
        listener = self.registry.listen(RDV, PEER, stand_in)
        self.registry.retire_listener(listener)
        self.registry.retire_listener(listener)
        self.assertEqual(len(stand_in.offers), 1)
        self.assertFalse(self.registry.has_listener(RDV))
        pairing = self.registry.accept(stand_in.offers[0][0])
        self.assertIs(pairing.connector, entry)
        self.assertEqual(pairing.listener_peer, PEER)
        self.assertEqual(connector.errors, [])

    def test_has_listener(self) -> None:
        """C{has_listener} matches the rendezvous, and the peer id when given."""
        self.registry.listen(RDV, PEER, _Listener())
        self.assertTrue(self.registry.has_listener(RDV))
        self.assertTrue(self.registry.has_listener(RDV, PEER))
        self.assertFalse(self.registry.has_listener(RDV, "ee" * 32))
        self.assertFalse(self.registry.has_listener("ff" * 32))

    def test_cancel_session(self) -> None:
        """An offered connector is failed with the given code; others are untouched."""
        connector = _Connector()
        listener = _Listener()
        self.registry.listen(RDV, PEER, listener)
        entry = self.registry.connect(RDV, None, None, 10, connector)
        session = listener.offers[0][0]
        self.assertFalse(self.registry.cancel_session("00" * 16, ErrorCode.NO_LISTENER, "x"))
        self.assertTrue(self.registry.cancel_session(session, ErrorCode.NO_LISTENER, "gone"))
        self.assertIs(entry.state, ConnectorState.DONE)
        self.assertEqual([e.code for e in connector.errors], [ErrorCode.NO_LISTENER])
        self.assertEqual(self.registry.pending_count, 0)
        self.assertRaises(ProtocolError, self.registry.accept, session)


class OptionsTests(unittest.TestCase):
    """C{--redis} and the C{--cluster-*} options."""

    def secret_file(self, content: bytes = SECRET) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_full(self) -> None:
        """Every option given: parsed as is."""
        config = cluster_config("redis://10.0.0.2:6380/3", "tcp:9090", "10.0.0.5:9090", self.secret_file())
        assert config is not None
        self.assertEqual((config.redis.host, config.redis.port, config.redis.db), ("10.0.0.2", 6380, 3))
        self.assertEqual((config.listen, config.address), ("tcp:9090", "10.0.0.5:9090"))
        self.assertEqual(read_secret(config.secret_file), SECRET)

    def test_default_address(self) -> None:
        """The link address defaults to a specific C{interface=} of the listen endpoint."""
        self.assertEqual(default_address("tcp:9090:interface=10.0.0.5"), "10.0.0.5:9090")
        self.assertIsNone(default_address("tcp:9090"))
        self.assertIsNone(default_address("tcp:9090:interface=0.0.0.0"))
        config = cluster_config("redis://r", "tcp:9090:interface=10.0.0.5", None, self.secret_file())
        assert config is not None
        self.assertEqual(config.address, "10.0.0.5:9090")
        # No specific interface: the address must be given.
        self.assertRaises(ValueError, cluster_config, "redis://r", "9090", None, self.secret_file())

    def test_refused(self) -> None:
        """Missing or unusable options are refused with a reason."""
        good = self.secret_file()
        self.assertIsNone(cluster_config(None, None, None, None))
        bad = [
            (None, "tcp:9090", None, None),
            ("redis://r", "tcp:9090", "h:1", None),
            ("redis://r", None, "h:1", good),
            ("http://r", "tcp:9090", "h:1", good),
            ("redis://r", "tcp:9090", "nope", good),
        ]
        for args in bad:
            self.assertRaises(ValueError, cluster_config, *args)
        # The secret file is read when the service is made, not when the
        # options are parsed.
        for path in (self.secret_file(b"short \n"), "/nonexistent/secret"):
            self.assertRaises(ValueError, read_secret, path)

    def test_unusable_secret_file(self) -> None:
        """An unreadable or short secret stops the relay with one clear line."""
        from pluresync.relay.server.service import Options, makeService

        options = Options()
        options.parseOptions(
            [
                "--port",
                "tcp:0:interface=127.0.0.1",
                "--redis",
                "redis://127.0.0.1:1/0",
                "--cluster-listen",
                "tcp:0:interface=127.0.0.1",
                "--cluster-address",
                "127.0.0.1:1",
                "--cluster-secret-file",
                self.secret_file(b"short"),
            ]
        )
        with self.assertRaises(SystemExit) as caught:
            makeService(options)
        self.assertIn("too short", str(caught.exception))

    def test_redis_url(self) -> None:
        """User, password and database come from the URL; the password is never shown."""
        address = RedisAddress.parse("redis://u:p%40ss@redis.internal:6390/7")
        self.assertEqual(address, RedisAddress("redis.internal", 6390, 7, "p@ss", "u"))
        self.assertNotIn("p@ss", str(address))
        self.assertEqual(RedisAddress.parse("redis://h"), RedisAddress("h"))


class _FakeOwner(Protocol):
    """A link server that does not know the secret but says "ok"."""

    def connectionMade(self) -> None:
        self._send({"v": 1, "nonce": os.urandom(16).hex()})
        self.buffer = b""

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode()
        self.transport.write(struct.pack(">I", len(body)) + body)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 4 and len(self.buffer) >= 4 + struct.unpack(">I", self.buffer[:4])[0]:
            self._send({"ok": True, "peer": None, "mac": "00" * 32})


class LinkAuthenticationTests(unittest.TestCase):
    """Only instances holding the cluster secret can use a cluster link."""

    def setUp(self) -> None:
        self.claims: list[str] = []
        factory = LinkServerFactory(reactor, SECRET, 262144, self._accept)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def _accept(self, session: str, link: Any) -> Any:
        self.claims.append(session)
        raise ProtocolError(ErrorCode.NO_SESSION, "no such session")

    async def _claim(self, secret: bytes, port: int) -> Any:
        link = LinkClient(secret, reactor, 262144, "12" * 16)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), link)
        try:
            return await link.result.addTimeout(10, reactor)
        finally:
            await link.lost.addTimeout(10, reactor)

    def test_wrong_secret(self) -> Any:
        """A client with another secret is cut off before its claim reaches the relay."""

        async def run() -> None:
            with self.assertRaises(LinkClosed):
                await self._claim(b"x" * 32, self.port.getHost().port)
            self.assertEqual(self.claims, [])

        return ensureDeferred(run())

    def test_right_secret(self) -> Any:
        """With the secret the claim reaches the relay (which answers no-session here)."""

        async def run() -> None:
            with self.assertRaises(ProtocolError) as caught:
                await self._claim(SECRET, self.port.getHost().port)
            self.assertEqual(caught.exception.code, ErrorCode.NO_SESSION)
            self.assertEqual(self.claims, ["12" * 16])

        return ensureDeferred(run())

    def test_impostor_owner(self) -> Any:
        """A server that cannot prove it holds the secret is not believed."""

        async def run() -> None:
            fake = reactor.listenTCP(0, Factory.forProtocol(_FakeOwner), interface="127.0.0.1")
            self.addCleanup(fake.stopListening)
            with self.assertRaises(LinkClosed):
                await self._claim(SECRET, fake.getHost().port)

        return ensureDeferred(run())
