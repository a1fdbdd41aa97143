"""
The HTTP pipe's upstream machine (pipes/httpupstream.py) on fakes: a fake
Agent that records each request and its body, and a Clock for the probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.errors import RelayLostError
from pluresync.pipes.httpupstream import PIPE_BUFFER, BytesBody, HttpUpstream, StreamingBody


@dataclass
class Request:
    headers: dict
    body: object
    written: list = field(default_factory=list)
    done: Deferred = field(default_factory=Deferred)
    ended: bool = False


class Consumer:
    def __init__(self, request: Request) -> None:
        self.request = request

    def write(self, data: bytes) -> None:
        self.request.written.append(data)


class Response:
    phrase = b"No Content"

    def __init__(self, code: int) -> None:
        self.code = code

    def deliverBody(self, protocol) -> None:
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Records requests; each one's body is produced at once, and answered when the test says."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def request(self, method, url, headers, body):
        request = Request({k: v[0] for k, v in headers.getAllRawHeaders()}, body)
        self.requests.append(request)
        produced = body.startProducing(Consumer(request))
        produced.addCallback(lambda _: setattr(request, "ended", True))
        return request.done

    def answer(self, index: int, code: int = 204) -> None:
        self.requests[index].done.callback(Response(code))


@implementer(IPushProducer)
class Writer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class UpstreamTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        self.failures: list[Exception] = []
        self.upstream = HttpUpstream(
            self.clock, self.agent, b"http://relay/pipe", "T" * 43, 4096, "relay:80", self.failures.append
        )
        self.writer = Writer()
        self.upstream.register_producer(self.writer)
        self.upstream.start(b"probe+hello", probe=1.0)

    def data(self, index: int) -> bytes:
        return b"".join(self.agent.requests[index].written)

    def test_bodies(self) -> None:
        verifyObject(IBodyProducer, BytesBody(b"x"))
        verifyObject(IBodyProducer, StreamingBody(lambda: None, lambda: None))

    def test_streams(self) -> None:
        """The first upstream streams (seq 0); once the probe is answered, frames go into it as they come."""
        [first] = self.agent.requests
        self.assertEqual(first.headers[b"Pluresync-Seq"], b"0")
        self.assertEqual(first.headers[b"Pluresync-Pipe"], b"T" * 43)
        self.upstream.probe_answered()
        self.clock.advance(5)
        self.upstream.send(b"frame")
        self.assertEqual(self.data(0), b"probe+helloframe")
        self.assertEqual(len(self.agent.requests), 1)
        self.assertFalse(first.ended)
        self.upstream.close(b"close")
        self.assertTrue(first.ended)
        self.assertEqual(self.data(0), b"probe+helloframeclose")
        self.upstream.send(b"late")
        self.assertEqual(self.data(0), b"probe+helloframeclose")

    def test_steps_down(self) -> None:
        """
        No pong within the probe bound: the body ends (releasing it from the
        proxy) and, once it is answered, bounded POSTs follow, one at a
        time, in order, numbered on.
        """
        self.upstream.send(b"a")
        self.clock.advance(1.0)
        self.assertTrue(self.agent.requests[0].ended)
        self.assertEqual(self.data(0), b"probe+helloa")
        self.upstream.send(b"b")
        self.upstream.send(b"c")
        self.assertEqual(len(self.agent.requests), 1)  # the first is not answered yet
        self.agent.answer(0)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(self.agent.requests[1].headers[b"Pluresync-Seq"], b"1")
        self.assertEqual(self.data(1), b"bc")
        self.upstream.send(b"d")
        self.agent.answer(1)
        self.assertEqual(self.data(2), b"d")
        self.upstream.close(b"close")
        self.agent.answer(2)
        self.assertEqual(self.data(3), b"close")
        self.assertEqual(self.failures, [])

    def test_bounded_backpressure(self) -> None:
        """While more than a POST's worth (and PIPE_BUFFER) waits, the writer is paused; then resumed."""
        self.clock.advance(1.0)
        chunk = b"x" * 4096
        for _ in range(PIPE_BUFFER // len(chunk) + 1):
            self.upstream.send(chunk)
        self.assertTrue(self.writer.paused)
        # Bounded: each answer sends the next POST of at most max_post bytes.
        for index in range(PIPE_BUFFER // len(chunk) + 2):
            if not self.writer.paused:
                break
            self.agent.answer(index)
        self.assertFalse(self.writer.paused)

    def test_refused_upstream(self) -> None:
        """An upstream answered other than 204 fails the pipe with RelayLostError."""
        self.clock.advance(1.0)
        self.agent.answer(0, 404)
        [error] = self.failures
        self.assertIsInstance(error, RelayLostError)
        self.assertIn("HTTP 404", str(error))

    def test_stop(self) -> None:
        """Stopping cancels the request in flight and the probe timer, and reports nothing."""
        self.upstream.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.agent.requests[0].done.called)
        self.agent.requests[0].done.addErrback(lambda _: None)
        self.assertEqual(self.failures, [])
