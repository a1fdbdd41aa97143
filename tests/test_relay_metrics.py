"""
The relay's Prometheus metrics: what a scrape of C{/metrics} says after real
loopback sessions, C{--metrics-port}, C{/health} readiness, and the Grafana
dashboard and the documentation referring only to metrics that exist.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import treq
from autobahn.twisted.websocket import ConnectionDeny
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.metrics import RelayMetrics
from pluresync.relay.server.service import Options, makeService
from pluresync.relay.server.site import build_site
from pluresync.relay.server.websocket import RelayProtocol
from pluresync.wsframes import FastDataPath

from .relayclient import HandshakeFailed, RelayTestClient, connect

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
RELAY_DOC = ROOT / "docs" / "relay.md"

RDV = "ab" * 32
RDV2 = "cd" * 32
PEER_A = "0a" * 32
PEER_B = "0b" * 32

#: The only label names a pluresync_relay_* sample may carry.
ALLOWED_LABELS = {"code", "reason", "version", "le"}

LOOPBACK = "tcp:8080:interface=127.0.0.1"


def _within(d: Deferred[Any], seconds: float = 10.0) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Scrape:
    """One parsed C{/metrics} answer."""

    def __init__(self, code: int, content_type: str, text: str) -> None:
        self.code = code
        self.content_type = content_type
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)} if code == 200 else {}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample C{name} with exactly C{labels}."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        if len(found) != 1:
            raise AssertionError(f"{len(found)} samples {name}{labels} in:\n{self.text}")
        return found[0]

    def sample_names(self) -> set[str]:
        return {s.name for s in self.samples}


class MetricsTestCase(unittest.TestCase):
    """A relay on 127.0.0.1 with test clients and an HTTP pool, all cleaned up."""

    limits = RelayLimits(ping_interval=0, ping_timeout=0, hello_timeout=5, accept_timeout=5)

    def setUp(self) -> None:
        self.site, self.factory = build_site(reactor, self.limits)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        self.clients: list[RelayTestClient] = []
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @inlineCallbacks
    def tearDown(self) -> Any:
        for client in self.clients:
            client.abort()
        for client in self.clients:
            yield _within(client.closed)
        yield self.port.stopListening()
        yield _within(self.factory.close_all())
        yield self.pool.closeCachedConnections()

    def client(self) -> RelayTestClient:
        client = connect(reactor, self.port_number)
        self.clients.append(client)
        return client

    @inlineCallbacks
    def open(self) -> Any:
        client = self.client()
        yield _within(client.opened)
        return client

    @inlineCallbacks
    def pair(self, rdv: str = RDV) -> Any:
        """A listener and a connector paired through it: (listener, connector, acceptor, session)."""
        listener = yield self.open()
        listener.send_json({"v": 1, "op": "listen", "rdv": rdv, "peer": PEER_A})
        self.assertEqual((yield _within(listener.next_json()))["op"], "ready")
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": rdv, "from": PEER_B})
        incoming = yield _within(listener.next_json())
        acceptor = yield self.open()
        acceptor.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
        self.assertEqual((yield _within(acceptor.next_json()))["op"], "paired")
        self.assertEqual((yield _within(connector.next_json()))["op"], "paired")
        return listener, connector, acceptor, incoming["session"]

    @inlineCallbacks
    def get(self, path: str, port: int | None = None, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        """C{GET http://127.0.0.1:PORT/PATH}: (code, content-type, body)."""
        url = f"http://127.0.0.1:{port or self.port_number}{path}"
        response = yield _within(treq.get(url, pool=self.pool, headers=headers))
        body = yield _within(treq.content(response))
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
        return response.code, content_type, body

    @inlineCallbacks
    def scrape(self, port: int | None = None, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        code, content_type, body = yield self.get("/metrics", port, headers)
        return Scrape(code, content_type, body.decode("utf-8"))

    def assertNoIdentifiers(self, scrape: Scrape, *secrets: str) -> None:
        """No rendezvous/peer/session id or client address anywhere; only the allowed labels."""
        for line in scrape.text.splitlines():
            for secret in (*secrets, *(secret[:8] for secret in secrets), "127.0.0.1"):
                self.assertNotIn(secret, line)
        for sample in scrape.samples:
            if sample.name.startswith("pluresync_relay_"):
                self.assertLessEqual(set(sample.labels), ALLOWED_LABELS, sample)


class ScrapeTests(MetricsTestCase):
    """Counters, gauges and the histogram after real sessions."""

    @inlineCallbacks
    def test_pairing_and_bytes(self) -> Any:
        """One pairing, its bytes (at pair end), three connections, one histogram observation, no ids."""
        listener, connector, acceptor, session = yield self.pair()
        there = [os.urandom(1000), os.urandom(60000), b"x"]
        back = [os.urandom(5000)]
        for message in there:
            connector.send_bytes(message)
        for message in back:
            acceptor.send_bytes(message)
        for message in there:
            self.assertEqual((yield _within(acceptor.next_message())), (message, True))
        for message in back:
            self.assertEqual((yield _within(connector.next_message())), (message, True))

        during = yield self.scrape()
        self.assertEqual(during.code, 200)
        self.assertEqual(during.value("pluresync_relay_active_sessions"), 1)
        self.assertEqual(during.value("pluresync_relay_listeners"), 1)
        self.assertEqual(during.value("pluresync_relay_open_connections"), 3)
        self.assertEqual(during.value("pluresync_relay_pending_connectors"), 0)
        self.assertEqual(during.value("pluresync_relay_pairings_total"), 1)
        # Bytes are added when the pair ends, never per frame.
        self.assertEqual(during.value("pluresync_relay_bytes_relayed_total"), 0)

        yield _within(connector.close_normally())
        yield _within(acceptor.closed)
        after = yield self.scrape()
        total = sum(map(len, there + back))
        self.assertEqual(after.value("pluresync_relay_bytes_relayed_total"), total)
        self.assertEqual(after.value("pluresync_relay_pairings_total"), 1)
        self.assertEqual(after.value("pluresync_relay_connections_total"), 3)
        self.assertEqual(after.value("pluresync_relay_active_sessions"), 0)
        self.assertEqual(after.value("pluresync_relay_open_connections"), 1)
        self.assertEqual(after.value("pluresync_relay_pairing_seconds_count"), 1)
        waited = after.value("pluresync_relay_pairing_seconds_sum")
        self.assertTrue(0 < waited < 10, waited)
        self.assertEqual(after.value("pluresync_relay_pairing_seconds_bucket", le="+Inf"), 1)
        self.assertEqual(after.value("pluresync_relay_cluster_peers"), 0)
        for code in ("bad-request", "peer-gone", "no-listener", "timeout"):
            self.assertEqual(after.value("pluresync_relay_errors_total", code=code), 0)
        self.assertEqual(after.value("pluresync_relay_refused_total", reason="auth"), 0)
        self.assertEqual(after.value("pluresync_relay_refused_total", reason="limit"), 0)
        info = [s for s in after.samples if s.name == "pluresync_relay_info"]
        self.assertEqual(len(info), 1)
        self.assertEqual(set(info[0].labels), {"version"})
        self.assertNoIdentifiers(after, RDV, PEER_A, PEER_B, session)
        self.assertNoIdentifiers(during, RDV, PEER_A, PEER_B, session)

    @inlineCallbacks
    def test_errors_by_code(self) -> Any:
        """Wire errors are counted by code: bad-request, no-listener, peer-gone."""
        bad = yield self.open()
        bad.send_text(b"not json")
        yield _within(bad.closed)
        lonely = yield self.open()
        lonely.send_json({"v": 1, "op": "connect", "rdv": RDV2, "wait": 0})
        yield _within(lonely.closed)
        _, connector, acceptor, session = yield self.pair()
        connector.send_bytes(b"12345")
        yield _within(acceptor.next_message())
        connector.abort()
        _, code, _ = yield _within(acceptor.closed)
        self.assertEqual(code, 4010)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value("pluresync_relay_errors_total", code="bad-request"), 1)
        self.assertEqual(scrape.value("pluresync_relay_errors_total", code="no-listener"), 1)
        self.assertEqual(scrape.value("pluresync_relay_errors_total", code="peer-gone"), 1)
        self.assertEqual(scrape.value("pluresync_relay_errors_total", code="timeout"), 0)
        self.assertEqual(scrape.value("pluresync_relay_bytes_relayed_total"), 5)
        codes = {s.labels["code"] for s in scrape.samples if s.name == "pluresync_relay_errors_total"}
        self.assertEqual(
            codes,
            {
                "bad-request",
                "unauthorized",
                "no-listener",
                "no-session",
                "timeout",
                "too-large",
                "peer-gone",
                "rate-limited",
            },
        )
        self.assertNoIdentifiers(scrape, RDV, RDV2, PEER_A, PEER_B, session)

    @inlineCallbacks
    def test_refused_auth(self) -> Any:
        """An upgrade denied with HTTP 401 in onConnect counts as refused{reason="auth"}."""

        class Denying(RelayProtocol):
            def onConnect(self, request: Any) -> str:
                raise ConnectionDeny(401, "no token")

        self.factory.protocol = Denying
        client = self.client()
        failure = yield self.assertFailure(_within(client.opened), HandshakeFailed)
        self.assertIsInstance(failure, HandshakeFailed)
        yield _within(client.closed)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value("pluresync_relay_refused_total", reason="auth"), 1)
        self.assertEqual(scrape.value("pluresync_relay_refused_total", reason="limit"), 0)


