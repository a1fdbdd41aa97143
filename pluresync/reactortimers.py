"""
Autobahn's timers on an injected reactor.

Autobahn schedules its pings, ping timeouts and handshake timeouts through
the factory's C{_batched_timer}, which batches them on the global reactor;
a cancelled timer also leaves its bucket's DelayedCall behind.  Both break
a program (or a test) that runs on another reactor or on a fake clock, and
trial's clean-reactor check.  Relay and client factories install
L{ReactorTimers} in its place, so every timer runs on the reactor they were
given: L{ReactorTimers} one DelayedCall each (a client has few sockets),
L{BatchedTimers} sharing them (a relay has many).  (That hook is
Autobahn's private API: see docs/relay.md on the Autobahn internals
pluresync relies on.)
"""

from __future__ import annotations

from typing import Any


class Timer:
    """A cancellable call that tolerates being cancelled after it ran."""

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class ReactorTimers:
    """The shape of Autobahn's batched timer, one DelayedCall per timer on C{reactor}."""

    __slots__ = ("_reactor",)

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> Timer:
        return Timer(self._reactor.callLater(delay, func, *args, **kwargs))


class _Batched:
    """One timer of a L{BatchedTimers}: a slot in its bucket."""

    __slots__ = ("_timers", "_bucket", "_func", "_args", "_kwargs")

    def __init__(self, timers: BatchedTimers, bucket: float, func: Any, args: tuple, kwargs: dict | None) -> None:
        self._timers = timers
        self._bucket = bucket
        self._func = func
        self._args = args
        self._kwargs = kwargs

    def cancel(self) -> None:
        if self._func is not None:
            self._func = None
            self._timers.forget(self._bucket, self)

    def fire(self) -> None:
        func, self._func = self._func, None
        if func is not None:
            func(*self._args, **(self._kwargs or {}))


class BatchedTimers:
    """
    The shape of Autobahn's batched timer on C{reactor}: timers due in the
    same C{resolution}-second slot share one DelayedCall, and a slot whose
    timers are all cancelled cancels its DelayedCall.

    A relay holds a ping timer for each of tens of thousands of idle sockets;
    one DelayedCall each would cost about 0.7 KiB a socket.  Timers fire up
    to C{resolution} seconds late, never early (pings and handshake timeouts
    do not need more).
    """

    __slots__ = ("_reactor", "_resolution", "_buckets")

    def __init__(self, reactor: Any, resolution: float = 1.0) -> None:
        self._reactor = reactor
        self._resolution = resolution
        self._buckets: dict[float, tuple[Any, set[_Batched]]] = {}

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Batched:
        now = self._reactor.seconds()
        slots = -(-(now + delay) // self._resolution)  # rounded up: never early
        bucket = slots * self._resolution
        timer = _Batched(self, bucket, func, args, kwargs or None)
        entry = self._buckets.get(bucket)
        if entry is None:
            call = self._reactor.callLater(max(0.0, bucket - now), self._fire, bucket)
            entry = self._buckets[bucket] = (call, set())
        entry[1].add(timer)
        return timer

    def forget(self, bucket: float, timer: _Batched) -> None:
        """A timer of C{bucket} was cancelled; the bucket's call goes with its last timer."""
        entry = self._buckets.get(bucket)
        if entry is None:
            return
        entry[1].discard(timer)
        if not entry[1]:
            del self._buckets[bucket]
            entry[0].cancel()

    def _fire(self, bucket: float) -> None:
        _, timers = self._buckets.pop(bucket)
        for timer in list(timers):
            timer.fire()
