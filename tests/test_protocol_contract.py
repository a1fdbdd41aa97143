"""
docs/protocol.md as a contract (issue 12): one test per rule of the
end-to-end layer that a second implementation must follow, each holding
the code to what the text says (the section is named in each docstring).
Other rules are held by the tests their section names (test_link,
test_session, test_keys).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from nacl import bindings, pwhash
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase

from pluresync.errors import (
    HandshakeError,
    NotChosenError,
    PeerGoneError,
    PeerMismatchError,
    RecordError,
    VersionError,
    WrongKeyError,
)
from pluresync.keys import IDENTITY_PREFIX, KEY_PREFIX, PeerIdentity, SyncKey
from pluresync.relay.core.auth import mint_token, parse_secret_file
from pluresync.secure.frames import FrameDecoder, RecordType, frame
from pluresync.secure.handshake import Handshake
from pluresync.secure.link import Link
from pluresync.session import wire
from pluresync.session.wire import Hello, Intent

from .memorypipe import connected_pipes, pump
from .test_link import Pair, accept_all, against_raw_peer
from .test_session import HalfCloser, MessageRecorder, Net, numbered


def frames_written(pipe) -> list[bytes]:
    """Every frame body a link wrote on C{pipe}, in order."""
    decoder = FrameDecoder()
    decoder.feed(b"".join(pipe.tap))
    bodies = []
    while (body := decoder.next()) is not None:
        bodies.append(body)
    return bodies


class AbortNoticeTests(SynchronousTestCase):
    """
    "Abort notices": which notice is sent when, that it is the sender's last
    frame, and that the carrier is then closed in an orderly way (a relay
    WebSocket: close 1000, so the relay delivers the notice), never dropped.
    """

    def assertNoticeThenClose(self, pipe, notice: int) -> None:
        self.assertEqual(frames_written(pipe)[-1], bytes([notice]))
        self.assertTrue(pipe.closed)
        self.assertFalse(pipe.aborted)

    def test_wrong_key_is_0x01_from_the_responder(self):
        pair = Pair(responder_key=SyncKey.generate())
        pair.pump()
        pair.failure("responder").trap(WrongKeyError)
        self.assertNoticeThenClose(pair.b, 0x01)
        self.assertEqual(len(frames_written(pair.a)), 2, "the initiator sends no notice back")

    def test_peer_mismatch_is_0x02_from_the_initiator(self):
        pair = Pair(expected_peer=PeerIdentity.generate().public)
        pair.pump()
        pair.failure("initiator").trap(PeerMismatchError)
        self.assertNoticeThenClose(pair.a, 0x02)
        self.assertEqual(len(frames_written(pair.a)), 2, "frame 1, then the notice instead of frame 3")

    def test_firewall_is_0x02_from_the_responder(self):
        pair = Pair(firewall=lambda peer_id: False)
        pair.pump()
        self.assertNoticeThenClose(pair.b, 0x02)

    def test_malformed_noise_message_is_0x03(self):
        """A frame of 32 bytes or more that is not a Noise message the reader can open (here: frame 1)."""
        responder = Link(
            Handshake(False, PeerIdentity.generate(), SyncKey.generate().topic()), "t", resolver=accept_all
        )
        _, b = connected_pipes()
        b.channel = responder
        responder.secured.addErrback(lambda f: f.trap(HandshakeError))
        responder.startPipe(b)
        responder.pipeDataReceived(frame(b"\xff" * 64))
        self.assertNoticeThenClose(b, 0x03)

    def test_malformed_hello_is_0x03(self):
        pair = Pair(payload=lambda: b"PS\x02" + bytes(10))
        pair.pump()
        pair.failure("responder").trap(HandshakeError)
        self.assertNoticeThenClose(pair.b, 0x03)

    def test_version_1_hello_is_0x04(self):
        pair = Pair(payload=lambda: b"")
        pair.pump()
        pair.failure("responder").trap(VersionError)
        self.assertNoticeThenClose(pair.b, 0x04)

    def test_hello_of_another_version_is_0x04(self):
        """A hello whose version byte is not 2 is answered "version", not "malformed"."""
        hello = Hello(Intent.NEW, bytes(16), 0, 1 << 20).encode()
        pair = Pair(payload=lambda: hello[:2] + b"\x03" + hello[3:])
        pair.pump()
        pair.failure("responder").trap(VersionError)
        self.assertNoticeThenClose(pair.b, 0x04)
        pair.failure("initiator").trap(VersionError)

    def test_no_notice_for_short_frames_or_a_bad_ready(self):
        """
        A frame under 32 bytes (a notice, or garbage) and a READY that does
        not open are answered by no notice: the reader only closes.
        """
        peer, a, b, results = against_raw_peer()
        before = len(frames_written(a))
        b.write(frame(b"\x00" * 40))  # where READY belongs: a record that does not open
        pump(a, b)
        results[0].trap(HandshakeError)
        self.assertEqual(len(frames_written(a)), before)
        self.assertTrue(a.closed)
        self.assertFalse(a.aborted)


class HandshakeShapeTests(SynchronousTestCase):
    """ "Handshake": sizes a second implementation can check its Noise library against."""

    def test_frame_sizes(self):
        """Frame 1 is 48 bytes (psk modes encrypt its empty payload), frame 2 is 96, frame 3 is 48 + 40 + 16."""
        pair = Pair()
        pair.pump()
        initiator, responder = frames_written(pair.a), frames_written(pair.b)
        self.assertEqual([len(initiator[0]), len(responder[0]), len(initiator[1])], [48, 96, 104])


class ChoiceTests(SynchronousTestCase):
    """ "Handshake": USE or CLOSE is the initiator's first record; anything else first is refused."""

    def test_shutdown_before_use_is_refused(self):
        """A SHUTDOWN (like any record but USE or CLOSE) before USE fails the responder's handshake; no notice."""
        pair = Pair()
        pair.pump()
        pair.initiator.sendRecord(wire.shutdown_record(0))
        pair.pump()
        failure = pair.failure("responder")
        failure.trap(HandshakeError)
        self.assertIn("before choosing", str(failure.value))
        self.assertTrue(pair.b.closed)
        self.assertEqual(len(frames_written(pair.b)), 2, "frame 2 and READY, no notice")

    def test_close_before_use_is_not_chosen(self):
        pair = Pair()
        pair.pump()
        pair.initiator.discard()
        pair.pump()
        pair.failure("responder").trap(NotChosenError)


