"""
Bad input at the session level of the direct upgrade (L{pluresync.direct.upgrade}),
on 127.0.0.1 with real sockets: what a session does when a stranger sends
probes and QUIC packets at its UDP socket, replays the peer's own probes,
when the peer vanishes in the middle of the punch, and when the peer's
candidate list names addresses that are not its own.

tests/test_punch.py and tests/test_quic_pipe.py prove each piece alone
(probes under another key are ignored, a replayed probe is dropped, a
stranger's QUIC packets are ignored by the pipe); here the whole attempt
runs under the session, and the question is the session's: does it stay
where it should (the relay, or the genuine direct path), does every byte
arrive once, does nothing answer the stranger, and does the failure say
why.
"""

from __future__ import annotations

import os
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from pluresync.direct import upgrade as upgrade_module
from pluresync.direct.probes import is_probe
from pluresync.direct.signal import Candidate, CandidateKind

from .test_direct_upgrade import FAST, PATH_NAME, MiB, Pair, until


class Stranger(DatagramProtocol):
    """A UDP socket on 127.0.0.1 that records what reaches it and can send anything anywhere."""

    def __init__(self, reflect: bool = False) -> None:
        self.heard: list[tuple[bytes, tuple]] = []
        self.reflect = reflect

    def datagramReceived(self, data: bytes, addr) -> None:
        self.heard.append((data, addr))
        if self.reflect and len(self.heard) < 1000:
            self.transport.write(data, addr)  # bounce a probe back at its sender

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.transport.getHost().port)


def stranger(test: TestCase, reflect: bool = False) -> Stranger:
    protocol = Stranger(reflect)
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return protocol


def junk() -> list[bytes]:
    """What a stranger throws: probe-shaped bytes of every kind, QUIC long and short headers, STUN-looking noise."""
    datagrams = [bytes([kind]) + os.urandom(33) for kind in (0x80, 0x81, 0x82, 0x83)]
    datagrams.append(b"\xc3\x00\x00\x00\x01" + os.urandom(1195))  # a QUIC v1 Initial's first bytes
    datagrams.append(b"\x43" + os.urandom(60))  # a QUIC short header
    datagrams.append(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12))  # a STUN request
    return datagrams


def attempt_ports(pair: Pair) -> list[tuple[str, int]]:
    """The UDP ports the two sides' current attempts read."""
    found = []
    for upgrade in pair.upgrades:
        attempt = upgrade._current
        if attempt is not None and attempt.port is not None:
            found.append(("127.0.0.1", attempt.port.getHost().port))
    for upgrade in pair.upgrades:
        for attempt in upgrade._live:
            if attempt.port is not None:
                found.append(("127.0.0.1", attempt.port.getHost().port))
    return found


class StrangerTests(TestCase):
    timeout = 60

    async def test_strangers_and_replays_change_nothing(self):
        """
        A stranger throws junk, probe- and QUIC-shaped, at both sides'
        sockets during the punch, and after the move replays the peer's own
        probes at them: the session moves to the genuine direct path once,
        stays there, 16 MiB arrive intact on one connection, and the
        stranger never hears a byte back.
        """
        probes: list[bytes] = []
        original = upgrade_module._Attempt.datagram

        def recording(attempt, data, addr):
            if is_probe(data) and len(probes) < 100:
                probes.append(data)
            return original(attempt, data, addr)

        self.patch(upgrade_module._Attempt, "datagram", recording)
        mallory = stranger(self)
        pair = Pair(self, 16 * MiB, replace(FAST, first=0.2))
        await pair.start()
        await until(lambda: len(attempt_ports(pair)) == 2)
        for _ in range(20):
            for target in attempt_ports(pair):
                for datagram in junk():
                    mallory.transport.write(datagram, target)
        await until(lambda: pair.client.path == PATH_NAME and pair.server.path == PATH_NAME)
        swaps = pair.client.swaps
        self.assertTrue(probes, "the genuine probes were recorded")
        for target in attempt_ports(pair):
            for datagram in probes + junk():
                mallory.transport.write(datagram, target)
        pair.source.start()
        self.assertEqual(await pair.sink.done, 16 * MiB)
        self.assertEqual(pair.sink.digest.hexdigest(), pair.source.digest.hexdigest())
        self.assertEqual(pair.sink.made, 1)
        self.assertEqual((pair.client.path, pair.server.path), (PATH_NAME, PATH_NAME))
        self.assertEqual(pair.client.swaps, swaps)
        self.assertEqual(mallory.heard, [])


