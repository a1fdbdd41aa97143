"""
C{relay:} endpoints: end-to-end encrypted streams through a pluresync relay.

A client endpoint asks the relay to pair it with a listener of the same
rendezvous id, then runs the Noise handshake through the pair as initiator.
A server endpoint registers a listener (a control WebSocket); for each
connector the relay announces, it opens a new WebSocket, accepts the session
and runs the handshake as responder. User protocols are built only once the
peer is authenticated, and get a L{SecureChannel} as their transport.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.ssl import Certificate
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.address import PeerAddress
from pluresync.dial.proxy import ProxyConfig
from pluresync.errors import ConnectionTimeoutError, NotChosenError, PeerGoneError, PluresyncError, RelayError
from pluresync.interfaces import IPath, IPathClient, IPathListener
from pluresync.keys import PeerIdentity, Topic, format_peer_id
from pluresync.pipes.websocket import RelaySocketProtocol, RelayURL, open_relay_socket
from pluresync.relay.core.wire import CLOSE_NORMAL, ErrorCode, encode_accept, encode_connect, encode_listen
from pluresync.secure.channel import SecureChannel
from pluresync.secure.establish import attach, secure_pipe

#: The seed's relays. C{url=} overrides either.
PRESETS = {
    "azure": "wss://pluresdb-relay.azurewebsites.net",
    "vercel": "wss://pluresdb-relay.vercel.app",
}


@implementer(IPath)
@dataclass(frozen=True)
class RelayConfig:
    """
    Everything a relay endpoint needs, already validated.

    @ivar name: the transport's name as peers' addresses report it, e.g.
        C{"relay:azure"}.
    @ivar wait: how long the relay should hold a connector waiting for a
        listener to appear.
    @ivar timeout: how long a whole connection attempt (relay, pairing and
        handshake) may take.
    """

    name: str
    relay: RelayURL
    topic: Topic
    identity: PeerIdentity
    peer: bytes | None = None
    wait: float = 30.0
    timeout: float = 30.0
    ca: tuple[Certificate, ...] | None = None
    ping_interval: float = 25.0
    ping_timeout: float = 10.0
    proxy: ProxyConfig | None = None
    #: The relay token (C{token=}, C{tokenfile=}, C{PLURESYNC_RELAY_TOKEN}); never in a repr.
    token: str | None = field(default=None, repr=False)

    def open(self, reactor, hello: bytes, **callbacks) -> Deferred:
        return open_relay_socket(
            reactor,
            self.relay,
            hello,
            ca=list(self.ca) if self.ca else None,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            proxy=self.proxy,
            token=self.token,
            **callbacks,
        )

    @property
    def rendezvous_hex(self) -> str:
        return self.topic.rendezvous_id.hex()

    # IPath (pluresync.endpoints.auto): a relay is one of auto:'s paths.

    @property
    def cache_key(self) -> str:
        return self.peer.hex() if self.peer is not None else self.rendezvous_hex[:32]

    def client(self, reactor) -> RelayClientEndpoint:
        return RelayClientEndpoint(reactor, self)

    def listener(self, reactor, factory) -> RelayListeningPort:
        return RelayListeningPort(reactor, self, factory)


def _with_timeout(reactor, d: Deferred, seconds: float, what: str, address) -> Deferred:
    """
    Give C{d} a deadline, and turn its cancellation into the errors Twisted
    programs expect: L{ConnectionTimeoutError} when the deadline passed,
    C{ConnectingCancelledError} when the caller cancelled.
    """
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    timer = reactor.callLater(seconds, expire)

    def finish(result):
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure) and result.check(CancelledError):
            if timed_out:
                return Failure(ConnectionTimeoutError(f"{what} timed out after {seconds:g} s"))
            return Failure(ConnectingCancelledError(address))
        return result

    d.addBoth(finish)
    return d


def _secure(config: RelayConfig, protocol, initiator: bool) -> Deferred[SecureChannel]:
    """Run the handshake over a paired relay socket."""
    return secure_pipe(
        protocol.becomePipe,
        initiator=initiator,
        name=config.name,
        identity=config.identity,
        topic=config.topic,
        expected_peer=config.peer,
    )


@implementer(IStreamClientEndpoint, IPathClient)
class RelayClientEndpoint:
    """Connects to a peer listening through a relay."""

    def __init__(self, reactor, config: RelayConfig) -> None:
        self._reactor = reactor
        self._config = config

    @property
    def name(self) -> str:
        return self._config.name

    def connect(self, protocolFactory):
        try:
            d = self.secure()
        except BaseException:
            return fail()
        return d.addCallback(attach, protocolFactory)

    def secure(self) -> Deferred[SecureChannel]:
        """
        Pair through the relay and complete the handshake, but build no
        protocol yet: the channel is C{attach}ed by the caller, or
        C{discard}ed if another path won a race (the C{auto:} transport).
        """
        return _with_timeout(
            self._reactor,
            Deferred.fromCoroutine(self._secure()),
            self._config.timeout,
            f"connecting through {self._config.name}",
            PeerAddress(self._config.name, None),
        )

    async def _secure(self) -> SecureChannel:
        config = self._config
        hello = encode_connect(
            config.rendezvous_hex,
            peer=format_peer_id(config.peer) if config.peer is not None else None,
            from_=config.identity.peer_id,
            # Ask the relay to give up a moment before our own deadline, so
            # the user sees its explanation (no-listener), not a bare timeout.
            wait=max(0.0, min(config.wait, config.timeout - 1.0)),
        )
        try:
            protocol, _ = await config.open(self._reactor, hello)
        except RelayError as e:
            if e.code == ErrorCode.NO_LISTENER.value:
                # Peers with different keys have different rendezvous ids, so
                # they never meet at a relay: a wrong key looks exactly like this.
                raise RelayError(
                    f"{e}; no peer {'with that peer id ' if config.peer else ''}is listening with this "
                    "sync key and topic: check that the listener runs and that both sides use the same "
                    "key file and topic",
                    ErrorCode.NO_LISTENER.value,
                ) from None
            raise
        return await _secure(config, protocol, initiator=True)


@implementer(IStreamServerEndpoint)
class RelayServerEndpoint:
    """Listens for peers through a relay."""

    def __init__(self, reactor, config: RelayConfig) -> None:
        self._reactor = reactor
        self._config = config

    def listen(self, protocolFactory):
        port = RelayListeningPort(self._reactor, self._config, protocolFactory)
        return port.startListening()


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
        "The control socket of a registration ended."

    def retry_due(self) -> None:
        "The backoff timer ran out."

    def incoming(self, session: str, peer: str | None) -> None:
        "The relay offers a connector (declaring C{peer}) in C{session}."


@dataclass(eq=False)
class _PortCore:
    """What a listener registration's machine works on: its config, clock and handles."""

    reactor: Any
    config: RelayConfig
    factory: Any
    log: Logger
    host: PeerAddress
    initial_delay: float
    max_delay: float
    delay: float = 0.0
    connected: bool = False
    inputs: Any = field(default=None, repr=False)
    port: Any = field(default=None, repr=False)
    registration: Deferred | None = field(default=None, repr=False)
    control: RelaySocketProtocol | None = field(default=None, repr=False)
    retry_call: Any = field(default=None, repr=False)
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
    def where(self) -> str:
        """How logs name this registration: the path and the relay's address."""
        relay = self.config.relay
        return f"{self.config.name} ({relay.host}:{relay.port})"

    def register(self) -> None:
        config = self.config
        hello = encode_listen(config.rendezvous_hex, config.identity.peer_id)
        d = config.open(
            self.reactor,
            hello,
            on_incoming=lambda session, peer: self.enter(self.inputs.incoming, session, peer),
            on_lost=lambda reason: self.enter(self.inputs.control_lost, reason),
        )
        d = _with_timeout(self.reactor, d, config.timeout, f"registering at {config.name}", self.host)
        self.registration = d
        d.addCallbacks(
            lambda answer: self.enter(self.inputs.registered, answer[0]),
            lambda failure: self.enter(self.inputs.registration_failed, failure),
        )

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

    def schedule_retry(self) -> None:
        delay = self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.delay * 2, self.max_delay)
        self.retry_call = self.reactor.callLater(delay, self.enter, self.inputs.retry_due)

    def abandon_accepts(self) -> None:
        for d in list(self.accepting):
            d.cancel()

    def accept(self, session: str) -> None:
        d = Deferred.fromCoroutine(self._accept(session))
        d = _with_timeout(self.reactor, d, self.config.timeout, "accepting a peer", self.host)
        self.accepting.add(d)
        d.addBoth(self._accepted, d)

    async def _accept(self, session: str):
        config = self.config
        protocol, _ = await config.open(self.reactor, encode_accept(session))
        channel = await _secure(config, protocol, initiator=False)
        return attach(channel, self.factory)

    def _accepted(self, result, d: Deferred) -> None:
        self.accepting.discard(d)
        if not isinstance(result, Failure) or result.check(CancelledError, ConnectingCancelledError):
            # A cancelled accept was abandoned by stopListening: not news.
            return None
        if result.check(NotChosenError, PeerGoneError):
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
_WAITING = _ports.state("waiting")
_STOPPING = _ports.state("stopping")


