"""
Many streams on one session: the table a session routes stream records
through once both sides set caps bit 3 (docs/protocol.md, "Streams").

A stream is a whole Twisted connection to its application (its own
protocol, transport and C{connectionLost}); the session under it is
shared, and so is everything that makes a session durable: numbering,
acknowledgement, moves between links.  What is per stream:

 - I{credit}: the peer may send a stream's payload bytes up to that
   stream's window (WINDOW records), so a stream whose application stops
   reading holds at most its window, and the session (whose own credit
   counts bytes until they reach a stream) never stalls because of it;
 - I{its end}: FINISH (clean: confirmed by the session's acknowledgement),
   SHUTDOWN (half-close) and RESET (at once, either way) end one stream
   and leave the others running.

Only the session's initiator opens streams (even ids, in order: 2, 4, …;
stream 0 is the session's first); it ends the session (CLOSE) once it has
had no stream for C{linger} seconds.  The listener bounds how many streams
one session holds and how fast it may open them.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pluresync.errors import RecordError, StreamOpenError
from pluresync.secure.frames import RecordType
from pluresync.session import wire
from pluresync.session.wire import Caps, ResetReason

if TYPE_CHECKING:
    from pluresync.session.session import Session
    from pluresync.session.stream import Stream

#: Credit every stream but the first starts with, both ways, before a WINDOW
#: raises it: one full record, so an accepted stream can answer at once.
INITIAL_CREDIT = 64 * 1024
#: The smallest window a receiver grants a stream, however many share the session.
MIN_STREAM_WINDOW = 128 * 1024

_END = int(RecordType.END)
_OPEN = int(RecordType.OPEN)
_stream_id = struct.Struct(">I").unpack_from
_RESET = int(RecordType.RESET)
_FINISH = int(RecordType.FINISH)

_REFUSALS = {
    ResetReason.REFUSED: "the peer's application refused the stream",
    ResetReason.TOO_MANY: "the peer holds as many streams on this session as it allows (its max_streams)",
    ResetReason.TOO_FAST: "streams were opened faster than the peer allows",
    ResetReason.ABORTED: "the peer aborted the stream before it was open",
    ResetReason.PROTOCOL: "the peer found a protocol error on the stream",
}


class StreamTable:
    """
    The streams of one session, by id; what the session hands stream
    records to (in place of a lone stream) and tells when it can write or
    has ended.

    @param factory: (listener) builds the application's protocol for each
        stream the peer opens.
    """

    _log = Logger()

    def __init__(self, session: Session, local_id: str, factory=None) -> None:
        self.session = session
        self.local_id = local_id
        self.factory = factory
        self.streams: dict[int, Stream] = {}
        #: (initiator) streams opened, waiting for the listener's first WINDOW
        self._opening: dict[int, tuple[Deferred, object]] = {}
        #: the next id the initiator opens (and the listener expects)
        self._next_id = 2
        self._tokens = float(session.params.max_streams)
        self._refilled = session.clock.seconds()
        self._linger_call = None
        self._peer_closed = False
        self._ended = False
        self.opened = 1  #: streams this session has carried (for stats and tests)
        self._turn = 0
        self._share()
        session.stream = session.mux = self

    def __len__(self) -> int:
        return len(self.streams)

    # -- the streams' side ---------------------------------------------------------

    def blocked_bytes(self) -> int:
        """What the streams hold back for want of their own credit (the session's stats add it to C{pending_bytes})."""
        return sum(stream.blocked_bytes for stream in self.streams.values())

    def add(self, stream: Stream) -> None:
        self.streams[stream.stream_id] = stream
        self._share()
        self._stopLinger()

    def _share(self) -> None:
        #: the window a stream's reader grants now: a fair share of the
        #: session's, never below the minimum (read on every record: kept, not computed)
        self.window = max(MIN_STREAM_WINDOW, self.session.params.window // max(1, len(self.streams)))

    def grant(self, stream_id: int, max_offset: int) -> None:
        self.session.sendWindow(wire.window_record(stream_id, max_offset))

    def regrant(self) -> None:
        """A new link: tell the peer every stream's credit again (a WINDOW lost with a link is not resent)."""
        for stream in self.streams.values():
            stream.regrant()

    def removed(self, stream: Stream) -> None:
        """A stream has ended (its application hears C{connectionLost} next): the session may be idle now."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self._share()
        if not self.streams and not self._opening:
            self._idle()

    # -- opening (initiator) ---------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether a new stream may be opened on this session now."""
        session = self.session
        return (
            session.initiator
            and not self._ended
            and not self._peer_closed
            and session.closing is False
            and self._next_id < 1 << 32
        )

    def open(self, factory) -> Deferred:
        """
        (initiator) Open a stream for C{factory}'s protocol: a Deferred
        firing with the protocol once the peer accepted the stream (its
        first WINDOW), or failing with L{StreamOpenError}.
        """
        from pluresync.session.stream import Stream

        if not self.accepting:
            raise StreamOpenError("the session takes no new streams (it is closing or has ended)")
        stream_id = self._next_id
        self._next_id += 2
        stream = Stream(self.session, stream_id, self.local_id, table=self)
        protocol = factory.buildProtocol(stream.getPeer())
        if protocol is None:
            raise StreamOpenError("the protocol factory refused the connection (buildProtocol returned None)")
        d = Deferred(lambda d: self._cancelOpen(stream_id))
        self._opening[stream_id] = (d, protocol)
        self.add(stream)
        self.opened += 1
        self.session.send((wire.open_record(stream_id), b""))
        return d

    def _accepted(self, stream: Stream) -> None:
        d, protocol = self._opening.pop(stream.stream_id)
        stream.attach(protocol)
        d.callback(protocol)

    def _cancelOpen(self, stream_id: int) -> None:
        if self._opening.pop(stream_id, None) is None:
            return
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.resetSilently()
            self.session.send((wire.reset_record(stream_id, ResetReason.ABORTED), b""))
        if not self.streams and not self._opening:
            self._idle()

    def _openFailed(self, stream_id: int, error: Exception) -> None:
        d, _ = self._opening.pop(stream_id)
        self.streams.pop(stream_id, None)
        d.errback(Failure(error))
        if not self.streams and not self._opening:
            self._idle()

    # -- the session's side ------------------------------------------------------------

    def recordReceived(self, kind: int, plaintext: bytes) -> None:
        """
        A stream record from the peer, in order: to its stream, or the
        table's own business.  One that breaks the rules was authenticated,
        so the peer itself broke them: the session ends (ABORT(2)).
        """
        try:
            if kind <= _END and len(plaintext) >= wire.STREAM_HEAD_SIZE:
                # The common case first: bytes for an open stream.
                stream = self.streams.get(_stream_id(plaintext, 1)[0])
                if stream is not None and (not self._opening or stream.stream_id not in self._opening):
                    stream.bytesReceived(kind, plaintext)
                    return
            self._route(kind, plaintext)
        except (RecordError, wire.WireError) as e:
            self.session.abort(
                Failure(RecordError(f"the peer broke the session protocol: {e}")), why=wire.AbortReason.PROTOCOL
            )

    def _route(self, kind: int, plaintext: bytes) -> None:
        stream_id = wire.stream_of(plaintext)
        stream = self.streams.get(stream_id)
        if stream is not None:
            if kind == _RESET:
                _, why = wire.parse_reset(plaintext[1:])
                if stream_id in self._opening:
                    self._openFailed(stream_id, StreamOpenError(_refusal(why), why))
                    return
                stream.peerReset(why)
                return
            if stream_id in self._opening:
                raise RecordError(f"the peer sent on stream {stream_id} before accepting it")
            stream.recordReceived(kind, plaintext)
            return
        if kind == _OPEN:
            self._peerOpens(stream_id)
        elif stream_id % 2 or stream_id >= self._next_id:
            # Never opened (and odd ids are the listener's, which opens none).
            raise RecordError(f"the peer sent on stream {stream_id}, which was never opened")
        # Else a stream that has ended here: what crossed its end is dropped.

    def windowReceived(self, body: bytes) -> None:
        """A WINDOW (a link record: raised credit, or the listener's acceptance of a stream we opened)."""
        stream_id, max_offset = wire.parse_window(body)
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # it ended here meanwhile
        stream.creditGranted(max_offset)
        if stream_id in self._opening:
            self._accepted(stream)

    def _peerOpens(self, stream_id: int) -> None:
        """(listener) The peer opens a stream: build its protocol, or refuse it with a RESET."""
        from pluresync.session.stream import Stream

        session = self.session
        if session.initiator or stream_id != self._next_id:
            raise RecordError(f"the peer opened stream {stream_id} out of turn (expected {self._next_id})")
        self._next_id += 2
        if self._peer_closed or session.closing or self.factory is None:
            return  # we are ending: nobody would read it
        why = self._admit()
        if why is None:
            stream = Stream(session, stream_id, self.local_id, table=self)
            protocol = self.factory.buildProtocol(stream.getPeer())
            if protocol is not None:
                self.add(stream)
                self.opened += 1
                stream.regrant()  # its first WINDOW: the peer's connect() fires
                stream.attach(protocol)
                return
            why = ResetReason.REFUSED
        self._log.info(
            "session {sid}: refused stream {stream}: {why}",
            sid=session.ident.hex()[:8],
            stream=stream_id,
            why=_REFUSALS[why],
        )
        session.send((wire.reset_record(stream_id, why), b""))

    def _admit(self) -> ResetReason | None:
        """Whether one more stream fits: the count, then a token bucket refilled at C{open_rate}."""
        params = self.session.params
        if len(self.streams) >= params.max_streams:
            return ResetReason.TOO_MANY
        now = self.session.clock.seconds()
        self._tokens = min(float(params.max_streams), self._tokens + (now - self._refilled) * params.open_rate)
        self._refilled = now
        if self._tokens < 1:
            return ResetReason.TOO_FAST
        self._tokens -= 1
        return None

    def peerClosed(self) -> None:
        """
        The peer's CLOSE arrived, after every record it sent: no new
        stream; each stream ends with the session, or once its application
        has read what it holds (L{Stream.sessionEnded}).
        """
        self._peer_closed = True

    def lone(self, stream: Stream) -> bool:
        """
        Whether C{stream} is the last stream of a session that ends with
        its last stream (the initiator keeps no idle session: it did not
        set caps bit 4): then its close or abort, on either side, is the
        session's (CLOSE or ABORT: one message, as a session of one stream
        has always ended).  An OPEN that crosses a listener's CLOSE fails
        as the session ends, before anything was built for it (the pool
        then opens a new session).
        """
        session = self.session
        if session.initiator:
            keeps = session.params.linger > 0
        else:
            keeps = bool(session.peer_caps & Caps.KEEP)
        return (
            not keeps
            and not self._opening
            and not self._ended
            and len(self.streams) == 1
            and self.streams.get(stream.stream_id) is stream
        )

    def sessionWritable(self, writable: bool) -> None:
        """
        Tell every stream; when the session can take more, the first one
        told changes each time, so producers that write as soon as they
        are resumed take turns at the credit instead of the same one
        always taking it all.  Each stream hears what holds I{now}: a
        producer resumed before it may have used the room up.
        """
        streams = list(self.streams.values())
        if writable and len(streams) > 1:
            start = self._turn % len(streams)
            self._turn += 1
            streams = streams[start:] + streams[:start]
        for stream in streams:
            stream.sessionWritable(self.session.writable)

    def sessionEnded(self, reason: Failure) -> None:
        self._ended = True
        self._stopLinger()
        opening, self._opening = self._opening, {}
        for d, _ in opening.values():
            d.errback(
                Failure(StreamOpenError(f"the session ended before the peer accepted the stream: {_why(reason)}"))
            )
        for stream in list(self.streams.values()):
            stream.sessionEnded(reason)

    # -- idle sessions (initiator) ---------------------------------------------------------

    def _idle(self) -> None:
        session = self.session
        if not session.initiator or self._ended:
            return
        linger = session.params.linger
        if linger <= 0:
            session.close()
        elif self._linger_call is None:
            self._linger_call = session.clock.callLater(linger, self._lingered)

    def _lingered(self) -> None:
        self._linger_call = None
        if not self.streams and not self._opening:
            self.session.close()

    def _stopLinger(self) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None

    def closeIdle(self) -> None:
        """Close the session now if it carries no stream (a program shutting down)."""
        if not self.streams and not self._opening and not self._ended:
            self._stopLinger()
            self.session.close()


def _refusal(why: int) -> str:
    try:
        return _REFUSALS[ResetReason(why)]
    except ValueError:
        return f"the peer refused the stream (reason {why})"


def _why(reason: Failure) -> str:
    if reason.check(CancelledError):
        return "cancelled"
    if reason.check(ConnectionDone):
        return "it was closed"
    return reason.getErrorMessage()
