"""
Relay memory per idle paired session: VmRSS of a fresh relay process before
any client, then after 1,000 and after 5,000 (cumulative) idle pairs held by
several `idle_clients.py` processes; KiB per pair = (RSS after - RSS before)
/ pairs, and the marginal cost between the two counts.
"""

from __future__ import annotations

import math
import select
import subprocess
import time
from pathlib import Path

from relays import PYTHON, child_env, pluresync_relay, raise_nofile, transit_relay

HERE = Path(__file__).resolve().parent
PAIRS_PER_PROCESS = 1250  # 2,500 client WebSockets, ~0.2-0.3 GB per process


def _wait_paired(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = {p.stdout.fileno(): p for p in procs}
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{len(waiting)} client processes did not pair in {timeout} s")
        ready, _, _ = select.select(list(waiting), [], [], left)
        for fd in ready:
            proc = waiting[fd]
            line = proc.stdout.readline()
            if line.startswith("PAIRED"):
                del waiting[fd]
            elif line.startswith("FAILED") or not line:
                raise RuntimeError(f"idle clients failed: {line!r} {proc.stderr.read()[-2000:] if not line else ''}")


def measure(kind: str, scratch: Path, pair_counts: list[int]) -> list[dict]:
    if kind == "pluresync":
        # 5,000 pairs are 10,000 sockets plus the listeners, all from 127.0.0.1:
        # lift the connection cap and the per-address limits.
        relay = pluresync_relay(
            scratch,
            ["--max-connections", "0", "--connections-per-address", "0", "--connections-per-second", "0"],
        )
    else:
        relay = transit_relay(scratch)
    clients: list[subprocess.Popen] = []
    results = []
    try:
        time.sleep(1.0)
        before = relay.rss_kib()
        have = 0
        for target in sorted(pair_counts):
            new = target - have
            nprocs = max(1, math.ceil(new / PAIRS_PER_PROCESS))
            shares = [new // nprocs + (1 if i < new % nprocs else 0) for i in range(nprocs)]
            batch = []
            started = time.monotonic()
            for share in shares:
                proc = subprocess.Popen(
                    [
                        PYTHON,
                        str(HERE / "idle_clients.py"),
                        "--relay",
                        kind,
                        "--port",
                        str(relay.port),
                        "--pairs",
                        str(share),
                        "--id",
                        str(len(clients)),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=child_env(),
                    text=True,
                    preexec_fn=raise_nofile,
                )
                clients.append(proc)
                batch.append(proc)
            _wait_paired(batch, timeout=300)
            setup = time.monotonic() - started
            time.sleep(2.0)
            after = relay.rss_kib()
            results.append(
                {
                    "relay": kind,
                    "pairs": target,
                    "rss_before_kib": before,
                    "rss_after_kib": after,
                    "kib_per_pair": (after - before) / target,
                    "setup_s": setup,
                    "client_processes": len(clients),
                }
            )
            have = target
        if len(results) >= 2:
            a, b = results[-2], results[-1]
            b["marginal_kib_per_pair"] = (b["rss_after_kib"] - a["rss_after_kib"]) / (b["pairs"] - a["pairs"])
        return results
    finally:
        relay.stop()
        for proc in clients:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in clients:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
