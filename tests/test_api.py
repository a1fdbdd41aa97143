"""The seed's message API, through a real relay on 127.0.0.1."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from pluresync import create_transport
from pluresync.api import MessageTooLargeError, SyncConnection
from pluresync.errors import ConfigurationError, TruncatedStreamError
from pluresync.interfaces import ISyncConnection, ISyncTransport
from pluresync.keys import PeerIdentity, SyncKey

from .localrelay import LocalRelay
from .relayprocess import poll


class CreateTransportTests(SynchronousTestCase):
    """Arguments of create_transport()."""

    def test_modes(self):
        """The seed's modes are accepted (auto is the default)."""
        key = SyncKey.generate()
        for mode in ("auto", "azure-relay", "vercel-relay", "direct"):
            transport = create_transport(mode, sync_key=key, reactor=object())
            self.assertTrue(verifyObject(ISyncTransport, transport))
            self.assertEqual(transport.name, mode)
        self.assertEqual(create_transport(sync_key=key, reactor=object()).name, "auto")
        self.assertRaises(ConfigurationError, create_transport, "carrier-pigeon", sync_key=key, reactor=object())

    def test_sync_key_forms(self):
        """A key's text and a key file's Path work; a path as a plain string and nothing at all are errors."""
        from pathlib import Path

        key = SyncKey.generate()
        create_transport(sync_key=key.to_text(), reactor=object())
        path = self.mktemp()
        key.write(path)
        transport = create_transport(sync_key=Path(path), reactor=object())
        self.assertEqual(transport._server._config.paths[0].topic, key.topic())
        with self.assertRaises(ConfigurationError) as e:
            create_transport(sync_key=path, reactor=object())
        self.assertIn("SyncKey.from_file", str(e.exception))
        with self.assertRaises(ConfigurationError):
            create_transport(sync_key="", reactor=object())

    def test_relay_urls(self):
        """azure_relay_url and vercel_relay_url override the presets."""
        key = SyncKey.generate()
        azure = create_transport("azure-relay", sync_key=key, azure_relay_url="ws://127.0.0.1:1", reactor=object())
        vercel = create_transport("vercel-relay", sync_key=key, vercel_relay_url="ws://127.0.0.1:2", reactor=object())
        auto = create_transport(
            sync_key=key, azure_relay_url="ws://127.0.0.1:1", vercel_relay_url="ws://127.0.0.1:2", reactor=object()
        )
        self.assertEqual(azure._server._config.relay.port, 1)
        self.assertEqual(vercel._server._config.relay.port, 2)
        self.assertEqual(vercel._server._config.name, "relay:vercel")
        self.assertEqual([p.name for p in auto._server._config.paths], ["direct:lan", "relay:azure", "relay:vercel"])
        self.assertEqual([p.relay.port for p in auto._server._config.paths[1:]], [1, 2])

    def test_direct(self):
        """
        mode="direct" is the LAN path alone; the relay modes never race it;
        direct=False leaves it out of auto (the seed config's syncDirect).
        """
        key = SyncKey.generate()
        direct = create_transport("direct", sync_key=key, connection_timeout=7, resume=3, reactor=object())
        self.assertEqual((direct._server._config.name, direct._server._config.timeout), ("direct:lan", 7.0))
        self.assertEqual(direct._server._config.session.resume, 3.0)
        peer = "ab" * 32
        self.assertEqual(direct._client(bytes.fromhex(peer))._config.peer, bytes.fromhex(peer))
        azure = create_transport("azure-relay", sync_key=key, reactor=object())
        self.assertEqual(azure._server._config.name, "relay:azure")
        auto = create_transport(sync_key=key, direct=False, reactor=object())
        self.assertEqual([p.name for p in auto._server._config.paths], ["relay:azure", "relay:vercel"])
        identity = PeerIdentity.generate()
        auto = create_transport(sync_key=key, identity=identity, reactor=object())
        self.assertEqual({p.identity for p in auto._server._config.paths}, {identity})


