"""
pluresync: peer-to-peer sync connections for Twisted.

Peers that share a sync key get an end-to-end encrypted stream, through a
relay (C{relay:} endpoints) today; see the docs/ folder.

Importing this package is light on purpose: Twisted's plugin scan imports it
(through C{twisted/plugins/pluresync_endpoints.py}) in every C{twist} and
C{clientFromString} process, and the Vercel function imports it on each cold
start. So the public names below are resolved on first use (PEP 562), and
C{import pluresync} loads neither the client API, NaCl, Autobahn nor the
reactor; C{tests/test_imports.py} holds it to that.
"""

from __future__ import annotations

import importlib

from pluresync.version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers know this form)
if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from pluresync.api import create_transport
    from pluresync.keys import PeerIdentity, SyncKey

__all__ = ["__version__", "create_transport", "PeerIdentity", "SyncKey"]

#: Each lazily resolved public name, and the module that defines it.
_LAZY = {
    "create_transport": "pluresync.api",
    "PeerIdentity": "pluresync.keys",
    "SyncKey": "pluresync.keys",
}


def __getattr__(name: str):
    """Import the module behind a public name the first time it is used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    """List the lazy public names too, as if they had been imported eagerly."""
    return sorted(set(globals()) | set(__all__))
