"""
Failover time of C{auto:} endpoints: how long after the primary relay died
a new stream is up through the backup.

    /work/venv/bin/python bench/failover.py [--runs N] [--delays 0.5,0.1] [--json FILE]

Two real relay processes (C{twist pluresync-relay}) on 127.0.0.1 fill the
C{azure} (primary) and C{vercel} (backup) slots; one C{auto:} listener is
registered on both; the client runs in the same process as the listener.
For each head-start delay (C{delay=}, default L{DEFAULT_DELAY} and 0.1 s)
and each way the primary can be dead, the median of N runs of:

 - healthy (reference): the primary is up; C{connect()} until the stream
   is up (it goes through the primary);
 - refused: nothing listens on the primary's port (its process was
   SIGKILLed); C{connect()} until the stream is up through the backup;
 - blackholed: the primary's port accepts TCP and never answers;
   C{connect()} until the stream is up through the backup;
 - SIGTERM'd while connected: a stream runs through the primary; from the
   SIGTERM until a new stream is up through the backup (the client notices
   the loss, C{RelayLostError}, and reconnects at once). The primary is then
   restarted on its port and the listener re-registers there before the
   next run.

"Up" is C{connect()} firing: relay pairing, Noise handshake, the USE
record; i.e. the client's protocol got C{connectionMade}. Every run uses a
fresh path cache (pluresync.endpoints.pathcache), so the remembered winner
never skips the primary. Prints a Markdown table on stdout, progress on
stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults  # noqa: E402
from twisted.internet.endpoints import serverFromString  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from pluresync.endpoints.auto import DEFAULT_DELAY, AutoClientEndpoint  # noqa: E402
from pluresync.endpoints.parsers import auto_config  # noqa: E402
from pluresync.endpoints.pathcache import PathCache  # noqa: E402
from pluresync.keys import SyncKey  # noqa: E402
from tests.relayprocess import Blackhole, RelayProcess, poll  # noqa: E402

CASES = {
    "healthy": "healthy primary (reference: no failover)",
    "refused": "refused (nothing listens; process SIGKILLed)",
    "blackholed": "blackholed (accepts TCP, never answers)",
    "sigterm": "SIGTERM'd while connected (from the signal)",
}


class _Stream(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred = Deferred()
        self.reason = None

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


class _Cleanups:
    """Stands in for a TestCase where tests.relayprocess wants addCleanup()."""

    def __init__(self) -> None:
        self._calls: list = []

    def addCleanup(self, f, *args) -> None:
        self._calls.append((f, args))

    async def run(self) -> None:
        while self._calls:
            f, args = self._calls.pop()
            result = f(*args)
            if isinstance(result, Deferred) or hasattr(result, "__await__"):
                await result


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, reactor, azure: RelayProcess, vercel: RelayProcess, key: str) -> None:
        self.reactor = reactor
        self.azure = azure
        self.vercel = vercel
        self.key = key
        self.streams: list[_Stream] = []

    def client(self, azure_url: str, delay: float) -> AutoClientEndpoint:
        # Failover between the relays: the LAN path (the listener in this
        # very process, found by mDNS) would win every race.
        config = auto_config(
            key=self.key, azure=azure_url, vercel=self.vercel.url, delay=str(delay), timeout="10", direct="off"
        )
        return AutoClientEndpoint(self.reactor, replace(config, cache=PathCache()))

    async def connect(self, azure_url: str, delay: float, want: str) -> tuple[_Stream, float]:
        started = self.reactor.seconds()
        stream = await self.client(azure_url, delay).connect(Factory.forProtocol(_Stream))
        elapsed = self.reactor.seconds() - started
        self.streams.append(stream)
        got = stream.transport.getPeer().transport
        if got != want:
            raise AssertionError(f"connected through {got}, expected {want}")
        return stream, elapsed

    async def close_streams(self) -> None:
        for stream in self.streams:
            if not stream.lost.called:
                stream.transport.loseConnection()
        for stream in self.streams:
            await stream.lost
        self.streams.clear()


async def main(reactor, args) -> dict:
    cleanups = _Cleanups()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        azure, vercel = RelayProcess(), RelayProcess()
        for relay in (azure, vercel):
            cleanups.addCleanup(lambda r=relay: ensureDeferred(r.cleanup()))
        await gatherResults([ensureDeferred(azure.start()), ensureDeferred(vercel.start())])
        hole = Blackhole(cleanups)
        key = SyncKey.generate().to_text()
        bench = Bench(reactor, azure, vercel, key)
        listener = serverFromString(
            reactor, f"auto:key={key}:azure={azure.escaped_url}:vercel={vercel.escaped_url}:timeout=10:direct=off"
        )
        port = await listener.listen(Factory.forProtocol(Protocol))
        cleanups.addCleanup(port.stopListening)
        cleanups.addCleanup(lambda: ensureDeferred(bench.close_streams()))

        async def both_registered() -> None:
            await poll(lambda: all(port.transports.values()), timeout=30, interval=0.05, what="registering on both")

        await both_registered()
        # Warm up both paths (imports, first handshakes) before timing.
        await bench.connect(azure.url, 2.0, "relay:azure")
        await bench.connect(hole.url, 0.1, "relay:vercel")
        await bench.close_streams()

        for delay in args.delays:
            runs = results.setdefault(f"{delay:g}", {case: [] for case in CASES})
            await both_registered()
            for _ in range(args.runs):
                _, t = await bench.connect(azure.url, delay, "relay:azure")
                runs["healthy"].append(t)
            await bench.close_streams()
            _note(f"  delay={delay:g} healthy: {statistics.median(runs['healthy']) * 1000:.0f} ms")

            for _ in range(args.runs):
                _, t = await bench.connect(hole.url, delay, "relay:vercel")
                runs["blackholed"].append(t)
            await bench.close_streams()
            _note(f"  delay={delay:g} blackholed: {statistics.median(runs['blackholed']) * 1000:.0f} ms")

            for _ in range(args.runs):
                await both_registered()
                stream, _ = await bench.connect(azure.url, 2.0, "relay:azure")
                signalled = reactor.seconds()
                azure.signal("TERM")
                await stream.lost
                noticed = reactor.seconds() - signalled
                _, t = await bench.connect(azure.url, delay, "relay:vercel")
                runs["sigterm"].append(reactor.seconds() - signalled)
                runs.setdefault("sigterm_noticed", []).append(noticed)
                await azure.ended()
                await azure.restart()
            await bench.close_streams()
            _note(f"  delay={delay:g} sigterm: {statistics.median(runs['sigterm']) * 1000:.0f} ms")

            await azure.kill()
            for _ in range(args.runs):
                _, t = await bench.connect(azure.url, delay, "relay:vercel")
                runs["refused"].append(t)
            await bench.close_streams()
            await azure.restart()
            _note(f"  delay={delay:g} refused: {statistics.median(runs['refused']) * 1000:.0f} ms")
    finally:
        await cleanups.run()
    return results


def table(results: dict, runs: int) -> str:
    delays = list(results)
    head = " | ".join(f"delay={d} s: median ms (min–max)" for d in delays)
    lines = [
        f"Failover time of an `auto:` client, primary dead → new stream up through the backup "
        f"(median of {runs} runs; timeout=10)",
        "",
        f"| primary | {head} |",
        "|---|" + "---:|" * len(delays),
    ]
    for case, label in CASES.items():
        cells = []
        for d in delays:
            values = [v * 1000 for v in results[d][case]]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    noticed = [
        f"delay={d} s: {statistics.median(results[d]['sigterm_noticed']) * 1000:.1f} ms"
        for d in delays
        if results[d].get("sigterm_noticed")
    ]
    if noticed:
        lines += ["", f"SIGTERM → the open stream reports `RelayLostError` (median): {', '.join(noticed)}."]
    return "\n".join(lines)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="runs of each case (default 10)")
    p.add_argument(
        "--delays",
        default=f"{DEFAULT_DELAY:g},0.1",
        help=f"head-start delays to measure, comma-separated (default {DEFAULT_DELAY:g},0.1)",
    )
    p.add_argument("--json", help="also write the raw times (seconds) to this file")
    args = p.parse_args()
    args.delays = [float(d) for d in args.delays.split(",") if d.strip()]
    started = time.monotonic()

    async def run(reactor) -> None:
        results = await main(reactor, args)
        print(table(results, args.runs))
        print(f"\n(total {time.monotonic() - started:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    task.react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    cli()
