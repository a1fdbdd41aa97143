"""The direct path's signals: what two peers exchange inside their session to open a direct pipe."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pluresync.direct.signal import (
    MAX_CANDIDATES,
    Candidate,
    CandidateKind,
    DirectOffer,
    FailReason,
    NatClass,
    decode_failed,
    decode_offer,
    encode_failed,
    punch_key,
)
from pluresync.session.wire import WireError


def offer(**changes) -> DirectOffer:
    fields = dict(
        attempt=7,
        nat=NatClass.CONE,
        fingerprint=bytes(range(32)),
        secret=b"s" * 32,
        candidates=(
            Candidate(CandidateKind.HOST, "192.168.1.20", 40001),
            Candidate(CandidateKind.REFLEXIVE, "203.0.113.9", 61000),
            Candidate(CandidateKind.HOST, "fd00::1", 40001),
            Candidate(CandidateKind.LAN_TCP, "192.168.1.20", 45000),
        ),
    )
    fields.update(changes)
    return DirectOffer(**fields)


class OfferTests(SynchronousTestCase):
    def test_round_trip(self):
        """An offer comes back as it was sent, IPv4 and IPv6 candidates alike."""
        sent = offer()
        self.assertEqual(decode_offer(sent.encode()), sent)

    def test_layout(self):
        """The bytes docs/protocol.md describes: a 73-byte head, then 8 bytes per IPv4 candidate."""
        body = offer(candidates=(Candidate(CandidateKind.HOST, "10.0.0.1", 258),)).encode()
        self.assertEqual(len(body), 4 + 1 + 32 + 32 + 1 + 8)
        self.assertEqual(body[:5], b"\x00\x00\x00\x07\x02")
        self.assertEqual(body[69], 1)
        self.assertEqual(body[70:], b"\x01\x04\x0a\x00\x00\x01\x01\x02")

    def test_at_most_sixteen_candidates_are_sent(self):
        many = tuple(Candidate(CandidateKind.HOST, f"10.0.0.{i}", 1000 + i) for i in range(1, 40))
        self.assertEqual(len(decode_offer(offer(candidates=many).encode()).candidates), MAX_CANDIDATES)

    def test_more_than_sixteen_announced_is_refused(self):
        body = bytearray(offer(candidates=()).encode())
        body[69] = MAX_CANDIDATES + 1
        self.assertRaises(WireError, decode_offer, bytes(body))

    def test_malformed(self):
        """Short, cut, trailing, bad IP version, port 0: each refused with a reason."""
        good = offer().encode()
        for body, words in [
            (good[:60], "too short"),
            (good[:-1], "cut short"),
            (good + b"\x00", "bytes after"),
            (offer(candidates=()).encode()[:-1] + b"\x01" + b"\x01\x05" + bytes(6), "IP version"),
            (offer(candidates=(Candidate(CandidateKind.HOST, "10.0.0.1", 0),)).encode(), "port 0"),
        ]:
            with self.assertRaises(WireError) as caught:
                decode_offer(body)
            self.assertIn(words, str(caught.exception))

    def test_later_kinds_and_classes_are_tolerated(self):
        """A candidate kind or NAT class from a later version is skipped or read as unknown."""
        body = bytearray(offer().encode())
        body[4] = 0x77  # NAT class
        body[70] = 0x55  # first candidate's kind
        got = decode_offer(bytes(body))
        self.assertEqual(got.nat, NatClass.UNKNOWN)
        self.assertEqual(len(got.candidates), 3)

    def test_sizes_are_checked_when_sending(self):
        self.assertRaises(ValueError, offer(secret=b"short").encode)

    def test_nat_names(self):
        self.assertEqual(NatClass.named("symmetric"), NatClass.SYMMETRIC)


class FailedTests(SynchronousTestCase):
    def test_round_trip(self):
        self.assertEqual(decode_failed(encode_failed(9, FailReason.BOTH_SYMMETRIC)), (9, 3))

    def test_wrong_size(self):
        self.assertRaises(WireError, decode_failed, b"\x00" * 4)


class PunchKeyTests(SynchronousTestCase):
    def test_both_halves_count(self):
        """The key depends on both secrets, in their roles, and is the same on both sides."""
        a, b = offer(secret=b"a" * 32), offer(secret=b"b" * 32)
        key = punch_key(a, b)
        self.assertEqual(len(key), 32)
        self.assertEqual(key, punch_key(offer(secret=b"a" * 32, attempt=1), b))
        self.assertNotEqual(key, punch_key(b, a))
        self.assertNotEqual(key, punch_key(a, offer(secret=b"c" * 32)))
