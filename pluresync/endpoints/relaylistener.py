"""
A C{relay:} listener: the registration at a relay that C{relay:} (and each
relay path of C{auto:}) returns as its listening port.

It holds the control WebSocket, answers every C{incoming} with a new paired
WebSocket and a handshake, and, if the relay drops or restarts, registers
again with exponential backoff and jitter until C{stopListening}.  When the
relay announces a cap on the socket's life (C{session_seconds}), it renews
the registration before the cap, make-before-break: a second registration
first, then a normal close of the first.  Its life (registering, listening,
renewing, waiting to retry, stopping) is an Automat machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.address import PeerAddress
from pluresync.automata import Transitions
from pluresync.endpoints.deadline import with_timeout
from pluresync.errors import NotChosenError, PeerGoneError, PluresyncError, RelayError
from pluresync.interfaces import IPathListener
from pluresync.pipes.websocket import RelaySocketProtocol
from pluresync.relay.core.wire import CLOSE_NORMAL, encode_accept, encode_listen
from pluresync.secure.link import LinkRefused
from pluresync.session.attach import SessionTable

if TYPE_CHECKING:
    from pluresync.endpoints.relay import RelayConfig


class _PortInputs(Protocol):
    """Everything that can happen to a listener registration (the inputs of its machine)."""

    def start_once(self) -> Deferred:
        "C{startListening()}: register; a failure is the caller's to handle."

    def start_retrying(self) -> Deferred:
        "C{startListening(keep_trying=True)}: register, and keep trying if it fails."

    def stop(self) -> Deferred[None]:
        "C{stopListening()}."

    def registered(self, control: RelaySocketProtocol) -> None:
        "The relay answered C{ready} on the control socket C{control}."

    def registration_failed(self, failure: Failure) -> None:
        "A registration attempt failed (or was cancelled, or timed out)."

    def control_lost(self, reason: Failure) -> None:
        "The control socket of the registration in use ended unexpectedly."

    def control_ended(self, reason: Failure) -> None:
        "The relay ended the control socket of a healthy registration on purpose: going away, or its cap."

    def renew_due(self) -> None:
        "The registration in use nears the relay's cap: time to open the next one."

    def retry_due(self) -> None:
        "The backoff timer ran out."

    def incoming(self, session: str, peer: str | None) -> None:
        "The relay offers a connector (declaring C{peer}) in C{session}."


@dataclass(eq=False)
class _PortCore:
    """What a listener registration's machine works on: its config, clock and handles."""

    reactor: Any
    config: RelayConfig
    sessions: SessionTable
    log: Logger
    host: PeerAddress
    initial_delay: float
    max_delay: float
    delay: float = 0.0
    inputs: Any = field(default=None, repr=False)
    port: Any = field(default=None, repr=False)
    registration: Deferred | None = field(default=None, repr=False)
    control: RelaySocketProtocol | None = field(default=None, repr=False)
    retry_call: Any = field(default=None, repr=False)
    renew_call: Any = field(default=None, repr=False)
    #: session id -> reactor seconds, of the recent offers, oldest first (a relay may offer one twice)
    offers: dict[str, float] = field(default_factory=dict, repr=False)
    accepting: set[Deferred] = field(default_factory=set, repr=False)
    started: list[Deferred] = field(default_factory=list, repr=False)
    stopped: list[Deferred] = field(default_factory=list, repr=False)
    outcomes: list[tuple[Deferred, Any]] = field(default_factory=list, repr=False)
    depth: int = 0

    def enter(self, input: Callable[..., Any], *args: Any) -> Any:
        """
        Feed the machine one input, then fire the Deferreds its transitions
        settled.  Their callbacks run outside the machine because they are
        the caller's code, which may well call C{startListening} or
        C{stopListening} from there.
        """
        self.depth += 1
        try:
            return input(*args)
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.notify()

    def notify(self) -> None:
        while self.outcomes:
            d, outcome = self.outcomes.pop(0)
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    @property
    def connected(self) -> bool:
        """Whether a registration is up: there is a control socket."""
        return self.control is not None

    @property
    def where(self) -> str:
        """How logs name this registration: the path and the relay's address."""
        relay = self.config.relay
        return f"{self.config.name} ({relay.host}:{relay.port})"

    def register(self) -> None:
        config = self.config
        hello = encode_listen(config.rendezvous_hex, config.identity.peer_id)
        # This registration's control socket, once the relay is ready (a
        # socket's end is reported only after its answer).
        control: list[RelaySocketProtocol] = []

        def ready(answer: tuple[RelaySocketProtocol, Any]) -> None:
            control.append(answer[0])
            self.enter(self.inputs.registered, answer[0])

        d = config.open(
            self.reactor,
            hello,
            on_incoming=lambda session, peer: self.enter(self.inputs.incoming, session, peer),
            on_lost=lambda reason: self.enter(self.control_gone, control[0] if control else None, reason),
        )
        d = with_timeout(self.reactor, d, config.timeout, f"registering at {config.name}", self.host)
        self.registration = d
        d.addCallbacks(ready, lambda failure: self.enter(self.inputs.registration_failed, failure))

    def control_gone(self, control: RelaySocketProtocol | None, reason: Failure) -> None:
        """
        A registration's control socket ended.  One this port replaced (it
        closed it itself) is no news; the one in use either was ended by the
        relay on purpose, or was lost.
        """
        if control is None or control is not self.control:
            return
        if self.ended_on_purpose(control):
            self.inputs.control_ended(reason)
        else:
            self.inputs.control_lost(reason)

    def ended_on_purpose(self, control: RelaySocketProtocol) -> bool:
        """
        Whether the relay ended a healthy registration on purpose: going
        away (1001), a cap (4029), or at its announced cap.  Healthy: it
        lasted at least the backoff's first delay, so registering again at
        once never tries faster than the backoff would.
        """
        now = self.reactor.seconds()
        if control.answered_at is None or now - control.answered_at < self.initial_delay:
            return False
        if control.closed_on_purpose:
            return True
        return control.expires_at is not None and now >= control.expires_at

    def schedule_renewal(self) -> None:
        """
        If the relay announced a cap on the control socket's life, renew the
        registration C{renew_margin} before it (L{renew_margin}).
        """
        control = self.control
        expires_at = control.expires_at if control is not None else None
        if expires_at is None:
            return
        delay = max(0.0, expires_at - renew_margin(control.session_seconds) - self.reactor.seconds())
        self.renew_call = self.reactor.callLater(delay, self.enter, self.inputs.renew_due)

    def cancel_renewal(self) -> None:
        renew, self.renew_call = self.renew_call, None
        if renew is not None and renew.active():
            renew.cancel()

    def first_offer(self, session: str) -> bool:
        """
        Whether C{session} is offered for the first time.  A relay offers a
        session again to another listener when the one it was offered to
        goes, which may be this port's own registration it just replaced
        (that offer's accept is then already on its way).
        """
        now = self.reactor.seconds()
        offers = self.offers
        # Forget the offers whose accept has given up by now (timeout=), oldest first.
        while offers:
            oldest = next(iter(offers))
            if offers[oldest] >= now - self.config.timeout:
                break
            del offers[oldest]
        if session in offers:
            return False
        offers[session] = now
        return True

    def wait_for_start(self) -> Deferred:
        self.started.append(Deferred())
        return self.started[-1]

    def report_start(self, outcome) -> None:
        """Tell every C{startListening} caller waiting how registering went (the port, or a Failure)."""
        waiting, self.started = self.started, []
        self.outcomes.extend((d, outcome) for d in waiting)

    def wait_for_stop(self) -> Deferred[None]:
        self.stopped.append(Deferred())
        return self.stopped[-1]

    def finish_stopping(self) -> None:
        waiting, self.stopped = self.stopped, []
        self.outcomes.extend((d, None) for d in waiting)

    def retry_later(self, what: str, why: Failure, then: str) -> None:
        """Say what went wrong (the words troubleshooting.md quotes), then register again after the backoff."""
        self.log.warn(
            "{what} ({why}); {then} in {delay:.1f} s", what=what, why=why.getErrorMessage(), then=then, delay=self.delay
        )
        delay = self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.delay * 2, self.max_delay)
        self.retry_call = self.reactor.callLater(delay, self.enter, self.inputs.retry_due)

    def abandon_accepts(self) -> None:
        for d in list(self.accepting):
            d.cancel()

    def accept(self, session: str) -> None:
        d = Deferred.fromCoroutine(self._accept(session))
        d = with_timeout(self.reactor, d, self.config.timeout, "accepting a peer", self.host)
        self.accepting.add(d)
        d.addBoth(self._accepted, d)

    async def _accept(self, session: str):
        config = self.config
        # The relay holds the connector for its accept timeout (10 s by
        # default): retries of a refused upgrade must fit in it.
        try:
            protocol, _ = await config.open(
                self.reactor, encode_accept(session), within=min(config.timeout, ACCEPT_WITHIN)
            )
        except RelayError as error:
            # The connector would otherwise wait for the relay's accept
            # timeout and hear "the listener did not accept in time".
            if self.control is not None and self.control.decline(session, error):
                self.log.info("{relay}: declined an incoming connection: {why}", relay=self.where, why=str(error))
            raise
        link = await config.secure(protocol, initiator=False, resolver=self.sessions.resolve)
        return self.sessions.accept(link)

    def _accepted(self, result, d: Deferred) -> None:
        self.accepting.discard(d)
        if not isinstance(result, Failure) or result.check(CancelledError, ConnectingCancelledError):
            # A cancelled accept was abandoned by stopListening: not news.
            return None
        if result.check(LinkRefused):
            # A peer came back for a session that ended here (or never was):
            # it hears so and stops trying.
            self.log.info("{relay}: {why}", relay=self.where, why=result.getErrorMessage())
        elif result.check(NotChosenError, PeerGoneError):
            # Before the handshake ends, a connector racing several
            # paths (auto:) drops the ones it does not choose: routine.
            self.log.debug(
                "{relay}: a connecting peer chose another path ({why})", relay=self.where, why=result.getErrorMessage()
            )
        else:
            self.log.warn(
                "{relay}: an incoming connection failed: {why}", relay=self.where, why=result.getErrorMessage()
            )
        return None


