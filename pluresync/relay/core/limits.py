"""
The limits of a relay, with production-safe defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from pluresync.relay.core.ratelimit import RateLimits

#: pluresync clients send binary messages of up to two 65,537-byte record
#: frames (131,074 bytes); a relay must accept at least this much.
MIN_MAX_MESSAGE = 135168


@dataclass(frozen=True)
class RelayLimits:
    """
    Every limit and timeout the relay enforces; times are in seconds.

    @ivar max_message: the largest WebSocket frame and message payload
        accepted (and sent), in bytes; a larger one closes the sender with
        C{too-large} (4009).
    @ivar open_timeout: time allowed for the HTTP request and the WebSocket
        opening handshake.
    @ivar hello_timeout: time allowed, after the upgrade, for the client's
        one control message.
    @ivar ping_interval: idle time after which the relay pings a client
        (0 disables pings).
    @ivar ping_timeout: time a client has to answer a ping before it is
        considered dead.
    @ivar close_timeout: time a client has to answer the relay's close frame
        before the TCP connection is dropped; buffered data is still being
        delivered meanwhile.
    @ivar max_connections: concurrent WebSocket connections; beyond it the
        upgrade is refused with HTTP 503 (0 means unlimited).
    @ivar max_pending: connectors waiting or offered per rendezvous id; beyond
        it a connector gets C{rate-limited} (4029).
    @ivar max_wait: the longest C{wait} a connector may ask for.
    @ivar default_wait: the C{wait} of a connector that does not give one.
    @ivar accept_timeout: time a listener has to accept an C{incoming}.
    @ivar shutdown_timeout: time C{stopService} waits for sockets to close
        before dropping the rest.
    """

    max_message: int = 262144
    open_timeout: float = 10.0
    hello_timeout: float = 10.0
    ping_interval: float = 25.0
    ping_timeout: float = 10.0
    close_timeout: float = 10.0
    max_connections: int = 10000
    max_pending: int = 64
    max_wait: float = 120.0
    default_wait: float = 30.0
    accept_timeout: float = 10.0
    shutdown_timeout: float = 5.0
    #: rate limits and quotas (L{pluresync.relay.core.ratelimit.RateLimits})
    rate: RateLimits = RateLimits()

    def __post_init__(self) -> None:
        if self.max_message < MIN_MAX_MESSAGE:
            raise ValueError(
                f"max_message must be at least {MIN_MAX_MESSAGE} bytes (pluresync clients send up to 131,074)"
            )
        for name in (
            "open_timeout",
            "hello_timeout",
            "ping_interval",
            "ping_timeout",
            "close_timeout",
            "max_wait",
            "default_wait",
            "accept_timeout",
            "shutdown_timeout",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("max_connections", "max_pending"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
