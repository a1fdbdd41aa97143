"""
What two peers tell each other, inside their end-to-end session, to open
a direct path: where each can be reached (its candidates), how its NAT
maps (so the punch picks its method), the QUIC certificate it will show
(pinned: only that certificate is accepted on the direct pipe), and half
of the key that authenticates the punch probes.

It travels in CONTROL records (L{pluresync.session.wire.ControlKind}), so
a relay carrying the session sees only their size.  Byte by byte in
docs/protocol.md, "Direct-path signals".
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from pluresync.session.wire import WireError

#: bytes of a certificate fingerprint (SHA-256 of its DER) and of a punch secret
FINGERPRINT_SIZE = 32
SECRET_SIZE = 32
#: at most this many candidates in one offer: a peer with more interfaces sends its best
MAX_CANDIDATES = 16

_HEAD = struct.Struct(">IB32s32sB")
_FAILED = struct.Struct(">IB")
_PORT = struct.Struct(">H")
_PUNCH_PERSON = b"pluresync-punch"


class CandidateKind(IntEnum):
    HOST = 0x01  #: an address of one of the peer's own interfaces (UDP)
    REFLEXIVE = 0x02  #: the peer's public address as its NAT maps it (from STUN)
    LAN_TCP = 0x03  #: a TCP port the peer listens on in its LAN


class NatClass(IntEnum):
    """The NAT classes of L{pluresync.direct.nat}, as one byte."""

    UNKNOWN = 0x00
    OPEN = 0x01
    CONE = 0x02
    SYMMETRIC = 0x03
    BLOCKED = 0x04

    @classmethod
    def named(cls, name: str) -> NatClass:
        return cls[name.upper()]


class FailReason(IntEnum):
    """Why a direct attempt ended on the side that says DIRECT_FAILED."""

    DISABLED = 0x01  #: direct is off by policy on this side
    NO_UDP = 0x02  #: no UDP here (blocked, or no STUN answer)
    BOTH_SYMMETRIC = 0x03  #: two symmetric NATs: punching cannot work
    PUNCH_TIMEOUT = 0x04  #: no probe came through in time
    HANDSHAKE = 0x05  #: punched, but the QUIC or end-to-end handshake failed
    BUSY = 0x06  #: an attempt is already running


@dataclass(frozen=True)
class Candidate:
    kind: CandidateKind
    host: str
    port: int

    def encode(self) -> bytes:
        address = ipaddress.ip_address(self.host)
        return bytes((self.kind, address.version)) + address.packed + _PORT.pack(self.port)


@dataclass(frozen=True)
class DirectOffer:
    """
    One side's half of a direct attempt (the initiator's offer, or the
    responder's answer: the same fields).

    @ivar attempt: numbers the initiator's attempts; an answer repeats it,
        so a late answer to an abandoned attempt is recognised.
    """

    attempt: int
    nat: NatClass
    fingerprint: bytes
    secret: bytes
    candidates: tuple[Candidate, ...]

    def encode(self) -> bytes:
        if len(self.fingerprint) != FINGERPRINT_SIZE or len(self.secret) != SECRET_SIZE:
            raise ValueError("a fingerprint and a secret are 32 bytes each")
        candidates = self.candidates[:MAX_CANDIDATES]
        head = _HEAD.pack(self.attempt, self.nat, self.fingerprint, self.secret, len(candidates))
        return head + b"".join(c.encode() for c in candidates)


def decode_offer(body: bytes) -> DirectOffer:
    """
    An offer or answer's body (after the CONTROL kind byte).

    @raise WireError: a body that is not one (the session treats it as the
        peer breaking the protocol).
    """
    if len(body) < _HEAD.size:
        raise WireError("a direct-path offer is too short")
    attempt, nat, fingerprint, secret, count = _HEAD.unpack_from(body)
    try:
        nat_class = NatClass(nat)
    except ValueError:
        nat_class = NatClass.UNKNOWN  # a class from a later version: punch as for an unknown NAT
    if count > MAX_CANDIDATES:
        raise WireError(f"a direct-path offer with {count} candidates (at most {MAX_CANDIDATES})")
    candidates = []
    at = _HEAD.size
    for _ in range(count):
        if len(body) < at + 2:
            raise WireError("a direct-path candidate is cut short")
        kind, version = body[at], body[at + 1]
        size = {4: 4, 6: 16}.get(version)
        if size is None:
            raise WireError(f"a direct-path candidate of IP version {version}")
        end = at + 2 + size + _PORT.size
        if len(body) < end:
            raise WireError("a direct-path candidate is cut short")
        host = str(ipaddress.ip_address(body[at + 2 : at + 2 + size]))
        (port,) = _PORT.unpack_from(body, at + 2 + size)
        at = end
        try:
            candidate_kind = CandidateKind(kind)
        except ValueError:
            continue  # a kind from a later version: skipped
        if port == 0:
            raise WireError("a direct-path candidate with port 0")
        candidates.append(Candidate(candidate_kind, host, port))
    if at != len(body):
        raise WireError("a direct-path offer has bytes after its candidates")
    return DirectOffer(attempt, nat_class, fingerprint, secret, tuple(candidates))


def encode_failed(attempt: int, reason: FailReason) -> bytes:
    return _FAILED.pack(attempt, reason)


def decode_failed(body: bytes) -> tuple[int, int]:
    """The attempt and the reason byte (a reason unknown here is kept as a number)."""
    if len(body) != _FAILED.size:
        raise WireError("a DIRECT_FAILED signal is 5 bytes")
    return _FAILED.unpack(body)


def punch_key(offer: DirectOffer, answer: DirectOffer) -> bytes:
    """
    The key both sides authenticate punch probes with: from the two halves
    each sent inside the session (so nobody outside it can make a probe),
    fresh for every attempt.
    """
    return hashlib.blake2b(offer.secret + answer.secret, digest_size=32, person=_PUNCH_PERSON).digest()
