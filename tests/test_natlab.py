"""
Hole punching through real NATs: two peer processes (tests/punchpeer.py)
in the namespaces of a NAT lab (tests/natlab.py), one case per NAT
combination, each with its expected outcome; and the lab itself.

The test carries the signaling (each peer's candidates and NAT class, and
the punch key) between the two processes on their stdin and stdout, as the
relay will.  These tests need root, ip and nft, and skip without them.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from .natlab import CONE, INTERNET, SYMMETRIC, NatLab, unavailable

MIB = 4


@dataclass
class Outcome:
    """What one peer printed: its NAT class and candidates, its punch result, its transfer."""

    nat: str
    candidates: list
    result: dict[str, Any]
    transfer: dict[str, Any] | None


_log = Logger()


def _summary(outcome: Outcome) -> str:
    result = outcome.result
    text = (
        f"{outcome.nat} {result['result']} {result.get('strategy') or result.get('reason')} {result['seconds']:.3f} s"
    )
    if outcome.transfer:
        rate = outcome.transfer["bytes"] / 2**20 / max(outcome.transfer["seconds"], 1e-6)
        text += f", {outcome.transfer['bytes'] // 2**20} MiB at {rate:.0f} MiB/s"
    return text


class PunchLabTests(TestCase):
    """Each NAT combination of the issue, with real processes behind real nftables NATs."""

    timeout = 90

    async def punch(
        self,
        lab: NatLab,
        initiator: str = "hosta",
        responder: str = "hostb",
        *,
        block_after_classifying: str | None = None,
        timeout: float = 10.0,
        mib: int = MIB,
    ) -> tuple[Outcome, Outcome]:
        """Run the two peers, carry their signaling, and collect what they report."""
        stun = lab.stun_server(self)
        self.assertEqual(await stun.line(), "ready")
        args = ["-m", "tests.punchpeer", "--stun", INTERNET]
        peers = [lab.spawn(self, host, args, timeout=60) for host in (initiator, responder)]
        said = [json.loads(await peer.line()) for peer in peers]
        if block_after_classifying:
            lab.block_udp(block_after_classifying)
        key = os.urandom(32).hex()
        for peer, initiating, other in ((peers[0], True, said[1]), (peers[1], False, said[0])):
            told = {"initiator": initiating, "key": key, "peer_nat": other["nat"], "candidates": other["candidates"]}
            peer.send(json.dumps({**told, "timeout": timeout, "lan_timeout": 1.0, "mib": mib}))
        outcomes = []
        for peer, first in zip(peers, said, strict=True):
            result = json.loads(await peer.line())
            transfer = json.loads(await peer.line())["transfer"] if result["result"] == "direct" and mib else None
            self.assertEqual(await peer.ended, 0, peer.err.decode()[-3000:])
            outcomes.append(Outcome(first["nat"], first["candidates"], result, transfer))
        # Punch times and transfer rates end up in _trial_temp/test.log.
        _log.info(
            "{test}: {a} / {b}",
            test=self.id().rsplit(".", 1)[-1],
            a=_summary(outcomes[0]),
            b=_summary(outcomes[1]),
        )
        return outcomes[0], outcomes[1]

    def assertDirect(self, a: Outcome, b: Outcome, strategy: str, within: float) -> None:
        """Both punched, with the strategy expected, in time; and the path carried the bytes, intact."""
        for outcome in (a, b):
            self.assertEqual(outcome.result["result"], "direct", outcome.result)
            self.assertLess(outcome.result["seconds"], within, outcome.result)
        self.assertEqual(a.result["strategy"], strategy)
        for outcome in (a, b):
            self.assertIsNone(outcome.transfer["error"], outcome.transfer)
            self.assertEqual(outcome.transfer["bytes"], MIB * 2**20)
        self.assertEqual(a.transfer["sha256"], b.transfer["sha256"])

    def assertFailed(self, outcome: Outcome, reason: str, within: float) -> None:
        self.assertEqual(outcome.result["result"], "failed", outcome.result)
        self.assertEqual(outcome.result["reason"], reason, outcome.result)
        self.assertLess(outcome.result["seconds"], within, outcome.result)
        self.assertIn("relay keeps carrying", outcome.result["message"])

    async def test_cone_cone(self) -> None:
        """cone/cone: punched at once on the NATs' mappings."""
        a, b = await self.punch(NatLab(self, CONE, CONE))
        self.assertEqual((a.nat, b.nat), (CONE, CONE))
        self.assertDirect(a, b, "simultaneous", within=1.0)
        self.assertEqual(a.result["peer"][0], "172.16.0.2")
        self.assertEqual(b.result["peer"][0], "172.16.0.1")
        self.assertEqual(a.result["peer"], b.candidates[1][1:])  # b's mapped address, as STUN saw it

    async def test_symmetric_initiator_cone_responder(self) -> None:
        """symmetric/cone: the symmetric side's birthday sockets meet the cone side's spray."""
        a, b = await self.punch(NatLab(self, SYMMETRIC, CONE))
        self.assertEqual((a.nat, b.nat), (SYMMETRIC, CONE))
        self.assertDirect(a, b, "birthday", within=5.0)
        self.assertEqual(b.result["strategy"], "spray")
        self.assertTrue(a.result["new_socket"])
        self.assertEqual(b.result["peer"][0], "172.16.0.1")

    async def test_cone_initiator_symmetric_responder(self) -> None:
        """The same NATs, the roles swapped: the initiator sprays."""
        a, b = await self.punch(NatLab(self, CONE, SYMMETRIC))
        self.assertEqual((a.nat, b.nat), (CONE, SYMMETRIC))
        self.assertDirect(a, b, "spray", within=5.0)
        self.assertTrue(b.result["new_socket"])

    async def test_symmetric_symmetric(self) -> None:
        """symmetric/symmetric: only the (unreachable) LAN addresses are tried, then it gives up, quickly."""
        a, b = await self.punch(NatLab(self, SYMMETRIC, SYMMETRIC))
        self.assertEqual((a.nat, b.nat), (SYMMETRIC, SYMMETRIC))
        for outcome in (a, b):
            self.assertFailed(outcome, "both-symmetric", within=1.5)
            self.assertIn("both peers are behind symmetric NATs", outcome.result["message"])

    async def test_udp_blocked(self) -> None:
        """UDP blocked behind NAT B: its lookup fails, it says so, and both give up within the LAN bound."""
        lab = NatLab(self, CONE, CONE)
        lab.block_udp("natb")
        a, b = await self.punch(lab)
        self.assertEqual((a.nat, b.nat), (CONE, "blocked"))
        self.assertFailed(a, "udp-blocked", within=1.5)
        self.assertFailed(b, "udp-blocked", within=1.5)
        self.assertIn("the peer's network", a.result["message"])

    async def test_udp_blocked_after_classifying(self) -> None:
        """UDP dropped once both looked cone: no answer, and both give up at their timeout."""
        a, b = await self.punch(NatLab(self, CONE, CONE), block_after_classifying="natb", timeout=3.0)
        self.assertEqual((a.nat, b.nat), (CONE, CONE))
        for outcome in (a, b):
            self.assertFailed(outcome, "no-answer", within=3.5)
            self.assertGreaterEqual(outcome.result["seconds"], 3.0)

    async def test_same_lan_behind_one_symmetric_nat(self) -> None:
        """Two hosts on one LAN behind one symmetric NAT: punched on their host addresses."""
        a, b = await self.punch(NatLab(self, SYMMETRIC, CONE), "hosta", "hostc")
        self.assertEqual((a.nat, b.nat), (SYMMETRIC, SYMMETRIC))
        self.assertDirect(a, b, "lan", within=1.0)
        self.assertEqual(a.result["peer"][0], "192.168.1.3")
        self.assertEqual(b.result["peer"][0], "192.168.1.2")

    async def test_same_lan_behind_one_cone_nat(self) -> None:
        """The same behind a cone NAT (which does not hairpin): the host addresses answer."""
        a, b = await self.punch(NatLab(self, CONE, CONE), "hosta", "hostc")
        self.assertDirect(a, b, "simultaneous", within=1.0)
        self.assertEqual(a.result["peer"][0], "192.168.1.3")


