"""
The end-to-end layer over in-memory pipes: handshake, records, closes,
flow control, and the errors a user sees.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.address import PeerAddress
from pluresync.errors import (
    HandshakeError,
    NotChosenError,
    PeerMismatchError,
    PluresyncError,
    RecordError,
    TruncatedStreamError,
    WrongKeyError,
)
from pluresync.interfaces import IPipeReceiver
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.secure.channel import IMessageTransport, IRecordReceiver, SecureChannel
from pluresync.secure.establish import attach, secure_pipe
from pluresync.secure.frames import MAX_RECORD_PAYLOAD
from pluresync.secure.handshake import Handshake

from .memorypipe import connected_pipes, pump


class Recorder(Protocol):
    """Keeps everything that happens to it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Failure | None = None
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason

    @property
    def data(self) -> bytes:
        return b"".join(self.received)


@implementer(IRecordReceiver)
class MessageRecorder(Recorder):
    """Wants message boundaries."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []
        self._partial: list[bytes] = []

    def recordReceived(self, payload: bytes, end: bool) -> None:
        self._partial.append(payload)
        if end:
            self.messages.append(b"".join(self._partial))
            self._partial = []


def make_pair(test, *, responder_key=None, expected_peer=None, firewall=None):
    """Two channels joined by memory pipes, handshake started, nothing pumped."""
    key = SyncKey.generate()
    other_key = responder_key or key
    initiator_id, responder_id = PeerIdentity.generate(), PeerIdentity.generate()
    initiator = SecureChannel(
        Handshake(True, initiator_id, key.topic("t"), expected_peer=expected_peer), "test", initiator_id.peer_id
    )
    responder = SecureChannel(
        Handshake(False, responder_id, other_key.topic("t"), firewall=firewall), "test", responder_id.peer_id
    )
    a, b = connected_pipes()
    a.channel, b.channel = initiator, responder
    results = {"initiator": [], "responder": []}
    initiator.secured.addBoth(results["initiator"].append)
    responder.secured.addBoth(results["responder"].append)
    initiator.startPipe(a)
    responder.startPipe(b)
    return initiator, responder, a, b, results, initiator_id, responder_id


def open_pair(test, protocol_class=Recorder):
    """
    A completed handshake: the initiator is secured after READY; the
    responder only once the initiator attached (chose) its side.
    """
    initiator, responder, a, b, results, iid, rid = make_pair(test)
    pump(a, b)
    test.assertEqual(results["initiator"], [rid.peer_id])
    test.assertEqual(results["responder"], [])
    left, right = protocol_class(), protocol_class()
    initiator.attach(left)
    pump(a, b)
    test.assertEqual(results["responder"], [iid.peer_id])
    responder.attach(right)
    return initiator, responder, a, b, left, right


class HandshakeTests(SynchronousTestCase):
    """The Noise handshake as run over a pipe."""

    def test_both_sides_learn_the_proven_peer_id(self):
        """Each side's secured Deferred fires with the other side's public key."""
        open_pair(self)

    def test_wrong_key_fails_both_sides_with_a_clear_error(self):
        """
        A responder with a different sync key refuses frame 3, and both
        sides get a WrongKeyError whose message says the key is not shared.
        """
        _, _, a, b, results, _, _ = make_pair(self, responder_key=SyncKey.generate())
        pump(a, b)
        for side in ("initiator", "responder"):
            [failure] = results[side]
            self.assertIsInstance(failure, Failure)
            failure.trap(WrongKeyError)
            self.assertIn("does not share this sync key", str(failure.value))

    def test_expected_peer_mismatch(self):
        """A client that asked for a particular peer refuses any other."""
        other = PeerIdentity.generate()
        _, _, a, b, results, _, _ = make_pair(self, expected_peer=other.public)
        pump(a, b)
        results["initiator"][0].trap(PeerMismatchError)
        results["responder"][0].trap(HandshakeError)
        self.assertIn("refused", str(results["responder"][0].value))

    def test_firewall_refuses(self):
        """A responder's firewall callback can refuse an authenticated peer."""
        seen = []

        def firewall(peer_id):
            seen.append(peer_id)
            return False

        _, _, a, b, results, iid, _ = make_pair(self, firewall=firewall)
        pump(a, b)
        self.assertEqual(seen, [iid.peer_id])
        results["initiator"][0].trap(HandshakeError)
        results["responder"][0].trap(HandshakeError)

    def test_garbage_instead_of_a_handshake(self):
        """Bytes that are not a Noise message fail the handshake, not the process."""
        key = SyncKey.generate()
        rid = PeerIdentity.generate()
        responder = SecureChannel(Handshake(False, rid, key.topic()), "test", rid.peer_id)
        _, b = connected_pipes()
        b.channel = responder
        results = []
        responder.secured.addBoth(results.append)
        responder.startPipe(b)
        responder.pipeDataReceived(b"\x00\x40" + b"\xff" * 64)
        results[0].trap(HandshakeError)
        self.assertTrue(b.closed)

    def test_carrier_ends_during_handshake(self):
        """A pipe that ends mid-handshake fails the handshake with a HandshakeError."""
        _, _, a, b, results, _, _ = make_pair(self)
        a.end(Failure(ConnectionDone()))
        results["initiator"][0].trap(HandshakeError)

    def test_discarded_channel_never_reaches_the_responder(self):
        """
        An initiator that secures a channel but discards it (it lost a race)
        closes it cleanly, and the responder builds nothing for it.
        """
        initiator, _, a, b, results, _, _ = make_pair(self)
        pump(a, b)
        initiator.discard()
        pump(a, b)
        results["responder"][0].trap(NotChosenError)
        self.assertTrue(a.closed and b.closed)

    def test_data_before_choice_is_refused(self):
        """A responder waiting for USE refuses a data record."""
        initiator, _, a, b, results, _, _ = make_pair(self)
        pump(a, b)
        initiator._pipe.write(initiator._seal(b"\x00sneaky"))
        pump(a, b)
        results["responder"][0].trap(HandshakeError)

    def test_cancel_aborts_the_pipe(self):
        """Cancelling the secured Deferred drops the pipe."""
        initiator, _, a, b, results, _, _ = make_pair(self)
        initiator.secured.cancel()
        self.assertTrue(a.aborted)


