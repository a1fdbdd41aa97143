"""
How many idle pairs one relay process holds with a new pair still at full
speed (issue 11): a fresh `twist pluresync-relay`, a stream through it with
no idle pairs (the reference), then idle paired sessions added in steps
(`idle_clients.py` processes, each bound to its own 127.x address so that
40,000 client sockets stay clear of the ephemeral port range), and after
each step the same stream again, the relay's RSS, CPU while idle and the
file descriptor limit it reports in /health.

    python bench/capacity.py --pairs 5000,10000,20000 --size 256 --repeat 3

The relay keeps its default pings (every 25 s each socket) and the clients
answer them, as real idle clients would.  Needs a hard RLIMIT_NOFILE of
2 x pairs + a few hundred in the relay (the benchmark raises its own hard
limit when it may, i.e. as root; its children inherit it).  Prints a
Markdown table; `PLURESYNC_REPO` chooses the code, as for run.py.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import throughput
from memory import _wait_paired
from paths import Relays
from relays import PYTHON, child_env, pluresync_relay, raise_nofile
from run import keygen, machine

HERE = Path(__file__).resolve().parent


def raise_hard_limit(needed: int) -> int:
    """Raise this process's hard (and soft) fd limit to C{needed} if it is lower and we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):
            print(f"cannot raise the hard fd limit from {hard} to {needed}", file=sys.stderr)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
        return json.load(response)


class NoTransit:
    """run_pair's Relays want a transit relay; this benchmark streams through pluresync only."""

    port = 0


def streams(relays: Relays, size: int, repeat: int) -> list[dict]:
    runs = []
    for _ in range(repeat):
        r = throughput.measure("pluresync", relays, size)
        print(f"    stream: {r['mb_s']:.0f} MB/s, relay {r['cpu_s_per_gb']['relay']:.2f} s/GB", file=sys.stderr)
        runs.append(r)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="5000,10000,20000", help="cumulative idle pairs, comma-separated")
    p.add_argument("--per-process", type=int, default=2500, help="idle pairs per client process")
    p.add_argument("--size", type=int, default=256, help="MiB per stream")
    p.add_argument("--repeat", type=int, default=3, help="streams at each step")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured at each step")
    args = p.parse_args()
    counts = sorted(int(n) for n in args.pairs.split(","))
    hard = raise_hard_limit(2 * counts[-1] + 1000)
    raise_nofile()
    # Two descriptors a pair, and a few hundred for the relay's own files
    # and the streams: what the hard limit leaves is the most this machine
    # can show.
    ceiling = (hard - 300) // 2
    if counts[-1] > ceiling:
        print(f"the hard fd limit {hard} allows at most {ceiling} pairs: measuring up to that", file=sys.stderr)
        counts = sorted({min(n, ceiling) for n in counts})
    scratch = Path(tempfile.mkdtemp(prefix="pluresync-capacity-"))
    relay = pluresync_relay(
        scratch, ["--max-connections", "0", "--connections-per-address", "0", "--connections-per-second", "0"]
    )
    clients: list[subprocess.Popen] = []
    rows = []
    try:
        relays = Relays(scratch, NoTransit(), relay, keygen(scratch))
        time.sleep(1.0)
        base_rss = relay.rss_kib()
        have = 0
        for target in [0, *counts]:
            started = time.monotonic()
            new = target - have
            if new:
                nprocs = max(1, math.ceil(new / args.per_process))
                shares = [new // nprocs + (1 if i < new % nprocs else 0) for i in range(nprocs)]
                batch = []
                for share in shares:
                    bind = f"127.0.{1 + len(clients) // 250}.{2 + len(clients) % 250}"
                    proc = subprocess.Popen(
                        [PYTHON, str(HERE / "idle_clients.py"), "--relay", "pluresync", "--port", str(relay.port),
                         "--pairs", str(share), "--id", str(len(clients)), "--bind", bind, "--hold", "3600"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env=child_env(), text=True, preexec_fn=raise_nofile,
                    )
                    clients.append(proc)
                    batch.append(proc)
                _wait_paired(batch, timeout=900)
            setup = time.monotonic() - started
            have = target
            time.sleep(2.0)
            rss = relay.rss_kib()
            cpu0 = relay.cpu_seconds()
            time.sleep(args.idle)
            idle_cpu = (relay.cpu_seconds() - cpu0) / args.idle
            state = health(relay.port)
            print(f"  {target} idle pairs: RSS {rss} KiB, health {state}", file=sys.stderr, flush=True)
            runs = streams(relays, args.size << 20, args.repeat)
            rows.append({
                "pairs": target, "setup_s": setup, "rss_kib": rss,
                "kib_per_pair": (rss - base_rss) / target if target else 0.0,
                "idle_cpu": idle_cpu, "health": state,
                "mb_s": [r["mb_s"] for r in runs], "relay_s_gb": [r["cpu_s_per_gb"]["relay"] for r in runs],
            })
    finally:
        relay.stop()
        for proc in clients:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in clients:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    print(f"Machine: {machine()}\n")
    print(f"Command: `python bench/capacity.py --pairs {args.pairs} --size {args.size} --repeat {args.repeat}` "
          f"(hard fd limit {hard}: at most {ceiling} pairs; {len(clients)} client processes)\n")
    reference = statistics.median(rows[0]["mb_s"])
    print("| idle pairs | relay fd_limit (/health) | connections (/health) | relay RSS MiB | KiB per pair "
          "| relay idle CPU % | set-up s | new stream MB/s (median; runs) | vs no idle pairs | relay CPU s/GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for row in rows:
        median = statistics.median(row["mb_s"])
        print(f"| {row['pairs']:,} | {row['health'].get('fd_limit', '-')} | {row['health']['connections']:,} "
              f"| {row['rss_kib'] / 1024:.0f} | {row['kib_per_pair']:.1f} | {100 * row['idle_cpu']:.1f} "
              f"| {row['setup_s']:.0f} | {median:.0f} ({', '.join(f'{v:.0f}' for v in row['mb_s'])}) "
              f"| {median / reference:.2f} | {statistics.median(row['relay_s_gb']):.2f} |")


if __name__ == "__main__":
    main()
