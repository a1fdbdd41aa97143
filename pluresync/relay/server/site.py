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
from pluresync.relay.server.httppipe import HttpPipes, PipeRequest, PipeResource
from pluresync.relay.server.metrics import MetricsResource, RelayMetrics
from pluresync.relay.server.opening import OpeningChannel, OpeningConnections, Refusal
from pluresync.relay.server.websocket import RelayFactory, RelayResource


class RelaySite(Site):
    """
    A quiet C{Site} (no access log line per request, no factory chatter)
    whose connections have a deadline and a count until they are upgraded
    (L{pluresync.relay.server.opening}).
    """

    noisy = False
    protocol = OpeningChannel
    #: reads an HTTP pipe's upstream bodies as they arrive (httppipe.py)
    requestFactory = PipeRequest
    #: the HTTP pipes at C{/pipe}, by token (C{None}: this site serves none)
    pipes: HttpPipes | None = None
    health: HealthResource | None = None
    #: the connections not upgraded yet; C{None}: no deadline, not counted
    opening: OpeningConnections | None = None

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        opening = self.opening
        if opening is None:
            channel = super().buildProtocol(addr)
            channel.opening = _UNCOUNTED
            return channel
        status, key = opening.admit(addr)
        if status:
            return Refusal(status)
        channel = super().buildProtocol(addr)
        channel.counted_in(opening, key)
        return channel


def build_site(
    reactor: IReactorTime,
    limits: RelayLimits | None = None,
    metrics: bool = True,
    authenticator: Authenticator | None = None,
) -> tuple[RelaySite, RelayFactory]:
    """
    Build the relay: its WebSocket factory, and the C{Site} serving it at
    C{/} (subprotocol C{pluresync.v1}) next to the HTTP pipe (C{/pipe},
    for clients whose proxy refuses WebSockets), C{/health} and C{/metrics}.

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
    pipes = HttpPipes(factory)
    root.putChild(b"pipe", PipeResource(pipes))
    if metrics:
        root.putChild(b"metrics", MetricsResource(factory.metrics.registry))
    # Not twisted.web's idle timer: a deadline from the accept to the
    # upgrade (opening.py), ended by the WebSocket resource's take-over.
    site = RelaySite(root, timeout=None, reactor=reactor)
    site.opening = factory.opening
    site.health = health
    site.pipes = pipes
    return site, factory


def build_metrics_site(reactor: IReactorTime, metrics: RelayMetrics) -> RelaySite:
    """
    A C{Site} serving only C{/metrics} (C{--metrics-port}), e.g. on a
    private interface while the relay's port is public.
    """
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    site = RelaySite(root, timeout=None, reactor=reactor)
    site.opening = OpeningConnections(reactor, 30.0, 0, lambda: 0, _NO_LIMITER, ())
    return site


class _NoLimiter:
    max_concurrent = 0


_NO_LIMITER = _NoLimiter()
_UNCOUNTED = OpeningConnections(None, 0, 0, lambda: 0, _NO_LIMITER, ())
