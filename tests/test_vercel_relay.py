"""
The Vercel (backup) relay, C{deploy/vercel/api/relay.py} → L{pluresync.relay.asgi}:
two instances of the function run locally as separate C{uvicorn} processes
sharing a real C{redis-server}, and real C{relay:} endpoints (and raw
protocol clients) use them.  No Vercel account or network is involved: this
is the function's code under a local ASGI server, not Vercel's runtime.

Every wait is bounded (polls with deadlines); nothing sleeps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import time
from statistics import median
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone, ProcessExitedAlready
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import FileSender
from twisted.python import log
from twisted.trial.unittest import SkipTest, TestCase

from pluresync.errors import RelayError
from pluresync.keys import SyncKey

from .localrelay import Collector, Listening
from .redisserver import ProcessOutput, start_redis
from .relayclient import connect as raw_connect
from .relayprocess import ROOT, escaped_url, free_port, poll

FUNCTION_DIR = ROOT / "deploy" / "vercel" / "api"
PREFIX = "pluresync:vercel:"


def _require_servers(test: Any) -> None:
    missing = []
    for module in ("uvicorn", "redis"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        message = f"{', '.join(missing)} not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            test.fail(message)
        raise SkipTest(message)


class UvicornExited(AssertionError):
    """The function's process ended before it was ready."""


