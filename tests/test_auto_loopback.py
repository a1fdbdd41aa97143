"""C{auto:} end to end over two in-process relays on 127.0.0.1."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from pluresync.keys import SyncKey

from .localrelay import Collector, LocalRelay


class AutoLoopbackTests(TestCase):
    timeout = 30

    def setUp(self):
        self.primary = LocalRelay(self)
        self.backup = LocalRelay(self)
        self.key = SyncKey.generate()
        self.accepted: list[Collector] = []
        self.waiting: list[Deferred] = []

    def description(self, **params: str) -> str:
        urls = {
            name: relay.url.replace(":", "\\:") for name, relay in (("azure", self.primary), ("vercel", self.backup))
        }
        # These tests are about the relays: a LAN path (this host's own
        # listener, found by mDNS) would win every race.
        params.setdefault("direct", "off")
        extra = "".join(f":{k}={v}" for k, v in params.items())
        return f"auto:key={self.key.to_text()}:azure={urls['azure']}:vercel={urls['vercel']}{extra}"

    async def listen(self):
        def build():
            protocol = Collector()
            self.accepted.append(protocol)
            if self.waiting:
                protocol.made.chainDeferred(self.waiting.pop(0))
            return protocol

        port = await serverFromString(reactor, self.description()).listen(Factory.forProtocol(build))
        self.addCleanup(port.stopListening)
        return port

    def next_accepted(self) -> Deferred:
        """Fires with the next protocol the listener builds, once connected."""
        d = Deferred()
        self.waiting.append(d)
        return d

    async def connect(self, **params: str) -> Collector:
        protocol = await clientFromString(reactor, self.description(**params)).connect(Factory.forProtocol(Collector))
        self.addCleanup(protocol.transport.abortConnection)
        return protocol

    async def test_listener_on_both_client_prefers_primary(self):
        """A listener registers on both relays; a client reaches it through the primary."""
        port = await self.listen()
        self.assertIn(True, port.transports.values())
        accepted = self.next_accepted()
        client = await self.connect(delay="0.5", wait="10")
        self.assertEqual(client.transport.getPeer().transport, "relay:azure")
        self.assertEqual(client.transport.getPeer().peer_id, port.getHost().peer_id)
        await accepted
        client.transport.write(b"ping")
        done = Deferred()
        self.accepted[0].dataArrived = lambda data: done.called or done.callback(None)
        await done
        self.assertEqual(self.accepted[0].data, b"ping")
        client.transport.loseConnection()
        await self.accepted[0].lost
        self.accepted[0].reason.trap(ConnectionDone)

    async def test_backup_only(self):
        """relays=vercel reaches the same listener through the backup."""
        await self.listen()
        # wait=: the relay holds us until the listener's registration there is up.
        client = await self.connect(relays="vercel", wait="10")
        self.assertEqual(client.transport.getPeer().transport, "relay:vercel")

    async def test_zero_delay_race_leaves_one_connection(self):
        """With no head start both paths race; the listener sees exactly one connection."""
        await self.listen()
        accepted = self.next_accepted()
        client = await self.connect(delay="0", wait="10")
        await accepted
        client.transport.write(b"x")
        got = Deferred()
        self.accepted[0].dataArrived = lambda data: got.called or got.callback(None)
        await got
        self.assertEqual(len(self.accepted), 1)

    async def test_create_transport_auto(self):
        """create_transport() defaults to auto: messages flow over two relays' worth of paths."""
        from twisted.internet.defer import DeferredQueue

        from pluresync import create_transport

        def transport():
            t = create_transport(
                sync_key=self.key,
                azure_relay_url=self.primary.url,
                vercel_relay_url=self.backup.url,
                direct=False,
                reactor=reactor,
            )
            self.addCleanup(t.close)
            return t

        server, client = transport(), transport()
        accepted = DeferredQueue()
        await server.listen(accepted.put)
        conn = await client.connect()
        peer = await accepted.get()
        await conn.send(b"over auto")
        self.assertEqual(await peer.receive().__anext__(), b"over auto")
        self.assertEqual(conn.transport_name, "relay:azure")
