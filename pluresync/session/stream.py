"""
A stream: the transport the user's protocol holds.

To the protocol it is an ordinary Twisted transport (C{ITransport},
C{IPushProducer}, C{IConsumer}, half-close), and it does not change when
the session under it moves to another link: the protocol sees one
connection, from C{connectionMade} to one C{connectionLost}.

 - I{Writing}: each write becomes numbered DATA records of the session.  A
   producer registered here is paused while the session cannot take more
   (the peer's credit is used up, the link's pipe is full, or there is no
   link at all) and resumed when it can: the producer "membrane" of
   C{twisted.protocols.tls}, so it is never registered on a pipe that may
   be gone a moment later.  Writes from protocols without a producer are
   queued, as Twisted's TCP buffer queues them.
 - I{Reading}: C{pauseProducing} stops delivery (and with it the credit the
   peer gets); the links go on reading, so acks and pings still flow and a
   paused reader is never mistaken for a dead peer.
 - I{Ending}: C{loseConnection} sends the session's authenticated close;
   C{connectionLost} reports C{ConnectionDone} only once the peer has
   acknowledged everything, else an error that says what may be missing.

How a connection ends reaches C{connectionLost}:
 - C{ConnectionDone}: the peer's close arrived, or ours was acknowledged;
 - L{pluresync.errors.PeerGoneError}, L{pluresync.errors.RelayLostError},
   L{pluresync.errors.TruncatedStreamError} (and its
   L{pluresync.session.session.UnconfirmedCloseError} and
   L{pluresync.session.session.SessionExpiredError}): no path to the peer
   came back within the resume limit;
 - L{pluresync.errors.RecordError}: the peer broke the protocol.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from pluresync.address import PeerAddress
from pluresync.errors import RecordError, StreamResetError
from pluresync.secure.frames import RecordType
from pluresync.session import wire
from pluresync.session.session import UnconfirmedCloseError
from pluresync.session.wire import ResetReason

#: plain ints, not the enum: compared on every record
_DATA = int(RecordType.DATA)
_END = int(RecordType.END)
_SHUTDOWN = int(RecordType.SHUTDOWN)
_FINISH = int(RecordType.FINISH)
_MAX = wire.MAX_DATA_PAYLOAD
_HEAD = wire.STREAM_HEAD_SIZE


class IRecordReceiver(Interface):
    """
    A protocol that wants message boundaries (the message API) instead of a
    byte stream: it gets each record's payload with the flag that ends a message.
    """

    def recordReceived(payload, end):
        """A record's payload; C{end} is true when it completes a message."""


class IMessageTransport(Interface):
    """The message-writing side that L{Stream} adds to ITransport."""

    peer_id = Attribute("The peer's proven id (hex).")

    def writeMessage(data):
        """Send C{data} as one message: DATA records, the last one END."""