class LimitTests(MetricsTestCase):
    """Refusals by limit."""

    limits = RelayLimits(ping_interval=0, ping_timeout=0, hello_timeout=5, max_connections=1, max_pending=1)

    @inlineCallbacks
    def test_refused_limit(self) -> Any:
        """A 503 at --max-connections and a rate-limited connector count as refused{reason="limit"}."""
        first = yield self.open()
        second = self.client()
        yield self.assertFailure(_within(second.opened), HandshakeFailed)
        yield _within(second.closed)
        first.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 30})
        yield deferLater(reactor, 0.05, lambda: None)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value("pluresync_relay_refused_total", reason="limit"), 1)
        self.assertEqual(scrape.value("pluresync_relay_pending_connectors"), 1)
        self.assertEqual(scrape.value("pluresync_relay_connections_total"), 2)


class RateLimitTests(MetricsTestCase):
    limits = RelayLimits(ping_interval=0, ping_timeout=0, hello_timeout=5, max_pending=1)

    @inlineCallbacks
    def test_rate_limited_is_a_limit_refusal(self) -> Any:
        """rate-limited (4029) counts as an error and as refused{reason="limit"}."""
        waiting = yield self.open()
        waiting.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 30})
        yield deferLater(reactor, 0.05, lambda: None)
        extra = yield self.open()
        extra.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 30})
        _, code, _ = yield _within(extra.closed)
        self.assertEqual(code, 4029)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value("pluresync_relay_errors_total", code="rate-limited"), 1)
        self.assertEqual(scrape.value("pluresync_relay_refused_total", reason="limit"), 1)


