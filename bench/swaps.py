"""
Swaps under one stream (issue 9): the longest gap in delivery while the path
under a large transfer fails, and what the stream costs with no event.

    .venv/bin/python bench/swaps.py [--size MiB] [--at FRACTION] [--cap SECONDS]
                                    [--only none,kill,...] [--repeat N]
                                    [--deadline SECONDS] [--json FILE]

Each run of each event gets fresh relay processes (C{twist pluresync-relay}
on 127.0.0.1, the C{azure} and C{vercel} slots) and one C{auto:} listener
registered on both; an C{auto:} client in the same process streams --size
MiB of a checked pattern to it (tests/streamharness.py: the same sender,
receiver and relays as tests/test_streams_process.py). Events, struck at the
relay carrying the stream once --at of the bytes have arrived:

 - none: no event: the baseline (today's relay stream), in the same run;
 - kill: SIGKILL (a crash: the relay's sockets are reset);
 - terminate: SIGTERM (a graceful shutdown: close 1001 to both sides);
 - suspend: SIGSTOP (a blackhole: the sockets stay, nothing answers;
   SIGCONT when the run ends);
 - cap: one relay with C{--session-seconds CAP} (close 4029 every CAP s);
   its transfer is made long enough for at least four caps at the
   baseline's rate (the size column says how long).

Per event: the result (C{ok}: every byte once and in order, one connection
on the listening side, a clean close on both; otherwise what went wrong,
e.g. C{stream lost: RelayLostError: ...}), the longest gap between two
deliveries to the receiving protocol, the time from the client's
connectionMade to the last byte, the throughput, and (once the session
layer gives C{transport.stats()}) the retransmit buffer's peak and the
swaps. With --repeat N each event runs N times, interleaved; the table shows
medians. The session layer's parameters come from PLURESYNC_STREAM_EXTRA
(tests/streamharness.py). Prints a Markdown table on stdout, progress on
stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.error import ConnectionDone  # noqa: E402

from pluresync.endpoints import pathcache  # noqa: E402
from pluresync.keys import SyncKey  # noqa: E402
from tests.streamharness import (  # noqa: E402
    SESSION_EXTRA,
    Cleanups,
    MiB,
    Transfer,
    describe,
    start_relays,
)

EVENTS = {
    "none": "no event (baseline)",
    "kill": "relay SIGKILLed",
    "terminate": "relay SIGTERMed (1001)",
    "suspend": "relay SIGSTOPped (blackhole)",
    "cap": "relay `--session-seconds` cap (4029)",
}


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def strike(event: str, relay) -> None:
    """Do C{event} to the relay process carrying the stream."""
    if event == "kill":
        await relay.kill()
    elif event == "terminate":
        relay.signal("TERM")
    elif event == "suspend":
        relay.suspend()


async def one_run(reactor, event: str, size: int, args) -> dict:
    """One transfer with one event; never raises (a failure is the result)."""
    cleanups = Cleanups()
    pathcache.shared = pathcache.PathCache()  # no remembered winner between runs
    row: dict = {"event": event, "size": size, "result": "?"}
    transfer = None
    try:
        key = SyncKey.generate().to_text()
        if event == "cap":
            relays = await start_relays(cleanups, key, azure=["--session-seconds", f"{args.cap:g}"], vercel=None)
        else:
            relays = await start_relays(cleanups, key)
        transfer = Transfer(cleanups, relays, size)
        await transfer.start()
        struck = None
        if event not in ("none", "cap"):
            await transfer.arrived(int(size * args.at), within=args.deadline)
            path = transfer.sender.path
            row["path"] = path
            relay = relays.relay(path)
            if event == "suspend":
                cleanups.addCleanup(relay.resume)
            struck = reactor.seconds()
            await strike(event, relay)
        try:
            await transfer.ended(within=args.deadline)
        except AssertionError as e:
            row["result"] = f"no end within {args.deadline:g} s ({e})"
            return row
        problems = transfer.problems()
        receiving, sender = transfer.receiving, transfer.sender
        if problems:
            lost = receiving.reason if not receiving.reason.check(ConnectionDone) else sender.reason
            after = ""
            if struck is not None and not lost.check(ConnectionDone):
                ended = min(t for t in (receiving.ended_at, sender.ended_at) if t is not None)
                after = f" {(ended - struck) * 1000:.0f} ms after the event"
            row["result"] = problems[0] if not after else f"{problems[0]};{after}"
            row["lost"] = describe(lost)
        else:
            row["result"] = "ok"
            total = receiving.last_byte - sender.started
            row["total_s"] = total
            row["mb_s"] = size / total / 1e6
        row["gap_ms"] = receiving.longest_gap * 1000
        row["gap_at_mib"] = receiving.longest_gap_at / MiB
        row["received"] = receiving.received
        stats = transfer.stats()
        row["stats"] = stats
        if stats["sender"] is not None:
            row["retransmit_peak"] = stats["sender"]["retransmit_peak"]
        swaps = [s["swaps"] for s in stats.values() if s is not None]
        if swaps:
            row["swaps"] = max(swaps)
    except Exception as e:  # noqa: BLE001 - a bench reports, it does not crash
        row["result"] = f"error: {type(e).__name__}: {e}"
        if transfer is not None:
            row["result"] += f" ({transfer.progress()})"
    finally:
        try:
            await cleanups.run()
        except Exception as e:  # noqa: BLE001
            row["cleanup"] = f"{type(e).__name__}: {e}"
    return row


async def main(reactor, args) -> list[dict]:
    rows: list[dict] = []
    size = args.size * MiB
    baseline_rates: list[float] = []
    for turn in range(args.repeat):
        for event in args.only:
            run_size = size
            if event == "cap":
                # At least four caps at the baseline's rate (or the size's worth without one).
                rate = statistics.median(baseline_rates) * 1e6 if baseline_rates else None
                if rate:
                    run_size = max(size, int(rate * args.cap * 4) // MiB * MiB)
            _note(f"  run {turn + 1}/{args.repeat}: {event}, {run_size // MiB} MiB ...")
            row = await one_run(reactor, event, run_size, args)
            _note(f"    {row['result']}" + (f", {row['total_s']:.2f} s" if "total_s" in row else ""))
            if event == "none" and "mb_s" in row:
                baseline_rates.append(row["mb_s"])
            rows.append(row)
    return rows


def _median(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "—"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}–{fmt.format(max(values))})"
    return text


def table(rows: list[dict], args) -> str:
    extra = f"`{SESSION_EXTRA}`" if SESSION_EXTRA else "none"
    lines = [
        f"Longest gap in delivery while the path under one stream changes ({args.size} MiB, event at "
        f"{args.at:.0%} of the bytes, cap {args.cap:g} s; {args.repeat} run(s) each, medians; "
        f"session parameters: {extra})",
        "",
        "| event | result | MiB | longest gap ms | total s | MB/s | retransmit peak KiB | swaps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for event in args.only:
        runs = [r for r in rows if r["event"] == event]
        failed = [r for r in runs if r["result"] != "ok"]
        if not failed:
            result = "ok"
        else:
            result = failed[0]["result"].replace("|", "\\|")
            if len(runs) > 1:
                result += f" ({len(failed)} of {len(runs)} runs)"
        ok = [r for r in runs if r["result"] == "ok"]
        sizes = sorted({r["size"] // MiB for r in runs})
        peaks = [dict(r, peak_kib=r["retransmit_peak"] / 1024) for r in runs if "retransmit_peak" in r]
        lines.append(
            f"| {EVENTS[event]} | {result} | {'/'.join(map(str, sizes))} | {_median(ok, 'gap_ms', '{:.0f}')} | "
            f"{_median(ok, 'total_s', '{:.2f}')} | {_median(ok, 'mb_s', '{:.0f}')} | "
            f"{_median(peaks, 'peak_kib', '{:.0f}')} | {_median(runs, 'swaps', '{:.0f}')} |"
        )
    return "\n".join(lines)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    p.add_argument("--at", type=float, default=0.25, help="fraction of the bytes after which the event strikes")
    p.add_argument("--cap", type=float, default=2.0, help="the cap row's --session-seconds (default 2)")
    p.add_argument("--only", default=",".join(EVENTS), help=f"events, comma-separated (default {','.join(EVENTS)})")
    p.add_argument("--repeat", type=int, default=1, help="runs of each event, interleaved (default 1)")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds a run may wait for the stream to end")
    p.add_argument("--json", help="also write every run's raw numbers to this file")
    args = p.parse_args()
    args.only = [e.strip() for e in args.only.split(",") if e.strip()]
    unknown = [e for e in args.only if e not in EVENTS]
    if unknown or not args.only or args.repeat < 1 or not 0 < args.at < 1:
        p.error(f"--only takes {', '.join(EVENTS)}; --repeat >= 1; 0 < --at < 1 (got {', '.join(unknown) or '-'})")
    started = time.monotonic()

    async def run(reactor) -> None:
        rows = await main(reactor, args)
        print(table(rows, args))
        print(f"\n(total {time.monotonic() - started:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))

    task.react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    cli()
