"""
A link: one pipe's Noise handshake, the version 2 negotiation in its
payloads, and the strict sealing of its records, over in-memory pipes.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.errors import (
    HandshakeError,
    NotChosenError,
    PeerMismatchError,
    RecordError,
    RelayLostError,
    VersionError,
    WrongKeyError,
)
from pluresync.interfaces import IPipe, IPipeReceiver
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.secure.establish import secure_link
from pluresync.secure.frames import SEQ, AbortReason, FrameDecoder, RecordType, frame, split_record
from pluresync.secure.handshake import Handshake, HandshakeAborted
from pluresync.secure.link import ILinkOwner, Link, LinkRefused
from pluresync.session import wire
from pluresync.session.wire import Hello, Intent, ReadyAnswer, Status

from .memorypipe import connected_pipes, pump

WINDOW = 1 << 20
#: The abort reasons a version 1 peer knows; any other byte gives its
#: generic "the peer gave up" message.
V1_ABORT_REASONS = frozenset({0x01, 0x02, 0x03})


def new_hello() -> Hello:
    return Hello(Intent.NEW, bytes(wire.SESSION_ID_SIZE), 0, WINDOW)


def accept_all(hello: Hello, secured) -> ReadyAnswer:
    return ReadyAnswer(Status.OK, 0, WINDOW)


@implementer(ILinkOwner)
class Owner:
    """A session as a link sees it: keeps what the link delivers."""

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []
        self.lost: list[Failure] = []

    def linkRecord(self, link, kind, plaintext):
        self.records.append((kind, plaintext[1:]))

    def linkLost(self, link, reason):
        self.lost.append(reason)


def seal(cipher, plaintext: bytes) -> bytes:
    """One record's frame, sealed by hand (what a peer's link would write)."""
    seq = cipher.nonce
    return frame(SEQ.pack(seq) + cipher.encrypt(b"", plaintext))


@implementer(IPipeReceiver)
class RawPeer:
    """
    A bare L{Handshake} over a pipe, driven by hand: a version 1 peer, or a
    peer that says what a test wants it to say after the handshake.
    """

    def __init__(self, handshake: Handshake, pipe) -> None:
        self.handshake = handshake
        self.pipe = pipe
        pipe.channel = self
        self.decoder = FrameDecoder()
        self.send = self.receive = None
        self.aborted: HandshakeAborted | None = None
        self.notices: list[bytes] = []
        self.records: list[bytes] = []
        self.lost: Failure | None = None
        for body in handshake.start():
            pipe.write(frame(body))

    def pipeDataReceived(self, data: bytes) -> None:
        self.decoder.feed(data)
        while (body := self.decoder.next()) is not None:
            if self.receive is not None:
                if len(body) == 1:
                    self.notices.append(body)
                    continue
                seq, ciphertext = split_record(body)
                assert seq == self.receive.nonce
                self.records.append(self.receive.decrypt(b"", ciphertext))
                continue
            if len(body) == 1:
                self.notices.append(body)
                continue
            try:
                out, secured = self.handshake.receive(body)
            except HandshakeAborted as aborted:
                self.aborted = aborted
                return
            for out_body in out:
                self.pipe.write(frame(out_body))
            if secured is None and self.handshake.initiator:
                secured = self.handshake.pending()
            if secured is not None:
                self.secured = secured
                self.send, self.receive = secured.send, secured.receive

    def pipeLost(self, reason: Failure) -> None:
        self.lost = reason

    def sendRecord(self, plaintext: bytes) -> None:
        self.pipe.write(seal(self.send, plaintext))


class Pair:
    """Two links joined by memory pipes, their handshakes started, nothing pumped."""

    def __init__(
        self,
        *,
        responder_key=None,
        expected_peer=None,
        firewall=None,
        resolver=accept_all,
        payload=None,
        hello=new_hello,
    ) -> None:
        key = SyncKey.generate()
        self.initiator_id, self.responder_id = PeerIdentity.generate(), PeerIdentity.generate()
        box: list[Link] = []
        handshake = Handshake(
            True,
            self.initiator_id,
            key.topic("t"),
            expected_peer=expected_peer,
            payload=payload or (lambda: box[0].hello_payload()),
        )
        self.initiator = Link(handshake, "test:a", hello=hello)
        box.append(self.initiator)
        self.responder = Link(
            Handshake(False, self.responder_id, (responder_key or key).topic("t"), firewall=firewall),
            "test:b",
            resolver=resolver,
        )
        self.a, self.b = connected_pipes()
        self.a.channel, self.b.channel = self.initiator, self.responder
        self.results: dict[str, list] = {"initiator": [], "responder": []}
        self.initiator.secured.addBoth(self.results["initiator"].append)
        self.responder.secured.addBoth(self.results["responder"].append)
        self.initiator.startPipe(self.a)
        self.responder.startPipe(self.b)

    def pump(self) -> None:
        pump(self.a, self.b)

    def failure(self, side: str) -> Failure:
        [result] = self.results[side]
        assert isinstance(result, Failure), result
        return result


def open_pair(test) -> tuple[Pair, Owner, Owner]:
    """Both links in use: the initiator was secured by READY and chose its link; owners adopted both."""
    pair = Pair()
    pair.pump()
    test.assertEqual(pair.results["initiator"], [pair.initiator])
    test.assertEqual(pair.results["responder"], [])
    pair.initiator.use()
    pair.pump()
    test.assertEqual(pair.results["responder"], [pair.responder])
    left, right = Owner(), Owner()
    pair.initiator.adopt(left)
    pair.responder.adopt(right)
    return pair, left, right


def against_raw_peer():
    """
    A version 2 initiator, made as every path makes it (L{secure_link}),
    facing a responder the test drives by hand, pumped through frame 3:
    the raw peer, the pipes and where the initiator's result lands.
    """
    key = SyncKey.generate()
    a, b = connected_pipes()

    def bind(link):
        a.channel = link
        return a

    results: list = []
    secure_link(
        bind, initiator=True, name="test:a", identity=PeerIdentity.generate(), topic=key.topic("t"), hello=new_hello
    ).addBoth(results.append)
    peer = RawPeer(Handshake(False, PeerIdentity.generate(), key.topic("t")), b)
    pump(a, b)
    return peer, a, b, results


class HandshakeTests(SynchronousTestCase):
    """The Noise handshake of one link, as run over a pipe."""

    def test_interfaces(self):
        """A link is what a pipe delivers to; the fakes provide what they stand for."""
        pair, left, _ = open_pair(self)
        self.assertTrue(verifyObject(IPipeReceiver, pair.initiator))
        self.assertTrue(verifyObject(IPipeReceiver, pair.responder))
        self.assertTrue(verifyObject(IPipe, pair.a))
        self.assertTrue(verifyObject(ILinkOwner, left))
        self.assertTrue(
            verifyObject(
                IPipeReceiver,
                RawPeer(Handshake(True, pair.initiator_id, SyncKey.generate().topic()), connected_pipes()[0]),
            )
        )

    def test_both_sides_learn_the_proven_peer_id(self):
        """
        Each side learns the other's proven peer id and static key; both
        derive the same handshake hash; the initiator is secured at READY,
        the responder only once chosen.
        """
        pair, _, _ = open_pair(self)
        self.assertEqual(pair.initiator.peer_id, pair.responder_id.peer_id)
        self.assertEqual(pair.responder.peer_id, pair.initiator_id.peer_id)
        self.assertEqual(pair.initiator.peer_static, pair.responder_id.public)
        self.assertEqual(pair.responder.peer_static, pair.initiator_id.public)
        self.assertEqual(len(pair.initiator.handshake_hash), 64)
        self.assertEqual(pair.initiator.handshake_hash, pair.responder.handshake_hash)
        self.assertTrue(pair.initiator.usable and pair.responder.usable)
        self.assertEqual(pair.responder.hello, pair.initiator.hello)
        self.assertEqual(pair.initiator.answer, ReadyAnswer(Status.OK, 0, WINDOW))

    def test_wrong_key_fails_both_sides_with_a_clear_error(self):
        """
        A responder with a different sync key refuses frame 3, and both
        sides get a WrongKeyError whose message says the key is not shared.
        """
        pair = Pair(responder_key=SyncKey.generate())
        pair.pump()
        for side in ("initiator", "responder"):
            failure = pair.failure(side)
            failure.trap(WrongKeyError)
            self.assertIn("does not share this sync key", str(failure.value))
        self.assertTrue(pair.a.closed and pair.b.closed)

    def test_expected_peer_mismatch(self):
        """An initiator that asked for a particular peer refuses any other; the responder hears 'refused'."""
        pair = Pair(expected_peer=PeerIdentity.generate().public)
        pair.pump()
        pair.failure("initiator").trap(PeerMismatchError)
        pair.failure("responder").trap(HandshakeError)
        self.assertIn("refused", str(pair.failure("responder").value))

    def test_firewall_refuses(self):
        """A responder's firewall (the Handshake's parameter) can refuse an authenticated peer."""
        seen = []

        def firewall(peer_id):
            seen.append(peer_id)
            return False

        pair = Pair(firewall=firewall)
        pair.pump()
        self.assertEqual(seen, [pair.initiator_id.peer_id])
        pair.failure("initiator").trap(HandshakeError)
        self.assertIn("refused", str(pair.failure("initiator").value))
        pair.failure("responder").trap(HandshakeError)
        self.assertIn("firewall", str(pair.failure("responder").value))

    def test_firewall_admits(self):
        """A firewall that says yes lets the link through."""
        pair = Pair(firewall=lambda peer_id: True)
        pair.pump()
        self.assertEqual(pair.results["initiator"], [pair.initiator])

    def test_garbage_instead_of_a_handshake(self):
        """Bytes that are not a Noise message fail the handshake, not the process."""
        responder = Link(
            Handshake(False, PeerIdentity.generate(), SyncKey.generate().topic()), "test", resolver=accept_all
        )
        _, b = connected_pipes()
        b.channel = responder
        results = []
        responder.secured.addBoth(results.append)
        responder.startPipe(b)
        responder.pipeDataReceived(b"\x00\x40" + b"\xff" * 64)
        results[0].trap(HandshakeError)
        self.assertTrue(b.closed)

    def test_carrier_ends_during_handshake(self):
        """A pipe that ends cleanly mid-handshake fails it with a HandshakeError that says so."""
        pair = Pair()
        pair.a.end(Failure(ConnectionDone()))
        pair.failure("initiator").trap(HandshakeError)
        self.assertIn("closed during the handshake", str(pair.failure("initiator").value))

    def test_carrier_error_during_handshake(self):
        """A pipe that fails mid-handshake fails it with the pipe's own error."""
        pair = Pair()
        pair.pump()  # the initiator is secured; the responder waits for USE
        pair.b.end(Failure(RelayLostError("the relay went away")))
        pair.failure("responder").trap(RelayLostError)

    def test_discarded_link_never_reaches_the_responder(self):
        """
        An initiator that secures a link but discards it (it lost a race)
        closes it with an authenticated CLOSE; the responder is never secured.
        """
        pair = Pair()
        pair.pump()
        pair.initiator.discard()
        pair.pump()
        pair.failure("responder").trap(NotChosenError)
        self.assertTrue(pair.a.closed and pair.b.closed)
        self.assertFalse(pair.initiator.usable)

    def test_records_before_use_are_refused(self):
        """A responder waiting for USE refuses any other record."""
        pair = Pair()
        pair.pump()
        pair.initiator.sendRecord(wire.data_record(RecordType.DATA, 0, b"sneaky"))
        pair.pump()
        pair.failure("responder").trap(HandshakeError)
        self.assertIn("before choosing", str(pair.failure("responder").value))

    def test_forged_choice_is_refused(self):
        """A USE the responder cannot authenticate fails its handshake (no USE is taken on faith)."""
        pair = Pair()
        pair.pump()
        pair.a.write(frame(SEQ.pack(0) + b"\x00" * 17))
        pair.pump()
        pair.failure("responder").trap(HandshakeError)

    def test_cancel_aborts_the_pipe(self):
        """Cancelling the secured Deferred drops the pipe."""
        pair = Pair()
        pair.initiator.secured.cancel()
        pair.failure("initiator").trap(CancelledError)
        self.assertTrue(pair.a.aborted)

    def test_secure_link(self):
        """secure_link binds the pipe to a new link and runs the handshake; the hello reaches the resolver."""
        key = SyncKey.generate()
        initiator_id, responder_id = PeerIdentity.generate(), PeerIdentity.generate()
        a, b = connected_pipes()
        heard = []

        def resolver(hello, secured):
            heard.append((hello, secured.remote_static))
            return ReadyAnswer(Status.OK, 0, WINDOW)

        def binder(pipe):
            def bind(receiver):
                pipe.channel = receiver
                return pipe

            return bind

        initiating = secure_link(
            binder(a), initiator=True, name="path:a", identity=initiator_id, topic=key.topic("t"), hello=new_hello
        )
        responding = secure_link(
            binder(b), initiator=False, name="path:b", identity=responder_id, topic=key.topic("t"), resolver=resolver
        )
        pump(a, b)
        link = self.successResultOf(initiating)
        self.assertIs(a.channel, link)
        self.assertEqual((link.name, link.peer_id), ("path:a", responder_id.peer_id))
        self.assertEqual(heard, [(new_hello(), initiator_id.public)])
        self.assertNoResult(responding)
        link.use()
        pump(a, b)
        self.assertEqual(self.successResultOf(responding).peer_id, initiator_id.peer_id)

    def test_secure_link_expected_peer_and_cancel(self):
        """expected_peer reaches the handshake; cancelling aborts the pipe."""
        key = SyncKey.generate()
        a, b = connected_pipes()

        def binder(pipe):
            def bind(receiver):
                pipe.channel = receiver
                return pipe

            return bind

        initiating = secure_link(
            binder(a),
            initiator=True,
            name="path:a",
            identity=PeerIdentity.generate(),
            topic=key.topic("t"),
            hello=new_hello,
            expected_peer=PeerIdentity.generate().public,
        )
        responding = secure_link(
            binder(b),
            initiator=False,
            name="path:b",
            identity=PeerIdentity.generate(),
            topic=key.topic("t"),
            resolver=accept_all,
        )
        pump(a, b)
        self.failureResultOf(initiating, PeerMismatchError)
        self.failureResultOf(responding, HandshakeError)
        a, _ = connected_pipes()
        again = secure_link(
            binder(a), initiator=True, name="x", identity=PeerIdentity.generate(), topic=key.topic(), hello=new_hello
        )
        again.cancel()
        self.failureResultOf(again, CancelledError)
        self.assertTrue(a.aborted)


