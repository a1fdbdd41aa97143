"""
Where a pluresync (or transit) stream spends its CPU: one throughput
transfer with the relay, the sender and the receiver each under cProfile,
then the top functions of each process by own time.

    /work/venv/bin/python bench/profile_stream.py [--path pluresync|transit] [--size MiB] [--top N]
                                                  [--latency [--count N]] [--cpu-clock] [--keep DIR]

--latency profiles the 64-byte ping-pong of bench/latency.py instead
(--count round trips after 200 warm-up): the pinger is the "sender", the
echoer the "receiver".

--cpu-clock profiles with each process's CPU clock (time.process_time)
instead of the wall clock: on a busy machine a process descheduled in the
middle of a call (a socket send, say) is then not charged for the wait.

--keep DIR copies the three cProfile files (relay.prof, sender.prof,
receiver.prof) to DIR, for pstats or a before/after comparison
(PLURESYNC_REPO chooses the code, as for bench/run.py).

cProfile slows every process down (roughly 1.5-2x), so the MB/s printed here
is not a benchmark number; the shares of time are what it is for.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402
from paths import Relays, run_pair  # noqa: E402
from relays import pluresync_relay, raise_nofile, transit_relay  # noqa: E402
from run import keygen  # noqa: E402


def top(path: Path, n: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(n)
    text = out.getvalue()
    return text[text.find("   ncalls") :] if "   ncalls" in text else text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", choices=["pluresync", "transit"], default="pluresync")
    p.add_argument("--size", type=int, default=128, help="MiB (default 128)")
    p.add_argument("--chunk", type=int, default=64 << 10)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--latency", action="store_true", help="profile the 64-byte ping-pong instead")
    p.add_argument("--count", type=int, default=20000, help="round trips with --latency (default 20000)")
    p.add_argument("--cpu-clock", action="store_true", help="profile CPU time, not wall time")
    p.add_argument("--keep", type=Path, metavar="DIR", help="copy the three .prof files to DIR")
    args = p.parse_args()
    if args.cpu_clock:
        os.environ["PLURESYNC_PROFILE_CLOCK"] = "cpu"  # the relay's and the peers' environment come from ours
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="pluresync-profile-") as tmp:
        scratch = Path(tmp)
        relay_prof = scratch / "relay.prof"
        transit = plure = None
        try:
            if args.path == "transit":
                transit = transit_relay(scratch, profile=relay_prof)
            else:
                plure = pluresync_relay(scratch, profile=relay_prof)
            relays = Relays(scratch, transit, plure, keygen(scratch))
            if args.latency:
                _, pinged, relay_cpu = run_pair(
                    args.path,
                    relays,
                    "echo",
                    "ping",
                    ["--count", str(args.count), "--warmup", "200", "--msg", "64"],
                    120.0,
                    profile_prefix=str(scratch / "peer"),
                )
                rtts = [ns / 1000 for ns in pinged["rtts_ns"]]
                summary = (
                    f"median round trip {statistics.median(rtts):.0f} us under cProfile; relay CPU "
                    f"{relay_cpu / len(rtts) * 1e6:.1f} us per round trip"
                )
                roles = ("ping", "echo")
            else:
                result = throughput.measure(
                    args.path, relays, args.size << 20, args.chunk, profile_prefix=str(scratch / "peer")
                )
                summary = f"{result['mb_s']:.1f} MB/s under cProfile; CPU s/GB {result['cpu_s_per_gb']}"
                roles = ("send", "recv")
        finally:
            for relay in (plure, transit):
                if relay is not None:
                    relay.stop()
        print(f"{args.path}: {summary}\n")
        for name, prof in (
            ("relay", relay_prof),
            ("sender", scratch / f"peer-{roles[0]}.prof"),
            ("receiver", scratch / f"peer-{roles[1]}.prof"),
        ):
            print(f"## {name}\n")
            print(top(prof, args.top) if prof.exists() else "(no profile written)\n")
            if args.keep and prof.exists():
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(prof, args.keep / f"{name}.prof")


if __name__ == "__main__":
    main()
