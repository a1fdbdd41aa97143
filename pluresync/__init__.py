"""
pluresync: peer-to-peer sync connections for Twisted.

Peers that share a sync key get an end-to-end encrypted stream, through a
relay (C{relay:} endpoints) today; see the docs/ folder.
"""

from pluresync._version import __version__
from pluresync.api import create_transport
from pluresync.keys import PeerIdentity, SyncKey

__all__ = ["__version__", "create_transport", "PeerIdentity", "SyncKey"]