class VercelInstance:
    """One instance of the Vercel function: C{uvicorn relay:app} on 127.0.0.1."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.env = env or {}
        self.port = free_port()
        self._protocol: ProcessOutput | None = None
        self._transport: Any = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self._protocol.output.decode(errors="replace") if self._protocol else ""

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.ended.called

    async def start(self) -> VercelInstance:
        """
        Start uvicorn; a port another process took between L{free_port} and
        uvicorn's bind (tests run in parallel) costs one more try on a new
        port, at most twice.
        """
        for attempt in range(3):
            try:
                return await self._start()
            except UvicornExited:
                if attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    async def _start(self) -> VercelInstance:
        self._protocol = ProcessOutput()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "PLURESYNC_REDIS_URL": self.redis_url,
            "PLURESYNC_AUTH": "open",
            **self.env,
        }
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(FUNCTION_DIR),
            "relay:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ws",
            "websockets-sansio",
            "--ws-per-message-deflate",
            "false",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        self._transport = reactor.spawnProcess(self._protocol, sys.executable, args, env=env, path=str(ROOT))
        await poll(self._healthy, timeout=30, interval=0.05, what=f"the Vercel function on port {self.port} ready")
        return self

    async def _healthy(self) -> bool:
        if not self.running:
            raise UvicornExited(f"uvicorn exited:\n{self.output}")
        try:
            status, body = await self.get("/health", timeout=2)
        except Exception:
            return False
        return status == 200 and body.get("ready") is True

    async def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool, readBody

        pool = HTTPConnectionPool(reactor, persistent=False)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=timeout))
        response = await client.get(f"http://127.0.0.1:{self.port}{path}".encode(), timeout=timeout)
        body = await readBody(response)
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = body
        return response.code, decoded

    async def health(self) -> dict[str, Any]:
        return (await self.get("/health"))[1]

    async def cleanup(self) -> None:
        if self._protocol is None:
            return
        if self.output.strip():
            log.msg(f"uvicorn on port {self.port} printed:\n{self.output}")
        if self.running:
            try:
                self._transport.signalProcess(signal.SIGKILL)
            except ProcessExitedAlready:
                pass
        await self._protocol.ended


class _VercelCase(TestCase):
    timeout = 90

    async def start_instances(self, count: int = 2, env: dict[str, str] | None = None) -> list[VercelInstance]:
        _require_servers(self)
        self.redis = await start_redis(self)
        instances = [VercelInstance(self.redis.url, env) for _ in range(count)]
        for instance in instances:
            self.addCleanup(lambda i=instance: ensureDeferred(i.cleanup()))
        for instance in instances:
            await instance.start()
        return instances

    def endpoint(self, instance: VercelInstance, **params: str) -> str:
        extra = "".join(f":{k}={v}" for k, v in params.items())
        return f"relay:url={escaped_url(instance.port)}:key={self.key.to_text()}{extra}"

    async def listen(self, instance: VercelInstance, **params: str) -> tuple[Listening, Any]:
        listening = Listening()
        port = await serverFromString(reactor, self.endpoint(instance, **params)).listen(listening.factory)
        self.addCleanup(port.stopListening)
        return listening, port

    async def connect(self, instance: VercelInstance, **params: str) -> Collector:
        protocol = await clientFromString(reactor, self.endpoint(instance, **params)).connect(
            Factory.forProtocol(Collector)
        )
        self.addCleanup(lambda: protocol.transport.abortConnection() if protocol.reason is None else None)
        return protocol

    async def relay_keys(self) -> list[str]:
        keys = await self.redis.command("KEYS", PREFIX + "*")
        return sorted(str(k) for k in keys or ())

    async def transfer(self, sender: Collector, receiver: Collector, blob: bytes) -> float:
        """Send C{blob} from one side to the other; seconds from first write to last byte."""
        done: Deferred[None] = Deferred()
        wanted = [len(blob)]

        def arrived(data: bytes) -> None:
            wanted[0] -= len(data)  # (not len(receiver.data): quadratic)
            if wanted[0] <= 0 and not done.called:
                done.callback(None)

        receiver.dataArrived = arrived
        started = time.perf_counter()
        # A streaming producer, as real senders do (writing it all at once
        # would measure the client's own buffering).
        await FileSender().beginFileTransfer(io.BytesIO(blob), sender.transport)
        await done
        return time.perf_counter() - started


class VercelRelayTests(_VercelCase):
    """Two function instances, one Redis, real pluresync endpoints."""

    async def setUp(self) -> None:
        self.key = SyncKey.generate()
        self.one, self.two = await self.start_instances(2)

    async def test_pair_across_instances_1mib_both_ways(self):
        """
        A listener on instance 1 (its accept goes to its own URL, instance 1)
        and a connector on instance 2 pair through Redis; 1 MiB moves each way
        intact; a clean close ends both sides cleanly; Redis keeps no pair state.
        """
        listening, _ = await self.listen(self.one)
        await poll(lambda: self._listeners(self.one, 1), timeout=10, what="the listener registered on instance 1")
        self.assertEqual((await self.two.health())["listeners"], 0)
        accepted = listening.next()
        client = await self.connect(self.two, wait="10")
        server = await accepted
        up = os.urandom(1024 * 1024)
        down = os.urandom(1024 * 1024)
        await self.transfer(client, server, up)
        await self.transfer(server, client, down)
        self.assertEqual(hashlib.sha256(server.data).hexdigest(), hashlib.sha256(up).hexdigest())
        self.assertEqual(hashlib.sha256(client.data).hexdigest(), hashlib.sha256(down).hexdigest())
        self.assertEqual((await self.two.health())["sessions"], 1)  # counted where the connector is
        client.transport.loseConnection()
        await client.lost
        await server.lost
        client.reason.trap(ConnectionDone)
        server.reason.trap(ConnectionDone)

        async def no_pair_state() -> bool:
            keys = await self.relay_keys()
            return not [k for k in keys if k.startswith((PREFIX + "d:", PREFIX + "k:", PREFIX + "a:", PREFIX + "ses:"))]

        await poll(no_pair_state, timeout=10, what="the pair's Redis keys deleted")
        await poll(lambda: self._sessions(self.two, 0), timeout=10, what="the session counted as ended")

    async def _listeners(self, instance: VercelInstance, n: int) -> bool:
        return (await instance.health())["listeners"] == n

    async def _sessions(self, instance: VercelInstance, n: int) -> bool:
        return (await instance.health())["sessions"] == n

    async def test_connector_first_listener_elsewhere(self):
        """A connector waiting on instance 2 is offered to a listener that registers later on instance 1."""
        connecting = Deferred.fromCoroutine(self.connect(self.two, wait="20"))
        await poll(lambda: self._pending(self.two), timeout=10, what="the connector waiting on instance 2")
        listening, _ = await self.listen(self.one)
        accepted = listening.next()
        client = await connecting
        server = await accepted
        await self.transfer(client, server, b"x" * 1000)
        self.assertEqual(server.data, b"x" * 1000)
        server.transport.loseConnection()
        await client.lost
        client.reason.trap(ConnectionDone)

    async def _pending(self, instance: VercelInstance) -> bool:
        return (await instance.health())["pending"] == 1

    async def test_no_listener(self):
        """With nobody listening anywhere, wait=0 gets no-listener (4004)."""
        with self.assertRaises(RelayError) as e:
            await self.connect(self.two, wait="0")
        self.assertEqual(e.exception.code, "no-listener")
        raw = raw_connect(reactor, self.one.port)
        await raw.opened
        raw.send_json({"v": 1, "op": "connect", "rdv": "ab" * 32, "wait": 0})
        message = await raw.next_json()
        self.assertEqual((message["op"], message["code"]), ("error", "no-listener"))
        self.assertEqual((await raw.closed)[1:], (4004, "no-listener"))

    async def test_bad_request(self):
        """Not JSON: bad-request, close 4000; wrong v likewise; a binary message first too."""
        for payload, binary in ((b"this is not json", False), (b'{"v":2,"op":"listen"}', False), (b"\x00\x01", True)):
            raw = raw_connect(reactor, self.two.port)
            await raw.opened
            if binary:
                raw.send_bytes(payload)
            else:
                raw.send_text(payload)
            message = await raw.next_json()
            self.assertEqual((message["op"], message["code"]), ("error", "bad-request"))
            self.assertEqual((await raw.closed)[1:], (4000, "bad-request"))

    async def test_subprotocol_required(self):
        """An upgrade without pluresync.v1 is refused with HTTP 400 (no WebSocket)."""
        raw = raw_connect(reactor, self.one.port, protocols=["something.else"])
        with self.assertRaises(Exception) as e:
            await raw.opened
        self.assertIn("400", str(e.exception))
        await raw.closed

    async def test_health(self):
        """/health is JSON like the Twisted relay's; ?ready=1 answers 200 while Redis is up."""
        status, body = await self.one.get("/health")
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")
        self.assertIs(body["ready"], True)
        self.assertEqual(body["checks"]["redis"], True)
        for name in ("version", "uptime", "connections", "listeners", "sessions", "pending"):
            self.assertIn(name, body)
        self.assertEqual((await self.one.get("/health?ready=1"))[0], 200)

    async def test_partner_vanishes(self):
        """A side that drops its TCP connection: its partner on the other instance gets peer-gone (4010)."""
        rdv, peer = "cd" * 32, "ef" * 32
        listener = raw_connect(reactor, self.one.port)
        await listener.opened
        listener.send_json({"v": 1, "op": "listen", "rdv": rdv, "peer": peer})
        self.assertEqual((await listener.next_json())["op"], "ready")
        connector = raw_connect(reactor, self.two.port)
        await connector.opened
        connector.send_json({"v": 1, "op": "connect", "rdv": rdv, "wait": 10})
        incoming = await listener.next_json()
        acceptor = raw_connect(reactor, self.one.port)
        await acceptor.opened
        acceptor.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
        self.assertEqual((await acceptor.next_json())["peer"], None)
        self.assertEqual((await connector.next_json())["peer"], peer)
        connector.send_bytes(b"ping")
        self.assertEqual(await acceptor.next_message(), (b"ping", True))
        await connector.abort()
        self.assertEqual((await acceptor.closed)[1:], (4010, "peer-gone"))
        listener.sendClose(1000)
        await listener.closed

    async def test_accept_unknown_session(self):
        """accept of a session nobody offered: no-session (4005)."""
        raw = raw_connect(reactor, self.two.port)
        await raw.opened
        raw.send_json({"v": 1, "op": "accept", "session": "0" * 32})
        self.assertEqual((await raw.next_json())["code"], "no-session")
        self.assertEqual((await raw.closed)[1:], (4005, "no-session"))


