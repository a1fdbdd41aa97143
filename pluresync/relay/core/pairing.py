"""
The rendezvous registry: who listens under which rendezvous id, who waits,
and which connector is offered to which listener in which session.

Pure Python (no Twisted, no Autobahn): an adapter owns the sockets and feeds
this core with inputs (L{Registry.listen}, L{Registry.connect},
L{Registry.accept}, and the C{remove_*} calls when a socket goes away); the
core answers through the small channel interfaces below and keeps time with
an injected C{call_later(seconds, function) -> handle-with-cancel()}.
Twisted's C{reactor.callLater} fits as is.

A connector goes through::

    WAITING --listener appears--> OFFERED --accept--> PAIRED --unpair--> DONE
       |                            |  ^
       |                            +--+ its listener gone, another one registered: offered to that one
       +--wait expires / gone------> DONE <--accept timeout / listener gone (and no other) / gone

C{DONE} is absorbing: late inputs for a finished connector change nothing.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pluresync.relay.core.wire import ErrorCode, ProtocolError, short_id


class Cancellable(Protocol):
    """A scheduled call (Twisted's C{IDelayedCall} is one)."""

    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Cancellable]


class ListenerChannel(Protocol):
    """What the registry needs from a listener's control socket."""

    def incoming(self, session: str, peer: str | None) -> None:
        """A connector (declaring C{peer}) waits to be accepted in C{session}."""


class ConnectorChannel(Protocol):
    """What the registry needs from a connector's socket."""

    def failed(self, error: ProtocolError) -> None:
        """
        The connector will not be paired (C{no-listener} or C{timeout});
        the adapter reports C{error} and closes the socket.
        """


class ConnectorState(enum.Enum):
    """Where a connector is in its life."""

    WAITING = "waiting"
    """No (matching) listener yet; the wait timer runs."""
    OFFERED = "offered"
    """An C{incoming} went to a listener; the accept timer runs."""
    PAIRED = "paired"
    """Accepted: the adapter pipes bytes; the registry only counts it."""
    DONE = "done"
    """Finished, for whatever reason (absorbing)."""


@dataclass(eq=False)
class Listener:
    """A registered listener (one control socket)."""

    rdv: str
    peer: str
    channel: ListenerChannel
    registered: bool = True


@dataclass(eq=False)
class Connector:
    """A connector's request, from C{connect} until it is done."""

    rdv: str
    peer: str | None
    from_: str | None
    channel: ConnectorChannel
    state: ConnectorState = ConnectorState.WAITING
    session: str | None = None
    listener: Listener | None = None
    timer: Cancellable | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Pairing:
    """
    The result of a successful C{accept}.

    @ivar connector: the paired connector (its C{channel} is the connector's
        socket, to be piped to the accepting socket).
    @ivar listener_peer: the listener's peer id (sent to the connector).
    @ivar connector_peer: the connector's C{from} (sent to the acceptor).
    """

    session: str
    connector: Connector
    listener_peer: str
    connector_peer: str | None


def new_session_id() -> str:
    """A fresh session id: 32 lowercase hex characters from 16 random bytes."""
    return os.urandom(16).hex()


