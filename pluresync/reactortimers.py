"""
Autobahn's timers on an injected reactor.

Autobahn schedules its pings, ping timeouts and handshake timeouts through
the factory's C{_batched_timer}, which batches them on the global reactor;
a cancelled timer also leaves its bucket's DelayedCall behind.  Both break
a program (or a test) that runs on another reactor or on a fake clock, and
trial's clean-reactor check.  Relay and client factories install
L{ReactorTimers} in its place, so every timer runs on the reactor they were
given.  (That hook is Autobahn's private API: see docs/relay.md on the
Autobahn internals pluresync relies on.)
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