@_STOPPED.upon(_PortInputs.start_once).to(_REGISTERING_ONCE)
@_STOPPED.upon(_PortInputs.start_retrying).to(_REGISTERING)
def _start(inputs: _PortInputs, core: _PortCore) -> Deferred:
    started = core.wait_for_start()
    core.register()
    return started


@_REGISTERING_ONCE.upon(_PortInputs.start_once).loop()
@_REGISTERING_ONCE.upon(_PortInputs.start_retrying).loop()
@_REGISTERING.upon(_PortInputs.start_once).loop()
@_REGISTERING.upon(_PortInputs.start_retrying).loop()
@_WAITING.upon(_PortInputs.start_once).loop()
@_WAITING.upon(_PortInputs.start_retrying).loop()
def _already_starting(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return core.wait_for_start()


@_LISTENING.upon(_PortInputs.start_once).loop()
@_LISTENING.upon(_PortInputs.start_retrying).loop()
def _already_listening(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return succeed(core.port)


@_STOPPING.upon(_PortInputs.start_once).loop()
@_STOPPING.upon(_PortInputs.start_retrying).loop()
def _start_while_stopping(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return fail(PluresyncError(f"the listener on {core.config.name} is stopping; start it again once stopped"))


@_REGISTERING_ONCE.upon(_PortInputs.registered).to(_LISTENING)
@_REGISTERING.upon(_PortInputs.registered).to(_LISTENING)
def _registered(inputs: _PortInputs, core: _PortCore, control: RelaySocketProtocol) -> None:
    core.registration = None
    core.control = control
    core.delay = core.initial_delay
    core.connected = True
    core.log.info("listening through {relay} as peer {peer}", relay=core.where, peer=core.config.identity.peer_id[:12])
    core.report_start(core.port)


@_REGISTERING_ONCE.upon(_PortInputs.registration_failed).to(_STOPPED)
def _first_registration_failed(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.registration = None
    core.report_start(failure)


@_REGISTERING.upon(_PortInputs.registration_failed).to(_WAITING)
def _registration_failed(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.registration = None
    core.report_start(failure)
    core.log.warn(
        "registering at {relay} failed ({why}); next try in {delay:.1f} s",
        relay=core.where,
        why=failure.getErrorMessage(),
        delay=core.delay,
    )
    core.schedule_retry()


@_LISTENING.upon(_PortInputs.control_lost).to(_WAITING)
def _control_lost(inputs: _PortInputs, core: _PortCore, reason: Failure) -> None:
    core.control = None
    core.connected = False
    core.log.warn(
        "lost the listener registration at {relay} ({why}); registering again in {delay:.1f} s",
        relay=core.where,
        why=reason.getErrorMessage(),
        delay=core.delay,
    )
    core.schedule_retry()


@_WAITING.upon(_PortInputs.retry_due).to(_REGISTERING)
def _retry(inputs: _PortInputs, core: _PortCore) -> None:
    core.retry_call = None
    core.register()


@_LISTENING.upon(_PortInputs.incoming).loop()
def _incoming(inputs: _PortInputs, core: _PortCore, session: str, peer: str | None) -> None:
    core.accept(session)


# Stopping: established connections are not affected; connections still in
# their handshake are abandoned.


@_STOPPED.upon(_PortInputs.stop).loop()
def _stopped_already(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    return succeed(None)


@_REGISTERING_ONCE.upon(_PortInputs.stop).to(_STOPPED)
@_REGISTERING.upon(_PortInputs.stop).to(_STOPPED)
def _stop_registering(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    # Its failure (cancelled) reaches the startListening callers once
    # this transition is over.
    core.abandon_accepts()  # offers from a registration lost meanwhile
    registration, core.registration = core.registration, None
    if registration is not None:
        registration.cancel()
    return succeed(None)


@_WAITING.upon(_PortInputs.stop).to(_STOPPED)
def _stop_waiting(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    core.abandon_accepts()  # offers from the registration just lost
    retry, core.retry_call = core.retry_call, None
    if retry is not None and retry.active():
        retry.cancel()
    core.report_start(Failure(ConnectingCancelledError(core.host)))
    return succeed(None)


@_LISTENING.upon(_PortInputs.stop).to(_STOPPING)
def _stop_listening(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    stopped = core.wait_for_stop()
    core.abandon_accepts()
    core.control.sendClose(CLOSE_NORMAL)
    return stopped


@_STOPPING.upon(_PortInputs.stop).loop()
def _stop_again(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    return core.wait_for_stop()


@_STOPPING.upon(_PortInputs.control_lost).to(_STOPPED)
def _stopped(inputs: _PortInputs, core: _PortCore, reason: Failure) -> None:
    core.control = None
    core.connected = False
    core.finish_stopping()


@_STOPPED.upon(_PortInputs.registration_failed).loop()
def _cancelled_by_stop(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.report_start(failure)


# -- late inputs change nothing ------------------------------------------------
# (an offer for a listener that is going, a timer or a socket end that lost
# a race with stopListening)

_HANDLED = {
    _STOPPED: {"start_once", "start_retrying", "stop", "registration_failed"},
    _REGISTERING_ONCE: {"start_once", "start_retrying", "stop", "registered", "registration_failed"},
    _REGISTERING: {"start_once", "start_retrying", "stop", "registered", "registration_failed"},
    _LISTENING: {"start_once", "start_retrying", "stop", "control_lost", "incoming"},
    _WAITING: {"start_once", "start_retrying", "stop", "retry_due"},
    _STOPPING: {"start_once", "start_retrying", "stop", "control_lost"},
}
for _state, _names in _HANDLED.items():
    for _name in ("registered", "registration_failed", "control_lost", "retry_due", "incoming"):
        if _name not in _names:
            _state.upon(getattr(_PortInputs, _name)).loop().returns(None)

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

    Its life is a state machine (Automat)::

        stopped --startListening()-----------> registering_once --failed--> stopped
           |                                        | ready
           +--startListening(keep_trying=True)--> registering --ready--> listening
                                                  |  ^                  |
                                           failed v  | retry due        | control socket lost
                                                 waiting <--------------+

        listening --stopListening()--> stopping --control socket closed--> stopped
        registering*, waiting --stopListening()--> stopped

    @param log: where its log lines go (C{pluresync doctor} silences them).
    """

    _log = Logger()
    initial_delay = 1.0
    max_delay = 60.0

    def __init__(self, reactor, config: RelayConfig, factory, *, log: Logger | None = None) -> None:
        self._config = config
        core = _PortCore(
            reactor,
            config,
            factory,
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
