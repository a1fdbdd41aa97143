"""
Moving a session that runs over a relay to a direct path, and back.

The seed's flow: peers meet through a relay (phase 1), upgrade to a direct
path with the relay dropped (phase 2), and fall back to the relay when the
direct path fails (phase 3).  Here that is one more kind of move under the
session the user holds (L{pluresync.session}): the session already knows
how to take a new link while the old one still carries (make before
break), to retire the drained relay link, and, when a link dies, to come
back over its reconnect paths (the relays).  What this module adds is how a
direct link comes to be:

 1. the initiator opens a UDP socket, learns how its NAT maps it (STUN, if
    servers are configured: C{pluresync.direct.nat}), makes an ephemeral
    QUIC certificate and half of a punch key, and sends all that as a
    DIRECT_OFFER inside the session (L{pluresync.direct.signal});
 2. the responder does the same and answers (DIRECT_ANSWER), or says why
    not (DIRECT_FAILED);
 3. both punch (L{pluresync.direct.punch}) with the key made of both halves;
 4. on the punched path the initiator opens QUIC to the responder, each
    pinning the certificate the other announced (L{pluresync.pipes.quic});
 5. over that pipe the usual end-to-end handshake runs, resuming this
    session (the same proof of identity as any other resumed link), and
    the session moves to it.

A failed attempt leaves the session where it was (on the relay) and is
retried later, with a growing delay; so is a direct link that dies after
the session fell back.  Each outcome is logged once, without secrets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.direct.signal import (
    Candidate,
    CandidateKind,
    DirectOffer,
    FailReason,
    NatClass,
    decode_failed,
    decode_offer,
    encode_failed,
    punch_key,
)
from pluresync.errors import DirectPathError, PluresyncError
from pluresync.keys import PeerIdentity, Topic
from pluresync.pipes.quic import QuicParams
from pluresync.session.session import IControlReceiver, Phase, Session
from pluresync.session.wire import AbortReason, Caps, ControlKind, Intent, ReadyAnswer, Status, WireError

#: The path name a direct link reports (peers' addresses, logs, stats).
PATH_NAME = "direct:udp"


@dataclass(frozen=True)
class DirectParams:
    """
    How a session looks for a direct path.

    @ivar stun: STUN servers (C{(host, port)}), for the public address and
        the NAT class: the relay host's C{--udp-port} N and N+1, or public
        ones; none: only this host's own addresses are offered (a LAN, or
        no NAT in between).
    @ivar interface: the address the UDP socket binds (all by default).
    @ivar hosts: this host's addresses to offer (C{None}: every non-loopback
        IPv4 address of its interfaces).
    @ivar first: seconds after a session starts before its first attempt
        (its first bytes go over the relay meanwhile).
    @ivar retry: seconds before another attempt after one failed or a
        direct link was lost; it doubles each time, up to C{max_retry}.
    @ivar timeout: the longest one attempt may take, signals to moved session.
    @ivar punch: the hole punch's own limit.
    @ivar stun_deadline: the longest the NAT check may take.
    """

    stun: tuple[tuple[str, int], ...] = ()
    interface: str = ""
    hosts: tuple[str, ...] | None = None
    first: float = 1.0
    retry: float = 30.0
    max_retry: float = 600.0
    timeout: float = 20.0
    punch: float = 10.0
    stun_deadline: float = 3.0
    quic: QuicParams = field(default_factory=QuicParams)
    #: the session is only for a direct path (C{direct:} with C{relay=}):
    #: the initiator's first failed attempt fails L{DirectUpgrade.whenDirect}
    #: (and so the connection) instead of leaving it on the relay
    required: bool = False


class _Refused(DirectPathError):
    """The peer said DIRECT_FAILED: nothing to tell it back."""


_REASONS = {
    "both-symmetric": FailReason.BOTH_SYMMETRIC,
    "udp-blocked": FailReason.NO_UDP,
    "no-answer": FailReason.PUNCH_TIMEOUT,
    "one-way": FailReason.PUNCH_TIMEOUT,
    "unreachable": FailReason.PUNCH_TIMEOUT,
    "no-candidates": FailReason.PUNCH_TIMEOUT,
    "certificate": FailReason.HANDSHAKE,
    "quic-handshake": FailReason.HANDSHAKE,
}
_REASON_WORDS = {
    FailReason.DISABLED: "the peer has direct paths turned off",
    FailReason.NO_UDP: "the peer has no UDP",
    FailReason.BOTH_SYMMETRIC: "both NATs are symmetric",
    FailReason.PUNCH_TIMEOUT: "no probe came through in time",
    FailReason.HANDSHAKE: "the direct handshake failed",
    FailReason.BUSY: "the peer was busy with another attempt",
}


def _pass_on(result, waiter: Deferred):
    waiter.callback(None)
    return result


def _local_hosts() -> list[str]:
    from pluresync.direct.lan import local_addresses

    return local_addresses()


class _Attempt:
    """One attempt's resources, released together whatever the outcome."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.port = None  # the UDP listening port
        self.socket = None  # its UDPSocket
        self.stun = None
        self.punch = None
        self.offer: DirectOffer | None = None
        self.certificate = None
        self.answer: Deferred[DirectOffer] | None = None
        self.extra_ports: list = []  # a birthday socket that won, adopted
        self.pipe = None  # the QUIC pipe, once it carries the session
        self.refused: str | None = None  # why the peer gave up (DIRECT_FAILED after its answer)

    def datagram(self, data: bytes, addr) -> None:
        if self.stun is not None and self.stun.datagramReceived(data, addr):
            return
        if self.punch is not None:
            self.punch.datagramReceived(data, addr)

    def release(self) -> Deferred:
        """Stop everything; fires once the sockets are closed."""
        if self.pipe is not None:
            self.pipe.stop()
        if self.punch is not None:
            self.punch.stop()
        if self.stun is not None:
            self.stun.stop()
        closing = [port.stopListening() for port in [self.port, *self.extra_ports] if port is not None]
        self.port = None
        self.extra_ports = []
        return DeferredList([d for d in closing if d is not None])


