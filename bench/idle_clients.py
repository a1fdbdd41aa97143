"""
A process holding many idle, paired WebSocket pairs open on a relay, for the
relay-memory benchmark.  Nothing flows after pairing.

  --relay pluresync  raw relay protocol v1 (docs/protocol.md): one listener
                     control socket (listen -> ready); per pair a connector
                     (connect -> waits) and an accept socket (incoming ->
                     accept -> both get paired).  No end-to-end handshake:
                     it does not change what the relay holds.
  --relay transit    per pair two WebSockets sending the same
                     `please relay <token> for side <side>` handshake; both
                     get `ok`.

At most --window pairs are being set up at a time (below the relay's 64
pending connectors per rendezvous id).  Prints `PAIRED <n>` when all pairs
are up, then holds them until stdin closes (or --hold seconds pass), then
exits without closing them one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor, stdio
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol

SUBPROTOCOL = "pluresync.v1"


class Counter:
    def __init__(self, total: int, window: int, start_one) -> None:
        self.total, self.window, self.start_one = total, window, start_one
        self.started = 0
        self.sides_paired = 0
        self.pairs = 0
        self.failures = 0

    def fill(self) -> None:
        while self.started < self.total and self.started - self.pairs < self.window:
            self.started += 1
            self.start_one(self.started)

    def side_paired(self) -> None:
        self.sides_paired += 1
        if self.sides_paired % 2 == 0:
            self.pairs += 1
            if self.pairs == self.total:
                print(f"PAIRED {self.pairs}", flush=True)
            else:
                self.fill()

    def failed(self, why: str) -> None:
        self.failures += 1
        print(f"FAILED {why}", file=sys.stderr, flush=True)
        if self.failures > 20:
            print("FAILED too many failures", flush=True)
            reactor.stop()


class RelayV1Client(WebSocketClientProtocol):
    """One pluresync relay socket: sends its control message, reacts to answers."""

    def onOpen(self) -> None:
        self.sendMessage(json.dumps(self.factory.hello).encode(), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        op = message.get("op")
        if op == "incoming":
            accept(self.factory.bench, message["session"])
        elif op == "paired":
            self.factory.bench.side_paired()
        elif op == "error":
            self.factory.bench.failed(f"{message.get('code')}: {message.get('message')}")

    def onClose(self, wasClean, code, reason) -> None:
        if code not in (None, 1000, 1001, 1006):
            self.factory.bench.failed(f"closed {code} {reason}")


class TransitClient(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.sendMessage(self.factory.hello, isBinary=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload == b"ok\n":
            self.factory.bench.side_paired()
        else:
            self.factory.bench.failed(repr(payload[:40]))


#: The local address the sockets are bound to (--bind): one 127.x address per
#: process keeps 40,000 sockets clear of the ephemeral port range's ~28,000
#: ports per source address.
BIND: str | None = None


def open_socket(bench: Counter, protocol, hello, port: int, protocols=None) -> None:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/", protocols=protocols)
    factory.protocol = protocol
    factory.setProtocolOptions(
        autoPingInterval=0, openHandshakeTimeout=60, perMessageCompressionOffers=[], tcpNoDelay=True
    )
    factory.hello = hello
    factory.bench = bench
    bind = (BIND, 0) if BIND else None
    d = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=60, bindAddress=bind).connect(factory)
    d.addErrback(lambda f: bench.failed(f.getErrorMessage()))


def accept(bench: Counter, session: str) -> None:
    open_socket(bench, RelayV1Client, {"v": 1, "op": "accept", "session": session}, bench.port, [SUBPROTOCOL])


class StdinWatch(Protocol):
    def connectionLost(self, reason) -> None:
        if reactor.running:
            reactor.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relay", choices=["pluresync", "transit"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pairs", type=int, required=True)
    p.add_argument("--id", type=int, default=0, help="distinguishes the ids of concurrent processes")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--hold", type=float, default=600.0)
    p.add_argument("--bind", help="local address of the sockets (any 127.x address; default: the kernel's choice)")
    args = p.parse_args()
    global BIND
    BIND = args.bind
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * args.pairs + 100:
        sys.exit(f"fd hard limit {hard} is too low for {args.pairs} pairs")

    nonce = os.urandom(8).hex()
    rdv = f"{args.id:08x}{nonce}".ljust(64, "0")

    if args.relay == "pluresync":

        def start_one(i: int) -> None:
            open_socket(
                bench, RelayV1Client, {"v": 1, "op": "connect", "rdv": rdv, "wait": 60}, args.port, [SUBPROTOCOL]
            )
    else:

        def start_one(i: int) -> None:
            token = f"{args.id:08x}{nonce}{i:016x}".ljust(64, "0")
            for side in ("a" * 16, "b" * 16):
                hello = f"please relay {token} for side {side}\n".encode()
                open_socket(bench, TransitClient, hello, args.port)

    bench = Counter(args.pairs, args.window, start_one)
    bench.port = args.port
    if args.relay == "pluresync":
        # The listener's control socket; its `ready` does not count as a side.
        listener = {"v": 1, "op": "listen", "rdv": rdv, "peer": "11" * 32}
        open_socket(bench, RelayV1Client, listener, args.port, [SUBPROTOCOL])
        reactor.callLater(0.5, bench.fill)
    else:
        bench.fill()
    stdio.StandardIO(StdinWatch())
    reactor.callLater(args.hold, reactor.stop)
    reactor.run()
    os._exit(0)


if __name__ == "__main__":
    main()
