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
from twisted.internet.defer import Deferred
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
