"""
The relay's HTTP site: the WebSocket at C{/}, C{/health} and C{/metrics}, on
one port (or C{/metrics} on a port of its own: L{build_metrics_site}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Site

from pluresync.relay.core.auth import Authenticator
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.health import HealthResource
from pluresync.relay.server.metrics import MetricsResource, RelayMetrics
from pluresync.relay.server.websocket import RelayFactory, RelayResource


class RelaySite(Site):
    """A quiet C{Site}: no access log line per request, no factory chatter."""

    noisy = False
    health: HealthResource | None = None

    def log(self, request: Any) -> None:
        pass


def build_site(
    reactor: IReactorTime,
    limits: RelayLimits | None = None,
    metrics: bool = True,
    authenticator: Authenticator | None = None,
) -> tuple[RelaySite, RelayFactory]:
    """
    Build the relay: its WebSocket factory, and the C{Site} serving it at
    C{/} (subprotocol C{pluresync.v1}) next to C{/health} and C{/metrics}.

    @param metrics: serve C{/metrics} on this site (false when it gets a
        port of its own, L{build_metrics_site}).
    @param authenticator: who may open a WebSocket (L{pluresync.relay.core.auth});
        default: everyone (L{pluresync.relay.core.auth.OpenAuth}). C{/health}
        stays open.
    @return: C{(site, factory)}; the factory holds the registry, the live
        sockets (C{factory.close_all()} shuts them down) and the metrics
        (C{factory.metrics}); C{site.health} is the C{/health} resource
        (add readiness checks to C{site.health.checks}).
    """
    limits = limits or RelayLimits()
    factory = RelayFactory(reactor, limits, authenticator)
    root = Resource()
    root.putChild(b"", RelayResource(factory))
    health = HealthResource(factory.stats, reactor, accepting=lambda: not factory.shutting_down)
    root.putChild(b"health", health)
    if metrics:
        root.putChild(b"metrics", MetricsResource(factory.metrics.registry))
    # The HTTP idle timeout bounds the time to send the upgrade request;
    # the WebSocket resource cancels it once the connection is taken over.
    timeout = limits.open_timeout if limits.open_timeout > 0 else None
    site = RelaySite(root, timeout=timeout, reactor=reactor)
    site.health = health
    return site, factory


def build_metrics_site(reactor: IReactorTime, metrics: RelayMetrics) -> RelaySite:
    """
    A C{Site} serving only C{/metrics} (C{--metrics-port}), e.g. on a
    private interface while the relay's port is public.
    """
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    return RelaySite(root, timeout=30, reactor=reactor)