@implementer(IControlReceiver)
class DirectUpgrade:
    """
    Looks for a direct path for one session, for as long as it lives.

    @param session: the session (it hears our CONTROL signals through us:
        we become its C{signals}).
    @param identity: our identity, and C{topic}: the session's topic, for
        the end-to-end handshake over the direct pipe.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        session: Session,
        params: DirectParams,
        *,
        identity: PeerIdentity,
        topic: Topic,
        hosts: Callable[[], Sequence[str]] = _local_hosts,
    ) -> None:
        self._reactor = reactor
        self._session = session
        self._params = params
        self._identity = identity
        self._topic = topic
        self._hosts = hosts
        self._attempts = 0
        self._current: _Attempt | None = None
        self._running: Deferred | None = None
        self._retry = params.retry
        self._call = None
        self._stopped = False
        self._live: list[_Attempt] = []  # attempts whose direct pipe carries (or carried) the session
        self._waiters: list[Deferred] = []
        self._stopping: Deferred | None = None
        self.successes = 0
        self.failures = 0
        self.last_error: str | None = None
        session.signals = self
        session.whenEnded().addBoth(self._sessionEnded)
        if session.initiator:
            self._later(params.first)

    def whenDirect(self) -> Deferred:
        """
        Fires once a direct path carries the session; fails when the session
        ends first, or (C{required}, initiator) when the first attempt fails.
        """
        if self.successes:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d

    def _tell(self, failure: Failure | None) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)

    @property
    def _sid(self) -> str:
        return self._session.ident.hex()[:8]

    # -- when to try -------------------------------------------------------------------

    def _later(self, delay: float) -> None:
        if self._stopped:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._reactor.callLater(delay, self._due)

    def _due(self) -> None:
        self._call = None
        session = self._session
        if self._stopped or self._running is not None:
            return
        if not session.peer_caps & Caps.DIRECT:
            self._log.debug("session {sid}: the peer does not take direct paths", sid=self._sid)
            return
        if session.phase is not Phase.ATTACHED or (session.path or "").startswith("direct:"):
            self._later(self._params.retry)  # look again later: moving, or direct already
            return
        self._attempts += 1
        self._run(Deferred.fromCoroutine(self._initiate(self._attempts)))

    def _run(self, d: Deferred) -> None:
        self._running = d
        timeout = self._reactor.callLater(self._params.timeout, d.cancel)

        def done(result):
            if timeout.active():
                timeout.cancel()
            self._running = None
            self._finished(result)

        d.addBoth(done)

    def _finished(self, result) -> None:
        attempt, self._current = self._current, None
        if isinstance(result, Failure):
            if attempt is not None:
                attempt.release()
            self.failures += 1
            # The peer's DIRECT_FAILED cancels our side of the attempt: its
            # reason is the truth, not the cancellation it caused.
            refused = attempt.refused if attempt is not None else None
            self.last_error = refused if refused is not None else self._words(result)
            if self._params.required and self._session.initiator and not self.successes:
                self._tell(Failure(DirectPathError(f"no direct path to the peer: {self.last_error}", "failed")))
                return
            if not self._stopped:
                self._log.info(
                    "session {sid}: no direct path ({why}); staying on {path}",
                    sid=self._sid,
                    why=self.last_error,
                    path=self._session.path,
                )
                if self._session.initiator:
                    self._later(self._retry)
                    self._retry = min(self._retry * 2, self._params.max_retry)
            return
        self.successes += 1
        self.last_error = None
        self._tell(None)
        self._retry = self._params.retry
        pipe = result
        if attempt is not None:
            # The socket lives as long as the direct pipe; once it is gone
            # (the session moved back to a relay), look again later.
            self._live.append(attempt)
            pipe.finished.addBoth(lambda _: self._directEnded(attempt))

    def _directEnded(self, attempt: _Attempt) -> None:
        if attempt in self._live:
            self._live.remove(attempt)
        attempt.release()
        if not self._stopped and self._session.initiator:
            self._log.info("session {sid}: the direct path ended; trying again later", sid=self._sid)
            self._later(self._retry)

    def _words(self, failure: Failure) -> str:
        if failure.check(CancelledError, ConnectingCancelledError, TimeoutError):
            return f"gave up after {self._params.timeout:g} s"
        return failure.getErrorMessage()

    def _sessionEnded(self, result):
        self._tell(Failure(DirectPathError("the session ended before a direct path carried it", "ended")))
        self.stop()
        return result

    def stop(self) -> Deferred:
        """Stop looking and let go of everything (the session ended); fires once the sockets are closed."""
        if self._stopping is None:
            self._stopping = self._stop()
        # Each caller gets a Deferred of its own: its callbacks cannot change what another caller sees.
        waiter: Deferred = Deferred()
        self._stopping.addBoth(_pass_on, waiter)
        return waiter

    def _stop(self) -> Deferred:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        # Ours to release (and to wait for), not the cancelled attempt's callback's.
        current, self._current = self._current, None
        if self._running is not None:
            self._running.cancel()
        releasing = [attempt.release() for attempt in [current, *self._live] if attempt is not None]
        self._live = []
        if self._session.signals is self:
            self._session.signals = None
        return DeferredList(releasing)

    # -- signals ---------------------------------------------------------------------

    def controlReceived(self, kind: int, body: bytes) -> None:
        try:
            if kind == ControlKind.DIRECT_OFFER and not self._session.initiator:
                self._offered(decode_offer(body))
            elif kind == ControlKind.DIRECT_ANSWER and self._session.initiator:
                answer = decode_offer(body)
                current = self._current
                if current is not None and current.answer is not None and answer.attempt == current.number:
                    d, current.answer = current.answer, None
                    d.callback(answer)
            elif kind == ControlKind.DIRECT_FAILED:
                attempt, reason = decode_failed(body)
                current = self._current
                if current is not None and attempt == current.number and self._running is not None:
                    why = _REASON_WORDS.get(reason, "the peer gave up")
                    if current.answer is not None:
                        d, current.answer = current.answer, None
                        d.errback(Failure(_Refused(why, "refused")))
                    else:
                        current.refused = why
                        self._running.cancel()
        except WireError as e:
            self._session.abort(
                Failure(PluresyncError(f"the peer broke the session protocol: {e}")), why=AbortReason.PROTOCOL
            )

    def _offered(self, offer: DirectOffer) -> None:
        if self._stopped:
            self._session.sendControl(ControlKind.DIRECT_FAILED, encode_failed(offer.attempt, FailReason.DISABLED))
            return
        if self._running is not None:
            if self._current is not None and self._current.number == offer.attempt:
                return  # the same offer again
            # The initiator started over (it gave up on the last one): so do we.
            self._running.cancel()
        self._run(Deferred.fromCoroutine(self._respond(offer)))

    # -- one attempt ------------------------------------------------------------------

    async def _prepare(self, number: int) -> _Attempt:
        from pluresync.direct.nat import classify_nat
        from pluresync.direct.stunclient import StunClient
        from pluresync.pipes.quiccert import QuicCertificate
        from pluresync.pipes.udp import UDPSocket

        attempt = _Attempt(number)
        self._current = attempt
        params = self._params
        attempt.socket = UDPSocket(other=attempt.datagram)
        attempt.port = self._reactor.listenUDP(0, attempt.socket, interface=params.interface)
        local = attempt.port.getHost()
        nat = NatClass.UNKNOWN
        candidates = []
        if params.hosts is not None:
            hosts = list(params.hosts)
        elif params.interface and params.interface not in ("0.0.0.0", "::"):
            hosts = [params.interface]  # bound to one address: the only one it can be reached on
        else:
            hosts = list(self._hosts())
        for host in hosts:
            candidates.append(Candidate(CandidateKind.HOST, host, local.port))
        if params.stun:
            attempt.stun = StunClient(self._reactor, self._sender(attempt))
            report = await classify_nat(
                self._reactor,
                attempt.stun,
                list(params.stun),
                (local.host, local.port),
                deadline=params.stun_deadline,
                local_hosts=hosts or None,
            )
            nat = NatClass.named(report.nat)
            mapped = report.mapped
            if mapped is not None and not any(c.host == mapped.host and c.port == mapped.port for c in candidates):
                candidates.append(Candidate(CandidateKind.REFLEXIVE, mapped.host, mapped.port))
        attempt.certificate = QuicCertificate.generate()
        attempt.offer = DirectOffer(number, nat, attempt.certificate.fingerprint, os.urandom(32), tuple(candidates))
        return attempt

    @staticmethod
    def _sender(attempt: _Attempt):
        def send(data: bytes, addr) -> None:
            attempt.socket.sendDatagrams([(data, (addr[0], addr[1]))])

        return send

    async def _initiate(self, number: int):
        from pluresync.pipes import quic
        from pluresync.secure.establish import secure_link

        session = self._session
        attempt = await self._prepare(number)
        attempt.answer = Deferred()
        if not session.sendControl(ControlKind.DIRECT_OFFER, attempt.offer.encode()):
            raise DirectPathError("the session has no link to signal through", "no-link")
        answer = await attempt.answer
        pipe = await self._punchAndConnect(attempt, answer, initiator=True, connect=quic.connect)
        link = await secure_link(
            pipe.attach,
            initiator=True,
            name=PATH_NAME,
            identity=self._identity,
            topic=self._topic,
            expected_peer=session.peer_static,
            hello=session.resume_hello,
        )
        if session.phase is Phase.ENDED or self._stopped:
            link.discard()
            raise CancelledError()
        link.use()
        session.addLink(link, link.answer.recv_next, link.answer.max_offset)
        return pipe

    async def _respond(self, offer: DirectOffer):
        from pluresync.pipes import quic
        from pluresync.secure.establish import secure_link

        session = self._session
        try:
            attempt = await self._prepare(offer.attempt)
        except Exception:
            session.sendControl(ControlKind.DIRECT_FAILED, encode_failed(offer.attempt, FailReason.NO_UDP))
            raise
        session.sendControl(ControlKind.DIRECT_ANSWER, attempt.offer.encode())
        try:
            pipe = await self._punchAndConnect(attempt, offer, initiator=False, connect=quic.accept)
        except DirectPathError as e:
            session.sendControl(
                ControlKind.DIRECT_FAILED, encode_failed(offer.attempt, _REASONS.get(e.reason, FailReason.HANDSHAKE))
            )
            raise
        link = await secure_link(
            pipe.attach,
            initiator=False,
            name=PATH_NAME,
            identity=self._identity,
            topic=self._topic,
            resolver=self._resolve,
        )
        if session.phase is Phase.ENDED or self._stopped:
            link.abort()
            raise CancelledError()
        session.addLink(link, link.hello.recv_next, link.hello.max_offset)
        return pipe

    async def _punchAndConnect(self, attempt: _Attempt, peer: DirectOffer, *, initiator: bool, connect):
        from pluresync.direct.punch import HolePunch
        from pluresync.pipes.udp import UDPSocket

        mine = attempt.offer
        key = punch_key(mine, peer) if initiator else punch_key(peer, mine)
        attempt.punch = HolePunch(
            self._reactor,
            attempt.port.getHandle(),
            key,
            initiator=initiator,
            local_nat=mine.nat,
            peer_nat=peer.nat,
            candidates=peer.candidates,
            timeout=self._params.punch,
        )
        path = await attempt.punch.start()
        socket = attempt.socket
        if path.new_socket:
            # A birthday socket won: it is ours now; read it like the first.
            socket = UDPSocket(other=attempt.datagram)
            port = self._reactor.adoptDatagramPort(path.socket.fileno(), path.socket.family, socket)
            path.socket.close()  # the reactor holds its own duplicate
            attempt.extra_ports.append(port)
        self._log.debug(
            "session {sid}: punched to the peer ({strategy}, {ms:.0f} ms)",
            sid=self._sid,
            strategy=path.strategy,
            ms=path.seconds * 1000,
        )
        pipe = await connect(
            self._reactor,
            socket,
            path.peer,
            certificate=attempt.certificate,
            peer_fingerprint=peer.fingerprint,
            params=self._params.quic,
        )
        attempt.pipe = pipe  # from here a failed attempt stops it too
        return pipe

    def _resolve(self, hello, secured) -> ReadyAnswer:
        """(responder) a link on the direct pipe may only resume this session, from its peer."""
        session = self._session
        if (
            hello.intent is Intent.RESUME
            and hello.session_id == session.ident
            and secured.remote_static == session.peer_static
        ):
            return session.answer()
        return ReadyAnswer(Status.NOT_YOURS, 0, 0)