class CloseRuleTests(SynchronousTestCase):
    """ "Half-close and close": SHUTDOWN, CLOSE and the rule that ends a session cleanly."""

    def assertLastNumbered(self, sent, records) -> None:
        kinds = [bytes(p) for p in numbered(sent)]
        self.assertEqual(kinds[-len(records) :], records)

    def test_crossing_shutdowns(self):
        """
        Both sides send SHUTDOWN before either arrives: each, having sent and
        received one, sends CLOSE; two CLOSEs cross and both end cleanly with
        everything delivered.
        """
        net = Net(protocol=HalfCloser)
        left, right = net.start(self)
        left.transport.write(b"from the initiator")
        right.transport.write(b"from the responder")
        left.transport.loseWriteConnection()
        right.transport.loseWriteConnection()
        net.run()
        self.assertEqual((right.data, left.data), (b"from the initiator", b"from the responder"))
        left.lost.trap(ConnectionDone)
        right.lost.trap(ConnectionDone)
        shutdown, close = wire.shutdown_record(0), bytes([RecordType.CLOSE])
        self.assertLastNumbered(net.paths[0].client_sent, [shutdown, close])
        self.assertLastNumbered(net.paths[0].server_sent, [shutdown, close])

    def test_shutdown_then_the_other_side_completes_the_pair(self):
        """The side that shuts down second sends SHUTDOWN then CLOSE; the first sends CLOSE on receiving it."""
        net = Net(protocol=HalfCloser)
        left, right = net.start(self)
        left.transport.loseWriteConnection()
        net.run()
        right.transport.loseWriteConnection()
        net.run()
        left.lost.trap(ConnectionDone)
        right.lost.trap(ConnectionDone)
        shutdown, close = wire.shutdown_record(0), bytes([RecordType.CLOSE])
        self.assertLastNumbered(net.paths[0].server_sent, [shutdown, close])
        self.assertLastNumbered(net.paths[0].client_sent, [shutdown, close])

    def test_close_alone_after_the_peers_shutdown(self):
        """CLOSE ends both directions: a side may send it without a SHUTDOWN of its own."""
        net = Net(protocol=HalfCloser)
        left, right = net.start(self)
        right.transport.loseWriteConnection()
        net.run()
        left.transport.write(b"last words")
        left.transport.loseConnection()
        net.run()
        self.assertEqual(right.data, b"last words")
        left.lost.trap(ConnectionDone)
        right.lost.trap(ConnectionDone)
        sent = [bytes(p) for p in numbered(net.paths[0].client_sent)]
        self.assertNotIn(wire.shutdown_record(0), sent)
        self.assertEqual(sent[-1], bytes([RecordType.CLOSE]))

    def test_close_is_answered_by_an_ack_not_a_close(self):
        """The receiver of CLOSE acknowledges it; it sends no CLOSE of its own unless it was closing too."""
        net = Net()
        left, right = net.start(self)
        left.transport.loseConnection()
        net.run()
        left.lost.trap(ConnectionDone)
        right.lost.trap(ConnectionDone)
        self.assertNotIn(bytes([RecordType.CLOSE]), [bytes(p) for p in numbered(net.paths[0].server_sent)])


