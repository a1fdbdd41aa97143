"""
Sessions shared between connects to the same peer, so that a program that
opens many connections (a connection pool, a browser, C{pluresync
forward}) opens streams on one session: one message each, no new relay
socket, no new handshake, and the relay sees one pair.

Connects share a session when their endpoints agree on everything that
decides who the peer is and how it is reached (the endpoint's C{pool_key}:
the transport, the relay or relays, the key's rendezvous id, our identity,
C{peer=}, the session's knobs); a new endpoint object from the same string
does.  The first connect opens the session; connects made while it is
still being opened wait for it rather than open their own.  A session is
shared while it has a stream and, with C{reuse=SECONDS}, for that long
after its last stream ended (as Twisted's persistent HTTP pool keeps an
idle connection); C{reuse=off} gives each connect its own session.

One pool per reactor: sessions belong to the reactor that runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from weakref import WeakKeyDictionary

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from pluresync.errors import ConnectionTimeoutError, StreamOpenError
from pluresync.session.session import Phase, Session

#: The longest a shutting-down reactor waits for idle sessions' closes to be confirmed.
SHUTDOWN_WAIT = 2.0

_pools: WeakKeyDictionary = WeakKeyDictionary()


def pool_for(reactor) -> SessionPool:
    """The reactor's pool (made on first use)."""
    pool = _pools.get(reactor)
    if pool is None:
        pool = _pools[reactor] = SessionPool(reactor)
    return pool


#: Opens a new session: called with the function to hand the session to
#: once it runs; returns a Deferred firing with the connect's protocol.
Fresh = Callable[[Callable[[Session], object]], Deferred]


class SharingClient:
    """
    The C{connect()} of a client endpoint whose connects share sessions
    (C{relay:}, C{direct:}, C{auto:}): the endpoint has C{_reactor}, a
    C{_config} with C{pool_key} and C{timeout}, and C{_connect(factory,
    shared)}, which opens a new session and hands it to C{shared} once it
    runs (C{shared} is C{None} with C{reuse=off}: a session for this connect alone).
    """

    def connect(self, protocolFactory) -> Deferred:
        """A stream on the session connects to this peer share, else a new session."""
        config = self._config
        key = config.pool_key
        if key is None:
            return self._connect(protocolFactory, None)
        return pool_for(self._reactor).connect(
            key, protocolFactory, lambda shared: self._connect(protocolFactory, shared), config.timeout
        )


class SessionPool:
    """The shared sessions of one reactor, by the key of the endpoints that share them."""

    _log = Logger()

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._sessions: dict[Hashable, Session] = {}
        #: keys whose first connect runs: the connects waiting for it
        self._waiting: dict[Hashable, list[tuple[Deferred, object, Fresh, float]]] = {}
        self._trigger = None

    def __len__(self) -> int:
        return len(self._sessions)

    def session(self, key: Hashable) -> Session | None:
        """The session connects with C{key} share now, if any (tests, benchmarks, logs)."""
        return self._sessions.get(key)

    def sessions(self) -> list[Session]:
        """The sessions connects share now."""
        return list(self._sessions.values())

    def __contains__(self, session: Session) -> bool:
        return any(shared is session for shared in self._sessions.values())

    def connect(self, key: Hashable, factory, fresh: Fresh, timeout: float) -> Deferred:
        """
        Connect C{factory}'s protocol: a stream on the session C{key}'s
        connects share, else a new session through C{fresh}.

        @param timeout: how long opening a stream may take (the endpoint's own timeout).
        @return: a Deferred firing with the protocol.
        """
        session = self._sessions.get(key)
        if session is not None and session.mux is not None and session.mux.accepting:
            return self._stream(key, session, factory, fresh, timeout)
        waiting = self._waiting.get(key)
        if waiting is not None:
            d = Deferred()
            waiting.append((d, factory, fresh, timeout))
            return d
        self._waiting[key] = []
        d = fresh(lambda session: self._add(key, session))
        d.addBoth(self._opened, key)
        return d

    def _stream(self, key, session: Session, factory, fresh: Fresh, timeout: float) -> Deferred:
        try:
            d = session.mux.open(factory)
        except StreamOpenError:
            self._forget(key, session)
            return self.connect(key, factory, fresh, timeout)

        def timedOut(result, seconds):
            return Failure(ConnectionTimeoutError(f"the peer did not accept a new stream within {seconds:g} s"))

        d.addTimeout(timeout, self._reactor, onTimeoutCancel=timedOut)

        def failed(failure):
            if failure.check(StreamOpenError) and failure.value.reason is None:
                # The session ended before the peer answered (its close
                # crossed our OPEN): the peer built nothing, so a new
                # session may carry this connect.
                self._forget(key, session)
                return self.connect(key, factory, fresh, timeout)
            return failure

        return d.addErrback(failed)

    def _opened(self, result, key):
        """The first connect of C{key} is over: the connects that waited for it go on."""
        waiting = self._waiting.pop(key, [])
        failed = isinstance(result, Failure)
        for d, factory, fresh, timeout in waiting:
            if failed and key not in self._sessions:
                d.errback(result)  # the same peer, the same way: the same answer
            else:
                self.connect(key, factory, fresh, timeout).chainDeferred(d)
        return result

    def _add(self, key, session: Session) -> None:
        if session.mux is None:
            return  # the peer carries one stream per session
        self._sessions[key] = session
        session.whenEnded().addBoth(lambda _: self._forget(key, session))
        if self._trigger is None:
            self._trigger = self._reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    def _forget(self, key, session: Session) -> None:
        if self._sessions.get(key) is session:
            del self._sessions[key]

    def _shutdown(self) -> Deferred:
        """The reactor stops: close idle sessions and wait (bounded) for their closes to be confirmed."""
        self._trigger = None
        ending = []
        for session in list(self._sessions.values()):
            session.mux.closeIdle()
            if session.phase is not Phase.ENDED and not session.mux:
                ending.append(session.whenEnded())  # no stream: it is closing, and only that
        if not ending:
            return None
        done = DeferredList(ending, consumeErrors=True)
        timer = self._reactor.callLater(SHUTDOWN_WAIT, done.cancel)

        def stop(result):
            if timer.active():
                timer.cancel()
            return None

        return done.addBoth(stop)
