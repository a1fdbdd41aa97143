"""Transitions: what a module does not declare is ignored, what it declares is kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.trial import unittest

from pluresync.automata import Transitions


class _Inputs(Protocol):
    def go(self) -> None: ...

    def ping(self) -> None: ...


@dataclass
class _Core:
    seen: list[str] = field(default_factory=list)


class TransitionsTests(unittest.TestCase):
    def test_undeclared_inputs_change_nothing(self) -> None:
        builder = TypeMachineBuilder(_Inputs, _Core)
        idle, done = builder.state("idle"), builder.state("done")
        transitions = Transitions(_Inputs)

        @transitions.upon(idle, _Inputs.go).to(done)
        def go(inputs: _Inputs, core: _Core) -> None:
            core.seen.append("go")

        @transitions.upon(done, _Inputs.ping).loop()
        def ping(inputs: _Inputs, core: _Core) -> None:
            core.seen.append("ping")

        transitions.ignore_the_rest((idle, done), ("go", "ping"))
        core = _Core()
        machine = builder.build()(core)
        machine.ping()  # undeclared in idle: ignored
        machine.go()
        machine.go()  # undeclared in done: ignored
        machine.ping()
        self.assertEqual(core.seen, ["go", "ping"])