class LabTests(TestCase):
    """The lab fixture: what it builds, and that nothing of it outlives the test."""

    timeout = 60

    def namespaces(self) -> set[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return {line.split()[0] for line in listed.splitlines() if line.strip()}

    async def test_removed_with_what_runs_inside(self) -> None:
        """Cleanup kills the lab's processes by pid, spawned or stray, and deletes every namespace."""
        cleanups = _Cleanups()
        lab = NatLab(cleanups, CONE, SYMMETRIC)
        self.addCleanup(cleanups.run)  # in case an assertion below fails
        self.assertLessEqual(set(lab.namespaces), self.namespaces())
        sleeper = lab.spawn(cleanups, "hosta", ["-c", "import time; print('up', flush=True); time.sleep(60)"])
        self.assertEqual(await sleeper.line(), "up")
        stray = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("hostb"), "sh", "-c", "echo in; exec sleep 60"], stdout=subprocess.PIPE
        )
        self.addCleanup(stray.stdout.close)
        self.addCleanup(stray.kill)
        ready, _, _ = select.select([stray.stdout], [], [], 10)  # it is inside the namespace once it prints
        self.assertEqual(stray.stdout.readline() if ready else b"", b"in\n")
        await cleanups.run()
        self.assertEqual(sleeper.code, -15)  # TERM, from its own cleanup
        self.assertEqual(stray.wait(timeout=10), -9)  # KILL, by pid, from the lab's
        self.assertEqual(set(lab.namespaces) & self.namespaces(), set())

    async def test_time_bound(self) -> None:
        """A process that outlives its bound is killed, and says so when a line is awaited."""
        lab = NatLab(self)
        slow = lab.spawn(self, "hostb", ["-c", "import time; time.sleep(60)"], timeout=0.5)
        with self.assertRaisesRegex(AssertionError, "time bound ran out"):
            await slow.line()
        self.assertEqual(await slow.ended, -9)

    async def test_nat_kinds(self) -> None:
        """pluresync's STUN server and NAT classification see each lab NAT as what it is."""
        lab = NatLab(self, CONE, SYMMETRIC)
        stun = lab.stun_server(self)
        self.assertEqual(await stun.line(), "ready")
        seen = {}
        for host in ("hosta", "hostb"):
            peer = lab.spawn(self, host, ["-m", "tests.natlab", "nat", "--stun", INTERNET], timeout=15)
            seen[host] = json.loads(await peer.line())
            self.assertEqual(await peer.ended, 0, peer.err.decode())
        self.assertEqual(seen["hosta"]["nat"], CONE, seen["hosta"])
        self.assertEqual(seen["hostb"]["nat"], SYMMETRIC, seen["hostb"])
        self.assertTrue(all(m.startswith("172.16.0.1:") for m in seen["hosta"]["mapped"]))

    def test_sweep(self) -> None:
        """A lab whose creator died before its cleanup is removed by the next lab built."""
        child = subprocess.Popen(["true"])
        child.wait(timeout=10)  # gone: its lab is an orphan
        orphan = f"nl{child.pid}-0a0b-hosta"
        subprocess.run(["ip", "netns", "add", orphan], check=True, timeout=10)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", orphan], capture_output=True, timeout=10)
        NatLab(self)
        self.assertNotIn(orphan, self.namespaces())

    def test_parallel_labs(self) -> None:
        """Two labs at once (as trial -j2 builds them) do not collide."""
        first, second = NatLab(self), NatLab(self)
        self.assertNotEqual(first.prefix, second.prefix)
        self.assertLessEqual(set(first.namespaces) | set(second.namespaces), self.namespaces())


