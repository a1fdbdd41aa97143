"""Sync keys, their derivations, key files and peer identities."""

from __future__ import annotations

import hashlib
import os
import stat

from nacl import pwhash
from twisted.trial.unittest import SynchronousTestCase

from pluresync.errors import KeyFileError
from pluresync.keys import (
    KEY_PREFIX,
    PeerIdentity,
    SyncKey,
    load_sync_key,
    parse_peer_id,
)


class SyncKeyTests(SynchronousTestCase):
    """The group secret and what is derived from it."""

    def test_text_round_trip(self):
        """The text form parses back to the same key, ignoring case and spaces."""
        key = SyncKey.generate()
        text = key.to_text()
        self.assertTrue(text.startswith(KEY_PREFIX))
        self.assertEqual(SyncKey.from_text(text), key)
        self.assertEqual(SyncKey.from_text("  " + text.upper().replace("PSK1-", "psk1-") + "\n"), key)

    def test_typo_is_caught(self):
        """A single mistyped character fails the checksum instead of making another key."""
        text = SyncKey.generate().to_text()
        i = len(KEY_PREFIX) + 5
        typo = text[:i] + ("a" if text[i] != "a" else "b") + text[i + 1 :]
        with self.assertRaises(KeyFileError) as e:
            SyncKey.from_text(typo)
        self.assertIn("checksum", str(e.exception))

    def test_wrong_prefix(self):
        """Something that is not a key says so."""
        with self.assertRaises(KeyFileError):
            SyncKey.from_text("hello")

    def test_repr_hides_the_secret(self):
        """A key in a traceback or log shows no secret bytes."""
        key = SyncKey(b"\x01" * 32)
        self.assertNotIn("01", repr(key).replace("SyncKey", ""))
        self.assertNotIn(key.to_text(), repr(key))

    def test_derivations_are_distinct(self):
        """Topic, rendezvous id and psk differ from each other and between topic names."""
        key = SyncKey.generate()
        topic = key.topic()
        values = {key.secret, topic.secret, topic.rendezvous_id, topic.psk, key.topic("other").secret}
        self.assertEqual(len(values), 5)
        self.assertTrue(all(len(v) == 32 for v in values))
        self.assertEqual(key.topic().rendezvous_id, SyncKey(key.secret).topic("").rendezvous_id)

    def test_derivations_follow_the_spec(self):
        """
        The derivations are exactly the documented BLAKE2b calls (peers of
        different versions, or other implementations, must meet).
        """
        secret = bytes(range(32))
        topic = SyncKey(secret).topic("notes")
        expected_topic = hashlib.blake2b(b"notes", digest_size=32, key=secret, person=b"pluresync-topic").digest()
        self.assertEqual(topic.secret, expected_topic)
        self.assertEqual(
            topic.rendezvous_id,
            hashlib.blake2b(expected_topic, digest_size=32, person=b"pluresync-rdv").digest(),
        )
        self.assertEqual(topic.psk, hashlib.blake2b(expected_topic, digest_size=32, person=b"pluresync-psk").digest())

    def test_passphrase(self):
        """A passphrase stretches to a stable key; a different one gives another key."""
        fast = dict(opslimit=pwhash.argon2id.OPSLIMIT_MIN, memlimit=pwhash.argon2id.MEMLIMIT_MIN)
        a = SyncKey.from_passphrase("correct horse battery staple", **fast)
        self.assertEqual(a, SyncKey.from_passphrase("correct horse battery staple", **fast))
        self.assertNotEqual(a, SyncKey.from_passphrase("correct horse battery stapler", **fast))
        with self.assertRaises(KeyFileError):
            SyncKey.from_passphrase("")

    def test_key_file(self):
        """write() makes a 0600 file that from_file() reads, and never overwrites one."""
        path = self.mktemp()
        key = SyncKey.generate()
        key.write(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(SyncKey.from_file(path), key)
        with self.assertRaises(KeyFileError):
            SyncKey.generate().write(path)
        self.assertEqual(SyncKey.from_file(path), key)

    def test_missing_key_file(self):
        """A missing file names the path and the reason, not a traceback."""
        with self.assertRaises(KeyFileError) as e:
            SyncKey.from_file("/nonexistent/key")
        self.assertIn("/nonexistent/key", str(e.exception))


class LoadSyncKeyTests(SynchronousTestCase):
    """Where endpoints find the key."""

    def test_environment_text(self):
        """PLURESYNC_KEY may hold the key's text."""
        key = SyncKey.generate()
        self.assertEqual(load_sync_key(environ={"PLURESYNC_KEY": key.to_text()}), key)

    def test_environment_path(self):
        """PLURESYNC_KEY may hold a path to a key file."""
        path = self.mktemp()
        key = SyncKey.generate()
        key.write(path)
        self.assertEqual(load_sync_key(environ={"PLURESYNC_KEY": path}), key)

    def test_nothing_given(self):
        """No key anywhere says how to make one."""
        with self.assertRaises(KeyFileError) as e:
            load_sync_key(environ={})
        self.assertIn("pluresync keygen", str(e.exception))

    def test_both_given(self):
        """key= and keyfile= together is ambiguous."""
        with self.assertRaises(KeyFileError):
            load_sync_key(keyfile="x", key="y", environ={})


class PeerIdentityTests(SynchronousTestCase):
    """Static key pairs and peer ids."""

    def test_create_on_first_use(self):
        """from_file(create=True) makes a 0600 identity once and reuses it."""
        path = self.mktemp()
        first = PeerIdentity.from_file(path, create=True)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(PeerIdentity.from_file(path, create=True).public, first.public)
        self.assertEqual(len(first.peer_id), 64)

    def test_parse_peer_id(self):
        """Peer ids are 64 hex digits; anything else is a ValueError that says why."""
        identity = PeerIdentity.generate()
        self.assertEqual(parse_peer_id(identity.peer_id.upper()), identity.public)
        with self.assertRaises(ValueError):
            parse_peer_id("abc")
        with self.assertRaises(ValueError):
            parse_peer_id("z" * 64)
