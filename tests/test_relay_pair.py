"""
Coupling two ends of a relay pair (L{pluresync.relay.server.pair}), and the
cluster link as one of them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from pluresync.interfaces import IPairEnd
from pluresync.relay.cluster.link import LinkClient, LinkServer
from pluresync.relay.core.ratelimit import SessionBudget
from pluresync.relay.server.pair import Pair
from pluresync.relay.server.websocket import RelayProtocol


@implementer(IPairEnd)
class FakeEnd:
    def __init__(self, received: int = 0) -> None:
        self.received = received
        self.producer: Any = None
        self.paused = False
        self.calls: list[str] = []

    def writeData(self, payload: bytes, opcode: int, fin: bool) -> None:
        self.calls.append("write")

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass

    def end(self, code: int, reason: str) -> None:
        self.calls.append(f"end {code}")


class PairTests(unittest.TestCase):
    def test_every_end_provides_the_interface(self) -> None:
        for cls in (RelayProtocol, LinkServer, LinkClient, FakeEnd):
            self.assertTrue(verifyClass(IPairEnd, cls))
        self.assertTrue(verifyObject(IPairEnd, LinkClient(b"s" * 16, Clock(), 1000, "0" * 32)))

    def test_coupling(self) -> None:
        """Each end is the producer of the other's buffer; the end undoes it once, logs and counts once."""
        a, b = FakeEnd(10), FakeEnd(20)
        clock = Clock()
        unpaired: list[Any] = []
        closed: list[tuple[int, int]] = []
        pair = Pair(
            a,
            b,
            label="rdv=x",
            connector="entry",  # type: ignore[arg-type]
            unpair=unpaired.append,
            closed=lambda x, y: closed.append((x, y)),
            budget=SessionBudget(0),
            seconds=clock.seconds,
        )
        self.assertIs(a.producer, b)
        self.assertIs(b.producer, a)
        a.producer.pauseProducing()
        self.assertTrue(b.paused)
        clock.advance(3)
        pair.end("closed 1000", b)
        pair.end("peer-gone", a)
        self.assertEqual((a.producer, b.producer, a.paused, b.paused), (None, None, False, False))
        self.assertEqual(unpaired, ["entry"])
        self.assertEqual(closed, [(20, 10)])
        self.assertIs(pair.other(a), b)