class RecordTests(SynchronousTestCase):
    """Data, messages and closes after the handshake."""

    def test_interfaces(self):
        """The transport given to protocols provides what Twisted programs expect."""
        initiator, _, _, _, left, _ = open_pair(self)
        self.assertIs(left.transport, initiator)
        for iface in (ITransport, IPushProducer, IConsumer, IMessageTransport, IPipeReceiver):
            self.assertTrue(verifyObject(iface, initiator))
        self.assertEqual(initiator.getPeer().transport, "test")

    def test_bytes_both_ways(self):
        """Writes arrive in order on the other side, both directions."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.write(b"hello ")
        left.transport.writeSequence([b"wor", b"ld"])
        right.transport.write(b"back")
        pump(a, b)
        self.assertEqual(right.data, b"hello world")
        self.assertEqual(left.data, b"back")

    def test_large_write_is_split_into_records(self):
        """A write larger than one record arrives whole, in several records."""
        _, _, a, b, left, right = open_pair(self)
        blob = bytes(range(256)) * 1100  # 5 records
        left.transport.write(blob)
        # Records go out two per pipe write (one WebSocket message each).
        self.assertEqual(len(a.outgoing), 3)
        pump(a, b)
        self.assertEqual(right.data, blob)
        self.assertEqual(len(right.received), 5)
        self.assertTrue(all(len(chunk) <= MAX_RECORD_PAYLOAD for chunk in right.received))

    def test_message_boundaries(self):
        """writeMessage boundaries survive, including empty and multi-record messages."""
        _, _, a, b, left, right = open_pair(self, MessageRecorder)
        messages = [b"one", b"", b"x" * (MAX_RECORD_PAYLOAD * 2 + 5), b"last"]
        for m in messages:
            left.transport.writeMessage(m)
        pump(a, b)
        self.assertEqual(right.messages, messages)

    def test_no_plaintext_on_the_wire(self):
        """Every byte the carrier sees is ciphertext: the plaintext is nowhere in it."""
        _, _, a, b, left, right = open_pair(self)
        secret = b"the quarterly numbers are up 12 percent"
        left.transport.write(secret)
        right.transport.write(secret)
        pump(a, b)
        wire = b"".join(a.tap) + b"".join(b.tap)
        self.assertNotIn(secret, wire)
        self.assertNotIn(secret[:12], wire)
        self.assertEqual(right.data, secret)

    def test_clean_close(self):
        """loseConnection sends an authenticated close: both sides see ConnectionDone."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.write(b"last words")
        left.transport.loseConnection()
        pump(a, b)
        self.assertEqual(right.data, b"last words")
        right.lost.trap(ConnectionDone)
        left.lost.trap(ConnectionDone)

    def test_truncation_is_an_error(self):
        """A carrier that ends cleanly without the close record is a truncation."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.write(b"partial")
        pump(a, b)
        b.end(Failure(ConnectionDone()))
        right.lost.trap(TruncatedStreamError)
        self.assertFalse(right.lost.check(ConnectionDone))
        self.assertIn("authenticated close", str(right.lost.value))

    def test_tampered_record(self):
        """A flipped bit in a record is a RecordError and the pipe is dropped."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.write(b"payload")
        [wire] = a.outgoing
        a.outgoing[0] = wire[:-1] + bytes([wire[-1] ^ 1])
        pump(a, b)
        right.lost.trap(RecordError)
        self.assertTrue(b.aborted)
        self.assertEqual(right.data, b"")

    def test_replayed_record(self):
        """A record delivered twice is refused (its sequence number is stale)."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.write(b"once")
        [wire] = a.outgoing
        a.outgoing.append(wire)
        pump(a, b)
        self.assertEqual(right.data, b"once")
        right.lost.trap(RecordError)

    def test_abort(self):
        """abortConnection drops the pipe and reports ConnectionAborted."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.abortConnection()
        self.assertTrue(a.aborted)
        left.lost.trap(ConnectionAborted)

    def test_writes_after_close_are_ignored(self):
        """As with TCP, writing after loseConnection sends nothing."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.loseConnection()
        sent = len(a.outgoing)
        left.transport.write(b"too late")
        self.assertEqual(len(a.outgoing), sent)


class FlowControlTests(SynchronousTestCase):
    """Pausing and producers pass through to the pipe."""

    def test_pause_stops_reading_and_delivery(self):
        """
        A paused protocol gets nothing, the pipe stops reading (so the relay
        stops the sender), and resuming delivers what was held.
        """
        _, _, a, b, left, right = open_pair(self)
        right.transport.pauseProducing()
        self.assertFalse(b.reading)
        left.transport.write(b"held")
        pump(a, b)
        self.assertEqual(right.data, b"")
        right.transport.resumeProducing()
        self.assertTrue(b.reading)
        pump(a, b)
        self.assertEqual(right.data, b"held")

    def test_pause_inside_dataReceived(self):
        """Records already received are held when the protocol pauses mid-delivery."""
        _, _, a, b, left, right = open_pair(self)

        def pausing(data, original=right.dataReceived):
            original(data)
            right.transport.pauseProducing()

        right.dataReceived = pausing
        left.transport.write(b"1")
        left.transport.write(b"2")
        pump(a, b)
        self.assertEqual(right.received, [b"1"])
        right.transport.resumeProducing()
        self.assertEqual(right.received, [b"1", b"2"])

    def test_register_producer(self):
        """A producer registered on the channel is throttled by the pipe."""
        _, _, a, b, left, right = open_pair(self)
        producer = object()
        left.transport.registerProducer(producer, True)
        self.assertIs(a.producer, producer)
        self.assertTrue(a.streaming)
        left.transport.unregisterProducer()
        self.assertIsNone(a.producer)


class WireFormatTests(SynchronousTestCase):
    """The bytes match docs/protocol.md's worked example."""

    def test_documented_example(self):
        """The initiator's first 5-byte write is a 32-byte frame: length 30, seq 1 (after USE)."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.write(b"hello")
        [wire] = a.outgoing
        self.assertEqual(len(wire), 32)
        self.assertEqual(wire[:10], b"\x00\x1e" + b"\x00" * 7 + b"\x01")


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    """A protocol that understands half-close, like `pluresync connect` will."""

    def __init__(self) -> None:
        super().__init__()
        self.read_lost = False
        self.write_lost = False

    def readConnectionLost(self) -> None:
        self.read_lost = True

    def writeConnectionLost(self) -> None:
        self.write_lost = True


class HalfCloseTests(SynchronousTestCase):
    """loseWriteConnection: the SHUTDOWN record."""

    def test_half_close_then_reply(self):
        """
        One side ends its direction; the other reads to the end, replies, and
        ends its own: both see a clean close, nothing is lost.
        """
        _, _, a, b, left, right = open_pair(self, HalfCloser)
        left.transport.write(b"request")
        left.transport.loseWriteConnection()
        self.assertTrue(left.write_lost)
        pump(a, b)
        self.assertEqual(right.data, b"request")
        self.assertTrue(right.read_lost)
        self.assertIsNone(right.lost)
        right.transport.write(b"response")
        right.transport.loseWriteConnection()
        pump(a, b)
        self.assertEqual(left.data, b"response")
        left.lost.trap(ConnectionDone)
        right.lost.trap(ConnectionDone)

    def test_plain_protocol_is_closed_at_end_of_input(self):
        """A protocol that is not half-closeable is closed at the peer's SHUTDOWN, as with TCP."""
        _, _, a, b, left, right = open_pair(self)
        left.transport.write(b"all of it")
        left.transport.loseWriteConnection()
        pump(a, b)
        self.assertEqual(right.data, b"all of it")
        right.lost.trap(ConnectionDone)
        left.lost.trap(ConnectionDone)

    def test_writes_after_half_close_are_dropped(self):
        """After loseWriteConnection nothing more is sent."""
        _, _, a, b, left, right = open_pair(self, HalfCloser)
        left.transport.loseWriteConnection()
        sent = len(a.outgoing)
        left.transport.write(b"late")
        left.transport.writeMessage(b"late")
        self.assertEqual(len(a.outgoing), sent)

    def test_data_after_shutdown_is_refused(self):
        """A peer that sends data after its SHUTDOWN breaks the protocol: RecordError."""
        initiator, _, a, b, left, right = open_pair(self, HalfCloser)
        initiator._sendRecord(b"\x05")
        initiator._sendRecord(b"\x00sneaky")
        pump(a, b)
        right.lost.trap(RecordError)

    def test_close_while_half_closed(self):
        """
        loseConnection still closes cleanly after either direction was shut,
        and the other side sees an orderly end.
        """
        for shut_ours in (True, False):
            with self.subTest(shut_ours=shut_ours):
                _, _, a, b, left, right = open_pair(self, HalfCloser)
                if shut_ours:
                    left.transport.loseWriteConnection()
                else:
                    right.transport.loseWriteConnection()
                    pump(a, b)
                    self.assertTrue(left.read_lost)
                left.transport.loseConnection()
                pump(a, b)
                a.end(Failure(ConnectionDone()))
                left.lost.trap(ConnectionDone)
                right.lost.trap(ConnectionDone)

    def test_pipe_lost_while_half_closed_is_truncation(self):
        """A pipe that ends during a half-close, without the peer's CLOSE, is a truncated stream."""
        _, _, a, b, left, right = open_pair(self, HalfCloser)
        left.transport.loseWriteConnection()
        pump(a, b)
        self.assertTrue(right.read_lost)
        b.end(Failure(ConnectionDone()))
        right.lost.trap(TruncatedStreamError)

    def test_shutdown_twice_is_one_shutdown(self):
        """A second loseWriteConnection sends nothing and does not close."""
        _, _, a, b, left, right = open_pair(self, HalfCloser)
        left.transport.loseWriteConnection()
        sent = len(a.outgoing)
        left.transport.loseWriteConnection()
        self.assertEqual(len(a.outgoing), sent)
        self.assertFalse(a.closed)


