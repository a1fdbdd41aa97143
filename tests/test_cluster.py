"""
Several relay instances sharing a real C{redis-server} (C{--redis}): a
listener on one instance is reachable from the others, dead instances are
forgotten, and a Redis outage only pauses clustering.

Every test runs real processes on 127.0.0.1 (three relays and one
redis-server) and talks the raw relay protocol (L{tests.relayclient}), so
each socket can be sent to the instance the test chooses, as a load
balancer would.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import portforward
from twisted.trial import unittest

from pluresync.keys import SyncKey

from .localrelay import Collector
from .redisserver import start_cluster, start_redis
from .relayclient import RelayTestClient, connect
from .relayprocess import RelayProcess, escaped_url, poll, sockets_closed
from .test_failover import Served

log = Logger()

T = 15  # seconds: bound of each single wait


def _hex64() -> str:
    return os.urandom(32).hex()


class _Clients:
    """Raw relay clients of one test, aborted at its cleanup."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.all: list[RelayTestClient] = []
        test.addCleanup(lambda: ensureDeferred(self.close_all()))

    async def open(self, relay: RelayProcess) -> RelayTestClient:
        client = connect(reactor, relay.port)
        self.all.append(client)
        await client.opened.addTimeout(T, reactor)
        return client

    async def close_all(self) -> None:
        for client in self.all:
            client.abort()
        for client in self.all:
            await client.closed.addTimeout(T, reactor)

    async def listen(self, relay: RelayProcess, rdv: str, peer: str) -> RelayTestClient:
        listener = await self.open(relay)
        listener.send_json({"v": 1, "op": "listen", "rdv": rdv, "peer": peer})
        ready = await listener.next_json().addTimeout(T, reactor)
        assert dict(ready, limits=None) == {"op": "ready", "limits": None, "decline": True}, ready
        return listener

    async def connect(
        self, relay: RelayProcess, rdv: str, wait: float = 10, from_: str | None = None
    ) -> RelayTestClient:
        connector = await self.open(relay)
        message: dict[str, Any] = {"v": 1, "op": "connect", "rdv": rdv, "wait": wait}
        if from_ is not None:
            message["from"] = from_
        connector.send_json(message)
        return connector

    async def accept(self, relay: RelayProcess, session: str) -> RelayTestClient:
        acceptor = await self.open(relay)
        acceptor.send_json({"v": 1, "op": "accept", "session": session})
        return acceptor

    async def pair(
        self,
        listener: RelayTestClient,
        listener_peer: str,
        connector_relay: RelayProtocolLike,
        acceptor_relay: RelayProtocolLike,
        rdv: str,
    ) -> tuple[RelayTestClient, RelayTestClient]:
        """A connector on one instance, accepted on another: both get paired."""
        me = _hex64()
        connector = await self.connect(connector_relay, rdv, from_=me)
        incoming = await listener.next_json().addTimeout(T, reactor)
        assert incoming["op"] == "incoming" and incoming["peer"] == me, incoming
        acceptor = await self.accept(acceptor_relay, incoming["session"])
        paired = await acceptor.next_json().addTimeout(T, reactor)
        assert dict(paired, limits=None) == {"op": "paired", "peer": me, "limits": None}, paired
        paired = await connector.next_json().addTimeout(T, reactor)
        assert dict(paired, limits=None) == {"op": "paired", "peer": listener_peer, "limits": None}, paired
        return connector, acceptor


RelayProtocolLike = RelayProcess


async def _exchange(test: unittest.TestCase, a: RelayTestClient, b: RelayTestClient) -> None:
    """Binary messages of several sizes cross both ways, each one whole and in order."""
    sizes = [1, 125, 126, 65535, 65536, 131074, 7]
    for sender, receiver in ((a, b), (b, a)):
        payloads = [os.urandom(n) for n in sizes]
        for payload in payloads:
            sender.send_bytes(payload)
        for payload in payloads:
            got = await receiver.next_message().addTimeout(T, reactor)
            test.assertEqual(got, (payload, True))


