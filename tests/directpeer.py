"""
A peer for the direct-path namespace tests (tests/lanlab.py), one JSON line per event.

  python -m tests.directpeer listen ENDPOINT    serve one connection on a server
                                                endpoint string: hash DIRECTPEER_BYTES
                                                bytes, answer their sha256, close, exit
  python -m tests.directpeer connect ENDPOINT   connect with a client endpoint string,
                                                send DIRECTPEER_BYTES random bytes (a
                                                producer, so backpressure holds), check
                                                the sha256 the listener answers, exit

Each reports which path carried the connection (C{getPeer().transport}) and
how long connecting took.  Every run is bounded by DIRECTPEER_LIMIT seconds
(SIGALRM, which ends the process whatever it is doing).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogBeginner
from zope.interface import implementer

CHUNK = 64 * 1024


def say(**event) -> None:
    print(json.dumps(event), flush=True)


class Hasher(Protocol):
    """The listener's side: hashes C{size} bytes, answers the digest, closes."""

    def __init__(self, size: int, done: Deferred) -> None:
        self.size = size
        self.received = 0
        self.hash = hashlib.sha256()
        self.done = done

    def connectionMade(self) -> None:
        say(event="accepted", path=self.transport.getPeer().transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.hash.update(data)
        if self.received == self.size:
            self.transport.write(self.hash.hexdigest().encode("ascii"))
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.done.callback((self, reason))


@implementer(IPushProducer)
class Sender(Protocol):
    """The connecting side: streams C{size} random bytes as fast as the connection takes them."""

    def __init__(self, size: int, done: Deferred) -> None:
        self.size = size
        self.sent = 0
        self.hash = hashlib.sha256()
        self.answer = b""
        self.paused = False
        self.call = None
        self.done = done

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.schedule()

    def schedule(self) -> None:
        if not self.paused and self.call is None and self.sent < self.size:
            self.call = reactor.callLater(0, self.send)

    def send(self) -> None:
        self.call = None
        while not self.paused and self.sent < self.size:
            data = os.urandom(min(CHUNK, self.size - self.sent))
            self.hash.update(data)
            self.sent += len(data)
            self.transport.write(data)
        if self.sent >= self.size:
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.schedule()

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if len(self.answer) >= 64:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.done.callback((self, reason))


async def listen(description: str, size: int) -> int:
    served: Deferred = Deferred()
    port = await serverFromString(reactor, description).listen(Factory.forProtocol(lambda: Hasher(size, served)))
    say(event="listening", transports=getattr(port, "transports", None))
    hasher, reason = await served
    say(
        event="served",
        bytes=hasher.received,
        digest=hasher.hash.hexdigest(),
        path=hasher.transport.getPeer().transport,
        clean=bool(reason.check(ConnectionDone)),
    )
    await port.stopListening()
    return 0


async def connect(description: str, size: int) -> int:
    done: Deferred = Deferred()
    endpoint = clientFromString(reactor, description)
    began = time.monotonic()
    sender = await endpoint.connect(Factory.forProtocol(lambda: Sender(size, done)))
    connected = time.monotonic() - began
    say(event="connected", path=sender.transport.getPeer().transport, seconds=round(connected, 3))
    sender, reason = await done
    ok = sender.answer[:64].decode("ascii", "replace") == sender.hash.hexdigest()
    say(
        event="done",
        ok=ok,
        bytes=sender.sent,
        seconds=round(time.monotonic() - began, 3),
        clean=bool(reason.check(ConnectionDone)),
    )
    return 0 if ok else 4


def log_pluresync(event: dict) -> None:
    """pluresync's own log lines, as events (which path won, what failed)."""
    if event.get("log_namespace", "").startswith("pluresync") and event["log_level"].name != "debug":
        say(event="log", level=event["log_level"].name, text=formatEvent(event))


def main() -> None:
    signal.alarm(int(os.environ.get("DIRECTPEER_LIMIT", "60")))
    globalLogBeginner.beginLoggingTo([log_pluresync], redirectStandardIO=False)
    role, description = sys.argv[1], sys.argv[2]
    size = int(os.environ.get("DIRECTPEER_BYTES", str(1 << 20)))
    code = []

    def run():
        work = listen(description, size) if role == "listen" else connect(description, size)

        def finished(result):
            if isinstance(result, int):
                code.append(result)
            else:
                say(event="error", error=result.getErrorMessage(), kind=type(result.value).__name__)
                code.append(2)
            reactor.stop()

        Deferred.fromCoroutine(work).addBoth(finished)

    reactor.callWhenRunning(run)
    reactor.run()
    sys.exit(code[0] if code else 1)


if __name__ == "__main__":
    main()
