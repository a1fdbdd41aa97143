"""
Connect times with the LAN path: what C{direct:} costs on a LAN, and what
racing it first costs C{auto:} where nobody is on the LAN.

    /work/venv/bin/python bench/lanconnect.py [--runs N] [--json FILE]

1. C{auto:} on this host, two real relay processes on 127.0.0.1 (the
   C{azure} and C{vercel} slots), one listener registered on both with
   C{direct=off} (so nobody answers on the LAN); the median of N
   C{connect()}s, each until the client's protocol is connected:

   - C{direct=off}: the race as before the LAN path existed;
   - LAN on, fresh path cache: the LAN is tried first and finds nobody, the
     primary starts after its head start (C{delay=0.5});
   - LAN on, the path cache warm: the relay that won last time goes first
     (the LAN second, after the head start).

2. With root: two hosts of a LAN made of network namespaces
   (tests/lanlab.py), real processes (tests/directpeer.py): a C{direct:}
   listener in one and a client in the other, and the same with C{auto:}
   and both relays unreachable; the client's own measure of C{connect()}
   (search, TCP, handshake; imports and parsing excluded).

Prints a Markdown table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.endpoints import serverFromString  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from pluresync.endpoints.auto import AutoClientEndpoint  # noqa: E402
from pluresync.endpoints.parsers import auto_config  # noqa: E402
from pluresync.endpoints.pathcache import PathCache  # noqa: E402
from pluresync.keys import SyncKey  # noqa: E402
from tests import lanlab  # noqa: E402
from tests.relayprocess import RelayProcess, poll  # noqa: E402


class _Cleanups:
    """Stands in for a TestCase where the test helpers want addCleanup()."""

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


async def relays(reactor, runs: int, cleanups: _Cleanups) -> dict[str, list[float]]:
    azure, vercel = RelayProcess(), RelayProcess()
    for relay in (azure, vercel):
        cleanups.addCleanup(relay.cleanup)
        await relay.start()
    key = SyncKey.generate().to_text()
    common = dict(key=key, azure=azure.url, vercel=vercel.url, timeout="10")
    listener = serverFromString(
        reactor, f"auto:key={key}:azure={azure.escaped_url}:vercel={vercel.escaped_url}:direct=off"
    )
    port = await listener.listen(Factory.forProtocol(Protocol))
    cleanups.addCleanup(port.stopListening)
    await poll(lambda: all(port.transports.values()), timeout=30, interval=0.05, what="registering on both")
    protocols: list[Protocol] = []

    async def connect(config, want: str) -> float:
        began = reactor.seconds()
        protocol = await AutoClientEndpoint(reactor, config).connect(Factory.forProtocol(Protocol))
        elapsed = reactor.seconds() - began
        path = protocol.transport.getPeer().transport
        assert path == want, f"connected through {path}, not {want}"
        protocols.append(protocol)
        return elapsed

    before = auto_config(**common, direct="off")
    lan = auto_config(**common, direct="on")
    await connect(replace(before, cache=PathCache()), "relay:azure")  # warm up imports and the relay
    results: dict[str, list[float]] = {"before": [], "lan-first": [], "lan-cached": []}
    for _ in range(runs):
        results["before"].append(await connect(replace(before, cache=PathCache()), "relay:azure"))
        results["lan-first"].append(await connect(replace(lan, cache=PathCache()), "relay:azure"))
        warm = PathCache()
        await connect(replace(lan, cache=warm), "relay:azure")
        results["lan-cached"].append(await connect(replace(lan, cache=warm), "relay:azure"))
    for protocol in protocols:
        protocol.transport.abortConnection()
    for name, values in results.items():
        _note(f"  {name}: {statistics.median(values) * 1000:.0f} ms")
    return results


async def lan(reactor, runs: int, mib: int = 0) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"direct": [], "auto-dead-relays": [], "direct-mb-s": []}
    reason = lanlab.unavailable()
    if reason is not None:
        _note(f"  no LAN lab: {reason}")
        return results
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"lanconnect-{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    keyfile = scratch / "key"
    if not keyfile.exists():
        SyncKey.generate().write(str(keyfile))
    dead = "azure=ws\\://127.0.0.1\\:9:vercel=ws\\://127.0.0.1\\:19"
    strings = {
        "direct": (f"direct:keyfile={keyfile}", f"direct:keyfile={keyfile}:timeout=20"),
        "auto-dead-relays": (f"auto:keyfile={keyfile}:{dead}", f"auto:keyfile={keyfile}:{dead}:timeout=20"),
    }
    env = {"DIRECTPEER_BYTES": str(1 << 20), "DIRECTPEER_LIMIT": "60"}
    for _ in range(runs):
        for name, (listen, connect) in strings.items():
            cleanups = _Cleanups()
            try:
                lab = lanlab.LanLab(cleanups)
                listener = lab.spawn("a", ["-m", "tests.directpeer", "listen", listen], b'"listening"', env)
                await listener.ready
                client = lab.spawn("b", ["-m", "tests.directpeer", "connect", connect], env=env)
                code = await client.ended
                events = [json.loads(line) for line in client.out.decode().splitlines() if line.startswith("{")]
                connected = [e for e in events if e["event"] == "connected"]
                assert code == 0 and connected, client.out.decode()[-2000:] + client.err.decode()[-2000:]
                assert connected[0]["path"] == "direct:lan", connected[0]
                results[name].append(connected[0]["seconds"])
            finally:
                await cleanups.run()
        if mib:
            # The LAN TCP path's throughput: one stream of --mib MiB, timed from connected to the echo of its hash.
            cleanups = _Cleanups()
            bulk = {"DIRECTPEER_BYTES": str(mib << 20), "DIRECTPEER_LIMIT": "120"}
            try:
                lab = lanlab.LanLab(cleanups)
                listen, connect = strings["direct"]
                listener = lab.spawn("a", ["-m", "tests.directpeer", "listen", listen], b'"listening"', bulk)
                await listener.ready
                client = lab.spawn("b", ["-m", "tests.directpeer", "connect", connect], env=bulk)
                code = await client.ended
                events = {e["event"]: e for e in map(json.loads, filter(None, client.out.decode().splitlines()))}
                assert code == 0 and events["done"]["ok"], client.out.decode()[-2000:]
                seconds = events["done"]["seconds"] - events["connected"]["seconds"]
                results["direct-mb-s"].append((mib << 20) / seconds / 1e6)
            finally:
                await cleanups.run()
    for name, values in results.items():
        if values:
            _note(f"  {name}: {statistics.median(values) * (1 if name.endswith('mb-s') else 1000):.0f}")
    return results


def _cell(values: list[float]) -> str:
    if not values:
        return "not measured"
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} ({min(ms):.0f}–{max(ms):.0f})"


def table(results: dict, runs: int) -> str:
    rows = [
        ("auto:, nobody on the LAN, relays on 127.0.0.1: direct=off (as before the LAN path)", "before"),
        ("auto:, nobody on the LAN: LAN first, fresh path cache", "lan-first"),
        ("auto:, nobody on the LAN: LAN on, the relay remembered (second connect on this network)", "lan-cached"),
        ("direct: between two hosts of one LAN (namespaces on a bridge)", "direct"),
        ("auto: between two hosts of one LAN, both relays unreachable", "auto-dead-relays"),
    ]
    lines = [
        f"connect() until the protocol is connected, median ms (min–max) of {runs} runs; delay=0.5",
        "",
        "| case | time |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {_cell(results.get(key, []))} |" for label, key in rows]
    bulk = results.get("direct-mb-s", [])
    if bulk:
        lines.append(
            f"| direct: one stream over the LAN's TCP path, MB/s (median, min–max) | "
            f"{statistics.median(bulk):.0f} ({min(bulk):.0f}–{max(bulk):.0f}) |"
        )
    return "\n".join(lines)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs of each case (default 5)")
    p.add_argument("--json", help="also write the raw times (seconds) to this file")
    p.add_argument("--mib", type=int, default=0, help="also move MiB over the LAN's TCP path, per run (MB/s)")
    args = p.parse_args()
    started = time.monotonic()

    async def run(reactor) -> None:
        cleanups = _Cleanups()
        try:
            _note("auto: with nobody on the LAN")
            results = await relays(reactor, args.runs, cleanups)
        finally:
            await cleanups.run()
        _note("the LAN lab")
        results.update(await lan(reactor, args.runs, args.mib))
        print(table(results, args.runs))
        print(f"\n(total {time.monotonic() - started:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    task.react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    cli()
