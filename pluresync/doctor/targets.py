"""
Which transports the doctor checks: each relay path of an endpoint string
(C{relay:...} is one, C{auto:...} is each of its paths), of a seed config
file, or of the default C{auto:}.

The checks never use the sync key (the round trip pairs with a fresh random
key), so a missing key is reported as a note and the network is checked
anyway; the key's text is never printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.endpoints import _parse

from pluresync.errors import ConfigurationError, KeyFileError
from pluresync.keys import SyncKey


@dataclass
class Targets:
    """
    @ivar paths: the L{RelayConfig}s to check, in priority order.
    @ivar notes: warnings about the configuration (a missing key, ...).
    @ivar source: what was checked, for the report's header (never the
        endpoint string itself: it may hold a key).
    """

    paths: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = ""
    #: the STUN servers of C{auto:}'s direct path (C{stun=}); C{None}: no direct path to look at
    stun: tuple | None = None


def _split(description: str) -> tuple[str, list[str], dict[str, str]]:
    args, kwargs = _parse(description)
    if not args:
        raise ConfigurationError("empty endpoint string; give relay:... or auto:...")
    prefix, rest = args[0], args[1:]
    return str(prefix), [str(a) for a in rest], {str(k): str(v) for k, v in kwargs.items()}


def _parse_paths(prefix: str, args: list[str], kwargs: dict[str, str]) -> tuple[list, tuple | None]:
    from pluresync.endpoints.parsers import auto_config, relay_config

    if prefix == "relay":
        return [relay_config(*args, **kwargs)], None
    if prefix == "auto":
        from pluresync.endpoints.relay import RelayConfig

        # The relays, each checked end to end; the direct path's UDP and NAT
        # as advice (the LAN path has no checks yet).
        config = auto_config(*args, **kwargs)
        stun = config.upgrade.stun if config.upgrade is not None else None
        return [path for path in config.paths if isinstance(path, RelayConfig)], stun
    if prefix == "direct":
        raise ConfigurationError("the doctor does not check direct: (the LAN) yet; it checks relay: and auto:'s relays")
    raise ConfigurationError(f"the doctor checks relay: and auto: endpoints, not {prefix}:")


def targets(endpoint: str | None = None, config: str | None = None) -> Targets:
    """
    The paths to check.

    @param endpoint: a C{relay:} or C{auto:} endpoint string, or C{None}
        for the default C{auto:}.
    @param config: a seed JSON config file (C{auto:config=PATH}).
    @raise ConfigurationError: for anything wrong in the string or config
        other than a missing or unreadable sync key.
    """
    if endpoint is None:
        prefix, args, kwargs = "auto", [], {}
        source = "auto: (the default)" if config is None else f"auto: with the config file {config}"
    else:
        prefix, args, kwargs = _split(endpoint)
        source = f"{prefix}: endpoint"
    if config is not None:
        if prefix != "auto":
            raise ConfigurationError("--config applies to auto: endpoints only (or give no ENDPOINT)")
        if "config" in kwargs:
            raise ConfigurationError("give the config file either as --config or as config= in the endpoint, not both")
        kwargs["config"] = config
    result = Targets(source=source)
    try:
        result.paths, result.stun = _parse_paths(prefix, args, kwargs)
    except KeyFileError as e:
        if "key" in kwargs or "keyfile" in kwargs:
            # The user named a key and it is wrong: that is for them to fix
            # before anything else (the message never holds the key's text).
            raise
        # Only the environment's key (PLURESYNC_KEY) or the config's is
        # missing or unreadable: the network checks need no key of the
        # user's, so check with a throwaway one and say so.
        result.notes.append(
            f"sync key: {e}; the checks below use a throwaway key, but your programs will need a key to connect"
        )
        kwargs = dict(kwargs, key=SyncKey.generate().to_text())
        result.paths, result.stun = _parse_paths(prefix, args, kwargs)
    return result
