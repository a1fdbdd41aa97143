"""
The Vercel function (deploy/vercel/api/relay.py under uvicorn, with Redis)
serves the HTTP pipe: two instances pair an HTTP peer with an HTTP peer,
and an HTTP peer with a WebSocket peer, across instances through Redis.
The connector forces pipe=http, so a function that did not serve it would
answer its POST with 426 and the test would fail.
"""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.protocols import portforward

from pluresync.endpoints import pathcache
from pluresync.errors import RelayAuthError
from pluresync.keys import SyncKey
from pluresync.relay.core.auth import mint_token

from .relayprocess import escaped_url
from .streamharness import MiB, RelayEndpoints, Transfer
from .test_vercel_relay import _VercelCase


class VercelHttpPipeTests(_VercelCase):
    async def setUp(self) -> None:
        self.key = SyncKey.generate()
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.one, self.two = await self.start_instances(2)

    async def pair_across(self, listener_pipe: str, connector_pipe: str) -> None:
        listening, _ = await self.listen(self.one, pipe=listener_pipe)
        accepted = listening.next()
        client = await self.connect(self.two, wait="10", pipe=connector_pipe)
        server = await accepted
        up, down = os.urandom(1024 * 1024), os.urandom(1024 * 1024)
        await self.transfer(client, server, up)
        await self.transfer(server, client, down)
        self.assertEqual(server.data, up)
        self.assertEqual(client.data, down)
        client.transport.loseConnection()
        await server.lost
        server.reason.trap(ConnectionDone)
        await client.lost
        client.reason.trap(ConnectionDone)

    async def test_http_and_http_across_instances(self):
        """A listener on HTTP pipes at instance 1, an HTTP connector at instance 2: 1 MiB each way."""
        await self.pair_across("http", "http")

    async def test_websocket_and_http_across_instances(self):
        """A WebSocket listener at instance 1, an HTTP connector at instance 2: 1 MiB each way."""
        await self.pair_across("ws", "http")


class VercelHttpPipeCapTests(_VercelCase):
    """The function's duration cap, on HTTP pipes: a stream outlives several capped pipes."""

    timeout = 120

    async def setUp(self) -> None:
        self.key = SyncKey.generate()
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.patch(pathcache, "shared", pathcache.PathCache())

    async def test_stream_across_caps(self):
        """
        Every pipe ends 4 s after it opened (1001); a 32 MiB stream paced
        over 12 s from an HTTP client at instance 2 to an HTTP listener at
        instance 1 moves to fresh pipes before each cap, whole, in order, on
        one connection.
        """
        instances = await self.start_instances(2, {"PLURESYNC_MAX_DURATION": "5", "PLURESYNC_CLOSE_MARGIN": "1"})
        relays = RelayEndpoints(self.key.to_text(), escaped_url(instances[0].port), escaped_url(instances[-1].port))
        size = 32 * MiB
        transfer = Transfer(self, relays, size, client={"pipe": "http"}, server={"pipe": "http"}, rate=size / 12.0)
        await transfer.start()
        await transfer.ended(within=90)
        self.assertEqual(transfer.problems(), [], transfer.progress())
        self.assertGreaterEqual(transfer.elapsed, 8.0)
        stats = transfer.stats()["sender"]
        self.assertIsNotNone(stats)
        self.assertGreaterEqual(stats["swaps"], 2, stats)


class VercelHttpPipeAuthTests(_VercelCase):
    """The function's HTTP pipe admits with the same tokens as its WebSocket."""

    SECRET = b"pluresync-test-secret-of-at-least-32-bytes"

    async def setUp(self) -> None:
        self.key = SyncKey.generate()
        self.patch(pathcache, "pipes", pathcache.PathCache())
        env = {"PLURESYNC_AUTH": "signed", "PLURESYNC_AUTH_SECRETS": self.SECRET.decode()}
        (self.one,) = await self.start_instances(1, env)

    async def test_token_required(self):
        """Without a token: RelayAuthError (401); with a signed token: paired over HTTP pipes."""
        with self.assertRaises(RelayAuthError) as e:
            await self.connect(self.one, wait="0", pipe="http")
        self.assertIn("requires a relay token and none was given (HTTP 401", str(e.exception))
        token = mint_token(self.SECRET, "tenant-a", 600, time.time())
        listening, _ = await self.listen(self.one, pipe="http", token=token)
        accepted = listening.next()
        client = await self.connect(self.one, wait="10", pipe="http", token=token)
        server = await accepted
        blob = os.urandom(65536)
        await self.transfer(client, server, blob)
        self.assertEqual(server.data, blob)
        client.transport.loseConnection()
        await server.lost
        await client.lost


class RoundRobin(Factory):
    """
    A TCP balancer on 127.0.0.1 that sends each new connection to the next
    of its backends, as Vercel's may: a pipe's downstream and its upstream
    (each on a connection of its own) land on different instances.
    """

    noisy = False

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.counts = [0] * len(ports)
        self._next = 0

    def buildProtocol(self, addr):
        index = self._next
        self._next = (index + 1) % len(self.ports)
        self.counts[index] += 1
        backend = portforward.ProxyFactory("127.0.0.1", self.ports[index])
        backend.noisy = False
        return backend.buildProtocol(addr)


class VercelBalancedHttpPipeTests(_VercelCase):
    """Two instances behind a balancer that spreads connections: upstreams forwarded through Redis."""

    async def setUp(self) -> None:
        self.key = SyncKey.generate()
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.one, self.two = await self.start_instances(2)
        self.balancer = RoundRobin([self.one.port, self.two.port])
        self.port = reactor.listenTCP(0, self.balancer, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def endpoint(self, instance, **params: str) -> str:
        extra = "".join(f":{k}={v}" for k, v in params.items())
        return f"relay:url={escaped_url(self.port.getHost().port)}:key={self.key.to_text()}{extra}"

    async def test_upstreams_on_other_instances(self):
        """
        The listener's control pipe opens its downstream on instance 1 and
        its upstream on instance 2, which forwards it; peers on HTTP pipes
        pair and move 1 MiB each way, and close cleanly.
        """
        listening, _ = await self.listen(None, pipe="http")
        self.assertEqual(self.balancer.counts, [1, 1])
        accepted = listening.next()
        client = await self.connect(None, wait="10", pipe="http")
        server = await accepted
        up, down = os.urandom(1024 * 1024), os.urandom(1024 * 1024)
        await self.transfer(client, server, up)
        await self.transfer(server, client, down)
        self.assertEqual((server.data, client.data), (up, down))
        client.transport.loseConnection()
        await server.lost
        server.reason.trap(ConnectionDone)
        await client.lost
        client.reason.trap(ConnectionDone)
