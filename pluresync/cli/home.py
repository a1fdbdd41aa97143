"""
This machine's pluresync directory and its stable identity.

Without an C{identity=} parameter every parsed endpoint string gets a fresh
random identity, so a listener would have a new peer id each time it
starts and nobody could address it with C{peer=}. The command line therefore
gives every C{relay:}/C{direct:}/C{auto:} endpoint the machine's identity file
(C{$PLURESYNC_HOME/identity}, default C{~/.pluresync/identity}) unless the
string names one itself; C{pluresync peer-id} shows the id that file proves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from twisted.internet.endpoints import quoteStringArgument

from pluresync.endpoints.strings import check_endpoint_string
from pluresync.keys import PeerIdentity

HOME_VARIABLE = "PLURESYNC_HOME"
DEFAULT_HOME = "~/.pluresync"
IDENTITY_FILE = "identity"

#: Endpoint types that take C{identity=}; any other string is passed on untouched.
_IDENTITY_PREFIXES = frozenset({"relay", "direct", "auto"})


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


def ensure_identity(path: Path) -> PeerIdentity:
    """
    Read the identity at C{path}, creating it first if missing, safely
    against another process doing the same at the same moment.

    C{PeerIdentity.from_file(create=True)} creates the file (O_EXCL) and
    only then writes it, so a second process starting at the same time (say
    C{listen} and C{connect} on a fresh machine) can read it empty and fail.
    Here the identity is written in full to a private temporary file and
    then hard-linked into place: the name appears with its content, and
    whoever links first wins; everybody reads the winner's.
    """
    if not path.exists():
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            PeerIdentity.from_file(temporary, create=True)
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        finally:
            temporary.unlink(missing_ok=True)
    return PeerIdentity.from_file(path)


def machine_identity(environ: Mapping[str, str] | None = None) -> PeerIdentity:
    """This machine's identity, created on first use."""
    return ensure_identity(identity_path(environ))


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
    it is a C{relay:}, C{direct:} or C{auto:} string without an C{identity=} of its own;
    any other string is returned as it is (C{tcp:} takes no identity).
    """
    # A trailing backslash would escape the colon added below (the error
    # would then name an identity file the user never wrote), and a
    # parameter given twice would be taken silently: refuse both first.
    check_endpoint_string(description)
    pieces = _split(description)
    if pieces[0] not in _IDENTITY_PREFIXES or any(p.startswith("identity=") for p in pieces[1:]):
        return description
    path = identity_path(environ) if path is None else path
    ensure_identity(path)  # made here, race-free, before the endpoint parser reads it
    return f"{description}:identity={quoteStringArgument(str(path))}"
