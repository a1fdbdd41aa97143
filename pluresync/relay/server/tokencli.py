"""
C{pluresync relay-token}: mint relay tokens.

Registered in the C{pluresync} command as
C{["relay-token", None, RelayTokenOptions, "Mint a signed relay token."]}.

  - C{pluresync relay-token --secret-file PATH --tenant NAME [--ttl 30d]}
    prints a signed token (for C{--auth signed} relays sharing that secret);
  - C{pluresync relay-token --random --tenant NAME} prints a new random
    token (for C{--auth tokens}) and, on stderr, the line to add to the
    relay's tokens file (its hash: the file never holds the token).
"""

from __future__ import annotations

import re
import sys
import time

from twisted.python import usage

from pluresync.errors import ConfigurationError
from pluresync.relay.core.auth import (
    AuthConfigError,
    hash_token,
    mint_token,
    new_random_token,
    read_secret_file,
    valid_tenant,
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)\Z")


def parse_duration(text: str | float) -> float:
    """
    Seconds from C{30d}, C{12h}, C{90m}, C{45s}, C{2w} or a bare number of
    seconds.

    @raise ValueError: anything else, or not more than 0.
    """
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = _DURATION.match(text.strip().lower())
        if match is None:
            raise ValueError(f"a lifetime is a number with s, m, h, d or w (e.g. 30d, 12h), got {text!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"a lifetime must be more than 0 seconds, got {text!r}")
    return seconds


def relay_token_command(secret_file: str, tenant: str, ttl: str | float, now: float | None = None) -> str:
    """
    A signed relay token for C{tenant}, valid for C{ttl} (C{"30d"} or
    seconds), signed with the first secret of C{secret_file}.

    @raise ConfigurationError: an unusable secret file, tenant or lifetime.
    """
    if not valid_tenant(tenant):
        raise ConfigurationError(
            f"--tenant {tenant!r}: a tenant name is 1-64 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit"
        )
    try:
        seconds = parse_duration(ttl)
        secrets = read_secret_file(secret_file)
    except (AuthConfigError, ValueError) as e:
        raise ConfigurationError(str(e)) from None
    return mint_token(secrets[0], tenant, seconds, time.time() if now is None else now)


class RelayTokenOptions(usage.Options):
    """Options of C{pluresync relay-token}."""

    synopsis = "pluresync relay-token (--secret-file PATH | --random) --tenant NAME [--ttl 30d]"
    longdesc = (
        "Mint a relay token. With --secret-file: a signed token for relays run with "
        "--auth signed --auth-secret-file (the same file), valid for --ttl. With --random: "
        "a new random token for --auth tokens; the line for the relay's tokens file "
        "(its SHA-256 hash and the tenant) goes to stderr. The token goes to stdout: "
        "give it to the client (tokenfile= or PLURESYNC_RELAY_TOKEN)."
    )
    optParameters = [
        ["secret-file", None, None, "File holding the relay's HMAC secret (the first line signs)."],
        ["tenant", None, None, "Tenant name, shown in the relay's logs (1-64 of A-Z a-z 0-9 . _ @ -)."],
        ["ttl", None, "30d", "Lifetime of a signed token: 45s, 90m, 12h, 30d, 2w or seconds."],
    ]
    optFlags = [["random", None, "Make a random token for --auth tokens instead of a signed one."]]

    def postOptions(self) -> None:
        if not self["tenant"]:
            raise usage.UsageError("--tenant NAME is required")
        if bool(self["random"]) == bool(self["secret-file"]):
            raise usage.UsageError("give --secret-file PATH (a signed token) or --random (a tokens-file token)")
        if not valid_tenant(self["tenant"]):
            raise usage.UsageError("--tenant: 1-64 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit")
        try:
            self["seconds"] = parse_duration(self["ttl"])
        except ValueError as e:
            raise usage.UsageError(f"--ttl: {e}") from None

    def run(self) -> int:
        if self["random"]:
            token = new_random_token()
            print(f"add this line to the relay's tokens file: {hash_token(token)} {self['tenant']}", file=sys.stderr)
        else:
            token = relay_token_command(self["secret-file"], self["tenant"], self["seconds"])
        print(token)
        return 0
