"""
The relay's Prometheus metrics, and the C{/metrics} resource that serves them.

One L{RelayMetrics} per relay (per L{RelayFactory}), with its own
C{CollectorRegistry}: several relays in one process (tests) never share or
collide.  The protocol calls a handful of small methods at session events
(a socket opens, a pair forms, a pair ends, an error is reported, an upgrade
is refused); nothing is called per frame: the bytes of a pair are added once,
when the pair ends, from the counts the protocol keeps anyway.  The gauges
(open connections, listeners, sessions, pending connectors) are not updated
at all: they are read from the factory's live C{stats()} at scrape time.

No metric has a label that carries a rendezvous, peer or session id or a
client address: the only labels are the wire error code (a closed set), the
refusal reason (C{auth} or C{limit}) and the version.  C{docs/relay.md}
("Metrics") documents every name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.web.resource import Resource

from pluresync.relay.core.wire import ErrorCode
from pluresync.version import __version__

#: The buckets of C{pluresync_relay_pairing_seconds}: a connector whose
#: listener is there waits for one incoming/accept round trip (milliseconds
#: to a second); one that waits for its listener may wait up to C{max_wait}.
PAIRING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: The refusal reasons of C{pluresync_relay_refused_total}.
REFUSED_REASONS = ("auth", "limit")

#: HTTP statuses of a refused WebSocket upgrade, by refusal reason.
_REFUSED_HTTP = {401: "auth", 403: "auth", 429: "limit", 503: "limit"}

#: Wire error codes that are also refusals.
_REFUSED_CODES = {ErrorCode.UNAUTHORIZED.value: "auth", ErrorCode.RATE_LIMITED.value: "limit"}

_PREFIX = "pluresync_relay_"


class _LiveCollector(Collector):
    """The gauges read from the relay's live state at scrape time."""

    _GAUGES = (
        ("open_connections", "connections", "Open relay WebSockets (including ones in the opening handshake)."),
        (
            "opening_connections",
            "opening",
            "TCP connections not upgraded yet (request being read).",
        ),
        ("listeners", "listeners", "Registered listeners (control channels)."),
        ("active_sessions", "sessions", "Paired sessions (pairs of sockets) currently forwarding."),
        ("pending_connectors", "pending", "Connectors waiting for a listener or for an accept."),
    )

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        for name, _, documentation in self._GAUGES:
            yield GaugeMetricFamily(_PREFIX + name, documentation)
        yield GaugeMetricFamily(_PREFIX + "cluster_peers", "Other relay instances of this cluster seen alive.")

    def collect(self) -> Iterator[Metric]:
        stats = self._metrics.stats()
        for name, key, documentation in self._GAUGES:
            yield GaugeMetricFamily(_PREFIX + name, documentation, value=stats.get(key, 0))
        yield GaugeMetricFamily(
            _PREFIX + "cluster_peers",
            "Other relay instances of this cluster seen alive.",
            value=self._metrics.cluster_peers(),
        )


def _no_stats() -> dict[str, int]:
    return {}


def _no_peers() -> int:
    return 0


class RelayMetrics:
    """
    The metrics of one relay.

    @ivar registry: the C{CollectorRegistry} holding them (give it to
        C{prometheus_client.generate_latest}, or serve L{MetricsResource}).
    @ivar stats: returns the live counts (C{connections}, C{listeners},
        C{sessions}, C{pending}), as C{RelayFactory.stats} does; read at
        scrape time.
    @ivar cluster_peers: returns the number of other cluster members seen
        alive (0 until clustering sets it); read at scrape time.

    The event methods are cheap (a dictionary lookup and a lock-protected
    addition each) and never raise for an unknown value.
    """

    def __init__(
        self,
        stats: Callable[[], dict[str, int]] = _no_stats,
        cluster_peers: Callable[[], int] = _no_peers,
        process: bool = True,
    ) -> None:
        """
        @param process: also collect the standard C{process_*} (Linux) and
            C{python_*} metrics of this process.
        """
        self.stats = stats
        self.cluster_peers = cluster_peers
        self.registry = registry = CollectorRegistry(auto_describe=True)
        registry.register(_LiveCollector(self))
        self._connections = Counter(
            _PREFIX + "connections",
            "Relay WebSockets opened (HTTP upgrade requests to /).",
            registry=registry,
        )
        self._pairings = Counter(
            _PREFIX + "pairings",
            "Connectors paired with a listener (sessions started).",
            registry=registry,
        )
        self._bytes = Counter(
            _PREFIX + "bytes_relayed",
            "Binary payload bytes forwarded, both directions, added when a pair ends.",
            registry=registry,
        )
        errors = Counter(
            _PREFIX + "errors",
            "Errors reported by the relay, by wire error code.",
            ["code"],
            registry=registry,
        )
        self._errors = {code.value: errors.labels(code=code.value) for code in ErrorCode}
        refused = Counter(
            _PREFIX + "refused",
            "Upgrades or requests refused, by reason: auth (HTTP 401/403, unauthorized) "
            "or limit (HTTP 503 at max connections, rate-limited).",
            ["reason"],
            registry=registry,
        )
        self._refused = {reason: refused.labels(reason=reason) for reason in REFUSED_REASONS}
        self._pairing_seconds = Histogram(
            _PREFIX + "pairing_seconds",
            "Time a connector waited, from its connect message to paired.",
            buckets=PAIRING_BUCKETS,
            registry=registry,
        )
        Info(_PREFIX[:-1], "The relay's version.", registry=registry).info({"version": __version__})
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    # -- session events (never per frame) ---------------------------------------

    def connection_opened(self) -> None:
        """A relay WebSocket connection was made (an upgrade request to C{/})."""
        self._connections.inc()

    def paired(self, wait_seconds: float) -> None:
        """A connector was paired after waiting C{wait_seconds}."""
        self._pairings.inc()
        self._pairing_seconds.observe(max(wait_seconds, 0.0))

    def pair_closed(self, bytes_a: int, bytes_b: int) -> None:
        """A pair ended; its sides had forwarded C{bytes_a} and C{bytes_b}."""
        self._bytes.inc(bytes_a + bytes_b)

    def error(self, code: str) -> None:
        """
        The relay reported the wire error C{code} (e.g. C{"bad-request"}).
        C{unauthorized} and C{rate-limited} also count as refusals (C{auth},
        C{limit}): do not call L{refused} for them as well.
        """
        counter = self._errors.get(code)
        if counter is not None:
            counter.inc()
            reason = _REFUSED_CODES.get(code)
            if reason is not None:
                self._refused[reason].inc()

    def refused(self, reason: str) -> None:
        """Something was refused for C{reason}: C{"auth"} or C{"limit"}."""
        counter = self._refused.get(reason)
        if counter is not None:
            counter.inc()

    def handshake_refused(self, status: int) -> None:
        """
        A WebSocket upgrade was answered with the HTTP error C{status}: 401
        and 403 count as C{auth} refusals, 429 and 503 as C{limit} ones,
        anything else (a malformed upgrade) is not a refusal.
        """
        reason = _REFUSED_HTTP.get(status)
        if reason is not None:
            self._refused[reason].inc()


class MetricsResource(Resource):
    """
    C{GET /metrics}: the registry in the Prometheus text format (or
    OpenMetrics, if the scraper asks for it in C{Accept}).

    Rendered synchronously in the reactor thread (prometheus_client's own
    Twisted resource uses a thread pool, which would read the relay's state
    from another thread); a scrape costs a few hundred microseconds.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encoder(self._registry)

    render_HEAD = render_GET