class SkipReasonTests(SynchronousTestCase):
    """Without root, ip or nft, the lab tests skip and say why."""

    def test_reasons(self) -> None:
        self.assertIn("needs root", unavailable(euid=1000))
        self.assertIn(
            "apt-get install nftables", unavailable(euid=0, which=lambda tool: None if tool == "nft" else "/x")
        )
        self.assertIn("apt-get install iproute2", unavailable(euid=0, which=lambda tool: None))
        self.assertIsNone(unavailable(euid=0, which=lambda tool: f"/usr/sbin/{tool}"))

    def test_lab_skips(self) -> None:
        """Building a lab as another user skips the test, with the reason, and builds nothing."""
        cleanups = _Cleanups()
        self.patch(os, "geteuid", lambda: 1000)
        with self.assertRaisesRegex(SkipTest, "needs root"):
            NatLab(cleanups)
        self.assertEqual(cleanups.calls, [])


class _Cleanups:
    """A stand-in test whose cleanups run when the test says (to check what they leave)."""

    def __init__(self) -> None:
        self.calls: list = []

    def addCleanup(self, function, *args) -> None:
        self.calls.append((function, args))

    async def run(self) -> None:
        while self.calls:
            function, args = self.calls.pop()
            result = function(*args)
            if hasattr(result, "addCallback"):
                await result
