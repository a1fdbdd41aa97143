"""
The direct path proven in the NAT lab (tests/natlab.py), with real
processes: a real relay (C{twist pluresync-relay}, with C{--udp-port} for
STUN) in the lab's internet, two C{auto:} peers behind the lab's NATs
(tests/upgradepeer.py), each case asserting which path carries the bytes
in three ways: the peers' own C{getPeer().transport}, the relay's live
session count (a session that moved to a direct path is retired at the
relay) and the relay's C{bytes_relayed} counter (added when a pair ends:
near zero for a stream the direct path carried).

Cases (issue 10's "Proof"): cone/cone and symmetric/cone move to the
direct path; symmetric/symmetric and UDP blocked on one side stay on the
relay, the latter connecting as fast as a relay-only C{auto:}; one 256 MiB
stream moves relay -> direct -> relay (UDP dropped mid-stream) -> direct.

The lab needs root, C{ip} and C{nft} (tests skip saying so otherwise), and
the C{pluresync[direct]} extra (qh3, zeroconf).  C{PLURESYNC_LAB_MIB}
overrides the 64 MiB of the per-case streams (the 256 MiB stream is four
times that).
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from pluresync.keys import SyncKey

from .natlab import CONE, INTERNET, SYMMETRIC, NatLab

MiB = 1 << 20
#: The bytes of each case's stream.
SIZE = int(os.environ.get("PLURESYNC_LAB_MIB", "64")) * MiB
#: The relay's TCP port and its STUN ports (--udp-port N: N and N+1).
RELAY_PORT, STUN_PORT = 8080, 3478
#: upgrade=: seconds before the first direct attempt and between retries.
UPGRADE = 0.5
#: What a relay pair that carried only signals and handshakes may have forwarded.
SIGNALS_ONLY = 256 * 1024


def _needs_direct() -> None:
    try:
        import qh3  # noqa: F401
        import zeroconf  # noqa: F401
    except ImportError as e:
        raise SkipTest(f"the direct path needs the pluresync[direct] extra: {e}") from None


def endpoint(key: str, *, direct: bool = True, upgrade: float = UPGRADE) -> str:
    """An C{auto:} string for a lab peer: the lab relay only, its STUN ports, direct on or off."""
    relay = f"ws\\://{INTERNET}\\:{RELAY_PORT}"
    if not direct:
        return f"auto:key={key}:relays=azure:azure={relay}:direct=off:timeout=30"
    stun = f"{INTERNET}\\:{STUN_PORT},{INTERNET}\\:{STUN_PORT + 1}"
    return f"auto:key={key}:relays=azure:azure={relay}:stun={stun}:direct=on:upgrade={upgrade:g}:timeout=30"


class Peer:
    """A lab process speaking JSON lines: the events it printed, and waits for one."""

    def __init__(self, process) -> None:
        self.process = process
        self.events: list[dict] = []
        self.pending: list[dict] = []

    async def event(self, kind: str, match=lambda e: True, limit: int = 10000) -> dict:
        """
        The first event of C{kind} that C{match}es and was not taken yet,
        whether it came already or comes later (bounded by the process's
        life).  Taking it drops the earlier untaken events of that kind:
        events are read in order.
        """
        for index, event in enumerate(self.pending):
            if event.get("event") == kind and match(event):
                self.pending = [e for e in self.pending[:index] if e.get("event") != kind] + self.pending[index + 1 :]
                return event
        for _ in range(limit):
            line = await self.process.line()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "error":
                raise AssertionError(f"{self.process.name}: {event}\nstderr: {self.process.err[-3000:]!r}")
            if event.get("event") == kind and match(event):
                self.pending = [e for e in self.pending if e.get("event") != kind]
                return event
            self.pending.append(event)
        raise AssertionError(f"{self.process.name}: no {kind} event in {limit} lines")

    def paths(self) -> list[str]:
        return [e["path"] for e in self.events if e.get("event") == "path"]

    def send(self, line: str) -> None:
        self.process.send(line)


class DirectLab:
    """A NAT lab with a relay (and its STUN ports) in the internet, and peers behind the NATs."""

    def __init__(self, test: TestCase, nat_a: str, nat_b: str) -> None:
        _needs_direct()
        self.test = test
        self.lab = NatLab(test, nat_a=nat_a, nat_b=nat_b)
        self.key = SyncKey.generate().to_text()

    async def start_relay(self, timeout: float = 240.0) -> None:
        args = ["-m", "twisted", "--log-format", "text", "pluresync-relay"]
        args += ["--port", f"tcp:{RELAY_PORT}:interface={INTERNET}", "--udp-port", str(STUN_PORT), "--auth", "open"]
        self.relay = self.lab.spawn(self.test, "inet", args, timeout=timeout)
        watch = ["-m", "tests.upgradepeer", "watch", f"http://{INTERNET}:{RELAY_PORT}"]
        self.watcher = Peer(self.lab.spawn(self.test, "inet", watch, timeout=timeout))
        await self.watcher.event("watching")
        for _ in range(200):  # the relay's cold start: a few seconds at most
            try:
                self.relay_started = await self.counts()
                return
            except AssertionError:
                if self.relay.code is not None:
                    raise AssertionError(f"the relay exited: {(self.relay.out + self.relay.err)[:600]!r}") from None
                await pause(0.1)
        raise AssertionError("the relay never answered /health")

    async def counts(self) -> dict:
        """The relay's live sessions and its bytes_relayed counter (fails while it does not answer)."""
        self.watcher.send("?")
        event = await self.watcher.event("relay")
        if "error" in event:
            raise AssertionError(f"the relay does not answer: {event['error']}")
        return event

    async def until_counts(self, predicate, seconds: float = 20.0) -> dict:
        """Poll the relay's counters (bounded) until C{predicate} holds; fails saying what was last seen."""
        last = None
        for _ in range(int(seconds / 0.1)):
            last = await self.counts()
            if predicate(last):
                return last
            await pause(0.1)
        raise AssertionError(f"the relay's counters never matched: last {last}")

    def peer(self, host: str, role: str, description: str, *extra: str, timeout: float = 180.0) -> Peer:
        args = ["-m", "tests.upgradepeer", role, description, *extra, "--limit", str(int(timeout))]
        return Peer(self.lab.spawn(self.test, host, args, timeout=timeout + 5))

    async def pair(self, size: int, holds: str = "0", direct: bool = True, pings: int = 0, upgrade: float = UPGRADE):
        """A listener on hostb, a connector on hosta holding before byte 0 (and at C{holds})."""
        description = endpoint(self.key, direct=direct, upgrade=upgrade)
        listener = self.peer("hostb", "listen", description, "--bytes", str(size))
        await listener.event("listening")
        connector = self.peer(
            "hosta", "connect", description, "--bytes", str(size), "--holds", holds, "--pings", str(pings)
        )
        connected = await connector.event("connected")
        return listener, connector, connected


