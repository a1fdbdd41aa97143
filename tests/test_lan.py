"""
The LAN direct path: the TCP pipe (pluresync/pipes/tcp.py), the race over
candidate addresses (pluresync/direct/race.py), what is advertised
(pluresync/direct/lanadvert.py) and discovery over mDNS
(pluresync/direct/lan.py).

Unit tests run on StringTransport, iosim, a Clock and fakes; the pipe also
runs over real TCP on 127.0.0.1; discovery runs for real between network
namespaces (tests/lanlab.py), because multicast does not work on lo.
"""

from __future__ import annotations

import hashlib
import os
import socket

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.direct.race import connect_first, connect_lan_pipe
from pluresync.errors import (
    ConnectionTimeoutError,
    DirectPipeLostError,
    LanConnectError,
    LanConnectTimeoutError,
    PluresyncError,
    TruncatedStreamError,
)
from pluresync.interfaces import IPipe, IPipeReceiver
from pluresync.pipes.tcp import (
    DEFAULT_NAME,
    MAX_UNATTACHED_BYTES,
    TCPPipe,
    TCPPipeFactory,
    connect_tcp_pipe,
    listen_tcp_pipes,
)


@implementer(IPipeReceiver)
class Receiver:
    """Keeps what a pipe delivers, and checks nothing comes after the end."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: list[Failure] = []
        self.ended: Deferred[Failure] = Deferred()

    @property
    def received(self) -> bytes:
        return b"".join(self.data)

    def pipeDataReceived(self, data: bytes) -> None:
        assert not self.lost, "data after the end"
        self.data.append(data)

    def pipeLost(self, reason: Failure) -> None:
        assert not self.lost, "a second end"
        self.lost.append(reason)
        self.ended.callback(None)


def connected_pipe(clock=None, name: str = DEFAULT_NAME) -> tuple[TCPPipe, StringTransport]:
    pipe = TCPPipe(clock or Clock(), name)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 4000))
    pipe.makeConnection(transport)
    return pipe, transport


class TCPPipeTests(SynchronousTestCase):
    """One pipe on a StringTransport."""

    def test_interface(self) -> None:
        """A TCP pipe provides IPipe, and names its path."""
        pipe, _ = connected_pipe()
        self.assertTrue(verifyObject(IPipe, pipe))
        self.assertEqual(pipe.name, "direct:lan")
        self.assertEqual(connected_pipe(name="direct:lan-test")[0].name, "direct:lan-test")
        self.assertEqual(pipe.peer, IPv4Address("TCP", "10.0.0.2", 4000))

    def test_reads_nothing_until_attached(self) -> None:
        """Reading is paused from the connection until a receiver is attached."""
        pipe, transport = connected_pipe()
        self.assertEqual(transport.producerState, "paused")
        receiver = Receiver()
        self.assertIs(pipe.attach(receiver), pipe)
        self.assertEqual(transport.producerState, "producing")
        pipe.dataReceived(b"abc")
        self.assertEqual(receiver.received, b"abc")

    def test_attach_once(self) -> None:
        """A pipe feeds one receiver."""
        pipe, _ = connected_pipe()
        pipe.attach(Receiver())
        self.assertRaises(RuntimeError, pipe.attach, Receiver())

    def test_early_bytes_on_the_next_turn(self) -> None:
        """
        Bytes that arrived before attach() are delivered on the next reactor
        turn, in order, not from inside attach() (the link is still wiring up).
        """
        clock = Clock()
        pipe, transport = connected_pipe(clock)
        pipe.dataReceived(b"one ")
        pipe.dataReceived(b"two")
        receiver = Receiver()
        pipe.attach(receiver)
        self.assertEqual(receiver.data, [])
        self.assertEqual(transport.producerState, "paused")
        clock.advance(0)
        self.assertEqual(receiver.received, b"one two")
        self.assertEqual(transport.producerState, "producing")

    def test_end_before_attach(self) -> None:
        """An end that came before attach() follows the early bytes, on the next turn."""
        clock = Clock()
        pipe, _ = connected_pipe(clock)
        pipe.dataReceived(b"last words")
        pipe.connectionLost(Failure(ConnectionDone()))
        receiver = Receiver()
        pipe.attach(receiver)
        clock.advance(0)
        self.assertEqual(receiver.received, b"last words")
        [reason] = receiver.lost
        self.assertTrue(reason.check(ConnectionDone))

    def test_end_while_early_bytes_wait(self) -> None:
        """The end waits for the early bytes queued before it."""
        clock = Clock()
        pipe, _ = connected_pipe(clock)
        pipe.dataReceived(b"first")
        receiver = Receiver()
        pipe.attach(receiver)
        pipe.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(receiver.lost, [])
        clock.advance(0)
        self.assertEqual(receiver.received, b"first")
        self.assertEqual(len(receiver.lost), 1)

    def test_too_much_before_attach(self) -> None:
        """A peer that sends more than a handshake's worth before attach() is cut off."""
        clock = Clock()
        pipe, transport = connected_pipe(clock)
        pipe.dataReceived(b"x" * MAX_UNATTACHED_BYTES)
        self.assertFalse(transport.disconnecting)
        pipe.dataReceived(b"x")
        self.assertTrue(transport.disconnected)
        pipe.connectionLost(Failure(ConnectionLost()))
        receiver = Receiver()
        pipe.attach(receiver)
        clock.advance(0)
        self.assertEqual(receiver.data, [])
        [reason] = receiver.lost
        self.assertTrue(reason.check(DirectPipeLostError))
        self.assertIn("sent too much before the handshake", reason.getErrorMessage())

    def test_orderly_end(self) -> None:
        """A FIN from the peer is ConnectionDone, reported once."""
        pipe, _ = connected_pipe()
        receiver = Receiver()
        pipe.attach(receiver)
        pipe.connectionLost(Failure(ConnectionDone()))
        [reason] = receiver.lost
        self.assertTrue(reason.check(ConnectionDone))

    def test_lost(self) -> None:
        """
        Any other end is a DirectPipeLostError: a PluresyncError, and a
        ConnectionLost (never a ConnectionDone) for Twisted code, that names
        the peer's address and what TCP said.
        """
        pipe, _ = connected_pipe()
        receiver = Receiver()
        pipe.attach(receiver)
        pipe.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        [reason] = receiver.lost
        self.assertTrue(reason.check(DirectPipeLostError))
        self.assertIsInstance(reason.value, PluresyncError)
        self.assertIsInstance(reason.value, TruncatedStreamError)
        self.assertIsInstance(reason.value, ConnectionLost)
        self.assertFalse(reason.check(ConnectionDone))
        self.assertIn("10.0.0.2:4000", reason.getErrorMessage())
        self.assertIn("reset", reason.getErrorMessage())

    def test_write(self) -> None:
        """Bytes go onto TCP as they are (the link frames them); none after close()."""
        pipe, transport = connected_pipe()
        pipe.attach(Receiver())
        pipe.write(b"\x00\x05hello")
        self.assertEqual(transport.value(), b"\x00\x05hello")
        pipe.close()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        pipe.write(b"more")
        self.assertEqual(transport.value(), b"\x00\x05hello")

    def test_abort(self) -> None:
        """abort() drops the connection at once."""
        pipe, transport = connected_pipe()
        pipe.attach(Receiver())
        pipe.abort()
        self.assertTrue(transport.disconnected)

    def test_pause_and_resume_reading(self) -> None:
        """pauseReading/resumeReading pause and resume the TCP transport (backpressure towards the peer)."""
        pipe, transport = connected_pipe()
        pipe.attach(Receiver())
        pipe.pauseReading()
        self.assertEqual(transport.producerState, "paused")
        pipe.resumeReading()
        self.assertEqual(transport.producerState, "producing")

    def test_paused_before_attach_stays_paused(self) -> None:
        """A receiver that paused before its pipe was attached is not resumed by attach()."""
        pipe, transport = connected_pipe()
        receiver = Receiver()
        pipe.pauseReading()
        pipe.attach(receiver)
        self.assertEqual(transport.producerState, "paused")
        pipe.resumeReading()
        self.assertEqual(transport.producerState, "producing")

    def test_producer(self) -> None:
        """A producer registered on the pipe is the TCP transport's (throttled by its send buffer)."""
        pipe, transport = connected_pipe()
        producer = object()
        pipe.registerProducer(producer, True)
        self.assertIs(transport.producer, producer)
        self.assertTrue(transport.streaming)
        pipe.unregisterProducer()
        self.assertIsNone(transport.producer)


