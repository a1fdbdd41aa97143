"""
Tests for L{pluresync.noise}.

Interoperability is proven against the public cacophony vectors; the
negative tests pin down the failure behaviour the handshake and record
layers rely on.
"""

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from pluresync.errors import PluresyncError
from pluresync.noise import (
    MAX_MESSAGE_LENGTH,
    MAX_PLAINTEXT_LENGTH,
    CipherState,
    HandshakeState,
    NoiseError,
    generate_private_key,
    public_key,
)

_VECTORS_PATH = os.path.join(os.path.dirname(__file__), "data", "noise-vectors.json")

with open(_VECTORS_PATH, encoding="utf-8") as _f:
    VECTORS = json.load(_f)["vectors"]


def _hex(vector: dict, key: str) -> bytes | None:
    value = vector.get(key)
    return None if value is None else bytes.fromhex(value)


def _parties(vector: dict) -> tuple[HandshakeState, HandshakeState]:
    name = vector["protocol_name"]
    initiator = HandshakeState(
        name,
        True,
        prologue=_hex(vector, "init_prologue"),
        s=_hex(vector, "init_static"),
        e=_hex(vector, "init_ephemeral"),
        rs=_hex(vector, "init_remote_static"),
        psks=[bytes.fromhex(p) for p in vector.get("init_psks", [])],
    )
    responder = HandshakeState(
        name,
        False,
        prologue=_hex(vector, "resp_prologue"),
        s=_hex(vector, "resp_static"),
        e=_hex(vector, "resp_ephemeral"),
        rs=_hex(vector, "resp_remote_static"),
        psks=[bytes.fromhex(p) for p in vector.get("resp_psks", [])],
    )
    return initiator, responder


def _make_vector_test(vector: dict):
    def test(self: SynchronousTestCase) -> None:
        initiator, responder = _parties(vector)
        messages = vector["messages"]
        index = 0
        while not initiator.finished:
            writer, reader = (initiator, responder) if index % 2 == 0 else (responder, initiator)
            payload = bytes.fromhex(messages[index]["payload"])
            ciphertext = writer.write_message(payload)
            self.assertEqual(ciphertext.hex(), messages[index]["ciphertext"])
            self.assertEqual(reader.read_message(ciphertext), payload)
            index += 1
        self.assertTrue(responder.finished)
        expected_hash = vector["handshake_hash"]
        self.assertEqual(initiator.handshake_hash.hex(), expected_hash)
        self.assertEqual(responder.handshake_hash.hex(), expected_hash)
        self.assertEqual(initiator.remote_static, _responder_static(vector))

        i_send, i_recv = initiator.split()
        r_send, r_recv = responder.split()
        for number in range(index, len(messages)):
            if number % 2 == 0:
                sender, receiver = i_send, r_recv
            else:
                sender, receiver = r_send, i_recv
            payload = bytes.fromhex(messages[number]["payload"])
            ciphertext = sender.encrypt(b"", payload)
            self.assertEqual(ciphertext.hex(), messages[number]["ciphertext"])
            self.assertEqual(receiver.decrypt(b"", ciphertext), payload)

    test.__doc__ = (
        f"{vector['protocol_name']} interoperates byte for byte with the "
        "cacophony reference: same messages, transport records and hash."
    )
    return test


def _responder_static(vector: dict) -> bytes | None:
    static = _hex(vector, "resp_static")
    return None if static is None else public_key(static)


class NoiseVectorTests(SynchronousTestCase):
    """The public test vectors, one test method per protocol."""

    for _vector in VECTORS:
        locals()["test_" + _vector["protocol_name"]] = _make_vector_test(_vector)
    del _vector

    def test_all_vectors_present(self) -> None:
        """
        A truncated data file would silently shrink coverage, so the
        protocols pluresync relies on are checked for by name (AESGCM: the
        suite peers with hardware AES may choose, issue 11).
        """
        self.assertEqual(
            {v["protocol_name"] for v in VECTORS},
            {f"Noise_{p}_25519_ChaChaPoly_BLAKE2b" for p in ("NN", "IK", "XX", "NNpsk0", "XXpsk3", "IKpsk2")}
            | {f"Noise_{p}_25519_AESGCM_BLAKE2b" for p in ("NN", "IK", "XX", "XXpsk3")},
        )


def _xxpsk3(initiator_psk: bytes, responder_psk: bytes):
    name = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"
    initiator = HandshakeState(name, True, s=generate_private_key(), psks=[initiator_psk])
    responder = HandshakeState(name, False, s=generate_private_key(), psks=[responder_psk])
    return initiator, responder