async def pause(seconds: float) -> None:
    """A bounded wait between two polls of a condition no event reports."""
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


def is_direct(event: dict) -> bool:
    return str(event.get("path", "")).startswith("direct:udp")


class DirectLabTests(TestCase):
    """Which path carries the bytes, per NAT combination, with real processes."""

    timeout = 240

    async def moved(self, nat_a: str, nat_b: str) -> None:
        """Both peers move to the direct path; the relay forgets the session; 64 MiB arrive intact."""
        lab = DirectLab(self, nat_a, nat_b)
        await lab.start_relay()
        listener, connector, connected = await lab.pair(SIZE)
        self.assertTrue(connected["path"].startswith("relay:"), connected)
        await connector.event("hold")
        # The move: the connector's own path, the listener's, then the relay's count.
        await connector.event("path", is_direct)
        await listener.event("path", is_direct)
        await lab.until_counts(lambda c: c["sessions"] == 0)
        before = await lab.counts()
        connector.send("go")
        await connector.event("sent")
        done = await connector.event("done")
        served = await listener.event("served")
        self.assertTrue(done["ok"], done)
        self.assertEqual(served["bytes"], SIZE)
        self.assertEqual(served["connections"], 1)
        self.assertTrue(is_direct(done) and is_direct(served), (done, served))
        after = await lab.counts()
        # Nothing went through the relay while direct carried the stream:
        # no session there, and its byte counter did not move.
        self.assertEqual(after["sessions"], 0)
        self.assertEqual(after["bytes_relayed"], before["bytes_relayed"])
        self.assertLess(after["bytes_relayed"] - lab.relay_started["bytes_relayed"], SIGNALS_ONLY)
        self.report(nat_a, nat_b, connector, connected, done)

    async def stayed(self, lab: DirectLab, why: str) -> tuple[dict, dict]:
        """The attempt fails (the connector says why), the stream stays on the relay, 64 MiB arrive intact."""
        listener, connector, connected = await lab.pair(SIZE)
        self.assertTrue(connected["path"].startswith("relay:"), connected)
        await connector.event("hold")
        failed = await connector.event("log", lambda e: "no direct path" in e["text"])
        self.assertIn(why, failed["text"], (connector.events, listener.events))
        counts = await lab.counts()
        self.assertEqual(counts["sessions"], 1)
        connector.send("go")
        await connector.event("sent")
        done = await connector.event("done")
        served = await listener.event("served")
        self.assertTrue(done["ok"], done)
        self.assertEqual(served["bytes"], SIZE)
        self.assertEqual(served["connections"], 1)
        self.assertFalse(any(p.startswith("direct:") for p in connector.paths() + listener.paths()), connector.paths())
        await connector.event("closed")
        # The pair ended: the relay counted every byte of the stream.
        await lab.until_counts(lambda c: c["bytes_relayed"] - lab.relay_started["bytes_relayed"] >= SIZE)
        return connected, done

    def report(self, nat_a, nat_b, connector: Peer, connected: dict, done: dict) -> None:
        moves = [e for e in connector.events if e.get("event") == "path"]
        direct_at = next((e["t"] for e in moves if is_direct(e)), None)
        mbs = done["bytes"] / MiB / done["transfer"]
        print(
            f"\n{nat_a}/{nat_b}: connected {connected['seconds']:.2f} s on {connected['path']}, "
            f"direct after {direct_at} s, {mbs:.0f} MiB/s on {moves[-1]['path']}"
        )

    async def test_cone_cone(self):
        """Two cone NATs: the session moves to the punched path."""
        await self.moved(CONE, CONE)

    async def test_symmetric_cone(self):
        """A symmetric NAT against a cone one: the birthday punch finds a path."""
        await self.moved(SYMMETRIC, CONE)

    async def test_symmetric_symmetric(self):
        """Two symmetric NATs: no attempt can work, the stream stays on the relay."""
        lab = DirectLab(self, SYMMETRIC, SYMMETRIC)
        await lab.start_relay()
        connected, done = await self.stayed(lab, "symmetric")
        print(f"\nsymmetric/symmetric: relay, {done['bytes'] / MiB / done['transfer']:.0f} MiB/s")

    async def test_udp_blocked(self):
        """
        UDP dropped on one side (a corporate network): the stream stays on
        the relay, and C{auto:} connects there as fast as the same string
        does with UDP open, measured in the same lab; next to C{direct=off}
        (relay only) the difference is C{auto:}'s head start for its first
        path (the LAN, C{delay=}, 0.5 s), which blocked UDP does not lengthen.
        """
        lab = DirectLab(self, CONE, CONE)
        await lab.start_relay()
        relay_only, udp_open = [], []
        for direct, times in ((False, relay_only), (True, udp_open)):
            for _ in range(3):
                listener, connector, connected = await lab.pair(1, holds="", direct=direct)
                self.assertTrue(connected["path"].startswith("relay:"), connected)
                await connector.event("closed")
                await listener.event("served")
                times.append(connected["seconds"])
        lab.lab.block_udp("nata")
        connected, done = await self.stayed(lab, "UDP")
        self.assertLess(connected["seconds"], max(udp_open) + 0.25)
        self.assertLess(connected["seconds"], max(relay_only) + 0.5 + 0.25)
        print(
            f"\nUDP blocked: connected in {connected['seconds']:.2f} s on {connected['path']}; "
            f"same string, UDP open: {udp_open} s; direct=off: {relay_only} s; "
            f"{done['bytes'] / MiB / done['transfer']:.0f} MiB/s"
        )