@implementer(ITransport, IPushProducer, IConsumer, IMessageTransport)
class Stream:
    """
    One stream of a session: its only one (a peer without caps bit 3, or
    C{streams} off), or one of many in a L{pluresync.session.streams.StreamTable}.

    Alone, it is the session's whole traffic: the session's credit is its
    credit, pausing it pauses the session's delivery, and closing it closes
    the session.  In a table it keeps its own credit both ways (the
    peer's WINDOWs bound what it sends; its own bound what it holds for a
    paused reader, in its inbox), and ends by itself (FINISH, RESET).

    @ivar peer_id: the peer's proven id (hex).
    """

    def __init__(self, session, stream_id: int, local_id: str, table=None) -> None:
        self._session = session
        self._id = stream_id
        self._table = table
        self._data_head = wire.record_head(_DATA, stream_id)
        self._end_head = wire.record_head(_END, stream_id)
        self._local_id = local_id
        self.peer_id = session.peer_id
        self._protocol: IProtocol | None = None
        self._records: IRecordReceiver | None = None
        self._producer = None
        self._streaming = True
        self._producer_paused = False
        self._read_shut = False
        self._write_shut = False
        self._closing = False
        self._pull_call = None
        self._reading_paused = False
        self.disconnecting = False
        self.connected = False
        if table is None:
            session.stream = self
            return
        # Credit, both ways, in payload bytes of DATA and END: the first
        # stream starts with the session's (its hello or READY said so),
        # any other with the initial credit until a WINDOW comes.
        from pluresync.session.streams import INITIAL_CREDIT

        first = stream_id == 0
        self._sent = 0
        self._credit = session.peer_credit if first else INITIAL_CREDIT
        self._blocked: deque = deque()  #: records beyond the peer's credit, in order
        self._received = 0
        self._consumed = 0
        self._granted = session.params.window if first else INITIAL_CREDIT
        self._inbox: deque = deque()  #: what arrived while the reader was paused, in order
        self._confirming = False
        self._finishing = False  #: our FINISH (or CLOSE) is with the session
        self._ended_by = None  #: (session ended) the reason to report once the inbox is read
        self._ended = False

    @property
    def session(self):
        return self._session

    @property
    def stream_id(self) -> int:
        return self._id

    def stats(self) -> dict:
        """How the session under this stream is doing (for tests, benchmarks and C{pluresync} logs)."""
        stats = self._session.stats()
        if self._table is not None:
            stats["stream"] = self._id
            stats["stream_blocked_bytes"] = self.blocked_bytes
            stats["stream_inbox_bytes"] = sum(len(p) for _, p in self._inbox)
        return stats

    def attach(self, protocol: IProtocol) -> None:
        self._protocol = protocol
        self._records = IRecordReceiver(protocol, None)
        self.connected = True
        protocol.makeConnection(self)
        if self._table is not None:
            if not self._reading_paused:
                self._drain()
            if self._id == 0:
                self._session.resumeDelivery()  # a session held for its first protocol (until=) goes on
        elif not self._reading_paused:  # the protocol may pause us from connectionMade
            self._session.resumeDelivery()

    # -- from the session ----------------------------------------------------

    def recordReceived(self, kind: int, plaintext: bytes) -> None:
        if self._table is not None:
            self._muxReceived(kind, plaintext)
            return
        protocol = self._protocol
        if protocol is None:
            return
        if kind == _DATA or kind == _END:
            if len(plaintext) < _HEAD:
                self._session.abort(
                    Failure(RecordError("the peer broke the session protocol: a record too short for its stream id")),
                    why=wire.AbortReason.PROTOCOL,
                )
                return
            payload = plaintext[_HEAD:]  # its stream id is ours: one stream per session until multiplexing
            if self._read_shut:
                self._session.abort(
                    Failure(RecordError("the peer sent data after ending its side")), why=wire.AbortReason.PROTOCOL
                )
                return
            if self._closing:
                return  # we are closing: late data is discarded, as after loseConnection
            if self._records is not None:
                self._records.recordReceived(payload, kind == _END)
            elif payload:
                protocol.dataReceived(payload)
        elif kind == _SHUTDOWN:
            if len(plaintext) < _HEAD:
                self._session.abort(
                    Failure(RecordError("the peer broke the session protocol: a SHUTDOWN without its stream id")),
                    why=wire.AbortReason.PROTOCOL,
                )
                return
            self._peerShutdown()

    def _peerShutdown(self, force: bool = False) -> None:
        """
        The peer ended its direction. A half-closeable protocol hears
        C{readConnectionLost} and may go on writing; any other protocol is
        closed, as Twisted's TCP does at end of input.

        @param force: in a table, the SHUTDOWN was noted on arrival and is
            only now handed on (it waited behind what a paused reader held).
        """
        if (self._read_shut and not force) or self._closing:
            return
        self._read_shut = True
        half = IHalfCloseableProtocol(self._protocol, None)
        if half is None or self._write_shut:
            self.loseConnection()
        else:
            half.readConnectionLost()

    def sessionWritable(self, writable: bool) -> None:
        """The membrane: pause or resume the user's producer with the session (and, in a table, our credit)."""
        if self._table is not None and self._blocked:
            writable = False
        producer = self._producer
        if producer is None:
            return
        if not self._streaming:
            if writable:
                self._pull()
            return
        if writable and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()
        elif not writable and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()

    def sessionEnded(self, reason: Failure) -> None:
        if self._table is not None:
            if reason.check(ConnectionDone) and self._inbox and not self._closing and self._protocol is not None:
                # The peer closed after all this: its reader gets it first.
                self._ended_by = reason
                return
            if self._closing and not reason.check(ConnectionDone, UnconfirmedCloseError, ConnectionAborted):
                # Our end (FINISH, or what waited for credit before it) was never confirmed.
                reason = Failure(
                    UnconfirmedCloseError(
                        f"{reason.getErrorMessage()}; the peer had not confirmed the close, so it may be undelivered"
                    )
                )
            self._end(reason)
            return
        self._disconnect(reason)

    def _disconnect(self, reason: Failure) -> None:
        """Let go of the protocol and its producer, then tell the protocol how the connection ended."""
        protocol, self._protocol = self._protocol, None
        self.connected = False
        if self._producer is not None:
            producer, self._producer = self._producer, None
            if not reason.check(ConnectionDone):
                producer.stopProducing()
        if self._table is not None:
            self._table.removed(self)
        if protocol is not None:
            protocol.connectionLost(reason)

    # -- ITransport ------------------------------------------------------------

    def write(self, data) -> None:
        if not data or self._write_shut or self._closing:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the resend queue keeps it: it must not change
        head = self._data_head
        if self._table is None:
            send = self._session.send
        elif not self._blocked and self._sent + len(data) <= self._credit:
            self._sent += len(data)  # within the stream's credit: what _out would find
            send = self._session.send
        else:
            send = self._out
        if len(data) <= _MAX:
            send((head, data))
            return
        view = memoryview(data)
        send(*[(head, view[start : start + _MAX]) for start in range(0, len(view), _MAX)])

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def writeMessage(self, data) -> None:
        if self._write_shut or self._closing:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the resend queue keeps it: it must not change
        view = memoryview(data)
        records = []
        start = 0
        while len(view) - start > _MAX:
            records.append((self._data_head, view[start : start + _MAX]))
            start += _MAX
        records.append((self._end_head, view[start:]))
        if self._table is None:
            self._session.send(*records)
        else:
            self._out(*records)

    def loseWriteConnection(self) -> None:
        """
        Half-close: tell the peer, authenticated, that we will write no
        more, and go on reading (C{pluresync connect} sends stdin's end so).
        """
        if self._write_shut or self._closing:
            return
        self._write_shut = True
        if self._table is None:
            self._session.send((wire.shutdown_record(self._id), b""))
        else:
            self._out((wire.shutdown_record(self._id), b""))
        if self._read_shut:
            self.loseConnection()
            return
        half = IHalfCloseableProtocol(self._protocol, None)
        if half is not None:
            half.writeConnectionLost()

    def loseConnection(self) -> None:
        if self._closing or self._protocol is None:
            return
        self._closing = True
        self.disconnecting = True
        if self._table is None:
            self._session.close()
            return
        # We read no more; what we wrote goes first (some of it may wait
        # for credit), then our end.
        self._inbox.clear()
        if not self._blocked:
            self._closeNow()

    def _closeNow(self) -> None:
        """
        Everything written is with the session: end the stream (FINISH; its
        end is clean once the session confirms it arrived), or, the
        initiator's last stream, the whole session (CLOSE).
        """
        self._finishing = True
        if self._table.lone(self):
            self._session.close()
            return
        self._session.send((wire.finish_record(self._id), b""))
        self._confirming = True
        self._session.whenConfirmed(self._confirmed)

    def abortConnection(self) -> None:
        if self._protocol is None:
            return
        self.disconnecting = True
        if self._table is None or self._table.lone(self):
            self._session.abort(Failure(ConnectionAborted()))
            return
        self._blocked.clear()
        self._inbox.clear()
        self._session.send((wire.reset_record(self._id, ResetReason.ABORTED), b""))
        self._end(Failure(ConnectionAborted()))

    def getPeer(self) -> PeerAddress:
        return PeerAddress(self._session.path or "unknown", self.peer_id)

    def getHost(self) -> PeerAddress:
        return PeerAddress(self._session.path or "unknown", self._local_id)

    # -- IPushProducer: the user's protocol throttles what the peer sends us -------

    def pauseProducing(self) -> None:
        self._reading_paused = True
        if self._table is None:
            self._session.pauseDelivery()

    def resumeProducing(self) -> None:
        self._reading_paused = False
        if self._table is None:
            self._session.resumeDelivery()
        else:
            self._drain()

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- IConsumer: what the user sends is throttled by the session ------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"cannot register producer {producer!r}: {self._producer!r} is already registered")
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if not streaming:
            self._pull()
        elif not self._writable():
            self._producer_paused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def _pull(self) -> None:
        """A pull producer (C{streaming=False}) is asked for more each turn while the session can take it."""
        if self._pull_call is not None or self._producer is None:
            return
        self._pull_call = self._session.clock.callLater(0, self._pulled)

    def _pulled(self) -> None:
        self._pull_call = None
        producer = self._producer
        if producer is None or self._streaming or not self._writable() or self._protocol is None:
            return
        producer.resumeProducing()
        self._pull()

    @property
    def blocked_bytes(self) -> int:
        return sum(len(payload) for _, payload in self._blocked)

    def _writable(self) -> bool:
        return self._session.writable and not (self._table is not None and self._blocked)

    # -- in a table: credit, the inbox, and a stream's own end -------------------------

    def _out(self, *records) -> None:
        """Hand the session what the peer's credit for this stream allows; keep the rest, in order."""
        blocked = self._blocked
        if blocked:
            blocked.extend(records)
            return
        credit = self._credit - self._sent
        ready = 0
        for _, payload in records:
            size = len(payload)
            if size > credit:
                blocked.extend(records[ready:])
                break
            credit -= size
            ready += 1
        if ready:
            self._sent = self._credit - credit
            self._session.send(*records[:ready])
        if blocked:
            self.sessionWritable(False)

    def _confirmed(self) -> None:
        self._end(Failure(ConnectionDone("closed cleanly")))

    def creditGranted(self, max_offset: int) -> None:
        """A WINDOW from the peer: send what waited for it, and let the producer go on."""
        if max_offset <= self._credit:
            return
        self._credit = max_offset
        blocked = self._blocked
        if not blocked:
            return
        credit = max_offset - self._sent
        ready = []
        while blocked and len(blocked[0][1]) <= credit:
            record = blocked.popleft()
            credit -= len(record[1])
            ready.append(record)
        if ready:
            self._sent = max_offset - credit
            self._session.send(*ready)
        if not blocked:
            if self._closing and not self._finishing and not self._ended:
                self._closeNow()
            else:
                self.sessionWritable(self._session.writable)

    def regrant(self) -> None:
        """Send the peer our credit for this stream (its first WINDOW accepts an opened stream)."""
        if self._ended or self._read_shut:
            return
        self._granted = max(self._granted, self._consumed + self._table.window)
        self._table.grant(self._id, self._granted)

    def bytesReceived(self, kind: int, plaintext: bytes) -> None:
        """
        (in a table) A DATA or END record of this stream, in order: every
        record's path, so what L{_hand} and L{_consume} do for bytes is
        written out here.
        """
        payload = plaintext[_HEAD:]
        size = len(payload)
        self._received += size
        if self._received > self._granted:
            raise RecordError(f"the peer sent more on stream {self._id} than the credit it was given")
        if self._read_shut:
            raise RecordError(f"the peer sent on stream {self._id} after ending its side")
        if self._closing or self._ended:
            # We are closing: what crosses our end is discarded, and still
            # credited, or a peer whose own end waits behind it would wait for ever.
            self._consume(size)
            return
        if self._inbox or self._reading_paused or self._protocol is None:
            self._inbox.append((kind, payload))
            return
        if self._records is not None:
            self._records.recordReceived(payload, kind == _END)
        elif payload:
            self._protocol.dataReceived(payload)
        self._consumed = consumed = self._consumed + size
        window = self._table.window
        if consumed + window - self._granted >= window >> 2:
            self._granted = consumed + window
            self._table.grant(self._id, self._granted)

    def _muxReceived(self, kind: int, plaintext: bytes) -> None:
        if kind == _DATA or kind == _END:
            self.bytesReceived(kind, plaintext)
        elif kind == _SHUTDOWN:
            if self._read_shut:
                return
            self._read_shut = True
            if self._inbox or self._reading_paused or self._protocol is None:
                self._inbox.append((kind, b""))
            else:
                self._peerShutdown(force=True)
        elif kind == _FINISH:
            if self._closing or self._ended:
                return
            if self._inbox or self._reading_paused or self._protocol is None:
                self._inbox.append((kind, b""))
            else:
                self._peerFinished()
        else:
            raise RecordError(f"unexpected record type {kind} on stream {self._id}")

    def _hand(self, kind: int, payload) -> None:
        """Give the application one inbox entry (a payload, or the peer's half or full end)."""
        if kind == _SHUTDOWN:
            self._peerShutdown(force=True)
            return
        if kind == _FINISH:
            self._peerFinished()
            return
        if self._records is not None:
            self._records.recordReceived(payload, kind == _END)
        elif payload:
            self._protocol.dataReceived(payload)
        self._consume(len(payload))

    def _consume(self, size: int) -> None:
        """C{size} more bytes were read (or discarded): grant the peer more once a quarter window is free."""
        self._consumed = consumed = self._consumed + size
        window = self._table.window
        if consumed + window - self._granted >= window >> 2:
            self._granted = consumed + window
            self._table.grant(self._id, self._granted)

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox and not self._reading_paused and self._protocol is not None and not self._ended:
            kind, payload = inbox.popleft()
            self._hand(kind, payload)
        if not inbox and self._ended_by is not None:
            self._end(self._ended_by)

    def _peerFinished(self) -> None:
        """
        The peer's FINISH, after what it sent before (read first): it reads
        and writes no more here, so what we would send is dropped, and the
        end is clean once what we sent before is confirmed.
        """
        self._blocked.clear()
        self._write_shut = True
        self._closing = True
        self.disconnecting = True
        if not self._confirming:
            self._confirming = True
            self._session.whenConfirmed(self._confirmed)

    def peerReset(self, why: int) -> None:
        """The peer ended the stream at once (RESET): what it holds or waits to send is dropped."""
        self._blocked.clear()
        self._inbox.clear()
        if why == ResetReason.PROTOCOL:
            reason = Failure(RecordError(f"the peer ended stream {self._id}: this side broke the protocol"))
        else:
            reason = Failure(StreamResetError("the peer aborted the stream"))
        self._end(reason)

    def resetSilently(self) -> None:
        """A stream whose opening was given up before its protocol was connected: forget it."""
        self._ended = True
        self._protocol = None

    def _end(self, reason: Failure) -> None:
        if self._ended:
            return
        self._ended = True
        self._ended_by = None
        self._write_shut = True  # writes after the end are dropped, as after a TCP connection's
        self._blocked.clear()
        self._inbox.clear()
        if self._pull_call is not None and self._pull_call.active():
            self._pull_call.cancel()
        self._pull_call = None
        self._disconnect(reason)
