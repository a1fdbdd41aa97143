"""
One relay socket's life as pure rules, shared by every relay front.

A relay socket goes through::

    OPENING --opened--> HELLO --listen--> LISTENING
                          |----connect/accept--> CONNECTING --paired--> PAIRED
                          |
     any of them --error / the client closed / going away / partner ended--> CLOSED

C{CLOSED} is absorbing: late inputs change nothing.  This module decides
everything about that life that must be the same on the Twisted relay
(L{pluresync.relay.server}) and the Vercel function (L{pluresync.relay.asgi}):
which message is allowed in which phase and what answers a wrong one, what
ends a socket with which close code and what its partner is told, the hello
timer, and how a socket is named in the logs.  It moves no bytes: once
paired, data frames go from one end of the pair to the other without passing
here, so the per-frame path stays a front's own fast path.

A front gives each socket a L{SessionFront} (its I/O and its registry
requests) and a clock (C{call_later}: Twisted's C{reactor.callLater} and
asyncio's C{loop.call_later} both fit), builds a L{RelaySession}, and feeds it
what happens on the socket.  The session is also the socket's channel in the
L{pluresync.relay.core.pairing.Registry} (C{incoming}, C{failed}).

Pure Python: no Twisted, no Autobahn, no asyncio.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder

from pluresync.automata import Transitions

from .pairing import CallLater, Cancellable
from .wire import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    Accept,
    Connect,
    Decline,
    ErrorCode,
    Listen,
    ProtocolError,
    encode_error,
    encode_incoming,
    encode_paired,
    parse_control,
    short_id,
)

#: The close reason that goes with each close code the relay forwards to a partner.
CLOSE_REASONS = {
    CLOSE_NORMAL: "peer closed",
    CLOSE_GOING_AWAY: "going away",
    ErrorCode.PEER_GONE.close_code: ErrorCode.PEER_GONE.value,
}


class Phase(enum.Enum):
    """Where one relay socket is (the states of its machine)."""

    OPENING = "opening"
    """The WebSocket opening handshake is under way."""
    HELLO = "hello"
    """Open; waiting for the client's one control message."""
    LISTENING = "listening"
    """A listener's control channel."""
    CONNECTING = "connecting"
    """A connector waiting for a listener or its accept, or an accept being resolved."""
    PAIRED = "paired"
    """One end of a pair: data frames are forwarded."""
    CLOSED = "closed"
    """Closed or closing (absorbing)."""


class PartnerEnd(Protocol):
    """What a session needs from the other end of its pair (a socket, a cluster link, a Redis pipe)."""

    def end(self, code: int, reason: str) -> None:
        """The pair is over: close that end with C{code}.  Idempotent."""


class SessionFront(Protocol):
    """
    What a session asks of its front: the socket's I/O, and what to do with
    each request (the registry and, when clustered, the other instances).
    """

    def send_control(self, message: bytes) -> None:
        """Send one text message to the client (nothing if the socket is no longer open)."""

    def close(self, code: int, reason: str) -> None:
        """Close the socket with C{code}; idempotent."""

    def listen(self, session: RelaySession, message: Listen) -> None:
        """
        Register a listener (with C{session} as its registry channel), then
        send C{ready}; or call C{session.failed(error)}.
        """

    def connect(self, session: RelaySession, message: Connect) -> None:
        """Register a connector (C{session} is its channel), or call C{session.failed(error)}."""

    def accept(self, session: RelaySession, message: Accept) -> None:
        """Pair the session's connector with this socket (C{session.paired(...)}), or C{session.failed(error)}."""

    def decline(self, session: RelaySession, message: Decline) -> None:
        """
        The listener of this socket could not accept the session it was
        offered: fail that session's connector at once with the listener's
        code and reason (nothing if it is not this listener's offer any more).
        """

    def unpaired(self, how: str) -> None:
        """The pair this socket was in ended (C{how}: for the log); release what couples the two ends."""

    def forget(self) -> None:
        """The socket is done: unregister its listener or connector.  Idempotent."""

    def counted(self, code: ErrorCode) -> None:
        """An error the relay reports (for metrics)."""


