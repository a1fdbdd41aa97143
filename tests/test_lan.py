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

import asyncio
import hashlib
import ipaddress
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

import zeroconf.asyncio
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.direct.lan import (
    WIND_DOWN_TIMEOUT,
    LanAdvertisement,
    LanDiscovery,
    LoopBridge,
    Mdns,
    advertise,
    discover,
    rank,
)
from pluresync.direct.lanadvert import check_key, lan_key, make_advert, recognise, verify
from pluresync.direct.race import connect_first, connect_lan_pipe
from pluresync.errors import (
    ConnectionTimeoutError,
    DirectPipeLostError,
    LanConnectError,
    LanConnectTimeoutError,
    LanDiscoveryError,
    PluresyncError,
    TruncatedStreamError,
    WrongKeyError,
)
from pluresync.interfaces import IPipe, IPipeReceiver
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.pipes.tcp import (
    DEFAULT_NAME,
    MAX_UNATTACHED_BYTES,
    TCPPipe,
    TCPPipeFactory,
    connect_tcp_pipe,
    listen_tcp_pipes,
)
from pluresync.secure.establish import secure_link
from pluresync.session import wire
from pluresync.session.wire import Hello, Intent, ReadyAnswer, Status

from . import lanlab


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


class ThreadReactor:
    """
    The part of a reactor that zeroconf's thread may touch: callFromThread,
    which only queues; the test runs the queue in its own thread.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def callFromThread(self, function, *args, **kwargs) -> None:
        self.queue.put((function, args, kwargs))

    def runNext(self) -> None:
        """Run the next handed-over call here, waiting (boundedly) for it to arrive."""
        function, args, kwargs = self.queue.get(timeout=10)
        function(*args, **kwargs)


class LoopBridgeTests(SynchronousTestCase):
    """
    The hand-off between zeroconf's thread (here: an asyncio loop in a
    thread, as zeroconf runs it) and the reactor.
    """

    def setUp(self) -> None:
        self.reactor = ThreadReactor()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop")
        self.thread.start()
        self.addCleanup(self.stopLoop)
        self.bridge = LoopBridge(self.reactor, self.loop)

    def stopLoop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def test_result(self) -> None:
        """
        The coroutine runs in the loop's thread; its result reaches the
        Deferred only through callFromThread, in the caller's thread.
        """
        ran_in = []

        async def work(x: int) -> int:
            ran_in.append(threading.get_ident())
            return x * 2

        d = self.bridge.run(work, 21)
        self.assertNoResult(d)
        self.reactor.runNext()
        self.assertEqual(self.successResultOf(d), 42)
        self.assertEqual(ran_in, [self.thread.ident])

    def test_error(self) -> None:
        """The coroutine's exception fails the Deferred."""

        async def broken() -> None:
            raise ValueError("bad record")

        d = self.bridge.run(broken)
        self.reactor.runNext()
        self.assertEqual(str(self.failureResultOf(d, ValueError).value), "bad record")

    def test_cancel(self) -> None:
        """Cancelling the Deferred cancels the coroutine; what its thread then reports is ignored."""
        started, stopped = threading.Event(), threading.Event()

        async def forever() -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()

        d = self.bridge.run(forever)
        self.assertTrue(started.wait(10))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(stopped.wait(10))
        self.reactor.runNext()  # the loop's report of the cancellation: no second result

    def test_forward(self) -> None:
        """A forwarded callable, called in the loop's thread, runs in the reactor's with the same arguments."""
        calls = []
        handler = self.bridge.forward(lambda *args, **kwargs: calls.append((threading.get_ident(), args, kwargs)))
        self.loop.call_soon_threadsafe(lambda: handler("name", state="Added"))
        self.reactor.runNext()
        self.assertEqual(calls, [(threading.get_ident(), ("name",), {"state": "Added"})])

    def test_closed_loop(self) -> None:
        """Work for a loop that has ended fails at once with a LanDiscoveryError."""
        self.stopLoop()
        d = self.bridge.run(asyncio.sleep, 0)
        self.failureResultOf(d, LanDiscoveryError)


