"""
What limits a paired relay socket, whatever carries it (a WebSocket or an
HTTP pipe): the gate on its reads (flow control and rate limits, apart),
the bucket its frames draw from, and the session's duration and byte caps.
"""

from __future__ import annotations

from typing import Any

from pluresync.relay.core.ratelimit import UNLIMITED, SessionBudget, SessionMeter, TokenBucket


class ReadGate:
    """
    Whether one socket's transport is read, for two independent reasons: flow
    control (the partner's send buffer is full) and rate limits (a bucket
    asked this side to wait).  The transport is paused while either holds: a
    flow-control resume never lifts a rate-limit pause, nor the other way
    round.
    """

    __slots__ = ("_transport", "paused", "limited", "_until", "_call")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.paused = False
        self.limited = False
        self._until = 0.0
        self._call: Any = None

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            if not self.limited:
                self._transport.pauseProducing()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.limited:
                self._transport.resumeProducing()

    def limit(self, delay: float, reactor: Any) -> None:
        """Stop reading for C{delay} seconds (extending a pause under way)."""
        until = reactor.seconds() + delay
        if self._call is not None:
            if until > self._until:
                self._until = until
                self._call.reset(delay)
            return
        self._until = until
        self._call = reactor.callLater(delay, self._unlimit)
        self.limited = True
        if not self.paused:
            self._transport.pauseProducing()

    def _unlimit(self) -> None:
        self._call = None
        if self.limited:
            self.limited = False
            if not self.paused:
                self._transport.resumeProducing()

    def release(self) -> None:
        """The pair ended: cancel any rate-limit pause and read again."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self.paused or self.limited:
            self.paused = self.limited = False
            self._transport.resumeProducing()


class PairLimits:
    """
    A paired socket's limits (a mixin: the socket has C{factory}, C{session}
    and C{_read_source()}, what to pause).  Its state lives in class
    attributes until a pair sets it, so an idle socket's dict holds none of it.
    """

    factory: Any
    session: Any
    #: What each forwarded frame draws from (L{pluresync.relay.core.ratelimit}).
    _bucket: Any = UNLIMITED
    _cap_call: Any = None
    _gate: ReadGate | None = None

    def _read_source(self) -> Any:
        raise NotImplementedError

    def _start_limits(self, budget: SessionBudget) -> None:
        """Pairing: set up the read gate, what this side's frames draw from, and the duration cap."""
        factory = self.factory
        rate = factory.limits.rate
        self._gate = ReadGate(self._read_source())
        if rate.session_bytes_per_second or factory.global_bucket is not None or budget.cap:
            bucket = None
            if rate.session_bytes_per_second:
                bucket = TokenBucket(rate.session_bytes_per_second, None, factory.reactor.seconds)
            self._bucket = SessionMeter(bucket, factory.global_bucket, budget)
        if rate.session_seconds:
            self._cap_call = factory.reactor.callLater(rate.session_seconds, self._cap_reached, "duration")

    def _stop_limits(self) -> None:
        self._bucket = UNLIMITED
        if self._cap_call is not None:
            if self._cap_call.active():
                self._cap_call.cancel()
            self._cap_call = None
        if self._gate is not None:
            self._gate.release()

    def _rate_wait(self, delay: float) -> None:
        """A bucket asked this side to wait C{delay} seconds (C{inf}: byte cap reached)."""
        if delay == float("inf"):
            self._cap_reached("bytes")
        elif self._gate is not None:
            self._gate.limit(delay, self.factory.reactor)

    def _cap_reached(self, what: str) -> None:
        """A session cap (C{bytes} or C{duration}) is reached: both sides close with 4029."""
        self._cap_call = None
        self.session.cap_reached(what, self.factory.limits.rate.retry)