class _Inputs(Protocol):
    """Everything that can happen to one relay socket."""

    def opened(self, tenant: str | None) -> None:
        "The WebSocket is open (C{tenant}: the authenticated tenant's name, for logs)."

    def control(self, payload: bytes, binary: bool) -> None:
        "A message the front does not forward: the hello, or one that breaks the rules."

    def hello_expired(self) -> None:
        "The hello timer ran out."

    def listen(self, message: Listen) -> None:
        "A valid C{listen}."

    def connect(self, message: Connect) -> None:
        "A valid C{connect}."

    def accept(self, message: Accept) -> None:
        "A valid C{accept}."

    def incoming(self, session: str, peer: str | None) -> None:
        "A connector waits for this listener in C{session}."

    def failed(self, error: ProtocolError) -> None:
        "The relay refuses this socket (bad input, a limit, the registry gave up)."

    def paired(self, partner: PartnerEnd, peer: str | None, session: str, label: str | None) -> None:
        "This socket is one end of a pair."

    def partner_ended(self, code: int, reason: str) -> None:
        "The other end of the pair is gone."

    def client_closed(self, clean: bool) -> None:
        "The client's socket ended (C{clean}: a normal close the client started)."

    def go_away(self) -> None:
        "The relay is shutting down (or the front's time is up)."

    def cap_reached(self, what: str, retry: float) -> None:
        "A session cap (C{bytes}, C{duration}) is reached."


@dataclass(eq=False, slots=True)
class _Core:
    """The data one socket's machine works on."""

    front: SessionFront
    call_later: CallLater
    hello_timeout: float
    announced_limits: dict[str, Any] | None
    default_retry: float | None
    log: Callable[[str], None]
    label: str = "-"
    phase: Phase = Phase.OPENING
    tenant: str | None = None
    partner: PartnerEnd | None = None
    hello_call: Cancellable | None = field(default=None, repr=False)
    inputs: Any = field(default=None, repr=False)

    @property
    def tenant_tag(self) -> str:
        return f" tenant={self.tenant}" if self.tenant else ""

    def cancel_hello(self) -> None:
        if self.hello_call is not None:
            self.hello_call.cancel()
            self.hello_call = None

    def report(self, error: ProtocolError) -> None:
        """Count and log C{error}; before pairing the client gets it as a message."""
        self.cancel_hello()
        self.front.counted(error.code)
        self.log(f"error {error.code.value} {self.label}: {error.message}")
        if self.partner is None:
            retry = error.retry
            if retry is None and error.code is ErrorCode.RATE_LIMITED:
                retry = self.default_retry
            self.front.send_control(encode_error(error.code, error.message, retry))

    def end_pair(self, how: str, partner_code: int, partner_reason: str) -> None:
        partner, self.partner = self.partner, None
        self.front.unpaired(how)
        if partner is not None:
            partner.end(partner_code, partner_reason)

    def finish(self, code: int, reason: str) -> None:
        """Close this socket (the last step of every way into CLOSED)."""
        self.phase = Phase.CLOSED
        self.cancel_hello()
        self.front.close(code, reason)
        self.front.forget()


_builder = TypeMachineBuilder(_Inputs, _Core)
_OPENING = _builder.state("opening")
_HELLO = _builder.state("hello")
_LISTENING = _builder.state("listening")
_CONNECTING = _builder.state("connecting")
_PAIRED = _builder.state("paired")
_CLOSED = _builder.state("closed")
_ALL = (_OPENING, _HELLO, _LISTENING, _CONNECTING, _PAIRED, _CLOSED)
_transitions = Transitions(_Inputs)
_on = _transitions.upon


# -- opening and the control phase -------------------------------------------


@_on(_OPENING, _Inputs.opened).to(_HELLO)
def _opened(inputs: _Inputs, core: _Core, tenant: str | None) -> None:
    core.phase = Phase.HELLO
    core.tenant = tenant
    if core.hello_timeout > 0:
        core.hello_call = core.call_later(core.hello_timeout, inputs.hello_expired)


@_on(_HELLO, _Inputs.control).loop()
def _hello(inputs: _Inputs, core: _Core, payload: bytes, binary: bool) -> None:
    core.cancel_hello()
    if binary:
        inputs.failed(ProtocolError(ErrorCode.BAD_REQUEST, "binary message before pairing"))
        return
    try:
        message = parse_control(payload)
    except ProtocolError as error:
        inputs.failed(error)
        return
    if isinstance(message, Listen):
        inputs.listen(message)
    elif isinstance(message, Connect):
        inputs.connect(message)
    elif isinstance(message, Decline):
        inputs.failed(ProtocolError(ErrorCode.BAD_REQUEST, "decline is for a listener's control socket"))
    else:
        inputs.accept(message)


@_on(_HELLO, _Inputs.hello_expired).loop()
def _hello_expired(inputs: _Inputs, core: _Core) -> None:
    core.hello_call = None
    inputs.failed(ProtocolError(ErrorCode.TIMEOUT, f"no control message within {core.hello_timeout:g} s"))