class TCPPipeFactoryTests(SynchronousTestCase):
    """The accepting side: a connection becomes a pipe handed to a callback."""

    def test_accepted_connection(self) -> None:
        """Each accepted connection is handed over as a connected, paused pipe with the factory's name."""
        pipes: list[TCPPipe] = []
        factory = TCPPipeFactory(Clock(), pipes.append, name="direct:lan-x")
        pipe = factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", 5000))
        transport = StringTransport()
        pipe.makeConnection(transport)
        self.assertEqual(pipes, [pipe])
        self.assertEqual(pipe.name, "direct:lan-x")
        self.assertTrue(verifyObject(IPipe, pipe))
        self.assertEqual(transport.producerState, "paused")

    def test_failing_callback(self) -> None:
        """A callback that raises costs that connection only: it is dropped and the error logged."""

        def broken(pipe: TCPPipe) -> None:
            raise ZeroDivisionError()

        factory = TCPPipeFactory(Clock(), broken)
        pipe = factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", 5000))
        transport = StringTransport()
        pipe.makeConnection(transport)
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class IOPumpTests(SynchronousTestCase):
    """Two pipes joined by iosim's in-memory TCP."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.accepted: list[TCPPipe] = []
        server = TCPPipeFactory(self.clock, self.accepted.append).buildProtocol(None)
        self.client = TCPPipe(self.clock)
        self.pump = iosim.connect(
            server, iosim.makeFakeServer(server), self.client, iosim.makeFakeClient(self.client), clock=self.clock
        )
        [self.server] = self.accepted
        self.server_receiver, self.client_receiver = Receiver(), Receiver()
        self.server.attach(self.server_receiver)
        self.client.attach(self.client_receiver)

    def test_both_ways(self) -> None:
        """Bytes flow both ways, in order."""
        self.client.write(b"ping ")
        self.client.write(b"1")
        self.server.write(b"pong")
        self.pump.flush()
        self.assertEqual(self.server_receiver.received, b"ping 1")
        self.assertEqual(self.client_receiver.received, b"pong")

    def test_close(self) -> None:
        """close() sends what was written first; both ends then see an orderly end."""
        self.client.write(b"bye")
        self.client.close()
        self.pump.flush()
        self.assertEqual(self.server_receiver.received, b"bye")
        self.assertTrue(self.server_receiver.lost[0].check(ConnectionDone))
        self.assertTrue(self.client_receiver.lost[0].check(ConnectionDone))


@implementer(IPushProducer)
class Flood:
    """
    A streaming producer that writes random chunks to a pipe, one per
    reactor turn, while it is not paused, up to C{total} bytes.

    @ivar first_pause: fires with the bytes sent when it is first paused.
    @ivar done: fires once everything was written.
    """

    chunk = 64 * 1024

    def __init__(self, pipe: TCPPipe, total: int) -> None:
        self.pipe = pipe
        self.total = total
        self.sent = 0
        self.hash = hashlib.sha256()
        self.paused = False
        self.first_pause: Deferred[int] = Deferred()
        self.done: Deferred[None] = Deferred()
        self._call = None

    def start(self) -> None:
        self.pipe.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if not self.paused and self._call is None and self.sent < self.total:
            self._call = reactor.callLater(0, self._write)

    def _write(self) -> None:
        self._call = None
        data = os.urandom(min(self.chunk, self.total - self.sent))
        self.hash.update(data)
        self.sent += len(data)
        self.pipe.write(data)
        if self.sent >= self.total:
            self.pipe.unregisterProducer()
            self.done.callback(None)
        else:
            self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        if not self.first_pause.called:
            self.first_pause.callback(self.sent)

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@implementer(IPipeReceiver)
class Counter:
    """Hashes what a pipe delivers; fires C{complete} at C{total} bytes."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.received = 0
        self.hash = hashlib.sha256()
        self.complete: Deferred[None] = Deferred()
        self.lost: list[Failure] = []
        self.ended: Deferred[None] = Deferred()

    def pipeDataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.hash.update(data)
        if self.received >= self.total and not self.complete.called:
            self.complete.callback(None)

    def pipeLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        self.ended.callback(None)


