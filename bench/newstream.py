"""
New-stream latency: how long a C{connect()} to a listener we already have a
session with takes, as a stream of that session (the default) against a new
session per connect (C{reuse=off}: a connector socket, an accept socket and
a handshake through the relay), in the same run.

    python bench/newstream.py [--count N] [--json FILE]

A real relay process (C{twist pluresync-relay} on 127.0.0.1); the listener
(an echo) and the connector run in this process.  Each sample is one
C{connect()} until the client's protocol is connected, then one 64-byte
echo round trip on it, then its clean close (not timed).  Connects are
sequential; the shared session is kept open by a first stream that lives
through the whole run.  Prints a Markdown table; medians and p90 in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from relays import pluresync_relay  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.endpoints import clientFromString, serverFromString  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from pluresync.keys import SyncKey  # noqa: E402


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Timed(Protocol):
    """Fires C{made} when connected, C{echoed} when its 64 bytes came back, C{lost} at the end."""

    def __init__(self) -> None:
        self.made: Deferred = Deferred()
        self.echoed: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self.got = 0

    def connectionMade(self) -> None:
        self.made.callback(time.perf_counter())

    def dataReceived(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= 64 and not self.echoed.called:
            self.echoed.callback(time.perf_counter())

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sample(reactor, endpoint) -> tuple[float, float]:
    """One connect, timed from the endpoint's making (C{endpoint} makes it: from a string, as programs do)."""
    protocol = Timed()
    start = time.perf_counter()
    await endpoint().connect(Factory.forProtocol(lambda: protocol))
    connected = await protocol.made
    protocol.transport.write(b"x" * 64)
    echoed = await protocol.echoed
    protocol.transport.loseConnection()
    await protocol.lost
    return (connected - start) * 1000, (echoed - start) * 1000


async def run(reactor, count: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="newstream-"))
    relay = pluresync_relay(scratch)
    try:
        key = SyncKey.generate().to_text()
        base = f"relay:url=ws\\://127.0.0.1\\:{relay.port}:key={key}"
        port = await serverFromString(reactor, base).listen(Factory.forProtocol(Echo))
        keeper = Timed()
        await clientFromString(reactor, base).connect(Factory.forProtocol(lambda: keeper))
        results: dict[str, dict[str, list[float]]] = {}
        same = clientFromString(reactor, base)
        modes = {
            "stream on the session, a new endpoint from the string": lambda: clientFromString(reactor, base),
            "stream on the session, the same endpoint object": lambda: same,
            "new session (reuse=off), a new endpoint from the string": lambda: clientFromString(
                reactor, f"{base}:reuse=off"
            ),
        }
        for name in modes:
            results[name] = {"connect": [], "connect + echo": []}
        for i in range(count):
            # Alternate the two modes so drift on a noisy machine hits both.
            for name, endpoint in modes.items():
                connect, echo = await sample(reactor, endpoint)
                if i >= 5:  # warm-up
                    results[name]["connect"].append(connect)
                    results[name]["connect + echo"].append(echo)
        keeper.transport.loseConnection()
        await keeper.lost
        await port.stopListening()
        return results
    finally:
        relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    async def go(reactor):
        report(await run(reactor, args.count), args.json)

    task.react(lambda reactor: Deferred.fromCoroutine(go(reactor)))


def report(results: dict, json_path: Path | None) -> None:
    print("| connect() to a listener already connected | connect median ms | p90 | connect + 64 B echo ms | p90 |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        c, e = values["connect"], values["connect + echo"]
        print(
            f"| {name} | {statistics.median(c):.2f} | {percentile(c, 0.9):.2f} "
            f"| {statistics.median(e):.2f} | {percentile(e, 0.9):.2f} |"
        )
    if json_path:
        json_path.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
