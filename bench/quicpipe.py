"""
The QUIC pipe (pluresync/pipes/quic.py) on loopback: throughput, CPU per
GiB and the bytes it holds, with two processes on 127.0.0.1 (one QUIC
client that writes, one QUIC server that reads), as the two peers of a
direct path would be.

    python bench/quicpipe.py [--size MiB] [--repeat N] [--stall SECONDS]
                             [--window BYTES] [--send-buffer BYTES] [--datagrams N]

Each run moves C{--size} MiB (64 KiB writes from a streaming producer,
then an orderly close) and checks its sha256.  MiB/s counts from the
receiver's first byte to its last; CPU is each process's user+system time
over the same transfer (2 cores for both).  With C{--stall}, the reader
pauses for that long after its first byte, and the run reports what each
side held meanwhile: the reader's undelivered bytes (at most its window,
by the pipe's credit), the writer's unsent backlog (its send buffer), and
each process's peak RSS.

C{--datagrams} also times the two ways to send a datagram from Twisted:
C{udp.Port.write} and the socket's own C{sendto} (which
L{pluresync.pipes.udp.UDPSocket} uses), per datagram of QUIC's size.

Everything listens on 127.0.0.1; each child process has a hard time limit
and is ended by its pid if it outlives it.  Not a test: numbers, on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
CHUNK = 64 * 1024
HARD_LIMIT = 300.0


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(role: str, size: int, stall: float, window: int, send_buffer: int, gso: bool) -> None:
    """One peer: print our port and fingerprint, read the peer's, move the bytes, print the result."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from zope.interface import implementer

    from pluresync.interfaces import IPipeReceiver
    from pluresync.pipes import quic
    from pluresync.pipes.quiccert import QuicCertificate
    from pluresync.pipes.udp import UDPSocket

    socket = UDPSocket(gso=gso)
    port = reactor.listenUDP(0, socket, interface="127.0.0.1", maxPacketSize=65535)
    certificate = QuicCertificate.generate()
    print(json.dumps({"port": port.getHost().port, "fingerprint": certificate.fingerprint.hex()}), flush=True)
    peer = json.loads(sys.stdin.readline())
    address = ("127.0.0.1", peer["port"])
    params = quic.QuicParams(window=window, send_buffer=send_buffer)
    result: dict = {"role": role}

    @implementer(IPipeReceiver)
    class Counter:
        def __init__(self, pipe) -> None:
            self.pipe, self.count, self.digest = pipe, 0, hashlib.sha256()
            self.first = self.last = self.cpu0 = None
            self.ended: Deferred = Deferred()

        def pipeDataReceived(self, data: bytes) -> None:
            if self.first is None:
                self.first, self.cpu0 = time.monotonic(), cpu()
                if stall:
                    self.pipe.pauseReading()
                    reactor.callLater(stall, self.resume)
            self.count += len(data)
            self.digest.update(data)
            if self.count >= size:
                self.last = time.monotonic()

        def resume(self) -> None:
            result["held_while_stalled"] = {"reader_inbox_peak": self.pipe.inbox_peak, "rss_mib": max_rss_mib()}
            self.pipe.resumeReading()

        def pipeLost(self, reason) -> None:
            self.ended.callback(reason.getErrorMessage())

    class Producer:
        def __init__(self, pipe) -> None:
            self.pipe, self.left, self.paused = pipe, size, False
            self.chunk = os.urandom(CHUNK)
            self.digest = hashlib.sha256()

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            self.produce()

        def stopProducing(self) -> None:
            self.left = 0

        def produce(self) -> None:
            while not self.paused and self.left > 0:
                data = self.chunk[: min(CHUNK, self.left)]
                self.left -= len(data)
                self.digest.update(data)
                self.pipe.write(data)
            if self.left <= 0 and self.pipe is not None:
                pipe, self.pipe = self.pipe, None
                pipe.unregisterProducer()
                pipe.close()

    async def run() -> None:
        started = time.monotonic()
        if role == "recv":
            pipe = await quic.accept(
                reactor,
                socket,
                address,
                certificate=certificate,
                peer_fingerprint=bytes.fromhex(peer["fingerprint"]),
                params=params,
            )
            counter = Counter(pipe)
            pipe.attach(counter)
            result["end"] = await counter.ended
            seconds = counter.last - counter.first
            result.update(
                bytes=counter.count,
                sha256=counter.digest.hexdigest(),
                seconds=seconds,
                mib_s=counter.count / MIB / seconds,
                cpu_s=cpu() - counter.cpu0,
                inbox_peak=pipe.inbox_peak,
            )
        else:
            pipe = await quic.connect(
                reactor,
                socket,
                address,
                certificate=certificate,
                peer_fingerprint=bytes.fromhex(peer["fingerprint"]),
                params=params,
            )
            result["handshake_ms"] = (time.monotonic() - started) * 1000
            counter = Counter(pipe)
            pipe.attach(counter)
            producer = Producer(pipe)
            cpu0 = cpu()
            pipe.registerProducer(producer, True)
            producer.produce()
            result["end"] = await counter.ended
            result.update(sha256=producer.digest.hexdigest(), cpu_s=cpu() - cpu0, backlog_peak=pipe.backlog_peak)
        await pipe.finished
        result["max_rss_mib"] = max_rss_mib()

    def done(outcome) -> None:
        if not isinstance(outcome, dict) and outcome is not None and hasattr(outcome, "getErrorMessage"):
            result["error"] = outcome.getErrorMessage()
        print(json.dumps(result), flush=True)
        reactor.stop()

    d = ensureDeferred(run())
    d.addBoth(done)
    reactor.callLater(HARD_LIMIT, lambda: (result.setdefault("error", "hard time limit"), reactor.stop()))
    reactor.run()


