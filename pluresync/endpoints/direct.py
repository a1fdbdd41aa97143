"""
C{direct:} endpoints: end-to-end encrypted streams straight to a peer, with
no relay and no internet.

Today the direct path is the LAN (C{direct:lan}).  A listener accepts TCP
connections on its LAN interfaces and advertises the port over mDNS (what it
advertises only holders of the topic recognise, and two advertisements
cannot be linked: L{pluresync.direct.lanadvert}).  A client searches the LAN
for the topic's listeners and, for each one found, races a TCP connection
and the end-to-end handshake over its addresses (L{pluresync.direct.race});
the first handshake that completes wins.  The same Noise handshake and
session run over the TCP pipe as over a relay, so whoever answers on an
advertised address, or connects to the port, without the key gets a failed
handshake and nothing else; and a session whose LAN link is lost resumes by
searching again.

L{DirectConfig} is an L{IPath}: C{auto:} races it ahead of the relays, and
an C{auto:} listener listens on the LAN beside its relay registrations,
sharing one session table, so a session may come back over either.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.address import PeerAddress
from pluresync.automata import Transitions
from pluresync.direct import lan
from pluresync.direct.race import DEFAULT_STAGGER, connect_first
from pluresync.endpoints.deadline import with_timeout
from pluresync.errors import (
    ConnectionTimeoutError,
    LanConnectError,
    LanNoPeerError,
    NotChosenError,
    PeerGoneError,
    PluresyncError,
)
from pluresync.interfaces import IPath, IPathClient, IPathListener
from pluresync.keys import PeerIdentity, Topic
from pluresync.pipes import tcp
from pluresync.secure.establish import secure_link
from pluresync.secure.link import Link, LinkRefused
from pluresync.session import attach, pool
from pluresync.session.params import SessionParams
from pluresync.session.session import new_hello

#: The LAN path's name, as addresses, logs and C{auto:}'s errors report it.
LAN = tcp.DEFAULT_NAME
#: Connections still in their handshake that a listener holds at most: a
#: host on the LAN that opens connections and says nothing gets no more,
#: and memory stays bounded.  Connections beyond it are dropped at once.
MAX_HANDSHAKES = 64
#: The longest a listener waits for a connection's handshake (one takes
#: milliseconds on a LAN), so a silent connection frees its place soon.
HANDSHAKE_TIMEOUT = 10.0
#: The least time a client searches the LAN, whatever C{wait=} says: one
#: round of mDNS questions and (delayed, RFC 6762) answers.
MIN_SEARCH = 1.0
#: The deadline of one TCP connection to an advertised address: on a LAN a
#: live host answers in milliseconds, and the race moves on meanwhile.
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class LanAccess:
    """
    How the direct path reaches the LAN: mDNS and TCP.  The endpoints take
    them from here rather than importing them at the call, so that tests can
    put fakes in their place.
    """

    discover: Callable[..., Deferred] = lan.discover
    advertise: Callable[..., Any] = lan.advertise
    connect: Callable[..., Deferred] = tcp.connect_tcp_pipe
    listen: Callable[..., Deferred] = tcp.listen_tcp_pipes


@implementer(IPath)
@dataclass(frozen=True)
class DirectConfig:
    """
    Everything a C{direct:} endpoint needs, already validated.

    @ivar wait: how long a client searches the LAN for a listener.
    @ivar timeout: how long a whole connection attempt (search, TCP and
        handshake) may take.
    @ivar lan: the IPv4 address of the one interface to use (C{lan=}); every
        interface if C{None}.
    @ivar port: the TCP port a listener accepts on (C{port=}); any free one if 0.
    """

    topic: Topic
    identity: PeerIdentity
    name: str = LAN
    peer: bytes | None = None
    wait: float = 30.0
    timeout: float = 30.0
    lan: str | None = None
    port: int = 0
    #: The session's knobs (C{resume=}, C{window=}, C{stall=}, C{ping=}, C{rotate=}).
    session: SessionParams = SessionParams()
    #: In C{auto:}'s race the next path (the primary relay) starts at once
    #: beside the LAN search: where nobody answers on the LAN, the relays
    #: connect exactly as fast as they did before there was a LAN path.
    head_start: float = 0.0
    access: LanAccess = field(default_factory=LanAccess, compare=False, repr=False)

    @property
    def cache_key(self) -> str:
        """The peer, as C{auto:}'s path cache knows it: the same key as a relay path's."""
        return self.peer.hex() if self.peer is not None else self.topic.rendezvous_id.hex()[:32]

    @property
    def pool_key(self):
        """What connects that may share a session agree on (L{pluresync.session.pool}); C{None}: never shared."""
        if not self.session.share:
            return None
        return (
            "direct",
            self.name,
            self.topic.rendezvous_id,
            self.identity.pool_key,
            self.peer,
            self.lan,
            self.session,
        )

    @property
    def search(self) -> float:
        """
        How long a client searches the LAN: C{wait=}, ending a second before
        the timeout (so the user hears that nobody answered rather than a
        bare timeout), but never shorter than one round of mDNS.
        """
        return max(min(self.wait, self.timeout - 1.0), min(MIN_SEARCH, self.timeout))

    @property
    def interfaces(self) -> list[str] | None:
        return [self.lan] if self.lan else None

    @property
    def key(self) -> bytes:
        """What the LAN advertisements of this topic are made and recognised with."""
        return lan.lan_key(self.topic)

    def client(self, reactor) -> DirectClientEndpoint:
        return DirectClientEndpoint(reactor, self)

    def listener(self, reactor, factory, sessions: attach.SessionTable | None = None) -> DirectListeningPort:
        return DirectListeningPort(reactor, self, factory, sessions=sessions)


@implementer(IStreamClientEndpoint, IPathClient)
class DirectClientEndpoint(pool.SharingClient):
    """Connects to a peer listening on the same LAN."""

    def __init__(self, reactor, config: DirectConfig) -> None:
        self._reactor = reactor
        self._config = config

    @property
    def name(self) -> str:
        return self._config.name

    def _connect(self, protocolFactory, on_session) -> Deferred:
        try:
            d = self.secure()
        except BaseException:
            return fail()
        config = self._config
        return d.addCallback(
            attach.connect,
            protocolFactory,
            clock=self._reactor,
            params=config.session,
            local_id=config.identity.peer_id,
            # A lost LAN link resumes by searching again: the listener may
            # have moved to another address meanwhile.
            reconnect=self.secure if config.session.resume > 0 else None,
            on_session=on_session,
        )

    def secure(self, hello=None) -> Deferred[Link]:
        """
        Find a listener on the LAN and complete the handshake with it, but
        start no session yet (see L{IPathClient.secure}).

        @param hello: makes the session hello (a resume); a new session's by default.
        """
        config = self._config
        if hello is None:
            params = config.session

            def hello():
                return new_hello(params)

        return with_timeout(
            self._reactor,
            _LanAttempt(self._reactor, config, hello).start(),
            config.timeout,
            f"connecting on the LAN ({config.name})",
            PeerAddress(config.name, None),
        )


def _why(failure: Failure) -> list[tuple[str, str]]:
    """A failed listener's race as C{(address, why)} rows."""
    if failure.check(LanConnectError):
        return list(failure.value.attempts)
    return [("the LAN", failure.getErrorMessage())]