class RealTCPTests(TestCase):
    """Pipes over real TCP connections on 127.0.0.1."""

    timeout = 60

    async def connected(self) -> tuple[TCPPipe, TCPPipe]:
        """A connected (client, server) pair of pipes, not yet attached, closed at cleanup."""
        accepted: Deferred[TCPPipe] = Deferred()
        port = await listen_tcp_pipes(reactor, accepted.callback, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await connect_tcp_pipe(reactor, IPv4Address("TCP", "127.0.0.1", port.getHost().port))
        server = await accepted
        for pipe in (client, server):
            self.addCleanup(pipe.abort)
        return client, server

    async def test_both_ways(self) -> None:
        """1 MiB each way arrives whole, and close() ends both sides in order."""
        client, server = await self.connected()
        self.assertEqual(server.peer.host, "127.0.0.1")
        size = 1 << 20
        at_server, at_client = Counter(size), Counter(size)
        server.attach(at_server)
        client.attach(at_client)
        up, down = os.urandom(size), os.urandom(size)
        client.write(up)
        server.write(down)
        await DeferredList([at_server.complete, at_client.complete], fireOnOneErrback=True)
        self.assertEqual(at_server.hash.digest(), hashlib.sha256(up).digest())
        self.assertEqual(at_client.hash.digest(), hashlib.sha256(down).digest())
        client.close()
        await DeferredList([at_server.ended, at_client.ended], fireOnOneErrback=True)
        self.assertTrue(at_server.lost[0].check(ConnectionDone))
        self.assertTrue(at_client.lost[0].check(ConnectionDone))

    async def test_backpressure(self) -> None:
        """
        A receiver that stops reading stops the sender: its producer is
        paused once the kernel's buffers and TCP's window fill, long before
        it has written everything; once reading resumes, everything arrives.
        """
        client, server = await self.connected()
        total = 32 << 20
        counter = Counter(total)
        server.attach(counter)
        server.pauseReading()
        client.attach(Receiver())
        flood = Flood(client, total)
        flood.start()
        sent = await flood.first_pause
        self.assertLess(sent, total // 2)
        self.assertEqual(counter.received, 0)
        server.resumeReading()
        await DeferredList([flood.done, counter.complete], fireOnOneErrback=True)
        self.assertEqual(counter.hash.digest(), flood.hash.digest())

    async def test_refused(self) -> None:
        """A port nobody listens on is a LanConnectError that names the address."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        with self.assertRaises(LanConnectError) as caught:
            await connect_tcp_pipe(reactor, IPv4Address("TCP", "127.0.0.1", port))
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))


class ConnectCancelTests(SynchronousTestCase):
    def test_cancel(self) -> None:
        """Cancelling a connection attempt gives ConnectingCancelledError and stops the attempt."""
        memory = MemoryReactorClock()
        d = connect_tcp_pipe(memory, IPv4Address("TCP", "10.0.0.9", 7000))
        [(host, port, factory, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("10.0.0.9", 7000, 5.0))
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertTrue(memory.connectors[0].stoppedConnecting)


class Attempts:
    """Fake connection attempts, each a Deferred the test fires; records cancellations."""

    def __init__(self) -> None:
        self.started: dict[str, Deferred] = {}
        self.cancelled: list[str] = []

    def __call__(self, candidate: str) -> Deferred:
        d: Deferred = Deferred(lambda _: self.cancelled.append(candidate))
        self.started[candidate] = d
        return d


class RaceTests(SynchronousTestCase):
    """connect_first: candidates in order with a head start each; the first success wins."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.attempts = Attempts()

    def race(self, candidates=("a", "b", "c"), **kwargs) -> Deferred:
        kwargs.setdefault("stagger", 0.25)
        kwargs.setdefault("timeout", 10.0)
        return connect_first(self.clock, list(candidates), self.attempts, **kwargs)

    def test_head_start(self) -> None:
        """The next candidate starts only when the previous one had its head start."""
        self.race()
        self.assertEqual(list(self.attempts.started), ["a"])
        self.clock.advance(0.2)
        self.assertEqual(list(self.attempts.started), ["a"])
        self.clock.advance(0.05)
        self.assertEqual(list(self.attempts.started), ["a", "b"])

    def test_failure_hands_over_at_once(self) -> None:
        """A refused candidate hands its turn to the next immediately."""
        self.race()
        self.attempts.started["a"].errback(Failure(LanConnectError([("a", "refused")])))
        self.assertEqual(list(self.attempts.started), ["a", "b"])

    def test_first_success_wins(self) -> None:
        """The first success is the result; every attempt still running is cancelled; no timer is left."""
        d = self.race()
        self.clock.advance(0.25)
        self.clock.advance(0.25)
        self.assertEqual(list(self.attempts.started), ["a", "b", "c"])
        self.attempts.started["b"].callback("pipe b")
        self.assertEqual(self.successResultOf(d), "pipe b")
        self.assertEqual(sorted(self.attempts.cancelled), ["a", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_all_fail(self) -> None:
        """When every candidate failed, the error names each and why."""
        d = self.race(candidates=("a", "b"))
        self.attempts.started["a"].errback(Failure(LanConnectError([("a", "Connection refused")])))
        self.attempts.started["b"].errback(Failure(ValueError("no route")))
        error = self.failureResultOf(d, LanConnectError).value
        self.assertEqual(error.attempts, [("a", "Connection refused"), ("b", "no route")])
        self.assertIn("a: Connection refused; b: no route", str(error))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """At the deadline, the running attempts are cancelled and the error says so."""
        d = self.race(candidates=("a", "b"), timeout=3.0)
        self.clock.advance(3.0)
        error = self.failureResultOf(d, LanConnectTimeoutError).value
        self.assertIsInstance(error, ConnectionTimeoutError)
        self.assertEqual(error.attempts, [("a", "no connection within 3 s"), ("b", "no connection within 3 s")])
        self.assertEqual(sorted(self.attempts.cancelled), ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelling the race cancels every attempt and starts no more."""
        d = self.race()
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual(self.attempts.cancelled, ["a"])
        self.clock.advance(10)
        self.assertEqual(list(self.attempts.started), ["a"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_candidates(self) -> None:
        """Nothing to try is an error at once, not a wait."""
        self.failureResultOf(self.race(candidates=()), LanConnectError)

    def test_late_success_discarded(self) -> None:
        """An attempt that succeeds while being cancelled is handed to discard(), not leaked."""
        discarded = []

        def stubborn(candidate: str) -> Deferred:
            d: Deferred = Deferred(lambda d: d.callback(f"late {candidate}"))
            return d

        d = connect_first(self.clock, ["a", "b"], stubborn, stagger=0.25, timeout=10, discard=discarded.append)
        self.clock.advance(0.25)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual(sorted(discarded), ["late a", "late b"])

    def test_attempt_raises(self) -> None:
        """An attempt that raises instead of failing its Deferred counts as a failed candidate."""

        def broken(candidate: str) -> Deferred:
            raise ZeroDivisionError("boom")

        d = connect_first(self.clock, ["a"], broken, stagger=0.25, timeout=10)
        error = self.failureResultOf(d, LanConnectError).value
        self.assertEqual(error.attempts, [("a", "boom")])


class ConnectLanPipeTests(TestCase):
    """connect_lan_pipe over real TCP."""

    timeout = 30

    async def test_dead_address_then_live_one(self) -> None:
        """A refused candidate costs nothing: the next one's pipe wins."""
        accepted: Deferred[TCPPipe] = Deferred()
        port = await listen_tcp_pipes(reactor, accepted.callback, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
        probe.close()
        candidates = [IPv4Address("TCP", "127.0.0.1", dead), IPv4Address("TCP", "127.0.0.1", port.getHost().port)]
        pipe = await connect_lan_pipe(reactor, candidates, stagger=5.0, timeout=10.0)
        self.addCleanup(pipe.abort)
        server = await accepted
        self.addCleanup(server.abort)
        self.assertEqual(pipe.peer.port, port.getHost().port)
        self.assertTrue(verifyObject(IPipe, pipe))

    async def test_nobody(self) -> None:
        """Only dead candidates: one error listing them."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
        probe.close()
        with self.assertRaises(LanConnectError) as caught:
            await connect_lan_pipe(reactor, [IPv4Address("TCP", "127.0.0.1", dead)])
        [(where, why)] = caught.exception.attempts
        self.assertEqual(where, f"127.0.0.1:{dead}")
        self.assertIn("refused", why)
