"""
Swaps under one stream (issue 9): the longest gap in delivery while the path
under a large transfer fails, and what the stream costs with no event.

    .venv/bin/python bench/swaps.py [--size MiB] [--at FRACTION] [--cap SECONDS]
                                    [--only none,kill,...] [--repeat N]
                                    [--baseline DIR] [--fresh]
                                    [--deadline SECONDS] [--json FILE]

Each run of each event gets fresh relay processes (C{twist pluresync-relay}
on 127.0.0.1, the C{azure} and C{vercel} slots) and one C{auto:} listener
registered on both; an C{auto:} client in the same process streams --size
MiB of a checked pattern to it (tests/streamharness.py: the same sender,
receiver and relays as tests/test_streams_process.py). Events, struck at the
relay carrying the stream once --at of the bytes have arrived:

 - none: no event: the reference for the events' rows, in the same run
   (with --baseline, also the stream without a session layer, below);
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
swaps, and the peak RSS of the one process that holds both peers. With
--repeat N each event runs N times, interleaved; the table shows medians.
The session layer's parameters come from PLURESYNC_STREAM_EXTRA
(tests/streamharness.py). Prints a Markdown table on stdout, progress on
stderr.

Peak RSS: in one process (the default) each run first collects the last
run's garbage and trims the heap, resets the process's high-water mark
(C{/proc/self/clear_refs}) and reads C{VmHWM} after it; with
--fresh every run is its own child process and reports its
C{getrusage(RUSAGE_SELF).ru_maxrss}, a peak nothing before it inflates.

--baseline DIR adds another checkout's stream to the same run (the cost of
the session layer, measured against the code before it): DIR is a checkout
of the code to compare with (e.g. C{git worktree add
/tmp/before e97ae19}, the last commit before the session layer); each
repeat also runs the no-event transfer with DIR's pluresync and relays, in
its own child process (C{PLURESYNC_REPO=DIR}), right before this tree's
no-event run, and the table gets a row for it and the after/before ratio
of throughput and peak RSS. --baseline implies --fresh, so both sides are
measured alike. PLURESYNC_REPO=DIR alone runs everything with DIR's code
(the harness, tests/streamharness.py, always comes from this checkout).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The pluresync code under test (peers and relays): this checkout, or the
#: one in $PLURESYNC_REPO (as for bench/run.py).
CODE = Path(os.environ.get("PLURESYNC_REPO", REPO)).resolve()
sys.path.insert(0, str(REPO))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.error import ConnectionDone  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402

# The harness comes from this checkout, whatever the code under test.
from tests import relayprocess  # noqa: E402
from tests.streamharness import (  # noqa: E402
    SESSION_EXTRA,
    Cleanups,
    MiB,
    Transfer,
    describe,
    start_relays,
)

if CODE != REPO:
    # Another checkout's pluresync (imported below, first on the path) and
    # relays (tests/relayprocess.py runs them with PYTHONPATH=ROOT).
    sys.path.insert(0, str(CODE))
    relayprocess.ROOT = CODE

from pluresync.endpoints import pathcache  # noqa: E402
from pluresync.keys import SyncKey  # noqa: E402

EVENTS = {
    "none": "no event",
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


def _reset_peak_rss() -> bool:
    """
    Free the last run (its transfer, protocols and 10 MiB pattern sit in
    reference cycles until a full collection) and give the heap back
    (glibc's C{malloc_trim}), then reset this process's peak RSS (VmHWM),
    where Linux allows it: otherwise each run's peak includes the runs before.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss(row: dict, fresh: bool, reset: bool) -> None:
    """The process's peak RSS during the run (MiB): ru_maxrss in a fresh process, else VmHWM since the reset."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["ru_maxrss_mib"] = maxrss
    if fresh:
        row["peak_rss_mib"] = maxrss
    elif reset:
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            row["peak_rss_mib"] = hwm / 1024


async def one_run(reactor, event: str, size: int, args) -> dict:
    """One transfer with one event; never raises (a failure is the result)."""
    cleanups = Cleanups()
    pathcache.shared = pathcache.PathCache()  # no remembered winner between runs
    row: dict = {"event": event, "size": size, "result": "?", "code": str(CODE)}
    reset = not args.fresh and _reset_peak_rss()
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
        _peak_rss(row, args.fresh, reset)
        stats = transfer.stats()
        row["stats"] = stats
        if stats["sender"] is not None:
            row["retransmit_peak"] = stats["sender"]["retransmit_peak"]
        if stats["receiver"] is not None:
            row["receiver_retransmit_peak"] = stats["receiver"]["retransmit_peak"]
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


async def child_run(event: str, size: int, args, code: Path) -> dict:
    """One run in a fresh child process (this script with --child), with C{code}'s pluresync."""
    env = dict(os.environ, PLURESYNC_REPO=str(code), PYTHONUNBUFFERED="1")
    argv = [
        __file__,
        "--child",
        event,
        "--size-bytes",
        str(size),
        "--at",
        repr(args.at),
        "--cap",
        repr(args.cap),
        "--deadline",
        repr(args.deadline),
    ]
    out, err, code_ = await getProcessOutputAndValue(sys.executable, argv, env=env, path=str(REPO))
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return {
            "event": event,
            "size": size,
            "code": str(code),
            "result": f"error: the child exited {code_}: {' / '.join(tail)}",
        }


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
            if event == "none" and args.baseline:
                _note(f"  run {turn + 1}/{args.repeat}: none with {args.baseline}, {run_size // MiB} MiB ...")
                row = await child_run(event, run_size, args, args.baseline)
                row["baseline"] = True
                _note(f"    {row['result']}" + (f", {row['total_s']:.2f} s" if "total_s" in row else ""))
                rows.append(row)
            _note(f"  run {turn + 1}/{args.repeat}: {event}, {run_size // MiB} MiB ...")
            if args.fresh:
                row = await child_run(event, run_size, args, CODE)
            else:
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


def _row(label: str, runs: list[dict]) -> str:
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
    return (
        f"| {label} | {result} | {'/'.join(map(str, sizes))} | {_median(ok, 'gap_ms', '{:.0f}')} | "
        f"{_median(ok, 'total_s', '{:.2f}')} | {_median(ok, 'mb_s', '{:.0f}')} | "
        f"{_median(peaks, 'peak_kib', '{:.0f}')} | {_median(runs, 'swaps', '{:.0f}')} | "
        f"{_median(ok, 'peak_rss_mib', '{:.0f}')} |"
    )


def _ratio(after: list[dict], before: list[dict], key: str) -> str:
    a = [r[key] for r in after if r["result"] == "ok" and r.get(key) is not None]
    b = [r[key] for r in before if r["result"] == "ok" and r.get(key) is not None]
    if not a or not b:
        return "—"
    return f"{statistics.median(a) / statistics.median(b):.3f}"


def table(rows: list[dict], args) -> str:
    extra = f"`{SESSION_EXTRA}`" if SESSION_EXTRA else "none"
    rss = "its own process's ru_maxrss" if args.fresh else "VmHWM since the run's start"
    lines = [
        f"Longest gap in delivery while the path under one stream changes ({args.size} MiB, event at "
        f"{args.at:.0%} of the bytes, cap {args.cap:g} s; {args.repeat} run(s) each, medians (min–max); "
        f"session parameters: {extra}; peak RSS of the process holding both peers: {rss})",
        "",
        "| event | result | MiB | longest gap ms | total s | MB/s | retransmit peak KiB | swaps | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mine = [r for r in rows if not r.get("baseline")]
    before = [r for r in rows if r.get("baseline")]
    if before:
        lines.append(_row(f"no event, the code in `{args.baseline}`", before))
    for event in args.only:
        lines.append(_row(EVENTS[event], [r for r in mine if r["event"] == event]))
    if before:
        after = [r for r in mine if r["event"] == "none"]
        lines += [
            "",
            f"No event, this checkout against `{args.baseline}` (same run, alternated): throughput after/before "
            f"{_ratio(after, before, 'mb_s')}, peak RSS after/before {_ratio(after, before, 'peak_rss_mib')}",
        ]
    return "\n".join(lines)


def _quiet_logging() -> None:
    """
    Errors to stderr, the rest nowhere. Until logging begins, Twisted keeps
    every event in a buffer (up to 64k), and with it the objects events
    name (a listening port, its sessions, the last run's protocols and
    pattern): run after run, the process's RSS would grow by what a run
    left there.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    errors = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)]
    )
    globalLogBeginner.beginLoggingTo([errors], discardBuffer=True, redirectStandardIO=False)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    p.add_argument("--at", type=float, default=0.25, help="fraction of the bytes after which the event strikes")
    p.add_argument("--cap", type=float, default=2.0, help="the cap row's --session-seconds (default 2)")
    p.add_argument("--only", default=",".join(EVENTS), help=f"events, comma-separated (default {','.join(EVENTS)})")
    p.add_argument("--repeat", type=int, default=1, help="runs of each event, interleaved (default 1)")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds a run may wait for the stream to end")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the no-event transfer with the pluresync checkout in DIR (implies --fresh)",
    )
    p.add_argument("--fresh", action="store_true", help="run every transfer in its own child process")
    p.add_argument("--json", help="also write every run's raw numbers to this file")
    p.add_argument("--child", choices=list(EVENTS), help=argparse.SUPPRESS)  # one run, a JSON row on stdout
    p.add_argument("--size-bytes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    _quiet_logging()
    if args.child:
        args.fresh = True

        async def child(reactor) -> None:
            row = await one_run(reactor, args.child, args.size_bytes, args)
            print(json.dumps(row, default=str))

        task.react(lambda reactor: ensureDeferred(child(reactor)))
        return
    if args.baseline:
        args.baseline = args.baseline.resolve()
        args.fresh = True
    args.only = [e.strip() for e in args.only.split(",") if e.strip()]
    if args.baseline and "none" not in args.only:
        args.only.insert(0, "none")
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