_ports = TypeMachineBuilder(_PortInputs, _PortCore)
_STOPPED = _ports.state("stopped")
_REGISTERING_ONCE = _ports.state("registering_once")
_REGISTERING = _ports.state("registering")
_LISTENING = _ports.state("listening")
_RENEWING = _ports.state("renewing")
_WAITING = _ports.state("waiting")
_STOPPING = _ports.state("stopping")
_transitions = Transitions(_PortInputs)
_on = _transitions.upon


#: How long an accept may spend retrying an upgrade the relay answered 429/503:
#: within the relay's default accept timeout (10 s), with a second to spare.
ACCEPT_WITHIN = 9.0

#: The longest time before a relay's cap that a registration is renewed.
RENEW_MARGIN = 10.0


def renew_margin(session_seconds: float) -> float:
    """
    How long before a control socket's cap its registration is renewed:
    L{RENEW_MARGIN}, or a quarter of a shorter cap (a relay's
    C{--session-seconds 2}: after 1.5 s).
    """
    return min(RENEW_MARGIN, session_seconds / 4)


@_on(_STOPPED, _PortInputs.start_once).to(_REGISTERING_ONCE)
@_on(_STOPPED, _PortInputs.start_retrying).to(_REGISTERING)
def _start(inputs: _PortInputs, core: _PortCore) -> Deferred:
    started = core.wait_for_start()
    core.register()
    return started