class ExpositionTests(MetricsTestCase):
    """The resource, the registry and the per-frame path."""

    @inlineCallbacks
    def test_content_types(self) -> Any:
        """Prometheus text by default, OpenMetrics when asked for."""
        plain = yield self.scrape()
        self.assertTrue(plain.content_type.startswith("text/plain; version="), plain.content_type)
        code, content_type, body = yield self.get(
            "/metrics", headers={b"accept": [b"application/openmetrics-text; version=1.0.0"]}
        )
        self.assertEqual(code, 200)
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_registries_are_separate(self) -> None:
        """Two relays in one process have their own registries and counts."""
        _, other = build_site(reactor, self.limits)
        self.assertIsNot(other.metrics.registry, self.factory.metrics.registry)
        other.metrics.paired(0.1)
        self.assertEqual(other.metrics.registry.get_sample_value("pluresync_relay_pairings_total"), 1)
        self.assertEqual(self.factory.metrics.registry.get_sample_value("pluresync_relay_pairings_total"), 0)

    def test_unknown_values_ignored(self) -> None:
        """An unknown code or reason adds no label value and does not raise."""
        metrics = RelayMetrics(process=False)
        metrics.error("no-such-code")
        metrics.refused("no-such-reason")
        metrics.handshake_refused(400)
        registry = metrics.registry
        self.assertIsNone(registry.get_sample_value("pluresync_relay_errors_total", {"code": "no-such-code"}))
        for reason in ("auth", "limit"):
            self.assertEqual(registry.get_sample_value("pluresync_relay_refused_total", {"reason": reason}), 0)

    def test_per_frame_path_has_no_metrics(self) -> None:
        """The forwarding path (fast path and Autobahn's) never touches metrics."""
        for function in (RelayProtocol._forward, RelayProtocol.onMessage, FastDataPath.dataReceived):
            self.assertNotIn("metrics", inspect.getsource(function), function)