class VercelMaxDurationTests(_VercelCase):
    """The function's maximum duration: sockets are closed with 1001 just before it."""

    async def test_going_away_before_max_duration(self):
        self.key = SyncKey.generate()
        (one,) = await self.start_instances(1, {"PLURESYNC_MAX_DURATION": "3", "PLURESYNC_CLOSE_MARGIN": "1"})
        # Without resume, so the relay's own ending shows (a session with
        # resume moves to a fresh socket before the cap instead).
        listening, _ = await self.listen(one, resume="0")
        accepted = listening.next()
        started = time.monotonic()
        client = await self.connect(one, wait="5", resume="0")
        server = await accepted
        await client.lost
        await server.lost
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 6)
        for side in (client, server):
            self.assertIn("shutting down", str(side.reason.value))

    async def test_session_seconds_count_from_each_upgrade(self):
        """
        C{session_seconds} is announced as max duration − margin (3 − 1 = 2),
        and is when each socket is closed with 1001, counted from its own
        upgrade: a listener's control socket and a waiting connector as much
        as an end of a pair.  A pair ends at the first of its two caps, so an
        acceptor that came a second after its connector gets 1001 about a
        second after its own upgrade.
        """
        (one,) = await self.start_instances(1, {"PLURESYNC_MAX_DURATION": "3", "PLURESYNC_CLOSE_MARGIN": "1"})
        closed_at: dict[str, float] = {}

        async def open_socket(name: str, hello: dict[str, Any]) -> tuple[Any, float]:
            started = time.monotonic()
            client = raw_connect(reactor, one.port)
            self.addCleanup(client.abort)

            def ended(result: Any) -> Any:
                closed_at[name] = time.monotonic()
                return result

            client.closed.addCallback(ended)
            await client.opened
            client.send_json({"v": 1, **hello})
            return client, started

        listener, listener_start = await open_socket("listener", {"op": "listen", "rdv": "ab" * 32, "peer": "cd" * 32})
        ready = await listener.next_json()
        self.assertEqual(ready["limits"]["session_seconds"], 2)
        connector, connector_start = await open_socket("connector", {"op": "connect", "rdv": "ab" * 32, "wait": 5})
        incoming = await listener.next_json()
        await deferLater(reactor, 1.0, lambda: None)  # the acceptor comes a second later
        acceptor, acceptor_start = await open_socket("acceptor", {"op": "accept", "session": incoming["session"]})
        for side in (acceptor, connector):
            paired = await side.next_json()
            self.assertEqual((paired["op"], paired["limits"]["session_seconds"]), ("paired", 2))
        for side in (listener, connector, acceptor):
            self.assertEqual((await side.closed)[1:], (1001, "going away"))
        lived = {
            "listener": closed_at["listener"] - listener_start,
            "connector": closed_at["connector"] - connector_start,
            "acceptor": closed_at["acceptor"] - acceptor_start,
        }
        for name in ("listener", "connector"):
            self.assertTrue(1.9 <= lived[name] <= 3.0, lived)
        self.assertLess(lived["acceptor"], 1.6, lived)
        log.msg(f"seconds each socket lived: {lived}")


