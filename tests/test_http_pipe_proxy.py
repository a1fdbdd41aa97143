"""
The HTTP pipe where a proxy is in the way: a proxy that refuses WebSocket
upgrades (the client falls back by itself, says so once and remembers it),
and one that also holds request bodies until they end (the pipe steps down
to bounded POSTs).  The proxy is L{tests.httpproxy.InspectingProxy}, a
CONNECT proxy in this process that reads the HTTP inside its tunnels as a
TLS-inspecting proxy does; the relay is a real one on 127.0.0.1.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from pluresync.endpoints import pathcache
from pluresync.errors import RelayUnreachableError
from pluresync.keys import SyncKey
from pluresync.pipes import websocket

from .httpproxy import InspectingProxy
from .localrelay import Collector, Listening, LocalRelay
from .relayprocess import free_port
from .streamharness import STREAM_BYTES, MiB, RelayEndpoints, Transfer, window

#: Bytes each way through the holding proxy (64 MiB; PLURESYNC_STREAM_TEST_MIB=16 shrinks it).
SIZE = min(64 * MiB, STREAM_BYTES)
PAUSE_AT = 8 * MiB


def _until(protocol: Collector, size: int) -> Deferred:
    done: Deferred = Deferred()

    def arrived(data: bytes) -> None:
        if len(protocol.data) >= size and not done.called:
            done.callback(None)

    protocol.dataArrived = arrived
    return done


class ProxyFallbackTests(TestCase):
    """pipe=auto behind proxies that break WebSockets."""

    timeout = 30

    def setUp(self):
        self.relay = LocalRelay(self)
        self.key = SyncKey.generate()
        # What this network remembered must not leak into other tests.
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.lines: list[str] = []

        def observe(event):
            text = event.get("log_format") or ""
            if event.get("log_namespace", "").startswith("pluresync"):
                self.lines.append(text.format(**{k: v for k, v in event.items() if isinstance(k, str)}))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def endpoint(self, proxy: InspectingProxy, **params: str) -> str:
        proxy_url = proxy.url.replace(":", "\\:")
        return self.relay.endpoint(self.key, proxy=proxy_url, **params)

    async def exchange(self, proxy: InspectingProxy, size: int = 300_000) -> None:
        listening = Listening()
        port = await serverFromString(reactor, self.endpoint(proxy)).listen(listening.factory)
        self.addCleanup(port.stopListening)
        accepted = listening.next()
        client = await clientFromString(reactor, self.endpoint(proxy)).connect(Factory.forProtocol(Collector))
        self.addCleanup(client.transport.abortConnection)
        server = await accepted
        message = bytes(range(256)) * (size // 256)
        got = _until(server, len(message))
        client.transport.write(message)
        await got
        self.assertEqual(server.data, message)
        got = _until(client, len(message))
        server.transport.write(message)
        await got
        self.assertEqual(client.data, message)
        client.transport.loseConnection()
        await server.lost
        server.reason.trap(ConnectionDone)
        await client.lost
        client.reason.trap(ConnectionDone)

    def said(self, words: str) -> list[str]:
        return [line for line in self.lines if words in line]

    async def test_upgrade_denied(self):
        """
        The proxy answers the WebSocket upgrade with a 403 page: the first
        socket falls back to the HTTP pipe, says so once, and every later
        socket to that relay goes straight to the HTTP pipe.
        """
        proxy = InspectingProxy(self, deny_upgrade=True)
        await self.exchange(proxy)
        self.assertEqual(proxy.denied, 1)
        self.assertEqual(len(self.said("using the relay's HTTP pipe on this network")), 1, self.lines)
        self.assertIn("HTTP 403 Forbidden", self.said("using the relay's HTTP pipe")[0])
        # Three sockets (the listener's control socket, the connector, the accept), each a downstream and an upstream.
        self.assertEqual(self.relay.tapped.count(b"POST /pipe HTTP/1.1"), 6)

    async def test_bodies_held(self):
        """
        The proxy also holds request bodies until they end: the streaming
        upstream's probe goes unanswered, and the pipe steps down to bounded
        POSTs, through which the stream still flows both ways.
        """
        proxy = InspectingProxy(self, deny_upgrade=True, hold_bodies=True)
        await self.exchange(proxy, size=2_000_000)
        self.assertGreater(proxy.held_requests, 6)
        self.assertGreaterEqual(len(self.said("a proxy holds HTTP request bodies")), 3, self.lines)

    async def test_websocket_muted(self):
        """
        The proxy lets the upgrade through but no frame: no pong comes back
        within the flow probe, and the client falls back to the HTTP pipe.
        """
        self.patch(websocket, "FLOW_PROBE", 0.5)
        proxy = InspectingProxy(self, mute_websocket=True)
        await self.exchange(proxy)
        said = self.said("using the relay's HTTP pipe on this network")
        self.assertEqual(len(said), 1, self.lines)
        self.assertIn("no WebSocket frame came back", said[0])

    async def test_unreachable_relay_is_not_retried_over_http(self):
        """A relay that cannot be reached at all is not a refused WebSocket: no HTTP pipe is tried."""
        url = f"ws\\://127.0.0.1\\:{free_port()}"
        endpoint = clientFromString(reactor, f"relay:url={url}:key={self.key.to_text()}:timeout=5")
        with self.assertRaises(RelayUnreachableError) as e:
            await endpoint.connect(Factory.forProtocol(Collector))
        self.assertNotIn("HTTP pipe", str(e.exception))


class HeldBodiesStreamTests(TestCase):
    """
    Big streams through a proxy that refuses WebSockets and holds request
    bodies until they end: the HTTP pipe on bounded POSTs, found by itself.
    """

    timeout = 240

    def setUp(self):
        self.relay = LocalRelay(self)
        self.key = SyncKey.generate().to_text()
        self.patch(pathcache, "shared", pathcache.PathCache())
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.proxy = InspectingProxy(self, deny_upgrade=True, hold_bodies=True)
        url = self.relay.url.replace(":", "\\:")
        extra = f":proxy={self.proxy.url.replace(':', chr(92) + ':')}"
        self.endpoints = RelayEndpoints(self.key + extra, url, url)

    async def test_both_ways(self):
        """64 MiB each way at once, equal sha256, every byte in order, one connection each."""
        there = Transfer(self, self.endpoints, SIZE, client={"topic": "there"}, server={"topic": "there"})
        back = Transfer(self, self.endpoints, SIZE, client={"topic": "back"}, server={"topic": "back"})
        await there.start()
        await back.start()
        await gatherResults([ensureDeferred(t.ended(within=200)) for t in (there, back)], consumeErrors=True)
        for transfer in (there, back):
            self.assertEqual(transfer.problems(), [], transfer.progress())
        self.assertGreater(self.proxy.held_requests, 2 * SIZE // (1 << 20))

    async def test_paused_reader(self):
        """On bounded POSTs too, a paused reader holds its writer to the session's window."""
        transfer = Transfer(self, self.endpoints, SIZE, receiver={"pause_at": PAUSE_AT, "pause_for": 3.0})
        await transfer.start()
        receiving = await transfer.arrived(PAUSE_AT, within=120)
        ahead: list[int] = []
        reactor.callLater(2.5, lambda: ahead.append(transfer.sender.sent - receiving.received))
        await transfer.ended(within=200)
        self.assertEqual(transfer.problems(), [], transfer.progress())
        self.assertEqual(receiving.during_pause, 0)
        self.assertLessEqual(ahead[0], window() + 4 * MiB, "the paused reader did not hold the writer back")