def spawn(role: str, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, __file__, "--child", role, "--size", str(args.size), "--stall", str(args.stall)]
    command += ["--window", str(args.window), "--send-buffer", str(args.send_buffer)]
    command += [] if args.gso else ["--no-gso"]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def transfer(args: argparse.Namespace) -> tuple[dict, dict]:
    receiver, sender = spawn("recv", args), spawn("send", args)
    try:
        hellos = [json.loads(p.stdout.readline()) for p in (receiver, sender)]
        receiver.stdin.write(json.dumps(hellos[1]) + "\n")
        sender.stdin.write(json.dumps(hellos[0]) + "\n")
        for p in (receiver, sender):
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=HARD_LIMIT + 30)[0].splitlines()[-1]) for p in (receiver, sender)]
    finally:
        for p in (receiver, sender):
            if p.poll() is None:
                p.kill()
                p.wait()
    return results[0], results[1]


def datagram_paths(count: int) -> dict:
    """
    Microseconds per datagram sent to a sink port by udp.Port.write, by
    socket.sendto, and by UDPSocket.sendDatagrams in batches of 32 (GSO).
    """
    import socket

    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    from pluresync.pipes.udp import UDPSocket

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    target = sink.getsockname()
    port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    payload = os.urandom(1252)
    handle = port.getHandle()
    owner = UDPSocket()
    owner.makeConnection(port)
    batch = [(payload, target)] * 32

    def gso(data, address):
        owner.sendDatagrams(batch)

    times = {}
    for name, send, per_call in (
        ("udp.Port.write", port.write, 1),
        ("socket.sendto", handle.sendto, 1),
        ("UDPSocket.sendDatagrams (GSO, 32 a call)", gso, 32),
    ):
        best = None
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(count // per_call):
                send(payload, target)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
            drain(sink)
        times[name] = best / count * 1e6
    port.stopListening()
    sink.close()
    return times


def drain(sock) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65535)
    except BlockingIOError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MiB per transfer")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stall", type=float, default=0.0, help="seconds the reader pauses after its first byte")
    parser.add_argument("--window", type=int, default=4 * MIB)
    parser.add_argument("--send-buffer", type=int, default=MIB)
    parser.add_argument("--no-gso", dest="gso", action="store_false", help="one sendto per datagram")
    parser.add_argument("--datagrams", type=int, default=0, help="also time the three send paths over N datagrams")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size * MIB, args.stall, args.window, args.send_buffer, args.gso)
        return
    gso = "GSO" if args.gso else "no GSO"
    print(f"QUIC pipe, loopback, {args.size} MiB, window {args.window}, send buffer {args.send_buffer}, {gso}")
    if args.stall:
        print(f"the reader stalls {args.stall:g} s after its first byte")
    print()
    print(
        "| run | MiB/s | CPU s/GiB writer | CPU s/GiB reader | reader inbox peak | writer backlog peak | RSS MiB w/r |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in range(1, args.repeat + 1):
        received, sent = transfer(args)
        if "error" in received or "error" in sent or received.get("sha256") != sent.get("sha256"):
            print(f"| {run} | failed: {received.get('error') or sent.get('error') or 'sha256 differs'} |")
            continue
        gib = received["bytes"] / 1024 / MIB
        print(
            f"| {run} | {received['mib_s']:.1f} | {sent['cpu_s'] / gib:.2f} | {received['cpu_s'] / gib:.2f} "
            f"| {received['inbox_peak']} | {sent['backlog_peak']} "
            f"| {sent['max_rss_mib']:.0f}/{received['max_rss_mib']:.0f} |"
        )
        if "held_while_stalled" in received:
            held = received["held_while_stalled"]
            inbox, rss = held["reader_inbox_peak"], held["rss_mib"]
            print(f"|   | while stalled: inbox peak {inbox}, reader RSS {rss:.0f} MiB | | | | | |")
    if args.datagrams:
        print()
        for name, micros in datagram_paths(args.datagrams).items():
            print(f"{name}: {micros:.2f} µs per 1252-byte datagram")


if __name__ == "__main__":
    main()
