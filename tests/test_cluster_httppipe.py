"""
HTTP pipes in a cluster of Twisted relays sharing Redis (C{--redis}): a
listener on one instance and a connector on another pair through a cluster
link, whether each uses a WebSocket or the HTTP pipe.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from pluresync.endpoints import pathcache
from pluresync.keys import SyncKey

from .localrelay import Collector, Listening
from .redisserver import start_cluster, start_redis
from .relayprocess import escaped_url, sockets_closed


def _until(protocol: Collector, size: int) -> Deferred:
    done: Deferred = Deferred()

    def arrived(data: bytes) -> None:
        if len(protocol.data) >= size and not done.called:
            done.callback(None)

    protocol.dataArrived = arrived
    return done


class ClusterHttpPipeTests(unittest.TestCase):
    """Two relay processes and one redis-server."""

    timeout = 120

    def setUp(self) -> Any:
        self.key = SyncKey.generate()
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.addCleanup(lambda: ensureDeferred(sockets_closed(timeout=10)))
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self.redis = await start_redis(self)
        self.relays = await start_cluster(self, self.redis, 2)

    def endpoint(self, relay, pipe: str) -> str:
        return f"relay:url={escaped_url(relay.port)}:key={self.key.to_text()}:pipe={pipe}"

    async def pair_across(self, listener_pipe: str, connector_pipe: str) -> None:
        r1, r2 = self.relays
        listening = Listening()
        port = await serverFromString(reactor, self.endpoint(r1, listener_pipe)).listen(listening.factory)
        self.addCleanup(port.stopListening)
        accepted = listening.next()
        client = await clientFromString(reactor, self.endpoint(r2, connector_pipe)).connect(
            Factory.forProtocol(Collector)
        )
        self.addCleanup(lambda: client.transport.abortConnection() if client.reason is None else None)
        server = await accepted
        up, down = os.urandom(1 << 20), os.urandom(1 << 20)
        got = _until(server, len(up))
        client.transport.write(up)
        await got
        got = _until(client, len(down))
        server.transport.write(down)
        await got
        self.assertEqual((server.data, client.data), (up, down))
        client.transport.loseConnection()
        await server.lost
        server.reason.trap(ConnectionDone)
        await client.lost
        client.reason.trap(ConnectionDone)
        self.assertIn("cluster link)", r1.output + r2.output)
        for relay in self.relays:
            self.assertNotIn("Traceback", relay.output)

    def test_http_and_http(self) -> Any:
        return ensureDeferred(self.pair_across("http", "http"))

    def test_websocket_listener_http_connector(self) -> Any:
        return ensureDeferred(self.pair_across("ws", "http"))

    def test_http_listener_websocket_connector(self) -> Any:
        return ensureDeferred(self.pair_across("http", "ws"))
