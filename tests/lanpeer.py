"""
A LAN peer for the namespace tests (tests/lanlab.py), one JSON line per event.

  python -m tests.lanpeer listen   accept pipes on a TCP port and advertise it;
                                   take LANPEER_BYTES bytes from the first pipe,
                                   answer their sha256, stop advertising, exit
  python -m tests.lanpeer seek     discover a listener, open a pipe to it,
                                   send LANPEER_BYTES random bytes, check the
                                   sha256 it answers, exit (3: nobody found)
  python -m tests.lanpeer restart  advertise LANPEER_ADVERTS times in a row,
                                   each on a new port, stopping each, exit
  python -m tests.lanpeer observe  a LAN observer: print every mDNS record of
                                   our service type seen on LANPEER_ADDRESS's
                                   network, and every packet, until
                                   LANPEER_ADVERTS advertisements were seen

The LAN key comes as hex in LANPEER_KEY (a test key: real keys stay out of
environments shared with other programs).  Every run is bounded by
LANPEER_LIMIT seconds (SIGALRM, which ends the process whatever it is doing).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import formatEvent, globalLogBeginner
from zope.interface import implementer

from pluresync.direct.lan import SERVICE_TYPE, advertise, discover
from pluresync.direct.race import connect_lan_pipe
from pluresync.interfaces import IPipeReceiver
from pluresync.pipes.tcp import listen_tcp_pipes

CHUNK = 64 * 1024


def say(**event) -> None:
    print(json.dumps(event), flush=True)


@implementer(IPipeReceiver)
class Hasher:
    """Hashes what arrives until C{size} bytes came, then answers the digest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0
        self.hash = hashlib.sha256()
        self.pipe = None
        self.lost: Deferred = Deferred()

    def pipeDataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.hash.update(data)
        if self.received == self.size:
            self.pipe.write(self.hash.hexdigest().encode("ascii"))
            self.pipe.close()

    def pipeLost(self, reason) -> None:
        self.lost.callback([reason])  # in a list: a Failure given to callback() would errback


@implementer(IPipeReceiver)
class Answer:
    """Collects the listener's 64-hex-digit answer."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred = Deferred()

    def pipeDataReceived(self, data: bytes) -> None:
        self.data += data[:64]

    def pipeLost(self, reason) -> None:
        self.lost.callback([reason])  # in a list: a Failure given to callback() would errback


async def listen(key: bytes, size: int) -> int:
    served: Deferred = Deferred()

    def on_pipe(pipe) -> None:
        if served.called:
            pipe.abort()
            return
        receiver = Hasher(size)
        receiver.pipe = pipe.attach(receiver)
        served.callback(receiver)

    port = await listen_tcp_pipes(reactor, on_pipe)
    advertisement = advertise(reactor, port.getHost().port, key)
    await advertisement.ready
    say(event="ready", port=port.getHost().port, addresses=list(advertisement.advert.addresses))
    receiver = await served
    [reason] = await receiver.lost
    say(
        event="served",
        bytes=receiver.received,
        digest=receiver.hash.hexdigest(),
        clean=bool(reason.check(ConnectionDone)),
    )
    began = time.monotonic()
    await advertisement.stop()
    say(event="stopped", seconds=round(time.monotonic() - began, 3))
    await port.stopListening()
    return 0


async def seek(key: bytes, size: int, timeout: float) -> int:
    began = time.monotonic()
    found = await discover(reactor, key, timeout, first=True)
    say(event="found", candidates=[f"{a.host}:{a.port}" for a in found], seconds=round(time.monotonic() - began, 3))
    if not found:
        return 3
    pipe = await connect_lan_pipe(reactor, found)
    answer = Answer()
    pipe.attach(answer)
    data = os.urandom(size)
    for start in range(0, size, CHUNK):
        pipe.write(data[start : start + CHUNK])
    [reason] = await answer.lost
    ok = answer.data.decode("ascii") == hashlib.sha256(data).hexdigest()
    say(event="done", ok=ok, peer=f"{pipe.peer.host}:{pipe.peer.port}", clean=bool(reason.check(ConnectionDone)))
    return 0 if ok else 4


async def restart(key: bytes, count: int) -> int:
    for _ in range(count):
        port = await listen_tcp_pipes(reactor, lambda pipe: pipe.abort())
        advertisement = advertise(reactor, port.getHost().port, key)
        await advertisement.ready
        say(event="ready", port=port.getHost().port, label=advertisement.advert.label)
        await advertisement.stop()
        await port.stopListening()
    return 0


def observe(address: str, count: int, seconds: float) -> int:
    """
    What anyone on the LAN sees: every multicast mDNS packet, taken off the
    wire with a plain socket (no zeroconf state), decoded.
    """
    from zeroconf import DNSIncoming

    group = "224.0.0.251"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", 5353))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(address))
    say(event="observing")
    deadline = time.monotonic() + seconds
    labels: set[str] = set()
    while len(labels) < count and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            packet, sender = sock.recvfrom(9000)
        except TimeoutError:
            break
        say(event="packet", sender=sender[0], hex=packet.hex())
        message = DNSIncoming(packet)
        for record in message.answers():
            entry = {"event": "record", "name": record.name, "ttl": record.ttl, "kind": type(record).__name__}
            if hasattr(record, "alias"):
                entry["alias"] = record.alias
                if record.name == SERVICE_TYPE and record.ttl > 0:
                    labels.add(record.alias)
            if hasattr(record, "server"):
                entry.update(server=record.server, port=record.port)
            if hasattr(record, "text"):
                entry["text"] = record.text.hex()
            if hasattr(record, "address"):
                entry["address"] = (
                    socket.inet_ntoa(record.address) if len(record.address) == 4 else record.address.hex()
                )
            say(**entry)
    sock.close()
    return 0 if len(labels) >= count else 5


def log_lan(event: dict) -> None:
    """Pass pluresync's LAN log lines on as events (e.g. how long closing mDNS blocked)."""
    if event.get("log_namespace", "").startswith("pluresync.direct"):
        say(event="log", level=event["log_level"].name, text=formatEvent(event))


def main() -> None:
    signal.alarm(int(os.environ.get("LANPEER_LIMIT", "60")))
    globalLogBeginner.beginLoggingTo([log_lan], redirectStandardIO=False)
    role = sys.argv[1]
    if role == "observe":
        address = os.environ["LANPEER_ADDRESS"]
        sys.exit(
            observe(
                address, int(os.environ.get("LANPEER_ADVERTS", "1")), float(os.environ.get("LANPEER_TIMEOUT", "10"))
            )
        )
    key = bytes.fromhex(os.environ["LANPEER_KEY"])
    size = int(os.environ.get("LANPEER_BYTES", str(1024 * 1024)))
    timeout = float(os.environ.get("LANPEER_TIMEOUT", "10"))
    code = []

    def run():
        if role == "listen":
            work = listen(key, size)
        elif role == "restart":
            work = restart(key, int(os.environ.get("LANPEER_ADVERTS", "2")))
        else:
            work = seek(key, size, timeout)
        d = Deferred.fromCoroutine(work)

        def done(result):
            if isinstance(result, int):
                code.append(result)
            else:
                say(event="error", error=result.getErrorMessage(), kind=type(result.value).__name__)
                code.append(2)
            reactor.stop()

        d.addBoth(done)

    reactor.callWhenRunning(run)
    reactor.run()
    sys.exit(code[0] if code else 1)


if __name__ == "__main__":
    main()