class NegotiationTests(SynchronousTestCase):
    """Version 2 rides in the handshake's payloads: the hello in frame 3, the answer in READY."""

    def v2_responder(self, resolver=accept_all, key=None):
        key = key or SyncKey.generate()
        responder = Link(Handshake(False, PeerIdentity.generate(), key.topic("t")), "test:b", resolver=resolver)
        results = []
        responder.secured.addBoth(results.append)
        return key, responder, results

    def test_v1_initiator_is_refused_with_version(self):
        """
        A version 1 initiator (an empty frame-3 payload) is refused by a
        version 2 responder with the VERSION abort notice; the responder
        says an older pluresync tried to connect.  The notice's code is
        one a version 1 peer does not know, so it shows its generic "the
        peer gave up" message.
        """
        key, responder, results = self.v2_responder()
        a, b = connected_pipes()
        b.channel = responder
        old = RawPeer(Handshake(True, PeerIdentity.generate(), key.topic("t")), a)
        responder.startPipe(b)
        pump(a, b)
        results[0].trap(VersionError)
        self.assertIn("older pluresync", str(results[0].value))
        self.assertIn("upgrade", str(results[0].value))
        self.assertEqual(old.notices, [bytes([AbortReason.VERSION])])
        self.assertNotIn(AbortReason.VERSION, V1_ABORT_REASONS)
        self.assertTrue(b.closed)

    def test_v2_initiator_hears_version(self):
        """A version 2 initiator that is told VERSION fails with a VersionError."""
        key, responder, _ = self.v2_responder()
        a, b = connected_pipes()
        b.channel = responder
        # a version 2 link with no hello: what the VERSION notice looks like from our side
        initiator = Link(Handshake(True, PeerIdentity.generate(), key.topic("t")), "test:a")
        a.channel = initiator
        results = []
        initiator.secured.addBoth(results.append)
        initiator.startPipe(a)
        responder.startPipe(b)
        pump(a, b)
        results[0].trap(VersionError)

    def test_v1_responder(self):
        """
        A version 2 initiator meeting a version 1 responder (READY with an
        empty payload) fails with a VersionError that says to upgrade, and
        tells the responder with an authenticated CLOSE that it will not
        use the link (so the v1 listener builds nothing).
        """
        old, pair_a, pair_b, results = against_raw_peer()
        self.assertIsNotNone(old.secured)
        # A version 1 listener ignores the payload and confirms with an empty READY.
        old.sendRecord(bytes([RecordType.READY]))
        pump(pair_a, pair_b)
        results[0].trap(VersionError)
        self.assertIn("upgrade pluresync", str(results[0].value))
        self.assertEqual(old.records, [bytes([RecordType.CLOSE])])
        self.assertTrue(pair_a.closed)

    def test_malformed_hello(self):
        """
        A frame-3 payload that is not a hello is refused (MALFORMED); the
        initiator hears the peer gave up.  (A hello of another version is
        answered VERSION: test_protocol_contract.)
        """
        for payload in (b"not a hello at all, but long enough to look like one", b"PS", b"XX\x02" + bytes(40)):
            with self.subTest(payload=payload):
                pair = Pair(payload=lambda payload=payload: payload)
                pair.pump()
                failure = pair.failure("responder")
                failure.trap(HandshakeError)
                self.assertFalse(failure.check(VersionError))
                self.assertIn("handshake failed", str(failure.value))
                pair.failure("initiator").trap(HandshakeError)
                self.assertIn("gave up", str(pair.failure("initiator").value))

    def test_unknown_hello_kind(self):
        """A hello of a kind this side does not know is malformed."""
        hello = Hello(Intent.NEW, bytes(16), 0, WINDOW).encode()
        bad = hello[:3] + b"\x7f" + hello[4:]
        pair = Pair(payload=lambda: bad)
        pair.pump()
        pair.failure("responder").trap(HandshakeError)
        self.assertIn("unknown hello kind", str(pair.failure("responder").value))

    def test_refusals(self):
        """
        A refusal answer fails the initiator's secured with LinkRefused,
        carrying the answer, and saying why; the responder fails too and
        closes the pipe.
        """
        for status, words in (
            (Status.UNKNOWN_SESSION, "does not know this session"),
            (Status.NOT_YOURS, "another peer id"),
            (Status.ENDED, "has ended this session"),
        ):
            with self.subTest(status=status):
                answer = ReadyAnswer(status, 7, 1234)
                pair = Pair(resolver=lambda hello, secured, answer=answer: answer)
                pair.pump()
                failure = pair.failure("initiator")
                failure.trap(LinkRefused)
                self.assertEqual(failure.value.answer, answer)
                self.assertIn(words, str(failure.value))
                self.assertEqual(pair.initiator.answer, answer)
                pair.failure("responder").trap(LinkRefused)
                self.assertTrue(pair.a.closed and pair.b.closed)

    def test_malformed_answer(self):
        """A READY whose payload is not an answer fails the initiator's handshake."""
        peer, a, b, results = against_raw_peer()
        peer.sendRecord(bytes([RecordType.READY]) + b"XX" + bytes(30))
        pump(a, b)
        results[0].trap(HandshakeError)
        self.assertIn("not a pluresync answer", str(results[0].value))

    def test_not_ready_first(self):
        """An initiator whose first record from the responder is not READY fails the handshake."""
        peer, a, b, results = against_raw_peer()
        peer.sendRecord(wire.data_record(RecordType.DATA, 0, b"early"))
        pump(a, b)
        results[0].trap(HandshakeError)
        self.assertIn("did not confirm", str(results[0].value))

    def test_hello_is_made_when_frame_3_is_written(self):
        """The initiator's hello is made late (a resume names how far it got then), and the responder sees it."""
        made = []

        def hello():
            made.append(True)
            return Hello(Intent.RESUME, b"s" * 16, 5, WINDOW)

        pair = Pair()
        pair.initiator._make_hello = hello
        self.assertEqual(made, [])
        pair.pump()
        self.assertEqual(made, [True])
        self.assertEqual(pair.responder.hello, Hello(Intent.RESUME, b"s" * 16, 5, WINDOW))


