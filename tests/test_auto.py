"""
C{auto:} on a fake clock with fake paths: the race, its errors, the path
cache, the listener over several paths, and the endpoint strings.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.address import PeerAddress
from pluresync.config import load_config
from pluresync.endpoints.auto import (
    AutoClientEndpoint,
    AutoConfig,
    AutoConnectError,
    AutoListeningPort,
    AutoServerEndpoint,
    AutoTimeoutError,
)
from pluresync.endpoints.pathcache import PathCache, network_id
from pluresync.errors import ConfigurationError
from pluresync.interfaces import IPath, IPathClient, IPathListener
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.session.params import SessionParams
from pluresync.session.wire import ReadyAnswer, Status


class FakeLink:
    """A secured link as the race and a new session see it."""

    name = "relay:fake"
    handshake_hash = b"h" * 64
    peer_static = b"\xab" * 32
    peer_id = "ab" * 32
    pipe = None
    usable = True

    def __init__(self) -> None:
        self.answer = ReadyAnswer(Status.OK, 0, SessionParams().window)
        self.owner = None
        self.used = False
        self.discarded = False
        self.records: list[bytes] = []

    def use(self) -> None:
        self.used = True

    def adopt(self, owner) -> None:
        self.owner = owner

    def sendRecord(self, plaintext) -> None:
        self.records.append(bytes(plaintext))

    def sendRecords(self, plaintexts) -> None:
        self.records.extend(bytes(p) for p in plaintexts)

    def discard(self) -> None:
        self.discarded = True

    def close(self) -> None:
        pass

    abort = close


@implementer(IPathClient)
class FakeAttempt:
    """
    One attempt; with C{complete_on_cancel} its handshake completes at the
    very moment it is cancelled (a race decided in one reactor turn).
    """

    name = "relay:fake"

    def __init__(self, complete_on_cancel: FakeLink | None = None) -> None:
        self.cancelled = False
        self.complete_on_cancel = complete_on_cancel
        self.d = Deferred(self._cancel)

    def _cancel(self, d) -> None:
        self.cancelled = True
        if self.complete_on_cancel is not None:
            d.callback(self.complete_on_cancel)

    def secure(self, hello=None) -> Deferred:
        self.hello = hello
        return self.d


@implementer(IPathListener)
class FakePort:
    def __init__(self) -> None:
        self.connected = False
        self.started = Deferred()
        self.stopped = False
        self.keep_trying = None

    def startListening(self, keep_trying: bool = False) -> Deferred:
        self.keep_trying = keep_trying
        return self.started

    def stopListening(self) -> Deferred:
        self.stopped = True
        return succeed(None)

    def getHost(self) -> PeerAddress:
        return PeerAddress("relay:fake", None)


@implementer(IPath)
class FakePath:
    """A path whose attempts the test completes by hand."""

    def __init__(self, name: str, identity: PeerIdentity) -> None:
        self.name = name
        self.identity = identity
        self.cache_key = "peer"
        self.session = SessionParams()
        self.attempts: list[FakeAttempt] = []
        self.port = FakePort()
        self.complete_on_cancel: FakeLink | None = None

    def client(self, reactor) -> FakeAttempt:
        attempt = FakeAttempt(self.complete_on_cancel)
        self.attempts.append(attempt)
        return attempt

    def listener(self, reactor, factory, sessions=None) -> FakePort:
        self.sessions = sessions
        return self.port


class FakeTests(SynchronousTestCase):
    """The fakes keep the contracts they stand in for, so the race is tested against those."""

    def test_fakes_provide_the_interfaces(self):
        """FakePath is an IPath; its client an IPathClient; its listener an IPathListener."""
        path = FakePath("relay:fake", PeerIdentity.generate())
        self.assertTrue(verifyObject(IPath, path))
        self.assertTrue(verifyObject(IPathClient, path.client(Clock())))
        self.assertTrue(verifyObject(IPathListener, path.listener(Clock(), Factory())))


class RaceTests(SynchronousTestCase):
    """The client's happy-eyeballs race."""

    def setUp(self):
        self.clock = Clock()
        identity = PeerIdentity.generate()
        self.primary = FakePath("relay:azure", identity)
        self.backup = FakePath("relay:vercel", identity)
        self.cache = PathCache(network=lambda: "home")
        self.config = AutoConfig(paths=(self.primary, self.backup), delay=0.5, timeout=10.0, cache=self.cache)
        self.factory = Factory.forProtocol(Protocol)

    def connect(self) -> Deferred:
        endpoint = AutoClientEndpoint(self.clock, self.config)
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
        return endpoint.connect(self.factory)

    def test_first_path_wins_alone(self):
        """A primary that connects before the head start ends the race; the backup never starts."""
        d = self.connect()
        self.assertEqual(len(self.backup.attempts), 0)
        link = FakeLink()
        self.primary.attempts[0].d.callback(link)
        protocol = self.successResultOf(d)
        self.assertTrue(link.used)
        self.assertIs(link.owner, protocol.transport.session)
        protocol.transport.abortConnection()
        self.clock.advance(1)
        self.assertEqual(len(self.backup.attempts), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backup_after_head_start(self):
        """A silent primary lets the backup start after the delay; the backup's win cancels the primary."""
        d = self.connect()
        self.clock.advance(0.49)
        self.assertEqual(len(self.backup.attempts), 0)
        self.clock.advance(0.02)
        self.assertEqual(len(self.backup.attempts), 1)
        self.backup.attempts[0].d.callback(FakeLink())
        self.successResultOf(d).transport.abortConnection()
        self.assertTrue(self.primary.attempts[0].cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused_primary_hands_over_at_once(self):
        """A primary that fails starts the backup without waiting for the head start."""
        d = self.connect()
        self.primary.attempts[0].d.errback(ConnectionRefusedError())
        self.assertEqual(len(self.backup.attempts), 1)
        self.assertEqual(self.clock.seconds(), 0)
        self.backup.attempts[0].d.callback(FakeLink())
        self.successResultOf(d)

    def test_late_winner_is_discarded(self):
        """
        A path whose handshake completes as it is being cancelled (the
        winner was decided in the same turn) has its channel discarded:
        closed with CLOSE, never attached.
        """
        late = FakeLink()
        self.primary.complete_on_cancel = late
        d = self.connect()
        self.clock.advance(0.5)
        self.backup.attempts[0].d.callback(FakeLink())
        self.successResultOf(d)
        self.assertTrue(late.discarded)
        self.assertFalse(late.used)

    def test_all_fail(self):
        """When every path fails, one error lists each and why, in order."""
        d = self.connect()
        self.primary.attempts[0].d.errback(ConnectionRefusedError("primary down"))
        self.backup.attempts[0].d.errback(Failure(ValueError("backup broken")))
        failure = self.failureResultOf(d, AutoConnectError)
        self.assertEqual([name for name, _ in failure.value.attempts], ["relay:azure", "relay:vercel"])
        self.assertIn("relay:azure: Connection was refused", str(failure.value))
        self.assertIn("relay:vercel: backup broken", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self):
        """The total timeout ends the race with AutoTimeoutError; every attempt is cancelled."""
        d = self.connect()
        self.clock.advance(9.99)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        failure = self.failureResultOf(d, AutoTimeoutError)
        self.assertIn("no path connected within 10 s", str(failure.value))
        self.assertIn("relay:vercel: no answer within 10 s", str(failure.value))
        self.assertTrue(all(a.cancelled for a in self.primary.attempts + self.backup.attempts))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self):
        """Cancelling the race cancels every attempt and gives ConnectingCancelledError."""
        d = self.connect()
        self.clock.advance(0.5)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertTrue(self.primary.attempts[0].cancelled and self.backup.attempts[0].cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_winner_remembered(self):
        """The next race starts with the last winner on this network, until the entry expires."""
        d = self.connect()
        self.clock.advance(0.5)
        self.backup.attempts[0].d.callback(FakeLink())
        self.successResultOf(d)
        self.connect()
        self.assertEqual((len(self.primary.attempts), len(self.backup.attempts)), (1, 2))
        self.backup.attempts[1].d.callback(FakeLink())
        self.clock.advance(self.cache.ttl + 1)
        self.connect()
        self.assertEqual(len(self.primary.attempts), 2)

    def test_cache_is_per_network(self):
        """Another network does not inherit the winner."""
        self.cache.remember("relay:vercel", "peer", 0)
        self.cache.network = lambda: "office"
        self.assertEqual(self.cache.order(["relay:azure", "relay:vercel"], "peer", 1), ["relay:azure", "relay:vercel"])


class NetworkIdTests(SynchronousTestCase):
    """The network name the cache is keyed by."""

    def test_default_route(self):
        """The default route's interface and gateway name the network."""
        table = self.mktemp()
        with open(table, "w") as f:
            f.write("Iface\tDestination\tGateway\neth0\t0000FEA9\t00000000\nwlan0\t00000000\t0102A8C0\n")
        from pathlib import Path

        self.assertEqual(network_id(Path(table)), "wlan0/0102A8C0")
        self.assertEqual(network_id(Path("/nonexistent")), "unknown")


class ListenerTests(SynchronousTestCase):
    """One listener over every path."""

    def setUp(self):
        identity = PeerIdentity.generate()
        self.paths = (FakePath("relay:azure", identity), FakePath("relay:vercel", identity))
        config = AutoConfig(paths=self.paths, cache=PathCache())
        self.endpoint = AutoServerEndpoint(Clock(), config)
        self.assertTrue(verifyObject(IStreamServerEndpoint, self.endpoint))

    def test_up_when_any_path_is(self):
        """listen() fires when the first path registers; the others keep trying."""
        d = self.endpoint.listen(Factory())
        self.assertTrue(all(p.port.keep_trying for p in self.paths))
        self.paths[0].port.started.errback(ConnectionRefusedError())
        self.assertNoResult(d)
        self.paths[1].port.connected = True
        self.paths[1].port.started.callback(None)
        port = self.successResultOf(d)
        self.assertIsInstance(port, AutoListeningPort)
        self.assertTrue(verifyObject(IListeningPort, port))
        self.assertEqual(port.transports, {"relay:azure": False, "relay:vercel": True})
        self.successResultOf(port.stopListening())
        self.assertTrue(all(p.port.stopped for p in self.paths))

    def test_fails_when_every_path_does(self):
        """If no path registers, listen() fails naming each, and stops them all."""
        d = self.endpoint.listen(Factory())
        for path in self.paths:
            path.port.started.errback(ConnectionRefusedError())
        failure = self.failureResultOf(d, AutoConnectError)
        self.assertIn("could not listen on any path", str(failure.value))
        self.assertTrue(all(p.port.stopped for p in self.paths))


class AutoStringTests(SynchronousTestCase):
    """auto: endpoint strings and the seed config."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.key = SyncKey.generate()
        self.keyfile = self.mktemp()
        self.key.write(self.keyfile)

    def config_file(self, **fields) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(fields, f)
        return path

    def test_defaults(self):
        """auto: races azure then vercel, one identity for both, default delay and timeout."""
        import os

        os.environ["PLURESYNC_KEY"] = self.keyfile
        self.addCleanup(os.environ.pop, "PLURESYNC_KEY", None)
        self.assertEqual(len(clientFromString(self.reactor, "auto:")._config.paths), 3)
        endpoint = clientFromString(self.reactor, f"auto:keyfile={self.keyfile}")
        config = endpoint._config
        # The LAN path first (tests/test_direct_endpoints.py), then the relays.
        self.assertEqual([p.name for p in config.paths], ["direct:lan", "relay:azure", "relay:vercel"])
        self.assertEqual(len({p.identity.public for p in config.paths}), 1)
        self.assertEqual((config.delay, config.timeout), (0.5, 30.0))

    def test_parameters(self):
        """azure=, vercel=, relays=, delay=, timeout= are honoured."""
        endpoint = clientFromString(
            self.reactor,
            f"auto:keyfile={self.keyfile}:azure=ws\\://127.0.0.1\\:1:vercel=ws\\://127.0.0.1\\:2"
            ":relays=vercel,azure:delay=0.1:timeout=5:direct=off",
        )
        config = endpoint._config
        self.assertEqual([p.relay.port for p in config.paths], [2, 1])
        self.assertEqual((config.delay, config.timeout), (0.1, 5.0))

    def test_seed_config(self):
        """config= reads the seed's JSON; the string's own parameters win over it."""
        path = self.config_file(
            syncTransport="auto",
            syncRelay="ws://127.0.0.1:7001",
            syncRelayFallback="ws://127.0.0.1:7002",
            syncKey=self.key.to_text(),
            connectionTimeoutMs=12000,
        )
        config = clientFromString(self.reactor, f"auto:config={path}:direct=off")._config
        self.assertEqual([p.relay.port for p in config.paths], [7001, 7002])
        self.assertEqual(config.timeout, 12.0)
        self.assertEqual(config.paths[0].topic, self.key.topic())
        config = clientFromString(
            self.reactor, f"auto:config={path}:azure=ws\\://127.0.0.1\\:9:timeout=3:direct=off"
        )._config
        self.assertEqual((config.paths[0].relay.port, config.timeout), (9, 3.0))

    def test_environment_under_config(self):
        """PLURESYNC_RELAY fills only what neither the string nor the file says."""
        import os

        os.environ["PLURESYNC_RELAY"] = "ws://127.0.0.1:7777"
        self.addCleanup(os.environ.pop, "PLURESYNC_RELAY", None)
        config = clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:direct=off")._config
        self.assertEqual(config.paths[0].relay.port, 7777)
        path = self.config_file(syncRelay="ws://127.0.0.1:7001", syncDirect=False)
        config = clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:config={path}")._config
        self.assertEqual(config.paths[0].relay.port, 7001)

    def test_create_transport_kwargs(self):
        """load_config() gives create_transport's keyword arguments."""
        path = self.config_file(syncTransport="vercel-relay", syncRelayFallback="wss://b", connectionTimeoutMs=500)
        self.assertEqual(
            load_config(path, environ={}),
            {"mode": "vercel-relay", "vercel_relay_url": "wss://b", "connection_timeout": 0.5},
        )

    def test_bad_config(self):
        """Config errors name the file and field."""
        for content, needle in (
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            ('{"syncTransport": "carrier-pigeon"}', "syncTransport"),
            ('{"connectionTimeoutMs": "soon"}', "connectionTimeoutMs"),
        ):
            path = self.mktemp()
            with open(path, "w") as f:
                f.write(content)
            with self.assertRaises(ConfigurationError) as e:
                clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:config={path}")
            self.assertIn(needle, str(e.exception))

    def test_refusals(self):
        """Unknown parameters, bad relays= and client-only parameters on a listener are refused."""
        for description in (
            f"auto:keyfile={self.keyfile}:url=ws\\://x",
            f"auto:keyfile={self.keyfile}:relays=azure,heroku",
            f"auto:keyfile={self.keyfile}:relays=azure,azure",
            f"auto:keyfile={self.keyfile}:delay=-1",
        ):
            self.assertRaises(ConfigurationError, clientFromString, self.reactor, description)
        with self.assertRaises(ConfigurationError) as e:
            serverFromString(self.reactor, f"auto:keyfile={self.keyfile}:peer={'ab' * 32}")
        self.assertIn("peer=", str(e.exception))
