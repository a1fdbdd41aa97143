"""
C{auto:} endpoints: every configured path at once, the best one that works.

A client races its paths in priority order with a head start (happy
eyeballs): it starts the first, and starts the next when the previous one has
failed or has not connected within C{delay}. The first completed handshake
wins; the others are cancelled, and any that also completed are closed with
an authenticated CLOSE before their listener builds anything (see the USE
record in docs/protocol.md). A total C{timeout} ends the race with one error
that lists every attempt and why it failed. The winner is remembered per
network and peer (L{pathcache}) and tried first next time.  When the
session's link is lost (or must move before a relay's cap), the same race
runs again to resume it, over every path.

A listener registers on every path at once and keeps each registration
alive on its own (reconnecting with backoff), so losing one relay leaves the
others serving; its paths share one session table, so a session resumes
through whichever path the connector reaches.

The race and the listener know paths only as L{IPath} providers
(L{pluresync.interfaces}): a path's C{client()} is an L{IPathClient} that
stops at a secured, unattached channel, and its C{listener()} an
L{IPathListener}.  Today the paths are the relays named in the endpoint
string, built by L{pluresync.endpoints.parsers.auto_config}; C{direct:} will
be one more L{IPath} in front of them, with no change here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.address import PeerAddress
from pluresync.endpoints import pathcache
from pluresync.errors import ConnectionTimeoutError, PluresyncError
from pluresync.interfaces import IPath, IPathClient, IPathListener
from pluresync.secure.link import LinkRefused
from pluresync.session import attach, pool

#: The default head start of each path over the next, in seconds: long enough
#: for a healthy relay on another continent to answer, short enough that a
#: blackholed one costs little.
DEFAULT_DELAY = 0.5


class AutoConnectError(PluresyncError):
    """
    Every path failed.

    @ivar attempts: C{(path name, what went wrong)} for each path, in the
        order they were tried.
    """

    def __init__(self, attempts: Sequence[tuple[str, str]], prefix: str = "no path to the peer worked") -> None:
        self.attempts = list(attempts)
        detail = "; ".join(f"{name}: {why}" for name, why in self.attempts) or "no paths configured"
        super().__init__(f"{prefix}: {detail}")


class AutoTimeoutError(AutoConnectError, ConnectionTimeoutError):
    """The total timeout passed before any path connected."""


@dataclass(frozen=True)
class AutoConfig:
    """
    @ivar paths: the paths in priority order (the relays today; C{direct:} will come first).
    @ivar delay: head start of each path over the next.
    @ivar timeout: the whole race's deadline.
    @ivar peer: the peer we connect to, as far as known before connecting
        (its id, or our rendezvous id): the path cache's key.
    """

    paths: tuple[IPath, ...]
    delay: float = DEFAULT_DELAY
    timeout: float = 30.0
    cache: pathcache.PathCache = field(default_factory=lambda: pathcache.shared, compare=False)
    #: how sessions look for a direct (punched UDP) path once they run
    #: (L{pluresync.direct.upgrade.DirectParams}); C{None}: they never do
    upgrade: object | None = None
    #: (C{direct:} with C{relay=}) a session reaches the application only
    #: once a direct path carries it: the relays serve to meet and signal
    direct_only: bool = False

    @property
    def identity(self):
        return self.paths[0].identity

    @property
    def cache_key(self) -> str:
        return self.paths[0].cache_key

    @property
    def session(self):
        # A side that looks for direct paths says so in its hello or READY.
        return replace(self.paths[0].session, direct=self.upgrade is not None)

    @property
    def pool_key(self):
        """What connects that may share a session agree on (L{pluresync.session.pool}); C{None}: never shared."""
        if not self.session.share:
            return None
        keys = tuple(getattr(path, "pool_key", None) for path in self.paths)
        if None in keys:
            return None
        return ("auto", keys, self.upgrade, self.direct_only)

    def on_session(self, reactor):
        """What each new session is handed to (a L{DirectUpgrade}), or C{None}."""
        if self.upgrade is None:
            return None
        from pluresync.direct.upgrade import DirectUpgrade

        params, identity, topic = self.upgrade, self.identity, self.paths[0].topic

        def upgrade(session) -> None:
            DirectUpgrade(reactor, session, params, identity=identity, topic=topic)

        return upgrade

    def until(self):
        """(C{direct_only}) when a session may reach the application: once it runs direct."""
        if not self.direct_only:
            return None

        def direct(session) -> Deferred:
            if (session.path or "").startswith("direct:"):
                return succeed(None)  # the LAN: direct from the start
            return session.signals.whenDirect()

        return direct


def _why(failure: Failure) -> str:
    if failure.check(CancelledError, ConnectingCancelledError):
        return "cancelled"
    return failure.getErrorMessage()


class _Race:
    """
    One connection attempt of an L{AutoClientEndpoint}: the first secured
    link over any path, or the error of every path.

    @param hello: makes the session hello (a resume); a new session's if C{None}.
    """

    _log = Logger()

    def __init__(self, reactor, config: AutoConfig, hello=None) -> None:
        self._reactor = reactor
        self._config = config
        self._hello = hello
        names = [path.name for path in config.paths]
        by_name = {path.name: path for path in config.paths}
        self._order = [by_name[n] for n in config.cache.order(names, config.cache_key, reactor.seconds())]
        self._next = 0
        self._attempts: dict[str, Deferred] = {}
        self._failures: dict[str, str] = {}
        self._head_start = None
        self._deadline = None
        self._done = False
        self.result: Deferred = Deferred(self._cancel)

    def start(self) -> Deferred:
        self._deadline = self._reactor.callLater(self._config.timeout, self._timedOut)
        self._startNext()
        return self.result

    def _startNext(self) -> None:
        if self._head_start is not None and self._head_start.active():
            self._head_start.cancel()
        self._head_start = None
        if self._next >= len(self._order):
            return
        path = self._order[self._next]
        self._next += 1
        client: IPathClient = path.client(self._reactor)
        d = client.secure(self._hello)
        self._attempts[path.name] = d
        started = self._next
        d.addCallbacks(self._won, self._lost, callbackArgs=(path,), errbackArgs=(path,))
        if self._next != started or self._done:
            return  # it failed at once and handed its turn on already (or won)
        if self._next < len(self._order):
            # A path may ask for less than the configured head start (the
            # LAN: it must never make the relays start later than they did
            # before it existed).
            delay = getattr(path, "head_start", None)
            delay = self._config.delay if delay is None else min(delay, self._config.delay)
            if delay <= 0 and not self._done:
                self._startNext()
            else:
                self._head_start = self._reactor.callLater(delay, self._startNext)

    def _won(self, link, path: IPath) -> None:
        self._attempts.pop(path.name, None)
        if self._done:
            link.discard()
            return
        self._finish()
        self._config.cache.remember(path.name, self._config.cache_key, self._reactor.seconds())
        self.result.callback(link)

    def _lost(self, failure: Failure, path: IPath) -> None:
        self._attempts.pop(path.name, None)
        if self._done:
            return
        if failure.check(LinkRefused):
            # The peer itself answered (its session is gone, or not ours):
            # no other path would answer differently.
            self._finish()
            self.result.errback(failure)
            return
        self._failures[path.name] = _why(failure)
        if self._next < len(self._order):
            # Fail fast: a refused path hands its turn to the next at once.
            self._startNext()
        elif not self._attempts:
            self._finish()
            self.result.errback(Failure(AutoConnectError(self._report())))

    def _report(self, pending: str | None = None) -> list[tuple[str, str]]:
        report = []
        for path in self._order:
            if path.name in self._failures:
                report.append((path.name, self._failures[path.name]))
            elif path.name in self._attempts and pending:
                report.append((path.name, pending))
            elif path.name not in self._attempts:
                report.append((path.name, "not tried"))
        return report

    def _timedOut(self) -> None:
        self._deadline = None
        if self._done:
            return
        report = self._report(pending=f"no answer within {self._config.timeout:g} s")
        self._finish()
        self.result.errback(
            Failure(AutoTimeoutError(report, prefix=f"no path connected within {self._config.timeout:g} s"))
        )

    def _finish(self) -> None:
        """Stop the clocks and cancel every attempt still running."""
        self._done = True
        for call in (self._head_start, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._head_start = self._deadline = None
        for d in list(self._attempts.values()):
            d.cancel()
        self._attempts.clear()

    def _cancel(self, d: Deferred) -> None:
        if self._done:
            return
        self._finish()
        d.errback(Failure(ConnectingCancelledError(PeerAddress("auto", None))))


@implementer(IStreamClientEndpoint)
class AutoClientEndpoint(pool.SharingClient):
    """Connects over whichever configured path works first."""

    def __init__(self, reactor, config: AutoConfig) -> None:
        self._reactor = reactor
        self._config = config

    def _connect(self, protocolFactory, pooled) -> Deferred:
        try:
            d = _Race(self._reactor, self._config).start()
        except BaseException:
            return fail()
        params = self._config.session
        upgrade = self._config.on_session(self._reactor)

        def on_session(session) -> None:
            if upgrade is not None:
                upgrade(session)
            if pooled is not None:
                pooled(session)

        return d.addCallback(
            attach.connect,
            protocolFactory,
            clock=self._reactor,
            params=params,
            local_id=self._config.identity.peer_id,
            reconnect=self._resume if params.resume > 0 else None,
            on_session=on_session,
            until=self._config.until(),
        )

    def _resume(self, hello) -> Deferred:
        """A link for an existing session: the same race, with its resume hello."""
        return _Race(self._reactor, self._config, hello).start()


@implementer(IStreamServerEndpoint)
class AutoServerEndpoint:
    """Listens on every configured path at once."""

    def __init__(self, reactor, config: AutoConfig) -> None:
        self._reactor = reactor
        self._config = config

    def listen(self, protocolFactory) -> Deferred:
        port = AutoListeningPort(self._reactor, self._config, protocolFactory)
        return port.startListening()


@implementer(IListeningPort)
class AutoListeningPort:
    """
    Listeners on every path; up as long as any of them is.

    C{startListening} fires once the first path is registered, and fails
    only if every path's first registration failed. Paths that were down keep
    trying in the background, as do paths that drop later.
    """

    _log = Logger()

    def __init__(self, reactor, config: AutoConfig, factory) -> None:
        self._config = config
        sessions = attach.SessionTable(
            reactor,
            factory,
            config.session,
            config.identity.peer_id,
            on_session=config.on_session(reactor),
            until=config.until(),
        )
        self._ports: dict[str, IPathListener] = {
            path.name: path.listener(reactor, factory, sessions) for path in config.paths
        }

    @property
    def transports(self) -> dict[str, bool]:
        """Each path's name and whether its registration is up right now."""
        return {name: port.connected for name, port in self._ports.items()}

    def getHost(self) -> PeerAddress:
        return PeerAddress("auto", self._config.identity.peer_id)

    def startListening(self) -> Deferred:
        result: Deferred = Deferred()
        failures: dict[str, str] = {}

        def up(_, name: str) -> None:
            if not result.called:
                result.callback(self)

        def down(failure: Failure, name: str) -> None:
            failures[name] = _why(failure)
            if len(failures) == len(self._ports) and not result.called:
                report = [(n, failures[n]) for n in self._ports]
                self.stopListening()
                result.errback(Failure(AutoConnectError(report, prefix="could not listen on any path")))

        for name, port in self._ports.items():
            port.startListening(keep_trying=True).addCallbacks(up, down, callbackArgs=(name,), errbackArgs=(name,))
        return result

    def stopListening(self) -> Deferred:
        return DeferredList([port.stopListening() for port in self._ports.values()], consumeErrors=True).addCallback(
            lambda _: None
        )
