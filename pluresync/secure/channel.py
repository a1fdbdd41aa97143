"""
The end-to-end encrypted transport handed to user protocols.

A L{SecureChannel} sits between a pipe (L{pluresync.interfaces.IPipe}: the
bytes to and from the peer, through a relay or directly) and the user's
protocol. It runs the handshake, then seals every write into records and
opens every record it receives. To the user's protocol it is an ordinary
Twisted transport: C{ITransport}, C{IPushProducer} (so C{pauseProducing}
stops the peer's sending, all the way through the relay) and C{IConsumer} (a
registered producer is throttled by the pipe's outgoing buffer), so a large
transfer streams with bounded memory.

How a connection ends reaches C{connectionLost}:
 - C{ConnectionDone}: an authenticated close record (or our own
   C{loseConnection});
 - L{pluresync.errors.PeerGoneError}, L{pluresync.errors.RelayLostError},
   L{pluresync.errors.TruncatedStreamError}: the stream stopped without one;
 - L{pluresync.errors.RecordError}: a record failed authentication.
A failed handshake never reaches a protocol: no protocol is built before the
peer is authenticated, and the C{connect()} Deferred fails instead.
"""

from __future__ import annotations

from enum import Enum, auto

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from pluresync.address import PeerAddress
from pluresync.errors import HandshakeError, NotChosenError, RecordError, TruncatedStreamError
from pluresync.interfaces import IPipeReceiver
from pluresync.keys import format_peer_id
from pluresync.noise import NoiseError
from pluresync.secure.frames import (
    LENGTH,
    MAX_RECORD_PAYLOAD,
    SEQ,
    FrameDecoder,
    RecordType,
    split_record,
)
from pluresync.secure.handshake import Handshake, HandshakeAborted, Secured, abort_error

_CLOSE = bytes([RecordType.CLOSE])
_DATA = bytes([RecordType.DATA])
#: Records per pipe write at most: two full records (128 KiB) stay under the
#: relay's and our 256 KiB WebSocket message limit.
_RECORDS_PER_WRITE = 2
_READY = bytes([RecordType.READY])
_USE = bytes([RecordType.USE])
_SHUTDOWN = bytes([RecordType.SHUTDOWN])


class IRecordReceiver(Interface):
    """
    A protocol that wants message boundaries (the message API) instead of a
    byte stream: it gets each record's payload with the flag that ends a message.
    """

    def recordReceived(payload, end):
        """A record's payload; C{end} is true when it completes a message."""


class IMessageTransport(Interface):
    """The message-writing side that L{SecureChannel} adds to ITransport."""

    peer_id = Attribute("The peer's proven id (hex).")

    def writeMessage(data):
        """Send C{data} as one message: DATA records, the last one END."""


class _State(Enum):
    HANDSHAKE = auto()  # exchanging Noise handshake frames
    CONFIRMING = auto()  # initiator: sent frame 3, waiting for READY
    CHOOSING = auto()  # responder: sent READY, waiting for USE (or CLOSE)
    SECURED = auto()  # keys ready, no protocol attached yet
    OPEN = auto()  # a protocol is attached; records flow both ways
    READ_SHUT = auto()  # the peer ended its direction (SHUTDOWN); we may still write
    WRITE_SHUT = auto()  # we ended ours (SHUTDOWN); the peer may still write
    CLOSING = auto()  # we sent CLOSE; waiting for the pipe to end
    CLOSED = auto()  # connectionLost delivered (or the handshake failed)


# A half-close is a state of its own, not flags beside one: once both
# directions are shut the channel moves on to CLOSING, so "open" is these
# three, and each direction is open in two of them.
_ATTACHED = frozenset({_State.OPEN, _State.READ_SHUT, _State.WRITE_SHUT})
_CAN_WRITE = frozenset({_State.OPEN, _State.READ_SHUT})
_CAN_READ = frozenset({_State.OPEN, _State.WRITE_SHUT})