@_on(_REGISTERING_ONCE, _PortInputs.start_once).loop()
@_on(_REGISTERING_ONCE, _PortInputs.start_retrying).loop()
@_on(_REGISTERING, _PortInputs.start_once).loop()
@_on(_REGISTERING, _PortInputs.start_retrying).loop()
@_on(_WAITING, _PortInputs.start_once).loop()
@_on(_WAITING, _PortInputs.start_retrying).loop()
def _already_starting(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return core.wait_for_start()


@_on(_LISTENING, _PortInputs.start_once).loop()
@_on(_LISTENING, _PortInputs.start_retrying).loop()
@_on(_RENEWING, _PortInputs.start_once).loop()
@_on(_RENEWING, _PortInputs.start_retrying).loop()
def _already_listening(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return succeed(core.port)


@_on(_STOPPING, _PortInputs.start_once).loop()
@_on(_STOPPING, _PortInputs.start_retrying).loop()
def _start_while_stopping(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return fail(PluresyncError(f"the listener on {core.config.name} is stopping; start it again once stopped"))


@_on(_REGISTERING_ONCE, _PortInputs.registered).to(_LISTENING)
@_on(_REGISTERING, _PortInputs.registered).to(_LISTENING)
def _registered(inputs: _PortInputs, core: _PortCore, control: RelaySocketProtocol) -> None:
    core.registration = None
    core.control = control
    core.delay = core.initial_delay
    core.log.info("listening through {relay} as peer {peer}", relay=core.where, peer=core.config.identity.peer_id[:12])
    core.schedule_renewal()
    core.report_start(core.port)


@_on(_REGISTERING_ONCE, _PortInputs.registration_failed).to(_STOPPED)
def _first_registration_failed(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.registration = None
    core.report_start(failure)


@_on(_REGISTERING, _PortInputs.registration_failed).to(_WAITING)
def _registration_failed(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.registration = None
    core.report_start(failure)
    core.retry_later(f"registering at {core.where} failed", failure, "next try")


@_on(_LISTENING, _PortInputs.control_lost).to(_WAITING)
def _control_lost(inputs: _PortInputs, core: _PortCore, reason: Failure) -> None:
    core.cancel_renewal()
    core.control = None
    core.retry_later(f"lost the listener registration at {core.where}", reason, "registering again")


@_on(_LISTENING, _PortInputs.control_ended).to(_REGISTERING)
def _control_ended(inputs: _PortInputs, core: _PortCore, reason: Failure) -> None:
    # Going away or a cap is routine: register again at once (a failure
    # then waits the backoff's first delay, and so on).
    core.cancel_renewal()
    core.control = None
    core.log.info(
        "the relay ended the listener registration at {relay} ({why}); registering again now",
        relay=core.where,
        why=reason.getErrorMessage(),
    )
    core.register()


@_on(_WAITING, _PortInputs.retry_due).to(_REGISTERING)
def _retry(inputs: _PortInputs, core: _PortCore) -> None:
    core.retry_call = None
    core.register()


# Renewing before the relay's cap, make-before-break: the next registration
# is made while the one in use still serves, which is closed (1000) only once
# the next one is ready.  The relay allows several listeners per rendezvous
# id, and offers a connector it had offered to the closed one to the other.


@_on(_LISTENING, _PortInputs.renew_due).to(_RENEWING)
def _renew(inputs: _PortInputs, core: _PortCore) -> None:
    core.renew_call = None
    core.log.debug("renewing the listener registration at {relay} before the relay's cap", relay=core.where)
    core.register()


@_on(_RENEWING, _PortInputs.registered).to(_LISTENING)
def _renewed(inputs: _PortInputs, core: _PortCore, control: RelaySocketProtocol) -> None:
    old, core.control = core.control, control
    core.registration = None
    core.delay = core.initial_delay
    old.sendClose(CLOSE_NORMAL)
    core.log.debug("renewed the listener registration at {relay}", relay=core.where)
    core.schedule_renewal()


@_on(_RENEWING, _PortInputs.registration_failed).to(_LISTENING)
def _renewal_failed(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.registration = None
    core.log.warn(
        "renewing the listener registration at {relay} failed ({why}); keeping the current one until the relay ends it",
        relay=core.where,
        why=failure.getErrorMessage(),
    )


@_on(_RENEWING, _PortInputs.control_lost).to(_REGISTERING)
@_on(_RENEWING, _PortInputs.control_ended).to(_REGISTERING)
def _lost_while_renewing(inputs: _PortInputs, core: _PortCore, reason: Failure) -> None:
    # The next registration is already on its way.
    core.control = None
    core.log.info(
        "the listener registration at {relay} ended ({why}); the next one is on its way",
        relay=core.where,
        why=reason.getErrorMessage(),
    )


@_on(_LISTENING, _PortInputs.incoming).loop()
@_on(_RENEWING, _PortInputs.incoming).loop()
def _incoming(inputs: _PortInputs, core: _PortCore, session: str, peer: str | None) -> None:
    if core.first_offer(session):
        core.accept(session)


# Stopping: established connections are not affected; connections still in
# their handshake are abandoned.


@_on(_STOPPED, _PortInputs.stop).loop()
def _stopped_already(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    return succeed(None)


@_on(_REGISTERING_ONCE, _PortInputs.stop).to(_STOPPED)
@_on(_REGISTERING, _PortInputs.stop).to(_STOPPED)
def _stop_registering(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    # Its failure (cancelled) reaches the startListening callers once
    # this transition is over.
    core.abandon_accepts()  # offers from a registration lost meanwhile
    registration, core.registration = core.registration, None
    if registration is not None:
        registration.cancel()
    return succeed(None)


@_on(_WAITING, _PortInputs.stop).to(_STOPPED)
def _stop_waiting(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    core.abandon_accepts()  # offers from the registration just lost
    retry, core.retry_call = core.retry_call, None
    if retry is not None and retry.active():
        retry.cancel()
    core.report_start(Failure(ConnectingCancelledError(core.host)))
    return succeed(None)


@_on(_LISTENING, _PortInputs.stop).to(_STOPPING)
@_on(_RENEWING, _PortInputs.stop).to(_STOPPING)
def _stop_listening(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    stopped = core.wait_for_stop()
    core.abandon_accepts()
    core.cancel_renewal()
    registration, core.registration = core.registration, None
    if registration is not None:  # the next registration, while renewing
        registration.cancel()
    core.control.sendClose(CLOSE_NORMAL)
    return stopped


@_on(_STOPPING, _PortInputs.stop).loop()
def _stop_again(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    return core.wait_for_stop()


@_on(_STOPPING, _PortInputs.control_lost).to(_STOPPED)
@_on(_STOPPING, _PortInputs.control_ended).to(_STOPPED)
def _stopped(inputs: _PortInputs, core: _PortCore, reason: Failure) -> None:
    core.control = None
    core.finish_stopping()


@_on(_STOPPED, _PortInputs.registration_failed).loop()
def _cancelled_by_stop(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.report_start(failure)


# -- late inputs change nothing ------------------------------------------------
# (an offer for a listener that is going, a timer or a socket end that lost
# a race with stopListening, a renewal cancelled by a stop)

_transitions.ignore_the_rest(
    (_STOPPED, _REGISTERING_ONCE, _REGISTERING, _LISTENING, _RENEWING, _WAITING, _STOPPING),
    ("registered", "registration_failed", "control_lost", "control_ended", "renew_due", "retry_due", "incoming"),
)

_PortMachine = _ports.build()


@implementer(IPathListener)
class RelayListeningPort:
    """
    A listener registered at a relay.

    It holds the control WebSocket, answers every C{incoming} with a new
    paired WebSocket and a handshake, and, if the relay drops or restarts,
    registers again with exponential backoff and jitter until
    L{stopListening}. Connections already established are not affected by
    either.

    When the relay announces a cap on the control socket's life
    (C{session_seconds} in C{ready}), the registration is renewed before it,
    make-before-break; a control socket the relay ends on purpose (going
    away, a cap) after a healthy registration is replaced at once, without
    the backoff.

    Its life is a state machine (Automat)::

        stopped --startListening()-----------> registering_once --failed--> stopped
           |                                        | ready
           +--startListening(keep_trying=True)--> registering --ready--> listening
                                                  |  ^                  |
                                           failed v  | retry due        | control socket lost
                                                 waiting <--------------+

        listening --control socket ended by the relay (1001, a cap)--> registering (at once)
        listening --renewal due--> renewing --ready (the old socket is closed)--> listening
                                   renewing --failed--> listening
                                   renewing --control socket lost or ended--> registering

        listening, renewing --stopListening()--> stopping --control socket closed--> stopped
        registering*, waiting --stopListening()--> stopped

    @param log: where its log lines go (C{pluresync doctor} silences them).
    @param sessions: the sessions a resuming peer may come back to (shared
        by every path of an C{auto:} listener); its own if not given.
    """

    _log = Logger()
    initial_delay = 1.0
    max_delay = 60.0

    def __init__(
        self, reactor, config: RelayConfig, factory, *, log: Logger | None = None, sessions: SessionTable | None = None
    ) -> None:
        self._config = config
        if sessions is None:
            sessions = SessionTable(reactor, factory, config.session, config.identity.peer_id)
        core = _PortCore(
            reactor,
            config,
            sessions,
            log if log is not None else self._log,
            self.getHost(),
            self.initial_delay,
            self.max_delay,
            delay=self.initial_delay,
        )
        self._core = core
        self._machine = _PortMachine(core)
        core.inputs = self._machine
        core.port = self

    @property
    def connected(self) -> bool:
        """Whether the registration is up right now (C{auto:} reports it per path)."""
        return self._core.connected

    def getHost(self) -> PeerAddress:
        return PeerAddress(self._config.name, self._config.identity.peer_id)

    def startListening(self, keep_trying: bool = False) -> Deferred:
        """
        Register at the relay; fires with this port once the relay is ready.

        @param keep_trying: if the first registration fails, report it and
            go on trying with backoff in the background (C{auto:} listeners
            use this for relays that are down when they start).
        """
        start = self._machine.start_retrying if keep_trying else self._machine.start_once
        return self._core.enter(start)

    def stopListening(self) -> Deferred:
        """
        Unregister from the relay and abandon connections still in their
        handshake; established connections stay open.
        """
        return self._core.enter(self._machine.stop)