@_on(_HELLO, _Inputs.listen).to(_LISTENING)
def _listen(inputs: _Inputs, core: _Core, message: Listen) -> None:
    core.phase = Phase.LISTENING
    core.label = f"rdv={short_id(message.rdv)} peer={short_id(message.peer)}{core.tenant_tag}"
    core.front.listen(core.inputs, message)


@_on(_HELLO, _Inputs.connect).to(_CONNECTING)
def _connect(inputs: _Inputs, core: _Core, message: Connect) -> None:
    core.phase = Phase.CONNECTING
    core.label = f"rdv={short_id(message.rdv)} from={short_id(message.from_)}{core.tenant_tag}"
    core.log(f"connect {core.label} want={short_id(message.peer)} wait={message.wait}")
    core.front.connect(core.inputs, message)


@_on(_HELLO, _Inputs.accept).to(_CONNECTING)
def _accept(inputs: _Inputs, core: _Core, message: Accept) -> None:
    core.phase = Phase.CONNECTING
    core.label = f"session={short_id(message.session)}{core.tenant_tag}"
    core.front.accept(core.inputs, message)


def _extra_message(inputs: _Inputs, core: _Core, payload: bytes, binary: bool) -> None:
    reason = "binary message before pairing" if binary else "only one control message per socket"
    inputs.failed(ProtocolError(ErrorCode.BAD_REQUEST, reason))


@_on(_LISTENING, _Inputs.control).loop()
def _listener_message(inputs: _Inputs, core: _Core, payload: bytes, binary: bool) -> None:
    """A listener sends nothing more, except a C{decline} of a session it was offered."""
    if not binary:
        try:
            message = parse_control(payload)
        except ProtocolError as error:
            # A malformed decline says what is wrong with it; anything else
            # is one control message too many.
            if b'"decline"' in payload:
                inputs.failed(error)
            else:
                _extra_message(inputs, core, payload, binary)
            return
        if isinstance(message, Decline):
            core.front.decline(core.inputs, message)
            return
    _extra_message(inputs, core, payload, binary)


_on(_CONNECTING, _Inputs.control).loop()(_extra_message)


@_on(_LISTENING, _Inputs.incoming).loop()
def _incoming(inputs: _Inputs, core: _Core, session: str, peer: str | None) -> None:
    core.front.send_control(encode_incoming(session, peer))
    core.log(f"incoming {core.label} session={short_id(session)} from={short_id(peer)}")


@_on(_CONNECTING, _Inputs.paired).to(_PAIRED)
def _paired(
    inputs: _Inputs, core: _Core, partner: PartnerEnd, peer: str | None, session: str, label: str | None
) -> None:
    core.phase = Phase.PAIRED
    core.partner = partner
    core.label = f"{label or core.label} session={short_id(session)}"
    core.front.send_control(encode_paired(peer, core.announced_limits))


@_on(_PAIRED, _Inputs.control).loop()
def _after_pairing(inputs: _Inputs, core: _Core, payload: bytes, binary: bool) -> None:
    # Binary frames after pairing are forwarded by the front and never come here.
    inputs.failed(ProtocolError(ErrorCode.BAD_REQUEST, "text message after pairing"))


# -- endings -------------------------------------------------------------------


def _fail(inputs: _Inputs, core: _Core, error: ProtocolError) -> None:
    core.report(error)
    if core.partner is not None:
        core.end_pair(error.code.value, ErrorCode.PEER_GONE.close_code, ErrorCode.PEER_GONE.value)
    core.finish(error.code.close_code, error.code.value)


def _closed_by_client(inputs: _Inputs, core: _Core, clean: bool) -> None:
    core.phase = Phase.CLOSED
    core.cancel_hello()
    if core.partner is not None:
        if clean:
            core.end_pair(f"closed {CLOSE_NORMAL}", CLOSE_NORMAL, CLOSE_REASONS[CLOSE_NORMAL])
        else:
            core.front.counted(ErrorCode.PEER_GONE)
            core.end_pair("peer-gone", ErrorCode.PEER_GONE.close_code, ErrorCode.PEER_GONE.value)
    core.front.forget()


def _going_away(inputs: _Inputs, core: _Core) -> None:
    if core.partner is not None:
        core.end_pair("shutdown", CLOSE_GOING_AWAY, CLOSE_REASONS[CLOSE_GOING_AWAY])
    core.finish(CLOSE_GOING_AWAY, CLOSE_REASONS[CLOSE_GOING_AWAY])


for _state in (_OPENING, _HELLO, _LISTENING, _CONNECTING, _PAIRED):
    _on(_state, _Inputs.failed).to(_CLOSED)(_fail)
    _on(_state, _Inputs.client_closed).to(_CLOSED)(_closed_by_client)
    _on(_state, _Inputs.go_away).to(_CLOSED)(_going_away)


