"""
UDP hole punching (pluresync.direct.punch) on a Clock, through fake NATs.

The fake network delivers datagrams after a latency on the same Clock, and
models the two NATs that matter: a cone NAT (one public port per socket,
inbound only from addresses the socket sent to) and a symmetric one (a new
random public port for every destination).  The lab tests
(tests/test_natlab.py) run the same code through real nftables NATs.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from pluresync.direct.probes import KEY_SIZE, PROBE_SIZE, Kind, ProbeCodec, ReplayWindow, Role, is_probe
from pluresync.direct.punch import (
    BIRTHDAY,
    BLOCKED,
    CONE,
    LAN,
    MAX_CANDIDATES,
    OPEN,
    SIMULTANEOUS,
    SPRAY,
    SYMMETRIC,
    UNKNOWN,
    HolePunch,
    PunchedPath,
    UdpSockets,
)
from pluresync.direct.signal import Candidate, CandidateKind, NatClass
from pluresync.direct.stun import encode_binding_request, is_stun
from pluresync.errors import DirectPathError, PluresyncError
from pluresync.interfaces import IDatagramHandler

HOST, MAPPED = CandidateKind.HOST, CandidateKind.REFLEXIVE

Address = tuple[str, int]
KEY = bytes(range(KEY_SIZE))
#: Where the (imaginary) STUN server is: the mapped candidates are the NATs' mappings toward it.
STUN = ("203.0.113.1", 3478)


class FakeNat:
    """A NAT in front of one LAN: endpoint-independent (cone) or -dependent (symmetric) mapping."""

    def __init__(self, public_ip: str, lan: str, symmetric: bool, rng: random.Random) -> None:
        self.public_ip = public_ip
        self.lan = lan  # prefix of the LAN's addresses, e.g. "192.168.1."
        self.symmetric = symmetric
        self.rng = rng
        self.mappings: dict[tuple[Address, Address | None], int] = {}
        #: public port -> (private address, the remote addresses it sent to)
        self.reverse: dict[int, tuple[Address, set[Address]]] = {}

    def outbound(self, private: Address, destination: Address) -> Address:
        key = (private, destination if self.symmetric else None)
        port = self.mappings.get(key)
        if port is None:
            port = private[1] if not self.symmetric and private[1] not in self.reverse else None
            while port is None or port in self.reverse:
                port = self.rng.randrange(1024, 65536)
            self.mappings[key] = port
            self.reverse[port] = (private, set())
        self.reverse[port][1].add(destination)
        return (self.public_ip, port)

    def inbound(self, source: Address, public: Address) -> Address | None:
        entry = self.reverse.get(public[1])
        if entry is None or source not in entry[1]:
            return None  # nothing mapped there, or not from where it sent: dropped
        return entry[0]


class FakeNet:
    """
    Datagrams between fake sockets, through their NATs, each delivered after
    C{latency}.  A private address is reachable only from its own LAN, and a
    NAT does not hairpin.
    """

    def __init__(self, clock: Clock, latency: float = 0.005) -> None:
        self.clock = clock
        self.latency = latency
        self.sockets: dict[Address, FakeSocket] = {}
        self.nats: dict[str, FakeNat] = {}
        #: called with (source, destination, datagram) as seen on the wire; False drops it
        self.allow: Callable[[Address, Address, bytes], bool] = lambda source, destination, datagram: True
        self.wire: list[tuple[Address, Address, bytes]] = []

    def send(self, sock: FakeSocket, datagram: bytes, destination: Address) -> None:
        if sock.closed:
            raise OSError(9, "Bad file descriptor")
        source = sock.address
        nat = sock.nat
        if nat is not None and not destination[0].startswith(nat.lan):
            if destination[0] == nat.public_ip:
                return
            source = nat.outbound(sock.address, destination)
        self.wire.append((source, destination, datagram))
        if self.allow(source, destination, datagram):
            self.clock.callLater(self.latency, self.deliver, datagram, source, destination)

    def deliver(self, datagram: bytes, source: Address, destination: Address) -> None:
        nat = self.nats.get(destination[0])
        if nat is not None:
            private = nat.inbound(source, destination)
            if private is None:
                return
            destination = private
        receiver = self.sockets.get(destination)
        if receiver is None:
            return
        if nat is None and receiver.nat is not None and not source[0].startswith(receiver.nat.lan):
            return  # another LAN's private address: not routed on the internet
        receiver.deliver(datagram, source)


class FakeSocket:
    """A UDP socket on the fake network; what it receives goes to C{receive(datagram, source)}."""

    def __init__(self, net: FakeNet, address: Address, nat: FakeNat | None, receive: Callable) -> None:
        self.net = net
        self.address = address
        self.nat = nat
        self.receive = receive
        self.closed = False
        self.released = False
        self.sent: list[tuple[bytes, Address]] = []
        net.sockets[address] = self

    def deliver(self, datagram: bytes, source: Address) -> None:
        if not self.closed:
            self.receive(datagram, source)

    def sendto(self, datagram: bytes, destination: Address) -> int:
        self.sent.append((datagram, destination))
        self.net.send(self, datagram, destination)
        return len(datagram)

    def close(self) -> None:
        self.closed = True
        self.net.sockets.pop(self.address, None)


class FakeSockets:
    """The birthday socket factory of one host: sockets on its next free ports, behind its NAT."""

    def __init__(self, side: Side, limit: int | None = None) -> None:
        self.side = side
        self.limit = limit
        self.opened: list[BirthdaySocket] = []

    def open(self, receive: Callable) -> BirthdaySocket:
        if self.limit is not None and len(self.opened) >= self.limit:
            raise OSError(24, "Too many open files")
        side = self.side
        sock = BirthdaySocket(side, (side.address[0], 40000 + len(self.opened)), receive)
        self.opened.append(sock)
        return sock


class BirthdaySocket(FakeSocket):
    """A socket the puncher opened: its datagrams go to the puncher until released, then to the side's owner."""

    def __init__(self, side: Side, address: Address, receive: Callable) -> None:
        super().__init__(side.net, address, side.nat, lambda datagram, source: receive(self, datagram, source))
        self.side = side

    def release(self) -> BirthdaySocket:
        self.released = True
        self.receive = self.side.owner_received
        return self


