"""
Clustered relays (`--redis`): cross-instance against same-instance.

Starts a `redis-server` (127.0.0.1, no persistence) and three
`twist pluresync-relay --redis ...` processes, then measures:

  throughput  one encrypted stream through `relay:` endpoints (bench/peer.py
              sender and receiver processes, as in bench/throughput.py):
              same instance (both peers on instance 1) and cross-instance
              (listener on 1, sender on 2: connector -> 2 -> link -> 1 ->
              listener); MB/s = 10^6 bytes/s
  latency     64-byte round trips over such a stream (bench/peer.py ping/echo)
  pairing     raw relay protocol, in this process: from a connector's
              `connect` to its `paired`, while a listener accepts every
              `incoming` at once: same instance, cross-instance (accept on
              the listener's instance), and accept on a third instance
  pubsub      for comparison, Redis pub/sub as the byte transport: 64 KiB
              messages published on one connection, received by a
              subscriber (no relay involved: an upper bound of that design)

Usage: python bench/cluster.py [--size MiB] [--repeat N] [--pairings N] [--json FILE]
Prints Markdown tables on stdout (progress on stderr).  Everything listens on
127.0.0.1 and is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from latency import percentile
from paths import _peer, _ready_port, _result
from relays import PYTHON, free_port, pluresync_relay, raise_nofile
from run import keygen, machine


def wait_redis_ok(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.load(r).get("checks", {}).get("redis") is True:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"relay on {port} did not connect to Redis")


def start_redis(scratch: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    log = open(scratch / "redis.log", "wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc, port


def stream(
    listen_port: int,
    connect_port: int,
    keyfile: Path,
    listen_role: str,
    connect_role: str,
    extra: list[str],
    timeout: float,
) -> tuple[dict, dict]:
    common = ["--transport", "pluresync", "--keyfile", str(keyfile), "--timeout", str(timeout)]
    listener = _peer([*common, "--port", str(listen_port), "--role", listen_role, *extra])
    try:
        _ready_port(listener, 30)
        connector = _peer([*common, "--port", str(connect_port), "--role", connect_role, *extra])
        try:
            sent = _result(connector, timeout + 10)
        finally:
            if connector.poll() is None:
                connector.kill()
        return _result(listener, timeout + 10), sent
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)


def throughput(ports: dict[str, tuple[int, int]], keyfile: Path, size: int, repeat: int) -> dict:
    results: dict[str, list[float]] = {}
    for name, (listen_port, connect_port) in ports.items():
        runs = []
        for i in range(repeat):
            print(f"  throughput {name} run {i + 1} ...", file=sys.stderr, flush=True)
            received, sent = stream(
                listen_port,
                connect_port,
                keyfile,
                "recv",
                "send",
                ["--size", str(size), "--chunk", str(64 << 10)],
                max(60.0, size / 2e6),
            )
            runs.append(size / (received["last_byte"] - sent["start"]) / 1e6)
        results[name] = runs
    return results


def round_trips(ports: dict[str, tuple[int, int]], keyfile: Path, count: int) -> dict:
    results = {}
    for name, (listen_port, connect_port) in ports.items():
        print(f"  latency {name} ...", file=sys.stderr, flush=True)
        _, pinged = stream(
            listen_port,
            connect_port,
            keyfile,
            "echo",
            "ping",
            ["--count", str(count), "--warmup", "200", "--msg", "64"],
            60.0,
        )
        rtts = [ns / 1000 for ns in pinged["rtts_ns"]]
        results[name] = {"median_us": statistics.median(rtts), "p99_us": percentile(rtts, 0.99)}
    return results


# -- in-process measurements (Twisted) -------------------------------------------


def in_process(relay_ports: list[int], redis_port: int, pairings: int, pubsub_mb: int) -> dict:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    out: dict = {}

    async def main() -> None:
        out["pairing"] = await pairing_latency(reactor, relay_ports, pairings)
        out["pubsub"] = await pubsub_throughput(reactor, redis_port, pubsub_mb)
        out["pubsub_unbounded"] = await pubsub_throughput(reactor, redis_port, pubsub_mb, window=None)

    def done(result) -> None:
        out["error"] = result
        reactor.callLater(0.1, reactor.stop)

    # Not task.react: it exits the process when done.
    ensureDeferred(main()).addBoth(done)
    reactor.run()
    error = out.pop("error")
    if error is not None:
        raise RuntimeError(f"in-process measurements failed: {error}")
    return out


async def pairing_latency(reactor, ports: list[int], count: int) -> dict:
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet.defer import Deferred, DeferredQueue
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    class Client(WebSocketClientProtocol):
        def __init__(self) -> None:
            super().__init__()
            self.opened: Deferred = Deferred()
            self.queue: DeferredQueue = DeferredQueue()

        def onOpen(self) -> None:
            self.opened.callback(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.queue.put(json.loads(payload))

    async def open_client(port: int) -> Client:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/", protocols=["pluresync.v1"])
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, perMessageCompressionOffers=[])
        client = factory.buildProtocol(None)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await client.opened
        return client

    def send(client: Client, obj: dict) -> None:
        client.sendMessage(json.dumps(obj).encode(), False)

    results = {}
    cases = {"same instance": (0, 0, 0), "cross-instance": (0, 1, 0), "accept on a third instance": (0, 1, 2)}
    for name, (li, ci, ai) in cases.items():
        print(f"  pairing {name} ...", file=sys.stderr, flush=True)
        rdv, peer = os.urandom(32).hex(), os.urandom(32).hex()
        listener = await open_client(ports[li])
        send(listener, {"v": 1, "op": "listen", "rdv": rdv, "peer": peer})
        await listener.queue.get()
        times = []
        closers = []
        for i in range(count + 20):
            connector_socket = await open_client(ports[ci])
            acceptor_socket = await open_client(ports[ai])
            t0 = time.perf_counter()
            send(connector_socket, {"v": 1, "op": "connect", "rdv": rdv, "wait": 10})
            incoming = await listener.queue.get()
            send(acceptor_socket, {"v": 1, "op": "accept", "session": incoming["session"]})
            paired = await connector_socket.queue.get()
            elapsed = time.perf_counter() - t0
            assert paired["op"] == "paired", paired
            await acceptor_socket.queue.get()
            if i >= 20:
                times.append(elapsed * 1e3)
            for c in (connector_socket, acceptor_socket):
                c.sendClose(1000)
                closers.append(c)
        listener.sendClose(1000)
        results[name] = {"median_ms": statistics.median(times), "p99_ms": percentile(times, 0.99), "count": count}
    return results


async def pubsub_throughput(reactor, port: int, megabytes: int, window: int | None = 32) -> dict:
    """
    Redis pub/sub as the byte transport of one stream: 64 KiB messages,
    with at most `window` messages unacknowledged by the subscriber (the
    flow control the relay would have to add: Redis has none, and drops a
    subscriber whose output buffer passes its client-output-buffer-limit).
    """
    import txredisapi
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    print("  Redis pub/sub ...", file=sys.stderr, flush=True)
    chunk = os.urandom(64 << 10)
    total = megabytes * 10**6 // len(chunk)
    state: dict = {"got": 0, "waiter": None}
    done: Deferred = Deferred()

    def progress() -> None:
        waiter, state["waiter"] = state["waiter"], None
        if waiter is not None:
            waiter.callback(None)

    class Sub(txredisapi.SubscriberProtocol):
        def messageReceived(self, pattern, channel, message) -> None:
            state["got"] += 1
            if state["got"] == total:
                state["last"] = time.perf_counter()
                done.callback(None)
            progress()

        def connectionLost(self, why) -> None:
            super().connectionLost(why)
            if not done.called:
                done.errback(RuntimeError(f"Redis dropped the subscriber after {state['got']} messages"))
            progress()

    sub = Sub(charset=None)
    sub.factory = type("F", (), {"stopTrying": lambda self: None, "isLazy": False})()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), sub)
    await sub.whenConnected()
    await sub.subscribe("bench")
    pub = await txredisapi.Connection("127.0.0.1", port, reconnect=False, charset=None)
    start = time.perf_counter()
    sent = 0
    while sent < total and not done.called:
        if window is not None and sent - state["got"] >= window:
            state["waiter"] = Deferred()
            await state["waiter"]
            continue
        pub.publish("bench", chunk)
        sent += 1
        if window is None and sent % 256 == 0:
            await pub.ping()  # let the reactor read (the subscriber too)
    try:
        await done
    except RuntimeError as error:
        await pub.disconnect()
        return {"dropped": str(error), "dropped_mb": state["got"] * len(chunk) / 1e6, "window": window}
    seconds = state["last"] - start
    await pub.disconnect()
    sub.transport.loseConnection()
    return {"mb_s": total * len(chunk) / seconds / 1e6, "bytes": total * len(chunk), "window": window}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="MiB per throughput stream (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each throughput measurement (default 3)")
    p.add_argument("--count", type=int, default=2000, help="timed round trips (default 2000)")
    p.add_argument("--pairings", type=int, default=200, help="timed pairings per case (default 200)")
    p.add_argument("--pubsub", type=int, default=200, help="MB through Redis pub/sub (default 200)")
    p.add_argument("--json", help="also write the raw results to this file")
    args = p.parse_args()
    raise_nofile()
    started = time.monotonic()
    raw: dict = {}
    with tempfile.TemporaryDirectory(prefix="pluresync-cluster-bench-") as tmp:
        scratch = Path(tmp)
        redis, redis_port = start_redis(scratch)
        relays = []
        try:
            secret = scratch / "cluster.secret"
            secret.write_text(os.urandom(32).hex())
            for _ in range(3):
                link = free_port()
                relays.append(
                    pluresync_relay(
                        scratch,
                        [
                            "--redis",
                            f"redis://127.0.0.1:{redis_port}/0",
                            "--cluster-listen",
                            f"tcp:{link}:interface=127.0.0.1",
                            "--cluster-address",
                            f"127.0.0.1:{link}",
                            "--cluster-secret-file",
                            str(secret),
                        ],
                    )
                )
            for relay in relays:
                wait_redis_ok(relay.port)
            keyfile = keygen(scratch)
            r1, r2 = relays[0].port, relays[1].port
            ports = {"same instance": (r1, r1), "cross-instance": (r1, r2)}
            raw["throughput"] = throughput(ports, keyfile, args.size << 20, args.repeat)
            raw["latency"] = round_trips(ports, keyfile, args.count)
            raw.update(in_process([r.port for r in relays], redis_port, args.pairings, args.pubsub))
        finally:
            for relay in relays:
                relay.stop()
            redis.terminate()
            redis.wait(10)

    out = [f"Machine: {machine()}", "", f"Command: `{' '.join([Path(PYTHON).name, *sys.argv])}`", ""]
    out += [
        f"Throughput, {args.size} MiB per stream, `relay:` endpoints (encrypted), median of {args.repeat}:",
        "",
        "| path | MB/s (median) | runs |",
        "|---|---|---|",
    ]
    for name, runs in raw["throughput"].items():
        out.append(f"| {name} | {statistics.median(runs):.0f} | {', '.join(f'{r:.0f}' for r in runs)} |")
    out += [
        "",
        f"Round trips, 64-byte messages, {args.count} timed:",
        "",
        "| path | median µs | p99 µs |",
        "|---|---|---|",
    ]
    for name, r in raw["latency"].items():
        out.append(f"| {name} | {r['median_us']:.0f} | {r['p99_us']:.0f} |")
    out += [
        "",
        f"Pairing (connect → paired, raw protocol), {args.pairings} timed per case:",
        "",
        "| case | median ms | p99 ms |",
        "|---|---|---|",
    ]
    for name, r in raw["pairing"].items():
        out.append(f"| {name} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} |")
    out += [
        "",
        "Redis pub/sub as a byte transport (64 KiB messages, at most 2 MiB unacknowledged, no relay): "
        f"{raw['pubsub']['mb_s']:.0f} MB/s",
        "",
    ]
    unbounded = raw["pubsub_unbounded"]
    if "dropped" in unbounded:
        out += [f"Without that window: {unbounded['dropped']} ({unbounded['dropped_mb']:.0f} MB delivered).", ""]
    else:
        out += [f"Without that window: {unbounded['mb_s']:.0f} MB/s (not dropped).", ""]
    out.append(f"(total {time.monotonic() - started:.0f} s)")
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