def _nn_transport() -> tuple[CipherState, CipherState]:
    """Return (initiator send, responder receive) after a fresh NN handshake."""
    name = "Noise_NN_25519_ChaChaPoly_BLAKE2b"
    initiator = HandshakeState(name, True)
    responder = HandshakeState(name, False)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    return initiator.split()[0], responder.split()[1]


class HandshakeFailureTests(SynchronousTestCase):
    """How the handshake refuses bad input and bad use."""

    def test_error_is_pluresync_error(self) -> None:
        """Callers catch the library's one error tree, so NoiseError must be in it."""
        self.assertTrue(issubclass(NoiseError, PluresyncError))

    def test_wrong_psk_xxpsk3(self) -> None:
        """
        In XXpsk3 the psk enters only in message 3, so that is where a peer
        with another psk must be caught, by the responder.
        """
        initiator, responder = _xxpsk3(b"\x01" * 32, b"\x02" * 32)
        responder.read_message(initiator.write_message())
        initiator.read_message(responder.write_message())
        message3 = initiator.write_message(b"hello")
        self.assertRaises(NoiseError, responder.read_message, message3)

    def test_wrong_psk_nnpsk0(self) -> None:
        """psk0 keys the very first payload, so the first read must fail."""
        name = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2b"
        initiator = HandshakeState(name, True, psks=[b"\x01" * 32])
        responder = HandshakeState(name, False, psks=[b"\x02" * 32])
        self.assertRaises(NoiseError, responder.read_message, initiator.write_message())

    def test_same_psk_succeeds(self) -> None:
        """The wrong-psk tests mean something only if the right psk works."""
        initiator, responder = _xxpsk3(b"\x01" * 32, b"\x01" * 32)
        responder.read_message(initiator.write_message())
        initiator.read_message(responder.write_message())
        self.assertEqual(responder.read_message(initiator.write_message(b"x")), b"x")
        self.assertEqual(initiator.handshake_hash, responder.handshake_hash)

    def test_use_after_failure(self) -> None:
        """
        A failed read may have mixed attacker input into the keys, so every
        later call must refuse rather than continue from a poisoned state.
        """
        initiator, responder = _xxpsk3(b"\x01" * 32, b"\x01" * 32)
        message1 = bytearray(initiator.write_message())
        self.assertRaises(NoiseError, responder.read_message, bytes(message1[:10]))
        self.assertRaises(NoiseError, responder.read_message, bytes(message1))
        self.assertRaises(NoiseError, responder.write_message)
        self.assertRaises(NoiseError, responder.split)

    def test_tampered_handshake_message(self) -> None:
        """Flipping one bit of an encrypted handshake field must be detected."""
        name = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
        initiator = HandshakeState(name, True, s=generate_private_key())
        responder = HandshakeState(name, False, s=generate_private_key())
        responder.read_message(initiator.write_message())
        message2 = bytearray(responder.write_message(b"payload"))
        message2[40] ^= 1
        self.assertRaises(NoiseError, initiator.read_message, bytes(message2))

    def test_write_out_of_turn(self) -> None:
        """The responder speaks second; writing first would desynchronise both."""
        responder = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", False)
        self.assertRaises(NoiseError, responder.write_message)

    def test_read_out_of_turn(self) -> None:
        """The initiator speaks first, so it has nothing to read yet."""
        initiator = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", True)
        self.assertRaises(NoiseError, initiator.read_message, b"\x00" * 32)

    def test_out_of_turn_is_not_fatal(self) -> None:
        """Calling in the wrong order is our bug, not an attack; the state survives."""
        initiator = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", True)
        self.assertRaises(NoiseError, initiator.read_message, b"\x00" * 32)
        self.assertEqual(len(initiator.write_message()), 32)

    def test_split_before_finished(self) -> None:
        """Transport keys from a half-done handshake would be unauthenticated."""
        initiator = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", True)
        initiator.write_message()
        self.assertRaises(NoiseError, initiator.split)

    def test_oversize_write(self) -> None:
        """
        An oversize payload is refused before any state changes, so the
        caller can retry with a smaller one.
        """
        initiator = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", True)
        # NN message 1 is e (32 bytes) plus the payload in the clear.
        self.assertRaises(ValueError, initiator.write_message, b"x" * (MAX_MESSAGE_LENGTH - 31))
        self.assertEqual(
            len(initiator.write_message(b"x" * (MAX_MESSAGE_LENGTH - 32))),
            MAX_MESSAGE_LENGTH,
        )

    def test_oversize_read(self) -> None:
        """A peer cannot make us process a message beyond Noise's limit."""
        responder = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", False)
        self.assertRaises(NoiseError, responder.read_message, b"\x09" * (MAX_MESSAGE_LENGTH + 1))

    def test_low_order_point(self) -> None:
        """An all-zero ephemeral would make the DH output public; refuse it."""
        name = "Noise_NN_25519_ChaChaPoly_BLAKE2b"
        initiator = HandshakeState(name, True)
        initiator.write_message()
        self.assertRaises(NoiseError, initiator.read_message, bytes(48))

    def test_ik_learns_and_knows_static(self) -> None:
        """IK's point is that each side ends up knowing the other's identity."""
        name = "Noise_IK_25519_ChaChaPoly_BLAKE2b"
        i_key, r_key = generate_private_key(), generate_private_key()
        initiator = HandshakeState(name, True, s=i_key, rs=public_key(r_key))
        responder = HandshakeState(name, False, s=r_key)
        self.assertIsNone(responder.remote_static)
        responder.read_message(initiator.write_message())
        initiator.read_message(responder.write_message())
        self.assertEqual(responder.remote_static, public_key(i_key))
        self.assertEqual(initiator.remote_static, public_key(r_key))


