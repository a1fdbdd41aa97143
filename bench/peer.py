"""
One benchmark peer, run as its own process: the run starts a receiving peer
and a sending peer (two processes, so the two cores are used as two machines
would use them), and the relay under test is a third process.

Roles:
  recv  count --size bytes, then report when the last one arrived
  send  write --size bytes in --chunk byte writes from a streaming producer
        (registerProducer/pauseProducing/resumeProducing: at most a socket
        buffer is ever queued), then close
  echo  write back whatever arrives
  ping  --warmup + --count round trips of --msg bytes, each timed

Transports:
  tcp        recv/echo listen on 127.0.0.1 (port 0); send/ping connect to
             --port (the listener itself, or a `twist portforward` in front)
  transit    both ends connect to the transit relay's WebSocket at --port
             with the same --token and their own side
  pluresync  recv/echo listen with serverFromString("relay:url=..."), send/ping
             connect with clientFromString(...) (encrypted end to end)

A listening peer prints `READY <port>` once it listens; every peer prints one
`RESULT <json>` line at the end.  Times are time.monotonic() (CLOCK_MONOTONIC,
shared by all processes of the machine), so the run computes a transfer's
duration from the sender's start to the receiver's last byte.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

RESULT: dict = {}


def finish(**values) -> None:
    RESULT.update(values)
    if reactor.running:
        reactor.callLater(0.05, reactor.stop)


def nodelay(transport) -> None:
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        setter(True)


class Sink(Protocol):
    size = 0

    def connectionMade(self) -> None:
        nodelay(self.transport)
        self.got = 0
        self.first = None

    def dataReceived(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.monotonic()
            self.cpu_first = time.process_time()
        self.got += len(data)
        if self.got >= self.size:
            end = time.monotonic()
            finish(
                received=self.got,
                first_byte=self.first,
                last_byte=end,
                transfer_cpu_s=time.process_time() - self.cpu_first,
            )
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        # A connection that brought nothing is a port probe (the run's check
        # that `twist portforward` listens connects through it): ignore it.
        if 0 < self.got < self.size:
            finish(received=self.got, error=f"{reason.value} after {self.got} of {self.size} bytes")


@implementer(IPushProducer)
class Source(Protocol):
    size = 0
    chunk = b""

    def connectionMade(self) -> None:
        nodelay(self.transport)
        self.sent = 0
        self.paused = False
        self.done = False
        self.start = time.monotonic()
        self.cpu_start = time.process_time()
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk, size, write = self.chunk, self.size, self.transport.write
        while not self.paused and self.sent < size:
            n = min(len(chunk), size - self.sent)
            write(chunk if n == len(chunk) else chunk[:n])
            self.sent += n
        if self.sent >= size and not self.done:
            self.done = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.paused = True

    def connectionLost(self, reason) -> None:
        finish(
            sent=self.sent,
            start=self.start,
            closed=time.monotonic(),
            transfer_cpu_s=time.process_time() - self.cpu_start,
        )


class Echo(Protocol):
    def connectionMade(self) -> None:
        nodelay(self.transport)
        self.echoed = 0

    def dataReceived(self, data: bytes) -> None:
        self.echoed += len(data)
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self.echoed:  # not a port probe
            finish(echoed=self.echoed)


class Ping(Protocol):
    msg = b""
    count = 0
    warmup = 0

    def connectionMade(self) -> None:
        nodelay(self.transport)
        self.rtts: list[int] = []
        self.pending = 0
        self.round = 0
        self._send()

    def _send(self) -> None:
        self.pending = len(self.msg)
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.msg)

    def dataReceived(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending > 0:
            return
        rtt = time.perf_counter_ns() - self.t0
        self.round += 1
        if self.round > self.warmup:
            self.rtts.append(rtt)
        if self.round < self.warmup + self.count:
            self._send()
        else:
            finish(rtts_ns=self.rtts)
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if len(self.rtts) < self.count:
            finish(rtts_ns=self.rtts, error=str(reason.value))


def relay_endpoint(args) -> str:
    # PLURESYNC_BENCH_EXTRA appends endpoint parameters (e.g. ":window=1048576") for what-if runs.
    extra = os.environ.get("PLURESYNC_BENCH_EXTRA", "")
    return f"relay:url=ws\\://127.0.0.1\\:{args.port}:keyfile={args.keyfile}{extra}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", choices=["tcp", "transit", "pluresync"], required=True)
    p.add_argument("--role", choices=["recv", "send", "echo", "ping"], required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--keyfile")
    p.add_argument("--token", default="ab" * 32)
    p.add_argument("--size", type=int, default=256 << 20)
    p.add_argument("--chunk", type=int, default=64 << 10)
    p.add_argument("--msg", type=int, default=64)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--profile", help="write a cProfile of the reactor run to this file")
    args = p.parse_args()

    proto = {"recv": Sink, "send": Source, "echo": Echo, "ping": Ping}[args.role]
    proto.size = args.size
    proto.chunk = os.urandom(args.chunk)
    proto.msg = os.urandom(args.msg)
    proto.count, proto.warmup = args.count, args.warmup
    factory = Factory.forProtocol(proto)
    listening = args.role in ("recv", "echo")

    def failed(f):
        finish(error=f.getErrorMessage())

    def ready(port):
        print(f"READY {port}", flush=True)

    if args.transport == "tcp":
        if listening:
            d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
            d.addCallback(lambda lp: ready(lp.getHost().port))
        else:
            d = TCP4ClientEndpoint(reactor, "127.0.0.1", args.port).connect(factory)
    elif args.transport == "transit":
        from transit_client import connect_transit

        side = ("01" if listening else "02") * 8
        if listening:
            ready(args.port)
        d = connect_transit(reactor, args.port, args.token, side, factory)
    else:
        from twisted.internet.endpoints import clientFromString, serverFromString

        if listening:
            d = serverFromString(reactor, relay_endpoint(args)).listen(factory)
            d.addCallback(lambda lp: ready(args.port))
        else:
            d = clientFromString(reactor, relay_endpoint(args)).connect(factory)
    d.addErrback(failed)
    reactor.callLater(args.timeout, finish, error=f"timeout after {args.timeout} s")
    profiler = None
    if args.profile:
        import cProfile

        # PLURESYNC_PROFILE_CLOCK=cpu (bench/profile_stream.py --cpu-clock): charge CPU time, not wall time.
        clock = os.environ.get("PLURESYNC_PROFILE_CLOCK") == "cpu"
        profiler = cProfile.Profile(time.process_time) if clock else cProfile.Profile()
        profiler.enable()
    reactor.run()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    RESULT["cpu_s"] = usage.ru_utime + usage.ru_stime
    RESULT["user_s"], RESULT["sys_s"], RESULT["minor_faults"] = usage.ru_utime, usage.ru_stime, usage.ru_minflt
    RESULT["max_rss_kib"] = usage.ru_maxrss
    print("RESULT " + json.dumps(RESULT), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
