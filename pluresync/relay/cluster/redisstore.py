"""
The relay's connection to Redis, for clustering (L{pluresync.relay.cluster.service}).

Two connections to one Redis server, through txredisapi's protocol classes
(a Twisted-native RESP client) but with the connection life cycle kept
here, because the cluster needs to know at every moment whether Redis is
usable:

 - a command connection (C{SET}, C{HSET}, C{GET}, C{PUBLISH}...), every
   reply bounded by C{reply_timeout} (a hung Redis counts as down);
 - a subscriber connection, subscribed to the channels the cluster names.

While either is down the store is I{down}: L{RedisStore.command} fails at
once with L{RedisUnavailable} (callers fall back to local behaviour, they
never wait for Redis), and both connections are re-opened with capped
exponential backoff.  C{on_up} runs each time both are (again) ready, so the
cluster can re-publish what Redis may have lost; C{on_down} when they break.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import Logger

log = Logger(namespace="pluresync.relay.cluster.service")


class RedisUnavailable(Exception):
    """Redis is not connected right now; the caller must not wait for it."""


def _without_password(url: str) -> str:
    """C{url} with any password replaced by C{***}."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


@dataclass(frozen=True)
class RedisAddress:
    """A parsed C{redis://[[user]:password@]host[:port][/db]} URL."""

    host: str
    port: int = 6379
    db: int = 0
    password: str | None = field(default=None, repr=False)
    username: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """
        @raise ValueError: not a C{redis://} URL, or a bad port or db.
        """
        parts = urlsplit(url)
        # Errors quote the URL without its password (they reach stderr and logs).
        shown = repr(_without_password(url))
        if parts.scheme != "redis":
            raise ValueError(f"--redis needs a redis://HOST:PORT/N URL, got {shown}")
        if not parts.hostname:
            raise ValueError(f"no host in the Redis URL {shown}")
        path = parts.path.strip("/")
        try:
            db = int(path) if path else 0
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"bad port or database number in the Redis URL {shown}") from None
        if db < 0:
            raise ValueError(f"bad database number in the Redis URL {shown}")
        return cls(
            host=parts.hostname,
            port=port,
            db=db,
            password=unquote(parts.password) if parts.password else None,
            username=unquote(parts.username) if parts.username else None,
        )

    def __str__(self) -> str:
        # Never the password: this goes to logs.
        return f"redis://{self.host}:{self.port}/{self.db}"


class _Factory:
    """What txredisapi's protocols call on their factory (errors only)."""

    isLazy = False

    def __init__(self) -> None:
        self.error: str | None = None

    def stopTrying(self) -> None:
        pass

    def connectionError(self, message: str) -> None:
        self.error = message


class _Subscriber(txredisapi.SubscriberProtocol):
    on_message: Callable[[str, str], None] = staticmethod(lambda channel, message: None)

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        try:
            self.on_message(channel, message)
        except Exception:
            log.failure("cluster message handler failed")


