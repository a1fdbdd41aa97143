"""
The relay's HTTP site: the WebSocket at C{/} and C{/health}, on one port.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Site

from .health import HealthResource
from .limits import RelayLimits
from .websocket import RelayFactory, RelayResource


class RelaySite(Site):
    """A quiet C{Site}: no access log line per request, no factory chatter."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def build_site(reactor: IReactorTime, limits: RelayLimits | None = None) -> tuple[RelaySite, RelayFactory]:
    """
    Build the relay: its WebSocket factory, and the C{Site} serving it at
    C{/} (subprotocol C{pluresync.v1}) next to C{/health}.

    @return: C{(site, factory)}; the factory holds the registry and the live
        sockets (C{factory.close_all()} shuts them down).
    """
    limits = limits or RelayLimits()
    factory = RelayFactory(reactor, limits)
    root = Resource()
    root.putChild(b"", RelayResource(factory))
    root.putChild(b"health", HealthResource(factory.stats, reactor))
    # The HTTP idle timeout bounds the time to send the upgrade request;
    # the WebSocket resource cancels it once the connection is taken over.
    timeout = limits.open_timeout if limits.open_timeout > 0 else None
    site = RelaySite(root, timeout=timeout, reactor=reactor)
    return site, factory