class Side:
    """One peer: its main socket (whose owner passes probes on), its NAT and its puncher."""

    def __init__(self, net: FakeNet, address: Address, nat: FakeNat | None, *, limit: int | None = None) -> None:
        self.net = net
        self.address = address
        self.nat = nat
        self.socket = FakeSocket(net, address, nat, self.owner_received)
        self.sockets = FakeSockets(self, limit)
        self.punch: HolePunch | None = None
        self.other: list[tuple[bytes, Address]] = []  # what the owner keeps (STUN, QUIC)

    def owner_received(self, datagram: bytes, source: Address) -> None:
        """The owner offers each datagram to its handlers: the punch, then (here) a list of the rest."""
        if self.punch is None or not self.punch.datagramReceived(datagram, source):
            self.other.append((datagram, source))

    def candidates(self) -> list[Candidate]:
        """What this side tells the peer: its host address and, behind a NAT, the mapping STUN saw."""
        found = [Candidate(HOST, *self.address)]
        if self.nat is not None:
            found.append(Candidate(MAPPED, *self.nat.outbound(self.address, STUN)))
        return found


class PunchTestCase(SynchronousTestCase):
    """Two sides on a fake network; helpers to punch between them and check what is left behind."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.net = FakeNet(self.clock)
        self.rng = random.Random(7)

    def nat(self, public_ip: str, lan: str, symmetric: bool = False) -> FakeNat:
        nat = FakeNat(public_ip, lan, symmetric, self.rng)
        self.net.nats[public_ip] = nat
        return nat

    def side(self, address: Address, nat: FakeNat | None = None, **kwargs: Any) -> Side:
        return Side(self.net, address, nat, **kwargs)

    def punch(
        self, side: Side, peer: Side, *, initiator: bool, local: str, remote: str, key: bytes = KEY, **options: Any
    ) -> HolePunch:
        options.setdefault("random", random.Random(11 if initiator else 13))
        side.punch = HolePunch(
            self.clock,
            side.socket,
            key,
            initiator=initiator,
            local_nat=local,
            peer_nat=remote,
            candidates=options.pop("candidates", None) or peer.candidates(),
            sockets=side.sockets,
            **options,
        )
        return side.punch

    def both(
        self, a: Side, b: Side, nat_a: str, nat_b: str, told: dict | None = None, **options: Any
    ) -> tuple[list, list]:
        """
        Start a (initiator) and b (responder) at once; their outcomes, filled
        as the clock runs.  C{told}: what a side tells the other, if not its
        candidates().
        """
        outcomes: tuple[list, list] = ([], [])
        told = told or {}
        for side, peer, mine, theirs, initiator in ((a, b, nat_a, nat_b, True), (b, a, nat_b, nat_a, False)):
            candidates = told.get(peer) or peer.candidates()
            self.punch(side, peer, initiator=initiator, local=mine, remote=theirs, candidates=candidates, **options)
        for side, into in ((a, outcomes[0]), (b, outcomes[1])):
            side.punch.start().addBoth(into.append)
        return outcomes

    def run_until(self, done: Callable[[], bool], limit: float = 30.0, step: float = 0.005) -> float:
        """Advance the clock until C{done()} (bounded); the simulated seconds it took."""
        start = self.clock.seconds()
        while not done():
            self.assertLess(self.clock.seconds() - start, limit, "did not settle in time")
            self.clock.advance(step)
        return self.clock.seconds() - start

    def settle(self, *sides: Side) -> None:
        """Stop every punch, drain the network: no timer may be left behind."""
        for side in sides:
            if side.punch is not None:
                side.punch.stop()
        self.clock.advance(1.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def path(self, outcome: list) -> PunchedPath:
        self.assertEqual(len(outcome), 1)
        if not isinstance(outcome[0], PunchedPath):
            outcome[0].raiseException()
        return outcome[0]

    def error(self, outcome: list, reason: str) -> DirectPathError:
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0].value, DirectPathError, outcome[0])
        self.assertEqual(outcome[0].value.reason, reason, str(outcome[0].value))
        return outcome[0].value


class ProbeTests(SynchronousTestCase):
    """The wire format: sealed, numbered, told apart from STUN and QUIC."""

    def test_round_trip(self) -> None:
        mine, theirs = ProbeCodec(KEY, Role.INITIATOR), ProbeCodec(KEY, Role.RESPONDER)
        counter, datagram = mine.seal(Kind.PROBE)
        self.assertEqual((counter, len(datagram), datagram[0], datagram[1]), (1, PROBE_SIZE, 0x80, 0x01))
        probe = theirs.open(datagram)
        self.assertEqual((probe.kind, probe.role, probe.counter, probe.echo), (Kind.PROBE, Role.INITIATOR, 1, 0))
        counter, answer = theirs.seal(Kind.ANSWER, echo=1)
        self.assertEqual(mine.open(answer).echo, 1)

    def test_strangers_and_reflections_do_not_open(self) -> None:
        """Another key, our own role (a reflected probe), a flipped bit, a wrong size: nothing."""
        mine, theirs = ProbeCodec(KEY, Role.INITIATOR), ProbeCodec(KEY, Role.RESPONDER)
        stranger = ProbeCodec(bytes(KEY_SIZE), Role.RESPONDER)
        _, own = mine.seal(Kind.PROBE)
        _, forged = stranger.seal(Kind.PROBE)
        _, good = theirs.seal(Kind.PROBE)
        self.assertIsNone(mine.open(own))
        self.assertIsNone(mine.open(forged))
        for index in range(PROBE_SIZE):
            tampered = bytearray(good)
            tampered[index] ^= 0x01
            self.assertIsNone(mine.open(bytes(tampered)), index)
        self.assertIsNone(mine.open(good + b"\x00"))
        self.assertIsNone(mine.open(good[:-1]))
        self.assertIsNotNone(mine.open(good))

    def test_key_size(self) -> None:
        with self.assertRaises(ValueError):
            ProbeCodec(b"short", Role.INITIATOR)

    def test_first_byte(self) -> None:
        """Probes 0x80-0xBF; STUN (0x00, 0x01), QUIC short (0x40-0x7F) and long (0xC0-) headers are not."""
        self.assertEqual([b for b in range(256) if is_probe(bytes([b]))], list(range(0x80, 0xC0)))
        self.assertFalse(is_probe(b""))
        self.assertTrue(all(0x80 <= kind <= 0xBF for kind in Kind))
        # Never STUN, even with the magic cookie where STUN has it; and a STUN message is never a probe.
        for first in range(0x80, 0xC0):
            self.assertFalse(is_stun(bytes([first, 0]) + b"\x00\x00\x21\x12\xa4\x42" + bytes(26)))
        self.assertFalse(is_probe(encode_binding_request(bytes(12))))

    def test_replay_window(self) -> None:
        window = ReplayWindow(size=8)
        self.assertEqual([window.accept(c) for c in (1, 3, 2, 3, 1)], [True, True, True, False, False])
        self.assertTrue(window.accept(20))
        self.assertFalse(window.accept(12))  # out of the window: too old to tell
        self.assertTrue(window.accept(13))
        self.assertFalse(window.accept(13))
        self.assertTrue(window.accept(1000))
        self.assertFalse(window.accept(1000))


class StrategyTests(PunchTestCase):
    """Each NAT combination: the path both ends agree on."""

    def test_cone_cone(self) -> None:
        """Both probe each other's mapped address; both end on it, on their own socket."""
        a = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1."))
        b = self.side(("192.168.2.2", 6000), self.nat("198.51.100.2", "192.168.2."))
        outcomes = self.both(a, b, CONE, CONE)
        took = self.run_until(lambda: all(outcomes))
        self.assertLess(took, 0.1)
        pa, pb = self.path(outcomes[0]), self.path(outcomes[1])
        self.assertEqual(pa.peer, ("198.51.100.2", 6000))
        self.assertEqual(pb.peer, ("198.51.100.1", 5000))
        self.assertIs(pa.socket, a.socket)
        self.assertFalse(pa.new_socket or pb.new_socket)
        self.assertEqual((pa.strategy, a.punch.strategy), (SIMULTANEOUS, SIMULTANEOUS))
        self.assertEqual(a.sockets.opened + b.sockets.opened, [])
        self.settle(a, b)

    def test_no_nat(self) -> None:
        """Open on both sides: the host addresses answer at once."""
        a = self.side(("198.51.100.1", 5000))
        b = self.side(("198.51.100.2", 6000))
        outcomes = self.both(a, b, OPEN, OPEN)
        self.run_until(lambda: all(outcomes))
        self.assertEqual(self.path(outcomes[0]).peer, b.address)
        self.settle(a, b)

    def test_unknown_is_punched_as_cone(self) -> None:
        """An unknown NAT (one STUN answer only), given as a signal's NatClass: probed as a cone."""
        a = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1."))
        b = self.side(("192.168.2.2", 6000), self.nat("198.51.100.2", "192.168.2."))
        outcomes = self.both(a, b, NatClass.UNKNOWN, NatClass.CONE)
        self.run_until(lambda: all(outcomes))
        self.assertEqual(self.path(outcomes[0]).strategy, SIMULTANEOUS)
        self.assertEqual(b.punch.strategy, SIMULTANEOUS)
        self.assertEqual(UNKNOWN, NatClass.UNKNOWN.name.lower())
        self.settle(a, b)

    def birthday(self, symmetric_initiates: bool) -> None:
        s = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1.", symmetric=True))
        c = self.side(("192.168.2.2", 6000), self.nat("198.51.100.2", "192.168.2."))
        first, second = (s, c) if symmetric_initiates else (c, s)
        outcomes = self.both(first, second, *((SYMMETRIC, CONE) if symmetric_initiates else (CONE, SYMMETRIC)))
        took = self.run_until(lambda: all(outcomes))
        self.assertLess(took, 5.0)
        ps, pc = (self.path(outcomes[0]), self.path(outcomes[1]))
        if not symmetric_initiates:
            ps, pc = pc, ps
        self.assertEqual((s.punch.strategy, c.punch.strategy), (BIRTHDAY, SPRAY))
        # The symmetric side won on one of its 256 birthday sockets, now the caller's; the rest are closed.
        self.assertEqual(len(s.sockets.opened), 256)
        self.assertTrue(ps.new_socket)
        self.assertTrue(ps.socket.released and not ps.socket.closed)
        self.assertEqual([o for o in s.sockets.opened if not o.closed], [ps.socket])
        self.assertEqual(ps.peer, ("198.51.100.2", 6000))
        # The cone side reaches the port the symmetric NAT gave that socket toward it.
        self.assertEqual(pc.peer, s.nat.outbound(ps.socket.address, ("198.51.100.2", 6000)))
        self.assertIs(pc.socket, c.socket)
        self.assertLessEqual(c.punch.stats.sent, 2000 + 500)
        self.settle(s, c)

    def test_symmetric_initiator_cone_responder(self) -> None:
        self.birthday(symmetric_initiates=True)

    def test_cone_initiator_symmetric_responder(self) -> None:
        self.birthday(symmetric_initiates=False)

    def test_symmetric_symmetric(self) -> None:
        """Hopeless beyond a LAN: only host addresses, for lan_timeout; no birthday socket is opened."""
        a = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1.", symmetric=True))
        b = self.side(("192.168.2.2", 6000), self.nat("198.51.100.2", "192.168.2.", symmetric=True))
        outcomes = self.both(a, b, SYMMETRIC, SYMMETRIC, lan_timeout=0.5)
        took = self.run_until(lambda: all(outcomes))
        self.assertAlmostEqual(took, 0.5, delta=0.01)
        error = self.error(outcomes[0], "both-symmetric")
        self.assertIn("both peers are behind symmetric NATs", str(error))
        self.assertIn("relay keeps carrying", str(error))
        self.error(outcomes[1], "both-symmetric")
        self.assertEqual(a.punch.strategy, LAN)
        self.assertEqual(a.sockets.opened + b.sockets.opened, [])
        # Nothing was sent to the useless mapped addresses: only to the LAN ones.
        self.assertEqual({d for _, d, _ in self.net.wire}, {a.address, b.address})
        self.settle(a, b)

    def test_symmetric_symmetric_without_lan_addresses(self) -> None:
        """Nothing to try at all: it fails at once."""
        a = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1.", symmetric=True))
        b = self.side(("192.168.2.2", 6000), self.nat("198.51.100.2", "192.168.2.", symmetric=True))
        punch = self.punch(
            a,
            b,
            initiator=True,
            local=SYMMETRIC,
            remote=SYMMETRIC,
            candidates=[c for c in b.candidates() if c.kind == MAPPED],
        )
        self.assertIsNone(punch.strategy)
        failure = self.failureResultOf(punch.start(), DirectPathError)
        self.assertEqual(failure.value.reason, "both-symmetric")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_same_lan_behind_one_symmetric_nat(self) -> None:
        """Both symmetric, but on one LAN: the host addresses meet (never skipped)."""
        nat = self.nat("198.51.100.1", "192.168.1.", symmetric=True)
        a = self.side(("192.168.1.2", 5000), nat)
        b = self.side(("192.168.1.3", 6000), nat)
        outcomes = self.both(a, b, SYMMETRIC, SYMMETRIC)
        self.run_until(lambda: all(outcomes))
        self.assertEqual(self.path(outcomes[0]).peer, b.address)
        self.assertEqual(self.path(outcomes[1]).peer, a.address)
        self.assertEqual(self.path(outcomes[0]).strategy, LAN)
        self.settle(a, b)

    def test_same_lan_behind_one_cone_nat(self) -> None:
        """Host addresses are probed first and answer (the NAT does not hairpin)."""
        nat = self.nat("198.51.100.1", "192.168.1.")
        a = self.side(("192.168.1.2", 5000), nat)
        b = self.side(("192.168.1.3", 6000), nat)
        outcomes = self.both(a, b, CONE, CONE)
        self.run_until(lambda: all(outcomes))
        self.assertEqual(self.path(outcomes[0]).peer, b.address)
        self.settle(a, b)

    def test_blocked(self) -> None:
        """A side without UDP: host addresses only, for lan_timeout, then a clear reason."""
        a = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1."))
        b = self.side(("10.0.0.2", 6000), self.nat("198.51.100.2", "10.0.0."))
        self.net.allow = lambda source, destination, datagram: "198.51.100.2" not in (source[0], destination[0])
        # b's public address lookup got no answer: it tells only its host address.
        outcomes = self.both(a, b, CONE, BLOCKED, told={b: [Candidate(HOST, *b.address)]}, lan_timeout=1.0)
        took = self.run_until(lambda: all(outcomes))
        self.assertAlmostEqual(took, 1.0, delta=0.01)
        self.assertIn("the peer's network", str(self.error(outcomes[0], "udp-blocked")))
        self.assertIn("this network", str(self.error(outcomes[1], "udp-blocked")))
        self.settle(a, b)


