"""
Rate limits and quotas (L{pluresync.relay.core.ratelimit}): the pure buckets and
limiters on a fake clock, then the relay enforcing them over loopback, and a
flood test (one client opening connections as fast as it can and one sending
garbage, while well-behaved pairs transfer data).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.trial import unittest

from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.core.ratelimit import (
    UNLIMITED,
    ConnectionLimiter,
    RateLimits,
    SessionBudget,
    SessionMeter,
    TokenBucket,
    client_address,
    parse_networks,
)
from pluresync.relay.core.wire import ErrorCode, ProtocolError, encode_error, encode_paired, encode_ready

from .relayclient import SUBPROTOCOL, RelayTestClient
from .test_relay_websocket import PEER_A, RDV, RelayTestCase, _within


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- pure ------------------------------------------------------------------------


class TokenBucketTests(unittest.TestCase):
    def test_burst_then_wait(self) -> None:
        clock = FakeClock()
        bucket = TokenBucket(100, 50, clock)
        self.assertEqual(bucket.take(50), 0.0)
        # 10 tokens of debt at 100/s: wait 0.1 s.
        self.assertAlmostEqual(bucket.take(10), 0.1)
        clock.now += 0.1
        self.assertEqual(bucket.take(0), 0.0)

    def test_refill_capped_at_burst(self) -> None:
        clock = FakeClock()
        bucket = TokenBucket(100, 50, clock)
        bucket.take(50)
        clock.now += 100
        self.assertEqual(bucket.take(50), 0.0)
        self.assertAlmostEqual(bucket.take(1), 0.01)

    def test_never_negative(self) -> None:
        clock = FakeClock()
        bucket = TokenBucket(10, 10, clock)
        for n in (0, 1, 5, 100, 3):
            self.assertGreaterEqual(bucket.take(n), 0.0)
            self.assertGreaterEqual(bucket.try_take(n), 0.0)
        clock.now -= 50  # a clock that goes back refills nothing, breaks nothing
        self.assertGreaterEqual(bucket.take(1), 0.0)

    def test_debt_accumulates(self) -> None:
        # Bytes are delayed, never refused: each take adds to the wait.
        clock = FakeClock()
        bucket = TokenBucket(1000, 1000, clock)
        self.assertEqual(bucket.take(1000), 0.0)
        self.assertAlmostEqual(bucket.take(500), 0.5)
        self.assertAlmostEqual(bucket.take(500), 1.0)
        clock.now += 1.0
        self.assertAlmostEqual(bucket.take(0), 0.0)

    def test_try_take_refuses_without_taking(self) -> None:
        clock = FakeClock()
        bucket = TokenBucket(2, 3, clock)
        for _ in range(3):
            self.assertEqual(bucket.try_take(), 0.0)
        self.assertAlmostEqual(bucket.try_take(), 0.5)
        self.assertAlmostEqual(bucket.try_take(), 0.5)  # nothing was taken
        clock.now += 0.5
        self.assertEqual(bucket.try_take(), 0.0)
        self.assertEqual(bucket.try_take(10), math.inf)

    def test_unlimited(self) -> None:
        bucket = TokenBucket(0)
        self.assertEqual(bucket.take(10**9), 0.0)
        self.assertEqual(bucket.try_take(10**9), 0.0)
        self.assertEqual(UNLIMITED.take(10**9), 0.0)

    def test_default_burst_is_one_second(self) -> None:
        self.assertEqual(TokenBucket(500, None, FakeClock()).burst, 500)

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, TokenBucket, -1, 1, FakeClock())
        self.assertRaises(ValueError, TokenBucket, math.inf, 1, FakeClock())
        self.assertRaises(ValueError, TokenBucket, 1, 1)  # no clock


class ConnectionLimiterTests(unittest.TestCase):
    def test_rate(self) -> None:
        clock = FakeClock()
        limiter = ConnectionLimiter(10, 5, 0, clock)
        for _ in range(5):
            self.assertEqual(limiter.admit("a"), (0.0, None))
        wait, why = limiter.admit("a")
        self.assertEqual(why, "rate")
        self.assertAlmostEqual(wait, 0.1)
        self.assertEqual(limiter.admit("b"), (0.0, None))  # per address
        clock.now += 0.1
        self.assertEqual(limiter.admit("a"), (0.0, None))

    def test_concurrent(self) -> None:
        limiter = ConnectionLimiter(0, None, 2, FakeClock())
        self.assertEqual(limiter.admit("a")[0], 0.0)
        self.assertEqual(limiter.admit("a")[0], 0.0)
        wait, why = limiter.admit("a")
        self.assertEqual(why, "concurrent")
        self.assertGreater(wait, 0)
        limiter.release("a")
        self.assertEqual(limiter.admit("a")[0], 0.0)
        self.assertEqual(limiter.open_count("a"), 2)

    def test_forgets_idle_addresses(self) -> None:
        clock = FakeClock()
        limiter = ConnectionLimiter(1, 1, 0, clock)
        for i in range(5000):
            limiter.admit(f"10.0.{i // 256}.{i % 256}")
            limiter.release(f"10.0.{i // 256}.{i % 256}")
            clock.now += 0.01
        self.assertLess(len(limiter), 2100)


class SessionMeterTests(unittest.TestCase):
    def test_byte_cap_shared(self) -> None:
        budget = SessionBudget(100)
        a = SessionMeter(None, None, budget)
        b = SessionMeter(None, None, budget)
        self.assertEqual(a.take(60), 0.0)
        self.assertEqual(b.take(40), 0.0)
        self.assertEqual(a.take(1), math.inf)

    def test_slowest_bucket_wins(self) -> None:
        clock = FakeClock()
        meter = SessionMeter(TokenBucket(1000, 1000, clock), TokenBucket(100, 100, clock), SessionBudget(0))
        self.assertAlmostEqual(meter.take(200), 1.0)


class ClientAddressTests(unittest.TestCase):
    trusted = parse_networks(["10.0.0.0/8", "::1", "192.168.1.1"])

    def test_untrusted_peer_ignores_header(self) -> None:
        self.assertEqual(client_address("203.0.113.9", "1.2.3.4", self.trusted), "203.0.113.9")

    def test_no_trusted_proxies(self) -> None:
        self.assertEqual(client_address("10.1.1.1", "1.2.3.4", ()), "10.1.1.1")

    def test_trusted_peer(self) -> None:
        self.assertEqual(client_address("10.1.1.1", "1.2.3.4", self.trusted), "1.2.3.4")

    def test_rightmost_untrusted(self) -> None:
        # The client forged "6.6.6.6"; proxies appended the real hops.
        header = "6.6.6.6, 1.2.3.4, 10.0.0.7, 192.168.1.1"
        self.assertEqual(client_address("10.1.1.1", header, self.trusted), "1.2.3.4")

    def test_all_trusted_leftmost(self) -> None:
        self.assertEqual(client_address("10.1.1.1", "10.2.2.2, 10.3.3.3", self.trusted), "10.2.2.2")

    def test_missing_or_empty_header(self) -> None:
        self.assertEqual(client_address("10.1.1.1", None, self.trusted), "10.1.1.1")
        self.assertEqual(client_address("10.1.1.1", " , ", self.trusted), "10.1.1.1")

    def test_ports_ipv6_and_mapped(self) -> None:
        """Ports are dropped; an IPv6 client counts as its /64 (one host usually owns it all)."""
        self.assertEqual(client_address("::1", "1.2.3.4:5678", self.trusted), "1.2.3.4")
        self.assertEqual(client_address("::1", "[2001:db8::1]:443", self.trusted), "2001:db8::/64")
        self.assertEqual(client_address("::ffff:10.0.0.1", "2001:db8::2", self.trusted), "2001:db8::/64")
        self.assertEqual(
            client_address("2001:db8:0:0:aaaa::1", None, ()), client_address("2001:db8:0:0:bbbb::9", None, ())
        )

    def test_garbage_entry_is_the_client(self) -> None:
        self.assertEqual(client_address("10.1.1.1", "1.2.3.4, unknown", self.trusted), "unknown")

    def test_bad_network(self) -> None:
        self.assertRaises(ValueError, parse_networks, ["nope"])


class AnnounceTests(unittest.TestCase):
    def test_encoders(self) -> None:
        limits = RateLimits(session_bytes_per_second=1000).announced(262144)
        self.assertEqual(
            limits,
            {"session_bytes_per_second": 1000, "session_bytes": None, "session_seconds": None, "max_message": 262144},
        )
        self.assertEqual(json.loads(encode_ready(limits))["limits"], limits)
        self.assertEqual(json.loads(encode_paired(None, limits))["limits"], limits)
        error = json.loads(encode_error(ErrorCode.RATE_LIMITED, "slow down", 2.5))
        self.assertEqual(error["retry"], 2.5)
        self.assertNotIn("retry", json.loads(encode_error(ErrorCode.BAD_REQUEST, "x")))
        self.assertIsNone(ProtocolError(ErrorCode.BAD_REQUEST, "x").retry)

    def test_invalid_limits(self) -> None:
        self.assertRaises(ValueError, RateLimits, session_bytes=-1)


# -- loopback ----------------------------------------------------------------------


class _RawHTTP(Protocol):
    """Sends one upgrade request and keeps the whole answer."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        self.transport.write(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n{extra}\r\n"
            ).encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.done.called:
            self.done.callback(self.data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback(self.data)


def raw_upgrade(port: int, headers: dict[str, str] | None = None) -> Deferred[bytes]:
    """The relay's answer (status line and headers) to one upgrade request."""
    protocol = _RawHTTP(headers or {})
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    connectProtocol(endpoint, protocol)
    return protocol.done


def connect_as(port: int, forwarded_for: str | None) -> RelayTestClient:
    """A test WebSocket whose upgrade carries C{X-Forwarded-For}."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}/", protocols=[SUBPROTOCOL], reactor=reactor, headers=headers
    )
    factory.protocol = RelayTestClient
    factory.setProtocolOptions(
        openHandshakeTimeout=10,
        closeHandshakeTimeout=5,
        autoPingInterval=0,
        autoPingTimeout=0,
        perMessageCompressionOffers=[],
    )
    client = factory.buildProtocol(None)

    def failed(reason: Any) -> None:
        client.opened.errback(reason)
        client.closed.callback((False, None, str(reason.value)))

    connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client).addErrback(failed)
    return client


def _refused(factory: Any) -> float:
    value = factory.metrics.registry.get_sample_value("pluresync_relay_refused_total", {"reason": "limit"})
    return value or 0.0


class _LimitsCase(RelayTestCase):
    rate = RateLimits()

    def setUp(self) -> None:
        self.limits = RelayLimits(ping_interval=0, ping_timeout=0, hello_timeout=5, accept_timeout=5, rate=self.rate)
        super().setUp()

    def client_as(self, forwarded_for: str | None) -> RelayTestClient:
        client = connect_as(self.port_number, forwarded_for)
        self.clients.append(client)
        return client

    @inlineCallbacks
    def pair_as(self, address: str, rdv: str) -> Any:
        """A listener, connector and acceptor pair, all from C{address} (X-Forwarded-For)."""
        listener = self.client_as(address)
        yield _within(listener.opened)
        listener.send_json({"v": 1, "op": "listen", "rdv": rdv, "peer": PEER_A})
        ready = yield _within(listener.next_json())
        self.assertEqual(ready["op"], "ready")
        connector = self.client_as(address)
        yield _within(connector.opened)
        connector.send_json({"v": 1, "op": "connect", "rdv": rdv})
        incoming = yield _within(listener.next_json())
        acceptor = self.client_as(address)
        yield _within(acceptor.opened)
        acceptor.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
        for side in (acceptor, connector):
            paired = yield _within(side.next_json())
            self.assertEqual(paired["op"], "paired")
        return listener, connector, acceptor


class AnnouncedLimitsTests(_LimitsCase):
    rate = RateLimits(session_bytes_per_second=123456, session_bytes=10**9, session_seconds=3600)

    @inlineCallbacks
    def test_ready_and_paired_carry_limits(self) -> None:
        expected = {
            "session_bytes_per_second": 123456,
            "session_bytes": 10**9,
            "session_seconds": 3600,
            "max_message": self.limits.max_message,
        }
        listener = yield self.open()
        listener.send_json({"v": 1, "op": "listen", "rdv": RDV, "peer": PEER_A})
        ready = yield _within(listener.next_json())
        self.assertEqual(ready, {"op": "ready", "limits": expected, "decline": True})
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV})
        acceptor, _, paired = yield self.accept(listener)
        self.assertEqual(paired["limits"], expected)
        paired = yield _within(connector.next_json())
        self.assertEqual(paired["limits"], expected)


class DefaultLimitsTests(RelayTestCase):
    @inlineCallbacks
    def test_defaults_announced(self) -> None:
        listener = yield self.open()
        listener.send_json({"v": 1, "op": "listen", "rdv": RDV, "peer": PEER_A})
        ready = yield _within(listener.next_json())
        self.assertEqual(
            ready["limits"],
            {"session_bytes_per_second": None, "session_bytes": None, "session_seconds": None, "max_message": 262144},
        )


class ConnectionRateTests(_LimitsCase):
    rate = RateLimits(connections_per_second=1, connections_burst=3)

    @inlineCallbacks
    def test_new_connections_per_second(self) -> None:
        answers = []
        for _ in range(4):
            answers.append((yield _within(raw_upgrade(self.port_number))))
        for answer in answers[:3]:
            self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer)
        self.assertTrue(answers[3].startswith(b"HTTP/1.1 429"), answers[3])
        self.assertIn(b"\r\nRetry-After: 1\r\n", answers[3])
        self.assertEqual(_refused(self.factory), 1.0)
        # An Autobahn client sees the upgrade fail.
        client = self.client()
        yield self.assertFailure(_within(client.opened), Exception)

    @inlineCallbacks
    def test_forwarded_for_is_ignored_from_untrusted_peers(self) -> None:
        # 127.0.0.1 is not a trusted proxy here: the header changes nothing.
        for i in range(3):
            answer = yield _within(raw_upgrade(self.port_number, {"X-Forwarded-For": f"1.2.3.{i}"}))
            self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer)
        answer = yield _within(raw_upgrade(self.port_number, {"X-Forwarded-For": "1.2.3.99"}))
        self.assertTrue(answer.startswith(b"HTTP/1.1 429"), answer)


class TrustedProxyTests(_LimitsCase):
    rate = RateLimits(connections_per_second=1, connections_burst=2, trusted_proxies=parse_networks(["127.0.0.1"]))

    @inlineCallbacks
    def test_forwarded_for_from_trusted_proxy(self) -> None:
        for _ in range(2):
            answer = yield _within(raw_upgrade(self.port_number, {"X-Forwarded-For": "6.6.6.6, 198.51.100.1"}))
            self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer)
        answer = yield _within(raw_upgrade(self.port_number, {"X-Forwarded-For": "198.51.100.1"}))
        self.assertTrue(answer.startswith(b"HTTP/1.1 429"), answer)
        # Another client behind the same proxy is counted apart.
        answer = yield _within(raw_upgrade(self.port_number, {"X-Forwarded-For": "6.6.6.6, 198.51.100.2"}))
        self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer)


class ConcurrentTests(_LimitsCase):
    rate = RateLimits(connections_per_second=0, connections_per_address=2)

    @inlineCallbacks
    def test_concurrent_per_address(self) -> None:
        first = yield self.open()
        yield self.open()
        answer = yield _within(raw_upgrade(self.port_number))
        self.assertTrue(answer.startswith(b"HTTP/1.1 429"), answer)
        self.assertIn(b"Retry-After:", answer)
        yield first.close_normally()
        for _ in range(50):
            if self.factory.connection_limiter.open_count("127.0.0.1") < 2:
                break
            yield _within(_sleep(0.02))
        yield self.open()


class ListenersPerRdvTests(_LimitsCase):
    rate = RateLimits(listeners_per_rdv=1, retry=7)

    @inlineCallbacks
    def test_listener_cap(self) -> None:
        yield self.listener()
        second = yield self.open()
        second.send_json({"v": 1, "op": "listen", "rdv": RDV, "peer": PEER_A})
        error = yield _within(second.next_json())
        self.assertEqual((error["op"], error["code"], error["retry"]), ("error", "rate-limited", 7))
        _, code, reason = yield _within(second.closed)
        self.assertEqual((code, reason), (4029, "rate-limited"))
        self.assertEqual(_refused(self.factory), 1.0)


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class SessionRateTests(_LimitsCase):
    RATE = 400_000
    rate = RateLimits(session_bytes_per_second=RATE)

    @inlineCallbacks
    def test_bytes_per_second(self) -> None:
        _, connector, acceptor = yield self.pair()
        chunk = 32 * 1024
        messages = [os.urandom(chunk) for _ in range(64)]  # 2 MiB: 1 s of burst, then ~4.2 s
        total = chunk * len(messages)
        marks: list[tuple[float, int]] = []
        got = hashlib.sha256()
        done: Deferred[None] = Deferred()
        received = [0]

        def on_message(payload: bytes, is_binary: bool) -> None:
            got.update(payload)
            received[0] += len(payload)
            marks.append((reactor.seconds(), received[0]))
            if received[0] >= total and not done.called:
                done.callback(None)

        acceptor.onMessage = on_message
        sent = hashlib.sha256()
        for message in messages:
            sent.update(message)
            connector.send_bytes(message)
        yield _within(done, 20)
        self.assertEqual(got.hexdigest(), sent.hexdigest())  # nothing dropped
        # Steady state: past the first second's burst.
        start = next((t, n) for t, n in marks if n >= self.RATE + 2 * chunk)
        end = marks[-1]
        measured = (end[1] - start[1]) / (end[0] - start[0])
        self.assertGreater(measured, self.RATE * 0.7, measured)
        self.assertLess(measured, self.RATE * 1.3, measured)


class SessionCapTests(_LimitsCase):
    rate = RateLimits(session_bytes=100_000, retry=3)

    @inlineCallbacks
    def test_byte_cap(self) -> None:
        _, connector, acceptor = yield self.pair()
        for _ in range(20):
            connector.send_bytes(os.urandom(10_000))
        for side in (connector, acceptor):
            _, code, reason = yield _within(side.closed)
            self.assertEqual(code, 4029)
            self.assertEqual(reason, "rate-limited retry=3")
        self.assertEqual(_refused(self.factory), 1.0)


class SessionDurationTests(_LimitsCase):
    rate = RateLimits(session_seconds=0.3)

    @inlineCallbacks
    def test_duration_cap(self) -> None:
        _, connector, acceptor = yield self.pair()
        for side in (connector, acceptor):
            _, code, reason = yield _within(side.closed)
            self.assertEqual(code, 4029)
            self.assertTrue(reason.startswith("rate-limited retry="), reason)

    @inlineCallbacks
    def test_counted_from_the_pairing(self) -> None:
        """
        --session-seconds counts from the pairing, not from a socket's
        upgrade: a connector offered for longer than the cap still gets the
        whole cap once accepted; a listener's control socket is never capped.
        """
        listener = yield self.listener()
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV})
        yield deferLater(reactor, 0.5, lambda: None)  # offered, not accepted, longer than the cap
        self.assertFalse(connector.closed.called)
        yield self.accept(listener)
        paired_at = reactor.seconds()
        yield _within(connector.next_json())
        _, code, _ = yield _within(connector.closed)
        self.assertEqual(code, 4029)
        self.assertGreaterEqual(reactor.seconds() - paired_at, 0.2)
        self.assertFalse(listener.closed.called)


class GlobalRateTests(_LimitsCase):
    rate = RateLimits(global_bytes_per_second=300_000)

    @inlineCallbacks
    def test_global_rate_shared(self) -> None:
        pairs = []
        for rdv in ("a1" * 32, "a2" * 32):
            pairs.append((yield self.pair(rdv)))
        per_pair = 600_000  # 1.2 MB in all: 0.3 MB burst, then ~3 s
        finished = []
        start = reactor.seconds()
        waits = []
        for _, connector, acceptor in pairs:
            done: Deferred[None] = Deferred()
            count = [0]

            def on_message(payload: bytes, is_binary: bool, count=count, done=done) -> None:
                count[0] += len(payload)
                if count[0] >= per_pair and not done.called:
                    finished.append(reactor.seconds())
                    done.callback(None)

            acceptor.onMessage = on_message
            for _ in range(per_pair // 20_000):
                connector.send_bytes(os.urandom(20_000))
            waits.append(done)
        yield _within(gatherResults(waits), 20)
        elapsed = max(finished) - start
        # 1.2 MB at 300 kB/s after a 300 kB burst: about 3 s.
        self.assertGreater(elapsed, 2.0, elapsed)
        self.assertLess(elapsed, 4.5, elapsed)


# -- flood ---------------------------------------------------------------------------

FLOOD_SCRIPT = r"""
import base64, json, os, socket, sys, threading, time
port = int(sys.argv[1]); attempts = int(sys.argv[2]); limit = float(sys.argv[3])
stats = {"attempts": 0, "statuses": {}, "garbage_connections": 0, "garbage_bytes": 0, "errors": 0}
stop = time.monotonic() + limit
def upgrade(xff):
    key = base64.b64encode(os.urandom(16)).decode()
    return ("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: pluresync.v1\r\n"
            f"X-Forwarded-For: {xff}\r\n\r\n").encode()
def garbage():
    while time.monotonic() < stop and stats["attempts"] < attempts:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(upgrade("203.0.113.77"))
                s.recv(4096)
                stats["garbage_connections"] += 1
                for _ in range(64):
                    s.sendall(os.urandom(16384))
                    stats["garbage_bytes"] += 16384
        except OSError:
            pass
        time.sleep(0.001)
threading.Thread(target=garbage, daemon=True).start()
print("started", flush=True)
while stats["attempts"] < attempts and time.monotonic() < stop:
    stats["attempts"] += 1
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(upgrade("203.0.113.66"))
            status = s.recv(64).split(b" ", 2)[1].decode()
            stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
    except (OSError, IndexError):
        stats["errors"] += 1
print(json.dumps(stats), flush=True)
"""


class _Flood(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.started: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"started" in self.out and not self.started.called:
            self.started.callback(None)

    def processEnded(self, reason: Any) -> None:
        if not self.started.called:
            self.started.callback(None)
        self.ended.callback(None)


class FloodTests(_LimitsCase):
    """
    Default limits, the relay trusting 127.0.0.1 as a proxy so each client
    has its own address (X-Forwarded-For): 3 well-behaved pairs transfer
    data, first alone (the baseline), then while one client opens
    connections as fast as it can (2000 attempts, at most 10 s) and another
    sends garbage after its upgrade (a separate, niced process).  The pairs
    must complete and keep at least 30% of the baseline throughput (it
    measures 0.45-0.69 on a 2-CPU machine, where the flood competes for the
    same CPUs; docs/benchmarks.md): the bound catches a relay that lets a
    flood starve its paired sessions, without failing on a busy CI machine.
    """

    rate = RateLimits(trusted_proxies=parse_networks(["127.0.0.1"]))
    PAIRS = 3
    BYTES = 24 * 1024 * 1024  # per pair
    FRACTION = 0.3

    @inlineCallbacks
    def transfer(self, pairs: list[Any]) -> Any:
        """Each pair's connector sends BYTES to its acceptor; return aggregate bytes/s."""
        chunk = 64 * 1024
        waits = []
        start = reactor.seconds()
        digests = []
        for _, connector, acceptor in pairs:
            done: Deferred[None] = Deferred()
            state = {"n": 0, "h": hashlib.sha256()}

            def on_message(payload: bytes, is_binary: bool, state=state, done=done) -> None:
                state["n"] += len(payload)
                state["h"].update(payload)
                if state["n"] >= self.BYTES and not done.called:
                    done.callback(None)

            acceptor.onMessage = on_message
            block = os.urandom(chunk)
            sent = hashlib.sha256()
            for _ in range(self.BYTES // chunk):
                connector.send_bytes(block)
                sent.update(block)
            digests.append((sent, state))
            waits.append(done)
        yield _within(gatherResults(waits), 60)
        elapsed = reactor.seconds() - start
        for sent, state in digests:
            self.assertEqual(state["h"].hexdigest(), sent.hexdigest())
        return self.PAIRS * self.BYTES / elapsed

    @inlineCallbacks
    def test_flood(self) -> None:
        pairs = []
        for i in range(self.PAIRS):
            pairs.append((yield self.pair_as(f"198.51.100.{i + 1}", f"{i + 1:02x}" * 32)))
        baseline = yield self.transfer(pairs)
        flood = _Flood()
        # The abuser would run on other machines; here it shares this one's
        # CPUs (2 on the test machine), so it runs niced: what is measured is
        # the relay's work for the flood, not the flooding process's own.
        nice = ["nice", "-n", "19"] if os.path.exists("/usr/bin/nice") else []
        argv = [*nice, sys.executable, "-c", FLOOD_SCRIPT, str(self.port_number), "2000", "10"]
        process = reactor.spawnProcess(flood, argv[0], argv, env=os.environ.copy())
        self.addCleanup(lambda: process.signalProcess("KILL") if flood.ended.called is False else None)
        yield _within(flood.started)
        yield _within(_sleep(0.3))
        under_flood = yield self.transfer(pairs)
        yield _within(flood.ended, 30)
        stats = json.loads(flood.out.decode().strip().splitlines()[-1])
        ratio = under_flood / baseline
        print(
            f"\nflood: baseline {baseline / 1e6:.1f} MB/s, under flood {under_flood / 1e6:.1f} MB/s "
            f"({ratio:.2f}); flood {stats}",
            file=sys.stderr,
        )
        self.assertGreater(stats["attempts"], 100)
        # The defaults admit a burst of 200 and 100 a second per address
        # (what one busy host does, issue 15): the rest of the flood is refused.
        self.assertGreater(stats["statuses"].get("429", 0), stats["attempts"] - 200 - 100 * 10 - 100)
        self.assertGreater(stats["garbage_connections"], 0)
        self.assertGreaterEqual(ratio, self.FRACTION, (baseline, under_flood, stats))
        # The pairs are unharmed, and still pipe.
        for _, connector, acceptor in pairs:
            self.assertEqual(connector.state, connector.STATE_OPEN)
            self.assertEqual(acceptor.state, acceptor.STATE_OPEN)
