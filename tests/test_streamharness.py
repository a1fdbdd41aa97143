"""
The stream harness itself (tests/streamharness.py), on fake transports and a
fake clock: the pattern catches a lost, duplicated or reordered range; the
sender streams as a producer, paces itself and ends with loseConnection();
the receiver checks, times and pauses; the factory counts connections.
"""

from __future__ import annotations

import hashlib

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pluresync.address import PeerAddress

from .streamharness import (
    MiB,
    Pattern,
    PatternSender,
    ReceiverFactory,
    RelayEndpoints,
    RelayPair,
    StreamEnded,
    describe,
    registered,
    window,
)


class _Transport(StringTransport):
    """A StringTransport whose peer names a path, as pluresync's transports do."""

    def getPeer(self) -> PeerAddress:
        return PeerAddress("relay:azure", "00" * 32)


class PatternTests(unittest.TestCase):
    def test_chunks_join_up(self) -> None:
        """Any split of the stream into chunks gives the same bytes, across MiB boundaries too."""
        pattern = Pattern()
        whole = pattern.chunk(0, 3 * MiB + 5)
        self.assertEqual(len(whole), 3 * MiB + 5)
        self.assertEqual(pattern.chunk(MiB - 3, 7), whole[MiB - 3 : MiB + 4])
        self.assertEqual(pattern.chunk(100, 2 * MiB), whole[100 : 100 + 2 * MiB])
        self.assertEqual(pattern.sha256(3 * MiB + 5), hashlib.sha256(whole).hexdigest())

    def test_every_mib_differs(self) -> None:
        """Each MiB starts with its number and is rotated differently, so no range repeats at another MiB."""
        pattern = Pattern()
        blocks = [pattern.block(i) for i in range(8)]
        self.assertEqual([b[:8] for b in blocks], [i.to_bytes(8, "big") for i in range(8)])
        self.assertEqual(len({b[8:4096] for b in blocks}), 8)
        self.assertEqual(Pattern().block(5), blocks[5])
        self.assertNotEqual(Pattern(b"other seed").block(5), blocks[5])


class SenderTests(unittest.TestCase):
    def connect(self, size: int, **kwargs) -> tuple[PatternSender, _Transport]:
        sender = PatternSender(size, chunk=1000, **kwargs)
        transport = _Transport()
        sender.makeConnection(transport)
        return sender, transport

    def test_streams_then_closes(self) -> None:
        """A registered streaming producer writes everything, unregisters and loses the connection."""
        sender, transport = self.connect(2500)
        verifyObject(IPushProducer, sender)
        self.assertEqual(transport.value(), Pattern().chunk(0, 2500))
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(sender.sha256, Pattern().sha256(2500))
        self.assertEqual(sender.path, "relay:azure")
        sender.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(sender.ended.called)

    def test_pause_and_resume(self) -> None:
        """Paused from inside a write, it writes nothing more until resumed."""
        sender = PatternSender(5000, chunk=1000)
        transport = _Transport()
        transport.write = lambda data, write=transport.write: (write(data), sender.pauseProducing())
        sender.makeConnection(transport)
        self.assertEqual(len(transport.value()), 1000)
        self.assertTrue(transport.streaming)
        sender.resumeProducing()
        self.assertEqual(len(transport.value()), 2000)
        sender.stopProducing()
        sender.resumeProducing()
        self.assertEqual(len(transport.value()), 2000)
        self.assertEqual(sender.pauses, 2)

    def test_paced(self) -> None:
        """With rate=, it writes about rate bytes per second, on the clock."""
        clock = Clock()
        sender, transport = self.connect(10_000, rate=2000, clock=clock)
        self.assertEqual(len(transport.value()), 1000)
        clock.advance(1)
        self.assertEqual(len(transport.value()), 3000)
        for _ in range(10):
            clock.advance(0.5)
        self.assertEqual(transport.value(), Pattern().chunk(0, 10_000))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_lost_stops_the_pacing(self) -> None:
        clock = Clock()
        sender, transport = self.connect(10_000, rate=2000, clock=clock)
        sender.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(clock.getDelayedCalls(), [])


