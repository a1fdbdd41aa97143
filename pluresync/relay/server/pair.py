"""
Two ends of a relay pair, coupled.

Each end is an L{pluresync.interfaces.IPairEnd}: a client's socket on this
relay or a cluster link standing for one on another instance.  Coupling
makes each end the streaming producer of the other's outgoing buffer, so a
slow reader stops the relay reading its writer and TCP pushes back on that
writer, with the relay holding no more than the two sockets' buffers.  The
pair's end (whichever side reports it first) undoes the coupling once,
gives the registry its entry back, and writes the pair's one log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from pluresync.interfaces import IPairEnd
from pluresync.tcpwrite import send_now
from pluresync.wsframes import frame_header

from ..core.pairing import Connector
from ..core.ratelimit import SessionBudget

log = Logger(namespace="pluresync.relay")


class TransportEnd:
    """
    The L{IPairEnd} methods that act on the end's own TCP transport, shared
    by a relay socket and a cluster link: a frame from the other end is
    written with the header a relay writes to a client, unmasked.
    """

    transport: Any

    @property
    def writable(self) -> bool:
        """Whether frames may still be written (the end is open and not closing)."""
        raise NotImplementedError

    def writeData(self, payload: bytes, opcode: int, fin: bool) -> None:
        if self.writable:
            self.transport.writeSequence((frame_header(len(payload), opcode, fin), payload))

    def writeFrames(self, frames: list) -> None:
        """
        Bytes that are already server frames (from L{pluresync.wsframes.FrameForwarder}):
        written as they are, in this reactor turn when nothing waits before
        them (L{pluresync.tcpwrite.send_now}).
        """
        if self.writable:
            send_now(self.transport, frames)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()


class Pair:
    """
    The coupling of two ends, and what they share: the registry entry, the
    session's byte budget and the pair's start time.

    @param connector: the registry's entry for this pair when this instance
        owns the session (it is unpaired when the pair ends), else C{None}.
    """

    def __init__(
        self,
        a: IPairEnd,
        b: IPairEnd,
        *,
        label: str,
        connector: Connector | None,
        unpair: Callable[[Connector], None],
        closed: Callable[[int, int], None],
        budget: SessionBudget,
        seconds: Callable[[], float],
    ) -> None:
        self.a = a
        self.b = b
        self.label = label
        self.budget = budget
        self._connector = connector
        self._unpair = unpair
        self._closed = closed
        self._seconds = seconds
        self._started = seconds()
        self.ended = False
        a.registerProducer(b, True)
        b.registerProducer(a, True)

    def end(self, how: str, by: IPairEnd) -> None:
        """
        The pair is over (C{how}, for the log; C{by}: the end that reports it
        first, the one that ended it): undo the coupling, once.
        """
        if self.ended:
            return
        self.ended = True
        for side in (self.a, self.b):
            side.unregisterProducer()
            side.resumeProducing()
        if self._connector is not None:
            self._unpair(self._connector)
        other = self.other(by)
        self._closed(by.received, other.received)
        log.info(
            "closed {label} ({how}) bytes={sent}/{received} duration={duration:.1f}s",
            label=self.label,
            how=how,
            sent=by.received,
            received=other.received,
            duration=self._seconds() - self._started,
        )

    def other(self, end: Any) -> IPairEnd:
        """The end that is not C{end}."""
        return self.b if end is self.a else self.a