class FailureTests(PunchTestCase):
    """Time bounds, cancellation, and what is cleaned up."""

    def setUp(self) -> None:
        super().setUp()
        self.a = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1."))
        self.b = self.side(("192.168.2.2", 6000), self.nat("198.51.100.2", "192.168.2."))

    def test_silent_peer(self) -> None:
        """No answer within the timeout: no-answer, at the timeout exactly."""
        punch = self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE, timeout=3.0)
        d = punch.start()
        self.clock.pump([0.125] * 23)
        self.assertNoResult(d)
        self.clock.advance(0.125)
        error = self.failureResultOf(d, DirectPathError).value
        self.assertEqual(error.reason, "no-answer")
        self.assertIn("within 3 s on any of its 2 address(es)", str(error))
        self.assertIsInstance(error, PluresyncError)
        sent = punch.stats.sent
        self.clock.advance(1)
        self.assertEqual(punch.stats.sent, sent)  # probing stopped
        self.settle(self.a)

    def test_one_way(self) -> None:
        """The peer's probes arrive, ours never get back: one-way."""
        self.net.allow = lambda source, destination, datagram: destination[0] != "198.51.100.1"
        outcomes = self.both(self.a, self.b, CONE, CONE, timeout=2.0)
        self.run_until(lambda: all(outcomes))
        self.error(outcomes[0], "no-answer")
        self.error(outcomes[1], "one-way")
        self.settle(self.a, self.b)

    def test_birthday_search_that_fails(self) -> None:
        """A symmetric peer that never answers: the spray stops at its bound, the error says what was tried."""
        punch = self.punch(self.a, self.b, initiator=True, local=CONE, remote=SYMMETRIC, spray_limit=300, timeout=5)
        d = punch.start()
        self.clock.pump([0.125] * 40)
        error = self.failureResultOf(d, DirectPathError).value
        self.assertIn("symmetric NAT's port was searched for", str(error))
        rounds = sum(1 for _, dest, _ in self.net.wire if dest == self.b.address)
        sprayed = [dest for _, dest, _ in self.net.wire if dest[0] == "198.51.100.2"]
        self.assertEqual(len(sprayed) - rounds, 300)  # each round probes the mapped address too
        self.assertGreaterEqual(len(set(sprayed)), 300)  # never the same port twice
        self.settle(self.a)

    def test_cancel(self) -> None:
        """Cancelling the Deferred stops the punch and closes its birthday sockets."""
        punch = self.punch(self.a, self.b, initiator=True, local=SYMMETRIC, remote=CONE, birthday_sockets=16)
        d = punch.start()
        self.clock.advance(0.5)
        self.assertEqual(len(self.a.sockets.opened), 16)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(all(s.closed for s in self.a.sockets.opened))
        self.settle(self.a)

    def test_stop(self) -> None:
        """stop() does the same; stop() before start() means start() fails at once."""
        punch = self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE)
        d = punch.start()
        punch.stop()
        punch.stop()
        self.failureResultOf(d, CancelledError)
        self.settle(self.a)
        early = self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE)
        early.stop()
        self.failureResultOf(early.start(), CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_runs_once(self) -> None:
        punch = self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE)
        d = punch.start()
        self.assertRaises(RuntimeError, punch.start)
        self.settle(self.a)
        self.failureResultOf(d, CancelledError)

    def test_unreachable(self) -> None:
        """Every send fails (no route, a local firewall): it says so without waiting for the timeout."""

        def refuse(datagram: bytes, destination: Address) -> int:
            raise OSError(101, "Network is unreachable")

        self.a.socket.sendto = refuse
        punch = self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE, timeout=10, interval=0.1)
        d = punch.start()
        self.clock.pump([0, 0.1, 0.1])
        error = self.failureResultOf(d, DirectPathError).value
        self.assertEqual(error.reason, "unreachable")
        self.assertIn("Network is unreachable", str(error))
        self.settle(self.a)

    def test_bounded_birthday_sockets(self) -> None:
        """The symmetric side opens at most birthday_sockets; when the system refuses more, it goes on with fewer."""
        limited = self.side(("192.168.3.2", 7000), self.nat("198.51.100.3", "192.168.3.", symmetric=True), limit=10)
        punch = self.punch(limited, self.b, initiator=True, local=SYMMETRIC, remote=CONE, birthday_sockets=64)
        d = punch.start()
        self.clock.advance(0.2)
        self.assertEqual(punch.stats.sockets_opened, 10)
        punch.stop()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(all(s.closed for s in limited.sockets.opened))
        self.settle(limited)

    def test_bad_candidates(self) -> None:
        """Malformed, non-unicast and surplus candidates are dropped; none left: no-candidates, at once."""
        junk = [
            Candidate(HOST, "not an address", 1),
            Candidate(HOST, "224.0.0.1", 5000),
            Candidate(HOST, "0.0.0.0", 5000),
            Candidate(MAPPED, "198.51.100.2", 0),
            Candidate(CandidateKind.LAN_TCP, "198.51.100.2", 5000),  # for the LAN's TCP, not punched
        ]
        punch = self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE, candidates=junk)
        self.assertEqual(self.failureResultOf(punch.start(), DirectPathError).value.reason, "no-candidates")
        many = [Candidate(HOST, f"10.1.{i // 256}.{i % 256}", 9) for i in range(100)]
        punch = self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE, candidates=many)
        d = punch.start()
        self.clock.advance(0)
        self.assertEqual(len({dest for _, dest, _ in self.net.wire}), MAX_CANDIDATES)
        self.settle(self.a)
        self.failureResultOf(d, CancelledError)

    def test_bad_arguments(self) -> None:
        with self.assertRaises(ValueError):
            self.punch(self.a, self.b, initiator=True, local="full-cone", remote=CONE)
        with self.assertRaises(ValueError):
            self.punch(self.a, self.b, initiator=True, local=CONE, remote=7)
        with self.assertRaises(ValueError):
            self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE, key=b"\x00" * 16)
        with self.assertRaises(ValueError):
            self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE, timeout=0)