class MessageAPITests(TestCase):
    """send / receive / close between two transports."""

    timeout = 30

    def setUp(self):
        self.relay = LocalRelay(self)
        self.key = SyncKey.generate()

    def transport(self, **kwargs):
        transport = create_transport(
            "azure-relay", sync_key=self.key, azure_relay_url=self.relay.url, reactor=reactor, **kwargs
        )
        self.addCleanup(transport.close)
        return transport

    async def pair(self, **kwargs):
        server, client = self.transport(**kwargs), self.transport(**kwargs)
        accepted = DeferredQueue()
        await server.listen(accepted.put)
        conn = await client.connect()
        peer = await accepted.get()
        return conn, peer

    async def test_messages_keep_their_boundaries(self):
        """Each send() is exactly one received message, in order, both ways."""
        conn, peer = await self.pair()
        for iface in (ISyncConnection,):
            self.assertTrue(verifyObject(iface, conn))
            self.assertTrue(verifyObject(iface, peer))
        messages = [b"a", b"", b"x" * 200_000, b"end"]
        for m in messages:
            await conn.send(m)
        await peer.send(b"reply")
        self.assertEqual(await conn.receive().__anext__(), b"reply")
        await conn.close()
        got = [m async for m in peer.receive()]
        self.assertEqual(got, messages)
        self.assertEqual(conn.peer_id, peer.transport.getHost().peer_id)
        self.assertEqual(conn.transport_name, "relay:azure")

    async def test_connections_share_a_session(self):
        """Two connect()s of one transport are two streams of one session, each with its own messages and close."""
        server, client = self.transport(), self.transport()
        accepted = DeferredQueue()
        await server.listen(accepted.put)
        one = await client.connect()
        two = await client.connect()
        peer_one, peer_two = await accepted.get(), await accepted.get()
        self.assertIs(one.transport.session, two.transport.session)
        await one.send(b"first")
        await two.send(b"second")
        await one.close()
        self.assertEqual([m async for m in peer_one.receive()], [b"first"])
        self.assertEqual(await peer_two.receive().__anext__(), b"second")
        await two.send(b"still open")
        self.assertEqual(await peer_two.receive().__anext__(), b"still open")

    async def test_async_handler_and_peer(self):
        """listen() takes an async handler; connect(peer) reaches that listener."""
        identity = PeerIdentity.generate()
        server = self.transport(identity=identity)
        client = self.transport()
        done = Deferred()

        async def echo(connection):
            async for message in connection.receive():
                await connection.send(message.upper())
            done.callback(None)

        await server.listen(echo)
        conn = await client.connect(identity.peer_id)
        self.assertEqual(conn.peer_id, identity.peer_id)
        await conn.send(b"hello")
        receiving = conn.receive()
        self.assertEqual(await receiving.__anext__(), b"HELLO")
        await conn.close()
        await done

    async def test_bad_peer_argument(self):
        """connect() with a malformed peer id fails with a clear error, not a traceback."""
        with self.assertRaises(ConfigurationError):
            await self.transport().connect("not-a-peer")

    async def test_messages_survive_a_lost_path(self):
        """
        The path under a connection is dropped between messages and in the
        middle of a large one: every message arrives once, whole and in
        order, on the same connection.
        """
        conn, peer = await self.pair()
        session = conn.transport.session
        messages = [bytes([i]) * (i * 9973) for i in range(40)]
        dropped = None
        for i, message in enumerate(messages):
            if i in (10, 25):
                # The second drop waits until the first was noticed and the
                # session runs on a new link: sends that the pipe takes at
                # once give the reactor no turn in between by themselves.
                await poll(
                    lambda gone=dropped: session.links and session.links[-1] is not gone, timeout=10, what="a new link"
                )
                dropped = session.links[-1]  # the link we send on
                dropped.abort()
            await conn.send(message)
        await conn.close()
        got = [m async for m in peer.receive()]
        self.assertEqual(got, messages)
        self.assertEqual(conn.transport.stats()["swaps"], 2)

    async def test_oversize_message_is_refused(self):
        """A receiver drops a peer that sends more than max_message_size in one message."""
        conn, peer = await self.pair(max_message_size=100_000)
        await conn.send(b"y" * 150_000)
        with self.assertRaises(MessageTooLargeError):
            async for _ in peer.receive():
                pass

    async def test_truncation_is_an_error_not_an_end(self):
        """
        If the stream ends without the authenticated close (here: the
        WebSocket is closed cleanly under a session that may not resume,
        as a relay could), receive() raises instead of ending quietly.
        """
        conn, peer = await self.pair(resume=0)
        await conn.send(b"first")
        conn.transport.session.links[0].pipe.close()
        messages = peer.receive()
        self.assertEqual(await messages.__anext__(), b"first")
        with self.assertRaises(TruncatedStreamError):
            await messages.__anext__()

    async def test_send_waits_for_backpressure(self):
        """
        A receiver that never reads pauses its channel after receive_buffer
        bytes; the sender's send() Deferreds then stop firing (memory stays
        bounded) until the receiver reads.
        """
        conn, peer = await self.pair(receive_buffer=256 * 1024)
        chunk = b"z" * 65536
        sent = 0
        blocked = None
        for _ in range(2000):  # at most 125 MiB; backpressure must stop it far sooner
            d = conn.send(chunk)
            if not d.called:
                blocked = d
                break
            sent += len(chunk)
        self.assertIsNotNone(blocked, "send() never waited")
        # Read everything: the blocked send completes, nothing was lost.
        received = 0
        messages = peer.receive()
        while received < sent + len(chunk):
            received += len(await messages.__anext__())
        await blocked
        self.assertEqual(received, sent + len(chunk))

    async def test_send_after_close_fails(self):
        """send() on a closed connection fails instead of dropping the data silently."""
        conn, peer = await self.pair()
        await conn.close()
        with self.assertRaises(ConnectionDone):
            await conn.send(b"late")


class SyncConnectionTests(SynchronousTestCase):
    """The connection object itself."""

    def test_interface(self):
        """SyncConnection provides ISyncConnection."""
        self.assertTrue(verifyObject(ISyncConnection, SyncConnection(10, 10)))
