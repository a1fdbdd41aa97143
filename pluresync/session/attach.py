"""
Where a secured link becomes (part of) a session, and a session the user's
connection: the step after the handshake, on either side.

 - The initiator (L{connect}) chooses a link that won its race, starts a
   session on it and builds the user's protocol; later links for the same
   session come from the C{reconnect} function it is given.
 - The responder (L{SessionTable}) answers each hello: a new session gets a
   new protocol, a resume is matched to the session it names (its peer must
   be the same proven peer) and builds nothing.  One table serves every path
   of a listening port, so a session can come back over any of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pluresync.address import PeerAddress
from pluresync.errors import PluresyncError
from pluresync.secure.handshake import Secured
from pluresync.secure.link import Link
from pluresync.session.params import SessionParams
from pluresync.session.session import Phase, Session, session_id
from pluresync.session.stream import Stream
from pluresync.session.streams import StreamTable
from pluresync.session.wire import AbortReason, Caps, Hello, Intent, ReadyAnswer, Status

#: How many ended sessions a listener remembers, to answer a late resume
#: (a close whose acknowledgement was lost) with how far they got.
MAX_ENDED = 1024


def _first_stream(session: Session, local_id: str, factory=None) -> Stream:
    """
    The session's first stream (id 0): alone, or the first of a table when
    both sides carry many streams (caps bit 3).
    """
    if session.params.streams and session.peer_caps & Caps.STREAMS:
        table = StreamTable(session, local_id, factory)
        stream = Stream(session, 0, local_id, table=table)
        table.add(stream)
        return stream
    return Stream(session, 0, local_id)


def _build(session: Session, factory, local_id: str):
    stream = _first_stream(session, local_id, factory)
    protocol = factory.buildProtocol(stream.getPeer())
    if protocol is None:
        session.abort(why=AbortReason.REFUSED)
        raise _refused()
    stream.attach(protocol)
    return protocol


def _refused() -> PluresyncError:
    return PluresyncError("the protocol factory refused the connection (buildProtocol returned None)")


def connect(
    link: Link,
    factory,
    *,
    clock,
    params: SessionParams,
    local_id: str,
    reconnect: Callable[[Callable[[], Hello]], Deferred] | None,
    on_session: Callable[[Session], object] | None = None,
    until: Callable[[Session], Deferred] | None = None,
):
    """
    (initiator) Choose C{link}, start a new session on it and connect the
    user's protocol.

    @param reconnect: opens another link for this session (through the
        same path, or any of C{auto:}'s); C{None}: the session ends with its
        link.
    @param on_session: called with the new session once it runs (e.g. to
        look for a direct path for it: L{pluresync.direct.upgrade}).
    @param until: builds the user's protocol only once the Deferred it
        returns for the session fires (C{direct:} with C{relay=}: once the
        session runs on a direct path), holding what arrives meanwhile;
        if it fails, the session is aborted and so is the connection.
    @return: the protocol, or with C{until} a Deferred firing with it.
    @raise PluresyncError: the factory refused.
    """
    if until is not None:
        return _connect_later(link, factory, clock, params, local_id, reconnect, on_session, until)
    # The protocol first: if the factory refuses, the link is dropped before
    # USE, so the listener builds nothing for it either.
    protocol = factory.buildProtocol(PeerAddress(link.name, link.peer_id))
    if protocol is None:
        link.discard()
        raise _refused()
    session, stream = _start(link, clock, params, local_id, reconnect, hold=False)
    stream.attach(protocol)
    if on_session is not None:
        on_session(session)
    return protocol


def _start(link: Link, clock, params: SessionParams, local_id: str, reconnect, *, hold: bool):
    """(initiator) Use C{link} for a new session and its stream; with C{hold}, delivery waits for a protocol."""
    link.use()
    session = Session(
        clock,
        initiator=True,
        ident=session_id(link.handshake_hash),
        peer_static=link.peer_static,
        params=params if reconnect is not None else _no_resume(params),
        peer_max=link.answer.max_offset,
        reconnect=reconnect,
    )
    session.peer_caps = link.answer.caps
    stream = _first_stream(session, local_id)
    if hold:
        session.pauseDelivery()  # the peer's bytes wait for the protocol (the credit bounds them)
    session.addLink(link, link.answer.recv_next, link.answer.max_offset)
    return session, stream


def _connect_later(link, factory, clock, params, local_id, reconnect, on_session, until) -> Deferred:
    session, stream = _start(link, clock, params, local_id, reconnect, hold=True)
    if on_session is not None:
        on_session(session)
    return _build_when(session, stream, until(session), factory, local_id)


def _build_when(session: Session, stream: Stream, ready: Deferred, factory, local_id: str) -> Deferred:
    def build(_):
        if session.phase is Phase.ENDED:
            raise session_ended(session)
        protocol = factory.buildProtocol(stream.getPeer())
        if protocol is None:
            session.abort(why=AbortReason.REFUSED)
            raise _refused()
        stream.attach(protocol)
        return protocol

    def failed(failure):
        session.abort(failure)
        return failure

    return ready.addCallbacks(build, failed)


def session_ended(session: Session) -> PluresyncError:
    return PluresyncError(f"the session ended before it could be used ({session.phase.name.lower()})")


def _no_resume(params: SessionParams) -> SessionParams:
    return replace(params, resume=0.0)


@dataclass
class _Ended:
    peer_static: bytes
    answer: ReadyAnswer


class SessionTable:
    """
    A listener's sessions, by id: what a resuming link is matched against.

    @param factory: builds the user's protocol for each new session.
    @param on_session: called with each new session once it runs (e.g. to
        look for a direct path for it: L{pluresync.direct.upgrade}).
    """

    _log = Logger()

    def __init__(
        self,
        clock,
        factory,
        params: SessionParams,
        local_id: str,
        on_session: Callable[[Session], object] | None = None,
        until: Callable[[Session], Deferred] | None = None,
    ) -> None:
        self._clock = clock
        self._on_session = on_session
        self._until = until
        self._factory = factory
        self.params = params
        self._local_id = local_id
        self._sessions: dict[bytes, Session] = {}
        self._ended: OrderedDict[bytes, _Ended] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def resolve(self, hello: Hello, secured: Secured) -> ReadyAnswer:
        """The READY answer to C{hello} from the peer that C{secured} proved."""
        if hello.intent is Intent.NEW:
            return ReadyAnswer(Status.OK, 0, self.params.window, self.params.caps)
        session = self._sessions.get(hello.session_id)
        if session is None:
            ended = self._ended.get(hello.session_id)
            if ended is None:
                return ReadyAnswer(Status.UNKNOWN_SESSION, 0, 0)
            if ended.peer_static != secured.remote_static:
                return ReadyAnswer(Status.NOT_YOURS, 0, 0)
            return ended.answer
        if session.peer_static != secured.remote_static:
            self._log.warn(
                "peer {peer} tried to resume a session of another peer; refused",
                peer=secured.remote_static.hex()[:12],
            )
            return ReadyAnswer(Status.NOT_YOURS, 0, 0)
        return session.answer()

    def accept(self, link: Link):
        """
        (responder) C{link} was chosen by the initiator: start its session
        and build the protocol, or hand it to the session it resumes.

        @return: the new protocol, or C{None} for a resumed session.
        """
        hello = link.hello
        if hello.intent is Intent.RESUME:
            session = self._sessions.get(hello.session_id)
            if session is None or session.peer_static != link.peer_static:
                link.abort()
                return None
            session.addLink(link, hello.recv_next, hello.max_offset)
            return None
        ident = session_id(link.handshake_hash)
        session = Session(
            self._clock,
            initiator=False,
            ident=ident,
            peer_static=link.peer_static,
            params=self.params,
            peer_max=hello.max_offset,
            on_end=self._forget,
        )
        session.peer_caps = hello.caps
        self._sessions[ident] = session
        if self._until is not None:
            stream = _first_stream(session, self._local_id, self._factory)
            session.pauseDelivery()
            session.addLink(link, 0, hello.max_offset)
            if self._on_session is not None:
                self._on_session(session)
            built = _build_when(session, stream, self._until(session), self._factory, self._local_id)
            built.addErrback(self._notBuilt, session)
            return None
        session.addLink(link, 0, hello.max_offset)
        protocol = _build(session, self._factory, self._local_id)
        if self._on_session is not None:
            self._on_session(session)
        return protocol

    def _notBuilt(self, failure, session: Session) -> None:
        self._log.info(
            "session {sid}: not handed to the application: {why}",
            sid=session.ident.hex()[:8],
            why=failure.getErrorMessage(),
        )

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.ident, None)
        self._ended[session.ident] = _Ended(session.peer_static, session.answer())
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
