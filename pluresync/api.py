"""
The seed's message-oriented API: C{create_transport()}, C{send} / C{receive} / C{close}.

It sits on the same endpoints as everything else; what it adds is message
boundaries (each C{send} is one C{receive} item), C{send} Deferreds that wait
for backpressure, and a bounded receive queue that pauses the peer when the
application reads slowly. Everything returns Deferreds, so it is awaitable
from C{async def} code run with C{Deferred.fromCoroutine} or C{task.react}.
"""

from __future__ import annotations

import inspect
import os
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.errors import ConfigurationError, PluresyncError
from pluresync.interfaces import ISyncConnection, ISyncTransport
from pluresync.keys import PeerIdentity, SyncKey, parse_peer_id
from pluresync.session.stream import IRecordReceiver

#: The seed's mode names, and the relay preset each one uses.
RELAY_MODES = {"azure-relay": "azure", "vercel-relay": "vercel"}
#: The seed's direct mode: the direct path alone (the LAN today), no relay.
DIRECT_MODE = "direct"

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_RECEIVE_BUFFER = 4 * 1024 * 1024


class MessageTooLargeError(PluresyncError):
    """The peer sent a message larger than C{max_message_size}."""


@implementer(ISyncConnection, IRecordReceiver, IPushProducer)
class SyncConnection(Protocol):
    """
    One connection of the message API.

    It is the user protocol on top of the end-to-end channel, and registers
    itself as the channel's producer: when the network cannot take more,
    C{send} Deferreds wait. Received messages queue up to C{receive_buffer}
    bytes; past that the channel is paused, which stops the peer's sending
    through the relay.
    """

    _log = Logger()

    def __init__(
        self,
        max_message_size: int,
        receive_buffer: int,
        on_connection: Callable[[SyncConnection], object] | None = None,
    ) -> None:
        self._on_connection = on_connection
        self._max_message = max_message_size
        self._receive_buffer = receive_buffer
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._messages: deque[bytes] = deque()
        self._queued = 0
        self._readers: deque[Deferred] = deque()
        self._writable = True
        self._senders: deque[Deferred] = deque()
        self._reading_paused = False
        self._ended: Failure | None = None
        self._closing = False
        self._closed = Deferred()
        self.peer_id: str | None = None

    @property
    def transport_name(self) -> str | None:
        """The path carrying the connection right now (it changes when the session moves)."""
        if self.transport is None:
            return None
        return self.transport.getPeer().transport

    # Protocol

    def connectionMade(self) -> None:
        self.peer_id = self.transport.getPeer().peer_id
        self.transport.registerProducer(self, True)
        if self._on_connection is not None:
            _call_handler(self._on_connection, self)

    def recordReceived(self, payload: bytes, end: bool) -> None:
        self._partial_size += len(payload)
        if self._partial_size > self._max_message:
            self._log.warn(
                "peer {peer} sent a message over {limit} bytes; closing",
                peer=(self.peer_id or "")[:12],
                limit=self._max_message,
            )
            self._ended = Failure(MessageTooLargeError(f"the peer sent a message over {self._max_message} bytes"))
            self.transport.abortConnection()
            return
        self._partial.append(payload)
        if not end:
            return
        message = b"".join(self._partial)
        self._partial, self._partial_size = [], 0
        if self._readers:
            self._readers.popleft().callback(message)
            return
        self._messages.append(message)
        self._queued += len(message)
        if self._queued > self._receive_buffer and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self._ended is None:
            self._ended = reason
        clean = self._ended.check(ConnectionDone) is not None
        for d in self._senders:
            d.errback(self._ended)
        self._senders.clear()
        while self._readers:
            reader = self._readers.popleft()
            if clean:
                reader.callback(None)
            else:
                reader.errback(self._ended)
        self._closed.callback(None)

    # IPushProducer: the channel tells us when the network is full.

    def pauseProducing(self) -> None:
        self._writable = False

    def resumeProducing(self) -> None:
        self._writable = True
        while self._senders and self._writable:
            self._senders.popleft().callback(None)

    def stopProducing(self) -> None:
        self._writable = False

    # ISyncConnection

    def send(self, data: bytes) -> Deferred[None]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return fail(TypeError(f"send() takes bytes, not {type(data).__name__}"))
        if self._ended is not None:
            return fail(self._ended)
        if self._closing:
            return fail(ConnectionDone("send() after close()"))
        self.transport.writeMessage(bytes(data))
        if self._writable:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._senders.append(d)
        return d

    def receive(self) -> _Messages:
        return _Messages(self)

    def close(self) -> Deferred[None]:
        self._closing = True
        if self._ended is None:
            self.transport.loseConnection()
        d: Deferred[None] = Deferred()
        self._closed.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    def _next(self) -> Deferred[bytes | None]:
        """The next message, or C{None} after a clean end."""
        if self._messages:
            message = self._messages.popleft()
            self._queued -= len(message)
            if self._reading_paused and self._queued <= self._receive_buffer // 2:
                self._reading_paused = False
                self.transport.resumeProducing()
            return succeed(message)
        if self._ended is not None:
            if self._ended.check(ConnectionDone):
                return succeed(None)
            return fail(self._ended)
        d: Deferred[bytes | None] = Deferred()
        self._readers.append(d)
        return d


