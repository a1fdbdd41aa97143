"""
Which path reached a peer last time, per network, so C{auto:} tries it first.

A laptop that moves from home (where the first relay answers) to an office
(where only the backup gets through the firewall) should not pay the
head-start delay on every connection: the winner is remembered for a while,
keyed by the network we are on and the peer (or rendezvous) we reached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: How long a winner is remembered, in seconds.
DEFAULT_TTL = 600.0
#: At most this many (network, peer) entries; the oldest go first.
MAX_ENTRIES = 1024


def network_id(route_table: Path = Path("/proc/net/route")) -> str:
    """
    A name for the network we are on: the default route's interface and
    gateway (Linux), or C{"unknown"} where that cannot be read. Changing
    networks changes it, which is all the cache needs.
    """
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return "unknown"
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return f"{fields[0]}/{fields[2]}"
    return "unknown"


@dataclass
class PathCache:
    """
    Remembered winners. Time comes from the caller (the reactor's clock), so
    tests drive it with a L{twisted.internet.task.Clock}.
    """

    ttl: float = DEFAULT_TTL
    network: Callable[[], str] = network_id
    _entries: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)

    def order(self, names: Sequence[str], peer: str, now: float) -> list[str]:
        """C{names} in priority order, with the remembered winner (if fresh) first."""
        key = (self.network(), peer)
        entry = self._entries.get(key)
        if entry is None:
            return list(names)
        winner, expires = entry
        if now >= expires or winner not in names:
            del self._entries[key]
            return list(names)
        return [winner] + [name for name in names if name != winner]

    def remember(self, name: str, peer: str, now: float) -> None:
        key = (self.network(), peer)
        self._entries.pop(key, None)
        self._entries[key] = (name, now + self.ttl)
        while len(self._entries) > MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]


#: The process-wide cache every C{auto:} endpoint shares by default.
shared = PathCache()
#: Which pipe reached each relay (C{host:port}) on each network, when a
#: WebSocket was refused on the way and the HTTP pipe got through
#: (C{relay:} and C{auto:} with C{pipe=auto}).
pipes = PathCache()
