"""
A session's life, as an Automat machine: whether a link carries it, and how
it ends.

::

    attached --last link gone--> detached --a link again--> attached
        |                           | resume limit passed
        |                           v
        +------ended (unclean) --> ended <--flushed-- flushing
        +------ended (clean) ------------------------>   ^
    detached --ended (clean)-------------------------------+

A clean end (the close confirmed both ways) waits in C{flushing} until its
links' pipes have sent what was written, so C{connectionLost} never comes
before the last bytes left the process; an unclean one ends at once.
Whether the session is closing is not a state here: a session can be
closing while attached or detached, and the numbered CLOSE record in its
resend queue is what tells (L{pluresync.session.session.Session}).

The machine's core is the session itself; its outputs are the session's
own methods, and the session reads its C{phase} (set by them) wherever the
data path needs to know.  Inputs are fed only from outside any output (the
session checks C{phase} first, and defers reconnecting to the next turn),
so no input re-enters the machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from automat import TypeMachineBuilder
from twisted.python.failure import Failure

from pluresync.automata import Transitions

if TYPE_CHECKING:
    from pluresync.session.session import Session


class LifeInputs(Protocol):
    """Everything that changes a session's life."""

    def attach(self) -> None:
        "A link carries the session (its first, or one after a loss)."

    def detach(self) -> None:
        "The last usable link went away; the session may come back."

    def expire(self) -> None:
        "No link came back within the resume limit."

    def finish(self, reason: Failure) -> None:
        "A clean end (C{reason} is C{ConnectionDone}): flush the links, then report it."

    def stop(self, reason: Failure, tell: object) -> None:
        "An end reported at once (an error, an abort, or a clean end with no link to flush)."

    def flushed(self) -> None:
        "Every link's pipe closed (or the wait for them ran out) after a clean end."


_life = TypeMachineBuilder(LifeInputs, object)
DETACHED = _life.state("detached")  # the first state: a session starts without a link
ATTACHED = _life.state("attached")
FLUSHING = _life.state("flushing")
ENDED = _life.state("ended")
_transitions = Transitions(LifeInputs)
_on = _transitions.upon


@_on(DETACHED, LifeInputs.attach).to(ATTACHED)
def _attached(inputs: LifeInputs, session: Session) -> None:
    session.lifeAttached()


@_on(ATTACHED, LifeInputs.detach).to(DETACHED)
def _detached(inputs: LifeInputs, session: Session) -> None:
    session.lifeDetached()


@_on(DETACHED, LifeInputs.expire).to(ENDED)
def _expired(inputs: LifeInputs, session: Session) -> None:
    session.lifeExpired()


@_on(ATTACHED, LifeInputs.finish).to(FLUSHING)
@_on(DETACHED, LifeInputs.finish).to(FLUSHING)
def _finishing(inputs: LifeInputs, session: Session, reason: Failure) -> None:
    session.lifeFlush(reason)


@_on(ATTACHED, LifeInputs.stop).to(ENDED)
@_on(DETACHED, LifeInputs.stop).to(ENDED)
def _stopped(inputs: LifeInputs, session: Session, reason: Failure, tell: object) -> None:
    session.lifeStop(reason, tell)


@_on(FLUSHING, LifeInputs.flushed).to(ENDED)
def _flushed(inputs: LifeInputs, session: Session) -> None:
    session.lifeReport()


# A link that arrives as the session ends, a timer that lost a race with the
# end, a second end: nothing changes.
_transitions.ignore_the_rest(
    (ATTACHED, DETACHED, FLUSHING, ENDED),
    ("attach", "detach", "expire", "finish", "stop", "flushed"),
)

LifeMachine = _life.build()