class ConstructionTests(SynchronousTestCase):
    """What the constructor refuses, so mistakes surface before any I/O."""

    def test_unsupported_names(self) -> None:
        """Each unsupported part is named, so the reader knows what to change."""
        cases = {
            "Noise_NK_25519_ChaChaPoly_BLAKE2b": "NK",
            "Noise_XX_448_ChaChaPoly_BLAKE2b": "448",
            "Noise_XX_25519_AESGCMSIV_BLAKE2b": "AESGCMSIV",
            "Noise_XX_25519_ChaChaPoly_SHA256": "SHA256",
            "Noise_XXfallback_25519_ChaChaPoly_BLAKE2b": "fallback",
            "Noise_NNpsk3_25519_ChaChaPoly_BLAKE2b": "psk3",
            "Noise_XX_25519_ChaChaPoly": "Noise_XX_25519_ChaChaPoly",
            "Noise_xx_25519_ChaChaPoly_BLAKE2b": "xx",
        }
        for name, culprit in cases.items():
            error = self.assertRaises(ValueError, HandshakeState, name, True)
            self.assertIn(culprit, str(error))

    def test_psk_count(self) -> None:
        """A missing psk would otherwise fail only in the middle of the handshake."""
        self.assertRaises(ValueError, HandshakeState, "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2b", True)
        self.assertRaises(
            ValueError,
            HandshakeState,
            "Noise_NN_25519_ChaChaPoly_BLAKE2b",
            True,
            psks=[b"\x00" * 32],
        )

    def test_missing_keys(self) -> None:
        """Patterns that need s or rs refuse to start without them."""
        self.assertRaises(ValueError, HandshakeState, "Noise_XX_25519_ChaChaPoly_BLAKE2b", False)
        self.assertRaises(
            ValueError,
            HandshakeState,
            "Noise_IK_25519_ChaChaPoly_BLAKE2b",
            True,
            s=generate_private_key(),
        )

    def test_rs_refused_when_learned(self) -> None:
        """In XX a passed rs would be ignored, which a caller could mistake for a pin."""
        self.assertRaises(
            ValueError,
            HandshakeState,
            "Noise_XX_25519_ChaChaPoly_BLAKE2b",
            True,
            s=generate_private_key(),
            rs=public_key(generate_private_key()),
        )

    def test_bad_key_length_message_hides_key(self) -> None:
        """Error messages must never carry key material."""
        key = b"\xab" * 31
        error = self.assertRaises(ValueError, HandshakeState, "Noise_XX_25519_ChaChaPoly_BLAKE2b", True, s=key)
        self.assertNotIn("ab", str(error))
        self.assertNotIn(repr(key), str(error))


