"""
The HTTP pipe next to the WebSocket pipe, in the same run (issue 17).

    python bench/httppipe.py [--size MiB] [--repeat N] [--count N] [--fallbacks N]

Throughput (one stream of --size MiB, 64 KiB writes from a streaming
producer) and the round trip of 64-byte messages, each peer its own process
and the relay (`twist pluresync-relay`) a third, all on 127.0.0.1, through
relay: endpoints with pipe=ws and pipe=http interleaved (ws, http, ws, http,
...), so the ratios compare like with like; the table gives the medians.
The goal (issue 17): the HTTP pipe at least half the WebSocket's throughput,
at most twice its round trip.

Then the time from a refused upgrade to a working HTTP pipe: in this
process, a relay, a CONNECT proxy that answers every WebSocket upgrade with
403 (tests/httpproxy.py InspectingProxy), and a relay: listener with
pipe=auto behind it: the time from startListening() to its registration
(ready) through the HTTP pipe, with a fresh path cache each time, next to
the same registration straight over a WebSocket without the proxy.
Goal: under one second on loopback.

Not a test: numbers, on stdout (Markdown).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import latency  # noqa: E402
import throughput  # noqa: E402
from paths import Relays  # noqa: E402
from relays import pluresync_relay, raise_nofile  # noqa: E402
from run import keygen, machine  # noqa: E402

PIPES = ("ws", "http")


def streams(scratch: Path, args) -> dict[str, dict[str, list[dict]]]:
    """Throughput and round trips over each pipe, interleaved."""
    results: dict[str, dict[str, list[dict]]] = {pipe: {"throughput": [], "latency": []} for pipe in PIPES}
    plure = pluresync_relay(scratch)
    try:
        # No transit relay: only the pluresync path runs here.
        relays = Relays(scratch, None, plure, keygen(scratch))
        for rep in range(args.repeat):
            for pipe in PIPES:
                os.environ["PLURESYNC_BENCH_EXTRA"] = f":pipe={pipe}"
                r = throughput.measure("pluresync", relays, args.size << 20)
                results[pipe]["throughput"].append(r)
                print(f"  [{rep + 1}] throughput {pipe}: {r['mb_s']:.1f} MB/s", file=sys.stderr, flush=True)
                r = latency.measure("pluresync", relays, args.count, args.count // 10)
                results[pipe]["latency"].append(r)
                print(f"  [{rep + 1}] round trip {pipe}: median {r['median_us']:.0f} us", file=sys.stderr, flush=True)
    finally:
        os.environ.pop("PLURESYNC_BENCH_EXTRA", None)
        plure.stop()
    return results


def fallbacks(count: int) -> dict[str, list[float]]:
    """Seconds from startListening() to ready: a refused WebSocket then the HTTP pipe; a WebSocket alone."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol

    from pluresync.endpoints import pathcache
    from pluresync.keys import SyncKey
    from tests.httpproxy import InspectingProxy
    from tests.localrelay import LocalRelay

    class Cleanups:
        def __init__(self) -> None:
            self.calls: list = []

        def addCleanup(self, f, *a) -> None:
            self.calls.append((f, a))

    refused = "refused WebSocket, then the HTTP pipe"
    times: dict[str, list[float]] = {refused: [], "WebSocket": []}

    async def run() -> None:
        cleanups = Cleanups()
        relay = LocalRelay(cleanups)
        proxy = InspectingProxy(cleanups, deny_upgrade=True)
        key = SyncKey.generate()
        proxy_url = proxy.url.replace(":", "\\:")
        try:
            for _ in range(count):
                for label, params in ((refused, {"proxy": proxy_url}), ("WebSocket", {})):
                    pathcache.pipes = pathcache.PathCache()
                    endpoint = serverFromString(reactor, relay.endpoint(key, **params))
                    started = time.perf_counter()
                    port = await endpoint.listen(Factory.forProtocol(Protocol))
                    times[label].append(time.perf_counter() - started)
                    await port.stopListening()
        finally:
            for f, a in reversed(cleanups.calls):
                result = f(*a)
                if hasattr(result, "addBoth"):
                    await result

    done = ensureDeferred(run())
    failures: list = []
    done.addErrback(failures.append)
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    if failures:
        failures[0].raiseException()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="MiB per throughput stream (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each pipe, interleaved (default 3)")
    p.add_argument("--count", type=int, default=2000, help="timed round trips per run (default 2000)")
    p.add_argument("--fallbacks", type=int, default=10, help="registrations timed per way (default 10)")
    args = p.parse_args()
    raise_nofile()
    print(f"Machine: {machine()}\n")
    with tempfile.TemporaryDirectory(prefix="pluresync-bench-") as scratch:
        results = streams(Path(scratch), args)
    ws_mb = statistics.median(r["mb_s"] for r in results["ws"]["throughput"])
    print(
        f"Streams: {args.size} MiB, {args.repeat} runs each, interleaved; "
        f"round trips of 64 bytes, {args.count} per run.\n"
    )
    print("| pipe | MB/s (median) | CPU s/GB sender / relay / receiver | round trip median (us) | p99 (us) |")
    print("|---|---|---|---|---|")
    for pipe in PIPES:
        tp = results[pipe]["throughput"]
        lat = results[pipe]["latency"]
        mb = statistics.median(r["mb_s"] for r in tp)
        cpu = {k: statistics.median(r["cpu_s_per_gb"][k] for r in tp) for k in ("sender", "relay", "receiver")}
        print(
            f"| {pipe} | {mb:.1f} ({mb / ws_mb:.2f}x ws) | {cpu['sender']:.2f} / {cpu['relay']:.2f} / "
            f"{cpu['receiver']:.2f} | {statistics.median(r['median_us'] for r in lat):.0f} | "
            f"{statistics.median(r['p99_us'] for r in lat):.0f} |"
        )
    times = fallbacks(args.fallbacks)
    print(f"\nA listener's registration (startListening() to ready), {args.fallbacks} each, in one process:\n")
    print("| way | median (ms) | max (ms) |")
    print("|---|---|---|")
    for label, values in times.items():
        print(f"| {label} | {statistics.median(values) * 1000:.1f} | {max(values) * 1000:.1f} |")


if __name__ == "__main__":
    main()
