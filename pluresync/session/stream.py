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
from pluresync.errors import RecordError
from pluresync.secure.frames import RecordType
from pluresync.session import wire

_DATA = RecordType.DATA
_END = RecordType.END
_SHUTDOWN = RecordType.SHUTDOWN
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
    One stream of a session (the only one, id 0, until streams multiply).

    @ivar peer_id: the peer's proven id (hex).
    """

    def __init__(self, session, stream_id: int, local_id: str) -> None:
        self._session = session
        self._id = stream_id
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
        session.stream = self

    @property
    def session(self):
        return self._session

    def stats(self) -> dict:
        """How the session under this stream is doing (for tests, benchmarks and C{pluresync} logs)."""
        return self._session.stats()

    def attach(self, protocol: IProtocol) -> None:
        self._protocol = protocol
        self._records = IRecordReceiver(protocol, None)
        self.connected = True
        protocol.makeConnection(self)
        if not self._reading_paused:  # the protocol may pause us from connectionMade
            self._session.resumeDelivery()

    # -- from the session ----------------------------------------------------

    def recordReceived(self, kind: int, plaintext: bytes) -> None:
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

    def _peerShutdown(self) -> None:
        """
        The peer ended its direction. A half-closeable protocol hears
        C{readConnectionLost} and may go on writing; any other protocol is
        closed, as Twisted's TCP does at end of input.
        """
        if self._read_shut or self._closing:
            return
        self._read_shut = True
        half = IHalfCloseableProtocol(self._protocol, None)
        if half is None or self._write_shut:
            self.loseConnection()
        else:
            half.readConnectionLost()

    def sessionWritable(self, writable: bool) -> None:
        """The membrane: pause or resume the user's producer with the session."""
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
        protocol, self._protocol = self._protocol, None
        self.connected = False
        if self._producer is not None:
            producer, self._producer = self._producer, None
            if not reason.check(ConnectionDone):
                producer.stopProducing()
        if protocol is not None:
            protocol.connectionLost(reason)

    # -- ITransport ------------------------------------------------------------

    def write(self, data) -> None:
        if not data or self._write_shut or self._closing:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the resend queue keeps it: it must not change
        head = self._data_head
        if len(data) <= _MAX:
            self._session.send((head, data))
            return
        view = memoryview(data)
        self._session.send(*[(head, view[start : start + _MAX]) for start in range(0, len(view), _MAX)])

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
        self._session.send(*records)

    def loseWriteConnection(self) -> None:
        """
        Half-close: tell the peer, authenticated, that we will write no
        more, and go on reading (C{pluresync connect} sends stdin's end so).
        """
        if self._write_shut or self._closing:
            return
        self._write_shut = True
        self._session.send((wire.shutdown_record(self._id), b""))
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
        self._session.close()

    def abortConnection(self) -> None:
        if self._protocol is None:
            return
        self.disconnecting = True
        self._session.abort(Failure(ConnectionAborted()))

    def getPeer(self) -> PeerAddress:
        return PeerAddress(self._session.path or "unknown", self.peer_id)

    def getHost(self) -> PeerAddress:
        return PeerAddress(self._session.path or "unknown", self._local_id)

    # -- IPushProducer: the user's protocol throttles what the peer sends us -------

    def pauseProducing(self) -> None:
        self._reading_paused = True
        self._session.pauseDelivery()

    def resumeProducing(self) -> None:
        self._reading_paused = False
        self._session.resumeDelivery()

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
        elif not self._session.writable:
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
        if producer is None or self._streaming or not self._session.writable or self._protocol is None:
            return
        producer.resumeProducing()
        self._pull()