class RecordRuleTests(SynchronousTestCase):
    """ "Records": a record that decrypts but breaks the session's rules ends the session with ABORT(2)."""

    def test_shutdown_without_its_stream_id(self):
        net = Net(protocol=HalfCloser)
        left, right = net.start(self)
        net.client_session.send((bytes([RecordType.SHUTDOWN]), b""))
        net.run()
        right.lost.trap(RecordError)
        self.assertEqual(right.read_lost, 0)
        left.lost.trap(PeerGoneError)
        self.assertIn("broke the protocol", str(left.lost.value))

    def test_ready_after_the_handshake(self):
        net = Net()
        left, right = net.start(self)
        net.paths[0].a.channel.sendRecord(bytes([RecordType.USE]))
        net.run()
        right.lost.trap(RecordError)
        left.lost.trap(PeerGoneError)


class MessageTests(SynchronousTestCase):
    """ "Messages": a message is DATA records then one END; an empty message is one empty END; streams send DATA."""

    def test_message_records(self):
        net = Net(protocol=MessageRecorder)
        left, _ = net.start(self)
        big = b"x" * (wire.MAX_DATA_PAYLOAD + 1)
        left.transport.writeMessage(big)
        left.transport.writeMessage(b"")
        left.transport.write(b"stream bytes")
        sent = [bytes(p) for p in numbered(net.paths[0].client_sent)]
        data, end = wire.record_head(RecordType.DATA, 0), wire.record_head(RecordType.END, 0)
        self.assertEqual(
            [p[:5] for p in sent[-4:]],
            [data, end, end, data],
        )
        self.assertEqual(sent[-3], end + b"x", "the message's last part in END")
        self.assertEqual(sent[-2], end, "an empty message is one empty END")


class KeyTextTests(SynchronousTestCase):
    """ "Key and identity text forms" and "Names derived from the sync key"."""

    def test_text_form_and_reading_rules(self):
        key = SyncKey(bytes(range(32)))
        check = hashlib.blake2b(key.secret, digest_size=2, key=b"psk1-", person=b"pluresync-check").digest()
        body = base64.b32encode(key.secret + check).decode().rstrip("=").lower()
        self.assertEqual(key.to_text(), KEY_PREFIX + body)
        self.assertEqual(len(body), 55)
        # reading: prefix in any case, whitespace anywhere and '-' in the body ignored, body in any case
        loose = "  PSK1-" + " ".join(body[i : i + 5].upper() for i in range(0, 55, 5)) + "\n"
        self.assertEqual(SyncKey.from_text(loose), key)
        self.assertEqual(SyncKey.from_text(KEY_PREFIX + "-".join([body[:20], body[20:]])), key)

    def test_identity_file_holds_the_raw_private_scalar(self):
        path = self.mktemp()
        identity = PeerIdentity.from_file(path, create=True)
        text = open(path).read()
        self.assertTrue(text.startswith(IDENTITY_PREFIX) and text.endswith("\n"))
        check = hashlib.blake2b(identity.private, digest_size=2, key=b"psid1-", person=b"pluresync-check").digest()
        body = base64.b32encode(identity.private + check).decode().rstrip("=").lower()
        self.assertEqual(text, IDENTITY_PREFIX + body + "\n")

    def test_fingerprint(self):
        key = SyncKey(bytes(range(32)))
        expected = hashlib.blake2b(key.secret, digest_size=4, person=b"pluresync-check").hexdigest()
        self.assertEqual(key.fingerprint(), expected)

    def test_passphrase_is_argon2id_version_0x13(self):
        """Argon2id v1.3 (libsodium's, parallelism 1) over the UTF-8 passphrase, with the fixed BLAKE2b salt."""
        ops, mem = pwhash.argon2id.OPSLIMIT_MIN, pwhash.argon2id.MEMLIMIT_MIN
        salt = hashlib.blake2b(b"", digest_size=16, person=b"pluresync-salt").digest()
        expected = bindings.crypto_pwhash_alg(
            32, "pâss".encode(), salt, ops, mem, bindings.crypto_pwhash_ALG_ARGON2ID13
        )
        self.assertEqual(SyncKey.from_passphrase("pâss", opslimit=ops, memlimit=mem).secret, expected)


class SignedTokenTests(SynchronousTestCase):
    """ "Authentication": a signed token's HMAC key is the secret line's raw text, not its base64 decoding."""

    def test_hmac_key_is_the_line_as_written(self):
        line = base64.b64encode(bytes(range(32))).decode()
        (secret,) = parse_secret_file(f"# made with head -c 32 /dev/urandom | base64\n\n  {line}  \n".encode())
        self.assertEqual(secret, line.encode())
        token = mint_token(secret, "acme", 60, 1_000_000)
        prefix, payload, signature = token.split(".")
        mac = hmac.new(line.encode("ascii"), f"{prefix}.{payload}".encode(), hashlib.sha256).digest()
        self.assertEqual(signature, base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