class FakeBridge:
    """Records what would run on zeroconf's loop; the test fires each run's Deferred."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, Callable, Deferred]] = []
        self.handler: Callable | None = None
        self.cancelled: list[str] = []

    def run(self, function: Callable, *args) -> Deferred:
        d: Deferred = Deferred(lambda _: self.cancelled.append(function.__name__))
        self.runs.append((function.__name__, function, d))
        return d

    def forward(self, function: Callable) -> Callable:
        self.handler = function
        return function

    def named(self, name: str) -> list[Deferred]:
        return [d for run_name, _, d in self.runs if run_name == name]


class FakeTask:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeZeroconf:
    """What an advertisement asks of Zeroconf on its loop."""

    def __init__(self) -> None:
        self.registered: list = []
        self.announcing = FakeTask()

    async def async_register_service(self, info, cooperating_responders: bool = False) -> FakeTask:
        self.registered.append((info, cooperating_responders))
        return self.announcing


class FakeMdns:
    """An L{Mdns} without zeroconf: nothing leaves the process; closing ends when the test says."""

    def __init__(self) -> None:
        self.bridge = FakeBridge()
        self.zeroconf = FakeZeroconf()
        self.wind_downs: list = []
        self.waiting: list[Deferred] = []

    def start(self, reactor, interfaces) -> FakeMdns:
        return self

    def close(self, wind_down=None) -> Deferred:
        self.wind_downs.append(wind_down)
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d

    def finishClosing(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


class FakeBrowser:
    def __init__(self) -> None:
        self.cancelled = False

    async def async_cancel(self) -> None:
        self.cancelled = True


def advertised(key: bytes, port: int = 5000, addresses=("10.0.0.2",)) -> tuple[str, tuple[int, dict]]:
    """The instance name and the resolved (port, TXT) of an advertisement made with C{key}."""
    advert = make_advert(key, port, list(addresses))
    return advert.instance_name, (port, dict(advert.properties))


class DiscoveryTests(SynchronousTestCase):
    """LanDiscovery's decisions, on a Clock, with zeroconf replaced by a fake."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mdns = FakeMdns()
        self.key = os.urandom(32)

    def discovery(self, timeout: float = 3.0, **kwargs) -> LanDiscovery:
        discovery = LanDiscovery(self.clock, self.key, timeout, start_mdns=self.mdns.start, **kwargs)
        discovery.start()
        [(_, browse, started)] = [run for run in self.mdns.bridge.runs if run[0] == "browse"]
        self.browser = FakeBrowser()
        self.patch(zeroconf.asyncio, "AsyncServiceBrowser", lambda *args, **kwargs: self.browser)
        asyncio.run(browse())
        started.callback(None)
        return discovery

    def seen(self, name: str, state: str = "Added") -> None:
        """zeroconf's thread reports C{name} (the hand-off itself is LoopBridgeTests')."""
        self.mdns.bridge.handler(name, state)

    def resolves(self) -> list[Deferred]:
        return self.mdns.bridge.named("resolve")

    def test_found_at_the_deadline(self) -> None:
        """
        Advertisements of our topic are resolved and checked; at the deadline
        mDNS is stopped, and then the candidates are reported.
        """
        discovery = self.discovery()
        name, resolved = advertised(self.key, 5000, ("10.0.0.2", "192.168.7.2"))
        self.seen(name)
        [resolve] = self.resolves()
        resolve.callback(resolved)
        self.assertNoResult(discovery.result)
        self.clock.advance(3)
        self.assertEqual(len(self.mdns.wind_downs), 1)
        self.assertNoResult(discovery.result)
        self.mdns.finishClosing()
        found = self.successResultOf(discovery.result)
        self.assertEqual(
            sorted(found), sorted([IPv4Address("TCP", "10.0.0.2", 5000), IPv4Address("TCP", "192.168.7.2", 5000)])
        )
        self.successResultOf(discovery.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wind_down_cancels_the_browser(self) -> None:
        """Closing stops the browser on zeroconf's loop (the first step of closing)."""
        discovery = self.discovery(timeout=1)
        self.clock.advance(1)
        [wind_down] = self.mdns.wind_downs
        asyncio.run(wind_down())
        self.assertTrue(self.browser.cancelled)
        self.mdns.finishClosing()
        self.assertEqual(self.successResultOf(discovery.result), [])

    def test_first(self) -> None:
        """With first=True the search ends at the first listener found."""
        discovery = self.discovery(first=True)
        name, resolved = advertised(self.key)
        self.seen(name)
        self.resolves()[0].callback(resolved)
        self.assertEqual(len(self.mdns.wind_downs), 1)
        self.mdns.finishClosing()
        self.assertEqual(self.successResultOf(discovery.result), [IPv4Address("TCP", "10.0.0.2", 5000)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_on_found(self) -> None:
        """on_found hears each listener as soon as it is checked, before the search ends."""
        heard = []
        self.discovery(on_found=heard.append)
        for port in (5000, 5001):
            name, resolved = advertised(self.key, port)
            self.seen(name)
            self.resolves()[-1].callback(resolved)
        self.assertEqual(heard, [[IPv4Address("TCP", "10.0.0.2", 5000)], [IPv4Address("TCP", "10.0.0.2", 5001)]])

    def test_stranger_never_resolved(self) -> None:
        """Another topic's advertisement (or another service's) is dropped from its name alone."""
        discovery = self.discovery()
        self.seen(advertised(os.urandom(32))[0])
        self.seen("Office Printer._pluresync._tcp.local.")
        self.seen(advertised(self.key)[0].replace("_pluresync._tcp", "_http._tcp"))
        self.assertEqual(self.resolves(), [])
        self.clock.advance(3)
        self.mdns.finishClosing()
        self.assertEqual(self.successResultOf(discovery.result), [])

    def test_copy_pointing_elsewhere(self) -> None:
        """Our label with TXT that does not match it (a copy with another address) is ignored."""
        discovery = self.discovery()
        name, (port, properties) = advertised(self.key)
        self.seen(name)
        self.resolves()[0].callback((port, {**properties, b"a": b"10.6.6.6"}))
        self.clock.advance(3)
        self.mdns.finishClosing()
        self.assertEqual(self.successResultOf(discovery.result), [])

    def test_each_advertisement_once(self) -> None:
        """Updates of an advertisement already being resolved start nothing new; removals nothing at all."""
        self.discovery()
        name, _ = advertised(self.key)
        self.seen(name, "Removed")
        self.seen(name)
        self.seen(name, "Updated")
        self.seen(name.upper())
        self.assertEqual(len(self.resolves()), 1)

    def test_bounded(self) -> None:
        """However many of our labels appear (forgeries included), at most max_services are resolved."""
        self.discovery(max_services=4)
        for port in range(5000, 5010):
            self.seen(advertised(self.key, port)[0])
        self.assertEqual(len(self.resolves()), 4)

    def test_unresolved(self) -> None:
        """An advertisement that does not resolve in time, or whose resolution fails, is skipped."""
        discovery = self.discovery()
        for port in (5000, 5001):
            self.seen(advertised(self.key, port)[0])
        first, second = self.resolves()
        first.callback(None)
        second.errback(Failure(RuntimeError("zeroconf trouble")))
        self.clock.advance(3)
        self.mdns.finishClosing()
        self.assertEqual(self.successResultOf(discovery.result), [])

    def test_cancel(self) -> None:
        """
        Cancelling ends the search at once: the caller gets CancelledError,
        resolutions in flight are cancelled, mDNS is stopped (closed fires
        when it has), and no timer is left.
        """
        discovery = self.discovery()
        self.seen(advertised(self.key)[0])
        [resolve] = self.resolves()
        discovery.result.cancel()
        self.failureResultOf(discovery.result, CancelledError)
        self.assertEqual(self.mdns.bridge.cancelled, ["resolve"])
        self.assertEqual(len(self.mdns.wind_downs), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNoResult(discovery.closed)
        self.mdns.finishClosing()
        self.successResultOf(discovery.closed)

    def test_resolution_after_the_end(self) -> None:
        """What zeroconf's thread reports after the search ended changes nothing."""
        discovery = self.discovery(timeout=1)
        name, resolved = advertised(self.key)
        self.clock.advance(1)
        self.seen(name)
        self.assertEqual(self.resolves(), [])
        self.mdns.finishClosing()
        self.assertEqual(self.successResultOf(discovery.result), [])

    def test_browse_fails(self) -> None:
        """If browsing cannot start, the search fails with LanDiscoveryError once mDNS is stopped."""
        discovery = LanDiscovery(self.clock, self.key, 3, start_mdns=self.mdns.start)
        discovery.start()
        [browse] = self.mdns.bridge.named("browse")
        browse.errback(Failure(OSError("no multicast route")))
        self.mdns.finishClosing()
        error = self.failureResultOf(discovery.result, LanDiscoveryError).value
        self.assertIn("no multicast route", str(error))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mdns_cannot_start(self) -> None:
        """If mDNS cannot start, the search fails at once (no thread, nothing to close)."""

        def refuse(reactor, interfaces):
            raise LanDiscoveryError("could not start mDNS on this host's network interfaces: denied")

        discovery = LanDiscovery(self.clock, self.key, 3, start_mdns=refuse)
        self.failureResultOf(discovery.start(), LanDiscoveryError)
        self.successResultOf(discovery.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_key(self) -> None:
        """discover() with something that is not a LAN key fails without quoting it."""
        d = discover(self.clock, b"short key")
        error = self.failureResultOf(d, LanDiscoveryError).value
        self.assertNotIn("short key", str(error))


class RankTests(SynchronousTestCase):
    def test_our_networks_first(self) -> None:
        """Addresses on one of our networks come first; the others keep their advertised order."""
        networks = [ipaddress.IPv4Network("192.168.1.0/24")]
        self.assertEqual(
            rank(["172.17.0.1", "10.8.0.3", "192.168.1.20"], networks), ["192.168.1.20", "172.17.0.1", "10.8.0.3"]
        )
        self.assertEqual(rank(["172.17.0.1", "10.8.0.3"], []), ["172.17.0.1", "10.8.0.3"])


class AdvertisementTests(SynchronousTestCase):
    """LanAdvertisement's life, with zeroconf replaced by a fake."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mdns = FakeMdns()
        self.key = os.urandom(32)

    def advertisement(self, addresses=("10.0.0.2",)) -> LanAdvertisement:
        return LanAdvertisement(self.clock, self.key, 5000, addresses, None, start_mdns=self.mdns.start).start()

    def test_ready_and_stop(self) -> None:
        """ready fires once registered; stop() withdraws it and fires once mDNS has stopped."""
        advertisement = self.advertisement()
        [register] = self.mdns.bridge.named("register")
        self.assertNoResult(advertisement.ready)
        register.callback(None)
        self.assertIs(self.successResultOf(advertisement.ready), advertisement)
        self.assertEqual(advertisement.port, 5000)
        self.assertEqual(advertisement.advert.addresses, ("10.0.0.2",))
        self.assertEqual(
            verify(self.key, advertisement.advert.label, 5000, advertisement.advert.properties), ("10.0.0.2",)
        )
        stopped = advertisement.stop()
        self.assertEqual(len(self.mdns.wind_downs), 1)
        self.assertNoResult(stopped)
        self.mdns.finishClosing()
        self.successResultOf(stopped)

    def test_records(self) -> None:
        """
        What is registered is the advertisement: its name, a host name as
        random as the name, the port, the TXT, the addresses, short TTLs, no
        probing; stopping cancels the announcement's repeats on the loop.
        """
        advertisement = self.advertisement(addresses=("10.0.0.2", "192.168.5.5"))
        [(_, register, registering)] = self.mdns.bridge.runs
        asyncio.run(register())
        [(info, cooperating)] = self.mdns.zeroconf.registered
        advert = advertisement.advert
        self.assertTrue(cooperating)
        self.assertEqual(info.name, advert.instance_name)
        self.assertEqual(info.type, "_pluresync._tcp.local.")
        self.assertEqual(info.server, advert.label + ".local.")
        self.assertEqual(info.port, 5000)
        self.assertEqual(info.properties, advert.properties)
        self.assertEqual(info.parsed_addresses(), ["10.0.0.2", "192.168.5.5"])
        self.assertEqual((info.host_ttl, info.other_ttl), (120, 120))
        registering.callback(None)
        advertisement.stop()
        [wind_down] = self.mdns.wind_downs
        asyncio.run(wind_down())
        self.assertTrue(self.mdns.zeroconf.announcing.cancelled)

    def test_fresh_each_time(self) -> None:
        """Each advertisement of the same port gets its own label."""
        first = self.advertisement()
        second = self.advertisement()
        self.assertNotEqual(first.advert.label, second.advert.label)

    def test_registration_fails(self) -> None:
        """A registration zeroconf refuses fails ready with LanDiscoveryError, and mDNS is stopped."""
        advertisement = self.advertisement()
        [register] = self.mdns.bridge.named("register")
        register.errback(Failure(OSError("no buffer space")))
        error = self.failureResultOf(advertisement.ready, LanDiscoveryError).value
        self.assertIn("no buffer space", str(error))
        self.assertEqual(len(self.mdns.wind_downs), 1)

    def test_stop_before_ready(self) -> None:
        """
        Stopping before the announcement cancels the registration; whoever
        waits on ready hears why (nobody else gets an unhandled error).
        """
        advertisement = self.advertisement()
        waiting = []
        advertisement.ready.addErrback(waiting.append)
        stopped = advertisement.stop()
        self.assertEqual(self.mdns.bridge.cancelled, ["register"])
        [failure] = waiting
        self.assertTrue(failure.check(LanDiscoveryError))
        self.assertIn("stopped before it was announced", failure.getErrorMessage())
        self.mdns.finishClosing()
        self.successResultOf(stopped)

    def test_no_address(self) -> None:
        """A host with nothing but loopback cannot advertise: ready says so, and no mDNS is started."""
        advertisement = self.advertisement(addresses=[])
        error = self.failureResultOf(advertisement.ready, LanDiscoveryError).value
        self.assertIn("no IPv4 address", str(error))
        self.assertEqual(self.mdns.bridge.runs, [])
        self.successResultOf(advertisement.stop())

    def test_bad_arguments(self) -> None:
        """A wrong key or port is the caller's mistake: a ValueError at once."""
        self.assertRaises(ValueError, advertise, self.clock, 5000, b"short")
        self.assertRaises(ValueError, advertise, self.clock, 70000, self.key)


class MissingZeroconfTests(SynchronousTestCase):
    """zeroconf is optional (the pluresync[direct] extra): without it, a clear error."""

    def setUp(self) -> None:
        for name in ("zeroconf", "zeroconf.asyncio"):
            saved = sys.modules.get(name)
            sys.modules[name] = None  # type: ignore[assignment]  # makes `import zeroconf` fail
            self.addCleanup(sys.modules.__setitem__, name, saved) if saved else self.addCleanup(sys.modules.pop, name)

    def test_discover(self) -> None:
        error = self.failureResultOf(discover(Clock(), os.urandom(32)), LanDiscoveryError).value
        self.assertIn("pip install 'pluresync[direct]'", str(error))

    def test_advertise(self) -> None:
        advertisement = advertise(Clock(), 5000, os.urandom(32), addresses=["10.0.0.2"])
        error = self.failureResultOf(advertisement.ready, LanDiscoveryError).value
        self.assertIn("pip install 'pluresync[direct]'", str(error))


class LazyImportTests(SynchronousTestCase):
    def test_zeroconf_loaded_only_when_used(self) -> None:
        """Importing the LAN modules loads no zeroconf (LGPL, optional): only starting discovery does."""
        code = (
            "import sys\n"
            "import pluresync.direct.lan, pluresync.direct.lanadvert, pluresync.direct.race, pluresync.pipes.tcp\n"
            "print(sorted(m for m in ('zeroconf', 'ifaddr') if m in sys.modules))\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"), result.stderr[-2000:])


class RealZeroconfTests(TestCase):
    """
    The real zeroconf, started and closed from the reactor on lo: no
    multicast reaches anyone there, but the thread's life is real.
    """

    timeout = 30

    async def test_one_thread_started_and_joined(self) -> None:
        """
        Advertising starts exactly one thread (zeroconf's); a discovery one
        more; each is joined by the time its stop()/result fires.
        """
        before = set(threading.enumerate())
        advertisement = advertise(reactor, 5000, os.urandom(32), addresses=["192.0.2.1"], interfaces=["127.0.0.1"])
        self.addCleanup(advertisement.stop)
        await advertisement.ready
        self.assertEqual(len(set(threading.enumerate()) - before), 1)
        found = await discover(reactor, os.urandom(32), 0.2, interfaces=["127.0.0.1"])
        self.assertEqual(found, [])
        self.assertEqual(len(set(threading.enumerate()) - before), 1)
        await advertisement.stop()
        self.assertEqual([t for t in set(threading.enumerate()) - before if t.is_alive()], [])


def events(child) -> list[dict]:
    """A lanpeer child's JSON events."""
    return [json.loads(line) for line in child.out.decode().splitlines() if line.startswith("{")]


class NamespaceTests(TestCase):
    """
    Real discovery between hosts on a LAN made of network namespaces
    (tests/lanlab.py), each peer a real process (tests/lanpeer.py).
    """

    timeout = 90

    def setUp(self) -> None:
        reason = lanlab.unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.key = os.urandom(32)

    def env(self, **extra) -> dict:
        return {"LANPEER_KEY": self.key.hex(), "LANPEER_LIMIT": "60", **{k: str(v) for k, v in extra.items()}}

    def assertEnded(self, child, code: int, ended: int) -> None:
        self.assertEqual(ended, code, child.out.decode()[-2000:] + child.err.decode()[-3000:])

    async def test_discover_and_connect(self) -> None:
        """
        A listener advertises in one namespace; a seeker in another finds
        it with no relay, opens a TCP pipe and moves 4 MiB whose sha256 the
        listener confirms; both ends see an orderly close; the listener then
        withdraws its advertisement within a second.
        """
        lab = lanlab.LanLab(self)
        env = self.env(LANPEER_BYTES=4 << 20)
        listener = lab.spawn("a", ["-m", "tests.lanpeer", "listen"], b'"ready"', env)
        await listener.ready
        seeker = lab.spawn("b", ["-m", "tests.lanpeer", "seek"], env=env)
        self.assertEnded(seeker, 0, await seeker.ended)
        self.assertEnded(listener, 0, await listener.ended)
        ready = next(e for e in events(listener) if e["event"] == "ready")
        self.assertEqual(ready["addresses"], [lab.addresses["a"]])
        found = next(e for e in events(seeker) if e["event"] == "found")
        self.assertEqual(found["candidates"], [f"{lab.addresses['a']}:{ready['port']}"])
        self.assertLess(found["seconds"], 5)
        done = next(e for e in events(seeker) if e["event"] == "done")
        self.assertEqual((done["ok"], done["clean"]), (True, True))
        served = next(e for e in events(listener) if e["event"] == "served")
        self.assertEqual((served["bytes"], served["clean"]), (4 << 20, True))
        stopped = next(e for e in events(listener) if e["event"] == "stopped")
        self.assertLess(stopped["seconds"], 1.0)
        # Closing zeroconf from the reactor blocked it for milliseconds at most.
        for child in (listener, seeker):
            closes = [e["text"] for e in events(child) if e["event"] == "log" and "mDNS closed in" in e["text"]]
            self.assertTrue(closes)
            for line in closes:
                self.assertLess(float(line.split()[-2]), 100.0, line)

    async def test_stranger_finds_nothing(self) -> None:
        """A seeker of another topic finds nothing, though a listener advertises right beside it."""
        lab = lanlab.LanLab(self)
        listener = lab.spawn("a", ["-m", "tests.lanpeer", "listen"], b'"ready"', self.env())
        await listener.ready
        stranger = {**self.env(LANPEER_TIMEOUT=1.5), "LANPEER_KEY": os.urandom(32).hex()}
        seeker = lab.spawn("b", ["-m", "tests.lanpeer", "seek"], env=stranger)
        self.assertEnded(seeker, 3, await seeker.ended)
        found = next(e for e in events(seeker) if e["event"] == "found")
        self.assertEqual(found["candidates"], [])

    async def test_what_an_observer_sees(self) -> None:
        """
        A third host takes every mDNS packet off the LAN while a listener
        advertises twice (a restart): it sees two advertisements with
        nothing in common but the address, no host name of the machine, and
        not a byte of the topic or of any key derived from it.
        """
        topic = SyncKey.generate().topic()
        self.key = lan_key(topic)
        lab = lanlab.LanLab(self, hosts=3)
        observer_env = self.env(LANPEER_ADDRESS=lab.addresses["c"], LANPEER_ADVERTS=2, LANPEER_TIMEOUT=20)
        observer = lab.spawn("c", ["-m", "tests.lanpeer", "observe"], b'"observing"', observer_env)
        await observer.ready
        listener = lab.spawn("a", ["-m", "tests.lanpeer", "restart"], env=self.env(LANPEER_ADVERTS=2))
        self.assertEnded(listener, 0, await listener.ended)
        self.assertEnded(observer, 0, await observer.ended)
        seen = events(observer)
        records = [e for e in seen if e["event"] == "record" and e["ttl"] > 0]
        advertised = [e for e in events(listener) if e["event"] == "ready"]
        labels = [e["label"] for e in advertised]
        self.assertEqual(len(set(labels)), 2)
        self.assertNotEqual(labels[0][:32], labels[1][:32])  # fresh salts
        self.assertNotEqual(advertised[0]["port"], advertised[1]["port"])
        self.assertEqual(
            {e["alias"] for e in records if e["kind"] == "DNSPointer"},
            {f"{label}._pluresync._tcp.local." for label in labels},
        )
        for e in records:
            if e["kind"] == "DNSService":
                self.assertEqual(e["server"], e["name"].split(".")[0] + ".local.")
            if e["kind"] == "DNSAddress":
                self.assertEqual(e["address"], lab.addresses["a"])
                self.assertIn(e["name"].split(".")[0], labels)
            if e["kind"] == "DNSText":
                keys = {item.split(b"=")[0] for item in txt_items(bytes.fromhex(e["text"]))}
                self.assertEqual(keys, {b"v", b"a", b"t"})
        packets = b"".join(bytes.fromhex(e["hex"]) for e in seen if e["event"] == "packet")
        self.assertTrue(packets)
        hostname = socket.gethostname().encode().lower()
        for secret in (topic.secret, topic.psk, topic.rendezvous_id, self.key, hostname):
            for form in (secret, secret.hex().encode()):
                self.assertNotIn(form[:8], packets.lower())


def txt_items(text: bytes) -> list[bytes]:
    """The strings of a TXT record's wire form (each one length byte, then the string)."""
    items, offset = [], 0
    while offset < len(text):
        length = text[offset]
        items.append(text[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return items


class HandshakeOverTCPTests(TestCase):
    """
    The end-to-end layer runs over a TCP pipe unchanged: L{secure_link}
    takes the pipe's C{attach} as its C{bind_pipe}.  (How the direct path
    uses it is the direct: endpoint's business; this checks the fit.)
    """

    timeout = 30

    async def handshake(self, listener_key: SyncKey, seeker_key: SyncKey) -> tuple[Deferred, Deferred]:
        """Both sides' secure_link results over a real TCP pipe."""
        hello = lambda: Hello(Intent.NEW, bytes(wire.SESSION_ID_SIZE), 0, 1 << 20)
        accept = lambda hello, secured: ReadyAnswer(Status.OK, 0, 1 << 20)
        responded: Deferred = Deferred()

        def on_pipe(pipe: TCPPipe) -> None:
            self.addCleanup(pipe.abort)
            link = secure_link(
                pipe.attach,
                initiator=False,
                name=pipe.name,
                identity=PeerIdentity.generate(),
                topic=listener_key.topic(),
                resolver=accept,
            )
            link.chainDeferred(responded)

        port = await listen_tcp_pipes(reactor, on_pipe, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pipe = await connect_tcp_pipe(reactor, IPv4Address("TCP", "127.0.0.1", port.getHost().port))
        self.addCleanup(pipe.abort)
        initiated = secure_link(
            pipe.attach,
            initiator=True,
            name=pipe.name,
            identity=PeerIdentity.generate(),
            topic=seeker_key.topic(),
            hello=hello,
        )
        return initiated, responded

    async def test_secured(self) -> None:
        """Peers with one key complete the handshake over TCP, and both links report the LAN path's name."""
        key = SyncKey.generate()
        initiated, responded = await self.handshake(key, key)
        link = await initiated
        link.use()
        other = await responded
        self.assertEqual((link.name, other.name), ("direct:lan", "direct:lan"))
        self.assertEqual(link.handshake_hash, other.handshake_hash)
        link.close()

    async def test_wrong_key(self) -> None:
        """
        A peer without the key (a stranger that copied an advertisement, or
        answered on its address) gets a failed handshake and nothing else.
        """
        initiated, responded = await self.handshake(SyncKey.generate(), SyncKey.generate())
        for d in (initiated, responded):
            with self.assertRaises(WrongKeyError):
                await d


class ClosingZeroconf:
    """What Mdns needs of a Zeroconf: its loop, and close()."""

    loop = None

    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


class MdnsCloseTests(SynchronousTestCase):
    """Closing in two steps: wind down on zeroconf's loop, then close (and join) from the reactor."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.zeroconf = ClosingZeroconf()
        self.mdns = Mdns(self.clock, self.zeroconf)
        self.mdns.bridge = FakeBridge()

    def test_two_steps(self) -> None:
        """Zeroconf is closed only once the wind-down on its loop has finished."""
        closed = self.mdns.close()
        [(name, _, step)] = self.mdns.bridge.runs
        self.assertEqual(self.zeroconf.closes, 0)
        step.callback(None)
        self.assertEqual(self.zeroconf.closes, 1)
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wind_down_stuck(self) -> None:
        """A wind-down that does not finish is given up after a bound, and Zeroconf closed anyway."""
        closed = self.mdns.close()
        self.clock.advance(WIND_DOWN_TIMEOUT)
        self.assertEqual(self.mdns.bridge.cancelled, ["windDown"])
        self.assertEqual(self.zeroconf.closes, 1)
        self.successResultOf(closed)

    def test_close_again(self) -> None:
        """Closing twice closes once; every caller hears when it is done, also after."""
        first, second = self.mdns.close(), self.mdns.close()
        self.assertEqual(len(self.mdns.bridge.runs), 1)
        self.mdns.bridge.runs[0][2].callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(self.mdns.close())
        self.assertEqual(self.zeroconf.closes, 1)
