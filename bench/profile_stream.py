"""
Where a pluresync (or transit) stream spends its CPU: one throughput
transfer with the relay, the sender and the receiver each under cProfile,
then the top functions of each process by own time.

    /work/venv/bin/python bench/profile_stream.py [--path pluresync|transit] [--size MiB] [--top N]

cProfile slows every process down (roughly 1.5-2x), so the MB/s printed here
is not a benchmark number; the shares of time are what it is for.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402
from paths import Relays  # noqa: E402
from relays import pluresync_relay, raise_nofile, transit_relay  # noqa: E402
from run import keygen  # noqa: E402


def top(path: Path, n: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(n)
    text = out.getvalue()
    return text[text.find("   ncalls"):] if "   ncalls" in text else text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", choices=["pluresync", "transit"], default="pluresync")
    p.add_argument("--size", type=int, default=128, help="MiB (default 128)")
    p.add_argument("--chunk", type=int, default=64 << 10)
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
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
            result = throughput.measure(args.path, relays, args.size << 20, args.chunk,
                                        profile_prefix=str(scratch / "peer"))
        finally:
            for relay in (plure, transit):
                if relay is not None:
                    relay.stop()
        print(f"{args.path}: {result['mb_s']:.1f} MB/s under cProfile; CPU s/GB {result['cpu_s_per_gb']}\n")
        for name, prof in (("relay", relay_prof), ("sender", scratch / "peer-send.prof"),
                           ("receiver", scratch / "peer-recv.prof")):
            print(f"## {name}\n")
            print(top(prof, args.top) if prof.exists() else "(no profile written)\n")


if __name__ == "__main__":
    main()