async def _health(relay: RelayProcess) -> dict:
    return await relay.health()


class ClusterTests(unittest.TestCase):
    """Three relay processes and one redis-server."""

    timeout = 120

    def setUp(self) -> Any:
        self.addCleanup(lambda: ensureDeferred(sockets_closed(timeout=10)))
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self.redis = await start_redis(self)
        self.relays = await start_cluster(self, self.redis, 3)
        self.clients = _Clients(self)

    async def _dead_or_alive(self) -> None:
        for relay in self.relays:
            if relay.running:
                self.assertNotIn("Traceback", relay.output)

    def tearDown(self) -> Any:
        return ensureDeferred(self._dead_or_alive())

    def test_cross_instance_pairing(self) -> Any:
        """
        A listener on instance 1, a connector on instance 2, the accept on
        instance 3: both ends are paired, binary messages of every size
        cross both ways whole, and a normal close reaches the other side
        as 1000.
        """

        async def run() -> None:
            r1, r2, r3 = self.relays
            rdv, peer = _hex64(), _hex64()
            listener = await self.clients.listen(r1, rdv, peer)
            connector, acceptor = await self.clients.pair(listener, peer, r2, r3, rdv)
            await _exchange(self, connector, acceptor)
            health = await r3.health()
            self.assertEqual((health["status"], health["checks"]), ("ok", {"redis": True}))
            # The pair really went through a link from instance 3 to 2.
            self.assertIn("(cluster link)", r2.output)
            self.assertIn("(cluster link)", r3.output)
            _, code, _ = await connector.close_normally().addTimeout(T, reactor)
            self.assertEqual(code, 1000)
            _, code, _ = await acceptor.closed.addTimeout(T, reactor)
            self.assertEqual(code, 1000)
            # The accept may also land where the connector waits, or where
            # the listener is.
            for acceptor_relay in (r2, r1):
                connector, acceptor = await self.clients.pair(listener, peer, r2, acceptor_relay, rdv)
                await _exchange(self, acceptor, connector)
                acceptor.abort()
                _, code, _ = await connector.closed.addTimeout(T, reactor)
                self.assertEqual(code, 4010)

        return ensureDeferred(run())

    def test_waiting_connector_and_immediate_connector(self) -> Any:
        """
        A connector that waits on instance 2 before any listener exists is
        offered to a listener that registers later on instance 1; one with
        C{wait: 0} finds a listener of another instance at once, and gets
        C{no-listener} at once when there is none anywhere.
        """

        async def run() -> None:
            r1, r2, r3 = self.relays
            rdv, peer = _hex64(), _hex64()
            me = _hex64()
            connector = await self.clients.connect(r2, rdv, wait=20, from_=me)
            # Let the lookup come back empty first.
            await poll(lambda: _pending(r2), timeout=T, what="the connector waiting on instance 2")
            listener = await self.clients.listen(r1, rdv, peer)
            incoming = await listener.next_json().addTimeout(T, reactor)
            self.assertEqual((incoming["op"], incoming["peer"]), ("incoming", me))
            acceptor = await self.clients.accept(r1, incoming["session"])
            for client, expected in ((acceptor, me), (connector, peer)):
                paired = await client.next_json().addTimeout(T, reactor)
                self.assertEqual(dict(paired, limits=None), {"op": "paired", "peer": expected, "limits": None})
            await _exchange(self, connector, acceptor)

            immediate = await self.clients.connect(r3, rdv, wait=0)
            incoming = await listener.next_json().addTimeout(T, reactor)
            acceptor = await self.clients.accept(r3, incoming["session"])
            for client in (acceptor, immediate):
                paired = await client.next_json().addTimeout(T, reactor)
                self.assertEqual(paired["op"], "paired")

            nobody = await self.clients.connect(r3, _hex64(), wait=0)
            error = await nobody.next_json().addTimeout(T, reactor)
            self.assertEqual((error["op"], error["code"]), ("error", "no-listener"))

        return ensureDeferred(run())

    def test_instance_death(self) -> Any:
        """
        SIGKILL the instance holding a listener: within the registration
        TTL the others stop offering it (C{no-listener}); once the listener
        registers again on a live instance (as C{auto:}/C{relay:} listeners
        do on reconnecting), connectors anywhere reach it again.
        """

        async def run() -> None:
            r1, r2, r3 = self.relays
            rdv, peer = _hex64(), _hex64()
            listener = await self.clients.listen(r1, rdv, peer)
            await self.clients.pair(listener, peer, r3, r2, rdv)
            instances = await self.redis.command("KEYS", "pluresync:0:inst:*")
            self.assertEqual(len(instances), 3)
            killed_at = reactor.seconds()
            await r1.kill()
            await listener.closed.addTimeout(T, reactor)

            # Its instance record expires (TTL 6 s, heartbeats every 2 s).
            async def expired() -> bool:
                return len(await self.redis.command("KEYS", "pluresync:0:inst:*")) == 2

            await poll(expired, timeout=10, interval=0.2, what="the dead instance's record expiring")
            self.assertLess(reactor.seconds() - killed_at, 8)

            async def forgotten() -> bool:
                probe = await self.clients.connect(r3, rdv, wait=0)
                answer = await probe.next_json().addTimeout(T, reactor)
                if answer.get("op") == "incoming":  # pragma: no cover - cannot happen: no listener socket
                    return False
                return answer.get("code") == "no-listener"

            await poll(forgotten, timeout=10, interval=0.5, what="the dead instance's listener being forgotten")
            self.assertLess(reactor.seconds() - killed_at, 10)

            # The listener comes back on instance 2.
            listener = await self.clients.listen(r2, rdv, peer)
            connector, acceptor = await self.clients.pair(listener, peer, r3, r3, rdv)
            await _exchange(self, connector, acceptor)
            connector, acceptor = await self.clients.pair(listener, peer, r3, r2, rdv)
            await _exchange(self, connector, acceptor)

        return ensureDeferred(run())

    def test_redis_restart(self) -> Any:
        """
        With Redis killed, every instance reports C{degraded} and still
        pairs peers that meet on it; once Redis is back (empty, on the same
        port) the instances re-register and cross-instance pairing works
        again, for the listener registered before the outage too.
        """

        async def run() -> None:
            r1, r2, r3 = self.relays
            rdv, peer = _hex64(), _hex64()
            listener = await self.clients.listen(r1, rdv, peer)
            await self.redis.kill()

            async def degraded(relay: RelayProcess) -> bool:
                health = await relay.health()
                return health["status"] == "degraded" and health["checks"] == {"redis": False}

            for relay in self.relays:
                await poll(lambda relay=relay: degraded(relay), timeout=T, what="/health saying degraded")
            connector, acceptor = await self.clients.pair(listener, peer, r1, r1, rdv)
            await _exchange(self, connector, acceptor)
            # Another instance knows nothing of the listener meanwhile.
            lonely = await self.clients.connect(r2, rdv, wait=0)
            error = await lonely.next_json().addTimeout(T, reactor)
            self.assertEqual(error["code"], "no-listener")

            await self.redis.restart()
            for relay in self.relays:
                await poll(lambda relay=relay: _healthy(relay), timeout=T, what="/health ok after Redis returned")
            connector, acceptor = await self.clients.pair(listener, peer, r2, r3, rdv)
            await _exchange(self, connector, acceptor)

        return ensureDeferred(run())


