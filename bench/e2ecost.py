"""
What pluresync's end-to-end layer costs per byte, without sockets, relay or
WebSocket: one stream of --size MiB in 64 KiB writes from a streaming
producer, sealed by one peer and opened by the other, both in this process,
over an in-memory pipe pair (bytes move when the loop pumps them, acks and
credit go back the same way).  Since wire v2 that is the session layer
(numbering, retransmit queue, acks, credit) over a link; before it, the
v1 SecureChannel.

    .venv/bin/python bench/e2ecost.py [--size MiB] [--repeat N] [--chunk BYTES] [--profile FILE]
    .venv/bin/python bench/e2ecost.py --idle N     # RSS per idle connected pair instead
    .venv/bin/python bench/e2ecost.py --pingpong N # CPU per 64-byte round trip instead
    PLURESYNC_REPO=/tmp/before .venv/bin/python bench/e2ecost.py ...   # another checkout's code

It prints the CPU time of the process (time.process_time: both peers, so
not slowed by other processes on the machine, unlike a wall-clock rate) per
GB moved, the pipe writes (WebSocket messages they would become) and bytes
on the pipe per 64 KiB write, and the sender's retransmit peak; median and
all runs.  With --profile it writes a cProfile of one more run (the shares
of the session layer's functions; cProfile inflates Python calls against C).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from zope.interface import implementer

REPO = Path(__file__).resolve().parent.parent
CODE = Path(os.environ.get("PLURESYNC_REPO", REPO)).resolve()
sys.path.insert(0, str(CODE))

from pluresync.keys import PeerIdentity, SyncKey  # noqa: E402

try:  # wire v2: a link per pipe, a session above it
    from pluresync.secure.establish import secure_link
    from pluresync.session import attach as session_attach
    from pluresync.session.params import SessionParams
    from pluresync.session.session import new_hello

    V2 = True
except ImportError:  # wire v1: one SecureChannel per pipe
    from pluresync.secure.establish import attach as channel_attach
    from pluresync.secure.establish import secure_pipe

    V2 = False


class Pipe:
    """One end of an in-memory pipe (an C{IPipe}): writes wait for L{pump}."""

    def __init__(self) -> None:
        self.receiver = None
        self.outgoing: list[bytes] = []
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.outgoing.append(data)
        self.writes += 1
        self.bytes += len(data)

    def pauseReading(self) -> None:
        pass

    def resumeReading(self) -> None:
        pass

    def registerProducer(self, producer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def pump(a: Pipe, b: Pipe) -> bool:
    """Deliver what each side wrote, one pipe write per call (as WebSocket messages arrive)."""
    moved = False
    for src, dst in ((a, b), (b, a)):
        while src.outgoing:
            data = src.outgoing.pop(0)
            dst.receiver.pipeDataReceived(data)
            moved = True
    return moved


@implementer(IPushProducer)
class Sender(Protocol):
    def __init__(self, size: int, chunk: int) -> None:
        self.size, self.chunk, self.sent, self.paused = size, chunk, 0, False
        self.data = os.urandom(chunk)

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    def produce(self) -> None:
        """One turn: write until paused or done (the loop calls it, as the reactor would resume us)."""
        while not self.paused and self.sent < self.size:
            self.transport.write(self.data)
            self.sent += self.chunk
            if self.sent % (4 * self.chunk) == 0:
                break  # let the pipe move: a socket would fill


class Receiver(Protocol):
    received = 0
    echo = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.echo:
            self.transport.write(data)


class Pinger(Sender):
    """Writes one message, waits for it to come back (L{pingpong} drives it)."""

    got = 0

    def dataReceived(self, data: bytes) -> None:
        self.got += len(data)


def pingpong(count: int, msg: int = 64) -> dict:
    """CPU per round trip of a C{msg}-byte ping-pong through both ends, and pipe writes (messages) per round trip."""
    clock = Clock()
    pinger, echoer = Pinger(0, msg), Receiver()
    echoer.echo = True
    a, b = connect(clock, pinger, echoer)
    data = os.urandom(msg)
    for _ in range(200):  # warm-up
        pinger.transport.write(data)
        while pump(a, b):
            pass
    a.writes = b.writes = 0
    started = time.process_time()
    for i in range(count):
        pinger.transport.write(data)
        while pump(a, b):
            pass
        if i % 50 == 49:
            clock.advance(0.01)  # ~50 round trips per 10 ms (a 200 us round trip): delayed acks fall due
    cpu = time.process_time() - started
    return {"count": count, "cpu_us_per_rt": cpu / count * 1e6, "pipe_writes_per_rt": (a.writes + b.writes) / count}


_IDS: dict = {}
_TABLES: dict = {}
_NEXT: dict = {}


def connect(clock, sender: Sender, receiver: Receiver) -> tuple[Pipe, Pipe]:
    """Two peers over a pipe pair: handshake, session (or channel), protocols connected."""
    if not _IDS:  # one key and two identities for every pair, as for one listener and one client
        _IDS.update(
            topic=SyncKey.generate().topic("bench"), left=PeerIdentity.generate(), right=PeerIdentity.generate()
        )
    topic, left_id, right_id = _IDS["topic"], _IDS["left"], _IDS["right"]
    a, b = Pipe(), Pipe()

    def bind(pipe):
        def bound(receiver):
            pipe.receiver = receiver
            return pipe

        return bound

    left: list = []
    if V2:
        params = SessionParams()
        table = _TABLES.get(clock)
        if table is None:  # one listener's session table per clock (reactor), as one per listening port
            builds = _NEXT[clock] = []
            table = _TABLES[clock] = session_attach.SessionTable(
                clock, Factory.forProtocol(lambda: builds.pop()), params, right_id.peer_id
            )
        _NEXT[clock].append(receiver)
        secure_link(
            bind(b), initiator=False, name="mem", identity=right_id, topic=topic, resolver=table.resolve
        ).addCallback(table.accept)
        secure_link(
            bind(a), initiator=True, name="mem", identity=left_id, topic=topic, hello=lambda: new_hello(params)
        ).addBoth(left.append)
        while not left and pump(a, b):
            pass
        session_attach.connect(
            left[0], Factory.forProtocol(lambda: sender), clock=clock, params=params, local_id="l", reconnect=None
        )
    else:
        secure_pipe(bind(b), initiator=False, name="mem", identity=right_id, topic=topic).addCallback(
            channel_attach, Factory.forProtocol(lambda: receiver)
        )
        secure_pipe(bind(a), initiator=True, name="mem", identity=left_id, topic=topic).addBoth(left.append)
        while not left and pump(a, b):
            pass
        channel_attach(left[0], Factory.forProtocol(lambda: sender))
    pump(a, b)
    assert sender.transport is not None and receiver.transport is not None, left
    return a, b


def one_run(size: int, chunk: int) -> dict:
    clock = Clock()
    sender, receiver = Sender(size, chunk), Receiver()
    a, b = connect(clock, sender, receiver)
    a.writes = a.bytes = b.writes = 0
    started = time.process_time()
    turns = 0
    while receiver.received < size:
        sender.produce()
        if not pump(a, b):
            clock.advance(0.01)  # a delayed ack is due
        turns += 1
        if turns > 100 * size // chunk + 1000:
            raise RuntimeError(f"stuck at {receiver.received} of {size} bytes")
    cpu = time.process_time() - started
    writes = sender.sent // chunk
    stats = sender.transport.stats() if hasattr(sender.transport, "stats") else None
    return {
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / (size / 1e9),
        "pipe_writes_per_write": a.writes / writes,
        "pipe_bytes_per_write": a.bytes / writes,
        "acks_per_mib": b.writes / (size / (1 << 20)),
        "retransmit_peak": stats["retransmit_peak"] if stats else None,
    }


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def idle(pairs: int) -> dict:
    """RSS per idle connected pair (both ends in this process; each its own clock, pipes and protocols)."""
    clock = Clock()
    held = []
    for _ in range(10):  # warm-up: first-use allocations
        sender, receiver = Sender(0, 64), Receiver()
        held.append((sender, receiver, connect(clock, sender, receiver)))
    gc.collect()
    before = rss_kib()
    for _ in range(pairs):
        sender, receiver = Sender(0, 64), Receiver()
        held.append((sender, receiver, connect(clock, sender, receiver)))
    gc.collect()
    after = rss_kib()
    return {"pairs": pairs, "rss_before_kib": before, "rss_after_kib": after, "kib_per_pair": (after - before) / pairs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="MiB per run (default 256)")
    p.add_argument("--chunk", type=int, default=64 << 10, help="bytes per sender write (default 65536)")
    p.add_argument("--repeat", type=int, default=5, help="runs (default 5)")
    p.add_argument("--pingpong", type=int, metavar="N", help="instead: CPU per round trip of N 64-byte round trips")
    p.add_argument("--idle", type=int, metavar="N", help="instead: RSS per idle connected pair, over N pairs")
    p.add_argument("--profile", help="also profile one run with cProfile, written to this file")
    p.add_argument("--json", help="also write the runs to this file")
    args = p.parse_args()
    if args.idle:
        result = idle(args.idle)
        print(
            f"{'v2 (session layer)' if V2 else 'v1 (SecureChannel)'} from {CODE}: {args.idle} idle pairs, both ends "
            f"in one process: {result['kib_per_pair']:.2f} KiB per pair (VmRSS {result['rss_before_kib']} -> "
            f"{result['rss_after_kib']} KiB)"
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"v2": V2, "code": str(CODE), "idle": result}, indent=1))
        return
    if args.pingpong:
        pingpong(2000)  # warm-up
        runs = [pingpong(args.pingpong) for _ in range(args.repeat)]
        cpu = [r["cpu_us_per_rt"] for r in runs]
        print(
            f"{'v2 (session layer)' if V2 else 'v1 (SecureChannel)'} from {CODE}: {args.pingpong} 64-byte round "
            f"trips, {args.repeat} runs; CPU us per round trip (both ends): {statistics.median(cpu):.2f} (runs "
            f"{', '.join(f'{c:.2f}' for c in cpu)}); pipe writes per round trip {runs[0]['pipe_writes_per_rt']:.3f}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"v2": V2, "code": str(CODE), "pingpong": runs}, indent=1))
        return
    size = args.size << 20
    one_run(8 << 20, args.chunk)  # warm-up
    runs = [one_run(size, args.chunk) for _ in range(args.repeat)]
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        one_run(size, args.chunk)
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu = [r["cpu_s_per_gb"] for r in runs]
    first = runs[0]
    peak = first["retransmit_peak"]
    print(
        f"{'v2 (session layer)' if V2 else 'v1 (SecureChannel)'} from {CODE}: {args.size} MiB in "
        f"{args.chunk} B writes, {args.repeat} runs; CPU s per GB (sender + receiver): "
        f"{statistics.median(cpu):.3f} (median; runs {', '.join(f'{c:.3f}' for c in cpu)}); "
        f"pipe writes per write {first['pipe_writes_per_write']:.2f}, pipe bytes per write "
        f"{first['pipe_bytes_per_write']:.0f}; receiver's pipe writes per MiB {first['acks_per_mib']:.1f}; "
        + (f"retransmit peak {peak / 1024:.0f} KiB" if peak is not None else "no retransmit buffer")
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"v2": V2, "code": str(CODE), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
