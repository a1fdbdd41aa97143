"""
L{pluresync.tcpwrite.send_now} over real loopback TCP: at once when the
transport's buffer is empty, after it otherwise, and the rest of a partial
send handed to Twisted (with its flow control).  These also hold Twisted to
the state it reads (C{dataBuffer}, C{offset}, C{_tempDataLen},
C{_writeDisconnected}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Connection
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from pluresync.tcpwrite import MAX_PIECES, send_now


class Collect(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.received = 0
        self.waiting: tuple[int, Deferred] | None = None
        self.made: Deferred[Collect] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)
        self.received += len(data)
        if self.waiting is not None and self.received >= self.waiting[0]:
            d, self.waiting = self.waiting[1], None
            d.callback(b"".join(self.data))

    def until(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        self.waiting = (count, d)
        self.dataReceived(b"")
        return d.addTimeout(10, reactor)


@implementer(IPushProducer)
class Producer:
    paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class SendNowTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = Collect()
        self.port = reactor.listenTCP(0, Factory.forProtocol(lambda: self.server), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = Collect()
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), self.client)
        yield self.server.made
        self.transport = self.client.transport
        self.assertIsInstance(self.transport, Connection)

    def tearDown(self) -> Any:
        self.server.transport.abortConnection()
        self.transport.abortConnection()

    def assertEmpty(self) -> None:
        t = self.transport
        self.assertEqual((t._tempDataLen, t.offset, len(t.dataBuffer)), (0, 0, 0))

    @inlineCallbacks
    def test_at_once(self) -> Any:
        """With nothing buffered, the pieces leave in this turn: Twisted's buffer stays empty."""
        self.assertEmpty()
        send_now(self.transport, [b"head", b"", b"payload"])
        self.assertEmpty()
        self.assertFalse(self.transport._writeDisconnected)
        got = yield self.server.until(11)
        self.assertEqual(got, b"headpayload")

    @inlineCallbacks
    def test_after_what_waits(self) -> Any:
        """Bytes Twisted holds go first: the pieces are appended to its buffer."""
        self.transport.write(b"first ")
        self.assertEqual(self.transport._tempDataLen, 6)
        send_now(self.transport, [b"second"])
        self.assertEqual(self.transport._tempDataLen, 12)
        got = yield self.server.until(12)
        self.assertEqual(got, b"first second")

    @inlineCallbacks
    def test_partial(self) -> Any:
        """
        What the socket does not take goes to Twisted's buffer, which pauses
        a registered producer past bufferSize; everything arrives in order.
        """
        producer = Producer()
        self.transport.registerProducer(producer, True)
        self.server.transport.pauseProducing()  # the peer stops reading
        pieces = [os.urandom(1 << 20) for _ in range(16)] + [b"end"]
        send_now(self.transport, pieces)
        self.assertGreater(self.transport._tempDataLen, 0)
        self.assertEqual(producer.paused, 1)
        self.server.transport.resumeProducing()
        got = yield self.server.until(16 * (1 << 20) + 3)
        self.assertEqual(got, b"".join(pieces))

    @inlineCallbacks
    def test_many_pieces(self) -> Any:
        """More pieces than one sendmsg may carry are joined first."""
        pieces = [bytes([i % 256]) for i in range(3 * MAX_PIECES)]
        send_now(self.transport, pieces)
        got = yield self.server.until(len(pieces))
        self.assertEqual(got, b"".join(pieces))


class OtherTransportTests(unittest.SynchronousTestCase):
    def test_write_sequence(self) -> None:
        """Anything but a TCP connection (TLS, wrappers, test transports) gets writeSequence."""
        transport = StringTransport()
        send_now(transport, [b"a", b"b"])
        self.assertEqual(transport.value(), b"ab")