class VanishingPeerTests(TestCase):
    timeout = 60

    async def test_a_peer_that_vanishes_mid_punch(self):
        """
        The peer answers the offer, then its UDP socket goes away in the
        middle of the punch: our attempt ends at the punch's limit with a
        reason, the session stays on the relay and carries its bytes, a
        retry is scheduled, and both sides let go of their sockets.
        """
        params = replace(FAST, punch=1.0, timeout=3.0, retry=30.0)
        pair = Pair(self, MiB, params)
        await pair.start()
        server_upgrade, client_upgrade = pair.upgrades[1], pair.upgrades[0]

        async def vanish(attempt, peer, *, initiator, connect):
            await attempt.port.stopListening()
            attempt.port = None
            await Deferred()  # never heard from again (until cancelled)

        server_upgrade._punchAndConnect = vanish
        await until(lambda: client_upgrade.failures == 1)
        self.assertIn("no answer from the peer", client_upgrade.last_error)
        self.assertEqual(pair.client.path, "relay:test")
        self.assertTrue(client_upgrade._call is not None and client_upgrade._call.active())
        pair.source.start()
        self.assertEqual(await pair.sink.done, MiB)
        self.assertEqual(pair.sink.digest.hexdigest(), pair.source.digest.hexdigest())
        await until(lambda: client_upgrade._current is None and server_upgrade._current is None)


class LyingCandidateTests(TestCase):
    timeout = 60

    def lie(self, addresses: list[tuple[str, int]]) -> None:
        """Every responder's answer names C{addresses} instead of its own."""
        prepare = upgrade_module.DirectUpgrade._prepare

        async def lying(upgrade, number):
            attempt = await prepare(upgrade, number)
            if not upgrade._session.initiator:
                lies = tuple(Candidate(CandidateKind.HOST, host, port) for host, port in addresses)
                attempt.offer = replace(attempt.offer, candidates=lies)
            return attempt

        self.patch(upgrade_module.DirectUpgrade, "_prepare", lying)

    async def test_candidates_that_are_not_the_peers(self):
        """
        The peer's answer names a stranger's socket (which bounces every
        probe back) and a loopback port nobody holds, but the peer itself
        punches from its real socket: the stranger gets a few small probes
        and nothing else, and the path the session takes is the peer's own
        (proven by the punch key, then the pinned QUIC certificates), never
        one the lie named.
        """
        mallory = stranger(self, reflect=True)
        pair = Pair(self, MiB, replace(FAST, punch=1.0, timeout=3.0, retry=30.0))
        self.lie([mallory.address, ("127.0.0.2", 9)])
        await pair.start()
        server_upgrade, client_upgrade = pair.upgrades[1], pair.upgrades[0]
        await until(lambda: pair.client.path == PATH_NAME)
        real = {("127.0.0.1", a.port.getHost().port) for a in server_upgrade._live}
        real |= {("127.0.0.1", p.getHost().port) for a in server_upgrade._live for p in a.extra_ports}
        self.assertIn(client_upgrade._live[0].pipe.peer, real)
        pair.source.start()
        self.assertEqual(await pair.sink.done, MiB)
        self.assertEqual(pair.sink.digest.hexdigest(), pair.source.digest.hexdigest())
        self.assertProbesOnly(mallory)

    async def test_lies_from_a_silent_peer(self):
        """
        The answer names only the stranger and a dead port, and the peer
        never probes: nothing can prove itself, the attempt fails with a
        reason, the session stays on the relay with every byte.
        """
        mallory = stranger(self, reflect=True)
        pair = Pair(self, MiB, replace(FAST, punch=1.0, timeout=3.0, retry=30.0))
        self.lie([mallory.address, ("127.0.0.2", 9)])
        await pair.start()
        server_upgrade, client_upgrade = pair.upgrades[1], pair.upgrades[0]

        async def silent(attempt, peer, *, initiator, connect):
            await Deferred()  # reads its socket, never sends (until cancelled)

        server_upgrade._punchAndConnect = silent
        await until(lambda: client_upgrade.failures >= 1)
        self.assertEqual(pair.client.path, "relay:test")
        self.assertEqual(client_upgrade.successes, 0)
        self.assertIn("no answer from the peer", client_upgrade.last_error)
        pair.source.start()
        self.assertEqual(await pair.sink.done, MiB)
        self.assertEqual(pair.sink.digest.hexdigest(), pair.source.digest.hexdigest())
        self.assertProbesOnly(mallory)

    def assertProbesOnly(self, mallory: Stranger) -> None:
        """The stranger a lie pointed at got some probes (34 bytes each), a bounded number, nothing else."""
        self.assertTrue(mallory.heard, "the probes went where the lie said")
        self.assertTrue(all(is_probe(data) and len(data) == 34 for data, _ in mallory.heard), mallory.heard[:3])
        self.assertLess(len(mallory.heard), 100)
