"""
A session that starts over one path moves to a direct QUIC path and back
(L{pluresync.direct.upgrade}), on 127.0.0.1 with real sockets: a TCP pipe
stands in for the relay's WebSocket (the session does not tell them apart),
and the direct path is punched and carried over real UDP.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.direct.signal import DirectOffer, FailReason, NatClass, encode_failed
from pluresync.direct.upgrade import PATH_NAME, DirectParams, DirectUpgrade
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.pipes.quic import QuicParams
from pluresync.pipes.tcp import connect_tcp_pipe, listen_tcp_pipes
from pluresync.secure.establish import secure_link
from pluresync.session import attach
from pluresync.session.params import SessionParams
from pluresync.session.session import IControlReceiver, new_hello
from pluresync.session.wire import ControlKind

MiB = 1 << 20
#: every wait here is bounded by trial's own timeout too
FAST = DirectParams(
    hosts=("127.0.0.1",),
    interface="127.0.0.1",
    first=0.05,
    retry=0.2,
    timeout=10.0,
    punch=5.0,
    quic=QuicParams(idle_timeout=5.0, handshake_timeout=5.0),
)


class Sink(Protocol):
    """Hashes what arrives; fires C{done} at C{expected} bytes or at the end."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.digest = hashlib.sha256()
        self.count = 0
        self.done: Deferred = Deferred()
        self.lost = None
        self.made = 0

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)
        if self.count >= self.expected and not self.done.called:
            self.done.callback(self.count)

    def connectionLost(self, reason) -> None:
        self.lost = reason
        if not self.done.called:
            self.done.callback(self.count)