class AuthenticationTests(PunchTestCase):
    """Only the peer's fresh messages, on the path they name, count."""

    def setUp(self) -> None:
        super().setUp()
        self.a = self.side(("198.51.100.1", 5000))
        self.b = self.side(("198.51.100.2", 6000))
        self.mallory = FakeSocket(self.net, ("198.51.100.66", 6666), None, self.heard_by_mallory)
        self.mallory_heard: list[tuple[bytes, Address]] = []

    def heard_by_mallory(self, datagram: bytes, source: Address) -> None:
        self.mallory_heard.append((datagram, source))

    def test_stranger(self) -> None:
        """Garbage, or probes under another key, are never answered and prove nothing."""
        punch = self.punch(self.a, self.b, initiator=False, local=OPEN, remote=OPEN, timeout=1.0)
        d = punch.start()
        stranger = ProbeCodec(bytes(KEY_SIZE), Role.INITIATOR)
        for _ in range(5):
            self.mallory.sendto(stranger.seal(Kind.PROBE)[1], self.a.address)
            self.mallory.sendto(b"\x80" + bytes(33), self.a.address)
        self.clock.advance(1.0)
        self.assertEqual(self.failureResultOf(d, DirectPathError).value.reason, "no-answer")
        self.assertEqual(self.mallory_heard, [])
        self.assertEqual(punch.stats.ignored, 10)
        self.settle(self.a)

    def test_replayed_probe(self) -> None:
        """A copy of the peer's probe, sent again from elsewhere, is not answered."""
        peer = ProbeCodec(KEY, Role.INITIATOR)
        _, probe = peer.seal(Kind.PROBE)
        punch = self.punch(self.a, self.b, initiator=False, local=OPEN, remote=OPEN, timeout=1.0)
        d = punch.start()
        self.b.socket.sendto(probe, self.a.address)  # the genuine one
        self.clock.advance(0.01)
        self.mallory.sendto(probe, self.a.address)  # replayed
        self.clock.advance(0.01)
        self.assertEqual(self.mallory_heard, [])
        self.assertEqual(punch.stats.replayed, 1)
        self.settle(self.a)
        self.failureResultOf(d, CancelledError)

    def test_reflected_probe(self) -> None:
        """Our own probe bounced back (by a hairpin, or an attacker) is not the peer's."""
        punch = self.punch(self.a, self.b, initiator=True, local=OPEN, remote=OPEN, timeout=1.0)
        d = punch.start()
        self.clock.advance(0)
        own = next(datagram for datagram, _ in self.a.socket.sent)
        self.mallory.sendto(own, self.a.address)
        self.clock.advance(1.0)
        self.failureResultOf(d, DirectPathError)
        self.assertEqual(punch.stats.ignored, 1)
        self.assertEqual(self.mallory_heard, [])
        self.settle(self.a)

    def test_answer_from_elsewhere(self) -> None:
        """A genuine answer relayed from another address does not prove that address's path."""
        peer = ProbeCodec(KEY, Role.RESPONDER)
        punch = self.punch(self.a, self.b, initiator=True, local=OPEN, remote=OPEN, timeout=1.0)
        d = punch.start()
        self.clock.advance(0)
        # Our probe 1 went to b; an answer to it arrives from mallory's address.
        self.mallory.sendto(peer.seal(Kind.ANSWER, echo=1)[1], self.a.address)
        # And one to a probe we never sent.
        self.b.socket.sendto(peer.seal(Kind.ANSWER, echo=999)[1], self.a.address)
        self.clock.advance(1.0)
        self.assertEqual(self.failureResultOf(d, DirectPathError).value.reason, "one-way")
        self.assertEqual(punch.stats.mismatched, 2)
        self.assertFalse(any(datagram[0] == Kind.CHOSEN for datagram, _ in self.a.socket.sent))
        self.settle(self.a)

    def test_wrong_key_pair(self) -> None:
        """Two peers with different punch keys never meet."""
        self.punch(self.a, self.b, initiator=True, local=OPEN, remote=OPEN, timeout=1.0)
        self.punch(self.b, self.a, initiator=False, local=OPEN, remote=OPEN, timeout=1.0, key=bytes(KEY_SIZE))
        outcomes: tuple[list, list] = ([], [])
        self.a.punch.start().addBoth(outcomes[0].append)
        self.b.punch.start().addBoth(outcomes[1].append)
        self.run_until(lambda: all(outcomes))
        self.error(outcomes[0], "no-answer")
        self.error(outcomes[1], "no-answer")
        self.settle(self.a, self.b)

    def test_a_datagram_handler(self) -> None:
        punch = self.punch(self.a, self.b, initiator=True, local=OPEN, remote=OPEN)
        self.assertTrue(verifyObject(IDatagramHandler, punch))
        self.assertFalse(punch.datagramReceived(b"\x00\x01" + bytes(18), self.b.address))
        self.assertTrue(punch.datagramReceived(b"\x80" + bytes(33), self.b.address))  # a probe, if no valid one

    def test_other_datagrams_stay_with_the_owner(self) -> None:
        """STUN and QUIC on the same socket are the owner's: the punch declines them."""
        d = self.punch(self.a, self.b, initiator=True, local=OPEN, remote=OPEN, timeout=1.0).start()
        self.mallory.sendto(b"\x00\x01" + bytes(18), self.a.address)  # a STUN Binding request
        self.mallory.sendto(b"\xc3" + bytes(40), self.a.address)  # a QUIC long header
        self.clock.advance(0.01)
        self.assertEqual([datagram[0] for datagram, _ in self.a.other], [0x00, 0xC3])
        self.settle(self.a)
        self.failureResultOf(d, CancelledError)


