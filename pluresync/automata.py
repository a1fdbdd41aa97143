"""
Automat machines that declare only the transitions that change something.

A relay socket or a listener registration gets inputs late or out of turn (a
timer that lost a race with a close, an offer for a listener that is going),
and Automat raises for an input a state has no transition for.  L{Transitions}
records the transitions a module declares and then makes every remaining
(state, input) pair a no-op, so what is ignored is derived from what is
declared instead of being listed a second time beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Transitions:
    """The transitions declared on one builder's states, for L{ignore_the_rest}."""

    def __init__(self, inputs: type) -> None:
        self._inputs = inputs
        self._declared: set[tuple[Any, str]] = set()

    def upon(self, state: Any, method: Any) -> Any:
        """C{state.upon(method)}, remembered as declared."""
        self._declared.add((state, method.__name__))
        return state.upon(method)

    def ignore_the_rest(self, states: Iterable[Any], names: Iterable[str]) -> None:
        """
        In each of C{states}, make each input of C{names} that has no declared
        transition change nothing (the inputs must return C{None}).
        """
        names = list(names)
        for state in states:
            for name in names:
                if (state, name) not in self._declared:
                    state.upon(getattr(self._inputs, name)).loop().returns(None)