class RedisStore:
    """
    See the module docstring.

    @param channels: returns the channels to subscribe to (at each connect).
    @param on_message: C{(channel, message)} for each pub/sub message.
    @param on_up: both connections are (again) ready.
    @param on_down: they broke (Redis stopped, hung or was unreachable).
    """

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        *,
        channels: Callable[[], list[str]],
        on_message: Callable[[str, str], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
        connect_timeout: float = 2.0,
        reply_timeout: float = 2.0,
        min_backoff: float = 0.2,
        max_backoff: float = 2.0,
    ) -> None:
        self._reactor = reactor
        self.address = address
        self._channels = channels
        self._on_message = on_message
        self._on_up = on_up
        self._on_down = on_down
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._backoff = min_backoff
        self._command: txredisapi.RedisProtocol | None = None
        self._subscriber: _Subscriber | None = None
        self._running = False
        self._attempt: Deferred[None] | None = None
        self._retry: Any = None
        self.up = False
        #: how many times the store went down (for logs and tests)
        self.outages = 0

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        """Connect (and keep reconnecting until L{stop})."""
        self._running = True
        self._connect()

    def stop(self) -> Deferred[None]:
        """Close both connections; stop reconnecting."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.up = False
        waits = []
        for connection in (self._command, self._subscriber):
            if connection is not None and connection.transport is not None and connection.connected:
                waits.append(connection.whenDisconnected())
                connection.transport.loseConnection()
        self._command = self._subscriber = None
        from twisted.internet.defer import gatherResults

        return gatherResults(waits, consumeErrors=True).addBoth(lambda _: None)

    # -- commands --------------------------------------------------------------

    def command(self, *args: Any) -> Deferred[Any]:
        """
        Send one Redis command; its reply, or a failure (L{RedisUnavailable}
        at once while Redis is down).  Commands sent one after the other
        without waiting are pipelined and answered in order.
        """
        connection = self._command
        if not self.up or connection is None:
            return fail(RedisUnavailable(f"Redis {self.address} is unavailable"))
        return connection.execute_command(*args)

    # -- internals -------------------------------------------------------------

    def _open(self, protocol: Any) -> Deferred[Any]:
        """Connect C{protocol}; fires with it once ready (AUTH/SELECT done)."""
        protocol.factory = _Factory()
        endpoint = TCP4ClientEndpoint(
            self._reactor, self.address.host, self.address.port, timeout=self._connect_timeout
        )
        ready: Deferred[Any] = Deferred()

        def connected(_: Any) -> None:
            protocol.whenConnected().addCallback(lambda p: ready.called or ready.callback(p))
            protocol.whenDisconnected().addCallback(
                lambda _: (
                    ready.called
                    or ready.errback(RedisUnavailable(protocol.factory.error or "connection closed during set-up"))
                )
            )

        def failed(reason: Any) -> None:
            if not ready.called:
                ready.errback(reason)

        connectProtocol(endpoint, protocol).addCallbacks(connected, failed)
        timer = self._reactor.callLater(
            self._connect_timeout + self._reply_timeout, lambda: ready.called or ready.cancel()
        )
        ready.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return ready

    def _connect(self) -> None:
        if not self._running or self._attempt is not None:
            return
        self._attempt = Deferred.fromCoroutine(self._connect_once())

        def done(result: Any) -> None:
            self._attempt = None
            if not self._running:
                return
            if self.up:
                self._backoff = self._min_backoff
                return
            reason = getattr(result, "value", result)
            log.debug("Redis {address} unavailable: {reason}", address=str(self.address), reason=reason)
            delay = self._backoff * (0.8 + 0.4 * random.random())
            self._backoff = min(self._backoff * 2, self._max_backoff)
            self._retry = self._reactor.callLater(delay, self._connect)

        self._attempt.addBoth(done)

    async def _connect_once(self) -> None:
        a = self.address
        command = txredisapi.RedisProtocol(
            "utf-8",
            replyTimeout=self._reply_timeout,
            password=a.password,
            dbid=a.db or None,
            username=a.username,
            convertNumbers=True,
        )
        subscriber = _Subscriber("utf-8", password=a.password, dbid=None, username=a.username)
        subscriber.on_message = self._on_message
        try:
            await self._open(command)
            await self._open(subscriber)
            channels = self._channels()
            if channels:
                subscribed = subscriber.subscribe(channels)
                timer = self._reactor.callLater(self._reply_timeout, lambda: subscribed.called or subscribed.cancel())
                await subscribed
                if timer.active():
                    timer.cancel()
        except BaseException:
            for connection in (command, subscriber):
                if connection.transport is not None:
                    connection.transport.abortConnection()
            raise
        if not self._running:
            command.transport.loseConnection()
            subscriber.transport.loseConnection()
            return
        self._command, self._subscriber = command, subscriber
        for connection in (command, subscriber):
            connection.transport.setTcpKeepAlive(1)
            connection.whenDisconnected().addCallback(lambda _, c=connection: self._lost(c))
        self.up = True
        log.info("Redis {address} connected", address=str(self.address))
        try:
            self._on_up()
        except Exception:
            log.failure("cluster on_up failed")

    def _lost(self, connection: Any) -> None:
        if connection is not self._command and connection is not self._subscriber:
            return
        for other in (self._command, self._subscriber):
            if other is not None and other is not connection and other.transport is not None:
                other.transport.abortConnection()
        self._command = self._subscriber = None
        if self.up:
            self.up = False
            self.outages += 1
            log.warn("Redis {address} lost: clustering paused (local pairing goes on)", address=str(self.address))
            try:
                self._on_down()
            except Exception:
                log.failure("cluster on_down failed")
        if self._running:
            self._retry = self._reactor.callLater(self._backoff, self._connect)
