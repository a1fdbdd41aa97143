"""
The C{/health} resource: a small JSON status document for load balancers
and operators.  It carries counts only, never a rendezvous, peer or session
id.  C{/health} is the liveness probe (always 200 while the process serves);
C{/health?ready=1} is the readiness probe (503 while not ready).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource

from pluresync.version import __version__


class HealthResource(Resource):
    """
    C{GET /health} → C{{"status":"ok","version":...,"uptime":seconds,
    "ready":true,"checks":{},"fd_limit":N,"connections":N,"listeners":N,
    "sessions":N,"pending":N}}} (C{fd_limit} once the relay service started:
    its soft file descriptor limit, L{pluresync.relay.server.fdlimit}).

    C{ready} is true while the relay takes new WebSockets (not shutting
    down) and every readiness check passes; C{checks} gives each check's
    result by name.  C{GET /health?ready=1} answers 503 (same body) when not
    ready; plain C{/health} always answers 200.

    @param stats: returns the live counts (C{connections}, C{listeners},
        C{sessions}, C{pending}).
    @param clock: gives the current time; uptime counts from construction.
    @param accepting: returns whether the relay takes new WebSockets.
    @ivar checks: readiness checks by name (e.g. C{"redis"} once the relay
        is clustered): each returns a bool, and must be cheap and never block
        (report a connection's known state, do not probe it); one that
        raises counts as failed.
    """

    isLeaf = True

    def __init__(
        self,
        stats: Callable[[], dict[str, int]],
        clock: IReactorTime,
        accepting: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__()
        self._stats = stats
        self._clock = clock
        self._started = clock.seconds()
        self._accepting = accepting
        self.checks: dict[str, Callable[[], bool]] = {}
        #: Fixed facts about the process (C{fd_limit}: its soft file descriptor limit, set at start).
        self.info: dict[str, Any] = {}

    def render_GET(self, request: Any) -> bytes:
        checks = {name: _passes(check) for name, check in self.checks.items()}
        ready = all(checks.values()) and (self._accepting is None or self._accepting())
        body: dict[str, Any] = {
            # "degraded": a check failed (e.g. redis: clustering paused,
            # local pairing goes on).
            "status": "ok" if all(checks.values()) else "degraded",
            "version": __version__,
            "uptime": round(self._clock.seconds() - self._started, 3),
            "ready": ready,
            "checks": checks,
        }
        body.update(self.info)
        body.update(self._stats())
        probe = (request.args or {}).get(b"ready")
        if not ready and probe and probe[-1].lower() not in (b"0", b"false", b"no"):
            request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    render_HEAD = render_GET


def _passes(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
