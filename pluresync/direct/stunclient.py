"""
Asking a STUN server which public address a UDP socket is seen from.

The answer is only worth having for the socket that will punch holes: a NAT
maps each socket separately, so a second socket would learn a different
port.  L{StunClient} therefore owns no socket.  The socket's protocol
(the hole-punching one, or L{StunProtocol} when STUN is all a socket does)
offers it each datagram (L{StunClient.datagramReceived} says whether it was
STUN) and gives it a callable to write with.

Retransmission follows RFC 8489 section 6.2.1 over UDP: the request is sent
again after 0.5 s, then after intervals that double, 7 times in all, and
the transaction fails 16 RTOs after the last (39.5 s in all), or at the
caller's deadline if sooner.  Answers are matched by their 96-bit random
transaction id and must come from the address the request went to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from pluresync.direct.stun import (
    BINDING,
    ERROR_CODE,
    MessageClass,
    StunMessage,
    UdpAddress,
    decode,
    decode_error_code,
    encode_binding_request,
    is_stun,
    mapped_address,
    new_transaction_id,
    udp_address,
)
from pluresync.errors import (
    ConfigurationError,
    StunError,
    StunErrorResponse,
    StunFormatError,
    StunTimeoutError,
    StunUnreachableError,
)
from pluresync.interfaces import IDatagramHandler

log = Logger(namespace="pluresync.direct.stunclient")

#: What the owner gives the client to send with: C{send(datagram, (host, port))}.
Send = Callable[[bytes, tuple[str, int]], object]


@dataclass(frozen=True)
class Retransmission:
    """
    When a STUN request is sent again (RFC 8489 section 6.2.1).

    @ivar rto: the first retransmission timeout, in seconds; each next one
        is twice the last.
    @ivar transmissions: how many times a request is sent in all (Rc).
    @ivar final_wait: how many RTOs to wait after the last one (Rm).
    """

    rto: float = 0.5
    transmissions: int = 7
    final_wait: int = 16

    def __post_init__(self) -> None:
        if not self.rto > 0 or self.transmissions < 1 or self.final_wait < 1:
            raise ConfigurationError(f"STUN retransmission needs rto > 0 and counts >= 1, got {self}")

    def times(self) -> tuple[float, ...]:
        """When each transmission goes out, in seconds from the first (0, 0.5, 1.5, 3.5, ...)."""
        return tuple(self.rto * (2**n - 1) for n in range(self.transmissions))

    @property
    def timeout(self) -> float:
        """When an unanswered transaction fails (39.5 s with the defaults)."""
        return self.times()[-1] + self.final_wait * self.rto


class _Transaction:
    """One Binding request in flight."""

    __slots__ = ("transaction_id", "server", "send_to", "request", "deferred", "sent", "started", "deadline", "call")

    def __init__(self, transaction_id: bytes, server: UdpAddress, send_to: tuple[str, int], request: bytes) -> None:
        self.transaction_id = transaction_id
        self.server = server
        self.send_to = send_to
        self.request = request
        self.deferred: Deferred[UdpAddress] | None = None
        self.sent = 0
        self.started = 0.0
        self.deadline: float | None = None
        self.call: IDelayedCall | None = None


@implementer(IDatagramHandler)
class StunClient:
    """
    STUN Binding queries on a socket someone else owns.

    @param clock: the reactor (its C{callLater} and C{seconds}).
    @param send: writes one datagram to C{(host, port)}, e.g. the owning
        port's C{transport.write}; it may raise (the query then fails).
    @param max_pending: queries in flight at most; beyond, L{query} fails
        at once (memory stays bounded whatever the caller does).
    @param fingerprint: send FINGERPRINT in requests (see
        L{pluresync.direct.stun.encode_binding_request}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Send,
        *,
        retransmission: Retransmission = Retransmission(),
        max_pending: int = 16,
        fingerprint: bool = True,
    ) -> None:
        self._clock = clock
        self._send = send
        self._retransmission = retransmission
        self._max_pending = max_pending
        self._fingerprint = fingerprint
        self._pending: dict[bytes, _Transaction] = {}

    @property
    def pending(self) -> int:
        """How many queries are in flight."""
        return len(self._pending)

    def query(self, server: tuple[str, int], *, deadline: float | None = None) -> Deferred[UdpAddress]:
        """
        Ask the STUN server at C{server} (an IP literal and a port; resolve
        names first) for this socket's mapped address.

        @param deadline: seconds after which the query fails even if the
            retransmission schedule is not over (C{None}: 39.5 s, RFC 8489).
        @return: a Deferred firing with the mapped L{UdpAddress}; failing
            with L{StunTimeoutError} (no answer), L{StunUnreachableError} (a
            send failed), L{StunErrorResponse} (the server refused),
            L{StunError} (an answer that cannot be used); cancelling it
            stops the retransmissions.
        """
        try:
            normalised = udp_address(server)
            if normalised.port == 0:
                raise ValueError("port 0")
        except (ValueError, TypeError, IndexError) as error:
            return defer.fail(
                ConfigurationError(f"a STUN server is an IP address and a port, got {server!r} ({error})")
            )
        if deadline is not None and not deadline > 0:
            return defer.fail(ConfigurationError(f"a STUN deadline must be > 0 seconds, got {deadline!r}"))
        if len(self._pending) >= self._max_pending:
            return defer.fail(
                StunError(f"{len(self._pending)} STUN queries already in flight on this socket; wait for one to end")
            )
        transaction_id = new_transaction_id()
        request = encode_binding_request(transaction_id, fingerprint=self._fingerprint)
        tx = _Transaction(transaction_id, normalised, (server[0], server[1]), request)
        tx.deferred = Deferred(lambda d: self._drop(tx))
        tx.started = self._clock.seconds()
        if deadline is not None:
            tx.deadline = tx.started + deadline
        self._pending[transaction_id] = tx
        result = tx.deferred
        self._transmit(tx)
        return result

    def stop(self) -> None:
        """Fail every query in flight (the socket is closing)."""
        for tx in list(self._pending.values()):
            self._finish(tx, StunError(f"the STUN query to {tx.server} stopped: its UDP socket closed"))

    def datagramReceived(self, datagram: bytes, addr: tuple) -> bool:
        """
        Take C{datagram} if it is STUN: an answer to a query in flight ends
        that query; anything else STUN-shaped (malformed, a stranger's
        transaction, a request) is dropped with a debug line.

        @return: whether C{datagram} was STUN (see L{is_stun}).
        """
        if not is_stun(datagram):
            return False
        try:
            message = decode(datagram)
        except StunFormatError as error:
            log.debug("ignored a malformed STUN datagram from {source}: {reason}", source=addr, reason=error.reason)
            return True
        tx = self._pending.get(message.transaction_id)
        if tx is None or message.method != BINDING or message.message_class < MessageClass.SUCCESS:
            log.debug("ignored a STUN message from {source}: not an answer to a query in flight", source=addr)
            return True
        try:
            source = udp_address(addr)
        except (ValueError, TypeError, IndexError):
            return True
        if source != tx.server:
            log.debug("ignored a STUN answer from {source}: it was asked of {server}", source=source, server=tx.server)
            return True
        try:
            result: Any = self._answer(tx, message)
        except StunError as error:
            result = error
        self._finish(tx, result)
        return True

    def _answer(self, tx: _Transaction, message: StunMessage) -> UdpAddress:
        """The mapped address in the server's answer, or the error that explains why there is none."""
        server = tx.server
        if message.unknown_required:
            kinds = ", ".join(f"{kind:#06x}" for kind in message.unknown_required)
            raise StunError(f"the STUN server at {server} answered with attributes this client does not know ({kinds})")
        if message.message_class == MessageClass.ERROR:
            value = message.get(ERROR_CODE)
            if value is None:
                raise StunError(f"the STUN server at {server} answered with an error but no ERROR-CODE")
            try:
                code, reason = decode_error_code(value)
            except StunFormatError as error:
                raise StunError(f"the STUN server at {server} sent a malformed error: {error.reason}") from None
            hint = ""
            if code in (401, 403, 438):
                hint = "; it wants credentials, which STUN for NAT discovery does not use: choose another server"
            raise StunErrorResponse(f"the STUN server at {server} answered error {code} ({reason}){hint}", code, reason)
        try:
            mapped = mapped_address(message)
        except StunFormatError as error:
            raise StunError(f"the STUN server at {server} answered with a malformed address: {error.reason}") from None
        if mapped is None or mapped.port == 0:
            raise StunError(f"the STUN server at {server} answered without a usable mapped address")
        return mapped

    def _transmit(self, tx: _Transaction) -> None:
        tx.call = None
        try:
            self._send(tx.request, tx.send_to)
        except Exception as error:
            self._finish(tx, StunUnreachableError(f"could not send a STUN request to {tx.server}: {error}"))
            return
        if tx.transaction_id not in self._pending:  # answered while sending (a synchronous fake)
            return
        tx.sent += 1
        policy = self._retransmission
        now = self._clock.seconds()
        if tx.sent < policy.transmissions:
            wait, then = policy.rto * 2 ** (tx.sent - 1), self._transmit
        else:
            wait, then = policy.rto * policy.final_wait, self._expire
        if tx.deadline is not None and now + wait >= tx.deadline:
            wait, then = max(0.0, tx.deadline - now), self._expire
        tx.call = self._clock.callLater(wait, then, tx)

    def _expire(self, tx: _Transaction) -> None:
        tx.call = None
        elapsed = self._clock.seconds() - tx.started
        requests = "1 request" if tx.sent == 1 else f"{tx.sent} requests"
        self._finish(
            tx,
            StunTimeoutError(
                f"no answer from the STUN server at {tx.server} to {requests} in {elapsed:g} s: "
                "UDP to it is blocked (a firewall), or the server is down"
            ),
        )

    def _drop(self, tx: _Transaction) -> None:
        """Forget C{tx} and stop its timer (it ended, or its Deferred was cancelled)."""
        self._pending.pop(tx.transaction_id, None)
        if tx.call is not None and tx.call.active():
            tx.call.cancel()
        tx.call = None

    def _finish(self, tx: _Transaction, result: UdpAddress | Exception) -> None:
        self._drop(tx)
        deferred, tx.deferred = tx.deferred, None
        if deferred is None or deferred.called:
            return
        if isinstance(result, Exception):
            deferred.errback(result)
        else:
            deferred.callback(result)


class StunProtocol(DatagramProtocol):
    """
    A UDP socket whose only protocol is STUN (the doctor, tests), and the
    pattern for a socket that carries more: it offers each datagram to its
    L{StunClient} first and hands what is not STUN to C{other}.

    @ivar client: the L{StunClient}, usable once the protocol is listening.
    """

    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        *,
        retransmission: Retransmission = Retransmission(),
        other: Callable[[bytes, tuple], object] | None = None,
    ) -> None:
        self.client = StunClient(clock, self._write, retransmission=retransmission)
        self._other = other

    def _write(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self.transport is None:
            raise StunError("the UDP socket is not open")
        self.transport.write(datagram, addr)

    def datagramReceived(self, datagram: bytes, addr: tuple) -> None:
        if not self.client.datagramReceived(datagram, addr) and self._other is not None:
            self._other(datagram, addr)

    def stopProtocol(self) -> None:
        self.client.stop()
