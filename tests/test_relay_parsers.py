"""C{relay:} endpoint strings: discovery, parameters and their errors."""

from __future__ import annotations

import os

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pluresync.endpoints.parsers import RelayClientParser, RelayServerParser
from pluresync.endpoints.relay import PRESETS, RelayClientEndpoint, RelayServerEndpoint
from pluresync.keys import PeerIdentity, SyncKey


class ParserTests(SynchronousTestCase):
    """Parsing C{relay:} strings."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.key = SyncKey.generate()
        self.keyfile = self.mktemp()
        self.key.write(self.keyfile)

    def setEnvironment(self, value):
        """Set (or with C{None} remove) PLURESYNC_KEY for this test only."""
        old = os.environ.pop("PLURESYNC_KEY", None)
        if value is not None:
            os.environ["PLURESYNC_KEY"] = value
        self.addCleanup(os.environ.pop, "PLURESYNC_KEY", None)
        if old is not None:
            self.addCleanup(os.environ.__setitem__, "PLURESYNC_KEY", old)

    def client(self, description):
        return clientFromString(self.reactor, description)

    def test_plugins_found_once(self):
        """
        Twisted's plugin scan finds exactly one client and one server parser
        for relay and for auto (a generic name: nothing else may claim it).
        """
        for prefix in ("relay", "auto"):
            clients = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor) if p.prefix == prefix]
            servers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == prefix]
            self.assertEqual(len(clients), 1, prefix)
            self.assertEqual(len(servers), 1, prefix)
            self.assertTrue(clients[0].__module__.startswith("pluresync."))
            self.assertTrue(servers[0].__module__.startswith("pluresync."))
        clients = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor) if p.prefix == "relay"]
        servers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "relay"]
        self.assertTrue(verifyObject(IStreamClientEndpointStringParserWithReactor, clients[0]))
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, servers[0]))
        self.assertTrue(verifyObject(IStreamClientEndpointStringParserWithReactor, RelayClientParser()))
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, RelayServerParser()))

    def test_presets(self):
        """relay:azure and relay:vercel use the seed's relays."""
        for name, url in PRESETS.items():
            endpoint = self.client(f"relay:{name}:keyfile={self.keyfile}")
            self.assertIsInstance(endpoint, RelayClientEndpoint)
            self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
            self.assertEqual(endpoint._config.name, f"relay:{name}")
            self.assertEqual(endpoint._config.relay.host, url.split("//")[1])
            self.assertTrue(endpoint._config.relay.secure)
            self.assertEqual(endpoint._config.relay.port, 443)

    def test_url_with_escaped_colons(self):
        """url= takes a full URL with its colons escaped."""
        endpoint = self.client(f"relay:url=wss\\://relay.example.com\\:8443/r:keyfile={self.keyfile}")
        self.assertEqual(endpoint._config.relay.url, "wss://relay.example.com:8443/r")
        self.assertEqual(endpoint._config.name, "relay:relay.example.com")

    def test_preset_url_override(self):
        """url= overrides a preset's address but keeps its name."""
        endpoint = self.client(f"relay:azure:url=ws\\://127.0.0.1\\:9000:keyfile={self.keyfile}")
        self.assertEqual(endpoint._config.name, "relay:azure")
        self.assertEqual(endpoint._config.relay.url, "ws://127.0.0.1:9000/")

    def test_server(self):
        """serverFromString gives a listener endpoint with the same parameters."""
        endpoint = serverFromString(self.reactor, f"relay:vercel:keyfile={self.keyfile}:topic=notes")
        self.assertIsInstance(endpoint, RelayServerEndpoint)
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        self.assertEqual(endpoint._config.topic, self.key.topic("notes"))

    def test_parameters(self):
        """peer=, wait=, timeout=, identity= and key= are honoured."""
        peer = PeerIdentity.generate()
        identity = self.mktemp()
        endpoint = self.client(
            f"relay:azure:key={self.key.to_text()}:peer={peer.peer_id}:wait=5:timeout=7.5:identity={identity}"
        )
        config = endpoint._config
        self.assertEqual(config.peer, peer.public)
        self.assertEqual((config.wait, config.timeout), (5.0, 7.5))
        self.assertEqual(config.identity.public, PeerIdentity.from_file(identity).public)
        self.assertEqual(config.topic, self.key.topic(""))

    def test_reuse(self):
        """reuse= sets how long an idle shared session stays up; off shares nothing; a listener refuses it."""
        base = f"relay:azure:keyfile={self.keyfile}"
        default = self.client(base)._config
        self.assertEqual((default.session.share, default.session.linger), (True, 0.0))
        kept = self.client(f"{base}:reuse=30")._config
        self.assertEqual((kept.session.share, kept.session.linger), (True, 30.0))
        self.assertIsNone(self.client(f"{base}:reuse=off")._config.pool_key)
        self.assertEqual(self.client(base)._config.pool_key, self.client(base)._config.pool_key)
        self.assertNotEqual(default.pool_key, kept.pool_key)
        with self.assertRaises(ValueError) as e:
            self.client(f"{base}:reuse=soon")
        self.assertIn("reuse", str(e.exception))
        with self.assertRaises(ValueError) as e:
            serverFromString(self.reactor, f"{base}:reuse=5")
        self.assertIn("reuse=", str(e.exception))

    def test_environment_key(self):
        """Without keyfile= the PLURESYNC_KEY environment variable is used."""
        self.setEnvironment(self.keyfile)
        endpoint = self.client("relay:azure")
        self.assertEqual(endpoint._config.topic, self.key.topic(""))

    def test_unknown_parameter_is_named(self):
        """A parameter the relay endpoint does not know is a ValueError naming it."""
        with self.assertRaises(ValueError) as e:
            self.client(f"relay:azure:keyfile={self.keyfile}:bogus=1:tls=no")
        self.assertIn("bogus", str(e.exception))
        self.assertIn("tls", str(e.exception))

    def test_malformed_values(self):
        """Malformed values are ValueErrors that name the parameter."""
        cases = {
            "wait=soon": "wait",
            "timeout=-1": "timeout",
            "peer=abc": "peer",
            "ca=/nonexistent.pem": "ca",
        }
        for param, name in cases.items():
            with self.assertRaises(ValueError) as e:
                self.client(f"relay:azure:keyfile={self.keyfile}:{param}")
            self.assertIn(name, str(e.exception), param)

    def test_bad_relay(self):
        """Unknown presets, missing relays and non-WebSocket URLs are refused."""
        for description in (
            f"relay:heroku:keyfile={self.keyfile}",
            f"relay:keyfile={self.keyfile}",
            f"relay:url=http\\://example.com:keyfile={self.keyfile}",
            f"relay:url=wss\\://user\\:pw@example.com:keyfile={self.keyfile}",
        ):
            self.assertRaises(ValueError, self.client, description)

    def test_no_key(self):
        """No key anywhere is a ValueError that says how to make one."""
        self.setEnvironment(None)
        with self.assertRaises(ValueError) as e:
            self.client("relay:azure")
        self.assertIn("keygen", str(e.exception))

    def test_key_never_in_errors(self):
        """Even a malformed key= is not echoed back in the error."""
        bad = self.key.to_text()[:-3] + "zzz"
        with self.assertRaises(ValueError) as e:
            self.client(f"relay:azure:key={bad}")
        self.assertNotIn(bad[6:], str(e.exception))

    def test_ca_bundle(self):
        """ca= loads every certificate of a PEM bundle."""
        from twisted.internet.ssl import KeyPair

        pems = []
        for name in ("one", "two"):
            key = KeyPair.generate(size=2048)
            cert = key.selfSignedCert(1, commonName=name)
            pems.append(cert.dumpPEM().decode("ascii"))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("\n".join(pems))
        endpoint = self.client(f"relay:azure:keyfile={self.keyfile}:ca={path}")
        self.assertEqual(len(endpoint._config.ca), 2)