class ReceiverTests(unittest.TestCase):
    def connect(self, **kwargs) -> tuple[ReceiverFactory, object, Clock]:
        clock = Clock()
        factory = ReceiverFactory(clock=clock, **kwargs)
        first = factory.first()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(_Transport())
        self.assertIs(self.successResultOf(first), protocol)
        self.assertIs(self.successResultOf(factory.first()), protocol)
        return factory, protocol, clock

    def test_whole_stream(self) -> None:
        """Chunks of the pattern in order: counted, hashed, no mismatch; the waiters fire."""
        factory, protocol, clock = self.connect()
        half = protocol.arrived(1500)
        data = Pattern().chunk(0, 3000)
        for start in range(0, 3000, 700):
            clock.advance(0.1 if start != 2100 else 0.4)
            protocol.dataReceived(data[start : start + 700])
        self.assertIs(self.successResultOf(half), protocol)
        self.assertIs(self.successResultOf(protocol.arrived(10)), protocol)
        self.assertEqual(protocol.received, 3000)
        self.assertEqual(protocol.sha256, hashlib.sha256(data).hexdigest())
        self.assertIsNone(protocol.mismatch_at)
        self.assertAlmostEqual(protocol.longest_gap, 0.4)
        self.assertEqual(protocol.longest_gap_at, 2100)
        self.assertEqual((factory.built, factory.made), (1, 1))

    def test_catches_loss_duplication_and_reordering(self) -> None:
        data = Pattern().chunk(0, 4000)
        for name, chunks, at in (
            ("lost", [data[:1000], data[1500:]], 1000),
            ("duplicated", [data[:1000], data[500:1000], data[1000:]], 1000),
            ("reordered", [data[:1000], data[2000:3000], data[1000:2000]], 1000),
            ("flipped", [data[:1234] + b"\0" + data[1235:]], 1234 if data[1234] else None),
        ):
            _, protocol, _ = self.connect()
            for chunk in chunks:
                protocol.dataReceived(chunk)
            self.assertEqual(protocol.mismatch_at, at, name)

    def test_ends_early(self) -> None:
        """A waiter for bytes that never come fails when the connection ends, saying how."""
        factory, protocol, clock = self.connect()
        waiting = protocol.arrived(100)
        protocol.dataReceived(Pattern().chunk(0, 10))
        protocol.connectionLost(Failure(ConnectionLost("cut")))
        failure = self.failureResultOf(waiting, StreamEnded)
        self.assertIn("after 10 of 100 bytes", str(failure.value))
        self.failureResultOf(protocol.arrived(200), StreamEnded)
        self.assertTrue(protocol.ended.called)

    def test_pauses(self) -> None:
        """At pause_at the transport is paused for pause_for seconds; the pause is no gap in delivery."""
        factory, protocol, clock = self.connect(pause_at=1000, pause_for=60)
        data = Pattern().chunk(0, 2000)
        protocol.dataReceived(data[:1000])
        self.assertEqual(protocol.transport.producerState, "paused")
        clock.advance(60)
        self.assertEqual(protocol.transport.producerState, "producing")
        clock.advance(0.5)
        protocol.dataReceived(data[1000:])
        self.assertEqual(protocol.during_pause, 0)
        self.assertEqual(protocol.longest_gap, 0.5)
        self.assertEqual(protocol.received, 2000)

    def test_pause_cancelled_by_end(self) -> None:
        factory, protocol, clock = self.connect(pause_at=10, pause_for=60)
        protocol.dataReceived(Pattern().chunk(0, 10))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_counts_connections(self) -> None:
        factory, protocol, _ = self.connect()
        again = factory.buildProtocol(None)
        again.makeConnection(_Transport())
        self.assertEqual((factory.built, factory.made), (2, 2))


class StringsTests(unittest.TestCase):
    def test_endpoint(self) -> None:
        """auto: strings name both relays (or only the primary), then the extra parameters."""
        from .relayprocess import RelayProcess

        azure, vercel = RelayProcess(port=7001), RelayProcess(port=7002)
        both = RelayPair("psk1-x", azure, vercel).endpoint(ping=1)
        self.assertEqual(
            both, "auto:key=psk1-x:azure=ws\\://127.0.0.1\\:7001:vercel=ws\\://127.0.0.1\\:7002:ping=1:direct=off"
        )
        one = RelayPair("psk1-x", azure).endpoint()
        self.assertEqual(one, "auto:key=psk1-x:azure=ws\\://127.0.0.1\\:7001:relays=azure:direct=off")
        self.assertIs(RelayPair("k", azure, vercel).relay("relay:vercel"), vercel)
        self.assertRaises(AssertionError, RelayPair("k", azure).relay, "relay:vercel")
        self.assertEqual(RelayPair("k", azure).server_endpoint(), RelayPair("k", azure).client_endpoint())

    def test_relay_endpoints(self) -> None:
        """relay: strings: the listener through one URL, the client through another, then the parameters."""
        relays = RelayEndpoints("psk1-x", "ws\\://127.0.0.1\\:7001", "ws\\://127.0.0.1\\:7002")
        self.assertEqual(relays.server_endpoint(), "relay:url=ws\\://127.0.0.1\\:7001:key=psk1-x")
        self.assertEqual(relays.client_endpoint(wait=0), "relay:url=ws\\://127.0.0.1\\:7002:key=psk1-x:wait=0")

    def test_registered(self) -> None:
        """An auto: port is registered when every relay is; a relay: port when it is connected."""

        class Auto:
            transports = {"relay:azure": True, "relay:vercel": False}

        class Relay:
            connected = True

        self.assertFalse(registered(Auto()))
        Auto.transports["relay:vercel"] = True
        self.assertTrue(registered(Auto()))
        self.assertTrue(registered(Relay()))
        Relay.connected = False
        self.assertFalse(registered(Relay()))

    def test_describe(self) -> None:
        self.assertEqual(describe(None), "still open")
        self.assertEqual(
            describe(Failure(ConnectionLost("cut"))),
            "ConnectionLost: Connection to the other side was lost in a non-clean fashion: cut.",
        )
        self.assertEqual(window(), 16 * MiB)  # the session's default (no window= in the extras)
