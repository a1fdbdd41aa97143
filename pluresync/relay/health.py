"""
The C{/health} resource: a small JSON status document for load balancers
and operators.  It carries counts only, never a rendezvous, peer or session
id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource

from .._version import __version__


class HealthResource(Resource):
    """
    C{GET /health} → C{{"status":"ok","version":...,"uptime":seconds,
    "connections":N,"listeners":N,"sessions":N,"pending":N}}.

    @param stats: returns the live counts (C{connections}, C{listeners},
        C{sessions}, C{pending}).
    @param clock: gives the current time; uptime counts from construction.
    """

    isLeaf = True

    def __init__(self, stats: Callable[[], dict[str, int]], clock: IReactorTime) -> None:
        super().__init__()
        self._stats = stats
        self._clock = clock
        self._started = clock.seconds()

    def render_GET(self, request: Any) -> bytes:
        body = {
            "status": "ok",
            "version": __version__,
            "uptime": round(self._clock.seconds() - self._started, 3),
        }
        body.update(self._stats())
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    render_HEAD = render_GET
