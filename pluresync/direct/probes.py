"""
The hole-punching probes on the wire: what two peers send each other on
UDP to open their NATs, and how each tells the other's probes from anyone
else's.

A probe is 34 bytes (docs/protocol.md, "Hole punching probes")::

    0      type      0x80 PROBE, 0x81 ANSWER, 0x82 CHOSEN, 0x83 KEEPALIVE
    1      role      0x01 the session's initiator, 0x02 its responder
    2..9   counter   big-endian; 1 for the sender's first message of a punch, +1 each
    10..17 echo      the counter of the message this one answers (0 if none)
    18..33 MAC       BLAKE2b-128 keyed with the punch key, person "pluresync-probe", over bytes 0..17

The first byte is in 0x80-0xBF so one UDP socket can carry STUN (first
byte 0x00-0x3F), QUIC (0x40-0x7F short headers, 0xC0-0xFF long headers)
and probes, told apart by that byte alone (L{is_probe}).

Nothing here does I/O: L{ProbeCodec} seals and opens messages, and
L{ReplayWindow} remembers which counters were seen, so a copy of a probe
replayed by someone on the path is dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

#: The length of every probe.
PROBE_SIZE = 34
#: The punch key's length.
KEY_SIZE = 32
_MAC_SIZE = 16
_HEADER = struct.Struct(">BBQQ")
_PERSON = b"pluresync-probe"


class Kind(IntEnum):
    """What a probe asks or says (its first byte)."""

    #: "Can you hear me on this path?"; sent to every candidate address.
    PROBE = 0x80
    #: "I heard your message number C{echo}", sent back the way it came.
    ANSWER = 0x81
    #: The initiator's pick: "use the path my ANSWER number C{echo} took" (the responder answers it).
    CHOSEN = 0x82
    #: Traffic that keeps the NAT mappings of a punched path alive; never answered.
    KEEPALIVE = 0x83


class Role(IntEnum):
    """Which end of the session sent a probe (byte 1): a probe with our own role is our own, reflected."""

    INITIATOR = 0x01
    RESPONDER = 0x02


def is_probe(datagram: bytes) -> bool:
    """
    Whether a datagram on a shared UDP socket belongs to hole punching: its
    first byte is in 0x80-0xBF, which neither STUN nor QUIC (with its fixed
    bit set, as pluresync's QUIC always leaves it) ever uses.
    """
    return bool(datagram) and 0x80 <= datagram[0] <= 0xBF


@dataclass(frozen=True, slots=True)
class Probe:
    """One authenticated message from the peer."""

    kind: Kind
    role: Role
    counter: int
    echo: int


class ProbeCodec:
    """
    Seals this side's messages and opens the peer's, under one punch key.

    It numbers what it seals, so the peer can drop replays, and opens only
    what carries the peer's role and a MAC made with the key: a stranger's
    datagram, a tampered one and our own reflected back all open to C{None}.
    """

    __slots__ = ("_key", "_role", "_peer", "_counter")

    def __init__(self, key: bytes, role: Role) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ValueError(f"a punch key is {KEY_SIZE} bytes (the session derives it)")
        self._key = key
        self._role = role
        self._peer = Role.RESPONDER if role is Role.INITIATOR else Role.INITIATOR
        self._counter = 0

    @property
    def last_counter(self) -> int:
        """The counter of the last message sealed (0 before the first)."""
        return self._counter

    def seal(self, kind: Kind, echo: int = 0) -> tuple[int, bytes]:
        """The next message of C{kind}: its counter and its bytes."""
        self._counter += 1
        header = _HEADER.pack(kind, self._role, self._counter, echo)
        return self._counter, header + self._mac(header)

    def open(self, datagram: bytes) -> Probe | None:
        """The peer's message in C{datagram}, or C{None} if it is anything else."""
        if len(datagram) != PROBE_SIZE:
            return None
        header = datagram[: _HEADER.size]
        kind, role, counter, echo = _HEADER.unpack(header)
        if role != self._peer or counter == 0 or kind not in _KINDS:
            return None
        if not hmac.compare_digest(self._mac(header), datagram[_HEADER.size :]):
            return None
        return Probe(Kind(kind), self._peer, counter, echo)

    def _mac(self, header: bytes) -> bytes:
        return hashlib.blake2b(header, digest_size=_MAC_SIZE, key=self._key, person=_PERSON).digest()


_KINDS = frozenset(Kind)


class ReplayWindow:
    """
    The peer's counters seen lately: a counter is accepted once, and only if
    it is within C{size} of the highest seen.

    Probes reach us on several paths at once and may be reordered, so a
    window rather than "higher than the last"; a bitmap, so memory stays
    bounded whatever the peer (or an attacker replaying it) sends.
    """

    __slots__ = ("_size", "_highest", "_seen")

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._highest = 0
        self._seen = 0  # bit i: counter (highest - i) was seen

    def accept(self, counter: int) -> bool:
        """Whether C{counter} is new (and now remembered)."""
        if counter > self._highest:
            shift = counter - self._highest
            self._seen = ((self._seen << shift) | 1) & ((1 << self._size) - 1) if shift < self._size else 1
            self._highest = counter
            return True
        offset = self._highest - counter
        if offset >= self._size or self._seen >> offset & 1:
            return False
        self._seen |= 1 << offset
        return True
