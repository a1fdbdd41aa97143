"""
The durable session: what a pluresync connection is, whatever carries it.

A L{Session} lives from the first handshake to its authenticated close; the
links under it (L{pluresync.secure.link.Link}, one per pipe) come and go.
It owns what must survive a change of link:

 - I{numbering and acknowledgement}: numbered records (stream data, half
   closes, the close) are kept in a retransmit queue until the peer's
   cumulative ACK covers them, and resent on the next link when the one they
   went out on is lost;
 - I{credit}: the peer grants how far we may send (its C{max_offset}, what
   its protocol consumed plus its window), so the retransmit queue, the
   peer's reorder buffer and its undelivered records are each bounded by a
   window, across any number of swaps; a paused protocol stops credit, never
   a link's reading, so acks and pings keep flowing;
 - I{liveness}: its own pings and silence timers per link (a blackholed
   relay is found in C{stall} seconds), never "is the user reading";
 - I{moves}: the initiator opens links (a lost link is replaced through the
   paths it was given, a link a relay will end at its session cap is
   replaced before it ends) and the responder follows the link it was last
   told to use; a planned move resends nothing, a forced one resends what
   was not acknowledged;
 - I{the honest close}: C{connectionLost} is clean only after the peer has
   acknowledged everything, its close included.

The user's transport is a L{pluresync.session.stream.Stream}; the session
routes numbered records to it by stream id (one stream, id 0, today).

Its life is an Automat machine (L{pluresync.session.lifecycle}): attached (a
link carries records), detached (no link: a deadline of C{resume} seconds
runs, the initiator reconnects), flushing (a clean end waits for its pipes),
ended; L{Phase} mirrors it for the data path.  Closing is orthogonal: a
session may be closing while attached or detached.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pluresync.errors import PeerGoneError, RecordError, TruncatedStreamError
from pluresync.keys import format_peer_id
from pluresync.secure.frames import RecordType
from pluresync.secure.link import ILinkOwner, Link, LinkRefused
from pluresync.session import wire
from pluresync.session.lifecycle import LifeMachine
from pluresync.session.params import SessionParams
from pluresync.session.wire import Hello, Intent, ReadyAnswer, Status

_DATA = int(RecordType.DATA)
_ACK = RecordType.ACK
_PING = RecordType.PING
_PONG = RecordType.PONG
_START = RecordType.START
_RESYNC = RecordType.RESYNC
_DETACH = RecordType.DETACH
_ABORT = RecordType.ABORT
_CONTROL = RecordType.CONTROL
_WINDOW = RecordType.WINDOW
_NUMBERED = wire.NUMBERED
_SESSION_ID_PERSON = b"pluresync-sid"
#: a receiver acknowledges at least every this many records (and every quarter window)
_ACK_EVERY = 32
#: Reconnect backoff (initiator): first delay, cap, and the jitter that keeps
#: every session of a dead relay from hitting the next one at once.
_RETRY_FIRST = 0.05
_RETRY_MAX = 2.0
_RETRY_JITTER = 0.25
#: How long a clean end waits for its pipes to send what was written.
_FLUSH_TIMEOUT = 10.0
#: The shortest time one reconnect attempt gets before another is made.
_ATTEMPT_MIN = 5.0
#: How often a resume may be refused as "unknown session" before we believe it.
_UNKNOWN_TRIES = 3


_ABORT_WORDS = {
    bytes((wire.AbortReason.ABORTED,)): "the peer aborted the connection",
    bytes((wire.AbortReason.PROTOCOL,)): "the peer ended the connection: this side broke the protocol",
    bytes((wire.AbortReason.REFUSED,)): "the peer's application refused the connection",
}


class UnconfirmedCloseError(TruncatedStreamError):
    """The connection ended before the peer confirmed it had everything we sent."""


class SessionExpiredError(TruncatedStreamError):
    """No link could be found for the session within its resume limit."""


def session_id(handshake_hash: bytes) -> bytes:
    """
    A session's identity: derived from its first handshake's transcript, so
    both sides know it without sending it, and only a peer that took part
    in that handshake can name it (inside a later handshake's encrypted frame 3).
    """
    return hashlib.blake2b(handshake_hash, digest_size=wire.SESSION_ID_SIZE, person=_SESSION_ID_PERSON).digest()


def new_hello(params: SessionParams) -> Hello:
    return Hello(Intent.NEW, bytes(wire.SESSION_ID_SIZE), 0, params.window, params.caps)


class Phase(Enum):
    ATTACHED = auto()  #: a link carries the session
    DETACHED = auto()  #: no link; the resume deadline runs
    ENDED = auto()  #: connectionLost was delivered


@dataclass(eq=False)
class _LinkState:
    """What the session knows about one of its links."""

    link: Link
    #: number of the next numbered record expected on it (None before the peer's START)
    recv_seq: int | None = None
    #: the START we sent on it (None: not yet)
    sent_start: int | None = None
    #: the START the peer sent on it
    peer_start: int | None = None
    last_heard: float = 0.0
    last_data: float = 0.0
    ping_id: int | None = None
    retiring: bool = False
    watch: object = field(default=None, repr=False)
    rotate_call: object = field(default=None, repr=False)


@dataclass(eq=False, slots=True)
class _Outgoing:
    """
    One numbered record until the peer acknowledges it.  It keeps its head
    and the user's payload apart (the payload is the user's own immutable
    bytes, or a view of them): the plaintext exists only while it is sealed,
    so a full resend queue holds no second copy of what was written, and
    memory freed after each seal is reused while still in cache.
    """

    seq: int
    head: bytes
    payload: bytes | memoryview
    size: int  #: plaintext length: what counts against the credit and the window
    end: int  #: stream offset after it (credit accounting)

    def plaintext(self) -> bytes:
        return self.head + self.payload if self.payload else self.head


class IControlReceiver(Interface):
    """Whoever manages a session's paths beyond its own reconnects (the direct path's upgrade)."""

    def controlReceived(kind, body):
        """A CONTROL record from the peer: its kind byte and the rest."""


@implementer(ILinkOwner, IPushProducer)
class Session:
    """
    One durable end-to-end session with one peer.

    @param clock: the reactor (C{callLater}, C{seconds}).
    @param reconnect: (initiator) opens a new link for this session: called
        with a function making the hello, returns a Deferred firing with a
        secured, unused L{Link} (or failing); C{None} for the responder,
        which waits for the initiator to come back.
    @param on_end: called once with the session when it has ended (the
        listener's table forgets it).
    """

    _log = Logger()

    def __init__(
        self,
        clock,
        *,
        initiator: bool,
        ident: bytes,
        peer_static: bytes,
        params: SessionParams,
        peer_max: int,
        reconnect: Callable[[Callable[[], Hello]], Deferred] | None = None,
        on_end: Callable[[Session], None] | None = None,
    ) -> None:
        self._clock = clock
        self.initiator = initiator
        self.ident = ident
        self.peer_static = peer_static
        self.peer_id = format_peer_id(peer_static)
        self.params = params
        self._reconnect = reconnect
        self._on_end = on_end
        self.phase = Phase.DETACHED
        self._life = LifeMachine(self)
        self._links: list[_LinkState] = []
        self._active: _LinkState | None = None
        self.path: str | None = None
        self.swaps = 0
        # sending
        self._next_seq = 0
        self._offset = 0
        self._unacked: deque[_Outgoing] = deque()
        self._pending: deque[_Outgoing] = deque()
        self._unacked_bytes = 0
        self._acked = 0
        self._acked_offset = 0
        self._peer_max = peer_max
        self.retransmit_peak = 0
        self._pipe_paused = False
        self._producing = True  # what we last told the stream
        # receiving
        self._recv_next = 0
        self._held: dict[int, tuple[int, bytes]] = {}
        self._held_bytes = 0
        self._deliver: deque[tuple[int, bytes]] = deque()
        self._deliver_bytes = 0
        self._consumed = 0
        self._granted = params.window
        self._acked_recv = 0
        self._ack_call = None
        self._delivering = False
        self._delivery_paused = False
        # closing and the end
        self._close_seq: int | None = None
        self._peer_closed = False
        self._close_received = False
        self._peer_close_point = 0
        self._resume_call = None
        self._retry_call = None
        self._retry_delay = _RETRY_FIRST
        self._reconnecting: Deferred | None = None
        self._attempt_call = None
        self._attempt_expired = False
        self._unknown = 0
        self._last_error: Failure | None = None
        self._ping_ids = 0
        #: who takes stream records: the user's lone Stream, or a StreamTable (set by either)
        self.stream = None
        #: the L{pluresync.session.streams.StreamTable} when both sides carry many streams
        self.mux = None
        self._confirms: deque[tuple[int, Callable[[], object]]] = deque()
        #: the peer's capability bits (L{wire.Caps}), from its hello or READY
        self.peer_caps = 0
        #: who hears CONTROL records (an L{IControlReceiver}), e.g. the direct path's upgrade
        self.signals = None
        self._flushing: set[Link] = set()
        self._flush_call = None
        self._final: Failure | None = None
        self._ended_waiters: list[Deferred] = []

    def __repr__(self) -> str:
        return f"<Session {self.ident.hex()[:8]} {self.phase.name.lower()} links={len(self._links)}>"

    # -- what the outside asks -----------------------------------------------

    def resume_hello(self) -> Hello:
        """(initiator) the hello of a link that resumes this session: where we are."""
        return Hello(Intent.RESUME, self.ident, self._recv_next, self._consumed + self.params.window, self.params.caps)

    def answer(self) -> ReadyAnswer:
        """(responder) the READY answer to a resume of this session."""
        if self.phase is Phase.ENDED:
            return ReadyAnswer(Status.ENDED, self._recv_next, self._consumed + self.params.window, self.params.caps)
        return ReadyAnswer(Status.OK, self._recv_next, self._consumed + self.params.window, self.params.caps)

    @property
    def closing(self) -> bool:
        """Whether the session is ending (its close sent or received, or over): no new stream on it."""
        return self._close_seq is not None or self._peer_closed or self._close_received or self.phase is Phase.ENDED

    @property
    def peer_credit(self) -> int:
        """How far (in record bytes) the peer lets us send now."""
        return self._peer_max

    def stats(self) -> dict:
        return {
            "streams": len(self.mux) if self.mux is not None else 1,
            "path": self.path,
            "links": len(self._links),
            "swaps": self.swaps,
            "retransmit_bytes": self._unacked_bytes,
            "retransmit_peak": self.retransmit_peak,
            "pending_bytes": sum(o.size for o in self._pending)
            + (self.mux.blocked_bytes() if self.mux is not None else 0),
            "receive_bytes": self._deliver_bytes + self._held_bytes,
            "phase": self.phase.name.lower(),
        }

    # -- links -------------------------------------------------------------------

    def addLink(self, link: Link, peer_recv_next: int, peer_max: int) -> None:
        """
        Carry the session over C{link} (chosen: the initiator sent USE, or the
        responder received it), from now on the link we send on.

        @param peer_recv_next: the peer's C{recv_next} at the link's
            handshake: everything before it has arrived.
        @param peer_max: the peer's credit at the link's handshake.
        """
        if self.phase is Phase.ENDED:
            link.abort()
            return
        try:
            # Before the link joins: what it confirms must not retire it.
            self._gotAck(peer_recv_next, peer_max)
        except RecordError as e:
            link.abort()
            self._log.warn("session {sid}: refused a link: {why}", sid=self.ident.hex()[:8], why=str(e))
            return
        if self.phase is Phase.ENDED:
            link.close()
            return
        now = self._clock.seconds()
        state = _LinkState(link, last_heard=now, last_data=now)
        self._links.append(state)
        old = self._active
        first = self.path is None
        planned = old is not None and old.link.usable and not old.retiring and old.ping_id is None
        self._activate(state, planned)
        if old is not None or (self.phase is Phase.DETACHED and self.swaps):
            self._log.info(
                "session {sid}: now over {path} ({how})",
                sid=self.ident.hex()[:8],
                path=link.name,
                how="moved while the old link still carried" if planned else "resumed",
            )
        if not planned and not first:
            # What the peer sent on the link we lost may be lost with it.
            link.sendRecord(wire.resync_record(self._recv_next))
        self._life.attach()
        link.adopt(self)
        self._watch(state)
        self._scheduleRotation(state)

    def _activate(self, state: _LinkState, planned: bool) -> None:
        """
        Send on C{state}'s link from now on.  A planned move (the old link
        still works) starts the new link at our next record and lets the old
        one drain; a forced one starts it at the peer's acknowledged point
        and resends from there.
        """
        old = self._active
        if old is not None and old is not state:
            self._unregister(old)
        if self.path is not None and old is not state:
            self.swaps += 1
        self._active = state
        self.path = state.link.name
        # START (and any resend) goes out before anything can resume the
        # user's producer, whose writes would otherwise precede it.
        if planned:
            start = self._pending[0].seq if self._pending else self._next_seq
            self._sendStart(state, start)
        else:
            self._resendFrom(self._acked)
        self._flush()
        self._sendAck(force=True)
        if self.mux is not None:
            self.mux.regrant()
        self._register(state)

    def _sendStart(self, state: _LinkState, seq: int) -> None:
        state.sent_start = seq
        state.link.sendRecord(wire.start_record(seq))

    def _resendFrom(self, seq: int) -> None:
        """Send START(seq) on the active link, then every record from seq on that is out."""
        state = self._active
        seq = max(seq, self._acked)
        self._sendStart(state, seq)
        again = [o.plaintext() for o in self._unacked if o.seq >= seq]
        if again:
            state.link.sendRecords(again)

    def _register(self, state: _LinkState) -> None:
        pipe = state.link.pipe
        if pipe is not None:
            self._pipe_paused = False
            pipe.registerProducer(self, True)
        self._updateProducer()

    def _unregister(self, state: _LinkState) -> None:
        pipe = state.link.pipe
        if pipe is not None:
            try:
                pipe.unregisterProducer()
            except Exception:  # a pipe already gone has nothing to undo
                pass

    def linkRecord(self, link: Link, kind: int, plaintext: bytes) -> None:
        state = self._active
        if state is None or state.link is not link:
            state = self._stateOf(link)
            if state is None:
                return
        now = self._clock.seconds()
        state.last_heard = now
        if (
            kind == _DATA
            and state.recv_seq == self._recv_next
            and not self._deliver
            and not self._held
            and not self._delivery_paused
            and not self._delivering
            and self.stream is not None
        ):
            # The common case, in order and nothing queued: straight to the
            # stream (what _numbered, _accept and _deliverAll would do).
            if len(plaintext) > self.params.window:
                self.abort(
                    Failure(RecordError("the peer broke the session protocol: it sent more than its credit")),
                    why=wire.AbortReason.PROTOCOL,
                )
                return
            state.last_data = now
            self._recv_next = state.recv_seq = state.recv_seq + 1
            self._consumed += len(plaintext)
            self._delivering = True
            try:
                self.stream.recordReceived(kind, plaintext)
            finally:
                self._delivering = False
            self._scheduleAck()
            return
        try:
            if kind in _NUMBERED:
                state.last_data = now
                self._numbered(state, kind, plaintext)
                return
            body = plaintext[1:]
            if kind == _ACK:
                recv_next, max_offset = wire.parse_ack(body)
                if recv_next > self._acked:
                    state.last_data = now
                self._gotAck(recv_next, max_offset)
            elif kind == _PING:
                link.sendRecord(wire.pong_record(wire.parse_u64(body, "PING")))
            elif kind == _PONG:
                if wire.parse_u64(body, "PONG") == state.ping_id:
                    state.ping_id = None
            elif kind == _START:
                seq = wire.parse_u64(body, "START")
                state.recv_seq = seq
                state.peer_start = seq
                self._sendAck(force=True)
                if not self.initiator and state is not self._active and state.link.usable:
                    # The initiator moved to this link: follow it.
                    self._activate(state, planned=self._active is not None and self._active.link.usable)
                self._maybeRetire()
            elif kind == _RESYNC:
                seq = wire.parse_u64(body, "RESYNC")
                if self._active is not None:
                    self._resendFrom(seq)
            elif kind == _DETACH:
                state.retiring = True
                if state is self._active:
                    self._pickAnotherLink(state)
            elif kind == _WINDOW:
                if self.mux is None:
                    raise RecordError("a WINDOW record on a session without streams")
                self.mux.windowReceived(body)
            elif kind == _CONTROL:
                # Path signaling (the direct path) for whoever manages it;
                # nobody, or a kind nobody knows: ignored, as the spec says.
                if body and self.signals is not None:
                    self.signals.controlReceived(body[0], body[1:])
            elif kind == _ABORT:
                self._end(Failure(PeerGoneError(_ABORT_WORDS.get(body[:1], "the peer aborted the connection"))), False)
            else:
                raise RecordError(f"unexpected record type {kind}")
        except (RecordError, wire.WireError) as e:
            # The record was authenticated: the peer itself broke the
            # protocol, and another link would only bring the same again.
            self.abort(Failure(RecordError(f"the peer broke the session protocol: {e}")), why=wire.AbortReason.PROTOCOL)

    def _numbered(self, state: _LinkState, kind: int, plaintext: bytes) -> None:
        seq = state.recv_seq
        if seq is None:
            raise RecordError("the peer sent a numbered record on a link before START")
        state.recv_seq = seq + 1
        if seq < self._recv_next:
            return  # a copy of what already arrived over another link
        if seq > self._recv_next:
            if seq in self._held:
                return
            self._held_bytes += len(plaintext)
            if self._held_bytes + self._deliver_bytes > self.params.window:
                raise RecordError("the peer sent more than the credit it was given")
            self._held[seq] = (kind, plaintext)
            return
        self._accept(kind, plaintext)
        while self._recv_next in self._held:
            kind, plaintext = self._held.pop(self._recv_next)
            self._held_bytes -= len(plaintext)
            self._accept(kind, plaintext)
        self._deliverAll()
        self._scheduleAck()

    def _accept(self, kind: int, plaintext: bytes) -> None:
        if kind == RecordType.CLOSE and not self._close_received:
            # The peer's end has arrived (its protocol may read it later):
            # from here the session needs no path for it, only for what we
            # sent before it.
            self._close_received = True
            self._peer_close_point = self._next_seq
        self._recv_next += 1
        self._deliver.append((kind, plaintext))
        self._deliver_bytes += len(plaintext)
        if self._held_bytes + self._deliver_bytes > self.params.window:
            raise RecordError("the peer sent more than the credit it was given")

    @property
    def links(self) -> tuple[Link, ...]:
        """The links carrying the session now, the one we send on last."""
        others = [s.link for s in self._links if s is not self._active]
        return tuple(others + ([self._active.link] if self._active is not None else []))

    def _dropLink(self, state: _LinkState, reason: Failure) -> None:
        state.link.abort()
        self.linkLost(state.link, reason)

    def linkLost(self, link: Link, reason: Failure) -> None:
        if link in self._flushing:
            self._flushed(link)
            return
        state = self._stateOf(link)
        if state is None:
            return
        self._links.remove(state)
        for call in (state.watch, state.rotate_call):
            if call is not None and call.active():
                call.cancel()
        if self.phase is Phase.ENDED:
            return
        if not state.retiring:
            self._last_error = reason
            self._log.info(
                "session {sid}: lost its link over {path} ({why})",
                sid=self.ident.hex()[:8],
                path=link.name,
                why=reason.getErrorMessage(),
            )
        if state is self._active:
            self._active = None
            self._pickAnotherLink(state)
        elif not state.retiring and self._active is not None:
            # A link we had moved away from, lost before it drained: what
            # went out on it, both ways, may be lost with it.
            self._resendFrom(self._acked)
            self._active.link.sendRecord(wire.resync_record(self._recv_next))

    def _pickAnotherLink(self, gone: _LinkState) -> None:
        for state in reversed(self._links):
            if state is not gone and state.link.usable and not state.retiring:
                self._activate(state, planned=False)
                return
        if gone in self._links and gone.link.usable:
            return  # retiring, but still the only way: keep sending on it
        self._active = None
        self._noLinks()

    def _stateOf(self, link: Link) -> _LinkState | None:
        for state in self._links:
            if state.link is link:
                return state
        return None

    def lifeAttached(self) -> None:
        """(machine) A link carries the session again: stop the resume clock."""
        self.phase = Phase.ATTACHED
        for call in (self._resume_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._resume_call = self._retry_call = None
        self._retry_delay = _RETRY_FIRST
        self._unknown = 0
        self._updateProducer()

    def _noLinks(self) -> None:
        """The last usable link is gone: end now if nothing can come back, else wait (and reconnect)."""
        if self.phase is Phase.ENDED:
            return
        if self._closeConfirmed():
            self._end(Failure(ConnectionDone("closed cleanly")))
        elif self._peer_closed and not self._allConfirmed() and self._lastEndInOrder():
            # The peer closed, then ended its side in order: it left before
            # confirming the rest of what we sent (as a TCP peer that closes
            # resets the connection), and will not come back for it.
            self._end(self._lostReason("the peer closed before confirming everything we sent"))
        elif self._peer_closed and self._allConfirmed():
            if self.initiator and self._reconnect is not None and not self._lastEndInOrder():
                # Our acknowledgement of the peer's close may have been lost
                # with the link: come back once, so the peer learns it.
                self._life.detach()
            else:
                self._end(Failure(ConnectionDone("the peer closed the connection")))
        elif self._awaitingReader():
            self._life.detach()
        elif self.params.resume <= 0:
            self._end(self._lostReason(None))
        else:
            self._life.detach()

    def lifeDetached(self) -> None:
        """(machine) No link: hold the user's producer, start the resume clock, and (initiator) reconnect."""
        self.phase = Phase.DETACHED
        self._updateProducer()
        if self._awaitingReader():
            return
        self._resume_call = self._clock.callLater(self.params.resume, self._life.expire)
        if self.initiator and self._reconnecting is None and self._retry_call is None:
            # Next turn: reconnecting may finish at once, and inputs never re-enter the machine.
            self._retry_call = self._clock.callLater(0, self._startReconnect)

    def _lostReason(self, why: str | None) -> Failure:
        """
        Why a session ends without its clean close, in words that say how
        the last path ended and how much may be missing.  With C{why} (no
        path came back in time) a L{SessionExpiredError}; without (resume=0)
        the last path's own error class, as before sessions could move.
        """
        missing = self._unacked_bytes + sum(o.size for o in self._pending)
        if self.mux is not None:
            missing += self.mux.blocked_bytes()
        last = self._last_error
        parts = []
        if last is not None:
            closed = last.check(ConnectionDone) is not None
            parts.append("the path to the peer was closed" if closed else last.getErrorMessage())
        if why:
            parts.append(why)
        if self._close_seq is not None:
            parts.append(f"the peer had not confirmed the close; up to {missing} bytes may be undelivered")
            return Failure(UnconfirmedCloseError("; ".join(parts)))
        if missing:
            parts.append(f"up to {missing} bytes sent were not confirmed")
        text = "; ".join(parts) or "the session ended"
        if why is None and last is not None:
            if isinstance(last.value, TruncatedStreamError):
                return Failure(type(last.value)(text))
            if last.check(ConnectionDone):
                return Failure(TruncatedStreamError(f"{text}: the stream ended without the peer's authenticated close"))
        return Failure(SessionExpiredError(text))

    # -- the initiator reconnects --------------------------------------------------

    def _startReconnect(self) -> None:
        self._retry_call = None
        if self.phase is Phase.ENDED or self._reconnect is None or self._reconnecting is not None:
            return
        d = self._reconnect(self.resume_hello)
        self._reconnecting = d
        # One attempt may not use up the resume limit (a relay that accepts
        # and then hangs): give it up after a while and make another.
        self._attempt_call = self._clock.callLater(self._attemptTimeout(), self._attemptTimedOut, d)
        d.addCallbacks(self._reconnected, self._reconnectFailed)

    def _attemptTimeout(self) -> float:
        return max(3 * self.params.stall, _ATTEMPT_MIN)

    def _attemptTimedOut(self, d: Deferred) -> None:
        self._attempt_call = None
        if self._reconnecting is d:
            self._attempt_expired = True
            d.cancel()

    def _attemptDone(self) -> bool:
        """Stop the attempt's clock; whether it was given up by that clock."""
        self._reconnecting = None
        if self._attempt_call is not None and self._attempt_call.active():
            self._attempt_call.cancel()
        self._attempt_call = None
        expired, self._attempt_expired = self._attempt_expired, False
        return expired

    def _reconnected(self, link: Link) -> None:
        self._attemptDone()
        if self.phase is Phase.ENDED:
            link.discard()
            return
        self._last_error = None
        link.use()
        self.addLink(link, link.answer.recv_next, link.answer.max_offset)

    def _reconnectFailed(self, failure: Failure) -> None:
        expired = self._attemptDone()
        if self.phase is Phase.ENDED:
            return
        if failure.check(CancelledError, ConnectingCancelledError) and not expired:
            return  # we gave it up ourselves
        if failure.check(LinkRefused):
            answer = failure.value.answer
            if answer.status is Status.ENDED or answer.status is Status.NOT_YOURS:
                self._gotAck(answer.recv_next, answer.max_offset)
                if self.phase is Phase.ENDED:
                    return  # what it confirmed was all we waited for
                if self._closeConfirmed():
                    self._end(Failure(ConnectionDone("closed cleanly")))
                elif self._peer_closed and self._allConfirmed():
                    self._end(Failure(ConnectionDone("the peer closed the connection")))
                else:
                    self._last_error = failure
                    self._end(self._lostReason(None))
                return
            self._unknown += 1
            if self._unknown >= _UNKNOWN_TRIES:
                self._last_error = failure
                self._end(self._lostReason(None))
                return
        if self._active is not None:
            return  # a rotation attempt failed: the current link carries on
        self._log.info(
            "session {sid}: reconnecting failed ({why}); trying again",
            sid=self.ident.hex()[:8],
            why=failure.getErrorMessage(),
        )
        delay = self._retry_delay * (1 + random.uniform(0, _RETRY_JITTER))
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
        self._retry_call = self._clock.callLater(delay, self._startReconnect)

    def _scheduleRotation(self, state: _LinkState) -> None:
        if not self.initiator or self._reconnect is None:
            return
        expires = getattr(state.link.pipe, "expires_at", None)
        if expires is None:
            return
        left = expires - self._clock.seconds()
        margin = min(self.params.rotate, left / 4)
        state.rotate_call = self._clock.callLater(max(0.0, left - margin), self._rotate, state)

    def _rotate(self, state: _LinkState) -> None:
        state.rotate_call = None
        if self.phase is not Phase.ATTACHED or state not in self._links or self._reconnecting is not None:
            return
        self._log.info(
            "session {sid}: moving off {path} before the relay's session cap", sid=self.ident.hex()[:8], path=self.path
        )
        self._startReconnect()

    def _maybeRetire(self) -> None:
        """
        (initiator) Close links we moved away from once both directions have
        drained them: everything we sent there is acknowledged, and the
        peer's records there all arrived (it STARTed the new link past them).
        """
        if not self.initiator or self._active is None:
            return
        active = self._active
        if active.sent_start is None or active.peer_start is None:
            return
        if self._acked < active.sent_start or self._recv_next < active.peer_start:
            return
        for state in list(self._links):
            if state is not active and state.link.usable and not state.retiring:
                state.retiring = True
                self._log.debug("session {sid}: retiring a drained link", sid=self.ident.hex()[:8])
                state.link.sendRecord(wire.detach_record(wire.DetachReason.MOVED))
                state.link.close()

    # -- liveness ------------------------------------------------------------------

    def _watch(self, state: _LinkState) -> None:
        params = self.params
        now = self._clock.seconds()
        busy = self._unacked or now - state.last_data < params.ping
        silence = now - state.last_heard
        quiet = params.stall / 2 if busy else params.ping
        dead = params.stall if busy else params.ping + params.stall
        if state.ping_id is not None and silence >= dead:
            state.watch = None
            self._log.info(
                "session {sid}: no answer over {path} for {s:.1f} s; dropping it",
                sid=self.ident.hex()[:8],
                path=state.link.name,
                s=silence,
            )
            self._dropLink(state, Failure(TruncatedStreamError(f"{state.link.name} went silent for {silence:.1f} s")))
            return
        if silence >= quiet and state.ping_id is None and state.link.usable:
            self._ping_ids += 1
            state.ping_id = self._ping_ids
            state.link.sendRecord(wire.ping_record(state.ping_id))
            wait = max(dead - silence, 0.05)
        elif state.ping_id is not None:
            wait = max(dead - silence, 0.05)
        else:
            wait = quiet - silence
        state.watch = self._clock.callLater(wait, self._watch, state)

    # -- path signaling ----------------------------------------------------------------

    def sendWindow(self, record: bytes) -> None:
        """
        Send a stream's WINDOW on the link we send on, with an ACK in the same
        pipe write (one WebSocket message for both, and one a relay forwards);
        one lost with its link is sent again when another link carries the session.
        """
        state = self._active
        if state is None or self.phase is Phase.ENDED or not state.link.usable:
            return
        self._sendAck(force=True, window=record)

    def whenConfirmed(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback} once the peer has acknowledged every numbered
        record sent so far (a stream's FINISH); never if the session ends first.
        """
        seq = self._next_seq
        if self._acked >= seq:
            callback()
        else:
            self._confirms.append((seq, callback))

    def sendControl(self, kind: wire.ControlKind, body: bytes) -> bool:
        """
        Send a CONTROL record on the link we send on (signals are not
        numbered: one lost with its link is asked again by whoever sent it).

        @return: whether it was sent (C{False}: no usable link now).
        """
        state = self._active
        if state is None or self.phase is not Phase.ATTACHED or not state.link.usable:
            return False
        state.link.sendRecord(wire.control_record(kind, body))
        return True

    # -- sending -------------------------------------------------------------------

    def send(self, *records: tuple[bytes, bytes | memoryview]) -> None:
        """
        Number records and send them when the credit allows (the records of
        one write together, a few per pipe write).

        @param records: each a record's plaintext as its head (type byte
            first) and a payload that must not change until the session
            ends (C{bytes}, or a view of C{bytes}; C{b""} for none).
        """
        if self._peer_closed or self.phase is Phase.ENDED:
            return  # nobody will read it: dropped, as writes after a TCP peer's close
        pending = self._pending
        state = self._active
        # What the credit allows goes out now (what _flush would do, without
        # a queue in between: this is every write's path), the rest waits.
        direct = state is not None and not pending
        seq = self._next_seq
        offset = self._offset
        limit = self._peer_max
        batch = []
        for head, payload in records:
            size = len(head) + len(payload)
            offset += size
            out = _Outgoing(seq, head, payload, size, offset)
            seq += 1
            if direct and offset <= limit:
                self._unacked.append(out)
                self._unacked_bytes += size
                batch.append(head + payload if payload else head)
            else:
                direct = False
                pending.append(out)
        self._next_seq = seq
        self._offset = offset
        if batch:
            if self._unacked_bytes > self.retransmit_peak:
                self.retransmit_peak = self._unacked_bytes
            state.link.sendRecords(batch)
        if pending or self._unacked_bytes >= self.params.window:
            # Only these can make a producing session stop producing here.
            self._updateProducer()

    def _flush(self) -> None:
        state = self._active
        if state is None:
            return
        pending = self._pending
        batch = []
        limit = self._peer_max
        while pending and pending[0].end <= limit:
            out = pending.popleft()
            self._unacked.append(out)
            self._unacked_bytes += out.size
            batch.append(out.plaintext())
        if batch:
            if self._unacked_bytes > self.retransmit_peak:
                self.retransmit_peak = self._unacked_bytes
            state.link.sendRecords(batch)

    def _gotAck(self, recv_next: int, max_offset: int) -> None:
        if recv_next > self._next_seq:
            raise RecordError("the peer acknowledged records never sent")
        unacked = self._unacked
        while unacked and unacked[0].seq < recv_next:
            out = unacked.popleft()
            self._unacked_bytes -= out.size
            self._acked_offset = out.end
        if recv_next > self._acked:
            self._acked = recv_next
            confirms = self._confirms
            while confirms and confirms[0][0] <= recv_next:
                confirms.popleft()[1]()
                if self.phase is Phase.ENDED:
                    return
        if max_offset > self._peer_max:
            self._peer_max = max_offset
            if self._pending:
                self._flush()
                self._updateProducer()
        if self._close_seq is not None and self._closeConfirmed():
            self._end(Failure(ConnectionDone("closed cleanly")))
            return
        if self._peer_closed and self._allConfirmed():
            self._peerCloseDone()
            if self.phase is Phase.ENDED:
                return
        self._maybeRetire()

    def _closeConfirmed(self) -> bool:
        return self._close_seq is not None and self._acked > self._close_seq

    # -- the membrane: the pipe pauses us, we pause the user's producer ------------

    def pauseProducing(self) -> None:
        # The pipe's buffer is full (after nearly every large write): pausing
        # needs none of _updateProducer's other conditions.
        self._pipe_paused = True
        if self._producing:
            self._producing = False
            if self.stream is not None:
                self.stream.sessionWritable(False)

    def resumeProducing(self) -> None:
        self._pipe_paused = False
        self._updateProducer()

    def stopProducing(self) -> None:
        pass  # a pipe going away is a lost link, handled as one

    def _updateProducer(self) -> None:
        producing = (
            self.phase is Phase.ATTACHED
            and not self._pipe_paused
            and not self._pending
            and self._unacked_bytes < self.params.window
        )
        if producing != self._producing:
            self._producing = producing
            if self.stream is not None:
                self.stream.sessionWritable(producing)

    @property
    def clock(self):
        return self._clock

    @property
    def writable(self) -> bool:
        return self._producing

    # -- receiving: delivery, credit and acks ---------------------------------------

    def pauseDelivery(self) -> None:
        self._delivery_paused = True

    def resumeDelivery(self) -> None:
        self._delivery_paused = False
        self._deliverAll()
        self._scheduleAck()

    def _deliverAll(self) -> None:
        if self._delivering:
            return
        self._delivering = True
        try:
            deliver = self._deliver
            while deliver and not self._delivery_paused and self.phase is not Phase.ENDED:
                kind, plaintext = deliver.popleft()
                size = len(plaintext)
                self._deliver_bytes -= size
                self._consumed += size
                if kind == RecordType.CLOSE:
                    self._peerClose()
                    return
                if self.stream is not None:
                    self.stream.recordReceived(kind, plaintext)
        finally:
            self._delivering = False

    def _scheduleAck(self) -> None:
        if self.phase is Phase.ENDED:
            return
        window = self.params.window
        if self._consumed + window - self._granted >= window // 4 or self._recv_next - self._acked_recv >= _ACK_EVERY:
            self._sendAck(force=True)
        elif self._ack_call is None and (self._recv_next > self._acked_recv or self._consumed + window > self._granted):
            self._ack_call = self._clock.callLater(self.params.ack_delay, self._sendAck, True)

    def _sendAck(self, force: bool = False, window: bytes | None = None) -> None:
        """
        Acknowledge what arrived and grant credit; with C{window}, a
        stream's WINDOW goes in the same pipe write on the link we send on.
        """
        if self._ack_call is not None:
            if self._ack_call.active():
                self._ack_call.cancel()
            self._ack_call = None
        if self._active is None or self.phase is Phase.ENDED:
            return
        self._granted = self._consumed + self.params.window
        self._acked_recv = self._recv_next
        record = wire.ack_record(self._recv_next, self._granted)
        # During a move the peer may be reading either link: tell both.
        for state in self._links:
            if not state.link.usable:
                continue
            if state is self._active:
                state.link.sendRecords([record, window] if window is not None else [record])
            elif not state.retiring:
                state.link.sendRecord(record)

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Send the authenticated close; the end comes when the peer acknowledges it."""
        if self._close_seq is not None or self.phase is Phase.ENDED or self._peer_closed:
            return
        self._close_seq = self._next_seq
        self.send((wire.CLOSE_RECORD, b""))

    def _peerClose(self) -> None:
        """
        The peer's authenticated close arrived: acknowledge it, and end once
        what we sent before it is confirmed (what we would send after it has
        no reader, as after a TCP peer's close).
        """
        self._peer_closed = True
        self._sendAck(force=True)
        if self.mux is not None:
            self.mux.peerClosed()
            if self.phase is Phase.ENDED:
                return
        if self._allConfirmed():
            self._peerCloseDone()

    def _peerCloseDone(self) -> None:
        """
        The peer has closed and confirmed what we sent before its close.
        The responder ends now.  The initiator waits for the peer to close
        the link (its sign that our acknowledgement of its close arrived):
        if the link is lost instead, the initiator comes back once to tell
        it, since the peer cannot come to us.
        """
        if self.initiator and self._reconnect is not None and self._active is not None:
            return
        self._end(Failure(ConnectionDone("the peer closed the connection")))

    def _allConfirmed(self) -> bool:
        """
        (the peer has closed) Whether what we sent before its close is
        confirmed: our own CLOSE, if it crossed the peer's, needs no
        confirmation, since the peer is closing anyway.
        """
        need = self._peer_close_point
        if self._close_seq is not None:
            need = min(need, self._close_seq)
        return self._acked >= need

    def abort(self, reason: Failure | None = None, why: wire.AbortReason = wire.AbortReason.ABORTED) -> None:
        """End now, without the clean close; the peer hears it at once (ABORT), not after its resume limit."""
        self._end(reason or Failure(ConnectionAborted()), tell=why)

    def _end(self, reason: Failure, tell: wire.AbortReason | None | bool = None) -> None:
        """
        End the session: a clean end (C{ConnectionDone}) once its links have
        flushed, any other at once (telling the peer with ABORT unless
        C{tell} is C{False}: it told us).
        """
        if self.phase is Phase.ENDED:
            return
        if reason.check(ConnectionDone) is not None and any(s.link.usable for s in self._links):
            self._life.finish(reason)
        else:
            self._life.stop(reason, tell)

    def lifeFlush(self, reason: Failure) -> None:
        """(machine) A clean end: the last ACK out, the links closed; report once their pipes have sent it all."""
        if self._recv_next > self._acked_recv:
            self._sendAck(force=True)  # the peer's last records, before the links close
        links = self._teardown()
        self._flushing = {link for link in links if link.usable}
        self._final = reason
        for link in links:
            link.close()
        self._flush_call = self._clock.callLater(_FLUSH_TIMEOUT, self._flushed, None)
        if not self._flushing:
            self._flushed(None)

    def lifeStop(self, reason: Failure, tell: wire.AbortReason | None | bool) -> None:
        """(machine) An end reported at once; the peer hears an ABORT unless it is the one that told us."""
        if reason.check(ConnectionDone) is None and tell is not False:
            record = wire.abort_record(tell or wire.AbortReason.PROTOCOL)
            for state in self._links:
                if state.link.usable:
                    state.link.sendRecord(record)
        for link in self._teardown():
            link.close()
        self._report(reason)

    def lifeExpired(self) -> None:
        """(machine) No link came back within the resume limit."""
        self._resume_call = None
        if self._peer_closed and self._allConfirmed():
            # We came back only to tell the peer its close arrived: our part is done.
            reason = Failure(ConnectionDone("the peer closed the connection"))
        else:
            reason = self._lostReason(f"no path to the peer within {self.params.resume:g} s")
        self.lifeStop(reason, None)

    def _awaitingReader(self) -> bool:
        """
        Everything is here, the peer's close included, and what we sent is
        confirmed; only our protocol has yet to read it (the session ends
        when it does): no path, and no resume limit, is needed any more.
        """
        return self._close_received and not self._peer_closed and self._allConfirmed()

    def _lastEndInOrder(self) -> bool:
        """Whether the last link ended in an orderly way (the peer closed it after reading ours)."""
        return self._last_error is not None and self._last_error.check(ConnectionDone) is not None

    def lifeReport(self) -> None:
        """(machine) The links of a clean end have flushed: report it."""
        reason, self._final = self._final, None
        self._report(reason)

    def _teardown(self) -> list[Link]:
        """Stop every clock and drop every queue; the links, for the caller to close."""
        self.phase = Phase.ENDED
        for call in (self._ack_call, self._resume_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._ack_call = self._resume_call = self._retry_call = None
        if self._attempt_call is not None and self._attempt_call.active():
            self._attempt_call.cancel()
        self._attempt_call = None
        if self._reconnecting is not None:
            d, self._reconnecting = self._reconnecting, None
            d.cancel()
        links = [state.link for state in self._links]
        for state in self._links:
            for call in (state.watch, state.rotate_call):
                if call is not None and call.active():
                    call.cancel()
        self._links.clear()
        self._active = None
        self._unacked.clear()
        self._pending.clear()
        self._held.clear()
        self._deliver.clear()
        self._confirms.clear()
        if self._on_end is not None:
            self._on_end(self)
        return links

    def _flushed(self, link: Link | None) -> None:
        if link is None:  # the pipes took too long (or there were none): drop them
            self._flush_call = None
            for stuck in self._flushing:
                stuck.abort()
        else:
            self._flushing.discard(link)
            if self._flushing:
                return
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._flushing = set()
        self._life.flushed()

    def _report(self, reason: Failure) -> None:
        if self.stream is not None:
            self.stream.sessionEnded(reason)
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(None)

    def whenEnded(self) -> Deferred:
        """A Deferred that fires (with C{None}) once the session has ended, however it ended."""
        d: Deferred = Deferred()
        if self.phase is Phase.ENDED and self._final is None:
            d.callback(None)
        else:
            self._ended_waiters.append(d)
        return d
