"""
C{relay:} endpoints end to end, through a real relay on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.protocols.basic import FileSender
from twisted.trial.unittest import TestCase

from pluresync.address import PeerAddress
from pluresync.errors import PeerGoneError, RelayError, RelayLostError
from pluresync.keys import PeerIdentity, SyncKey

from .localrelay import Collector, Listening, LocalRelay


class RelayEndpointTests(TestCase):
    """Streams between a relay: listener and a relay: client."""

    timeout = 30

    def setUp(self):
        self.relay = LocalRelay(self)
        self.key = SyncKey.generate()

    async def listen(self, key=None, **params):
        listening = Listening()
        endpoint = serverFromString(reactor, self.relay.endpoint(key or self.key, **params))
        port = await endpoint.listen(listening.factory)
        self.addCleanup(port.stopListening)
        return listening, port

    async def connect(self, key=None, **params) -> Collector:
        endpoint = clientFromString(reactor, self.relay.endpoint(key or self.key, **params))
        protocol = await endpoint.connect(Factory.forProtocol(Collector))
        self.addCleanup(protocol.transport.abortConnection)
        return protocol

    async def pair(self):
        listening, port = await self.listen()
        accepted = listening.next()
        client = await self.connect()
        server = await accepted
        return client, server, port

    async def test_stream_both_ways_and_clean_close(self):
        """Bytes flow both ways in order; loseConnection is a clean close on both sides."""
        client, server, _ = await self.pair()
        server_got = Deferred()
        server.dataArrived = lambda data: len(server.data) >= 11 and not server_got.called and server_got.callback(None)
        client.transport.write(b"hello ")
        client.transport.write(b"world")
        await server_got
        self.assertEqual(server.data, b"hello world")
        server.transport.write(b"bye")
        server.transport.loseConnection()
        await client.lost
        client.reason.trap(ConnectionDone)
        self.assertEqual(client.data, b"bye")
        await server.lost
        server.reason.trap(ConnectionDone)

    async def test_addresses_carry_peer_ids(self):
        """getPeer() on each side is the other's proven peer id and the transport's name."""
        client, server, port = await self.pair()
        self.assertIsInstance(client.transport.getPeer(), PeerAddress)
        self.assertEqual(client.transport.getPeer().peer_id, port.getHost().peer_id)
        self.assertEqual(server.transport.getPeer().peer_id, client.transport.getHost().peer_id)
        self.assertEqual(client.transport.getPeer().transport, "relay:127.0.0.1")

    async def test_relay_sees_no_plaintext(self):
        """
        Every byte the relay received is tapped: neither the plaintext, nor
        the key, topic or psk appears in it; only the rendezvous id does.
        """
        client, server, _ = await self.pair()
        secret = b"PLAINTEXT-MARKER the launch code is 0000 " * 50
        done = Deferred()
        server.dataArrived = lambda data: len(server.data) >= len(secret) and not done.called and done.callback(None)
        client.transport.write(secret)
        await done
        wire = self.relay.tapped
        topic = self.key.topic("")
        self.assertGreater(len(wire), len(secret))
        for needle in (b"PLAINTEXT-MARKER", self.key.secret, self.key.to_text().encode(), topic.secret, topic.psk):
            self.assertNotIn(needle, wire)
        self.assertIn(topic.rendezvous_id.hex().encode(), wire)

    async def test_wrong_key(self):
        """
        Peers with different keys have different rendezvous ids, so through
        a relay they never meet: the client is told that nobody with this
        key is listening, and the listener keeps serving its own peers.
        (The handshake's own wrong-key failure is tested in test_secure.)
        """
        listening, _ = await self.listen()
        with self.assertRaises(RelayError) as e:
            await self.connect(key=SyncKey.generate(), wait="0")
        self.assertEqual(e.exception.code, "no-listener")
        self.assertIn("same key file and topic", str(e.exception))
        accepted = listening.next()
        client = await self.connect()
        await accepted
        self.assertEqual(len(listening.accepted), 1)
        client.transport.loseConnection()
        await client.lost

    async def test_no_listener(self):
        """With nobody listening, the relay answers no-listener after wait=."""
        with self.assertRaises(RelayError) as e:
            await self.connect(wait="0")
        self.assertEqual(e.exception.code, "no-listener")

    async def test_connector_waits_for_listener(self):
        """A connector that arrives first is paired when a listener registers."""
        connecting = clientFromString(reactor, self.relay.endpoint(self.key, wait="10")).connect(
            Factory.forProtocol(Collector)
        )
        await self.listen()
        client = await connecting
        client.transport.loseConnection()
        await client.lost
        client.reason.trap(ConnectionDone)

    async def test_peer_selects_listener(self):
        """Several listeners share a rendezvous id; peer= reaches the named one."""
        ids = [self.mktemp(), self.mktemp()]
        listeners = [await self.listen(identity=path) for path in ids]
        wanted = PeerIdentity.from_file(ids[1])
        for _ in range(3):
            accepted = listeners[1][0].next()
            client = await self.connect(peer=wanted.peer_id)
            self.assertEqual(client.transport.getPeer().peer_id, wanted.peer_id)
            await accepted
        self.assertEqual(len(listeners[0][0].accepted), 0)
        self.assertEqual(len(listeners[1][0].accepted), 3)

    async def test_many_connectors_one_listener(self):
        """
        One listener takes many connectors, each its own session with
        reuse=off (each its own identity); without, each its own stream of one session.
        """
        listening, _ = await self.listen()
        accepted = gatherResults([listening.next() for _ in range(5)])
        clients = await gatherResults([Deferred.fromCoroutine(self.connect(reuse="off")) for _ in range(5)])
        await accepted
        for i, client in enumerate(clients):
            client.transport.write(b"%d" % i)
        self.assertEqual(len(listening.accepted), 5)
        self.assertEqual(len({c.transport.getHost().peer_id for c in clients}), 5)
        self.assertEqual(len({id(c.transport.session) for c in clients}), 5)
        accepted = gatherResults([listening.next() for _ in range(5)])
        shared = await gatherResults([Deferred.fromCoroutine(self.connect()) for _ in range(5)])
        await accepted
        self.assertEqual(len(listening.accepted), 10)
        self.assertEqual(len({id(c.transport.session) for c in shared}), 1)
        self.assertEqual(len({c.transport.stream_id for c in shared}), 5)

    async def test_stop_listening_unregisters(self):
        """After stopListening the relay no longer pairs connectors with us."""
        _, port = await self.listen()
        await port.stopListening()
        with self.assertRaises(RelayError) as e:
            await self.connect(wait="0")
        self.assertEqual(e.exception.code, "no-listener")

    async def pair_without_resume(self):
        listening, port = await self.listen(resume="0")
        accepted = listening.next()
        client = await self.connect(resume="0")
        server = await accepted
        return client, server, port

    async def test_link_lost_resumes(self):
        """
        A link that drops mid-stream is replaced through the same relay: the
        session resumes, nothing is lost or doubled, the listener builds no
        second protocol, and the close is still clean on both sides.
        """
        listening, _ = await self.listen()
        accepted = listening.next()
        client = await self.connect()
        server = await accepted
        blob = hashlib.sha256(b"resume").digest() * 32768  # 1 MiB
        done = Deferred()
        server.dataArrived = lambda data: len(server.data) >= 2 * len(blob) and not done.called and done.callback(None)
        client.transport.write(blob)
        [link] = client.transport.session.links
        link.abort()
        client.transport.write(blob)
        await done
        self.assertEqual(server.data, blob + blob)
        self.assertEqual(len(listening.accepted), 1)
        self.assertEqual(client.transport.stats()["swaps"], 1)
        client.transport.loseConnection()
        await gatherResults([client.lost, server.lost])
        client.reason.trap(ConnectionDone)
        server.reason.trap(ConnectionDone)

    async def test_abort_reaches_the_peer_at_once(self):
        """abortConnection ends the peer's side at once (an authenticated ABORT), not after its resume limit."""
        client, server, _ = await self.pair()
        client.transport.abortConnection()
        await server.lost
        server.reason.trap(PeerGoneError)
        self.assertIn("aborted", str(server.reason.value))

    async def test_peer_vanishes(self):
        """Without resume, a peer whose connection drops is reported as PeerGoneError, not a clean close."""
        client, server, _ = await self.pair_without_resume()
        server.transport.session.links[0].pipe.abort()
        await client.lost
        client.reason.trap(PeerGoneError)
        self.assertFalse(client.reason.check(ConnectionDone))

    async def test_relay_dies(self):
        """Without resume, a relay that drops every socket is reported as RelayLostError on both sides."""
        client, server, _ = await self.pair_without_resume()
        self.relay.kill()
        await gatherResults([client.lost, server.lost])
        client.reason.trap(RelayLostError)
        server.reason.trap(RelayLostError)

    async def test_relay_shuts_down(self):
        """Without resume, a relay going away (1001) is reported at once, saying so."""
        client, server, _ = await self.pair_without_resume()
        await self.relay.stop()
        await client.lost
        client.reason.trap(RelayLostError)
        self.assertIn("shutting down", str(client.reason.value))

    async def test_streaming_with_a_producer(self):
        """
        A 16 MiB file sent with FileSender (a registered producer) arrives
        intact while the receiver pauses and resumes, and the bytes in
        flight stay bounded.
        """
        client, server, _ = await self.pair()
        blob = hashlib.sha256(b"seed").digest() * (16 * 1024 * 1024 // 32)
        source = io.BytesIO(blob)
        received = [0]
        in_flight = []
        done = Deferred()

        def arrived(data):
            received[0] += len(data)
            in_flight.append(source.tell() - received[0])
            if received[0] % (4 * 1024 * 1024) < len(data):
                server.transport.pauseProducing()
                reactor.callLater(0, server.transport.resumeProducing)
            if received[0] == len(blob) and not done.called:
                done.callback(None)

        server.dataArrived = arrived
        await FileSender().beginFileTransfer(source, client.transport)
        await done
        self.assertEqual(hashlib.sha256(server.data).digest(), hashlib.sha256(blob).digest())
        self.assertLess(max(in_flight), 12 * 1024 * 1024)


class PipeBufferTests(TestCase):
    """A paired socket's TCP transport buffers four 64 KiB writes before pausing its writer."""

    def test_buffer(self):
        from twisted.internet.testing import StringTransport

        from pluresync.pipes.websocket import PIPE_BUFFER, WebSocketPipe

        class Wrapper:  # a TLS wrapper: no bufferSize of its own
            def __init__(self, transport):
                self.transport = transport

        for wrapped in (False, True):
            tcp = StringTransport()
            tcp.bufferSize = 65536
            protocol = type("P", (), {})()
            protocol.transport = Wrapper(tcp) if wrapped else tcp
            WebSocketPipe(protocol)
            self.assertEqual(tcp.bufferSize, PIPE_BUFFER)