class _LanAttempt:
    """
    One connection attempt on the LAN: search for the topic's listeners and
    race each one's addresses as soon as it is found, so a listener that
    fails (another peer's, when C{peer=} names one; an address that leads
    nowhere) leaves the others their chance.  The first handshake that
    completes wins, and the search and every other race end with it.
    """

    def __init__(self, reactor, config: DirectConfig, hello: Callable) -> None:
        self._reactor = reactor
        self._config = config
        self._hello = hello
        self._search: Deferred | None = None
        self._searching = False
        self._races: dict[int, Deferred] = {}
        self._found = 0
        self._failures: list[tuple[str, str]] = []
        self._done = False
        self.result: Deferred[Link] = Deferred(self._cancel)

    def start(self) -> Deferred[Link]:
        config = self._config
        self._searching = True
        search = config.access.discover(
            self._reactor, config.key, config.search, on_found=self._foundListener, interfaces=config.interfaces
        )
        self._search = search
        search.addCallbacks(self._searched, self._searchFailed)
        return self.result

    def _foundListener(self, candidates: list[IPv4Address]) -> None:
        if self._done:
            return
        index = self._found
        self._found += 1
        race = connect_first(
            self._reactor,
            candidates,
            self._reach,
            stagger=DEFAULT_STAGGER,
            timeout=self._config.timeout,
            discard=lambda link: link.discard(),
            describe=lambda address: f"{address.host}:{address.port}",
        )
        self._races[index] = race
        race.addCallbacks(self._won, self._lost, callbackArgs=(index,), errbackArgs=(index,))

    def _reach(self, address: IPv4Address) -> Deferred[Link]:
        config = self._config
        connecting = config.access.connect(self._reactor, address, timeout=CONNECT_TIMEOUT, name=config.name)
        # Cancelling the race cancels the handshake chained here too (its pipe is aborted).
        return connecting.addCallback(self._handshake)

    def _handshake(self, pipe: tcp.TCPPipe) -> Deferred[Link]:
        config = self._config
        return secure_link(
            pipe.attach,
            initiator=True,
            name=config.name,
            identity=config.identity,
            topic=config.topic,
            expected_peer=config.peer,
            hello=self._hello,
        )

    def _won(self, link: Link, index: int) -> None:
        self._races.pop(index, None)
        if self._done:
            link.discard()
            return
        self._finish()
        self.result.callback(link)

    def _lost(self, failure: Failure, index: int) -> None:
        self._races.pop(index, None)
        if self._done:
            return
        if failure.check(LinkRefused):
            # The peer itself answered our resume: no other address would answer differently.
            self._finish()
            self.result.errback(failure)
            return
        self._failures.extend(_why(failure))
        self._giveUpIfOver()

    def _searched(self, found: list[IPv4Address]) -> None:
        self._search = None
        self._searching = False
        self._giveUpIfOver()

    def _searchFailed(self, failure: Failure) -> None:
        self._search = None
        self._searching = False
        if self._done or failure.check(CancelledError):
            return
        # mDNS cannot run here (LanDiscoveryError): nothing to wait for.
        self._finish()
        self.result.errback(failure)

    def _giveUpIfOver(self) -> None:
        """Fail once the search has ended and every listener it found has failed."""
        if self._done or self._searching or self._races:
            return
        self._finish()
        if self._found == 0:
            error: Exception = LanNoPeerError(
                f"no peer with this key and topic answered on the LAN within {self._config.search:g} s: "
                "check that the listener runs on this network with the same key file and topic, and that "
                "multicast (mDNS, UDP port 5353) passes between the two hosts"
            )
        else:
            error = LanConnectError(self._failures, prefix="could not reach the peer found on the LAN")
        self.result.errback(Failure(error))

    def _finish(self) -> None:
        """Stop searching and cancel every race still running."""
        self._done = True
        search, self._search = self._search, None
        if search is not None:
            search.addErrback(lambda _: None)
            search.cancel()
        races = list(self._races.values())
        self._races.clear()
        for race in races:
            race.addErrback(lambda _: None)
            race.cancel()

    def _cancel(self, d: Deferred) -> None:
        # The deadline (with_timeout) or the caller (auto:'s race) gave up.
        if not self._done:
            self._finish()


