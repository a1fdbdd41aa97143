"""
An in-memory L{IPipe} pair for testing the end-to-end layer without sockets.

Bytes written on one side are held until L{MemoryPipe.pump} moves them, so a
test decides exactly when the peer sees them, like iosim's pumps.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyClass

from pluresync.interfaces import IPipe


@implementer(IPipe)
class MemoryPipe:
    """One end of a pair; C{channel} is the receiver it feeds (a L{pluresync.secure.link.Link})."""

    def __init__(self) -> None:
        self.channel = None
        self.other: MemoryPipe | None = None
        self.outgoing: list[bytes] = []
        self.reading = True
        self.producer = None
        self.streaming = None
        self.closed = False
        self.aborted = False
        self.lost: Failure | None = None
        self.tap: list[bytes] = []

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        if not (self.closed or self.aborted):
            self.outgoing.append(data)
            self.tap.append(data)

    def pauseReading(self) -> None:
        self.reading = False

    def resumeReading(self) -> None:
        self.reading = True

    def registerProducer(self, producer, streaming: bool) -> None:
        assert self.producer is None, "a producer is already registered"
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def end(self, reason: Failure) -> None:
        """Deliver the end of the carrier to our channel (once)."""
        if self.lost is None:
            self.lost = reason
            self.channel.pipeLost(reason)


verifyClass(IPipe, MemoryPipe)


def connected_pipes() -> tuple[MemoryPipe, MemoryPipe]:
    a, b = MemoryPipe(), MemoryPipe()
    a.other, b.other = b, a
    return a, b


def pump(a: MemoryPipe, b: MemoryPipe, rounds: int = 50) -> None:
    """
    Move bytes both ways until nothing moves (bounded), honouring paused
    readers, then propagate closes the way a relay does: an orderly close
    reaches the other side as ConnectionDone after the bytes before it.
    """
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            if src.outgoing and dst.reading and dst.lost is None:
                data = b"".join(src.outgoing)
                src.outgoing.clear()
                dst.channel.pipeDataReceived(data)
                moved = True
        if not moved:
            break
    for src, dst in ((a, b), (b, a)):
        if (src.closed or src.aborted) and not src.outgoing:
            reason = Failure(ConnectionDone()) if src.closed and not src.aborted else None
            src.end(Failure(ConnectionDone()))
            if dst.lost is None and not dst.outgoing:
                if reason is None:
                    from pluresync.errors import PeerGoneError

                    dst.end(Failure(PeerGoneError("peer aborted")))
                else:
                    dst.end(reason)
