"""
The Vercel relay's configuration, read from the environment.

Vercel passes settings to a function only as environment variables, so this
is the one place that reads them (L{RelayConfig.from_env}); everything else
receives a L{RelayConfig}.  Kept apart from the application so a
misconfigured function can still import, start and answer C{/health} with
the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pluresync.relay.core.auth import Authenticator, OpenAuth, SignedTokenAuth, parse_secret_file
from pluresync.relay.core.limits import RelayLimits

#: The Redis key prefix of the Vercel relay (see L{pluresync.relay.cluster.protocol}).
DEFAULT_PREFIX = "pluresync:vercel:"


class ConfigError(ValueError):
    """The environment does not configure a usable relay."""


@dataclass(frozen=True)
class RelayConfig:
    """
    Everything the Vercel relay reads from its environment.

    @ivar redis_url: C{redis://} or C{rediss://} URL (C{PLURESYNC_REDIS_URL},
        else C{REDIS_URL}, else C{KV_URL}).
    @ivar max_duration: the function's maximum duration, seconds
        (C{PLURESYNC_MAX_DURATION}, default 300 as in C{vercel.json}).
    @ivar close_margin: how long before C{max_duration} the relay closes a
        socket with 1001 (C{PLURESYNC_CLOSE_MARGIN}, default 5).
    @ivar window: messages one side may have unread in Redis
        (C{PLURESYNC_WINDOW}, default 16).
    @ivar redis_max_connections: the instance's Redis connection pool
        (C{PLURESYNC_REDIS_MAX_CONNECTIONS}, default 2000): each end of a
        pair holds one in C{BLPOP}, its writer a second while out of credit.
    """

    redis_url: str
    auth: Authenticator
    limits: RelayLimits = RelayLimits()
    max_duration: float = 300.0
    close_margin: float = 5.0
    window: int = 16
    prefix: str = DEFAULT_PREFIX
    heartbeat: float = 2.0
    ttl: float = 6.0
    answer_timeout: float = 5.0
    poll: float = 1.0
    data_ttl: int = 120
    redis_max_connections: int = 2000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RelayConfig:
        """
        Read C{PLURESYNC_*} variables (see C{deploy/vercel/README.md}).

        C{PLURESYNC_AUTH} must be given: C{open}, or C{signed} with the
        secrets (one per line, at least 32 characters) in
        C{PLURESYNC_AUTH_SECRETS}.

        @raise ConfigError: a missing or malformed setting.
        """
        env = dict(os.environ if environ is None else environ)
        url = env.get("PLURESYNC_REDIS_URL") or env.get("REDIS_URL") or env.get("KV_URL")
        if not url:
            raise ConfigError("no Redis: set PLURESYNC_REDIS_URL (redis:// or rediss://)")
        mode = env.get("PLURESYNC_AUTH", "").strip().lower()
        if mode == "open":
            auth: Authenticator = OpenAuth()
        elif mode == "signed":
            secrets = env.get("PLURESYNC_AUTH_SECRETS", "").replace("\\n", "\n").encode()
            try:
                auth = SignedTokenAuth(parse_secret_file(secrets, "PLURESYNC_AUTH_SECRETS"))
            except ValueError as error:
                raise ConfigError(str(error)) from None
        else:
            raise ConfigError(
                "choose who may use this relay: PLURESYNC_AUTH=signed with PLURESYNC_AUTH_SECRETS, "
                "or PLURESYNC_AUTH=open"
            )

        def number(name: str, default: float, minimum: float) -> float:
            text = env.get(name)
            if text is None or text == "":
                return default
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {text!r}") from None
            if not value >= minimum or value == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= {minimum:g}")
            return value

        limits = RelayLimits(
            max_message=int(number("PLURESYNC_MAX_MESSAGE", 262144, 135168)),
            hello_timeout=number("PLURESYNC_HELLO_TIMEOUT", 10.0, 0),
            accept_timeout=number("PLURESYNC_ACCEPT_TIMEOUT", 10.0, 0),
            max_wait=number("PLURESYNC_MAX_WAIT", 120.0, 0),
            max_pending=int(number("PLURESYNC_MAX_PENDING", 64, 1)),
            max_connections=int(number("PLURESYNC_MAX_CONNECTIONS", 10000, 0)),
        )
        return cls(
            redis_url=url,
            auth=auth,
            limits=limits,
            max_duration=number("PLURESYNC_MAX_DURATION", 300.0, 1),
            close_margin=number("PLURESYNC_CLOSE_MARGIN", 5.0, 0),
            window=int(number("PLURESYNC_WINDOW", 16, 1)),
            prefix=env.get("PLURESYNC_REDIS_PREFIX", DEFAULT_PREFIX),
            redis_max_connections=int(number("PLURESYNC_REDIS_MAX_CONNECTIONS", 2000, 1)),
        )

    @property
    def socket_seconds(self) -> float:
        """
        Seconds after its upgrade at which the relay closes a socket, in
        any phase, with 1001 C{going away}: C{max_duration - close_margin},
        at least half a second.  Announced as C{session_seconds}.
        """
        return max(0.5, self.max_duration - self.close_margin)

    @property
    def announced_limits(self) -> dict[str, Any]:
        """
        The C{limits} object of C{ready}/C{paired} (the same shape as the
        Twisted relay's): C{session_seconds} is L{socket_seconds}, counted
        from each socket's own upgrade (docs/protocol.md).
        """
        return {**self.limits.rate.announced(self.limits.max_message), "session_seconds": self.socket_seconds}