@implementer(IStreamServerEndpoint)
class DirectServerEndpoint:
    """Listens for peers on the LAN."""

    def __init__(self, reactor, config: DirectConfig) -> None:
        self._reactor = reactor
        self._config = config

    def listen(self, protocolFactory) -> Deferred:
        return DirectListeningPort(self._reactor, self._config, protocolFactory).startListening()


# -- the listener ----------------------------------------------------------


class _PortInputs(Protocol):
    """Everything that can happen to a LAN listener (the inputs of its machine)."""

    def start_once(self) -> Deferred:
        "C{startListening()}: open; a failure is the caller's to handle."

    def start_retrying(self) -> Deferred:
        "C{startListening(keep_trying=True)}: open, and keep trying if it fails."

    def stop(self) -> Deferred[None]:
        "C{stopListening()}."

    def opened(self) -> None:
        "The TCP port accepts and the advertisement is announced."

    def open_failed(self, failure: Failure) -> None:
        "Opening the TCP port or announcing the advertisement failed."

    def retry_due(self) -> None:
        "The backoff timer ran out."

    def closed(self) -> None:
        "What the listener had open (port, advertisement) is closed, after a stop."


@dataclass(eq=False)
class _PortCore:
    """What a LAN listener's machine works on: its config, clock and handles."""

    reactor: Any
    config: DirectConfig
    sessions: attach.SessionTable
    log: Logger
    host: PeerAddress
    initial_delay: float
    max_delay: float
    delay: float = 0.0
    max_handshakes: int = MAX_HANDSHAKES
    inputs: Any = field(default=None, repr=False)
    port: Any = field(default=None, repr=False)
    opening: Deferred | None = field(default=None, repr=False)
    tcp: IListeningPort | None = field(default=None, repr=False)
    advert: Any = field(default=None, repr=False)
    start_timer: Any = field(default=None, repr=False)
    retry_call: Any = field(default=None, repr=False)
    handshakes: set[Deferred] = field(default_factory=set, repr=False)
    dropped: int = 0
    accepting: bool = False
    started: list[Deferred] = field(default_factory=list, repr=False)
    stopped: list[Deferred] = field(default_factory=list, repr=False)
    outcomes: list[tuple[Deferred, Any]] = field(default_factory=list, repr=False)
    depth: int = 0

    def enter(self, input: Callable[..., Any], *args: Any) -> Any:
        """
        Feed the machine one input, then fire the Deferreds its transitions
        settled, outside the machine: they run the caller's code, which may
        call C{startListening} or C{stopListening} again.
        """
        self.depth += 1
        try:
            return input(*args)
        finally:
            self.depth -= 1
            if self.depth == 0:
                while self.outcomes:
                    d, outcome = self.outcomes.pop(0)
                    if isinstance(outcome, Failure):
                        d.errback(outcome)
                    else:
                        d.callback(outcome)

    @property
    def connected(self) -> bool:
        """Whether the listener is reachable: its port accepts and its advertisement is out."""
        return self.advert is not None and self.advert.ready.called and self.tcp is not None

    @property
    def address(self) -> IPv4Address | None:
        return self.tcp.getHost() if self.tcp is not None else None

    @property
    def advertised(self) -> tuple[str, ...]:
        """The addresses the advertisement gives (public: anyone on the LAN sees them)."""
        advert = getattr(self.advert, "advert", None)
        return tuple(advert.addresses) if advert is not None else ()

    def open(self) -> None:
        """Open the TCP port, then advertise it; the machine hears C{opened} or C{open_failed}."""
        config = self.config
        self.accepting = True
        d = config.access.listen(
            self.reactor, self.accept, port=config.port, interface=config.lan or "", name=config.name
        )
        self.opening = d
        d.addCallbacks(self.listening, self.failed)

    def listening(self, port: IListeningPort) -> None:
        self.opening = None
        if not self.accepting:
            port.stopListening()  # stopped meanwhile
            return
        self.tcp = port
        config = self.config
        try:
            advert = config.access.advertise(
                self.reactor,
                port.getHost().port,
                config.key,
                addresses=config.interfaces,
                interfaces=config.interfaces,
            )
        except Exception:
            self.failed(Failure())
            return
        self.advert = advert
        # zeroconf's thread answers in milliseconds, or not at all: bound it.
        self.start_timer = self.reactor.callLater(config.timeout, self.timed_out, advert)
        advert.ready.addCallbacks(self.announced, self.not_announced, callbackArgs=(advert,), errbackArgs=(advert,))

    def announced(self, _, advert) -> None:
        if advert is self.advert:
            self.cancel_start_timer()
            self.enter(self.inputs.opened)

    def not_announced(self, failure: Failure, advert) -> None:
        if advert is self.advert:  # else: stopped or replaced meanwhile, already handled
            self.cancel_start_timer()
            self.failed(failure)

    def timed_out(self, advert) -> None:
        self.start_timer = None
        if advert is self.advert:
            self.failed(
                Failure(ConnectionTimeoutError(f"advertising on the LAN timed out after {self.config.timeout:g} s"))
            )

    def cancel_start_timer(self) -> None:
        timer, self.start_timer = self.start_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def failed(self, failure: Failure) -> None:
        self.opening = None
        self.enter(self.inputs.open_failed, failure)

    def close(self) -> Deferred:
        """Withdraw the advertisement and close the port (whichever are open); fires when both are."""
        self.accepting = False
        self.cancel_start_timer()
        opening, self.opening = self.opening, None
        if opening is not None:
            opening.cancel()
        advert, self.advert = self.advert, None
        port, self.tcp = self.tcp, None
        closing = []
        if advert is not None:
            closing.append(advert.stop())
        if port is not None:
            closing.append(maybeDeferred(port.stopListening))
        return DeferredList(closing, consumeErrors=True)

    def wait_for_start(self) -> Deferred:
        self.started.append(Deferred())
        return self.started[-1]

    def report_start(self, outcome) -> None:
        waiting, self.started = self.started, []
        self.outcomes.extend((d, outcome) for d in waiting)

    def wait_for_stop(self) -> Deferred[None]:
        self.stopped.append(Deferred())
        return self.stopped[-1]

    def finish_stopping(self) -> None:
        waiting, self.stopped = self.stopped, []
        self.outcomes.extend((d, None) for d in waiting)

    def retry_later(self, failure: Failure) -> None:
        self.log.info(
            "listening on the LAN failed ({why}); next try in {delay:.1f} s",
            why=failure.getErrorMessage(),
            delay=self.delay,
        )
        delay = self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.delay * 2, self.max_delay)
        self.retry_call = self.reactor.callLater(delay, self.enter, self.inputs.retry_due)

    def cancel_retry(self) -> None:
        retry, self.retry_call = self.retry_call, None
        if retry is not None and retry.active():
            retry.cancel()

    # -- incoming connections -------------------------------------------------

    def accept(self, pipe: tcp.TCPPipe) -> None:
        """A TCP connection came in: run the handshake as responder, within the bounds."""
        if not self.accepting:
            pipe.abort()
            return
        if len(self.handshakes) >= self.max_handshakes:
            # Whoever fills every place (a scan, a flood) learns nothing and
            # costs nothing more; one line per burst says it happened.
            if self.dropped == 0:
                self.log.info(
                    "{max} LAN connections are in their handshake already; dropping new ones until some finish",
                    max=self.max_handshakes,
                )
            self.dropped += 1
            pipe.abort()
            return
        self.dropped = 0
        config = self.config
        d = secure_link(
            pipe.attach,
            initiator=False,
            name=config.name,
            identity=config.identity,
            topic=config.topic,
            resolver=self.sessions.resolve,
        )
        d = with_timeout(self.reactor, d, min(config.timeout, HANDSHAKE_TIMEOUT), "a LAN peer's handshake", self.host)
        self.handshakes.add(d)
        d.addBoth(self.handshaken, d)

    def handshaken(self, result, d: Deferred) -> None:
        self.handshakes.discard(d)
        if not isinstance(result, Failure):
            try:
                self.sessions.accept(result)
            except Exception:
                self.log.failure("a LAN peer's connection could not be started")
            return None
        if result.check(CancelledError, ConnectingCancelledError):
            return None  # abandoned by stopListening: not news
        if result.check(LinkRefused):
            self.log.info("LAN: {why}", why=result.getErrorMessage())
        elif result.check(NotChosenError, PeerGoneError):
            # A connector racing several paths (auto:) drops those it does not choose.
            self.log.debug("LAN: a connecting peer chose another path ({why})", why=result.getErrorMessage())
        else:
            # Anyone on the LAN can open a connection: info, not a warning.
            self.log.info("an incoming LAN connection failed: {why}", why=result.getErrorMessage())
        return None

    def abandon_handshakes(self) -> None:
        for d in list(self.handshakes):
            d.cancel()