class RecordTests(SynchronousTestCase):
    """Records on a link in use: a failure on the link fails the link (linkLost), never silently."""

    def test_records_reach_the_owner(self):
        """Records go both ways, in order, with their type and body."""
        pair, left, right = open_pair(self)
        pair.initiator.sendRecord(b"\x00one")
        pair.initiator.sendRecords([b"\x00two", b"\x01three", b"\x00four"])
        pair.responder.sendRecord(wire.ping_record(9))
        pair.pump()
        self.assertEqual(right.records, [(0, b"one"), (0, b"two"), (1, b"three"), (0, b"four")])
        self.assertEqual(left.records, [(RecordType.PING, bytes(7) + b"\x09")])

    def test_records_per_write(self):
        """Several records go out a few per pipe write (one WebSocket message each)."""
        pair, _, _ = open_pair(self)
        pair.a.outgoing.clear()
        pair.initiator.sendRecords([b"\x00x"] * 5)
        self.assertEqual(len(pair.a.outgoing), 3)

    def test_records_wait_for_the_owner(self):
        """Records that arrive before the session adopts the link are delivered when it does."""
        pair = Pair()
        pair.pump()
        pair.initiator.use()
        pair.pump()
        pair.responder.sendRecord(b"\x00early")
        pair.pump()
        owner = Owner()
        pair.initiator.adopt(owner)
        self.assertEqual(owner.records, [(0, b"early")])

    def test_lost_before_adoption(self):
        """A secured link whose pipe ends before it is adopted reports the end at adoption."""
        pair = Pair()
        pair.pump()
        pair.a.end(Failure(RelayLostError("gone")))
        self.assertEqual(pair.results["initiator"], [pair.initiator])
        pair.initiator.use()
        owner = Owner()
        pair.initiator.adopt(owner)
        [reason] = owner.lost
        reason.trap(RelayLostError)

    def test_pipe_lost_in_use(self):
        """The end of the pipe of a link in use reaches the owner once, with the pipe's reason."""
        pair, left, _ = open_pair(self)
        pair.a.end(Failure(RelayLostError("gone")))
        [reason] = left.lost
        reason.trap(RelayLostError)
        self.assertFalse(pair.initiator.usable)

    def test_tampered_record(self):
        """A flipped bit fails that link: RecordError to its owner, the pipe dropped, nothing delivered."""
        pair, left, right = open_pair(self)
        pair.initiator.sendRecord(b"\x00payload")
        [sealed] = pair.a.outgoing
        pair.a.outgoing[0] = sealed[:-1] + bytes([sealed[-1] ^ 1])
        pair.pump()
        self.assertEqual(right.records, [])
        [reason] = right.lost
        reason.trap(RecordError)
        self.assertIn("tampered", str(reason.value))
        self.assertTrue(pair.b.aborted)
        self.assertFalse(pair.responder.usable)

    def test_replayed_record(self):
        """A record delivered twice fails the link (its sequence number is stale) after the first copy."""
        pair, _, right = open_pair(self)
        pair.initiator.sendRecord(b"\x00once")
        [sealed] = pair.a.outgoing
        pair.a.outgoing.append(sealed)
        pair.pump()
        self.assertEqual(right.records, [(0, b"once")])
        [reason] = right.lost
        reason.trap(RecordError)
        self.assertIn("arrived where", str(reason.value))
        self.assertTrue(pair.b.aborted)

    def test_dropped_record(self):
        """A record missing from the pipe fails the link at the next one: nothing after the gap is delivered."""
        pair, _, right = open_pair(self)
        pair.initiator.sendRecord(b"\x00one")
        pair.initiator.sendRecord(b"\x00two")
        pair.initiator.sendRecord(b"\x00three")
        del pair.a.outgoing[1]
        pair.pump()
        self.assertEqual(right.records, [(0, b"one")])
        [reason] = right.lost
        reason.trap(RecordError)
        self.assertTrue(pair.b.aborted)

    def test_reordered_record(self):
        """Two records swapped on the pipe fail the link."""
        pair, _, right = open_pair(self)
        pair.initiator.sendRecord(b"\x00one")
        pair.initiator.sendRecord(b"\x00two")
        pair.a.outgoing.reverse()
        pair.pump()
        self.assertEqual(right.records, [])
        right.lost[0].trap(RecordError)

    def test_short_record(self):
        """A frame too short to be a record fails the link."""
        pair, _, right = open_pair(self)
        pair.a.write(frame(b"\x00" * 5))
        pair.pump()
        right.lost[0].trap(RecordError)

    def test_close_and_abort(self):
        """close ends the pipe in order, abort drops it; the owner hears linkLost either way."""
        pair, left, right = open_pair(self)
        pair.initiator.close()
        self.assertTrue(pair.a.closed)
        pair.pump()
        left.lost[0].trap(ConnectionDone)
        right.lost[0].trap(ConnectionDone)
        pair, left, right = open_pair(self)
        pair.responder.abort()
        self.assertTrue(pair.b.aborted)
        pair.pump()
        self.assertEqual(len(left.lost), 1)
        self.assertEqual(len(right.lost), 1)

    def test_no_plaintext_on_the_wire(self):
        """Records are sealed: their plaintext is nowhere on the pipe."""
        pair, _, right = open_pair(self)
        secret = b"the quarterly numbers are up 12 percent"
        pair.initiator.sendRecord(b"\x00" + secret)
        pair.pump()
        self.assertNotIn(secret[:12], b"".join(pair.a.tap))
        self.assertEqual(right.records, [(0, secret)])


