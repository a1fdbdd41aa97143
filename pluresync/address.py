"""
The address a pluresync connection reports through C{getPeer()} / C{getHost()}.

A peer is known by its proven identity and the transport that carries it, not
by an IP address (which, through a relay, would be the relay's).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IAddress
from zope.interface import implementer


@implementer(IAddress)
@dataclass(frozen=True)
class PeerAddress:
    """
    @ivar transport: the transport's name, e.g. C{"relay:azure"}.
    @ivar peer_id: the peer's id (hex of its static public key), or C{None}
        before the handshake has proven it.
    """

    transport: str
    peer_id: str | None

    @property
    def host(self) -> str:
        """For programs that expect C{.host} (twisted.web logs it): the peer id."""
        return self.peer_id or "unknown"

    #: For programs that expect C{.port} (twisted.web builds URLs with it).
    port = 0

    def __str__(self) -> str:
        peer = self.peer_id[:16] + "…" if self.peer_id else "unknown"
        return f"{self.transport} peer {peer}"
