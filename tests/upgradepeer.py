"""
A peer for the direct-path lab (tests/test_direct_lab.py, bench/direct.py):
one process behind a lab NAT that connects or listens with an endpoint
string (C{auto:...}), moves bytes with their sha256 checked, and says, one
JSON line per event on stdout, which path carried them and when that
changed.  The test drives it through stdin, so it can look at the relay and
change the network between the phases of one stream.

  python -m tests.upgradepeer listen ENDPOINT [--bytes N]
      serve one connection: hash N bytes, answer their sha256 (64 hex
      digits), then echo whatever comes (round trips), and exit when the
      connector closes.
  python -m tests.upgradepeer connect ENDPOINT [--bytes N] [--holds A,B,..] [--pings K]
      connect, then send N bytes (a streaming producer, so backpressure
      holds); before byte offset A, B, ... it stops, prints a C{hold} event
      and waits for a line C{go} on stdin; then checks the listener's
      sha256, times K round trips of 64 bytes, and closes.
  python -m tests.upgradepeer watch URL
      (in the relay's namespace) for each stdin line, print the relay's
      C{/health} counts and C{/metrics} C{bytes_relayed} as one JSON line.

Events: C{path} (C{path}, C{t}: seconds since connected, C{bytes}: moved
so far) whenever C{transport.getPeer().transport} changes: the session's
own answer to "which path carries this stream"; C{log} for the session's
own move and failure lines; C{cpu} is the process's user+system seconds.
The connector times the last phase (from its last C{go}) to the listener's
digest: C{done}'s C{transfer} and C{cpu}.
Paths are sampled every 20 ms (the session has no public event for a move;
its log line is the other witness).  Every run is bounded by
C{--limit} seconds (SIGALRM ends the process whatever it does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import time

from twisted.internet import reactor, stdio
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import formatEvent, globalLogBeginner
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

CHUNK = 64 * 1024
PING = 64
#: How often the path is sampled.
SAMPLE = 0.02


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def cpu() -> float:
    times = os.times()
    return round(times.user + times.system, 3)


class PathWatch:
    """Samples a transport's path and reports every change (there is no event for it)."""

    def __init__(self, transport, moved) -> None:
        self.transport = transport
        self.moved = moved  # () -> bytes moved so far
        self.began = time.monotonic()
        self.path = None
        self.changes = 0
        self.loop = LoopingCall(self.sample)
        self.loop.start(SAMPLE)

    def sample(self) -> None:
        try:
            path = self.transport.getPeer().transport
        except Exception:  # the transport is gone: its end is reported elsewhere
            return
        if path != self.path:
            self.path = path
            self.changes += 1
            say(event="path", path=path, t=round(time.monotonic() - self.began, 3), bytes=self.moved())

    def stop(self) -> None:
        self.sample()
        if self.loop.running:
            self.loop.stop()


class Receiver(Protocol):
    """The listener's side: hashes C{size} bytes, answers the digest, then echoes."""

    made = 0

    def __init__(self, size: int, done: Deferred) -> None:
        self.size = size
        self.received = 0
        self.hash = hashlib.sha256()
        self.done = done
        self.watch = None
        self.first = None
        self.last = None

    def connectionMade(self) -> None:
        Receiver.made += 1
        say(event="accepted", path=self.transport.getPeer().transport, connections=Receiver.made)
        self.watch = PathWatch(self.transport, lambda: self.received)

    def dataReceived(self, data: bytes) -> None:
        if self.received >= self.size:
            self.transport.write(data)  # round trips
            return
        if self.first is None:
            self.first = (time.monotonic(), cpu())
        take = data[: self.size - self.received]
        self.received += len(take)
        self.hash.update(take)
        if self.received == self.size:
            self.last = (time.monotonic(), cpu())
            self.transport.write(self.hash.hexdigest().encode("ascii"))
            if len(data) > len(take):
                self.transport.write(data[len(take) :])

    def connectionLost(self, reason) -> None:
        if self.watch is not None:
            self.watch.stop()
        self.done.callback((self, reason))


