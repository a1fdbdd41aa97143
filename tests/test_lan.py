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

from pluresync.direct.lanadvert import check_key, lan_key, make_advert, recognise, verify
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
from pluresync.keys import SyncKey
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


#: The example of docs/protocol.md ("LAN discovery"): this key, salt, port and addresses...
EXAMPLE_KEY = bytes(range(32))
EXAMPLE_SALT = bytes(range(0x40, 0x50))
EXAMPLE_ADDRESSES = ("192.168.1.20", "10.0.0.7")
#: ...give exactly this advertisement.
EXAMPLE_LABEL = "404142434445464748494a4b4c4d4e4f9106df4c9e2de926"
EXAMPLE_TXT = {b"v": b"1", b"a": b"192.168.1.20,10.0.0.7", b"t": b"02605aba9775c97ede30527d1b83681f"}


class AdvertTests(SynchronousTestCase):
    """What a listener advertises, and who recognises it."""

    def setUp(self) -> None:
        self.key = os.urandom(32)

    def test_example(self) -> None:
        """The example in docs/protocol.md, byte for byte, recomputed from the formulas written there."""
        advert = make_advert(EXAMPLE_KEY, 40123, EXAMPLE_ADDRESSES, salt=EXAMPLE_SALT)
        self.assertEqual(advert.label, EXAMPLE_LABEL)
        self.assertEqual(advert.properties, EXAMPLE_TXT)
        self.assertEqual(list(advert.properties), [b"v", b"a", b"t"])
        self.assertEqual(advert.instance_name, EXAMPLE_LABEL + "._pluresync._tcp.local.")
        self.assertEqual(advert.host_name, EXAMPLE_LABEL + ".local.")
        name_tag = hashlib.blake2b(EXAMPLE_SALT, digest_size=8, key=EXAMPLE_KEY, person=b"pluresync-lan-n").digest()
        self.assertEqual(EXAMPLE_LABEL, (EXAMPLE_SALT + name_tag).hex())
        signed = EXAMPLE_SALT + (40123).to_bytes(2, "big") + b"192.168.1.20,10.0.0.7"
        tag = hashlib.blake2b(signed, digest_size=16, key=EXAMPLE_KEY, person=b"pluresync-lan-a").digest()
        self.assertEqual(EXAMPLE_TXT[b"t"], tag.hex().encode())
        self.assertEqual(verify(EXAMPLE_KEY, EXAMPLE_LABEL, 40123, EXAMPLE_TXT), EXAMPLE_ADDRESSES)

    def test_lan_key(self) -> None:
        """The LAN key is the topic's, with its own personalisation: none of the other names derived from it."""
        topic = SyncKey.generate().topic()
        key = lan_key(topic)
        self.assertEqual(len(key), 32)
        self.assertEqual(key, hashlib.blake2b(topic.secret, digest_size=32, person=b"pluresync-lan").digest())
        self.assertNotIn(key, (topic.secret, topic.psk, topic.rendezvous_id))
        self.assertNotEqual(key, lan_key(SyncKey.generate().topic()))
        self.assertNotEqual(key, lan_key(SyncKey(topic.secret).topic("other")))

    def test_recognised(self) -> None:
        """A holder of the key recognises the label, then the whole advertisement."""
        advert = make_advert(self.key, 5000, ["10.1.2.3"])
        self.assertTrue(recognise(self.key, advert.label))
        self.assertTrue(recognise(self.key, advert.label.upper()))  # DNS names are case-insensitive
        self.assertEqual(verify(self.key, advert.label, 5000, advert.properties), ("10.1.2.3",))

    def test_stranger(self) -> None:
        """Another topic's advertisement is not recognised, from its name alone."""
        advert = make_advert(os.urandom(32), 5000, ["10.1.2.3"])
        self.assertFalse(recognise(self.key, advert.label))
        self.assertIsNone(verify(self.key, advert.label, 5000, advert.properties))

    def test_unlinkable(self) -> None:
        """
        Two advertisements of the same listener (same key, port and
        addresses) share nothing but what they must: the port and the
        addresses; their labels and tags have no byte in common by design
        (and none of the key's).
        """
        first = make_advert(self.key, 5000, ["10.1.2.3"])
        second = make_advert(self.key, 5000, ["10.1.2.3"])
        self.assertNotEqual(first.label, second.label)
        self.assertNotEqual(first.properties[b"t"], second.properties[b"t"])
        self.assertEqual({k: v for k, v in first.properties.items() if k != b"t"}, {b"v": b"1", b"a": b"10.1.2.3"})
        for advert in (first, second):
            everything = advert.label.encode() + b"".join(advert.properties.values())
            self.assertNotIn(self.key.hex().encode()[:16], everything)
        self.assertEqual(len({first.label[:32], second.label[:32]}), 2)  # fresh salts

    def test_copied_to_another_address(self) -> None:
        """
        An observer that re-advertises someone's label and tag with its own
        address or port is ignored: the tag binds both.
        """
        advert = make_advert(self.key, 5000, ["10.1.2.3"])
        moved = {**advert.properties, b"a": b"10.6.6.6"}
        self.assertIsNone(verify(self.key, advert.label, 5000, moved))
        added = {**advert.properties, b"a": b"10.1.2.3,10.6.6.6"}
        self.assertIsNone(verify(self.key, advert.label, 5000, added))
        self.assertIsNone(verify(self.key, advert.label, 5001, advert.properties))
        other_salt = make_advert(self.key, 5000, ["10.1.2.3"]).label
        self.assertIsNone(verify(self.key, other_salt, 5000, advert.properties))

    def test_malformed(self) -> None:
        """Anything malformed is ignored, never an exception."""
        advert = make_advert(self.key, 5000, ["10.1.2.3"])
        label, properties = advert.label, advert.properties
        for bad_label in ("", label[:-1], label + "0", "z" + label[1:], "My Printer"):
            self.assertFalse(recognise(self.key, bad_label), bad_label)
        for change in (
            {b"v": b"2"},
            {b"v": None},
            {b"t": b"zz" * 16},
            {b"t": properties[b"t"][:-2]},
            {b"t": None},
            {b"a": None},
            {b"a": b""},
            {b"a": b"\xff"},
        ):
            self.assertIsNone(verify(self.key, label, 5000, {**properties, **change}), change)
        self.assertIsNone(verify(self.key, label, 0, properties))

    def test_key_holder_lying(self) -> None:
        """Even a correctly tagged advertisement is refused if it points at loopback, multicast or too many places."""
        for addresses in (b"127.0.0.1", b"224.0.0.251", b"0.0.0.0", b"255.255.255.255", b"10.0.0.1,010.0.0.2"):
            listed = addresses
            salt = os.urandom(16)
            name_tag = hashlib.blake2b(salt, digest_size=8, key=self.key, person=b"pluresync-lan-n").digest()
            signed = salt + (5000).to_bytes(2, "big") + listed
            tag = hashlib.blake2b(signed, digest_size=16, key=self.key, person=b"pluresync-lan-a").digest()
            properties = {b"v": b"1", b"a": listed, b"t": tag.hex().encode()}
            self.assertIsNone(verify(self.key, (salt + name_tag).hex(), 5000, properties), addresses)

    def test_what_may_be_advertised(self) -> None:
        """make_advert refuses what no peer could use, and keeps at most 8 addresses."""
        self.assertRaises(ValueError, make_advert, self.key, 5000, ["127.0.0.1"])
        self.assertRaises(ValueError, make_advert, self.key, 5000, [])
        self.assertRaises(ValueError, make_advert, self.key, 0, ["10.0.0.1"])
        self.assertRaises(ValueError, make_advert, self.key[:16], 5000, ["10.0.0.1"])
        many = [f"10.0.0.{n}" for n in range(1, 12)]
        advert = make_advert(self.key, 5000, many + ["10.0.0.1"])
        self.assertEqual(advert.addresses, tuple(many[:8]))
        self.assertEqual(verify(self.key, advert.label, 5000, advert.properties), tuple(many[:8]))

    def test_key_errors_do_not_quote_the_key(self) -> None:
        """A wrong-sized key is refused without showing it."""
        short = os.urandom(16)
        with self.assertRaises(ValueError) as caught:
            check_key(short)
        self.assertNotIn(short.hex(), str(caught.exception))
        self.assertNotIn(repr(short), str(caught.exception))