class PathMovesTests(TestCase):
    """One 256 MiB stream: relay -> direct -> relay (UDP dropped) -> direct (UDP back)."""

    timeout = 300

    async def test_relay_direct_relay_direct(self):
        lab = DirectLab(self, CONE, CONE)
        await lab.start_relay(timeout=280)
        size = 4 * SIZE
        quarter = SIZE
        listener, connector, connected = await lab.pair(size, holds=f"{quarter},{2 * quarter},{3 * quarter}")
        self.assertTrue(connected["path"].startswith("relay:"), connected)
        # First quarter: on the relay, then direct (the relay's session retired).
        await connector.event("hold")
        await connector.event("path", is_direct)
        await lab.until_counts(lambda c: c["sessions"] == 0)
        # Drop UDP and go on: the direct link stalls, the session comes back over the relay.
        lab.lab.exec("nata", "nft", "add", "table", "inet", "cut")
        lab.lab.exec(
            "nata", "nft", "add chain inet cut forward { type filter hook forward priority -10; policy accept; }"
        )
        lab.lab.exec("nata", "nft", "add", "rule", "inet", "cut", "forward", "meta", "l4proto", "udp", "drop")
        connector.send("go")
        await connector.event("path", lambda e: e["path"].startswith("relay:"))
        await lab.until_counts(lambda c: c["sessions"] == 1)
        await connector.event("hold")
        # UDP back: the next attempt moves it to a direct path again.
        lab.lab.exec("nata", "nft", "delete", "table", "inet", "cut")
        connector.send("go")
        await connector.event("hold")
        await connector.event("path", is_direct)
        await lab.until_counts(lambda c: c["sessions"] == 0)
        connector.send("go")
        done = await connector.event("done")
        served = await listener.event("served")
        self.assertTrue(done["ok"], done)
        self.assertEqual(served["bytes"], size)
        self.assertEqual(served["connections"], 1)
        self.assertTrue(is_direct(done), done)
        paths = [p.split(" ")[0].split(":")[0] for p in connector.paths()]
        collapsed = [p for i, p in enumerate(paths) if i == 0 or paths[i - 1] != p]
        self.assertEqual(collapsed, ["relay", "direct", "relay", "direct"], connector.paths())
        print(f"\n256 MiB stream: {connector.paths()}")