class Commands(LineReceiver):
    """stdin: each line fires the next waiter (C{go})."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self.waiters: list[Deferred] = []
        self.lines: list[str] = []

    def lineReceived(self, line: bytes) -> None:
        text = line.decode().strip()
        if self.waiters:
            self.waiters.pop(0).callback(text)
        else:
            self.lines.append(text)

    def next(self) -> Deferred:
        if self.lines:
            d = Deferred()
            d.callback(self.lines.pop(0))
            return d
        d = Deferred()
        self.waiters.append(d)
        return d

    def connectionLost(self, reason) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback("eof")


@implementer(IPushProducer)
class Sender(Protocol):
    """The connecting side: streams C{size} bytes, stopping at each hold until told to go."""

    def __init__(self, size: int, holds: list[int], commands: Commands, done: Deferred) -> None:
        self.size = size
        self.holds = sorted(holds)
        self.commands = commands
        self.sent = 0
        self.hash = hashlib.sha256()
        self.block = os.urandom(1 << 20)
        self.answer = b""
        self.paused = False
        self.holding = False
        self.call = None
        self.done = done
        self.watch = None
        self.pings: list[float] = []
        self.ping_sent = 0.0
        self.answered: bytes | None = None
        self.waiting: Deferred | None = None
        self.phase_began = None

    def connectionMade(self) -> None:
        self.watch = PathWatch(self.transport, lambda: self.sent)
        self.transport.registerProducer(self, True)

    def start(self) -> None:
        self.phase_began = (time.monotonic(), cpu())
        self.schedule()

    def schedule(self) -> None:
        if not self.paused and not self.holding and self.call is None and self.sent < self.size:
            self.call = reactor.callLater(0, self.send)

    def send(self) -> None:
        self.call = None
        while not self.paused and not self.holding and self.sent < self.size:
            if self.holds and self.sent >= self.holds[0]:
                self.hold(self.holds.pop(0))
                return
            limit = self.holds[0] if self.holds else self.size
            offset = self.sent % len(self.block)
            data = self.block[offset : offset + min(CHUNK, limit - self.sent)]
            # A block that differs each time round, so a lost or doubled
            # block changes the digest.
            data = self.sent.to_bytes(8, "big") + data[8:] if len(data) > 8 else data
            self.hash.update(data)
            self.sent += len(data)
            self.transport.write(data)
        if self.sent >= self.size:
            self.transport.unregisterProducer()
            now = (time.monotonic(), cpu())
            seconds = now[0] - self.phase_began[0]
            say(event="sent", bytes=self.sent, seconds=round(seconds, 3), cpu=round(now[1] - self.phase_began[1], 3))

    def hold(self, offset: int) -> None:
        self.holding = True
        say(event="hold", sent=self.sent, path=self.transport.getPeer().transport)

        def go(_):
            self.holding = False
            self.phase_began = (time.monotonic(), cpu())  # a phase is timed from its go
            self.schedule()

        self.commands.next().addCallback(go)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.schedule()

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if self.answered is None and len(self.answer) >= 64:
            self.answered, self.answer = self.answer[:64], self.answer[64:]
            self.waiting, waiting = None, self.waiting
            waiting.callback(None)
        elif self.answered is not None and self.waiting is not None and len(self.answer) >= PING:
            self.answer = self.answer[PING:]
            self.pings.append(time.monotonic() - self.ping_sent)
            self.waiting, waiting = None, self.waiting
            waiting.callback(None)

    def digest(self) -> Deferred:
        """Fires once the listener's sha256 arrived."""
        self.waiting = Deferred()
        if self.answered is not None:
            self.waiting, waiting = None, self.waiting
            waiting.callback(None)
            return waiting
        return self.waiting

    def ping(self) -> Deferred:
        """One round trip of 64 bytes (the listener echoes)."""
        self.waiting = Deferred()
        self.ping_sent = time.monotonic()
        self.transport.write(b"p" * PING)
        return self.waiting

    def connectionLost(self, reason) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        if self.watch is not None:
            self.watch.stop()
        self.waiting, waiting = None, self.waiting
        if waiting is not None:
            waiting.errback(reason)
        self.done.callback((self, reason))


async def listen(args) -> int:
    served: Deferred = Deferred()
    factory = Factory.forProtocol(lambda: Receiver(args.bytes, served))
    port = await serverFromString(reactor, args.endpoint).listen(factory)
    say(event="listening", transports=getattr(port, "transports", None))
    receiver, reason = await served
    first, last = receiver.first or (0, 0), receiver.last or (0, 0)
    say(
        event="served",
        bytes=receiver.received,
        digest=receiver.hash.hexdigest(),
        path=receiver.watch.path if receiver.watch else None,
        changes=receiver.watch.changes if receiver.watch else 0,
        connections=Receiver.made,
        clean=bool(reason.check(ConnectionDone)),
        seconds=round(last[0] - first[0], 3),
        cpu=round(last[1] - first[1], 3),
    )
    await port.stopListening()
    return 0


