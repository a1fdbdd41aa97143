"""
The relay's log policy applied to lines it does not write itself.

Autobahn and twisted.web log about connections with the client's address
and port (Autobahn: "dropping connection to peer tcp:203.0.113.7:51234 ...",
for every refused upgrade; twisted.web: "Timing out client: IPv4Address(...)").
docs/relay.md promises that a relay never logs client addresses, so their
loggers are replaced by L{PolicyLogger}: the same calls, with every address
field and every address inside a text replaced by C{"(client)"}, and nothing
below C{info} (Autobahn's debug lines carry whole upgrade requests, tokens
included).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger, LogLevel

#: Keys that hold a peer's address in Autobahn's and twisted.web's events.
_ADDRESS_KEYS = frozenset({"peer", "client", "address", "addr", "remote"})

#: An address in a text: Autobahn's C{tcp:HOST:PORT} / C{tcp6:[...]:PORT},
#: Twisted's C{IPv4Address(...)}, or a bare IPv4 or bracketed IPv6 host.
_ADDRESS = re.compile(
    r"(?:tcp[46]?|unix|tls):\S+"
    r"|IPv[46]Address\([^)]*\)"
    r"|\[[0-9A-Fa-f:.]+\](?::\d+)?"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
)

CLIENT = "(client)"


def scrub(value: Any) -> Any:
    """C{value} with any client address in it replaced (texts only; other values are kept)."""
    if isinstance(value, str):
        return _ADDRESS.sub(CLIENT, value)
    return value


class PolicyLogger(Logger):
    """
    A C{twisted.logger.Logger} that also answers txaio's logger calls
    (Autobahn's C{self.log}) and applies the relay's policy to every event.
    """

    def __get__(self, oself: Any, type: Any = None) -> PolicyLogger:
        # One shared logger, not a copy per attribute access (txaio does the same).
        return self

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level < LogLevel.info:
            return
        for key in list(kwargs):
            if key in _ADDRESS_KEYS:
                kwargs[key] = CLIENT
            elif not key.startswith("log_"):
                kwargs[key] = scrub(kwargs[key])
        super().emit(level, scrub(format) if format else format, **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> None:
        """txaio's level below debug: never logged."""


#: Autobahn's lines about relay sockets, and twisted.web's about connections.
RELAY_LIBRARY_LOG = PolicyLogger(namespace="pluresync.relay.library")
