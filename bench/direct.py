"""
The direct path against the relay path in the NAT lab (issue 10): what
moving a stream off the relay buys, and what it costs.

    sudo /work/venv/bin/python bench/direct.py [--size MiB] [--repeat N] [--runs N] [--json FILE]

Needs root, iproute2 and nftables (tests/natlab.py's lab), C{tc} with the
C{tbf} qdisc, and the C{pluresync[direct]} extra.  Everything runs inside
the lab's namespaces (no packet leaves the machine).

1. Streams, in one cone/cone lab with a real relay (C{twist pluresync-relay
   --udp-port}) in its internet and C{auto:} peers (tests/upgradepeer.py)
   behind the NATs, each C{--size} MiB with its sha256 checked:

   - direct: the session moves to the punched QUIC path before the first
     byte (the connector holds until it did);
   - relay: the same strings with C{direct=off};

   both with the relay's link unshaped, then shaped as a remote relay's
   would be: C{tc tbf rate 200mbit} on the relay host's own interface (the
   lab internet's bridge device: it shapes what the relay sends, not the
   peers' direct datagrams, which the bridge forwards between its ports).
   The kernel here has no C{netem}, so no delay is added: round trips are
   the lab's own (sub-millisecond links), a remote relay's distance is not
   modelled.  Per run: the throughput from the sender's start to the
   receiver's sha256 of every byte coming back, the
   median of 200 round trips of 64 bytes after the stream, and the CPU
   seconds per GiB of the sender (the same span), the receiver (first to
   last byte) and the relay (the same span as the sender's).

2. Time to a direct pipe: from the connector's connection (over the relay)
   to its first byte over C{direct:udp}, with C{upgrade=1} (the default
   first attempt after 1 s), so minus 1 s is the attempt itself (STUN,
   signals, punch, QUIC and the resumed session's handshake).

3. Punch success over the lab's NAT combinations: C{--runs} sessions each,
   which path they settle on and how long the attempt took.

Prints Markdown tables on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, maybeDeferred  # noqa: E402

from tests.natlab import CONE, SYMMETRIC  # noqa: E402
from tests.test_direct_lab import DirectLab, is_direct  # noqa: E402

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Cleanups:
    """Stands in for a test's cleanup list (the lab and its processes register there)."""

    def __init__(self) -> None:
        self.calls = []

    def addCleanup(self, f, *args, **kwargs) -> None:
        self.calls.append((f, args, kwargs))

    async def run(self) -> None:
        while self.calls:
            f, args, kwargs = self.calls.pop()
            try:
                await maybeDeferred(f, *args, **kwargs)
            except Exception as e:  # keep removing the rest
                progress(f"cleanup: {e}")


def cpu_of(pid: int) -> float:
    """A process's user+system CPU seconds (from /proc: the lab shares our pid namespace)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def stream(lab: DirectLab, size: int, direct: bool, pings: int) -> dict:
    relay_pid = lab.relay._transport.pid
    listener, connector, connected = await lab.pair(size, holds="0", direct=direct, pings=pings, upgrade=1.0)
    await connector.event("hold")
    to_direct = None
    if direct:
        moved = await connector.event("path", is_direct)
        to_direct = moved["t"]
        await lab.until_counts(lambda c: c["sessions"] == 0)
    relay_before = cpu_of(relay_pid)
    connector.send("go")
    await connector.event("sent")
    done = await connector.event("done")
    served = await listener.event("served")
    relay_cpu = cpu_of(relay_pid) - relay_before
    await connector.event("closed")
    assert done["ok"] and served["bytes"] == size, (done, served)
    gib = size / (1 << 30)
    return {
        "path": done["path"],
        "connected": connected["seconds"],
        "to_direct": to_direct,
        # from the go to the listener's digest: every byte delivered and checked
        "mib_s": size / MiB / done["transfer"],
        "rtt_ms": done["rtt_ms"],
        "cpu_sender_s_per_gib": done["cpu"] / gib,
        "cpu_receiver_s_per_gib": served["cpu"] / gib,
        "cpu_relay_s_per_gib": relay_cpu / gib,
    }


def shape(lab: DirectLab, rate: str) -> None:
    """A token bucket on the relay host's interface: what the relay sends leaves at C{rate}."""
    tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
    lab.lab.exec("inet", "tc", "qdisc", "replace", "dev", "br0", "root", *tbf)


async def streams(args, results: dict) -> None:
    cleanups = Cleanups()
    try:
        lab = DirectLab(cleanups, CONE, CONE)
        await lab.start_relay(timeout=3600)
        for rate in (None, "200mbit"):
            if rate is not None:
                shape(lab, rate)
            for direct in (True, False):
                for run in range(args.repeat):
                    progress(
                        f"stream: {'direct' if direct else 'relay'}, relay link {rate or 'unshaped'}, run {run + 1}"
                    )
                    row = await stream(lab, args.size * MiB, direct, args.pings)
                    row.update(shaping=rate or "none", run=run + 1)
                    results["streams"].append(row)
    finally:
        await cleanups.run()