class _Balancer(portforward.ProxyFactory):
    """
    A TCP load balancer on 127.0.0.1 in front of some relays: each new
    connection goes to the first of them that is running (so when it dies,
    reconnecting clients land on the next one).
    """

    noisy = False

    def __init__(self, test: unittest.TestCase, relays: list[RelayProcess]) -> None:
        super().__init__("127.0.0.1", 0)
        self.relays = relays
        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        test.addCleanup(self.listening.stopListening)

    @property
    def port(self) -> int:  # type: ignore[override]
        return next((r.port for r in self.relays if r.running), 1)

    @port.setter
    def port(self, value: int) -> None:
        pass

    @property
    def escaped_url(self) -> str:
        return escaped_url(self.listening.getHost().port)


class ClusterEndpointTests(unittest.TestCase):
    """
    C{relay:} endpoints (Noise-encrypted streams) through a cluster: the
    listener behind a load balancer, clients on another instance.
    """

    timeout = 120

    def setUp(self) -> Any:
        self.addCleanup(lambda: ensureDeferred(sockets_closed(timeout=10)))
        self.key = SyncKey.generate().to_text()
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self.redis = await start_redis(self)
        self.relays = await start_cluster(self, self.redis, 3)
        self.open: list[Collector] = []
        self.addCleanup(lambda: ensureDeferred(self._close()))

    async def _close(self) -> None:
        for protocol in self.open:
            if not protocol.lost.called and protocol.transport is not None:
                protocol.transport.abortConnection()
        for protocol in self.open:
            await protocol.lost.addTimeout(T, reactor)

    async def _echo(self, url: str, served: Served, index: int, size: int = 300_000) -> None:
        client = await clientFromString(reactor, f"relay:url={url}:key={self.key}:wait=2:timeout=5").connect(
            Factory.forProtocol(Collector)
        )
        self.open.append(client)
        server = await served.count_reaches(index).addTimeout(T, reactor)
        self.open.append(server)
        payload = os.urandom(size)
        got: Deferred = Deferred()
        server.dataArrived = lambda data: None if got.called or len(server.data) < size else got.callback(None)
        client.transport.write(payload)
        await got.addTimeout(T, reactor)
        self.assertEqual(server.data, payload)
        back: Deferred = Deferred()
        client.dataArrived = lambda data: None if back.called or client.data != b"thanks" else back.callback(None)
        server.transport.write(b"thanks")
        await back.addTimeout(T, reactor)

    def test_listener_moves_to_a_live_instance(self) -> Any:
        """
        A C{relay:} listener registered through a load balancer on instance
        1 is reached by a client of instance 3; SIGKILL instance 1: the
        listener reconnects (through the balancer) to instance 2 and is
        reachable from instance 3 again.
        """

        async def run() -> None:
            r1, r2, r3 = self.relays
            balancer = _Balancer(self, [r1, r2])
            served = Served()
            port = await serverFromString(reactor, f"relay:url={balancer.escaped_url}:key={self.key}").listen(served)
            self.addCleanup(port.stopListening)
            await poll(lambda: _listeners(r1), timeout=T, what="the listener registering on instance 1")
            await self._echo(r3.escaped_url, served, 1)

            await r1.kill()
            killed = reactor.seconds()
            await poll(lambda: _listeners(r2), timeout=30, interval=0.1, what="the listener moving to instance 2")
            moved = reactor.seconds() - killed

            async def reachable() -> bool:
                try:
                    await self._echo(r3.escaped_url, served, len(served.built) + 1)
                except Exception:
                    return False
                return True

            await poll(reachable, timeout=30, interval=0.5, what="instance 3 reaching the moved listener")
            log.info(
                "listener re-registered on a live instance {moved:.2f} s after the kill, reachable after {total:.2f} s",
                moved=moved,
                total=reactor.seconds() - killed,
            )

        return ensureDeferred(run())


async def _listeners(relay: RelayProcess) -> bool:
    return (await relay.health())["listeners"] >= 1


async def _pending(relay: RelayProcess) -> bool:
    return (await relay.health())["pending"] >= 1


async def _healthy(relay: RelayProcess) -> bool:
    health = await relay.health()
    return health["status"] == "ok" and health["checks"] == {"redis": True}
