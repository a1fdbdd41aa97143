"""
One peer of a lab punch test: run in a namespace by tests/test_natlab.py.

    python -m tests.punchpeer --stun 172.16.0.10

It talks to the test in JSON lines, so the test carries the signaling the
relay will carry in production:

1. It binds one UDP socket, asks the lab's STUN server from it on two ports
   (L{classify_nat}, through a L{StunClient} on that socket), and prints
   C{{"nat", "candidates"}}.
2. It reads C{{"initiator", "key", "peer_nat", "candidates", "timeout",
   "lan_timeout", "mib"}} from stdin (the peer's line 1, and the shared key).
3. It punches (L{HolePunch}) and prints C{{"result": "direct", "peer",
   "seconds", "strategy", "new_socket"}} or C{{"result": "failed",
   "reason", "message", "seconds"}}.
4. After a punch, the initiator sends C{mib} MiB of datagrams over the
   punched socket, the responder acknowledges each, and both print
   C{{"transfer": {"bytes", "sha256", "seconds"}}}.  Then it exits 0.

The socket's owner offers each datagram to the STUN client, then to the
punch, then to the transfer, as the direct endpoint's socket will.  Every
wait is bounded: the STUN queries (C{--stun-seconds}), the stdin line, the
punch (its timeout) and the transfer (C{--transfer-seconds}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
from typing import Any

from twisted.internet import stdio, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Protocol

from pluresync.direct.nat import classify_nat, route_source
from pluresync.direct.punch import HolePunch
from pluresync.direct.signal import Candidate, CandidateKind
from pluresync.direct.stunclient import StunClient
from pluresync.errors import DirectPathError

from .natlab import STUN_PORTS

Address = tuple[str, int]

# The transfer's datagrams: first bytes 0x50-0x53, where QUIC's short headers would be.
DATA, ACK, FIN, FIN_ACK = 0x50, 0x51, 0x52, 0x53
CHUNK = 1200
WINDOW = 64
_SEQ = struct.Struct(">I")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


class Demux(DatagramProtocol):
    """The socket owner's side: each datagram to STUN, the punch, or the transfer, by its first byte."""

    noisy = False

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def datagramReceived(self, datagram: bytes, address: Address) -> None:
        peer = self.peer
        if peer.stun.datagramReceived(datagram, address):
            return
        if peer.punch is not None and peer.punch.datagramReceived(datagram, address):
            return
        if datagram and 0x50 <= datagram[0] <= 0x53 and peer.transfer is not None:
            peer.transfer(datagram, address)


class StdinLine(Protocol):
    """The first line on stdin."""

    def __init__(self) -> None:
        self.buffer = b""
        self.line: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.line.called:
            self.line.callback(self.buffer.split(b"\n", 1)[0])

    def connectionLost(self, reason) -> None:
        if not self.line.called:
            self.line.errback(reason)


class Peer:
    def __init__(self, reactor, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.punch: HolePunch | None = None
        self.transfer = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("0.0.0.0", 0))
        self.stun = StunClient(reactor, self.sock.sendto)
        reactor.adoptDatagramPort(self.sock.fileno(), socket.AF_INET, Demux(self), maxPacketSize=65535)

    async def classify(self) -> tuple[str, list[Candidate]]:
        """This side's NAT class and its candidates, from the lab's STUN server's two ports."""
        servers = [(self.args.stun, port) for port in STUN_PORTS]
        port = self.sock.getsockname()[1]
        report = await classify_nat(
            self.reactor, self.stun, servers, ("0.0.0.0", port), deadline=self.args.stun_seconds
        )
        candidates = [Candidate(CandidateKind.HOST, route_source(self.args.stun), port)]
        if report.mapped is not None:
            candidates.append(Candidate(CandidateKind.REFLEXIVE, report.mapped.host, report.mapped.port))
        return report.nat, candidates


async def run(reactor, args: argparse.Namespace) -> None:
    peer = Peer(reactor, args)
    nat, candidates = await peer.classify()
    emit({"nat": nat, "candidates": [[int(c.kind), c.host, c.port] for c in candidates]})

    stdin = StdinLine()
    stdio.StandardIO(stdin, reactor=reactor)
    stdin.line.addTimeout(args.wait_seconds, reactor)
    told = json.loads(await stdin.line)
    initiator = bool(told["initiator"])
    peer.punch = HolePunch(
        reactor,
        peer.sock,
        bytes.fromhex(told["key"]),
        initiator=initiator,
        local_nat=nat,
        peer_nat=told["peer_nat"],
        candidates=[Candidate(CandidateKind(kind), host, port) for kind, host, port in told["candidates"]],
        timeout=told.get("timeout", 10.0),
        lan_timeout=told.get("lan_timeout", 1.0),
    )
    started = reactor.seconds()
    try:
        path = await peer.punch.start()
    except DirectPathError as e:
        emit({"result": "failed", "reason": e.reason, "message": str(e), "seconds": reactor.seconds() - started})
        return
    emit(
        {
            "result": "direct",
            "peer": list(path.peer),
            "seconds": path.seconds,
            "strategy": path.strategy,
            "new_socket": path.new_socket,
        }
    )
    sock = peer.sock
    if path.new_socket:
        # The winning birthday socket is ours now: read it through the same demultiplexer.
        sock = path.socket
        reactor.adoptDatagramPort(sock.fileno(), socket.AF_INET, Demux(peer), maxPacketSize=65535)
    size = told.get("mib", 0) * 2**20
    if size:
        move = Sender if initiator else Receiver
        transfer = move(reactor, sock, path.peer, size, args.transfer_seconds)
        peer.transfer = transfer.received
        emit({"transfer": await transfer.done})
    peer.punch.stop()