class MetricsPortTests(unittest.TestCase):
    """--metrics-port moves /metrics to an endpoint of its own."""

    def test_option(self) -> None:
        options = Options()
        options.parseOptions(["--port", LOOPBACK, "--metrics-port", "9100"])
        self.assertEqual(options["metrics-endpoint"], "tcp:9100")
        options = Options()
        options.parseOptions(["--port", LOOPBACK, "--metrics-port", "tcp:9100:interface=127.0.0.1"])
        self.assertEqual(options["metrics-endpoint"], "tcp:9100:interface=127.0.0.1")
        options = Options()
        options.parseOptions(["--port", LOOPBACK])
        self.assertIsNone(options["metrics-endpoint"])

    @inlineCallbacks
    def _serve(self, *extra: str) -> Any:
        main = free_port()
        options = Options()
        options.parseOptions(["--port", f"tcp:{main}:interface=127.0.0.1", "--ping-interval", "0", *extra])
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        yield deferLater(reactor, 0, lambda: None)
        return main

    @inlineCallbacks
    def _get(self, port: int, path: str) -> Any:
        pool = HTTPConnectionPool(reactor, persistent=False)
        try:
            response = yield _within(treq.get(f"http://127.0.0.1:{port}{path}", pool=pool))
            body = yield _within(treq.content(response))
        finally:
            yield pool.closeCachedConnections()
        return response.code, body

    @inlineCallbacks
    def test_metrics_on_main_port_by_default(self) -> Any:
        main = yield self._serve()
        code, body = yield self._get(main, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"pluresync_relay_info{", body)

    @inlineCallbacks
    def test_metrics_port_moves_it(self) -> Any:
        metrics = free_port()
        main = yield self._serve("--metrics-port", f"tcp:{metrics}:interface=127.0.0.1")
        code, body = yield self._get(metrics, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"pluresync_relay_open_connections", body)
        code, _ = yield self._get(main, "/metrics")
        self.assertEqual(code, 404)
        code, _ = yield self._get(main, "/health")
        self.assertEqual(code, 200)
        code, _ = yield self._get(metrics, "/health")
        self.assertEqual(code, 404)


class HealthTests(MetricsTestCase):
    """/health: cheap, with readiness."""

    @inlineCallbacks
    def health(self, query: str = "") -> Any:
        code, content_type, body = yield self.get("/health" + query)
        self.assertEqual(content_type, "application/json")
        return code, json.loads(body)

    @inlineCallbacks
    def test_ready_by_default(self) -> Any:
        code, body = yield self.health()
        self.assertEqual(code, 200)
        self.assertIs(body["ready"], True)
        self.assertEqual(body["checks"], {})
        self.assertEqual(body["status"], "ok")
        code, body = yield self.health("?ready=1")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_failing_check(self) -> Any:
        """A failing (or raising) check: ready false; 503 only for ?ready=1."""
        checks = self.site.health.checks
        checks["redis"] = lambda: False

        def broken() -> bool:
            raise RuntimeError("boom")

        checks["other"] = broken
        code, body = yield self.health()
        self.assertEqual(code, 200)
        self.assertIs(body["ready"], False)
        self.assertEqual(body["checks"], {"redis": False, "other": False})
        for query in ("?ready=1", "?ready=true"):
            code, body = yield self.health(query)
            self.assertEqual(code, 503, query)
            self.assertIs(body["ready"], False)
        code, _ = yield self.health("?ready=0")
        self.assertEqual(code, 200)
        checks["redis"] = lambda: True
        checks["other"] = lambda: True
        code, body = yield self.health("?ready=1")
        self.assertEqual((code, body["ready"], body["checks"]), (200, True, {"redis": True, "other": True}))

    @inlineCallbacks
    def test_not_ready_while_shutting_down(self) -> Any:
        self.factory.shutting_down = True
        code, body = yield self.health("?ready=1")
        self.assertEqual((code, body["ready"]), (503, False))


class DashboardAndDocsTests(MetricsTestCase):
    """deploy/grafana-dashboard.json and docs/relay.md name only metrics that exist."""

    @inlineCallbacks
    def test_dashboard(self) -> Any:
        dashboard = json.loads(DASHBOARD.read_text("utf-8"))
        self.assertTrue(dashboard["panels"])
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
        used = {name for expr in exprs for name in re.findall(r"\bpluresync_relay_\w+", expr)}
        scrape = yield self.scrape()
        self.assertTrue(used)
        self.assertLessEqual(used, scrape.sample_names())
        for family in ("pairings", "bytes_relayed", "errors", "pairing_seconds", "open_connections", "active_sessions"):
            self.assertTrue(any(name.startswith("pluresync_relay_" + family) for name in used), family)

    @inlineCallbacks
    def test_docs_name_every_metric(self) -> Any:
        doc = RELAY_DOC.read_text("utf-8")
        scrape = yield self.scrape()
        # (The text parser makes a family of each counter's _created samples.)
        families = {n for n in scrape.families if n.startswith("pluresync_relay_") and not n.endswith("_created")}
        # The parser names counters without _total and the info metric without _info.
        exposed = {s.name for s in scrape.samples if s.name.startswith("pluresync_relay_")}
        documented = set(re.findall(r"\bpluresync_relay_\w+", doc))
        for family in families:
            self.assertTrue(any(name == family or name.startswith(family + "_") for name in documented), family)
        for name in documented:
            self.assertTrue(name in exposed or name in families, name)
