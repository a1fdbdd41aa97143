"""
The seed's JSON configuration, shared by C{auto:config=PATH} and
C{create_transport(**load_config(PATH))}.

Recognised fields (others are ignored, so one file can configure more than
pluresync)::

    {
      "syncTransport": "auto",                 # or "azure-relay", "vercel-relay"
      "syncRelay": "wss://relay.example.com",  # the primary relay (the "azure" slot)
      "syncRelayFallback": "wss://backup...",  # the backup relay (the "vercel" slot)
      "syncKey": "psk1-...",                   # a key's text, or a passphrase
      "connectionTimeoutMs": 30000,
      "syncDirect": false                      # auto without the LAN path (default: true
                                               # when the pluresync[direct] extra is installed)
    }

Precedence, highest first: an endpoint string's own parameters, then this
file, then the environment (C{PLURESYNC_KEY}, C{PLURESYNC_RELAY},
C{PLURESYNC_RELAY_FALLBACK}), then the built-in defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pluresync.errors import ConfigurationError

ENV_RELAY = "PLURESYNC_RELAY"
ENV_RELAY_FALLBACK = "PLURESYNC_RELAY_FALLBACK"
MODES = ("auto", "azure-relay", "vercel-relay", "direct")


@dataclass(frozen=True)
class SeedConfig:
    """The seed's settings; C{None} where the file does not say."""

    transport: str | None = None
    relay: str | None = None
    relay_fallback: str | None = None
    sync_key: str | None = None
    timeout: float | None = None
    #: Whether C{auto} races the direct (LAN) path; C{None}: when it can.
    direct: bool | None = None

    def with_environment(self, environ: Mapping[str, str] | None = None) -> SeedConfig:
        """Fill what the file left open from the environment."""
        env = os.environ if environ is None else environ
        return SeedConfig(
            transport=self.transport,
            relay=self.relay or env.get(ENV_RELAY) or None,
            relay_fallback=self.relay_fallback or env.get(ENV_RELAY_FALLBACK) or None,
            sync_key=self.sync_key,
            timeout=self.timeout,
            direct=self.direct,
        )


def _field(data: dict, name: str, kind: type, path: Path):
    value = data.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ConfigurationError(f"{path}: {name} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def read_config(path: str | os.PathLike[str]) -> SeedConfig:
    """Read and check a seed config file; errors name the file and the field."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as e:
        raise ConfigurationError(f"cannot read the config file {str(path)!r}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigurationError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold a JSON object")
    transport = _field(data, "syncTransport", str, path)
    if transport is not None and transport not in MODES:
        raise ConfigurationError(f"{path}: syncTransport must be one of {', '.join(MODES)}, not {transport!r}")
    timeout_ms = _field(data, "connectionTimeoutMs", float, path)
    if timeout_ms is not None and not timeout_ms > 0:
        raise ConfigurationError(f"{path}: connectionTimeoutMs must be positive")
    return SeedConfig(
        transport=transport,
        relay=_field(data, "syncRelay", str, path),
        relay_fallback=_field(data, "syncRelayFallback", str, path),
        sync_key=_field(data, "syncKey", str, path),
        timeout=timeout_ms / 1000.0 if timeout_ms is not None else None,
        direct=_field(data, "syncDirect", bool, path),
    )


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> dict:
    """
    The keyword arguments of L{pluresync.create_transport} that a seed
    config file (with the environment beneath it) gives.
    """
    config = read_config(path).with_environment(environ)
    kwargs: dict = {}
    if config.transport is not None:
        kwargs["mode"] = config.transport
    if config.relay is not None:
        kwargs["azure_relay_url"] = config.relay
    if config.relay_fallback is not None:
        kwargs["vercel_relay_url"] = config.relay_fallback
    if config.sync_key is not None:
        kwargs["sync_key"] = config.sync_key
    if config.timeout is not None:
        kwargs["connection_timeout"] = config.timeout
    if config.direct is not None:
        kwargs["direct"] = config.direct
    return kwargs
