"""
This machine's pluresync directory and its stable identity.

Without an C{identity=} parameter every parsed endpoint string gets a fresh
random identity, so a listener would have a new peer id each time it
starts and nobody could address it with C{peer=}. The command line therefore
gives every C{relay:}/C{auto:} endpoint the machine's identity file
(C{$PLURESYNC_HOME/identity}, default C{~/.pluresync/identity}) unless the
string names one itself; C{pluresync peer-id} shows the id that file proves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from twisted.internet.endpoints import quoteStringArgument

from pluresync.keys import PeerIdentity

HOME_VARIABLE = "PLURESYNC_HOME"
DEFAULT_HOME = "~/.pluresync"
IDENTITY_FILE = "identity"

#: Endpoint types that take C{identity=}; any other string is passed on untouched.
_IDENTITY_PREFIXES = frozenset({"relay", "auto"})


def home(environ: Mapping[str, str] | None = None) -> Path:
    """The pluresync directory: C{$PLURESYNC_HOME}, or C{~/.pluresync} (not created here)."""
    env = os.environ if environ is None else environ
    return Path(env.get(HOME_VARIABLE) or DEFAULT_HOME).expanduser()


def identity_path(environ: Mapping[str, str] | None = None) -> Path:
    """
    The machine's identity file, with its directory made (mode 0700) if
    missing; the file itself is created by L{PeerIdentity.from_file} (0600).
    """
    directory = home(environ)
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    return directory / IDENTITY_FILE


def machine_identity(environ: Mapping[str, str] | None = None) -> PeerIdentity:
    """This machine's identity, created on first use."""
    return PeerIdentity.from_file(identity_path(environ), create=True)


def _split(description: str) -> list[str]:
    """An endpoint string's pieces, split at unescaped colons (escapes kept)."""
    pieces, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ":":
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return pieces


def with_identity(description: str, path: Path | None = None, environ: Mapping[str, str] | None = None) -> str:
    """
    C{description} with C{:identity=<the machine's identity file>} added, if
    it is a C{relay:} or C{auto:} string without an C{identity=} of its own;
    any other string is returned as it is (C{tcp:} takes no identity).
    """
    pieces = _split(description)
    if pieces[0] not in _IDENTITY_PREFIXES or any(p.startswith("identity=") for p in pieces[1:]):
        return description
    path = identity_path(environ) if path is None else path
    return f"{description}:identity={quoteStringArgument(str(path))}"
