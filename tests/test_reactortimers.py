"""Autobahn's timers on an injected reactor, one each or batched."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from pluresync.reactortimers import BatchedTimers, ReactorTimers


class BatchedTimersTests(unittest.TestCase):
    def test_never_early_and_shared(self) -> None:
        """Timers due in one slot share one DelayedCall and fire at the slot's end, not before their time."""
        clock = Clock()
        timers = BatchedTimers(clock, resolution=1.0)
        fired: list[object] = []
        timers.call_later(0.2, fired.append, "a")
        timers.call_later(0.9, fired.append, "b")
        timers.call_later(1.5, lambda *, k: fired.append(k), k="c")
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        clock.advance(0.95)
        self.assertEqual(fired, [])
        clock.advance(0.05)
        self.assertEqual(sorted(fired), ["a", "b"])
        clock.advance(1.0)
        self.assertEqual(fired[-1], "c")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """A slot whose timers are all cancelled leaves no DelayedCall behind; cancelling twice or late is fine."""
        clock = Clock()
        timers = BatchedTimers(clock)
        fired: list[int] = []
        first = timers.call_later(5, fired.append, 1)
        second = timers.call_later(5, fired.append, 2)
        first.cancel()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        second.cancel()
        second.cancel()
        self.assertEqual(clock.getDelayedCalls(), [])
        late = timers.call_later(1, fired.append, 3)
        clock.advance(1)
        late.cancel()
        self.assertEqual(fired, [3])


class ReactorTimersTests(unittest.TestCase):
    def test_one_call_each(self) -> None:
        clock = Clock()
        timers = ReactorTimers(clock)
        fired: list[int] = []
        timer = timers.call_later(2, fired.append, 1)
        clock.advance(2)
        timer.cancel()  # after it ran: no error
        self.assertEqual(fired, [1])
