"""
A program with a connection pool through `pluresync forward` / `expose`:
`redis-benchmark` GET requests per second at `-c 1` and `-c 50`, and what
the relay holds for 50 concurrent forwarded connections, in one run:

 - `twist portforward` straight to redis (the plain-TCP baseline);
 - `forward` with its default: every connection a stream of one session;
 - `forward` with `reuse=off`: a session (two relay sockets, a handshake)
   per connection, as before streams.

    python bench/forwardpool.py [--requests N] [--rounds R]

Needs redis-server and redis-benchmark (Debian redis-server, redis-tools).
Everything on 127.0.0.1: a relay process, redis-server, one `expose`, two
`forward`s, `twist portforward`; the configurations alternate over R
rounds and the median of each is printed (a Markdown table on stdout).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relays import PYTHON, child_env, free_port, pluresync_relay, portforward, rss_kib, wait_for_port  # noqa: E402


def start(args: list[str], scratch: Path, name: str, port: int | None = None, home: str | None = None):
    env = child_env()
    if home:
        env["PLURESYNC_HOME"] = str(scratch / home)
    log = open(scratch / f"{name}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(scratch))
    if port is not None:
        wait_for_port(port, proc)
    return proc


def benchmark(port: int, clients: int, requests: int) -> float:
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(requests),
         "-t", "get", "--csv"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    for line in out.splitlines():
        fields = [f.strip('"') for f in line.split(",")]
        if fields[0] == "GET":
            return float(fields[1])
    raise RuntimeError(f"no GET line in {out!r}")


def health(relay_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay_port}/health", timeout=5) as response:
        return json.loads(response.read())


def settle(relay_port: int, seconds: float = 15.0) -> None:
    """Wait until the relay holds only registrations and the forward's idle session (closes take a moment)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and health(relay_port)["connections"] > 3:
        time.sleep(0.1)


def hold(port: int, count: int) -> list[socket.socket]:
    """C{count} connections through a forward, each answered (so each is open end to end)."""
    held = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"PING\r\n")
        if not s.recv(64).startswith(b"+PONG"):
            raise RuntimeError("no PONG through the forward")
        held.append(s)
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for program in ("redis-server", "redis-benchmark"):
        if shutil.which(program) is None:
            sys.exit(f"needs {program} (Debian: redis-server, redis-tools)")
    scratch = Path(tempfile.mkdtemp(prefix="forwardpool-"))
    procs = []
    relay = pluresync_relay(scratch)
    try:
        redis_port = free_port()
        procs.append(start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no"], scratch, "redis", redis_port))
        key = scratch / "key"
        subprocess.run([PYTHON, "-m", "pluresync", "keygen", "--out", str(key)], env=child_env(), check=True,
                       capture_output=True)
        endpoint = f"relay:url=ws\\://127.0.0.1\\:{relay.port}:keyfile={key}"
        procs.append(start([PYTHON, "-m", "pluresync", "expose", "--to", f"tcp:127.0.0.1:{redis_port}", endpoint],
                           scratch, "expose", home="home-expose"))
        time.sleep(2)  # the listener registers
        shared, off = free_port(), free_port()
        procs.append(start([PYTHON, "-m", "pluresync", "forward", "--listen", f"tcp:{shared}:interface=127.0.0.1",
                            endpoint], scratch, "forward", shared, home="home-forward"))
        procs.append(start([PYTHON, "-m", "pluresync", "forward", "--listen", f"tcp:{off}:interface=127.0.0.1",
                            endpoint + ":reuse=off"], scratch, "forward-off", off, home="home-forward-off"))
        plain = portforward(redis_port, scratch)
        configs = {"twist portforward": plain.port, "forward (streams of one session)": shared,
                   "forward, reuse=off (a session per connection)": off}
        results: dict[str, dict[int, list[float]]] = {name: {1: [], 50: []} for name in configs}
        for round_ in range(args.rounds):
            for clients in (1, 50):
                for name, port in configs.items():
                    rps = benchmark(port, clients, args.requests if clients == 50 else args.requests // 4)
                    results[name][clients].append(rps)
                    print(f"round {round_ + 1}: {name} -c {clients}: {rps:.0f}/s", file=sys.stderr)
        holding = {}
        for name, port in list(configs.items())[1:]:
            settle(relay.port)
            before, rss_before = health(relay.port), rss_kib(relay.pid)
            held = hold(port, 50)
            time.sleep(0.5)
            during = health(relay.port)
            holding[name] = (during["connections"], during["sessions"], rss_kib(relay.pid) - rss_before, before)
            for s in held:
                s.close()
        plain.stop()
        base1 = statistics.median(results["twist portforward"][1])
        base50 = statistics.median(results["twist portforward"][50])
        print("| redis-benchmark GET through | -c 1 req/s | ÷ portforward | -c 50 req/s | ÷ portforward |")
        print("|---|---|---|---|---|")
        for name in configs:
            c1, c50 = statistics.median(results[name][1]), statistics.median(results[name][50])
            print(f"| {name} | {c1:,.0f} | {c1 / base1:.2f}x | {c50:,.0f} | {c50 / base50:.2f}x |")
        print()
        print("| 50 concurrent forwarded connections | relay sockets | relay pairs | relay RSS growth (KiB) |")
        print("|---|---|---|---|")
        for name, (sockets, pairs, rss, before) in holding.items():
            print(f"| {name} | {sockets} (idle: {before['connections']}) | {pairs} | {rss:,} |")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        relay.stop()


if __name__ == "__main__":
    main()