@_on(_PAIRED, _Inputs.partner_ended).to(_CLOSED)
def _partner_ended(inputs: _Inputs, core: _Core, code: int, reason: str) -> None:
    core.partner = None
    core.front.unpaired(f"closed {code}" if code == CLOSE_NORMAL else reason)
    core.finish(code, reason)


@_on(_PAIRED, _Inputs.cap_reached).to(_CLOSED)
def _cap_reached(inputs: _Inputs, core: _Core, what: str, retry: float) -> None:
    core.front.counted(ErrorCode.RATE_LIMITED)
    core.log(f"rate-limited {core.label}: session {what} cap reached")
    reason = f"{ErrorCode.RATE_LIMITED.value} retry={retry:g}"
    core.end_pair(f"rate-limited {what}", ErrorCode.RATE_LIMITED.close_code, reason)
    core.finish(ErrorCode.RATE_LIMITED.close_code, reason)


# -- everything else changes nothing -------------------------------------------
# (late timers, offers for a listener that is going, an end reported twice)


_transitions.ignore_the_rest(_ALL, [name for name in _Inputs.__dict__ if not name.startswith("_")])

_Machine = _builder.build()


class RelaySession:
    """
    One relay socket's rules.  Built by a front for each socket; its
    C{incoming} and C{failed} make it the socket's registry channel.

    @param front: the socket's L{SessionFront}.
    @param call_later: the clock: C{call_later(seconds, f) -> handle with cancel()}.
    @param hello_timeout: seconds an open socket may wait before its control
        message (0: no limit).
    @param announced_limits: the C{limits} object of C{ready} and C{paired}.
    @param default_retry: the retry hint for C{rate-limited} errors without one.
    @param log: where the socket's log lines go (already formatted; never a
        full id or a secret).
    """

    __slots__ = ("_core", "_inputs")

    def __init__(
        self,
        front: SessionFront,
        call_later: CallLater,
        *,
        hello_timeout: float = 0.0,
        announced_limits: dict[str, Any] | None = None,
        default_retry: float | None = None,
        log: Callable[[str], None] = lambda text: None,
    ) -> None:
        core = _Core(front, call_later, hello_timeout, announced_limits, default_retry, log)
        self._core = core
        self._inputs = _Machine(core)
        core.inputs = self

    # -- what the front reports ------------------------------------------------

    def opened(self, tenant: str | None = None) -> None:
        """The WebSocket is open: the hello timer starts."""
        self._inputs.opened(tenant)

    def control(self, payload: bytes, binary: bool) -> None:
        """A message the front does not forward (the hello, or one out of place)."""
        self._inputs.control(payload, binary)

    def paired(self, partner: PartnerEnd, peer: str | None, session: str, label: str | None = None) -> None:
        """
        This socket is now one end of a pair with C{partner}; the client is
        told the other side's declared peer id C{peer}.  C{label}: the name
        the pair is logged under (the connector's), if not this socket's.
        """
        self._inputs.paired(partner, peer, session, label)

    def partner_ended(self, code: int, reason: str) -> None:
        """The other end of the pair is gone: close with C{code}."""
        self._inputs.partner_ended(code, reason)

    def client_closed(self, clean: bool) -> None:
        """
        The client's socket ended; C{clean} when the client closed it with
        1000 (its partner then gets 1000, otherwise C{peer-gone}).
        """
        self._inputs.client_closed(clean)

    def go_away(self) -> None:
        """Close with 1001 C{going away} (a partner gets 1001 too)."""
        self._inputs.go_away()

    def cap_reached(self, what: str, retry: float) -> None:
        """A session cap is reached: both ends close with C{rate-limited}."""
        self._inputs.cap_reached(what, retry)

    # -- the registry channel ----------------------------------------------------

    def incoming(self, session: str, peer: str | None) -> None:
        """A connector (declaring C{peer}) waits for this listener in C{session}."""
        self._inputs.incoming(session, peer)

    def failed(self, error: ProtocolError) -> None:
        """Refuse this socket with C{error} (its code closes the socket)."""
        self._inputs.failed(error)

    # -- what the front may ask ----------------------------------------------------

    @property
    def label(self) -> str:
        """How the logs name this socket (short id prefixes, the tenant's name)."""
        return self._core.label

    @property
    def front(self) -> SessionFront:
        """The front this session belongs to (a registry entry's channel leads back to its socket)."""
        return self._core.front

    @property
    def phase(self) -> Phase:
        """Where the socket is."""
        return self._core.phase
