"""
The Vercel relay as an ASGI application: C{GET /health}, the refusal of
plain HTTP, and the admission of WebSocket upgrades (configuration, Redis,
connection cap, auth, subprotocol) before a socket is handed to its
L{pluresync.relay.asgi.connection.RelaySocket}.

Vercel runs a Python function as an ASGI app; each WebSocket is pinned to the
function instance that took its upgrade, instances cannot reach each other,
and every connection ends at the function's maximum duration.  The package
docstring (L{pluresync.relay.asgi}) says how the parts fit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pluresync import __version__
from pluresync.relay.core.httpwire import DEFAULT_MAX_POST, parse_seq
from pluresync.relay.core.wire import SUBPROTOCOL

from .config import ConfigError, RelayConfig
from .connection import RelaySocket
from .httppipe import HttpPipe, forward_upstream
from .instance import RelayInstance

log = logging.getLogger("pluresync.relay.asgi")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

UNAUTHORIZED_REASON = "this relay requires a valid token"

#: The close code of a refused upgrade when the server cannot answer with HTTP (policy violation).
_POLICY_VIOLATION = 1008


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


@dataclass
class RelayApp:
    """
    The ASGI application: C{GET /health} and the relay WebSocket (any other
    path of a WebSocket upgrade is served too: behind Vercel's rewrite the
    function may see C{/api/relay}).
    """

    config: RelayConfig | None
    error: str | None = None
    relay: RelayInstance | None = field(default=None, init=False)
    #: this instance's HTTP pipes, by token (httppipe.py)
    http_pipes: dict[str, HttpPipe] = field(default_factory=dict, init=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RelayApp:
        try:
            return cls(RelayConfig.from_env(environ))
        except ConfigError as error:
            log.error("relay not configured: %s", error)
            return cls(None, str(error))

    def __post_init__(self) -> None:
        if self.config is not None:
            self.relay = RelayInstance(self.config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.relay is not None:
                    try:
                        await self.relay.ensure_started()
                    except Exception as error:
                        log.warning("start failed: %r", error)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.relay is not None:
                    await self.relay.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "/")
        if scope.get("method") == "POST" and path.rstrip("/").endswith("/pipe"):
            await self._pipe(scope, receive, send)
            return
        if path.rstrip("/").endswith("/health") or path == "/health":
            relay = self.relay
            if relay is not None:
                try:
                    await relay.ensure_started()
                except Exception as error:
                    log.warning("start failed: %r", error)
            ready = relay is not None and relay.ready
            body: dict[str, Any] = {
                "status": "ok" if ready else "degraded",
                "version": __version__,
                "uptime": round(time.monotonic() - relay.started_at, 3) if relay else 0.0,
                "ready": ready,
                "checks": {"redis": bool(relay and relay.redis_ok), "config": relay is not None},
                **(relay.stats() if relay else {"connections": 0, "listeners": 0, "sessions": 0, "pending": 0}),
            }
            if self.error:
                body["detail"] = self.error
            query = scope.get("query_string", b"").decode("latin-1")
            probe = any(
                part.split("=", 1)[0] == "ready" and part.split("=", 1)[-1].lower() not in ("0", "false", "no")
                for part in query.split("&")
                if part
            )
            status = 503 if probe and not ready else 200
            await _respond(
                send, status, _dumps(body).encode(), [(b"cache-control", b"no-store")], scope["method"] == "HEAD"
            )
            return
        await _respond(
            send,
            426,
            _dumps({"error": "this is a pluresync relay: open a WebSocket with the subprotocol pluresync.v1"}).encode(),
            [(b"upgrade", b"websocket")],
            scope.get("method") == "HEAD",
        )

    async def _pipe(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The HTTP pipe: an upstream (it carries C{Pluresync-Pipe}) or a new pipe's downstream."""
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", ())}
        token = headers.get("pluresync-pipe")
        if token is not None:
            status = await self._upstream(token.decode("ascii", "replace"), headers, receive)
            await send({"type": "http.response.start", "status": status, "headers": [(b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": b""})
            return
        relay = self.relay
        if relay is None:
            await _respond(send, 503, b"", [(b"retry-after", b"1")])
            return
        try:
            await relay.ensure_started()
        except Exception as error:
            log.warning("start failed: %r", error)
        refusal = _refusal(relay, {k: v.decode("latin-1") for k, v in headers.items()})
        if isinstance(refusal, tuple):
            status, text, extra = refusal
            await _respond(send, status, _dumps({"error": text}).encode(), extra)
            return
        limits = relay.config.limits
        pipe = HttpPipe(send, limits.max_message, limits.ping_interval)
        try:
            await pipe.claim(relay)
        except Exception as error:
            log.warning("HTTP pipe refused: Redis: %r", error)
            await _respond(send, 503, _dumps({"error": "relay unavailable"}).encode(), [(b"retry-after", b"1")])
            return
        await pipe.open(DEFAULT_MAX_POST)
        self.http_pipes[pipe.token] = pipe
        socket = RelaySocket(relay, pipe.receive, pipe.send, refusal)
        relay.sockets.add(socket)

        async def watch() -> None:
            # The downstream's request has no body; what comes next is its client leaving.
            while (await receive())["type"] != "http.disconnect":
                pass
            pipe.lost()

        watching = relay.spawn(watch())
        keeping = relay.spawn(pipe.keepalive())
        forwarded = relay.spawn(pipe.serve_forwarded(relay))
        try:
            await socket.run()
        finally:
            relay.sockets.discard(socket)
            self.http_pipes.pop(pipe.token, None)
            watching.cancel()
            keeping.cancel()
            forwarded.cancel()
            await pipe.end_response()
            await pipe.forget(relay)

    async def _upstream(self, token: str, headers: dict[str, bytes], receive: Receive) -> int:
        """Read an upstream's body into its pipe; the status to answer with."""
        pipe = self.http_pipes.get(token)
        length = headers.get("content-length")
        if pipe is None:
            relay = self.relay
            if relay is None or not relay.redis_ok or (length is not None and not length.isdigit()):
                return 404
            if length is not None and int(length) > DEFAULT_MAX_POST:
                return 413
            # Another instance may hold this pipe's downstream (Vercel's balancer chose this one).
            return await forward_upstream(relay, token, headers.get("pluresync-seq", b""), receive)
        if length is not None and (not length.isdigit() or int(length) > DEFAULT_MAX_POST):
            pipe.begin_upstream(None)
            return 413
        status = pipe.begin_upstream(parse_seq(headers.get("pluresync-seq", b"")))
        if status not in (0, 204):
            return status
        try:
            # Bounded: each turn reads one piece of the body, until its end or the client's.
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                if status == 0 and message.get("body"):
                    await pipe.upstream_data(message["body"])
                if not message.get("more_body"):
                    break
        finally:
            if status == 0:
                pipe.end_upstream()
        return 204

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        relay = self.relay
        if relay is None:
            await _refuse(scope, send, 503, "relay not configured")
            return
        try:
            await relay.ensure_started()
        except Exception as error:
            log.warning("start failed: %r", error)
        limits = relay.config.limits
        if relay.shutting_down or not relay.redis_ok:
            await _refuse(scope, send, 503, "relay unavailable", [(b"retry-after", b"1")])
            return
        if limits.max_connections and len(relay.sockets) >= limits.max_connections:
            await _refuse(scope, send, 503, "too many connections", [(b"retry-after", b"1")])
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        result = relay.config.auth.check(headers.get("authorization"), time.time())
        if not result.ok:
            await _refuse(
                scope,
                send,
                401,
                f"{UNAUTHORIZED_REASON} ({result.reason})",
                [(b"www-authenticate", b'Bearer realm="pluresync-relay"')],
            )
            return
        if SUBPROTOCOL not in scope.get("subprotocols", ()):
            await _refuse(scope, send, 400, f"the WebSocket subprotocol {SUBPROTOCOL} is required")
            return
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
        socket = RelaySocket(relay, receive, send, result.tenant)
        relay.sockets.add(socket)
        try:
            await socket.run()
        finally:
            relay.sockets.discard(socket)


def _refusal(relay: RelayInstance, headers: dict[str, str]) -> tuple[int, str, list] | str | None:
    """
    Whether an HTTP pipe may open (the same checks as an upgrade): the
    tenant (C{None}: open relay), or the refusal's status, text and headers.
    """
    limits = relay.config.limits
    if relay.shutting_down or not relay.redis_ok:
        return 503, "relay unavailable", [(b"retry-after", b"1")]
    if limits.max_connections and len(relay.sockets) >= limits.max_connections:
        return 503, "too many connections", [(b"retry-after", b"1")]
    result = relay.config.auth.check(headers.get("authorization"), time.time())
    if not result.ok:
        return (
            401,
            f"{UNAUTHORIZED_REASON} ({result.reason})",
            [(b"www-authenticate", b'Bearer realm="pluresync-relay"')],
        )
    return result.tenant


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], head: bool = False
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _refuse(scope: Scope, send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Refuse an upgrade with an HTTP status (ASGI's C{websocket.http.response}), else a 403."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = _dumps({"error": text}).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