@implementer(ITransport, IPushProducer, IConsumer, IMessageTransport, IPipeReceiver)
class SecureChannel:
    """
    One end-to-end encrypted stream over one pipe.

    @ivar secured: fires with the peer's id (hex) when the handshake is
        complete and confirmed, or fails with a L{HandshakeError} or the
        pipe's error.
    """

    _log = Logger()

    def __init__(self, handshake: Handshake, transport_name: str, local_id: str) -> None:
        self._handshake = handshake
        self._transport_name = transport_name
        self._local_id = local_id
        self._state = _State.HANDSHAKE
        self._decoder = FrameDecoder()
        self._pipe = None
        self._protocol: IProtocol | None = None
        self._records: IRecordReceiver | None = None
        self._send = None
        self._receive = None
        self._paused = False
        self._lost_before_attach: Failure | None = None
        self._processing = False
        self.peer_id: str | None = None
        self.disconnecting = False
        self.secured: Deferred[str] = Deferred(self._cancel)

    # -- the pipe side ---------------------------------------------------

    def startPipe(self, pipe) -> None:
        """Begin the handshake over C{pipe} (an L{IPipe})."""
        self._pipe = pipe
        for body in self._handshake.start():
            self._writeFrame(body)

    def pipeDataReceived(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._process()

    def pipeLost(self, reason: Failure) -> None:
        state = self._state
        self._state = _State.CLOSED
        if state in (_State.HANDSHAKE, _State.CONFIRMING, _State.CHOOSING):
            error = reason.value
            if reason.check(ConnectionDone):
                error = HandshakeError("the connection closed during the handshake")
            self.secured.errback(Failure(error))
        elif state is _State.SECURED:
            self._lost_before_attach = self._uncleanEnd(reason)
        elif state in _ATTACHED:
            self._connectionLost(self._uncleanEnd(reason))
        elif state is _State.CLOSING:
            self._connectionLost(Failure(ConnectionDone("closed by us")))

    @staticmethod
    def _uncleanEnd(reason: Failure) -> Failure:
        # An orderly end of the carrier without our peer's authenticated
        # CLOSE is still a truncation: the relay (or anyone on the path) can
        # end a WebSocket cleanly, but cannot forge the record.
        if reason.check(ConnectionDone):
            return Failure(
                TruncatedStreamError("the stream ended without the peer's authenticated close; data may be missing")
            )
        return reason

    def _process(self) -> None:
        # Re-entrancy guard: a protocol may pause, resume or write from
        # inside dataReceived; the outer loop picks the new state up.
        if self._processing:
            return
        self._processing = True
        try:
            while not self._paused and self._state in (
                _State.HANDSHAKE,
                _State.CONFIRMING,
                _State.CHOOSING,
                _State.OPEN,
                _State.READ_SHUT,
                _State.WRITE_SHUT,
                _State.CLOSING,
            ):
                body = self._decoder.next()
                if body is None:
                    break
                if self._state is _State.HANDSHAKE:
                    self._handshakeFrame(body)
                elif self._state is _State.CONFIRMING:
                    self._confirmFrame(body)
                elif self._state is _State.CHOOSING:
                    self._choiceRecord(body)
                else:
                    self._record(body)
        finally:
            self._processing = False

    def _handshakeFrame(self, body: bytes) -> None:
        try:
            out, secured = self._handshake.receive(body)
        except HandshakeAborted as aborted:
            if aborted.notice is not None:
                self._writeFrame(aborted.notice)
            self._failHandshake(aborted.error)
            return
        for frame_body in out:
            self._writeFrame(frame_body)
        if secured is not None:
            # Responder: the initiator proved the key; confirm with READY,
            # then wait to be chosen (the initiator may be racing relays).
            self._secure(secured)
            self._state = _State.CHOOSING
            self._sendRecord(_READY)
        elif self._handshake.initiator:
            self._state = _State.CONFIRMING

    def _confirmFrame(self, body: bytes) -> None:
        secured = self._handshake.pending()
        if len(body) < 8 + 17:
            self._failHandshake(abort_error(body))
            return
        self._secure(secured)
        try:
            kind, _ = self._open(body)
        except RecordError as e:
            self._failHandshake(HandshakeError(f"handshake failed: {e}"))
            return
        if kind != RecordType.READY:
            self._failHandshake(HandshakeError("handshake failed: the peer did not confirm"))
            return
        self.secured.callback(self.peer_id)

    def _choiceRecord(self, body: bytes) -> None:
        try:
            kind, _ = self._open(body)
        except RecordError as e:
            self._failHandshake(HandshakeError(f"handshake failed: {e}"))
            return
        if kind == RecordType.USE:
            self._state = _State.SECURED
            self.secured.callback(self.peer_id)
        elif kind == RecordType.SHUTDOWN:
            self._peerShutdown()
        elif kind == RecordType.CLOSE:
            self._failHandshake(NotChosenError("the peer chose another path for this connection"))
        else:
            self._failHandshake(HandshakeError("handshake failed: the peer sent data before choosing"))

    def _secure(self, secured: Secured) -> None:
        self._send, self._receive = secured.send, secured.receive
        self.peer_id = format_peer_id(secured.remote_static)
        self._state = _State.SECURED

    def _failHandshake(self, error: HandshakeError) -> None:
        self._state = _State.CLOSED
        self._pipe.close()
        self.secured.errback(Failure(error))

    def _cancel(self, d: Deferred) -> None:
        self._state = _State.CLOSED
        if self._pipe is not None:
            self._pipe.abort()

    def _open(self, body: bytes) -> tuple[int, bytes]:
        seq, ciphertext = split_record(body)
        if seq != self._receive.nonce:
            raise RecordError(f"record {seq} arrived where {self._receive.nonce} was due")
        try:
            plaintext = self._receive.decrypt(b"", ciphertext)
        except NoiseError:
            raise RecordError("a record failed authentication: the stream was tampered with") from None
        return plaintext[0], plaintext[1:]

    def _record(self, body: bytes) -> None:
        try:
            kind, payload = self._open(body)
        except RecordError as e:
            self._state = _State.CLOSED
            self._pipe.abort()
            self._connectionLost(Failure(e))
            return
        if kind == RecordType.DATA or kind == RecordType.END:
            if self._state not in _ATTACHED:
                return  # we are closing: late data is discarded, as after loseConnection
            if self._state not in _CAN_READ:
                self._state = _State.CLOSED
                self._pipe.abort()
                self._connectionLost(Failure(RecordError("the peer sent data after ending its side")))
                return
            if self._records is not None:
                self._records.recordReceived(payload, kind == RecordType.END)
            elif payload:
                self._protocol.dataReceived(payload)
        elif kind == RecordType.SHUTDOWN:
            self._peerShutdown()
        elif kind == RecordType.CLOSE:
            was_open = self._state in _ATTACHED
            self._state = _State.CLOSED
            self._pipe.close()
            if was_open or self._protocol is not None:
                self._connectionLost(Failure(ConnectionDone("the peer closed the connection")))
        else:
            self._state = _State.CLOSED
            self._pipe.abort()
            self._connectionLost(Failure(RecordError(f"unexpected record type {kind}")))

    def _peerShutdown(self) -> None:
        """
        The peer ended its direction. A half-closeable protocol hears
        C{readConnectionLost} and may go on writing; any other protocol is
        closed, as Twisted's TCP does at end of input.
        """
        if self._state not in _CAN_READ:
            return
        half = IHalfCloseableProtocol(self._protocol, None)
        if half is None or self._state is _State.WRITE_SHUT:
            self._finish()
        else:
            self._state = _State.READ_SHUT
            half.readConnectionLost()

    def _finish(self) -> None:
        """
        Both directions are done: close with an authenticated CLOSE. The
        protocol hears C{connectionLost} once the pipe has delivered
        everything (or the peer's CLOSE arrives), as after C{loseConnection}.
        """
        self._sendRecord(_CLOSE)
        self._state = _State.CLOSING
        self._pipe.close()

    # -- the user side ------------------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """
        Connect the user's protocol, once the channel is secured. On the
        initiator this is the choice of this connection: it tells the peer
        (USE) before the protocol can write anything.
        """
        assert self._state in (_State.SECURED, _State.CLOSED), self._state
        if self._state is _State.SECURED and self._handshake.initiator:
            self._sendRecord(_USE)
        self._protocol = protocol
        self._records = IRecordReceiver(protocol, None)
        lost = self._lost_before_attach
        if lost is None:
            self._state = _State.OPEN
        protocol.makeConnection(self)
        if lost is not None:
            self._connectionLost(lost)
        else:
            self._process()

    def _connectionLost(self, reason: Failure) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)

    def _writeFrame(self, body: bytes) -> None:
        self._pipe.write(LENGTH.pack(len(body)) + body)

    def _seal(self, plaintext: bytes) -> bytes:
        seq = self._send.nonce
        ciphertext = self._send.encrypt(b"", plaintext)
        return b"".join((LENGTH.pack(SEQ.size + len(ciphertext)), SEQ.pack(seq), ciphertext))

    def _sendRecord(self, plaintext: bytes) -> None:
        self._pipe.write(self._seal(plaintext))

    def _writeRecords(self, data: bytes, last: RecordType) -> None:
        # The records of one write go to the pipe in batches of up to two
        # records, so a 64 KiB write (one full record and a small one) is one
        # pipe write, i.e. one WebSocket message, not two.
        if self._state not in _CAN_WRITE:
            return
        view = memoryview(data)
        total = len(view)
        start = 0
        data_byte = bytes([RecordType.DATA])
        pending: list[bytes] = []
        while total - start > MAX_RECORD_PAYLOAD:
            pending.append(self._seal(data_byte + view[start : start + MAX_RECORD_PAYLOAD]))
            start += MAX_RECORD_PAYLOAD
            if len(pending) == _RECORDS_PER_WRITE:
                self._pipe.write(b"".join(pending))
                pending.clear()
        pending.append(self._seal(bytes([last]) + view[start:]))
        self._pipe.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def write(self, data: bytes) -> None:
        if not data:
            return
        if len(data) <= MAX_RECORD_PAYLOAD and self._state in _CAN_WRITE:
            self._pipe.write(self._seal(_DATA + data))
        else:
            self._writeRecords(data, RecordType.DATA)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def writeMessage(self, data: bytes) -> None:
        self._writeRecords(data, RecordType.END)

    def discard(self) -> None:
        """
        Close a secured channel that no protocol will use (it lost a race):
        the peer learns it cleanly, and builds no protocol for it either.
        """
        if self._state is _State.SECURED:
            self._sendRecord(_CLOSE)
            self._state = _State.CLOSED
            self._pipe.close()

    def loseWriteConnection(self) -> None:
        """
        Half-close: tell the peer, authenticated, that we will write no
        more, and go on reading (C{pluresync connect} sends stdin's end so).
        """
        if self._state not in _CAN_WRITE:
            return
        both = self._state is _State.READ_SHUT
        # Shut before sending, so nothing the send sets off can write after it.
        self._state = _State.WRITE_SHUT
        self._sendRecord(_SHUTDOWN)
        if both:
            self._finish()
            return
        half = IHalfCloseableProtocol(self._protocol, None)
        if half is not None:
            half.writeConnectionLost()

    def loseConnection(self) -> None:
        if self._state not in _ATTACHED:
            return
        self.disconnecting = True
        self._sendRecord(_CLOSE)
        self._state = _State.CLOSING
        self._pipe.close()

    def abortConnection(self) -> None:
        if self._state in (_State.CLOSED,):
            return
        self.disconnecting = True
        self._state = _State.CLOSED
        self._pipe.abort()
        self._connectionLost(Failure(ConnectionAborted()))

    def getPeer(self) -> PeerAddress:
        return PeerAddress(self._transport_name, self.peer_id)

    def getHost(self) -> PeerAddress:
        return PeerAddress(self._transport_name, self._local_id)

    # IPushProducer: the user's protocol throttles what the peer sends us.

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._pipe.pauseReading()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._pipe.resumeReading()
            self._process()

    def stopProducing(self) -> None:
        self.abortConnection()

    # IConsumer: what the user sends is throttled by the pipe.

    def registerProducer(self, producer, streaming: bool) -> None:
        self._pipe.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._pipe.unregisterProducer()
