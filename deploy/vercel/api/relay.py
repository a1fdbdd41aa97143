"""
PLACEHOLDER for the backup relay on Vercel (wss://pluresdb-relay.vercel.app).

NOT IMPLEMENTED. The Vercel relay arrives with issue 5. Until then this
function answers every request, including ``GET /health``, with HTTP 501 and
``{"status": "not-implemented", "detail": "..."}``, and refuses WebSocket
upgrades the same way, so a client that tries ``relay:vercel`` (or ``auto:``
failing over to it) gets a clear error at once instead of a hang, and a
monitor never mistakes the placeholder for a healthy relay.

Why it is not just the Twisted relay: see deploy/vercel/README.md (each
WebSocket is pinned to one function instance, instances cannot reach each
other, and connections end at the function's maximum duration). The real
function will run the Twisted-free pairing core ``pluresync/relay/pairing.py``
with pairing shared between instances through Redis.

Standard library only: Vercel's Python runtime serves a
``BaseHTTPRequestHandler`` subclass named ``handler``.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

DETAIL = (
    "The pluresync backup relay on Vercel is not implemented yet (issue 5): "
    "Vercel pins each WebSocket to one function instance, instances cannot reach "
    "each other, and connections close at the function's maximum duration, so "
    "pairing needs the shared Redis-backed pairing core first. Use the primary "
    "relay (relay:azure) or your own (twist pluresync-relay; docs/deploy.md)."
)

UPGRADE_DETAIL = "WebSocket upgrade refused: " + DETAIL


def response_body(upgrade: bool) -> bytes:
    """The JSON body every request gets (a WebSocket upgrade, or not)."""
    return json.dumps(
        {"status": "not-implemented", "detail": UPGRADE_DETAIL if upgrade else DETAIL},
        separators=(",", ":"),
    ).encode("utf-8")


def is_websocket_upgrade(headers) -> bool:
    """Whether the request asks to upgrade to a WebSocket."""
    return (headers.get("Upgrade") or "").strip().lower() == "websocket"


class handler(BaseHTTPRequestHandler):  # noqa: N801 - the name Vercel's Python runtime looks for
    """Answers 501 to everything: /health, /, and WebSocket upgrades."""

    def _not_implemented(self, send_body: bool = True) -> None:
        upgrade = is_websocket_upgrade(self.headers)
        body = response_body(upgrade)
        self.send_response(501)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        # Not "101 Switching Protocols": the upgrade is refused and the
        # connection is closed after this response.
        self.send_header("Connection", "close")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        self._not_implemented()

    def do_HEAD(self) -> None:  # noqa: N802
        self._not_implemented(send_body=False)

    def do_POST(self) -> None:  # noqa: N802
        self._not_implemented()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        """Quiet: no per-request log lines (the relay never logs client addresses)."""