class VercelThroughputTests(_VercelCase):
    """
    Numbers for docs/benchmarks.md ("Vercel relay"), through two instances
    and Redis on 127.0.0.1: one 8 MiB stream (C{PLURESYNC_VERCEL_BENCH_MIB}
    to change), endpoint and raw-protocol pairing latency, 64-byte round
    trips.  Only loose floors are asserted; the numbers go to the test log
    (and to the file C{PLURESYNC_BENCH_OUT}, if set).
    """

    def report(self, line: str) -> None:
        line = "VERCEL-RELAY-BENCH " + line
        log.msg(line)
        if os.environ.get("PLURESYNC_BENCH_OUT"):
            with open(os.environ["PLURESYNC_BENCH_OUT"], "a") as f:
                f.write(line + "\n")

    async def test_throughput_and_pairing_latency(self):
        self.key = SyncKey.generate()
        one, two = await self.start_instances(2)
        listening, _ = await self.listen(one)
        await poll(lambda: _count(one, "listeners", 1), timeout=10, what="the listener registered")
        latencies = []
        for _ in range(10):
            accepted = listening.next()
            started = time.perf_counter()
            client = await self.connect(two, wait="10")
            latencies.append(time.perf_counter() - started)
            server = await accepted
            if len(latencies) < 10:
                client.transport.loseConnection()
                await server.lost
        mib = int(os.environ.get("PLURESYNC_VERCEL_BENCH_MIB", "8"))
        blob = os.urandom(mib * 1024 * 1024)
        seconds = await self.transfer(client, server, blob)
        self.assertEqual(hashlib.sha256(server.data).digest(), hashlib.sha256(blob).digest())
        rate = len(blob) / seconds / 1e6
        self.report(
            f"stream {mib} MiB in {seconds:.3f} s = {rate:.1f} MB/s; endpoint pairing (connect() to connected, "
            f"listener on 1, connector on 2, incl. Noise) median {median(latencies) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms over {len(latencies)}"
        )
        self.assertGreater(rate, 0.5)
        client.transport.loseConnection()
        await server.lost

    async def test_raw_pairing_and_round_trip(self):
        one, two = await self.start_instances(2)
        rdv, peer = os.urandom(32).hex(), os.urandom(32).hex()
        listener = raw_connect(reactor, one.port)
        await listener.opened
        listener.send_json({"v": 1, "op": "listen", "rdv": rdv, "peer": peer})
        await listener.next_json()
        pairing = []
        for i in range(30):
            connector = raw_connect(reactor, two.port)
            await connector.opened
            started = time.perf_counter()
            connector.send_json({"v": 1, "op": "connect", "rdv": rdv, "wait": 10})
            incoming = await listener.next_json()
            acceptor = raw_connect(reactor, one.port)
            await acceptor.opened
            acceptor.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
            await connector.next_json()
            pairing.append(time.perf_counter() - started)
            await acceptor.next_json()
            if i < 29:
                connector.sendClose(1000)
                await acceptor.closed
                await connector.closed
        trips = []
        for _ in range(220):
            started = time.perf_counter()
            connector.send_bytes(b"p" * 64)
            await acceptor.next_message()
            acceptor.send_bytes(b"q" * 64)
            await connector.next_message()
            trips.append(time.perf_counter() - started)
        trips = sorted(trips[20:])
        pairing.sort()
        self.report(
            f"raw pairing (connect to paired; accept socket opened after incoming, on 1; connector on 2) "
            f"median {median(pairing) * 1000:.2f} ms p90 {pairing[int(len(pairing) * 0.9)] * 1000:.2f} ms over "
            f"{len(pairing)}; 64-byte round trip median {median(trips) * 1e6:.0f} us "
            f"p99 {trips[int(len(trips) * 0.99)] * 1e6:.0f} us over {len(trips)}"
        )
        connector.sendClose(1000)
        await acceptor.closed
        listener.sendClose(1000)
        await listener.closed


async def _count(instance: VercelInstance, name: str, n: int) -> bool:
    return (await instance.health())[name] == n
