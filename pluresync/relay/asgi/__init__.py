"""
The backup relay as an ASGI application (the Vercel front), clustered through
Redis.  Relay protocol v1 (C{docs/protocol.md}) exactly as the Twisted relay
speaks it; no Twisted, no Autobahn in this package.

Vercel runs a Python function as an ASGI app; each WebSocket is pinned to the
function instance that took its upgrade, instances cannot reach each other,
and every connection ends at the function's maximum duration.  So:

 - L{config}: everything comes from the environment (L{RelayConfig.from_env});
 - L{app}: the ASGI application (C{/health}, refusals, the upgrade);
 - L{instance}: one function instance: its pairing registry (the shared
   L{pluresync.relay.core.pairing.Registry}) and its Redis signalling, the
   cluster protocol both relay fronts share
   (L{pluresync.relay.cluster.protocol}: keys, messages, stand-in
   listeners, look-ups);
 - L{connection}: one WebSocket, a thin adapter over the session rules every
   front shares (L{pluresync.relay.core.session.RelaySession});
 - L{pipe}: one side of a pair: data never uses pub/sub (it drops slow
   subscribers) but Redis lists with a credit window;
 - a socket is closed with 1001 C{going away} shortly before the function's
   maximum duration (L{RelayConfig.socket_seconds}: L{RelayConfig.max_duration}
   − L{RelayConfig.close_margin} after its upgrade, announced to clients as
   C{session_seconds}); its partner gets 1001 too.

C{deploy/vercel/api/relay.py} serves C{create_app()}.
"""

from __future__ import annotations

from .app import RelayApp
from .config import ConfigError, RelayConfig


def create_app(environ: dict[str, str] | None = None) -> RelayApp:
    """The relay application configured from C{environ} (default: C{os.environ})."""
    return RelayApp.from_env(environ)


__all__ = ["ConfigError", "RelayApp", "RelayConfig", "create_app"]