_ports = TypeMachineBuilder(_PortInputs, _PortCore)
_STOPPED = _ports.state("stopped")
_OPENING_ONCE = _ports.state("opening_once")
_OPENING = _ports.state("opening")
_LISTENING = _ports.state("listening")
_WAITING = _ports.state("waiting")
_STOPPING = _ports.state("stopping")
_transitions = Transitions(_PortInputs)
_on = _transitions.upon


@_on(_STOPPED, _PortInputs.start_once).to(_OPENING_ONCE)
@_on(_STOPPED, _PortInputs.start_retrying).to(_OPENING)
def _start(inputs: _PortInputs, core: _PortCore) -> Deferred:
    started = core.wait_for_start()
    core.open()
    return started


@_on(_OPENING_ONCE, _PortInputs.start_once).loop()
@_on(_OPENING_ONCE, _PortInputs.start_retrying).loop()
@_on(_OPENING, _PortInputs.start_once).loop()
@_on(_OPENING, _PortInputs.start_retrying).loop()
@_on(_WAITING, _PortInputs.start_once).loop()
@_on(_WAITING, _PortInputs.start_retrying).loop()
def _already_starting(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return core.wait_for_start()


@_on(_LISTENING, _PortInputs.start_once).loop()
@_on(_LISTENING, _PortInputs.start_retrying).loop()
def _already_listening(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return succeed(core.port)


@_on(_STOPPING, _PortInputs.start_once).loop()
@_on(_STOPPING, _PortInputs.start_retrying).loop()
def _start_while_stopping(inputs: _PortInputs, core: _PortCore) -> Deferred:
    return fail(PluresyncError(f"the listener on {core.config.name} is stopping; start it again once stopped"))


@_on(_OPENING_ONCE, _PortInputs.opened).to(_LISTENING)
@_on(_OPENING, _PortInputs.opened).to(_LISTENING)
def _opened(inputs: _PortInputs, core: _PortCore) -> None:
    core.delay = core.initial_delay
    core.log.info(
        "listening on the LAN at {addresses} TCP port {port} as peer {peer}",
        addresses=", ".join(core.advertised),
        port=core.address.port,
        peer=core.config.identity.peer_id[:12],
    )
    core.report_start(core.port)


@_on(_OPENING_ONCE, _PortInputs.open_failed).to(_STOPPED)
def _first_open_failed(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.close()
    core.abandon_handshakes()
    core.report_start(failure)


@_on(_OPENING, _PortInputs.open_failed).to(_WAITING)
def _open_failed(inputs: _PortInputs, core: _PortCore, failure: Failure) -> None:
    core.close()
    core.report_start(failure)
    core.retry_later(failure)


@_on(_WAITING, _PortInputs.retry_due).to(_OPENING)
def _retry(inputs: _PortInputs, core: _PortCore) -> None:
    core.retry_call = None
    core.open()


@_on(_OPENING_ONCE, _PortInputs.stop).to(_STOPPING)
@_on(_OPENING, _PortInputs.stop).to(_STOPPING)
@_on(_LISTENING, _PortInputs.stop).to(_STOPPING)
def _stop(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    # Established connections are not affected; those still in their
    # handshake are abandoned.
    stopped = core.wait_for_stop()
    core.report_start(Failure(ConnectingCancelledError(core.host)))
    core.abandon_handshakes()
    core.close().addBoth(lambda _: core.enter(core.inputs.closed))
    return stopped


@_on(_WAITING, _PortInputs.stop).to(_STOPPED)
def _stop_waiting(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    core.cancel_retry()
    core.abandon_handshakes()
    core.report_start(Failure(ConnectingCancelledError(core.host)))
    return succeed(None)


@_on(_STOPPED, _PortInputs.stop).loop()
def _stopped_already(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    return succeed(None)


@_on(_STOPPING, _PortInputs.stop).loop()
def _stop_again(inputs: _PortInputs, core: _PortCore) -> Deferred[None]:
    return core.wait_for_stop()


@_on(_STOPPING, _PortInputs.closed).to(_STOPPED)
def _closed(inputs: _PortInputs, core: _PortCore) -> None:
    core.finish_stopping()


# Late inputs change nothing: an advertisement that fails or is announced
# after a stop, a timer that lost a race with one.
_transitions.ignore_the_rest(
    (_STOPPED, _OPENING_ONCE, _OPENING, _LISTENING, _WAITING, _STOPPING),
    ("opened", "open_failed", "retry_due", "closed"),
)

_PortMachine = _ports.build()


@implementer(IPathListener)
class DirectListeningPort:
    """
    A listener on the LAN: a TCP port on the LAN interfaces (or the one
    C{lan=} names), advertised over mDNS while it listens.

    Each connection runs the handshake as responder; its link goes to the
    session table (a new session builds the user's protocol, a resume joins
    its session).  At most L{MAX_HANDSHAKES} connections may be in their
    handshake at once, each for at most L{HANDSHAKE_TIMEOUT} seconds (or
    C{timeout=}, if shorter).

    Its life is a state machine (Automat)::

        stopped --startListening()-----------> opening_once --failed--> stopped
           |                                        | port open, advert announced
           +--startListening(keep_trying=True)--> opening --announced--> listening
                                                  |  ^
                                           failed v  | retry due (1 s, 2 s, ... 60 s)
                                                 waiting

        opening*, listening --stopListening()--> stopping --advert and port closed--> stopped
        waiting --stopListening()--> stopped

    @param sessions: the sessions a resuming peer may come back to (shared
        by every path of an C{auto:} listener); its own if not given.
    """

    _log = Logger()
    initial_delay = 1.0
    max_delay = 60.0

    def __init__(
        self,
        reactor,
        config: DirectConfig,
        factory,
        *,
        sessions: attach.SessionTable | None = None,
        log: Logger | None = None,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self._config = config
        if sessions is None:
            sessions = attach.SessionTable(reactor, factory, config.session, config.identity.peer_id)
        core = _PortCore(
            reactor,
            config,
            sessions,
            log if log is not None else self._log,
            self.getHost(),
            self.initial_delay,
            self.max_delay,
            delay=self.initial_delay,
            max_handshakes=max_handshakes,
        )
        self._core = core
        self._machine = _PortMachine(core)
        core.inputs = self._machine
        core.port = self

    @property
    def connected(self) -> bool:
        """Whether the listener is reachable right now: listening and advertised."""
        return self._core.connected

    @property
    def address(self) -> IPv4Address | None:
        """The TCP port's address while it is open (what is advertised), else C{None}."""
        return self._core.address

    @property
    def handshaking(self) -> int:
        """How many connections are in their handshake now."""
        return len(self._core.handshakes)

    def getHost(self) -> PeerAddress:
        return PeerAddress(self._config.name, self._config.identity.peer_id)

    def startListening(self, keep_trying: bool = False) -> Deferred:
        """
        Open the TCP port and advertise it; fires with this port once the
        advertisement is announced.

        @param keep_trying: if that fails, report it and go on trying with
            backoff in the background (C{auto:} listeners use this: a laptop
            may join a network later).
        """
        start = self._machine.start_retrying if keep_trying else self._machine.start_once
        return self._core.enter(start)

    def stopListening(self) -> Deferred:
        """
        Withdraw the advertisement, close the port and abandon connections
        still in their handshake; established connections stay open.
        """
        return self._core.enter(self._machine.stop)