async def connect(args, commands: Commands) -> int:
    done: Deferred = Deferred()
    endpoint = clientFromString(reactor, args.endpoint)
    holds = [int(h) for h in args.holds.split(",") if h.strip()] if args.holds else []
    began = time.monotonic()
    sender = await endpoint.connect(Factory.forProtocol(lambda: Sender(args.bytes, holds, commands, done)))
    say(event="connected", path=sender.transport.getPeer().transport, seconds=round(time.monotonic() - began, 3))
    sender.start()
    await sender.digest()
    # From the last go to the listener's digest: every byte delivered and hashed.
    transfer = time.monotonic() - sender.phase_began[0]
    transfer_cpu = cpu() - sender.phase_began[1]
    ok = sender.answered.decode("ascii", "replace") == sender.hash.hexdigest()
    for _ in range(args.pings):
        await sender.ping()
    rtts = sorted(sender.pings)
    say(
        event="done",
        ok=ok,
        bytes=sender.sent,
        path=sender.transport.getPeer().transport,
        changes=sender.watch.changes,
        rtt_ms=round(rtts[len(rtts) // 2] * 1000, 3) if rtts else None,
        transfer=round(transfer, 3),
        cpu=round(transfer_cpu, 3),
        seconds=round(time.monotonic() - began, 3),
    )
    sender.transport.loseConnection()
    _, reason = await done
    say(event="closed", clean=bool(reason.check(ConnectionDone)))
    return 0 if ok else 4


def watch(url: str, commands: Commands) -> Deferred:
    """Answer each stdin line with the relay's counts (run in the relay's namespace)."""
    import urllib.request

    pattern = re.compile(r"^pluresync_relay_bytes_relayed_total (\S+)$", re.M)

    async def run() -> int:
        say(event="watching")
        while True:
            line = await commands.next()
            if line in ("eof", "quit"):
                return 0
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    health = json.loads(response.read())
                with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
                    found = pattern.search(response.read().decode())
            except OSError as e:  # not up yet, or gone: the test decides
                say(event="relay", error=str(e))
                continue
            say(
                event="relay",
                sessions=health.get("sessions"),
                listeners=health.get("listeners"),
                pending=health.get("pending"),
                bytes_relayed=float(found.group(1)) if found else None,
            )

    return Deferred.fromCoroutine(run())


WORDS = re.compile(r"now over|no direct path|direct path ended|gave up")


VERBOSE = os.environ.get("UPGRADEPEER_VERBOSE") == "1"


def log_moves(event: dict) -> None:
    """The session's own lines about moves and failed attempts (no secrets in them); all with UPGRADEPEER_VERBOSE=1."""
    if event.get("log_namespace", "").startswith("pluresync"):
        text = formatEvent(event)
        if VERBOSE or WORDS.search(text):
            say(event="log", text=text, t=round(time.monotonic(), 3))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.upgradepeer")
    parser.add_argument("role", choices=("listen", "connect", "watch"))
    parser.add_argument("endpoint")
    parser.add_argument("--bytes", type=int, default=1 << 20)
    parser.add_argument("--holds", default="")
    parser.add_argument("--pings", type=int, default=0)
    parser.add_argument("--limit", type=int, default=120, help="seconds before the process ends itself")
    args = parser.parse_args(argv)
    signal.alarm(args.limit)
    globalLogBeginner.beginLoggingTo([log_moves], redirectStandardIO=False)
    commands = Commands()
    stdio.StandardIO(commands)
    code = []

    def run():
        if args.role == "listen":
            work = Deferred.fromCoroutine(listen(args))
        elif args.role == "connect":
            work = Deferred.fromCoroutine(connect(args, commands))
        else:
            work = watch(args.endpoint, commands)

        def finished(result):
            if isinstance(result, int):
                code.append(result)
            else:
                say(event="error", error=result.getErrorMessage(), kind=type(result.value).__name__)
                code.append(2)
            reactor.stop()

        work.addBoth(finished)

    reactor.callWhenRunning(run)
    reactor.run()
    sys.exit(code[0] if code else 1)


if __name__ == "__main__":
    main()