class _Messages:
    """The async iterator returned by L{SyncConnection.receive}."""

    def __init__(self, connection: SyncConnection) -> None:
        self._connection = connection

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> bytes:
        message = await self._connection._next()
        if message is None:
            raise StopAsyncIteration
        return message


class _ConnectionFactory(Factory):
    """Builds L{SyncConnection}s and remembers the open ones, for C{close()}."""

    def __init__(self, on_connection=None, **options) -> None:
        self._options = dict(options, on_connection=on_connection)
        self.connections: set[SyncConnection] = set()

    def buildProtocol(self, addr) -> SyncConnection:
        connection = SyncConnection(**self._options)
        connection.factory = self
        self.connections.add(connection)
        connection._closed.addBoth(lambda _: self.connections.discard(connection))
        return connection


_log = Logger()


def _call_handler(handler: Callable, connection: SyncConnection) -> None:
    """Run the user's C{on_connection} (plain or async); log what it raises."""

    def run():
        result = handler(connection)
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result

    maybeDeferred(run).addErrback(lambda f: _log.failure("the on_connection handler failed", failure=f))


@implementer(ISyncTransport)
class EndpointTransport:
    """
    L{ISyncTransport} over pluresync endpoints: C{auto} (every path), or one
    relay (the seed's C{azure-relay} / C{vercel-relay}).

    @param client: makes the client endpoint, for any peer (C{None}) or one.
    @param server: the listening endpoint.
    """

    def __init__(
        self,
        name: str,
        client: Callable[[bytes | None], object],
        server,
        *,
        max_message_size: int,
        receive_buffer: int,
    ) -> None:
        self.name = name
        self._client = client
        self._server = server
        self._options = dict(max_message_size=max_message_size, receive_buffer=receive_buffer)
        self._ports: list = []
        self._factories: list[_ConnectionFactory] = []

    def connect(self, peer: str | None = None) -> Deferred[SyncConnection]:
        try:
            endpoint = self._client(None if peer is None else parse_peer_id(peer))
        except ValueError as e:
            return fail(ConfigurationError(f"connect(peer=...): {e}"))
        factory = _ConnectionFactory(**self._options)
        self._factories.append(factory)
        return endpoint.connect(factory)

    def listen(self, on_connection: Callable) -> Deferred[None]:
        factory = _ConnectionFactory(on_connection, **self._options)
        self._factories.append(factory)
        d = self._server.listen(factory)
        d.addCallback(self._ports.append)
        return d

    def close(self) -> Deferred[None]:
        closing = [port.stopListening() for port in self._ports]
        self._ports.clear()
        for factory in self._factories:
            closing.extend(connection.close() for connection in list(factory.connections))
        self._factories.clear()
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)


def _sync_key(sync_key) -> SyncKey:
    if isinstance(sync_key, SyncKey):
        return sync_key
    if isinstance(sync_key, os.PathLike):
        return SyncKey.from_file(sync_key)
    if isinstance(sync_key, str) and sync_key.strip():
        if sync_key.strip().lower().startswith("psk1-"):
            return SyncKey.from_text(sync_key)
        if os.path.exists(os.path.expanduser(sync_key)):
            raise ConfigurationError(
                "sync_key names a file; pass SyncKey.from_file(path) or pathlib.Path(path) "
                "(a plain string is the key's text or a passphrase)"
            )
        return SyncKey.from_passphrase(sync_key)
    raise ConfigurationError(
        "sync_key must be a SyncKey, a key file's Path, a key's text (psk1-...) or a passphrase; "
        "make a key with `pluresync keygen`"
    )