@implementer(IPushProducer)
class Source(Protocol):
    """Writes C{size} pseudo-random bytes in 64 KiB writes as a streaming producer, hashing them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.paused = True
        self.digest = hashlib.sha256()
        self.block = os.urandom(64 * 1024)

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.size:
            block = self.block[: self.size - self.sent]
            self.digest.update(block)
            self.transport.write(block)
            self.sent += len(block)
        if self.sent >= self.size:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.paused = True


class Pair:
    """A client and a listener whose sessions look for a direct path, over a TCP "relay" on 127.0.0.1."""

    def __init__(self, test: TestCase, size: int, params: DirectParams = FAST) -> None:
        self.test = test
        self.key = SyncKey.generate()
        self.topic = self.key.topic("upgrade")
        self.client_id, self.server_id = PeerIdentity.generate(), PeerIdentity.generate()
        self.session_params = SessionParams(direct=True, stall=1.0)
        self.params = params
        self.sink = Sink(size)
        self.source = Source(size)
        self.upgrades: list[DirectUpgrade] = []
        self.sessions: list = []
        self.relay_pipes: list = []

    def _upgrade(self, identity, side: str):
        def on_session(session):
            self.sessions.append(session)
            setattr(self, side, session)
            upgrade = DirectUpgrade(reactor, session, self.params, identity=identity, topic=self.topic)
            self.upgrades.append(upgrade)
            self.test.addCleanup(upgrade.stop)

        return on_session

    async def start(self):
        table = attach.SessionTable(
            reactor,
            Factory.forProtocol(lambda: self.sink),
            self.session_params,
            self.server_id.peer_id,
            on_session=self._upgrade(self.server_id, "server"),
        )

        def accepted(pipe):
            self.relay_pipes.append(pipe)
            d = secure_link(
                pipe.attach,
                initiator=False,
                name="relay:test",
                identity=self.server_id,
                topic=self.topic,
                resolver=table.resolve,
            )
            d.addCallback(table.accept)
            d.addErrback(lambda f: None)  # a refused or raced link: the session hears of it

        self.port = await listen_tcp_pipes(reactor, accepted, interface="127.0.0.1")
        self.test.addCleanup(self.port.stopListening)
        link = await self.secure(lambda: new_hello(self.session_params))
        protocol = attach.connect(
            link,
            Factory.forProtocol(lambda: self.source),
            clock=reactor,
            params=self.session_params,
            local_id=self.client_id.peer_id,
            reconnect=self.secure,
            on_session=self._upgrade(self.client_id, "client"),
        )
        self.test.addCleanup(self.abort)
        await until(lambda: hasattr(self, "server"))
        return protocol

    def secure(self, hello):
        address = IPv4Address("TCP", "127.0.0.1", self.port.getHost().port)

        def connected(pipe):
            self.relay_pipes.append(pipe)
            return secure_link(
                pipe.attach,
                initiator=True,
                name="relay:test",
                identity=self.client_id,
                topic=self.topic,
                expected_peer=self.server_id.public,
                hello=hello,
            )

        return connect_tcp_pipe(reactor, address, name="relay:test").addCallback(connected)

    def abort(self):
        for session in self.sessions:
            session.abort()
        return DeferredList([s.whenEnded() for s in self.sessions], consumeErrors=True)


async def until(predicate, seconds: float = 10.0, step: float = 0.02) -> None:
    """Wait (bounded) for a condition the reactor will make true; fails the test if it does not."""
    for _ in range(int(seconds / step)):
        if predicate():
            return
        d = Deferred()
        reactor.callLater(step, d.callback, None)
        await d
    raise AssertionError(f"not true after {seconds} s: {predicate}")


class UpgradeTests(TestCase):
    timeout = 60

    async def test_moves_to_direct_and_keeps_every_byte(self):
        """
        A 16 MiB stream that starts on the "relay" moves to a direct QUIC
        path on its own: every byte once and in order, one connection at
        the receiving protocol, the relay link retired.
        """
        pair = Pair(self, 16 * MiB)
        await pair.start()
        client, server = pair.client, pair.server
        await until(lambda: client.path == PATH_NAME and server.path == PATH_NAME)
        self.assertEqual(pair.upgrades[0].successes + pair.upgrades[1].successes, 2)
        pair.source.start()
        received = await pair.sink.done
        self.assertEqual(received, 16 * MiB)
        self.assertEqual(pair.sink.digest.hexdigest(), pair.source.digest.hexdigest())
        self.assertEqual(pair.sink.made, 1)
        self.assertGreaterEqual(client.swaps, 1)
        # The relay link drained and was retired: no TCP pipe stays open.
        await until(lambda: all(not p.transport or p.transport.disconnected for p in pair.relay_pipes))

    async def test_moves_mid_stream(self):
        """Bytes already flowing over the relay move with the session, none lost or doubled."""
        pair = Pair(self, 32 * MiB, DirectParams(**{**FAST.__dict__, "first": 0.3}))
        await pair.start()
        pair.source.start()
        received = await pair.sink.done
        self.assertEqual(received, 32 * MiB)
        self.assertEqual(pair.sink.digest.hexdigest(), pair.source.digest.hexdigest())
        self.assertEqual(pair.sink.made, 1)

    async def test_falls_back_when_direct_dies_and_comes_back(self):
        """
        The direct pipe dies (its UDP socket closes): the session resumes
        over the relay, then moves to a new direct path again.
        """
        pair = Pair(self, 1)
        await pair.start()
        client = pair.client
        await until(lambda: client.path == PATH_NAME)
        swaps = client.swaps
        # Kill the direct path under both sides (the link's pipe aborts).
        for session in pair.sessions:
            for link in session.links:
                if link.name == PATH_NAME:
                    link.abort()
        await until(lambda: client.path == "relay:test")
        await until(lambda: client.path == PATH_NAME and client.swaps >= swaps + 2)
        # The listener's side records its success once the initiator has chosen the link.
        await until(lambda: min(u.successes for u in pair.upgrades) >= 2)
        pair.source.start()
        self.assertEqual(await pair.sink.done, 1)

    async def test_no_direct_without_the_peers_consent(self):
        """A peer that did not set caps bit 1 is never offered a direct path."""
        pair = Pair(self, 1)
        pair.session_params = SessionParams(direct=False)
        await pair.start()
        client = pair.client
        [upgrade] = [u for u in pair.upgrades if u._session is client]
        # Its first attempt falls due (first=0.05 s), finds no consent, and
        # schedules nothing more: no offer, no retry.
        await until(lambda: upgrade._call is None)
        self.assertIsNone(upgrade._running)
        self.assertEqual(client.path, "relay:test")
        self.assertEqual(upgrade.successes + upgrade.failures, 0)

    async def test_a_peer_that_never_answers(self):
        """
        A peer that hears the offer and says nothing (gone mid-attempt): the
        attempt gives up at its limit, the session stays where it was, and
        a later attempt is scheduled.
        """
        pair = Pair(self, 1, DirectParams(**{**FAST.__dict__, "timeout": 0.5, "retry": 30.0}))
        await pair.start()
        server_upgrade = pair.upgrades[1]
        server_upgrade.controlReceived = lambda kind, body: None  # deaf
        client_upgrade = pair.upgrades[0]
        await until(lambda: client_upgrade.failures == 1)
        self.assertIn("gave up after 0.5 s", client_upgrade.last_error)
        self.assertEqual(pair.client.path, "relay:test")
        self.assertTrue(client_upgrade._call is not None and client_upgrade._call.active())
        pair.source.start()
        self.assertEqual(await pair.sink.done, 1)

    async def test_a_malformed_offer_breaks_the_session_protocol(self):
        """An offer that is not one ends the session as a protocol error (it was authenticated: the peer sent it)."""
        pair = Pair(self, 1, DirectParams(**{**FAST.__dict__, "first": 30.0}))
        await pair.start()
        pair.client.sendControl(ControlKind.DIRECT_OFFER, b"not an offer")
        await pair.sink.done
        self.assertIn("broke the session protocol", str(pair.sink.lost.value))

    async def test_an_answer_to_another_attempt_is_ignored(self):
        """A late or forged answer naming an attempt not in flight changes nothing."""
        pair = Pair(self, 1, DirectParams(**{**FAST.__dict__, "first": 30.0}))
        await pair.start()
        stray = DirectOffer(99, NatClass.CONE, bytes(32), bytes(32), ())
        pair.server.sendControl(ControlKind.DIRECT_ANSWER, stray.encode())
        pair.server.sendControl(ControlKind.DIRECT_FAILED, encode_failed(99, FailReason.BUSY))
        pair.source.start()
        self.assertEqual(await pair.sink.done, 1)
        self.assertIsNone(pair.sink.lost)
        self.assertEqual(pair.upgrades[0].failures, 0)

    def test_interface(self):
        session = type("S", (), {"signals": None, "initiator": False, "whenEnded": lambda self: Deferred()})()
        upgrade = DirectUpgrade(reactor, session, FAST, identity=PeerIdentity.generate(), topic=None)
        verifyObject(IControlReceiver, upgrade)
        upgrade.stop()


class AutoConfigTests(TestCase):
    """How an C{auto:} string turns the upgrade on, off, and where it asks for its public address."""

    KEY = SyncKey.generate().to_text()

    def test_on_by_default_with_the_extra(self):
        from pluresync.endpoints.parsers import auto_config

        config = auto_config(key=self.KEY)
        self.assertEqual(config.upgrade, DirectParams())
        self.assertTrue(config.session.direct)
        self.assertIsNotNone(config.on_session(reactor))

    def test_off(self):
        from pluresync.endpoints.parsers import auto_config

        config = auto_config(key=self.KEY, direct="off")
        self.assertIsNone(config.upgrade)
        self.assertFalse(config.session.direct)
        self.assertIsNone(config.on_session(reactor))

    def test_stun_servers(self):
        from pluresync.endpoints.parsers import auto_config

        config = auto_config(key=self.KEY, stun="relay.example.com:3478, 192.0.2.1:3479")
        self.assertEqual(config.upgrade.stun, (("relay.example.com", 3478), ("192.0.2.1", 3479)))
        self.assertEqual(auto_config(key=self.KEY, stun="none").upgrade.stun, ())

    def test_bad_stun(self):
        from pluresync.endpoints.parsers import auto_config
        from pluresync.errors import ConfigurationError

        for value in ("relay.example.com", "host:0", "host:99999", ":3478"):
            with self.assertRaises(ConfigurationError) as caught:
                auto_config(key=self.KEY, stun=value)
            self.assertIn("stun=", str(caught.exception))
        with self.assertRaises(ConfigurationError) as caught:
            auto_config(key=self.KEY, stun="host:3478", direct="off")
        self.assertIn("direct=off", str(caught.exception))


class DirectOnlyTests(TestCase):
    """
    C{direct:} with C{relay=}: the relay only introduces the peers; the
    application sees the connection once a direct path carries it, or a
    clear error. A real relay on 127.0.0.1; the LAN path is left out, so
    what carries the stream is the punched UDP path.
    """

    timeout = 60

    def config(self, relay, key, identity, params: DirectParams):
        from dataclasses import replace

        from pluresync.endpoints.auto import AutoConfig
        from pluresync.endpoints.parsers import relay_config

        path = relay_config(url=relay.url, key=key.to_text(), timeout="10")
        path = replace(path, identity=identity, session=SessionParams(direct=True))
        return AutoConfig(paths=(path,), delay=0.5, timeout=10.0, upgrade=params, direct_only=True)

    async def pair(self, params: DirectParams):
        from pluresync.endpoints.auto import AutoClientEndpoint, AutoServerEndpoint

        # Keep every upgrade made, to wait for its sockets at the end.
        self.made = []
        made = self.made
        original = DirectUpgrade.__init__

        def recording(upgrade, *args, **kwargs):
            original(upgrade, *args, **kwargs)
            made.append(upgrade)

        self.patch(DirectUpgrade, "__init__", recording)

        from .localrelay import LocalRelay

        relay = LocalRelay(self)
        key = SyncKey.generate()
        self.sink = Sink(4 * MiB)
        listening = await AutoServerEndpoint(reactor, self.config(relay, key, PeerIdentity.generate(), params)).listen(
            Factory.forProtocol(lambda: self.sink)
        )
        self.addCleanup(listening.stopListening)
        source = Source(4 * MiB)
        client = AutoClientEndpoint(reactor, self.config(relay, key, PeerIdentity.generate(), params))
        return relay, client, source

    async def test_the_application_sees_only_the_direct_path(self):
        """connect() fires once the session runs direct; every byte then goes direct, none through the relay."""
        relay, client, source = await self.pair(DirectParams(**{**FAST.__dict__, "required": True}))
        protocol = await client.connect(Factory.forProtocol(lambda: source))
        self.assertIs(protocol, source)
        self.assertEqual(source.transport.getPeer().transport, PATH_NAME)
        relayed = len(relay.tapped)
        source.start()
        self.assertEqual(await self.sink.done, 4 * MiB)
        self.assertEqual(self.sink.digest.hexdigest(), source.digest.hexdigest())
        self.assertEqual(self.sink.made, 1)
        self.assertEqual(self.sink.transport.getPeer().transport, PATH_NAME)
        self.assertLess(len(relay.tapped) - relayed, 64 * 1024, "the stream's bytes went through the relay")
        await self.teardown(source.transport.session, self.sink.transport.session)

    async def teardown(self, *sessions):
        """End both sessions and wait until their direct paths let go of every socket and timer."""
        for session in sessions:
            session.abort()
        await DeferredList([s.whenEnded() for s in sessions], consumeErrors=True)
        await DeferredList([s_upgrade.stop() for s_upgrade in self.upgrades(sessions)], consumeErrors=True)

    def upgrades(self, sessions):
        return self.made

    @property
    def live(self):
        """Upgrades whose session has not ended yet."""
        from pluresync.session.session import Phase

        return [u for u in self.made if u._session.phase is not Phase.ENDED]

    async def test_no_direct_path_is_an_error_not_the_relay(self):
        """
        Where no direct path opens (here: each side offers an address where
        nobody listens, 127.0.0.2: a candidate list that lies), connect() fails with
        why, nothing is built, and nothing is left running.
        """
        params = DirectParams(
            **{**FAST.__dict__, "hosts": ("127.0.0.2",), "punch": 1.0, "timeout": 5.0, "required": True}
        )
        relay, client, source = await self.pair(params)
        from pluresync.errors import DirectPathError

        with self.assertRaises(DirectPathError) as caught:
            await client.connect(Factory.forProtocol(lambda: source))
        self.assertIn("no direct path to the peer", str(caught.exception))
        self.assertEqual(self.sink.made, 0)
        await until(lambda: not self.live)
        await DeferredList([upgrade.stop() for upgrade in self.made], consumeErrors=True)


class DirectRelayParserTests(TestCase):
    """direct:...:relay= builds an auto: of the LAN and that relay whose sessions must go direct."""

    KEY = SyncKey.generate().to_text()

    def test_client_and_server(self):
        from twisted.internet.endpoints import clientFromString, serverFromString

        from pluresync.endpoints.auto import AutoClientEndpoint, AutoServerEndpoint

        client = clientFromString(reactor, f"direct:key={self.KEY}:relay=azure:stun=192.0.2.7\\:3478")
        self.assertIsInstance(client, AutoClientEndpoint)
        config = client._config
        self.assertTrue(config.direct_only)
        self.assertTrue(config.upgrade.required)
        self.assertEqual(config.upgrade.stun, (("192.0.2.7", 3478),))
        self.assertEqual([p.name for p in config.paths], ["direct:lan", "relay:azure"])
        self.assertEqual(config.paths[0].identity, config.paths[1].identity)
        self.assertTrue(config.session.direct)
        server = serverFromString(reactor, f"direct:key={self.KEY}:relay=wss\\://relay.example.net")
        self.assertIsInstance(server, AutoServerEndpoint)
        self.assertEqual(server._config.paths[1].name, "relay:relay.example.net")

    def test_bad_relay_and_misplaced_parameters(self):
        from twisted.internet.endpoints import clientFromString

        from pluresync.errors import ConfigurationError

        for text, words in [
            (f"direct:key={self.KEY}:relay=nowhere", "relay= is azure, vercel or a relay's URL"),
            (f"direct:key={self.KEY}:relay=azure:bogus=1", "unknown parameter(s) bogus"),
            (f"direct:key={self.KEY}:stun=192.0.2.7\\:3478", "unknown parameter(s) stun"),
        ]:
            with self.assertRaises(ConfigurationError) as caught:
                clientFromString(reactor, text)
            self.assertIn(words, str(caught.exception))

    def test_upgrade_timing(self):
        """upgrade= sets the wait before the first attempt and between retries; the defaults stay."""
        from pluresync.endpoints.parsers import auto_config

        config = auto_config(key=self.KEY, upgrade="0.5")
        self.assertEqual((config.upgrade.first, config.upgrade.retry), (0.5, 0.5))
        self.assertEqual(config.upgrade.max_retry, DirectParams().max_retry)

    def test_bad_upgrade(self):
        from pluresync.endpoints.parsers import auto_config
        from pluresync.errors import ConfigurationError

        for value in ("soon", "0", "-1", "inf"):
            with self.assertRaises(ConfigurationError) as caught:
                auto_config(key=self.KEY, upgrade=value)
            self.assertIn("upgrade=", str(caught.exception))
        with self.assertRaises(ConfigurationError) as caught:
            auto_config(key=self.KEY, upgrade="1", direct="off")
        self.assertIn("upgrade=", str(caught.exception))


class RefusalTests(TestCase):
    timeout = 60

    async def test_the_peers_reason_is_kept_when_it_gives_up_mid_punch(self):
        """
        The responder gives up during the punch (in the lab: both NATs
        symmetric, found after its short LAN try) and says why in
        DIRECT_FAILED: the initiator stops at once and reports that reason,
        not its own time limit it never reached.
        """
        from pluresync.errors import DirectPathError

        pair = Pair(self, 1, DirectParams(**{**FAST.__dict__, "punch": 5.0, "timeout": 10.0, "retry": 30.0}))
        await pair.start()
        server_upgrade, client_upgrade = pair.upgrades[1], pair.upgrades[0]

        async def hopeless(attempt, peer, *, initiator, connect):
            raise DirectPathError("no direct path: both peers are behind symmetric NATs", "both-symmetric")

        server_upgrade._punchAndConnect = hopeless
        began = reactor.seconds()
        await until(lambda: client_upgrade.failures == 1)
        self.assertLess(reactor.seconds() - began, 5.0)
        self.assertIn("both NATs are symmetric", client_upgrade.last_error)
        self.assertEqual(pair.client.path, "relay:test")