async def punches(args, results: dict) -> None:
    combos = [(CONE, CONE), (SYMMETRIC, CONE), (CONE, SYMMETRIC), (SYMMETRIC, SYMMETRIC)]
    for nat_a, nat_b in combos:
        cleanups = Cleanups()
        try:
            lab = DirectLab(cleanups, nat_a, nat_b)
            await lab.start_relay(timeout=3600)
            for run in range(args.runs):
                progress(f"punch: {nat_a}/{nat_b} run {run + 1}")
                listener, connector, connected = await lab.pair(MiB, holds="0", upgrade=1.0)
                began = time.monotonic()
                outcome = await first_of(connector)
                seconds = time.monotonic() - began
                connector.send("go")
                done = await connector.event("done")
                await listener.event("served")
                await connector.event("closed")
                results["punch"].append(
                    {
                        "nats": f"{nat_a}/{nat_b}",
                        "run": run + 1,
                        "direct": outcome.get("event") == "path",
                        "why": outcome.get("text"),
                        # a move's own time since connected; a failure's: when its line came
                        "seconds": outcome["t"] if outcome.get("event") == "path" else seconds,
                        "ok": done["ok"],
                    }
                )
        finally:
            await cleanups.run()


async def first_of(connector) -> dict:
    """The connector's move to direct, or its log line saying there is none (whichever comes first)."""
    for _ in range(10000):
        line = await connector.process.line()
        try:
            event = json.loads(line)
        except ValueError:
            continue
        connector.events.append(event)
        if event.get("event") == "path" and is_direct(event):
            return event
        if event.get("event") == "log" and "no direct path" in event["text"]:
            return event
        connector.pending.append(event)
    raise AssertionError("neither a move nor a failure")


def report(results: dict, args) -> None:
    print(f"### Streams ({args.size} MiB, median of {args.repeat}; cone/cone lab)\n")
    print("| relay link | path | MiB/s | round trip (ms) | CPU s/GiB sender | receiver | relay | runs (MiB/s) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for shaping in ("none", "200mbit"):
        for path in ("direct:udp", "relay:azure"):
            rows = [r for r in results["streams"] if r["shaping"] == shaping and r["path"].startswith(path)]
            if not rows:
                continue

            def med(key, rows=rows):
                return statistics.median(r[key] for r in rows)

            label = "unshaped" if shaping == "none" else "tbf 200 Mbit"
            print(
                f"| {label} | {path} | {med('mib_s'):.1f} | {med('rtt_ms'):.2f} | {med('cpu_sender_s_per_gib'):.1f}"
                f" | {med('cpu_receiver_s_per_gib'):.1f} | {med('cpu_relay_s_per_gib'):.1f}"
                f" | {', '.join(format(r['mib_s'], '.1f') for r in rows)} |"
            )
    moves = [r["to_direct"] for r in results["streams"] if r["to_direct"] is not None]
    if moves:
        print(
            f"\nTime from the connection (over the relay) to the first byte over direct:udp, with upgrade=1: "
            f"median {statistics.median(moves):.2f} s (min {min(moves):.2f}, max {max(moves):.2f}; n={len(moves)})\n"
        )
    print("### Punch success (lab NAT combinations)\n")
    print("| NAT A / NAT B | direct | settled after (s, from connected) | reason when not |")
    print("|---|---|---|---|")
    for nats in dict.fromkeys(r["nats"] for r in results["punch"]):
        rows = [r for r in results["punch"] if r["nats"] == nats]
        wins = sum(r["direct"] for r in rows)
        times = ", ".join(f"{r['seconds']:.2f}" for r in rows)
        why = next((r["why"].split("(", 1)[-1].split(")")[0] for r in rows if not r["direct"]), "")
        print(f"| {nats} | {wins}/{len(rows)} | {times} | {why} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="MiB per stream")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each stream")
    parser.add_argument("--runs", type=int, default=3, help="sessions per NAT combination")
    parser.add_argument("--pings", type=int, default=200, help="round trips after each stream")
    parser.add_argument("--only", choices=("streams", "punch"))
    parser.add_argument("--json")
    args = parser.parse_args()
    if shutil.which("tc") is None:
        sys.exit("bench/direct.py needs tc (iproute2) for the shaped runs")
    results = {"streams": [], "punch": []}

    async def run(reactor):
        if args.only in (None, "streams"):
            await streams(args, results)
        if args.only in (None, "punch"):
            await punches(args, results)
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