def create_transport(
    mode: str = "auto",
    *,
    sync_key,
    azure_relay_url: str | None = None,
    vercel_relay_url: str | None = None,
    connection_timeout: float = 30.0,
    head_start: float | None = None,
    topic: str = "",
    identity: PeerIdentity | str | None = None,
    ca: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE,
    receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
    resume: float | None = None,
    window: int | None = None,
    direct: bool | None = None,
    reactor=None,
) -> ISyncTransport:
    """
    Make the seed's C{SyncTransport}.

    @param mode: C{"auto"} (the default: the LAN path when the
        C{pluresync[direct]} extra is installed, then both relays, each with
        a head start over the next, listening on all), C{"azure-relay"} or
        C{"vercel-relay"} (one relay), C{"direct"} (the LAN only, no relay).
        The keyword arguments of a seed config file come from
        L{pluresync.config.load_config}.
    @param sync_key: a L{SyncKey}, its text form, or a passphrase (stretched
        with Argon2id; slow once, on purpose).
    @param head_start: (auto) seconds each relay gets before the next is tried.
    @param identity: this peer's identity, or a path to its identity file
        (created on first use); a fresh one per transport if omitted.
    @param resume: seconds a connection may be without any path before it
        ends (30 by default; 0: it ends with its first path, as before
        sessions could move).
    @param window: bytes the peer may send ahead of what this side has
        read (the session's credit, 16 MiB by default).
    @param direct: (auto) C{False} leaves the LAN path out (a policy, e.g.
        on a corporate laptop); C{True} requires it; by default it is
        raced first when zeroconf is installed.
    @param reactor: the reactor to use; the global one if omitted (the one
        place pluresync reaches for it, so scripts stay short).
    """
    if mode not in ("auto", DIRECT_MODE, *RELAY_MODES):
        raise ConfigurationError(f"unknown mode {mode!r}; use auto, {', '.join(RELAY_MODES)} or {DIRECT_MODE}")
    if reactor is None:
        from twisted.internet import reactor
    from pluresync.endpoints.auto import AutoClientEndpoint, AutoServerEndpoint
    from pluresync.endpoints.direct import DirectClientEndpoint, DirectServerEndpoint
    from pluresync.endpoints.parsers import DIRECT_PARAMETERS, auto_config, direct_config
    from pluresync.endpoints.relay import RelayClientEndpoint, RelayServerEndpoint

    key = _sync_key(sync_key)
    params = {"key": key.to_text(), "timeout": str(connection_timeout), "topic": topic}
    if azure_relay_url:
        params["azure"] = azure_relay_url
    if vercel_relay_url:
        params["vercel"] = vercel_relay_url
    if ca:
        params["ca"] = ca
    if isinstance(identity, str):
        params["identity"] = identity
    if head_start is not None:
        params["delay"] = str(head_start)
    if resume is not None:
        params["resume"] = str(resume)
    if window is not None:
        params["window"] = str(window)
    options = dict(max_message_size=max_message_size, receive_buffer=receive_buffer)
    if mode == DIRECT_MODE:
        lan = direct_config(**{k: v for k, v in params.items() if k in DIRECT_PARAMETERS})
        if isinstance(identity, PeerIdentity):
            lan = replace(lan, identity=identity)

        def direct_client(peer: bytes | None):
            return DirectClientEndpoint(reactor, lan if peer is None else replace(lan, peer=peer))

        return EndpointTransport(mode, direct_client, DirectServerEndpoint(reactor, lan), **options)
    if mode != "auto":
        params["relays"] = RELAY_MODES[mode]
        params["direct"] = "off"
    elif direct is not None:
        params["direct"] = "on" if direct else "off"
    config = auto_config(**params)
    if isinstance(identity, PeerIdentity):
        config = replace(config, paths=tuple(replace(path, identity=identity) for path in config.paths))
    if mode == "auto":

        def client(peer: bytes | None):
            paths = config.paths if peer is None else tuple(replace(p, peer=peer) for p in config.paths)
            return AutoClientEndpoint(reactor, replace(config, paths=paths))

        return EndpointTransport(mode, client, AutoServerEndpoint(reactor, config), **options)
    [path] = config.paths

    def relay_client(peer: bytes | None):
        return RelayClientEndpoint(reactor, path if peer is None else replace(path, peer=peer))

    return EndpointTransport(mode, relay_client, RelayServerEndpoint(reactor, path), **options)