class AgreementTests(PunchTestCase):
    """Both ends take the same path, even when the first answers are lost; then keep it alive."""

    def setUp(self) -> None:
        super().setUp()
        self.a = self.side(("192.168.1.2", 5000), self.nat("198.51.100.1", "192.168.1."))
        self.b = self.side(("192.168.2.2", 6000), self.nat("198.51.100.2", "192.168.2."))

    def lose_confirmations(self, count: int) -> list[bytes]:
        """Drop the first C{count} answers to the initiator's CHOSEN; what was dropped."""
        lost: list[bytes] = []

        def allow(source: Address, destination: Address, datagram: bytes) -> bool:
            chosen = {d[2:10] for _, _, d in self.net.wire if d[0] == Kind.CHOSEN}
            if datagram[0] == Kind.ANSWER and datagram[10:18] in chosen and len(lost) < count:
                lost.append(datagram)
                return False
            return True

        self.net.allow = allow
        return lost

    def test_lost_confirmation(self) -> None:
        """The responder's first answers to CHOSEN are lost: the initiator names it again until one arrives."""
        lost = self.lose_confirmations(2)
        outcomes = self.both(self.a, self.b, CONE, CONE, interval=0.1)
        self.run_until(lambda: all(outcomes))
        self.assertEqual(len(lost), 2)
        self.assertEqual(self.path(outcomes[0]).peer, ("198.51.100.2", 6000))
        self.assertEqual(self.path(outcomes[1]).peer, ("198.51.100.1", 5000))
        chosen = [d for _, _, d in self.net.wire if d[0] == Kind.CHOSEN]
        self.assertGreaterEqual(len(chosen), 3)
        self.settle(self.a, self.b)

    def test_lost_confirmation_on_a_birthday_socket(self) -> None:
        """
        The responder won on a birthday socket, now its owner's: the owner
        passes on what arrives there, and the repeated CHOSEN is answered.
        """
        s = self.side(("192.168.3.2", 7000), self.nat("198.51.100.3", "192.168.3.", symmetric=True))
        lost = self.lose_confirmations(2)
        outcomes = self.both(self.a, s, CONE, SYMMETRIC)
        self.run_until(lambda: all(outcomes))
        self.assertEqual(len(lost), 2)
        won = self.path(outcomes[1])
        self.assertTrue(won.new_socket)
        self.assertEqual(self.path(outcomes[0]).peer, s.nat.outbound(won.socket.address, ("198.51.100.1", 5000)))
        self.settle(self.a, s)

    def test_keepalive(self) -> None:
        """Once punched, a keepalive every interval, on the punched path, until stop()."""
        outcomes = self.both(self.a, self.b, CONE, CONE, keepalive=15.0)
        self.run_until(lambda: all(outcomes))
        self.clock.advance(1.0)
        start = len(self.net.wire)
        self.clock.pump([1.0] * 45)
        keepalives = [(s, d) for s, d, data in self.net.wire[start:] if data[0] == Kind.KEEPALIVE]
        self.assertEqual(len(keepalives), 6)  # three from each side
        self.assertIn((("198.51.100.1", 5000), ("198.51.100.2", 6000)), keepalives)
        self.assertEqual(len(self.net.wire), start + 6)  # nothing else: keepalives are not answered
        self.a.punch.stop()
        self.b.punch.stop()
        self.clock.pump([1.0] * 60)
        self.assertEqual(len(self.net.wire), start + 6)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keepalive_ends_with_its_socket(self) -> None:
        """When the owner closes the punched socket, the keepalive ends by itself."""
        outcomes = self.both(self.a, self.b, CONE, CONE, keepalive=5.0)
        self.run_until(lambda: all(outcomes))
        self.a.socket.close()
        self.b.socket.close()
        self.clock.advance(6.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_without_keepalive(self) -> None:
        outcomes = self.both(self.a, self.b, CONE, CONE, keepalive=None)
        self.run_until(lambda: all(outcomes))
        self.clock.advance(1.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_callback_may_stop(self) -> None:
        """The caller's callback runs once the machine has settled: it may stop the punch there."""
        self.punch(self.a, self.b, initiator=True, local=CONE, remote=CONE)
        self.punch(self.b, self.a, initiator=False, local=CONE, remote=CONE)
        seen: list[PunchedPath] = []

        def stop_at_once(path: PunchedPath) -> None:
            self.a.punch.stop()
            seen.append(path)

        self.a.punch.start().addCallback(stop_at_once)
        self.b.punch.start()
        self.run_until(lambda: seen)
        self.b.punch.stop()
        self.clock.advance(60.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ReactorSocketTests(TestCase):
    """The real socket path on the real reactor, over loopback (no root needed; the lab does the rest)."""

    timeout = 20

    def owned_socket(self, receive: Callable[[bytes, Address], None]) -> socket.socket:
        """A non-blocking UDP socket on 127.0.0.1 read by the reactor, as the direct path's owner holds one."""

        class Owner(DatagramProtocol):
            noisy = False

            def datagramReceived(self, datagram: bytes, address: Address) -> None:
                receive(datagram, address)

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        port = reactor.adoptDatagramPort(sock.fileno(), socket.AF_INET, Owner())
        self.addCleanup(sock.close)
        self.addCleanup(port.stopListening)
        return sock

    async def test_udp_sockets(self) -> None:
        """Birthday sockets are read by the reactor until closed, or released still open."""
        got: list[tuple[Any, bytes]] = []
        arrived: Deferred[None] = Deferred()

        def receive(sock: Any, datagram: bytes, address: Address) -> None:
            got.append((sock, datagram))
            if len(got) == 2:
                arrived.callback(None)

        sockets = [UdpSockets(reactor).open(receive) for _ in range(2)]
        sender = self.owned_socket(lambda datagram, address: None)
        for index, opened in enumerate(sockets):
            sender.sendto(bytes([index]), ("127.0.0.1", opened.getsockname()[1]))
        await arrived
        self.assertEqual(sorted(d for _, d in got), [b"\x00", b"\x01"])
        sockets[0].close()
        released = sockets[1].release()
        self.addCleanup(released.close)
        self.assertEqual(_birthday_readers(), [])
        self.assertEqual(released.getsockname()[0], "0.0.0.0")
        self.assertEqual(released.gettimeout(), 0.0)  # still non-blocking, ready to adopt

    async def test_punch_over_loopback(self) -> None:
        """Two punches on real sockets agree on each other's address; keepalives run until stopped."""
        punches: dict[str, HolePunch] = {}
        keepalive: Deferred[None] = Deferred()

        def at_b(datagram: bytes, address: Address) -> None:
            if datagram[0] == Kind.KEEPALIVE and not keepalive.called:
                keepalive.callback(None)
            punches["b"].datagramReceived(datagram, address)

        a = self.owned_socket(lambda datagram, address: punches["a"].datagramReceived(datagram, address))
        b = self.owned_socket(at_b)
        key = os.urandom(KEY_SIZE)
        for name, sock, other, initiator in (("a", a, b, True), ("b", b, a, False)):
            punches[name] = HolePunch(
                reactor,
                sock,
                key,
                initiator=initiator,
                local_nat=OPEN,
                peer_nat=OPEN,
                candidates=[Candidate(HOST, *other.getsockname())],
                timeout=5.0,
                keepalive=0.05,
            )
        results = await gatherResults([punches["a"].start(), punches["b"].start()])
        self.assertEqual([r.peer for r in results], [b.getsockname(), a.getsockname()])
        self.assertEqual([r.socket for r in results], [a, b])
        await keepalive  # from a, on the punched path, within the test's timeout
        for punch in punches.values():
            punch.stop()

    async def test_birthday_over_loopback(self) -> None:
        """
        A symmetric side opens its sockets on the reactor; one wins (its
        given socket's datagrams are lost here, as a symmetric NAT's mapping
        toward the STUN server is useless to the peer), is handed over still
        open, and the rest are closed.
        """
        punches: dict[str, HolePunch] = {}
        a = self.owned_socket(lambda datagram, address: punches["a"].datagramReceived(datagram, address))
        b = self.owned_socket(lambda datagram, address: punches["b"].datagramReceived(datagram, address))

        class Lost:
            def sendto(self, datagram: bytes, address: Address) -> int:
                return len(datagram)

        key = os.urandom(KEY_SIZE)
        punches["a"] = HolePunch(
            reactor,
            Lost(),
            key,
            initiator=True,
            local_nat=SYMMETRIC,
            peer_nat=OPEN,
            candidates=[Candidate(MAPPED, *b.getsockname())],
            birthday_sockets=16,
            keepalive=None,
        )
        punches["b"] = HolePunch(
            reactor,
            b,
            key,
            initiator=False,
            local_nat=OPEN,
            peer_nat=SYMMETRIC,
            candidates=[Candidate(HOST, *a.getsockname())],
            spray_limit=0,  # no spray at this machine's other loopback ports
            keepalive=None,
        )
        won, seen = await gatherResults([punches["a"].start(), punches["b"].start()])
        self.addCleanup(won.socket.close)
        self.assertEqual(punches["a"].stats.sockets_opened, 16)
        self.assertTrue(won.new_socket)
        self.assertIsInstance(won.socket, socket.socket)
        self.assertEqual(won.socket.gettimeout(), 0.0)  # non-blocking, ready to adopt
        self.assertEqual(seen.peer, ("127.0.0.1", won.socket.getsockname()[1]))
        self.assertEqual(_birthday_readers(), [])  # the winner handed over, the other 15 closed
        for punch in punches.values():
            punch.stop()


def _birthday_readers() -> list:
    """The birthday sockets the reactor still reads."""
    return [reader for reader in reactor.getReaders() if getattr(reader, "logPrefix", lambda: "")() == "HolePunch"]
