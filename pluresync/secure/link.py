"""
A link: one pipe's end-to-end handshake and sealing, for a session.

A session (L{pluresync.session.session.Session}) outlives any one pipe; a
L{Link} lives exactly as long as its pipe.  Each link runs its own
C{Noise_XXpsk3} handshake (fresh ephemeral keys, both peers' static keys
proven again), seals what the session sends and opens what arrives, with a
strict per-link nonce check: a record lost, repeated, reordered or forged on
this link fails I{this link}, and the session carries on over another.

The handshake's payloads negotiate the session (L{pluresync.session.wire}):
the initiator's frame 3 carries a hello (a new session, or which one to
resume, and how far it got), the responder's READY record carries the
answer.  Then the initiator chooses the link with USE (or drops it with
CLOSE when another path won a race), exactly as in version 1::

    initiator                                       responder
    -> e                                          (frame 1)
                                <- e, ee, s, es   (frame 2)
    -> s, se, psk, hello                          (frame 3)
                                <- READY(answer)  (or an abort frame)
    -> USE  (or CLOSE: not chosen)

A link never pauses its pipe's reading: acknowledgements and pings must get
through while the user's protocol is not reading (the session holds back
delivery and credit instead).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, auto

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pluresync.errors import HandshakeError, NotChosenError, RecordError, VersionError
from pluresync.interfaces import IPipeReceiver
from pluresync.keys import format_peer_id
from pluresync.noise import NoiseError
from pluresync.secure.frames import LENGTH, SEQ, AbortReason, FrameDecoder, RecordType, split_record
from pluresync.secure.handshake import Handshake, HandshakeAborted, Secured, abort_error
from pluresync.session.wire import (
    Caps,
    Hello,
    ReadyAnswer,
    Status,
    VersionMismatch,
    WireError,
    parse_hello,
    parse_ready,
)

#: Records per pipe write at most: two full records (128 KiB) stay under the
#: relay's and our 256 KiB WebSocket message limit.
RECORDS_PER_WRITE = 2

_READY = RecordType.READY
#: personalises the derivation of the AES-GCM record keys from the handshake's (keyed BLAKE2b)
_AES_PERSON = b"pluresync-aes"
_USE = bytes([RecordType.USE])
_CLOSE = bytes([RecordType.CLOSE])


class ILinkOwner(Interface):
    """Where a link in use delivers: the session it carries."""

    def linkRecord(link, kind, plaintext):
        """An authenticated record from the peer: its type, and its whole plaintext (the type byte first)."""

    def linkLost(link, reason):
        """The link ended (once); C{reason} says how (a Failure)."""


class _State(Enum):
    HANDSHAKE = auto()  # exchanging Noise handshake frames
    CONFIRMING = auto()  # initiator: sent frame 3, waiting for READY
    CHOOSING = auto()  # responder: sent READY, waiting for USE (or CLOSE)
    SECURED = auto()  # initiator: READY arrived, not chosen yet
    IN_USE = auto()  # chosen: records flow between the pipe and the owner
    CLOSED = auto()


class LinkRefused(HandshakeError):
    """
    The responder answered the hello with a refusal (L{Status}): the session
    to resume is unknown there, belongs to another peer, or has ended.
    """

    def __init__(self, answer: ReadyAnswer) -> None:
        self.answer = answer
        words = {
            Status.UNKNOWN_SESSION: "the peer does not know this session (it may have ended, or another "
            "process holds it)",
            Status.NOT_YOURS: "the peer holds this session for another peer id",
            Status.ENDED: "the peer has ended this session",
        }
        super().__init__(f"resume refused: {words.get(answer.status, answer.status.name)}")


#: (responder) decides the answer to a hello from the proven peer: a function
#: of the hello and the handshake's result.
Resolver = Callable[[Hello, Secured], ReadyAnswer]


@implementer(IPipeReceiver)
class Link:
    """
    One pipe's handshake and record sealing.

    @ivar secured: fires with this link once it may carry the session (the
        initiator: the responder's READY accepted our hello; the responder:
        the initiator chose it with USE), or fails with a
        L{HandshakeError} or the pipe's error.
    @ivar hello: the session hello (ours as the initiator, the peer's as the responder).
    @ivar answer: the responder's answer to it.
    @ivar name: the path's name (e.g. C{"relay:azure"}).
    """

    def __init__(
        self,
        handshake: Handshake,
        name: str,
        *,
        hello: Callable[[], Hello] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._handshake = handshake
        self._initiator = handshake.initiator
        self.name = name
        self._make_hello = hello
        self._resolver = resolver
        self._state = _State.HANDSHAKE
        self._decoder = FrameDecoder()
        self._processing = False
        self._owner = None
        self._lost: Failure | None = None
        self.pipe = None
        self.hello: Hello | None = None
        self.answer: ReadyAnswer | None = None
        self.peer_static: bytes | None = None
        self.peer_id: str | None = None
        self.handshake_hash: bytes = b""
        self._send = None
        self._receive = None
        self.secured: Deferred[Link] = Deferred(self._cancel)

    def __repr__(self) -> str:
        return f"<Link {self.name} {self._state.name.lower()}>"

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def usable(self) -> bool:
        """Whether records can still be sent on it."""
        return self._state is _State.IN_USE

    def hello_payload(self) -> bytes:
        """(initiator) the frame-3 payload: the hello, made when frame 3 is written."""
        self.hello = self._make_hello()
        return self.hello.encode()

    # -- the pipe side ---------------------------------------------------

    def startPipe(self, pipe) -> None:
        """Begin the handshake over C{pipe} (an L{IPipe})."""
        self.pipe = pipe
        for body in self._handshake.start():
            self._writeFrame(body)

    def pipeDataReceived(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._process()

    def pipeLost(self, reason: Failure) -> None:
        state = self._state
        self._state = _State.CLOSED
        if state in (_State.HANDSHAKE, _State.CONFIRMING, _State.CHOOSING, _State.SECURED):
            if state is _State.SECURED:
                self._lost = reason
                return
            error = reason.value
            if reason.check(ConnectionDone):
                error = HandshakeError("the connection closed during the handshake")
            self.secured.errback(Failure(error))
        elif state is _State.IN_USE:
            self._end(reason)

    def _end(self, reason: Failure) -> None:
        self._state = _State.CLOSED
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.linkLost(self, reason)
        else:
            self._lost = reason

    def _process(self) -> None:
        # Re-entrancy guard: the owner may send (or drop the link) from
        # inside linkRecord; the outer loop picks the new state up.
        if self._processing:
            return
        self._processing = True
        try:
            while True:
                state = self._state
                if state is _State.CLOSED or state is _State.SECURED:
                    break
                if state is _State.IN_USE and self._owner is None:
                    break  # records wait for the owner (adopt)
                body = self._decoder.next()
                if body is None:
                    break
                if state is _State.HANDSHAKE:
                    self._handshakeFrame(body)
                elif state is _State.CONFIRMING:
                    self._confirmFrame(body)
                elif state is _State.CHOOSING:
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
            self._respond(secured)
        elif self.initiator:
            self._state = _State.CONFIRMING

    def _respond(self, secured: Secured) -> None:
        """(responder) frame 3 arrived: answer its hello in READY, then wait to be chosen."""
        try:
            hello = parse_hello(secured.payload)
        except VersionMismatch as e:
            self._writeFrame(bytes([AbortReason.VERSION]))
            self._failHandshake(VersionError(f"a peer running another pluresync tried to connect: {e}"))
            return
        except WireError as e:
            self._writeFrame(bytes([AbortReason.MALFORMED]))
            self._failHandshake(HandshakeError(f"handshake failed: {e}"))
            return
        if hello is None:
            self._writeFrame(bytes([AbortReason.VERSION]))
            self._failHandshake(
                VersionError(
                    "a peer running an older pluresync (end-to-end protocol version 1) tried to connect; "
                    "upgrade it to connect to this side"
                )
            )
            return
        self._keys(secured)
        self.hello = hello
        self.answer = self._resolver(hello, secured)
        self._state = _State.CHOOSING
        self.sendRecord(bytes([_READY]) + self.answer.encode())
        if self.answer.status is Status.OK and hello.caps & self.answer.caps & Caps.AESGCM:
            self._switchCipher()
        if self.answer.status is not Status.OK:
            self._state = _State.CLOSED
            self.pipe.close()
            self.secured.errback(Failure(LinkRefused(self.answer)))

    def _confirmFrame(self, body: bytes) -> None:
        if len(body) < SEQ.size + 17:
            self._failHandshake(abort_error(body))
            return
        self._keys(self._handshake.pending())
        try:
            kind, payload = self._open(body)
            if kind != _READY:
                raise HandshakeError("handshake failed: the peer did not confirm")
            answer = parse_ready(payload)
        except RecordError as e:
            self._failHandshake(HandshakeError(f"handshake failed: {e}"))
            return
        except WireError as e:
            self._failHandshake(HandshakeError(f"handshake failed: {e}"))
            return
        except HandshakeError as e:
            self._failHandshake(e)
            return
        if answer is None:
            # A version 1 responder: it would take USE and data as v1
            # records; tell it we are not using this link, as a lost race does.
            self.sendRecord(_CLOSE)
            self._failHandshake(VersionError())
            return
        self.answer = answer
        if answer.status is not Status.OK:
            self._failHandshake(LinkRefused(answer))
            return
        if self.hello is not None and self.hello.caps & answer.caps & Caps.AESGCM:
            self._switchCipher()
        self._state = _State.SECURED
        self.secured.callback(self)

    def _choiceRecord(self, body: bytes) -> None:
        try:
            kind, _ = self._open(body)
        except RecordError as e:
            self._failHandshake(HandshakeError(f"handshake failed: {e}"))
            return
        if kind == RecordType.USE:
            self._state = _State.IN_USE
            self.secured.callback(self)
        elif kind == RecordType.CLOSE:
            self._failHandshake(NotChosenError("the peer chose another path for this connection"))
        else:
            self._failHandshake(HandshakeError("handshake failed: the peer sent records before choosing"))

    def _switchCipher(self) -> None:
        """
        Both offered AES-GCM (caps bit 2, in the authenticated hello and
        READY): every record after READY, both ways, is sealed with it
        (docs/protocol.md, "Record cipher").
        """
        self._send = self._send.switched("AESGCM", _AES_PERSON)
        self._receive = self._receive.switched("AESGCM", _AES_PERSON)

    @property
    def cipher(self) -> str:
        """The record cipher in use now (C{ChaChaPoly} or C{AESGCM})."""
        return self._send.cipher if self._send is not None else "none"

    def _keys(self, secured: Secured) -> None:
        self._send, self._receive = secured.send, secured.receive
        self.peer_static = secured.remote_static
        self.peer_id = format_peer_id(secured.remote_static)
        self.handshake_hash = secured.handshake_hash
        # The handshake is over: let go of its state (its ephemeral private
        # key, and a copy of the transport keys) rather than keep it for the
        # link's life.
        self._handshake = None

    def _failHandshake(self, error: HandshakeError) -> None:
        self._state = _State.CLOSED
        self.pipe.close()
        self.secured.errback(Failure(error))

    def _cancel(self, d: Deferred) -> None:
        self._state = _State.CLOSED
        if self.pipe is not None:
            self.pipe.abort()

    def _open(self, body: bytes) -> tuple[int, bytes]:
        kind, plaintext = self._decrypt(body)
        return kind, plaintext[1:]

    def _decrypt(self, body: bytes) -> tuple[int, bytes]:
        """Open a record: its type and its whole plaintext (sliced once, by whoever needs the rest)."""
        seq, ciphertext = split_record(body)
        if seq != self._receive.nonce:
            raise RecordError(f"record {seq} arrived where {self._receive.nonce} was due")
        try:
            plaintext = self._receive.decrypt(b"", ciphertext)
        except NoiseError:
            raise RecordError("a record failed authentication: the stream was tampered with") from None
        return plaintext[0], plaintext

    def _record(self, body: bytes) -> None:
        try:
            kind, plaintext = self._decrypt(body)
        except RecordError as e:
            self.pipe.abort()
            self._end(Failure(e))
            return
        self._owner.linkRecord(self, kind, plaintext)

    # -- the session side -----------------------------------------------

    def use(self) -> None:
        """
        (initiator) Choose this link: tell the peer (USE).  Its records wait
        until an owner L{adopt}s it.
        """
        assert self._state in (_State.SECURED, _State.CLOSED), self._state
        if self._state is _State.SECURED:
            self._state = _State.IN_USE
            self.sendRecord(_USE)

    def adopt(self, owner) -> None:
        """Deliver this link's records (and its end) to C{owner} from now on."""
        self._owner = owner
        if self._state is _State.CLOSED:
            lost, self._lost = self._lost, None
            self._owner = None
            owner.linkLost(self, lost or Failure(ConnectionDone("the link was closed")))
            return
        self._process()

    def discard(self) -> None:
        """
        (initiator) Drop a secured link that will not be used (it lost a
        race): the peer learns it from an authenticated CLOSE before USE.
        """
        if self._state is _State.SECURED:
            self.sendRecord(_CLOSE)
            self._state = _State.CLOSED
            self.pipe.close()

    def sendRecord(self, plaintext) -> None:
        """Seal one record's plaintext (type byte first) and send it."""
        self.pipe.write(self._seal(plaintext))

    def sendRecords(self, plaintexts) -> None:
        """
        Seal several records, a few per pipe write (one WebSocket message
        each), each write joined once from its records' parts.
        """
        if len(plaintexts) == 1:
            self.pipe.write(self._seal(plaintexts[0]))
            return
        cipher = self._send
        for start in range(0, len(plaintexts), RECORDS_PER_WRITE):
            parts = []
            for plaintext in plaintexts[start : start + RECORDS_PER_WRITE]:
                seq = cipher.nonce
                ciphertext = cipher.encrypt(b"", plaintext)
                parts += (LENGTH.pack(SEQ.size + len(ciphertext)), SEQ.pack(seq), ciphertext)
            self.pipe.write(b"".join(parts))

    def _seal(self, plaintext) -> bytes:
        seq = self._send.nonce
        ciphertext = self._send.encrypt(b"", plaintext)
        return b"".join((LENGTH.pack(SEQ.size + len(ciphertext)), SEQ.pack(seq), ciphertext))

    def _writeFrame(self, body: bytes) -> None:
        self.pipe.write(LENGTH.pack(len(body)) + body)

    def close(self) -> None:
        """End the pipe in an orderly way (after what was written); the owner hears C{linkLost}."""
        if self._state is not _State.CLOSED:
            self.pipe.close()

    def abort(self) -> None:
        """Drop the pipe at once; the owner hears C{linkLost}."""
        if self._state is not _State.CLOSED:
            self.pipe.abort()