AES = wire.Caps.RESUME | wire.Caps.AESGCM


class RecordCipherTests(SynchronousTestCase):
    """
    AES-GCM for records when both ends offer it (caps bit 2), in the
    authenticated hello and READY; ChaChaPoly otherwise.
    """

    def opened(self, hello_caps: int, answer_caps: int) -> tuple[Pair, Owner, Owner]:
        pair = Pair(
            hello=lambda: Hello(Intent.NEW, bytes(wire.SESSION_ID_SIZE), 0, WINDOW, hello_caps),
            resolver=lambda hello, secured: ReadyAnswer(Status.OK, 0, WINDOW, answer_caps),
        )
        pair.pump()
        pair.initiator.use()
        pair.pump()
        left, right = Owner(), Owner()
        pair.initiator.adopt(left)
        pair.responder.adopt(right)
        return pair, left, right

    def test_both_offer(self):
        """Both offer: every record after READY is AES-GCM, both ways, and arrives intact."""
        pair, left, right = self.opened(AES, AES)
        self.assertEqual((pair.initiator.cipher, pair.responder.cipher), ("AESGCM", "AESGCM"))
        pair.initiator.sendRecords([b"\x00" + bytes(70000)[:65000], b"\x00two"])
        pair.responder.sendRecord(b"\x00back")
        pair.pump()
        self.assertEqual([r[1][:3] for r in right.records], [bytes(3), b"two"])
        self.assertEqual(left.records, [(0, b"back")])

    def test_one_offers(self):
        """Either side without it: ChaChaPoly, as with a peer that predates the bit."""
        for hello_caps, answer_caps in ((AES, wire.Caps.RESUME), (wire.Caps.RESUME, AES)):
            pair, left, right = self.opened(hello_caps, answer_caps)
            self.assertEqual((pair.initiator.cipher, pair.responder.cipher), ("ChaChaPoly", "ChaChaPoly"))
            pair.initiator.sendRecord(b"\x00hi")
            pair.pump()
            self.assertEqual(right.records, [(0, b"hi")])


class ForgetTheHandshakeTests(SynchronousTestCase):
    def test_the_handshake_is_dropped_once_done(self):
        """A link in use keeps no handshake state (its ephemeral private key, a copy of the keys)."""
        pair, _, _ = open_pair(self)
        self.assertIsNone(pair.initiator._handshake)
        self.assertIsNone(pair.responder._handshake)
        self.assertTrue(pair.initiator.initiator)
        self.assertFalse(pair.responder.initiator)
