"""
The relay's C{--auth} options: which L{pluresync.relay.core.auth.Authenticator}
to run, and the rule that an open relay is the default only on loopback.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable

from twisted.python import usage

from pluresync.relay.core.auth import AuthConfigError, Authenticator, OpenAuth, SignedTokenAuth, TokenFileAuth

AUTH_MODES = ("open", "tokens", "signed")

#: Endpoint types whose C{interface=} says where they listen.
_INET_TYPES = {"tcp", "tcp6", "ssl"}


def _split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint string at unescaped colons, resolving backslash escapes."""
    parts, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def endpoint_interface(description: str) -> tuple[str, str | None]:
    """
    The type of the server endpoint C{description} (lower case: C{tcp},
    C{tcp6}, C{ssl}, C{unix}, ...) and, for C{tcp:}, C{tcp6:} and C{ssl:},
    the address its C{interface=} names (C{None}: every interface, or not
    an IP endpoint).
    """
    parts = _split_endpoint(description.strip())
    kind = parts[0].lower()
    interface = None
    if kind in _INET_TYPES:
        for part in parts[1:]:
            name, sep, value = part.partition("=")
            if sep and name == "interface":
                interface = value or None
    return kind, interface


def is_loopback_endpoint(description: str) -> bool:
    """
    Whether the server endpoint C{description} listens only on a loopback
    address: a C{tcp:}, C{tcp6:} or C{ssl:} endpoint with
    C{interface=127.x.x.x} or C{interface=::1}.  Anything else (no
    C{interface=}: every interface; C{unix:}, C{systemd:}, other types)
    counts as reachable from elsewhere.
    """
    _, interface = endpoint_interface(description)
    if not interface:
        return False
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return False


def choose_mode(mode: str | None, tokens_file: str | None, secret_file: str | None) -> str | None:
    """
    The C{--auth} mode from the options (C{None}: not chosen), checking that
    the files given go with it.  A file alone implies its mode.

    @raise usage.UsageError: an unknown mode, a missing or misplaced file.
    """
    if mode is not None and mode not in AUTH_MODES:
        raise usage.UsageError(f"--auth must be one of {', '.join(AUTH_MODES)}, got {mode!r}")
    if mode is None:
        if tokens_file and secret_file:
            raise usage.UsageError(
                "give --auth tokens or --auth signed, not both --auth-tokens-file and --auth-secret-file"
            )
        mode = "tokens" if tokens_file else "signed" if secret_file else None
    if mode == "tokens" and not tokens_file:
        raise usage.UsageError("--auth tokens needs --auth-tokens-file PATH (one 'sha256:HEX tenant' line per token)")
    if mode == "signed" and not secret_file:
        raise usage.UsageError(
            "--auth signed needs --auth-secret-file PATH (the HMAC secret, never on the command line)"
        )
    if tokens_file and mode != "tokens":
        raise usage.UsageError("--auth-tokens-file only applies to --auth tokens")
    if secret_file and mode != "signed":
        raise usage.UsageError("--auth-secret-file only applies to --auth signed")
    return mode


def check_auth_options(
    mode: str | None, endpoint: str, tokens_file: str | None = None, secret_file: str | None = None
) -> tuple[str, list[str]]:
    """
    Apply the rules of C{--auth} without touching any file: the mode must
    fit the files given, and without a mode the relay must listen on
    loopback only (then it is open).

    @return: the mode, and the warnings to log at start-up.
    @raise usage.UsageError: what is wrong, and what to do about it.
    """
    chosen = choose_mode(mode, tokens_file, secret_file)
    loopback = is_loopback_endpoint(endpoint)
    shown = endpoint.split(":privateKey=")[0]
    if chosen is None and not loopback:
        raise usage.UsageError(
            f"the relay would listen on {shown}, which is reachable from other machines, "
            "and no --auth mode was chosen. Choose one: --auth signed --auth-secret-file PATH "
            "(tokens minted with `pluresync relay-token`), --auth tokens --auth-tokens-file PATH, "
            "or --auth open to let anyone use this relay; or listen on loopback only "
            "(--port tcp:8080:interface=127.0.0.1)"
        )
    warnings = []
    if chosen == "open" and not loopback:
        warnings.append(f"--auth open: anyone who can reach {shown} may use this relay (no token is asked for)")
    return chosen or "open", warnings


def relay_authenticator(
    mode: str | None,
    endpoint: str,
    tokens_file: str | None = None,
    secret_file: str | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[Authenticator, list[str]]:
    """
    Build the relay's authenticator from its options (L{check_auth_options},
    then the tokens or secret file is read).

    @param report: called (later) with a problem found when a tokens or
        secret file is re-read.
    @return: the authenticator and the warnings to log at start-up.
    @raise usage.UsageError: as L{check_auth_options}, or a file that
        cannot be used (the message never quotes the file's content).
    """
    mode, warnings = check_auth_options(mode, endpoint, tokens_file, secret_file)
    if mode == "open":
        return OpenAuth(), warnings
    try:
        for path in (tokens_file, secret_file):
            if path and os.name == "posix" and os.path.exists(os.path.expanduser(path)):
                if os.stat(os.path.expanduser(path)).st_mode & 0o077:
                    warnings.append(f"{path} is readable by other users: chmod 600 it")
        if mode == "tokens":
            assert tokens_file is not None
            tokens = TokenFileAuth(tokens_file, report=report)
            if len(tokens) == 0:
                warnings.append(f"{tokens_file} lists no token: every upgrade will be refused")
            return tokens, warnings
        assert secret_file is not None
        return SignedTokenAuth.from_file(secret_file, report=report), warnings
    except AuthConfigError as e:
        raise usage.UsageError(f"--auth {mode}: {e}") from None
