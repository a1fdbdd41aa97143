"""
TCP connections of the relay that are not WebSockets yet: from the accept to
the end of the WebSocket opening handshake.

twisted.web's own timeout is an idle timer (every byte restarts it), so a
client that sends its request one byte a second would hold a socket for
ever, counted nowhere (slowloris).  Here each connection gets a deadline
from its accept: its request must have been read, and its upgrade begun,
within C{open_timeout} seconds, or its TCP connection is dropped.  Until
then it is counted (L{OpeningConnections}: C{/health} C{opening} and the
C{pluresync_relay_opening_connections} gauge), against C{--max-connections}
together with the WebSockets, and against the per-address concurrent limit
of its TCP peer; its request head is at most L{MAX_REQUEST_HEAD} bytes.

A request that is not an upgrade (C{/health}, C{/metrics}) gets a new
deadline when its response is done, so a keep-alive connection is cut
C{open_timeout} seconds after its last response unless it asks again.

Nothing here logs a client address, or anything per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.web.http import HTTPChannel

from pluresync.relay.core.ratelimit import accept_address
from pluresync.relay.server.logpolicy import RELAY_LIBRARY_LOG

#: The largest request head (request line and headers) the relay reads; a
#: pluresync upgrade is about 400 bytes, a relay token a few hundred more.
MAX_REQUEST_HEAD = 8192

#: Connections the relay accepts beyond C{--max-connections} for requests
#: that are not WebSockets (C{/health} probes of a full relay).
PROBE_ROOM = 16


class OpeningConnections:
    """
    The count of connections not upgraded yet, and who may open one more.

    @param max_connections: C{--max-connections} (0: unlimited).
    @param websockets: returns the number of open WebSockets.
    @param limiter: the per-address limiter
        (L{pluresync.relay.core.ratelimit.ConnectionLimiter}).
    @param trusted: networks of trusted proxies (not counted per address).
    """

    def __init__(self, reactor: IReactorTime, open_timeout: float, max_connections: int, websockets, limiter, trusted):
        self.reactor = reactor
        self.open_timeout = open_timeout
        self.max_connections = max_connections
        self._websockets = websockets
        self._limiter = limiter
        self._trusted = trusted
        #: connections accepted and not upgraded (nor closed) yet
        self.count = 0

    def full(self, room: int = 0) -> bool:
        """Whether the WebSockets and the opening connections fill C{--max-connections} (+ C{room})."""
        limit = self.max_connections
        return bool(limit) and self._websockets() + self.count >= limit + room

    def admit(self, peer: Any) -> tuple[int, str | None]:
        """
        May a connection from C{peer} (an C{IAddress}) be read?

        @return: C{(0, key)}, the connection counted (C{key}: its per-address
            entry, or C{None}); else C{(status, None)}, the HTTP status to
            refuse it with.
        """
        if self.full(PROBE_ROOM):
            return 503, None
        key = None
        if self._limiter.max_concurrent:
            key = accept_address(getattr(peer, "host", None) or "local", self._trusted)
            if key is not None and not self._limiter.hold(key):
                return 429, None
        self.count += 1
        return 0, key

    def done(self, key: str | None) -> None:
        """A counted connection was upgraded, or ended."""
        self.count -= 1
        if key is not None:
            self._limiter.release(key)


class OpeningChannel(HTTPChannel):
    """
    twisted.web's channel with a deadline instead of an idle timer, a bounded
    request head, and a place in L{OpeningConnections}.
    """

    #: The request line, and the whole head, are bounded (Twisted: 16 KiB each).
    MAX_LENGTH = MAX_REQUEST_HEAD
    totalHeadersSize = MAX_REQUEST_HEAD
    maxHeaders = 64

    #: twisted.web's own lines, without client addresses (logpolicy.py).
    _log = RELAY_LIBRARY_LOG
    opening: OpeningConnections
    _key: str | None = None
    _counted = False
    _deadline: Any = None

    def counted_in(self, opening: OpeningConnections, key: str | None) -> None:
        """This connection was counted by C{opening.admit} (C{key}: its per-address entry)."""
        self.opening = opening
        self._key = key
        self._counted = True

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(None)
        self._arm()

    def _arm(self) -> None:
        timeout = self.opening.open_timeout
        if timeout > 0:
            self._deadline = self.opening.reactor.callLater(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        """Too slow to ask for the upgrade: drop the TCP connection (docs/relay.md)."""
        self._deadline = None
        if self.transport is not None:
            self.transport.abortConnection()

    def upgrading(self) -> None:
        """The WebSocket takes the connection over: it has timeouts of its own."""
        self._disarm()
        self._release()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self._counted and self.transport is not None:
            # A keep-alive connection: the next request gets a deadline of its own.
            self._disarm()
            self._arm()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        self._release()
        super().connectionLost(reason)

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.opening.done(self._key)


class Refusal(Protocol):
    """Answers a connection the relay cannot take with a bare HTTP status, then closes it."""

    _TEXT = {429: b"429 Too Many Requests", 503: b"503 Service Unavailable"}

    def __init__(self, status: int) -> None:
        self.status = status

    def connectionMade(self) -> None:
        self.transport.write(
            b"HTTP/1.1 "
            + self._TEXT[self.status]
            + b"\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass
