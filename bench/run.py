"""
Run pluresync's benchmarks and print Markdown tables.

    /work/venv/bin/python bench/run.py [--size MiB] [--pairs 1000,5000]
                                       [--only throughput|latency|memory|failover]
                                       [--repeat N] [--json FILE]

Every relay is its own process, and so is each of the two peers of a stream
(sender and receiver, or pinger and echoer); all on 127.0.0.1.  Throughput
and latency of the four paths are measured in the same run, interleaved
(direct, portforward, transit, pluresync, then again for --repeat), so the
ratios compare like with like; the tables give the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import latency  # noqa: E402
import memory  # noqa: E402
import throughput  # noqa: E402
from paths import PATHS, Relays  # noqa: E402
from relays import PYTHON, child_env, pluresync_relay, raise_nofile, transit_relay  # noqa: E402

LABELS = {
    "direct": "direct loopback TCP",
    "portforward": "`twist portforward` (TCP, no crypto)",
    "transit": "transit relay, WebSocket (no crypto)",
    "pluresync": "pluresync relay (E2E encrypted)",
}


def machine() -> str:
    import autobahn

    import twisted

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"Twisted {twisted.__version__}, Autobahn {autobahn.__version__}"
    )


def keygen(scratch: Path) -> Path:
    path = scratch / "bench.key"
    subprocess.run(
        [PYTHON, "-m", "pluresync", "keygen", "--out", str(path)],
        check=True,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        cwd=str(scratch),
    )
    return path


def streams(scratch: Path, args, want_throughput: bool, want_latency: bool) -> tuple[dict, dict]:
    transit = transit_relay(scratch)
    plure = None
    try:
        plure = pluresync_relay(scratch)
        relays = Relays(scratch, transit, plure, keygen(scratch))
        tput: dict[str, list[dict]] = {p: [] for p in PATHS}
        lat: dict[str, list[dict]] = {p: [] for p in PATHS}
        for rep in range(args.repeat):
            for path in PATHS:
                if want_throughput:
                    r = throughput.measure(path, relays, args.size << 20, args.chunk)
                    tput[path].append(r)
                    print(f"  [{rep + 1}] throughput {path}: {r['mb_s']:.1f} MB/s", file=sys.stderr, flush=True)
                if want_latency:
                    r = latency.measure(path, relays, args.count, args.warmup)
                    lat[path].append(r)
                    print(
                        f"  [{rep + 1}] latency {path}: median {r['median_us']:.0f} us, p99 {r['p99_us']:.0f} us",
                        file=sys.stderr,
                        flush=True,
                    )
        return tput, lat
    finally:
        if plure is not None:
            plure.stop()
        transit.stop()


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def throughput_table(tput: dict, size_mib: int, chunk: int) -> str:
    base = med(tput["portforward"], "mb_s")
    lines = [
        f"Throughput, one stream, {size_mib} MiB in {chunk // 1024} KiB writes "
        f"(MB = 10^6 bytes; median of {len(tput['direct'])} runs, all runs listed)",
        "",
        "| path | MB/s (median) | runs | vs portforward | CPU s per GB: sender / relay / receiver "
        "| peak RSS MiB: sender / receiver |",
        "|---|---:|---|---:|---|---|",
    ]
    for path in PATHS:
        runs = tput[path]
        value = med(runs, "mb_s")
        cpu = " / ".join(
            format(statistics.median(r["cpu_s_per_gb"][who] for r in runs), ".2f")
            for who in ("sender", "relay", "receiver")
        )
        rss = " / ".join(format(max(r["max_rss_mib"][who] for r in runs), ".0f") for who in ("sender", "receiver"))
        lines.append(
            f"| {LABELS[path]} | {value:.1f} | {', '.join(format(r['mb_s'], '.1f') for r in runs)} "
            f"| {value / base:.2f}x | {cpu} | {rss} |"
        )
    return "\n".join(lines)


def latency_table(lat: dict, count: int, warmup: int) -> str:
    base = med(lat["portforward"], "median_us")
    base99 = med(lat["portforward"], "p99_us")
    lines = [
        f"Round trip of a 64-byte message ({count} round trips after {warmup} warm-up; "
        f"median over {len(lat['direct'])} runs of each statistic)",
        "",
        "| path | median µs | p99 µs | median vs portforward | added µs over portforward (median / p99) |",
        "|---|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        m, p = med(lat[path], "median_us"), med(lat[path], "p99_us")
        lines.append(f"| {LABELS[path]} | {m:.0f} | {p:.0f} | {m / base:.2f}x | {m - base:+.0f} / {p - base99:+.0f} |")
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    lines = [
        "Relay RSS per idle paired session (fresh relay; cumulative pairs; KiB = 1024 bytes)",
        "",
        "| relay | pairs | RSS before (KiB) | RSS after (KiB) | KiB per pair | marginal KiB per pair "
        "| set-up time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        marginal = f"{r['marginal_kib_per_pair']:.1f}" if "marginal_kib_per_pair" in r else ""
        lines.append(
            f"| {r['relay']} | {r['pairs']} | {r['rss_before_kib']} | {r['rss_after_kib']} "
            f"| {r['kib_per_pair']:.1f} | {marginal} | {r['setup_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="MiB per throughput stream (default 256)")
    p.add_argument("--chunk", type=int, default=64 << 10, help="bytes per sender write (default 65536)")
    p.add_argument("--pairs", default="1000,5000", help="cumulative idle pair counts (default 1000,5000)")
    p.add_argument(
        "--only",
        choices=["throughput", "latency", "memory", "failover"],
        help="run one part (failover: only with --only, see bench/failover.py)",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each stream measurement (default 3)")
    p.add_argument("--count", type=int, default=2000, help="timed round trips (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed round trips first (default 200)")
    p.add_argument("--runs", type=int, default=10, help="runs of each failover case (default 10)")
    p.add_argument("--json", help="also write all raw results to this file")
    args = p.parse_args()
    raise_nofile()

    started = time.monotonic()
    out = [f"Machine: {machine()}", "", f"Command: `{' '.join([Path(PYTHON).name, *sys.argv])}`", ""]
    raw: dict = {}
    with tempfile.TemporaryDirectory(prefix="pluresync-bench-") as tmp:
        scratch = Path(tmp)
        want_t = args.only in (None, "throughput")
        want_l = args.only in (None, "latency")
        if want_t or want_l:
            tput, lat = streams(scratch, args, want_t, want_l)
            raw["throughput"], raw["latency"] = tput, lat
            if want_t:
                out += [throughput_table(tput, args.size, args.chunk), ""]
            if want_l:
                out += [latency_table(lat, args.count, args.warmup), ""]
        if args.only in (None, "memory"):
            counts = [int(n) for n in args.pairs.split(",") if n.strip()]
            results = []
            for kind in ("transit", "pluresync"):
                print(f"  memory {kind} ...", file=sys.stderr, flush=True)
                results += memory.measure(kind, scratch, counts)
            raw["memory"] = results
            out += [memory_table(results), ""]
        if args.only == "failover":
            # Its own process: bench/failover.py runs a Twisted reactor.
            done = subprocess.run(
                [PYTHON, str(Path(__file__).with_name("failover.py")), "--runs", str(args.runs)],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
                env=child_env(),
            )
            out += [done.stdout.split("\n(total")[0].rstrip(), ""]
    out.append(f"(total {time.monotonic() - started:.0f} s)")
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
