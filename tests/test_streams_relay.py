"""
Streams on one session through a real relay on 127.0.0.1: connects from
endpoints made from the same string share a session (the relay sees one
pair), 200 streams move their own data while one is never read, a reset
stream leaves the others, and streams outlive a relay that drops every
socket under them.
"""

from __future__ import annotations

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from pluresync.errors import StreamResetError
from pluresync.keys import SyncKey
from pluresync.session.pool import pool_for
from pluresync.session.streams import MIN_STREAM_WINDOW

from .localrelay import Collector, Listening, LocalRelay
from .test_session import blob


class Counting(Collector):
    """A collector that fires C{got} once it holds C{expect} bytes."""

    expect = 0

    def __init__(self) -> None:
        super().__init__()
        self.got: Deferred = Deferred()
        self.digest = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)
        if self.count >= self.expect and not self.got.called:
            self.got.callback(self)


class Accepting(Factory):
    """The listener's factory: a L{Counting} per stream, kept in order; C{reaches(n)} fires once n are connected."""

    def __init__(self, pause_first: bool = False) -> None:
        self.accepted: list[Counting] = []
        self._pause_first = pause_first
        self._waiting: list[tuple[int, Deferred]] = []

    def buildProtocol(self, addr) -> Counting:
        protocol = Counting()
        self.accepted.append(protocol)
        if self._pause_first and len(self.accepted) == 1:
            protocol.made.addCallback(lambda p: p.transport.pauseProducing())  # it never reads
        protocol.made.addCallback(self._made)
        return protocol

    def _made(self, _) -> None:
        made = sum(1 for p in self.accepted if p.made.called)
        for waiter in [w for w in self._waiting if made >= w[0]]:
            self._waiting.remove(waiter)
            waiter[1].callback(self.accepted)

    def reaches(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append((count, d))
        self._made(None)
        return d.addTimeout(10, reactor)


class SharedSessionTests(TestCase):
    timeout = 60

    def setUp(self):
        self.relay = LocalRelay(self)
        self.key = SyncKey.generate()

    def metric(self, name: str) -> float:
        return self.relay.factory.metrics.registry.get_sample_value(name) or 0

    async def listen(self, factory, **params):
        from twisted.internet.endpoints import serverFromString

        port = await serverFromString(reactor, self.relay.endpoint(self.key, **params)).listen(factory)
        self.addCleanup(port.stopListening)
        return port

    async def connect(self, protocol=Collector, **params):
        endpoint = clientFromString(reactor, self.relay.endpoint(self.key, **params))
        connected = await endpoint.connect(Factory.forProtocol(protocol))
        self.addCleanup(connected.transport.abortConnection)
        return connected

    async def test_same_string_shares_the_session(self):
        """A second endpoint from the same string opens a stream on the first's session: no new pair."""
        listening = Listening()
        await self.listen(listening.factory)
        accepted = listening.next()
        first = await self.connect()
        await accepted
        pairs, sockets = self.metric("pluresync_relay_pairings_total"), self.metric("pluresync_relay_connections_total")
        accepted = listening.next()
        second = await self.connect()
        server = await accepted
        self.assertIs(second.transport.session, first.transport.session)
        self.assertEqual(self.metric("pluresync_relay_pairings_total"), pairs)
        self.assertEqual(self.metric("pluresync_relay_connections_total"), sockets)
        got = Deferred()
        server.dataArrived = lambda data: got.called or got.callback(None)
        second.transport.write(b"on the shared session")
        await got
        self.assertEqual(server.data, b"on the shared session")
        self.assertEqual(len(listening.accepted), 2)

    async def test_reuse_off(self):
        listening = Listening()
        await self.listen(listening.factory)
        first = await self.connect(reuse="off")
        second = await self.connect(reuse="off")
        self.assertIsNot(second.transport.session, first.transport.session)
        self.assertEqual(self.metric("pluresync_relay_pairings_total"), 2)

    async def test_reuse_keeps_an_idle_session(self):
        """With reuse=SECONDS a connect made after the last stream closed still finds the session."""
        listening = Listening()
        await self.listen(listening.factory)
        first = await self.connect(reuse="30")
        first.transport.loseConnection()
        await first.lost
        first.reason.trap(ConnectionDone)
        session = first.transport.session
        self.assertTrue(session.mux.accepting)
        second = await self.connect(reuse="30")
        self.assertIs(second.transport.session, session)
        self.assertEqual(second.transport.stream_id, 2)
        self.assertEqual(self.metric("pluresync_relay_pairings_total"), 1)
        second.transport.loseConnection()
        await second.lost
        session.mux.closeIdle()  # as a reactor that shuts down does
        await session.whenEnded()
        self.assertNotIn(session, pool_for(reactor))

    async def test_concurrent_connects_wait_for_one_session(self):
        """Connects made while the first is still opening its session share it, not open their own."""
        listening = Listening()
        await self.listen(listening.factory)
        protocols = await gatherResults([Deferred.fromCoroutine(self.connect()) for _ in range(10)])
        self.assertEqual(len({id(p.transport.session) for p in protocols}), 1)
        self.assertEqual(self.metric("pluresync_relay_pairings_total"), 1)

    async def test_last_stream_ends_the_session(self):
        listening = Listening()
        await self.listen(listening.factory)
        accepted = listening.next()
        client = await self.connect()
        server = await accepted
        client.transport.loseConnection()
        await client.lost
        await server.lost
        client.reason.trap(ConnectionDone)
        server.reason.trap(ConnectionDone)
        session = client.transport.session
        self.assertFalse(session.mux.accepting)
        await session.whenEnded()
        again = await self.connect()
        self.assertIsNot(again.transport.session, session)
        self.assertNotIn(session, pool_for(reactor))
        self.assertIn(again.transport.session, pool_for(reactor))
        self.assertEqual(self.metric("pluresync_relay_pairings_total"), 2)

    async def test_200_streams_one_never_read(self):
        """
        200 streams at once, each its own data (sha256 equal per stream),
        while the listener never reads one of them: the others finish, and
        the stalled one holds no more than its window at the listener.
        """
        size = 64 * 1024
        Counting.expect = size
        factory = Accepting(pause_first=True)
        await self.listen(factory)
        clients = await gatherResults([Deferred.fromCoroutine(self.connect()) for _ in range(200)])
        self.assertEqual(len({id(c.transport.session) for c in clients}), 1)
        accepted = await factory.reaches(200)
        stalled = accepted[0]
        by_stream = {p.transport.stream_id: p for p in accepted}
        sent = {}
        for n, client in enumerate(clients):
            data = blob(size * (16 if client.transport.stream_id == stalled.transport.stream_id else 1), seed=n)
            sent[client.transport.stream_id] = hashlib.sha256(data[:size]).hexdigest()
            client.transport.write(data)
        await gatherResults([p.got for p in accepted[1:]])
        for stream_id, protocol in by_stream.items():
            if protocol is not stalled:
                self.assertEqual(protocol.digest.hexdigest(), sent[stream_id], f"stream {stream_id}")
        self.assertEqual(stalled.count, 0)
        held = stalled.transport.stats()["stream_inbox_bytes"]
        self.assertLessEqual(held, max(MIN_STREAM_WINDOW, stalled.transport.session.params.window))
        self.assertEqual(self.metric("pluresync_relay_pairings_total"), 1)

    async def test_reset_mid_transfer(self):
        Counting.expect = 1 << 20
        factory = Accepting()
        await self.listen(factory)
        one = await self.connect()
        two = await self.connect()
        accepted = await factory.reaches(2)
        one.transport.write(blob(4 << 20, seed=1))
        two.transport.write(blob(1 << 20, seed=2))
        one.transport.abortConnection()
        await one.lost
        one.reason.trap(ConnectionAborted)
        await accepted[0].lost
        accepted[0].reason.trap(StreamResetError)
        await accepted[1].got
        self.assertEqual(accepted[1].digest.hexdigest(), hashlib.sha256(blob(1 << 20, seed=2)).hexdigest())
        self.assertFalse(two.lost.called)

    async def test_streams_outlive_the_relay_dropping_every_socket(self):
        Counting.expect = 2 << 20
        factory = Accepting()
        await self.listen(factory)
        clients = [await self.connect() for _ in range(3)]
        accepted = await factory.reaches(3)
        data = [blob(2 << 20, seed=10 + n) for n in range(3)]
        for client, chunk in zip(clients, data, strict=True):
            client.transport.write(chunk[: 1 << 20])
        for protocol in list(self.relay._tap.protocols):
            protocol.transport.abortConnection()
        for client, chunk in zip(clients, data, strict=True):
            client.transport.write(chunk[1 << 20 :])
        await gatherResults([p.got for p in accepted])
        by_stream = {p.transport.stream_id: p for p in accepted}
        for client, chunk in zip(clients, data, strict=True):
            got = by_stream[client.transport.stream_id]
            self.assertEqual(got.digest.hexdigest(), hashlib.sha256(chunk).hexdigest())
        self.assertGreaterEqual(clients[0].transport.stats()["swaps"], 1)