class Registry:
    """
    The rendezvous registry of one relay process.

    @param call_later: schedules C{function} after C{seconds}; returns an
        object with C{cancel()}.
    """

    def __init__(
        self,
        call_later: CallLater,
        *,
        max_pending: int = 64,
        accept_timeout: float = 10.0,
        max_wait: float = 120.0,
        default_wait: float = 30.0,
        new_session: Callable[[], str] = new_session_id,
    ) -> None:
        self._call_later = call_later
        self._max_pending = max_pending
        self._accept_timeout = accept_timeout
        self._max_wait = max_wait
        self._default_wait = default_wait
        self._new_session = new_session
        self._listeners: dict[str, list[Listener]] = {}
        self._waiting: dict[str, list[Connector]] = {}
        self._offered: dict[str, Connector] = {}
        self._pending_by_rdv: dict[str, int] = {}
        self._paired = 0

    # -- counts (for /health) ------------------------------------------------

    @property
    def accept_timeout(self) -> float:
        """Seconds a listener has to accept an offered session."""
        return self._accept_timeout

    @property
    def listener_count(self) -> int:
        """Registered listeners."""
        return sum(len(ls) for ls in self._listeners.values())

    @property
    def pending_count(self) -> int:
        """Connectors waiting for a listener or for an accept."""
        return sum(self._pending_by_rdv.values())

    @property
    def paired_count(self) -> int:
        """Sessions paired and not yet ended."""
        return self._paired

    def counts(self) -> dict[str, int]:
        """The C{/health} counts every front reports (never an id)."""
        return {"listeners": self.listener_count, "sessions": self.paired_count, "pending": self.pending_count}

    def listeners_of(self, rdv: str) -> int:
        """Listeners registered (on this instance) under C{rdv}."""
        return len(self._listeners.get(rdv, ()))

    # -- listeners -------------------------------------------------------------

    def listen(self, rdv: str, peer: str, channel: ListenerChannel) -> Listener:
        """
        Register a listener; connectors already waiting for it are offered to
        it at once (C{channel.incoming} may be called before this returns).
        """
        listener = Listener(rdv=rdv, peer=peer, channel=channel)
        self._listeners.setdefault(rdv, []).append(listener)
        waiting = self._waiting.get(rdv, [])
        for connector in [c for c in waiting if c.peer in (None, peer)]:
            self._offer(connector, listener)
        return listener

    def waiting_for(self, rdv: str) -> list[Connector]:
        """The connectors waiting for a listener of C{rdv} (a copy)."""
        return list(self._waiting.get(rdv, ()))

    def waiting_rendezvous(self) -> list[str]:
        """Every rendezvous id some connector waits for (a front re-announces them)."""
        return list(self._waiting)

    def remove_listener(self, listener: Listener) -> None:
        """
        The listener's control socket went away: unregister it.  Its
        connectors not yet accepted are offered again, in the same session,
        to another listener that would take them (a listener renewing its
        registration has its next one registered before it closes the
        first); without one they fail with C{no-listener}.  Idempotent.
        """
        if not listener.registered:
            return
        self.retire_listener(listener)
        orphans = [c for c in self._offered.values() if c.listener is listener]
        for connector in orphans:
            other = self._pick_listener(connector.rdv, connector.peer)
            if other is not None:
                self._offer_again(connector, other)
            else:
                self._fail(
                    connector,
                    ErrorCode.NO_LISTENER,
                    "the listener went away before accepting",
                )

    def retire_listener(self, listener: Listener) -> None:
        """
        Unregister C{listener} without failing the connectors already
        offered to it: their sessions can still be accepted until their
        accept timers run out.  (A cluster adapter registers a stand-in for
        a listener of another instance, lets the waiting connectors be
        offered to it, then retires it.)  Idempotent.
        """
        if not listener.registered:
            return
        listener.registered = False
        same_rdv = self._listeners.get(listener.rdv, [])
        same_rdv.remove(listener)
        if not same_rdv:
            del self._listeners[listener.rdv]

    def has_listener(self, rdv: str, peer: str | None = None) -> bool:
        """Whether a listener of C{rdv} (with peer id C{peer}, if given) is registered."""
        return any(peer is None or listener.peer == peer for listener in self._listeners.get(rdv, ()))

    def cancel_session(self, session: str, code: ErrorCode, message: str) -> bool:
        """
        Fail the connector offered in C{session} (not yet accepted) with
        C{code}; return whether there was one.
        """
        connector = self._offered.get(session)
        if connector is None:
            return False
        self._fail(connector, code, message)
        return True

    def decline(self, session: str, listener: Listener, code: ErrorCode, message: str, retry: float | None) -> bool:
        """
        C{listener} could not accept C{session}: fail its connector at once
        with C{code}; return whether there was one (offered to that listener).
        """
        connector = self._offered.get(session)
        if connector is None or connector.listener is not listener:
            return False
        self._finish(connector)
        connector.channel.failed(ProtocolError(code, message, retry))
        return True

    # -- connectors ------------------------------------------------------------

    def connect(
        self,
        rdv: str,
        peer: str | None,
        from_: str | None,
        wait: float | None,
        channel: ConnectorChannel,
    ) -> Connector:
        """
        Register a connector: offer it to a matching listener (round-robin)
        or let it wait up to C{wait} seconds (clamped to C{max_wait}).

        @raise ProtocolError: C{rate-limited} when C{max_pending} connectors
            of C{rdv} are already pending; C{no-listener} when no listener
            matches and C{wait} is 0.
        """
        if self._pending_by_rdv.get(rdv, 0) >= self._max_pending:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "too many connectors are waiting for this rendezvous; retry later",
            )
        connector = Connector(rdv=rdv, peer=peer, from_=from_, channel=channel)
        listener = self._pick_listener(rdv, peer)
        if listener is None:
            seconds = self._default_wait if wait is None else wait
            seconds = min(seconds, self._max_wait)
            if seconds <= 0:
                raise ProtocolError(ErrorCode.NO_LISTENER, no_listener_message(peer))
            self._pending_by_rdv[rdv] = self._pending_by_rdv.get(rdv, 0) + 1
            self._waiting.setdefault(rdv, []).append(connector)
            connector.timer = self._call_later(seconds, lambda: self._wait_expired(connector))
        else:
            self._pending_by_rdv[rdv] = self._pending_by_rdv.get(rdv, 0) + 1
            self._offer(connector, listener)
        return connector

    def remove_connector(self, connector: Connector) -> None:
        """
        The connector's socket went away before pairing ended: forget it
        (its session can no longer be accepted).  Idempotent; for a paired
        connector this is L{unpair}.
        """
        if connector.state is ConnectorState.PAIRED:
            self.unpair(connector)
        elif connector.state is not ConnectorState.DONE:
            self._finish(connector)

    def accept(self, session: str) -> Pairing:
        """
        A listener accepts C{session}: the connector is paired.

        @raise ProtocolError: C{no-session} for an unknown, expired or
            already accepted session.
        """
        connector = self._offered.get(session)
        if connector is None:
            raise ProtocolError(
                ErrorCode.NO_SESSION,
                "no such session (unknown, expired or already accepted)",
            )
        listener = connector.listener
        assert listener is not None
        self._finish(connector)
        connector.state = ConnectorState.PAIRED
        self._paired += 1
        return Pairing(
            session=session,
            connector=connector,
            listener_peer=listener.peer,
            connector_peer=connector.from_,
        )

    def unpair(self, connector: Connector) -> None:
        """The pair of C{connector} ended.  Idempotent."""
        if connector.state is ConnectorState.PAIRED:
            connector.state = ConnectorState.DONE
            self._paired -= 1

    # -- internals -------------------------------------------------------------

    def _pick_listener(self, rdv: str, peer: str | None) -> Listener | None:
        listeners = self._listeners.get(rdv)
        if not listeners:
            return None
        for index, listener in enumerate(listeners):
            if peer is None or listener.peer == peer:
                # Round-robin: the chosen listener goes to the back.
                listeners.append(listeners.pop(index))
                return listener
        return None

    def _offer(self, connector: Connector, listener: Listener) -> None:
        waiting = self._waiting.get(connector.rdv, [])
        if connector in waiting:
            # It waited for this listener: stop the wait timer.
            waiting.remove(connector)
            if not waiting:
                del self._waiting[connector.rdv]
            if connector.timer is not None:
                connector.timer.cancel()
                connector.timer = None
        session = self._new_session()
        while session in self._offered:
            session = self._new_session()
        connector.state = ConnectorState.OFFERED
        connector.session = session
        connector.listener = listener
        self._offered[session] = connector
        connector.timer = self._call_later(self._accept_timeout, lambda: self._accept_expired(connector))
        listener.channel.incoming(session, connector.from_)

    def _offer_again(self, connector: Connector, listener: Listener) -> None:
        """
        Offer an OFFERED connector to C{listener} in the same session: an
        accept already on its way from the listener that went still pairs
        it, and so does one from C{listener}; the accept timer starts again.
        """
        assert connector.session is not None
        connector.listener = listener
        if connector.timer is not None:
            connector.timer.cancel()
        connector.timer = self._call_later(self._accept_timeout, lambda: self._accept_expired(connector))
        listener.channel.incoming(connector.session, connector.from_)

    def _wait_expired(self, connector: Connector) -> None:
        if connector.state is ConnectorState.WAITING:
            connector.timer = None
            self._fail(connector, ErrorCode.NO_LISTENER, no_listener_message(connector.peer))

    def _accept_expired(self, connector: Connector) -> None:
        if connector.state is ConnectorState.OFFERED:
            connector.timer = None
            self._fail(connector, ErrorCode.TIMEOUT, "the listener did not accept in time")

    def _fail(self, connector: Connector, code: ErrorCode, message: str) -> None:
        self._finish(connector)
        connector.channel.failed(ProtocolError(code, message))

    def _finish(self, connector: Connector) -> None:
        """Take a WAITING or OFFERED connector out of every table: DONE."""
        if connector.state is ConnectorState.WAITING:
            waiting = self._waiting.get(connector.rdv, [])
            if connector in waiting:
                waiting.remove(connector)
                if not waiting:
                    del self._waiting[connector.rdv]
        elif connector.state is ConnectorState.OFFERED:
            assert connector.session is not None
            self._offered.pop(connector.session, None)
        else:
            return
        remaining = self._pending_by_rdv[connector.rdv] - 1
        if remaining:
            self._pending_by_rdv[connector.rdv] = remaining
        else:
            del self._pending_by_rdv[connector.rdv]
        if connector.timer is not None:
            connector.timer.cancel()
            connector.timer = None
        connector.state = ConnectorState.DONE


def no_listener_message(peer: str | None) -> str:
    """What a connector is told when no listener (with peer id C{peer}) is there: every front says the same."""
    if peer is None:
        return "no listener for this rendezvous"
    return f"no listener with peer id {short_id(peer)}... for this rendezvous"
