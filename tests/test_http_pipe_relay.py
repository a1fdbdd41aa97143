"""
The HTTP pipe end to end: C{relay:} endpoints with C{pipe=http} (and a
WebSocket peer beside an HTTP one) through a real relay on 127.0.0.1.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from pluresync.errors import RelayError
from pluresync.keys import SyncKey

from .localrelay import Collector, Listening, LocalRelay


def _until(protocol: Collector, size: int) -> Deferred:
    done: Deferred = Deferred()

    def arrived(data: bytes) -> None:
        if len(protocol.data) >= size and not done.called:
            done.callback(None)

    protocol.dataArrived = arrived
    return done


class HttpPipeEndpointTests(TestCase):
    """Streams through a relay where one side or both use the HTTP pipe."""

    timeout = 30

    def setUp(self):
        self.relay = LocalRelay(self)
        self.key = SyncKey.generate()

    async def listen(self, **params):
        listening = Listening()
        endpoint = serverFromString(reactor, self.relay.endpoint(self.key, **params))
        port = await endpoint.listen(listening.factory)
        self.addCleanup(port.stopListening)
        return listening, port

    async def connect(self, **params) -> Collector:
        endpoint = clientFromString(reactor, self.relay.endpoint(self.key, **params))
        protocol = await endpoint.connect(Factory.forProtocol(Collector))
        self.addCleanup(protocol.transport.abortConnection)
        return protocol

    async def exchange(self, listener_pipe: str, connector_pipe: str) -> None:
        listening, _ = await self.listen(pipe=listener_pipe)
        accepted = listening.next()
        client = await self.connect(pipe=connector_pipe)
        server = await accepted
        message = b"x" * 300_000
        got = _until(server, len(message))
        client.transport.write(message)
        await got
        self.assertEqual(server.data, message)
        got = _until(client, 5)
        server.transport.write(b"hello")
        await got
        self.assertEqual(client.data, b"hello")
        # Each HTTP pipe is a downstream and one streaming upstream; a
        # listener on HTTP pipes has two (its control pipe, its accept).
        pipes = (2 if listener_pipe == "http" else 0) + (1 if connector_pipe == "http" else 0)
        self.assertEqual(self.relay.tapped.count(b"POST /pipe HTTP/1.1"), 2 * pipes)
        client.transport.loseConnection()
        await server.lost
        server.reason.trap(ConnectionDone)
        await client.lost
        client.reason.trap(ConnectionDone)

    async def test_http_to_http(self):
        """Both peers on HTTP pipes: bytes both ways, a clean close on both sides."""
        await self.exchange("http", "http")

    async def test_http_connector_websocket_listener(self):
        """An HTTP connector pairs with a WebSocket listener."""
        await self.exchange("ws", "http")

    async def test_websocket_connector_http_listener(self):
        """A WebSocket connector pairs with a listener on an HTTP pipe."""
        await self.exchange("http", "ws")

    async def test_relay_sees_no_plaintext(self):
        """
        Over HTTP pipes too the relay is blind: of every byte it received
        (request heads, frames), neither the plaintext nor the key, topic or
        psk appears; only the rendezvous id does.
        """
        listening, _ = await self.listen(pipe="http")
        accepted = listening.next()
        client = await self.connect(pipe="http")
        server = await accepted
        secret = b"PLAINTEXT-MARKER the launch code is 0000 " * 50
        got = _until(server, len(secret))
        client.transport.write(secret)
        await got
        wire = self.relay.tapped_raw
        topic = self.key.topic("")
        self.assertIn(b"POST /pipe HTTP/1.1", wire)
        self.assertGreater(len(wire), len(secret))
        for needle in (b"PLAINTEXT-MARKER", self.key.secret, self.key.to_text().encode(), topic.secret, topic.psk):
            self.assertNotIn(needle, wire)
        self.assertIn(topic.rendezvous_id.hex().encode(), wire)

    async def test_no_listener(self):
        """The relay's refusals come through an HTTP pipe as through a WebSocket."""
        with self.assertRaises(RelayError) as e:
            await self.connect(pipe="http", wait="0")
        self.assertEqual(e.exception.code, "no-listener")