class Sender:
    """Sends C{size} bytes in datagrams, at most L{WINDOW} unacknowledged, resending what is not acknowledged."""

    def __init__(self, reactor, sock: socket.socket, to: Address, size: int, seconds: float) -> None:
        self.reactor = reactor
        self.sock = sock
        self.to = to
        self.payload = random.Random(size).randbytes(size)
        self.count = -(-size // CHUNK)
        self.next = 0
        self.unacked: dict[int, float] = {}  # seq -> when last sent
        self.started = reactor.seconds()
        self.done: Deferred[dict] = Deferred()
        self.fin_tries = 0
        self.timer = task.LoopingCall(self.resend)
        self.timer.clock = reactor
        self.timer.start(0.05, now=False)
        self.deadline = reactor.callLater(seconds, self.finish, "timed out")
        self.fill()

    def chunk(self, seq: int) -> bytes:
        return bytes([DATA]) + _SEQ.pack(seq) + self.payload[seq * CHUNK : (seq + 1) * CHUNK]

    def fill(self) -> None:
        while self.next < self.count and len(self.unacked) < WINDOW:
            self.sock.sendto(self.chunk(self.next), self.to)
            self.unacked[self.next] = self.reactor.seconds()
            self.next += 1

    def received(self, datagram: bytes, address: Address) -> None:
        if datagram[0] == ACK and len(datagram) == 5:
            self.unacked.pop(_SEQ.unpack(datagram[1:])[0], None)
            self.fill()
            if self.next == self.count and not self.unacked and self.fin_tries == 0:
                self.send_fin()
        elif datagram[0] == FIN_ACK:
            self.finish(None)

    def send_fin(self) -> None:
        self.fin_tries += 1
        self.sock.sendto(bytes([FIN]) + _SEQ.pack(self.count), self.to)

    def resend(self) -> None:
        now = self.reactor.seconds()
        for seq, sent in list(self.unacked.items()):
            if now - sent > 0.1:
                self.sock.sendto(self.chunk(seq), self.to)
                self.unacked[seq] = now
        if self.fin_tries >= 50:
            self.finish("the receiver never confirmed the end")
        elif self.fin_tries:
            self.send_fin()

    def finish(self, error: str | None) -> None:
        if self.done.called:
            return
        self.timer.stop()
        if self.deadline.active():
            self.deadline.cancel()
        self.done.callback(
            {
                "bytes": len(self.payload),
                "sha256": hashlib.sha256(self.payload).hexdigest(),
                "seconds": self.reactor.seconds() - self.started,
                "error": error,
            }
        )


class Receiver:
    """Acknowledges every datagram; on FIN with every chunk in, reports what arrived."""

    def __init__(self, reactor, sock: socket.socket, to: Address, size: int, seconds: float) -> None:
        self.reactor = reactor
        self.sock = sock
        self.to = to
        self.size = size
        self.count = -(-size // CHUNK)
        self.chunks: dict[int, bytes] = {}
        self.started = reactor.seconds()
        self.done: Deferred[dict] = Deferred()
        self.deadline = reactor.callLater(seconds, self.finish, "timed out")

    def received(self, datagram: bytes, address: Address) -> None:
        if datagram[0] == DATA and len(datagram) > 5:
            seq = _SEQ.unpack(datagram[1:5])[0]
            if seq < self.count:
                self.chunks.setdefault(seq, datagram[5:])
                self.sock.sendto(bytes([ACK]) + datagram[1:5], address)
        elif datagram[0] == FIN and len(self.chunks) == self.count:
            for _ in range(3):
                self.sock.sendto(bytes([FIN_ACK]), address)
            self.finish(None)

    def finish(self, error: str | None) -> None:
        if self.done.called:
            return
        if self.deadline.active():
            self.deadline.cancel()
        data = b"".join(self.chunks[seq] for seq in sorted(self.chunks))
        self.done.callback(
            {
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "seconds": self.reactor.seconds() - self.started,
                "error": error,
            }
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.punchpeer")
    parser.add_argument("--stun", required=True, help="the lab's STUN server's IP (tests/natlab.py)")
    parser.add_argument("--stun-seconds", type=float, default=1.5, help="how long STUN may take")
    parser.add_argument("--wait-seconds", type=float, default=30.0, help="how long to wait for the peer's line")
    parser.add_argument("--transfer-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