class CipherStateTests(SynchronousTestCase):
    """The transport cipher's failure rules, which the record layer depends on."""

    def test_tampered_ciphertext(self) -> None:
        """
        A forged record must not advance the nonce, or one bad record would
        desynchronise every record after it.
        """
        send, receive = _nn_transport()
        record = bytearray(send.encrypt(b"ad", b"record"))
        record[0] ^= 1
        self.assertRaises(NoiseError, receive.decrypt, b"ad", bytes(record))
        self.assertEqual(receive.nonce, 0)
        record[0] ^= 1
        self.assertEqual(receive.decrypt(b"ad", bytes(record)), b"record")
        self.assertEqual(receive.nonce, 1)

    def test_wrong_ad(self) -> None:
        """The associated data is authenticated, not just the ciphertext."""
        send, receive = _nn_transport()
        record = send.encrypt(b"ad", b"record")
        self.assertRaises(NoiseError, receive.decrypt, b"other", record)
        self.assertEqual(receive.nonce, 0)

    def test_short_ciphertext(self) -> None:
        """Anything shorter than a tag is malformed, not a crash."""
        _, receive = _nn_transport()
        self.assertRaises(NoiseError, receive.decrypt, b"", b"short")

    def test_oversize(self) -> None:
        """Noise caps every message at 65535 bytes, tag included."""
        send, receive = _nn_transport()
        self.assertEqual(MAX_MESSAGE_LENGTH, 65535)
        self.assertRaises(ValueError, send.encrypt, b"", bytes(MAX_PLAINTEXT_LENGTH + 1))
        self.assertEqual(send.nonce, 0)
        record = send.encrypt(b"", bytes(MAX_PLAINTEXT_LENGTH))
        self.assertEqual(len(record), MAX_MESSAGE_LENGTH)
        self.assertRaises(NoiseError, receive.decrypt, b"", record + b"\x00")
        self.assertEqual(receive.decrypt(b"", record), bytes(MAX_PLAINTEXT_LENGTH))

    def test_nonce_exhaustion(self) -> None:
        """Nonce 2**64-1 is reserved by Noise; reaching it ends the session."""
        send, receive = CipherState(b"\x07" * 32), CipherState(b"\x07" * 32)
        send.nonce = receive.nonce = 2**64 - 2
        self.assertEqual(receive.decrypt(b"", send.encrypt(b"", b"last")), b"last")
        self.assertRaises(NoiseError, send.encrypt, b"", b"one too many")
        self.assertRaises(NoiseError, receive.decrypt, b"", bytes(32))

    def test_nonce_counts_records(self) -> None:
        """The record layer reads the nonce as its sequence number."""
        send, receive = _nn_transport()
        for i in range(3):
            self.assertEqual(send.nonce, i)
            receive.decrypt(b"", send.encrypt(b"", b"x"))
        self.assertEqual(receive.nonce, 3)

    def test_rekey_in_step(self) -> None:
        """Both sides rekeying at the same point keep talking; one side alone cannot."""
        send, receive = _nn_transport()
        send.rekey()
        receive.rekey()
        self.assertEqual(receive.decrypt(b"", send.encrypt(b"", b"x")), b"x")
        send.rekey()
        self.assertRaises(NoiseError, receive.decrypt, b"", send.encrypt(b"", b"x"))

    def test_split_directions(self) -> None:
        """Each side's send cipher must pair with the other's receive cipher."""
        name = "Noise_NN_25519_ChaChaPoly_BLAKE2b"
        initiator = HandshakeState(name, True)
        responder = HandshakeState(name, False)
        responder.read_message(initiator.write_message())
        initiator.read_message(responder.write_message())
        i_send, i_recv = initiator.split()
        r_send, r_recv = responder.split()
        self.assertEqual(r_recv.decrypt(b"", i_send.encrypt(b"", b"up")), b"up")
        self.assertEqual(i_recv.decrypt(b"", r_send.encrypt(b"", b"down")), b"down")
        self.assertIs(initiator.split()[0], i_send)


class SwitchedCipherTests(SynchronousTestCase):
    """A direction continued with AES-GCM (the negotiated record cipher) keeps its nonce, not its key."""

    def test_switched(self) -> None:
        from pluresync.noise.cipher import CipherState

        a, b = CipherState(bytes(range(32)), nonce=7), CipherState(bytes(range(32)), nonce=7)
        a2, b2 = a.switched("AESGCM", b"pluresync-aes"), b.switched("AESGCM", b"pluresync-aes")
        self.assertEqual((a2.cipher, a2.nonce), ("AESGCM", 7))
        self.assertNotEqual(a2._key, a._key)
        self.assertEqual(b2.decrypt(b"", a2.encrypt(b"", b"record")), b"record")
        # The old key cannot open it: nothing was sealed with one key under two ciphers.
        self.assertRaises(
            NoiseError,
            CipherState(bytes(range(32)), nonce=7, cipher="AESGCM").decrypt,
            b"",
            a.switched("AESGCM", b"pluresync-aes").encrypt(b"", b"x"),
        )

    def test_hardware_aes_is_a_yes_or_no(self) -> None:
        from pluresync.noise.cipher import hardware_aes

        self.assertIn(hardware_aes(), (True, False))