class EstablishTests(SynchronousTestCase):
    """secure_pipe and attach: what every path does between its pipe and the user's protocol."""

    def secure_both(self, **initiator_options):
        key = SyncKey.generate()
        self.initiator_id, self.responder_id = PeerIdentity.generate(), PeerIdentity.generate()
        a, b = connected_pipes()

        def binder(pipe):
            def bind(receiver):
                pipe.channel = receiver
                return pipe

            return bind

        initiating = secure_pipe(
            binder(a),
            initiator=True,
            name="path:a",
            identity=self.initiator_id,
            topic=key.topic("t"),
            **initiator_options,
        )
        responding = secure_pipe(
            binder(b), initiator=False, name="path:b", identity=self.responder_id, topic=key.topic("t")
        )
        return initiating, responding, a, b

    def test_secured_and_unattached(self):
        """The initiator's Deferred fires with a secured channel no protocol sees yet; the pipe feeds it."""
        initiating, responding, a, b = self.secure_both()
        pump(a, b)
        channel = self.successResultOf(initiating)
        self.assertIsInstance(channel, SecureChannel)
        self.assertIs(a.channel, channel)
        self.assertEqual(channel.getPeer(), PeerAddress("path:a", self.responder_id.peer_id))
        self.assertEqual(channel.getHost(), PeerAddress("path:a", self.initiator_id.peer_id))
        self.assertNoResult(responding)

    def test_attach_builds_for_the_peer(self):
        """attach builds the protocol with the channel's peer address and connects it; the responder follows."""
        initiating, responding, a, b = self.secure_both()
        pump(a, b)
        seen = []

        class Factory:
            def buildProtocol(self, addr):
                seen.append(addr)
                return Recorder()

        protocol = attach(self.successResultOf(initiating), Factory())
        self.assertTrue(protocol.made)
        self.assertEqual(seen, [PeerAddress("path:a", self.responder_id.peer_id)])
        pump(a, b)
        responder = attach(self.successResultOf(responding), Factory())
        self.assertEqual(seen[-1], PeerAddress("path:b", self.initiator_id.peer_id))
        protocol.transport.write(b"hi")
        pump(a, b)
        self.assertEqual(responder.data, b"hi")

    def test_factory_refuses(self):
        """A factory returning None: the channel is aborted and attach raises, saying why."""
        initiating, _, a, b = self.secure_both()
        pump(a, b)

        class Refusing:
            def buildProtocol(self, addr):
                return None

        error = self.assertRaises(PluresyncError, attach, self.successResultOf(initiating), Refusing())
        self.assertIn("buildProtocol returned None", str(error))
        self.assertTrue(a.aborted)

    def test_expected_peer(self):
        """expected_peer reaches the handshake: another listener is refused."""
        initiating, responding, a, b = self.secure_both(expected_peer=PeerIdentity.generate().public)
        pump(a, b)
        self.failureResultOf(initiating, PeerMismatchError)
        self.failureResultOf(responding, HandshakeError)

    def test_cancel_aborts_the_pipe(self):
        """Cancelling the attempt aborts the pipe."""
        initiating, responding, a, _ = self.secure_both()
        initiating.cancel()
        self.failureResultOf(initiating, CancelledError)
        self.assertTrue(a.aborted)
        self.assertNoResult(responding)
