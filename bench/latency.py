"""
Small-message round trips: the connecting process writes `msg` bytes, the
listening process echoes them, the connecting process times each round trip
(perf_counter_ns) until it has them all back; `warmup` round trips are not
counted.
"""

from __future__ import annotations

import statistics

from paths import Relays, run_pair


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure(path: str, relays: Relays, count: int = 2000, warmup: int = 200, msg: int = 64) -> dict:
    _, pinged, _ = run_pair(
        path, relays, "echo", "ping", ["--count", str(count), "--warmup", str(warmup), "--msg", str(msg)], 60.0
    )
    rtts_us = [ns / 1000 for ns in pinged["rtts_ns"]]
    return {
        "path": path,
        "count": len(rtts_us),
        "median_us": statistics.median(rtts_us),
        "p99_us": percentile(rtts_us, 0.99),
        "mean_us": statistics.fmean(rtts_us),
    }
