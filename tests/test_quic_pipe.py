"""
The QUIC pipe (pluresync/pipes/quic.py) over real UDP sockets on 127.0.0.1.

Every test runs on the real reactor, as the other loopback tests do, and
waits on Deferreds (the pipes' C{ready}, C{finished}, and what the receivers
and producers report), never on a clock; each is bounded by trial's
C{timeout}, and every loop by a count.
"""

from __future__ import annotations

import errno
import hashlib
import os
import ssl
import struct

from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.events import HandshakeCompleted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.errors import (
    CertificateMismatchError,
    ConfigurationError,
    DirectPathError,
    DirectPipeLostError,
    PluresyncError,
)
from pluresync.interfaces import IDatagramReceiver, IDatagramSocket, IPipe, IPipeReceiver
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.pipes import quic
from pluresync.pipes.quic import QuicParams, QuicPipe, initial_destination_cid
from pluresync.pipes.quiccert import QuicCertificate, fingerprint_of, proof_message, verify_proof
from pluresync.pipes.udp import UDPSocket, is_quic
from pluresync.secure.establish import secure_link
from pluresync.secure.link import ILinkOwner
from pluresync.session import wire
from pluresync.session.wire import Hello, Intent, ReadyAnswer, Status

MIB = 1024 * 1024
#: Short enough that the failure tests end quickly, long enough for a loaded CI machine.
FAST = QuicParams(handshake_timeout=5.0, idle_timeout=5.0, close_timeout=5.0)


@implementer(IPipeReceiver)
class Receiver:
    """Counts and hashes what a pipe delivers; C{ended} fires with the one loss reason."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.losses: list[Failure] = []
        self.ended: Deferred[list[Failure]] = Deferred()
        self.waiting: list[tuple[int, Deferred[None]]] = []

    def pipeDataReceived(self, data: bytes) -> None:
        assert not self.losses, "data after pipeLost"
        self.received += len(data)
        self.digest.update(data)
        for entry in list(self.waiting):
            if self.received >= entry[0]:
                self.waiting.remove(entry)
                entry[1].callback(None)

    def pipeLost(self, reason: Failure) -> None:
        self.losses.append(reason)
        if not self.ended.called:
            self.ended.callback([reason])

    async def loss(self) -> Failure:
        """The reason of the pipe's end, once it has ended."""
        [reason] = await self.ended
        return reason

    def until(self, count: int) -> Deferred[None]:
        """Fires once C{count} bytes in all have been delivered."""
        d: Deferred[None] = Deferred()
        if self.received >= count:
            d.callback(None)
        else:
            self.waiting.append((count, d))
        return d


class Writer:
    """
    A streaming producer that writes C{size} bytes of a fixed pattern to a
    pipe, 64 KiB a write, honouring pause; C{paused} fires at its first pause.
    """

    CHUNK = os.urandom(64 * 1024)

    def __init__(self, pipe: QuicPipe, size: int, close: bool = False) -> None:
        self.pipe = pipe
        self.left = size
        self.close = close
        self.digest = hashlib.sha256()
        self.is_paused = False
        self.paused: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()
        pipe.registerProducer(self, True)

    def pauseProducing(self) -> None:
        self.is_paused = True
        if not self.paused.called:
            self.paused.callback(None)

    def resumeProducing(self) -> None:
        self.is_paused = False
        self.produce()

    def stopProducing(self) -> None:
        self.left = 0

    def produce(self) -> None:
        for _ in range(100_000):  # bounded: 64 KiB a round
            if self.is_paused or self.left <= 0:
                break
            data = self.CHUNK[: min(len(self.CHUNK), self.left)]
            self.left -= len(data)
            self.digest.update(data)
            self.pipe.write(data)
        if self.left <= 0 and not self.done.called:
            self.pipe.unregisterProducer()
            if self.close:
                self.pipe.close()
            self.done.callback(None)


async def turns(count: int) -> None:
    """Let the reactor run C{count} turns (no clock involved)."""
    for _ in range(count):
        await deferLater(reactor, 0, lambda: None)


class WatchedSocket(UDPSocket):
    """
    A UDPSocket that checks conditions each time its pipe sends (at the end
    of each of the pipe's turns, once its state is updated): what a test
    waits for, without a clock.
    """

    def __init__(self) -> None:
        super().__init__()
        self.watches: list[tuple[object, Deferred[None]]] = []

    def when(self, condition) -> Deferred[None]:
        """Fires once C{condition()} holds after one of this socket's sends."""
        d: Deferred[None] = Deferred()
        self.watches.append((condition, d))
        return d

    def sendDatagrams(self, datagrams) -> None:
        super().sendDatagrams(datagrams)
        for entry in list(self.watches):
            if entry[0]():
                self.watches.remove(entry)
                entry[1].callback(None)


class Loopback:
    """Two UDP sockets on 127.0.0.1 and a certificate for each side."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.client_socket, self.server_socket = WatchedSocket(), WatchedSocket()
        self.client_port = self.listen(self.client_socket)
        self.server_port = self.listen(self.server_socket)
        self.client_cert, self.server_cert = QuicCertificate.generate(), QuicCertificate.generate()
        self.pipes: list[QuicPipe] = []

    def listen(self, socket: UDPSocket):
        port = reactor.listenUDP(0, socket, interface="127.0.0.1", maxPacketSize=65535)
        self.test.addCleanup(port.stopListening)
        return port

    @staticmethod
    def address(port) -> tuple[str, int]:
        return ("127.0.0.1", port.getHost().port)

    def start(
        self,
        *,
        client_pin: bytes | None = None,
        server_pin: bytes | None = None,
        client_params: QuicParams = FAST,
        server_params: QuicParams = FAST,
    ) -> tuple[Deferred[QuicPipe], Deferred[QuicPipe]]:
        """Start the server's accept and the client's connect: their Deferreds."""
        accepting = quic.accept(
            reactor,
            self.server_socket,
            self.address(self.client_port),
            certificate=self.server_cert,
            peer_fingerprint=server_pin or self.client_cert.fingerprint,
            params=server_params,
        )
        connecting = quic.connect(
            reactor,
            self.client_socket,
            self.address(self.server_port),
            certificate=self.client_cert,
            peer_fingerprint=client_pin or self.server_cert.fingerprint,
            params=client_params,
        )
        for d in (accepting, connecting):
            d.addCallback(self.keep)
        return connecting, accepting

    def keep(self, pipe: QuicPipe) -> QuicPipe:
        """Every pipe is gone (aborted if need be) before the sockets close."""
        self.pipes.append(pipe)

        def gone():
            pipe.abort()
            return pipe.finished

        self.test.addCleanup(gone)
        return pipe

    async def open(self, **kwargs) -> tuple[QuicPipe, QuicPipe, Receiver, Receiver]:
        """An open pair (client, server), each with a receiver attached."""
        connecting, accepting = self.start(**kwargs)
        client, server = await connecting, await accepting
        client_receiver, server_receiver = Receiver(), Receiver()
        client.attach(client_receiver)
        server.attach(server_receiver)
        return client, server, client_receiver, server_receiver


def lost(reason: Failure, kind: type[BaseException]) -> BaseException:
    """The exception a loss reason carries, checked for its type."""
    assert reason.check(kind), f"expected {kind.__name__}, got {reason.value!r}"
    return reason.value


class TransferTests(TestCase):
    timeout = 90

    async def test_64_mib_both_ways(self):
        """The handshake, then 64 MiB each way at once, sha256 equal, then an orderly close."""
        net = Loopback(self)
        client, server, at_client, at_server = await net.open()
        verifyObject(IPipe, client)
        verifyObject(IDatagramReceiver, server)
        up = Writer(client, 64 * MIB)
        down = Writer(server, 64 * MIB)
        up.produce()
        down.produce()
        await DeferredList([at_server.until(64 * MIB), at_client.until(64 * MIB)], fireOnOneErrback=True)
        self.assertEqual(at_server.digest.hexdigest(), up.digest.hexdigest())
        self.assertEqual(at_client.digest.hexdigest(), down.digest.hexdigest())
        client.close()
        lost(await at_server.loss(), ConnectionDone)
        lost(await at_client.loss(), ConnectionDone)
        await DeferredList([client.finished, server.finished])
        self.assertEqual((len(at_client.losses), len(at_server.losses)), (1, 1))
        self.assertEqual((at_client.received, at_server.received), (64 * MIB, 64 * MIB))
        # Credit and the send bound held all along.
        for pipe in (client, server):
            self.assertLessEqual(pipe.inbox_peak, FAST.window)
            self.assertLessEqual(pipe.backlog_peak, FAST.send_buffer + len(Writer.CHUNK))

    async def test_link_handshake_over_quic(self):
        """The end-to-end layer runs over the pipe unchanged: a Noise handshake, a record, a clean end."""
        net = Loopback(self)
        connecting, accepting = net.start()
        client, server = await connecting, await accepting
        key = SyncKey.generate()
        initiator_id, responder_id = PeerIdentity.generate(), PeerIdentity.generate()
        window = 1 << 20
        initiating = secure_link(
            client.attach,
            initiator=True,
            name="direct:quic",
            identity=initiator_id,
            topic=key.topic("t"),
            hello=lambda: Hello(Intent.NEW, bytes(wire.SESSION_ID_SIZE), 0, window),
        )
        responding = secure_link(
            server.attach,
            initiator=False,
            name="direct:quic",
            identity=responder_id,
            topic=key.topic("t"),
            resolver=lambda hello, secured: ReadyAnswer(Status.OK, 0, window),
        )
        link = await initiating
        self.assertEqual(link.peer_id, responder_id.peer_id)
        link.use()
        peer_link = await responding
        self.assertEqual(peer_link.peer_id, initiator_id.peer_id)

        @implementer(ILinkOwner)
        class Owner:
            def __init__(self):
                self.records, self.lost = [], Deferred()

            def linkRecord(self, link, kind, plaintext):
                self.records.append(plaintext)

            def linkLost(self, link, reason):
                self.lost.callback([reason])

        owner, peer_owner = Owner(), Owner()
        link.adopt(owner)
        peer_link.adopt(peer_owner)
        link.sendRecord(b"\x10hello over quic")
        link.close()
        [reason] = await peer_owner.lost
        reason.trap(ConnectionDone)
        self.assertEqual(peer_owner.records, [b"\x10hello over quic"])
        [reason] = await owner.lost
        reason.trap(ConnectionDone)


class FlowControlTests(TestCase):
    timeout = 90

    async def test_paused_reader_bounds_memory(self):
        """
        A reader that stops holds the writer through credit: the reader
        buffers at most its window, the writer at most its send buffer (plus
        one write), its producer stays paused; 64 MiB arrive intact once the
        reader resumes.
        """
        net = Loopback(self)
        params = QuicParams(window=1 * MIB, send_buffer=256 * 1024, handshake_timeout=5.0)
        client, server, _, at_server = await net.open(client_params=params, server_params=params)
        server.pauseReading()
        writer = Writer(client, 64 * MIB)
        writer.produce()
        await writer.paused
        # The writer is held once the reader holds the whole window (the
        # reader acknowledges what filled it).
        await net.server_socket.when(lambda: server.inbox_peak >= params.window)
        self.assertEqual(server.inbox_peak, params.window)
        written = 64 * MIB - writer.left
        await turns(50)
        self.assertTrue(writer.is_paused)
        self.assertEqual(64 * MIB - writer.left, written, "the producer wrote on while paused")
        self.assertEqual((at_server.received, server.inbox_peak), (0, params.window))
        self.assertLessEqual(client.backlog_peak, params.send_buffer + len(Writer.CHUNK))
        server.resumeReading()
        await at_server.until(64 * MIB)
        self.assertEqual(at_server.digest.hexdigest(), writer.digest.hexdigest())
        self.assertLessEqual(server.inbox_peak, params.window)
        self.assertLessEqual(client.backlog_peak, params.send_buffer + len(Writer.CHUNK))

    async def test_unattached_pipe_holds_within_credit(self):
        """Bytes that arrive before a receiver is attached wait for it, within the window."""
        net = Loopback(self)
        connecting, accepting = net.start()
        client, server = await connecting, await accepting
        writer = Writer(client, 8 * MIB)
        writer.produce()
        await writer.paused
        receiver = Receiver()
        server.attach(receiver)
        await receiver.until(8 * MIB)
        self.assertEqual(receiver.digest.hexdigest(), writer.digest.hexdigest())
        self.assertLessEqual(server.inbox_peak, FAST.window)


class PinningTests(TestCase):
    timeout = 60

    async def assertBothFail(self, connecting, accepting) -> tuple[BaseException, BaseException]:
        results = await DeferredList([connecting, accepting], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [False, False], "a side opened a pipe")
        return tuple(lost(failure, CertificateMismatchError) for _, failure in results)

    async def test_wrong_server_certificate(self):
        """The client refuses a server whose certificate is not the pinned one; the server hears it."""
        net = Loopback(self)
        wrong = QuicCertificate.generate().fingerprint
        at_client, at_server = await self.assertBothFail(*net.start(client_pin=wrong))
        self.assertIn("not the one exchanged in the secure channel", str(at_client))
        self.assertIn("refused this side's QUIC certificate", str(at_server))

    async def test_wrong_client_certificate(self):
        """The server refuses a client whose certificate is not the pinned one; the client hears it."""
        net = Loopback(self)
        wrong = QuicCertificate.generate().fingerprint
        at_client, at_server = await self.assertBothFail(*net.start(server_pin=wrong))
        self.assertIn("refused this side's QUIC certificate", str(at_client))
        self.assertIn("not the one exchanged in the secure channel", str(at_server))
        for error in (at_client, at_server):
            self.assertIsInstance(error, DirectPathError)
            self.assertIsInstance(error, PluresyncError)
            self.assertEqual(error.reason, "certificate")

    def test_proof(self):
        """A client's proof holds for its own certificate and connection only."""
        client, server = QuicCertificate.generate(), QuicCertificate.generate()
        cid = os.urandom(8)
        signature = client.prove(cid, server.fingerprint)
        verify_proof(
            client.der, signature, expected=client.fingerprint, connection_id=cid, server_fingerprint=server.fingerprint
        )
        for kwargs in (
            {"expected": server.fingerprint, "connection_id": cid, "server_fingerprint": server.fingerprint},
            {"expected": client.fingerprint, "connection_id": os.urandom(8), "server_fingerprint": server.fingerprint},
            {"expected": client.fingerprint, "connection_id": cid, "server_fingerprint": client.fingerprint},
        ):
            with self.assertRaises(CertificateMismatchError):
                verify_proof(client.der, signature, **kwargs)
        self.assertEqual(fingerprint_of(client.der), client.fingerprint)
        self.assertNotIn(client.private_key_pem().decode(), repr(client))
        self.assertTrue(proof_message(cid, server.fingerprint, client.fingerprint).startswith(b"pluresync/1 "))


class BadInputTests(TestCase):
    timeout = 60

    async def test_strangers_are_ignored(self):
        """
        The server takes its one connection from the expected address only:
        a QUIC client and junk from another socket are dropped and counted.
        """
        net = Loopback(self)
        stranger = UDPSocket()
        stranger_port = net.listen(stranger)
        accepting = quic.accept(
            reactor,
            net.server_socket,
            net.address(net.client_port),
            certificate=net.server_cert,
            peer_fingerprint=net.client_cert.fingerprint,
            params=FAST,
        )
        accepting.addCallback(net.keep)
        intruder = quic.connect(
            reactor,
            stranger,
            net.address(net.server_port),
            certificate=net.client_cert,  # even with the right certificate
            peer_fingerprint=net.server_cert.fingerprint,
            params=QuicParams(handshake_timeout=1.0),
        )
        stranger.sendDatagrams([(b"\xc0" + os.urandom(1300), net.address(net.server_port))])
        failure = await DeferredList([intruder], consumeErrors=True)
        error = lost(failure[0][1], DirectPathError)
        self.assertIn("no answer", str(error))
        self.assertFalse(accepting.called)
        connecting = quic.connect(
            reactor,
            net.client_socket,
            net.address(net.server_port),
            certificate=net.client_cert,
            peer_fingerprint=net.server_cert.fingerprint,
            params=FAST,
        )
        connecting.addCallback(net.keep)
        await connecting
        server = await accepting
        self.assertGreaterEqual(server.strangers, 2)
        self.assertEqual(server.malformed, 0)
        self.assertEqual(stranger_port.getHost().host, "127.0.0.1")

    async def test_garbage_from_the_peer_address(self):
        """Garbage from the peer's own address, before and after the handshake, breaks nothing."""
        net = Loopback(self)
        server_address = net.address(net.server_port)
        # Junk, and junk dressed as a client's Initial (version 1, an 8-byte connection id).
        junk = [b"", b"\x00", b"\x40" + os.urandom(40), b"\xc0" + os.urandom(1300), os.urandom(1500), b"\xff" * 1200]
        junk.append(b"\xc3\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x00" + os.urandom(1300))
        connecting, accepting = net.start()
        # Sent now, this arrives before the client's first flight (sent in the next turn).
        net.client_socket.sendDatagrams([(j, server_address) for j in junk])
        client, server = await connecting, await accepting
        receiver = Receiver()
        server.attach(receiver)
        client.attach(Receiver())
        net.client_socket.sendDatagrams([(j, server_address) for j in junk] * 10)
        writer = Writer(client, 4 * MIB, close=True)
        writer.produce()
        lost(await receiver.loss(), ConnectionDone)
        self.assertEqual(receiver.digest.hexdigest(), writer.digest.hexdigest())
        self.assertEqual(server.strangers, 0)

    async def test_bad_fingerprint_is_a_configuration_error(self):
        """A fingerprint that is not 32 bytes fails the attempt at once."""
        net = Loopback(self)
        d = quic.connect(
            reactor, net.client_socket, ("127.0.0.1", 9), certificate=net.client_cert, peer_fingerprint=b"short"
        )
        failure = await DeferredList([d], consumeErrors=True)
        lost(failure[0][1], ConfigurationError)


@implementer(IDatagramReceiver)
class RawClient:
    """
    A QUIC client that speaks qh3 directly, so a test can break the pipe's
    rules after a correct TLS handshake (with the pinned certificates).
    """

    def __init__(self, test: TestCase, socket: UDPSocket, server: tuple[str, int], server_fingerprint: bytes) -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=[quic.ALPN], verify_mode=ssl.CERT_NONE)
        config.assert_fingerprint = server_fingerprint.hex()
        self.conn = QuicConnection(configuration=config)
        self.socket, self.server, self.timer = socket, server, None
        self.handshake: Deferred[None] = Deferred()
        socket.attach(self)
        test.addCleanup(self.stop)
        self.conn.connect(server, now=reactor.seconds())
        self.flush()

    def datagramReceived(self, data: bytes, address) -> None:
        self.conn.receive_datagram(data, address, now=reactor.seconds())
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshake.callback(None)
        self.flush()

    def send(self, stream_id: int, data: bytes) -> None:
        self.conn.send_stream_data(stream_id, data)
        self.flush()

    def flush(self) -> None:
        self.socket.sendDatagrams(self.conn.datagrams_to_send(now=reactor.seconds()))
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        at = self.conn.get_timer()
        self.timer = None if at is None else reactor.callLater(max(0, at - reactor.seconds()), self.fire)

    def fire(self) -> None:
        self.timer = None
        self.conn.handle_timer(now=reactor.seconds())
        self.flush()

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.socket.detach(self)


class RuleTests(TestCase):
    """A peer with the right certificate that breaks the pipe's rules is cut off, with a reason."""

    timeout = 60

    async def raw(self) -> tuple[Loopback, RawClient, Deferred[QuicPipe]]:
        net = Loopback(self)
        accepting = quic.accept(
            reactor,
            net.server_socket,
            net.address(net.client_port),
            certificate=net.server_cert,
            peer_fingerprint=net.client_cert.fingerprint,
            params=FAST,
        )
        accepting.addCallback(net.keep)
        client = RawClient(self, net.client_socket, net.address(net.server_port), net.server_cert.fingerprint)
        await client.handshake
        return net, client, accepting

    def proof(self, net: Loopback, client: RawClient) -> bytes:
        der = net.client_cert.der
        signature = net.client_cert.prove(client.conn.original_destination_connection_id, net.server_cert.fingerprint)
        return b"".join((b"\x02", struct.pack("!H", len(der)), der, struct.pack("!H", len(signature)), signature))

    async def test_credit_before_proof(self):
        """A client that skips its certificate proof is refused before anything is delivered."""
        net, client, accepting = await self.raw()
        client.send(quic.CLIENT_CONTROL, struct.pack("!BQ", quic.CREDIT, 1 << 20))
        failure = (await DeferredList([accepting], consumeErrors=True))[0][1]
        error = lost(failure, DirectPathError)
        self.assertIn("credit before proving", str(error))
        self.assertEqual(error.reason, "quic-handshake")

    async def test_sending_past_the_credit(self):
        """A writer that ignores the reader's credit is cut off: the reader never holds more than its window."""
        net, client, accepting = await self.raw()
        client.send(quic.CLIENT_CONTROL, self.proof(net, client) + struct.pack("!BQ", quic.CREDIT, 1 << 20))
        client.send(quic.DATA_STREAM, quic.PREAMBLE)
        server = await accepting
        receiver = Receiver()
        server.attach(receiver)
        server.pauseReading()  # no new credit: the first credit is all there is
        client.send(quic.DATA_STREAM, os.urandom(FAST.window + 1))
        error = lost(await receiver.loss(), DirectPipeLostError)
        self.assertIn("more than this side's credit", str(error))
        self.assertLessEqual(server.inbox_peak, FAST.window)

    async def test_a_stream_the_pipe_has_not(self):
        """A stream other than the pipe's three ends the pipe."""
        net, client, accepting = await self.raw()
        client.send(quic.CLIENT_CONTROL, self.proof(net, client) + struct.pack("!BQ", quic.CREDIT, 1 << 20))
        client.send(quic.DATA_STREAM, quic.PREAMBLE)
        server = await accepting
        receiver = Receiver()
        server.attach(receiver)
        client.send(4, b"a second stream")
        self.assertIn("stream 4", str(lost(await receiver.loss(), DirectPipeLostError)))


class EndTests(TestCase):
    timeout = 60

    async def test_orderly_close_reports_once(self):
        """close() delivers what was written, then each side hears ConnectionDone, once."""
        net = Loopback(self)
        client, server, at_client, at_server = await net.open()
        server.write(b"last words")
        await at_client.until(10)
        client.write(b"x" * 100_000)
        client.close()
        client.write(b"ignored after close")
        lost(await at_server.loss(), ConnectionDone)
        lost(await at_client.loss(), ConnectionDone)
        self.assertEqual(at_server.received, 100_000)
        await DeferredList([client.finished, server.finished])
        for pipe in (client, server):
            pipe.close()
            pipe.abort()
            pipe.write(b"nothing")
        self.assertEqual((len(at_client.losses), len(at_server.losses)), (1, 1))

    async def test_server_closes_first(self):
        """Either side may close first."""
        net = Loopback(self)
        client, server, at_client, at_server = await net.open()
        server.write(b"bye")
        server.close()
        lost(await at_client.loss(), ConnectionDone)
        lost(await at_server.loss(), ConnectionDone)
        self.assertEqual(at_client.received, 3)

    async def test_both_close_at_once(self):
        net = Loopback(self)
        client, server, at_client, at_server = await net.open()
        client.close()
        server.close()
        lost(await at_client.loss(), ConnectionDone)
        lost(await at_server.loss(), ConnectionDone)
        await DeferredList([client.finished, server.finished])

    async def test_close_times_out(self):
        """A peer that never answers a close (its reader stays paused) is aborted after close_timeout."""
        net = Loopback(self)
        params = QuicParams(close_timeout=0.5, handshake_timeout=5.0)
        client, server, at_client, at_server = await net.open(client_params=params, server_params=params)
        server.pauseReading()
        client.write(b"unread")
        client.close()
        error = lost(await at_client.loss(), DirectPipeLostError)
        self.assertIn("did not finish closing", str(error))
        self.assertIn("aborted", str(lost(await at_server.loss(), DirectPipeLostError)))
        self.assertEqual(at_server.received, 0)

    async def test_abort_reports_once(self):
        """abort() ends both sides at once, each with one loss that says who aborted."""
        net = Loopback(self)
        client, server, at_client, at_server = await net.open()
        writer = Writer(server, 64 * MIB)
        writer.produce()
        await at_client.until(1 * MIB)
        client.abort()
        client.abort()
        self.assertIn("this side aborted", str(lost(at_client.losses[0], DirectPipeLostError)))
        error = lost(await at_server.loss(), DirectPipeLostError)
        self.assertIn("aborted", str(error))
        await DeferredList([client.finished, server.finished])
        client.close()
        server.abort()
        self.assertEqual((len(at_client.losses), len(at_server.losses)), (1, 1))
        self.assertEqual(writer.left, 0, "the writer was not stopped")

    async def test_idle_timeout(self):
        """A peer that vanishes (its socket closed) is lost after the idle timeout, with a reason that says so."""
        net = Loopback(self)
        params = QuicParams(idle_timeout=1.0, handshake_timeout=5.0)
        client, server, at_client, at_server = await net.open(client_params=params, server_params=params)
        await net.client_port.stopListening()
        error = lost(await at_server.loss(), DirectPipeLostError)
        self.assertIn("idle timeout", str(error))
        lost(await at_client.loss(), DirectPipeLostError)
        await DeferredList([client.finished, server.finished])

    async def test_keepalive_holds_a_quiet_pipe(self):
        """A pipe with nothing to say outlives several idle timeouts: PINGs keep it."""
        net = Loopback(self)
        params = QuicParams(idle_timeout=0.6, handshake_timeout=5.0)
        client, server, at_client, at_server = await net.open(client_params=params, server_params=params)
        opened = reactor.seconds()
        # Only keep-alive PINGs and their ACKs go out meanwhile.
        await net.client_socket.when(lambda: reactor.seconds() - opened > 3 * params.idle_timeout)
        self.assertEqual((at_client.losses, at_server.losses), ([], []))
        client.write(b"still here")
        await at_server.until(10)

    async def test_no_answer(self):
        """Nobody answering at the address fails the attempt with a clear error, and frees the socket."""
        net = Loopback(self)
        d = quic.connect(
            reactor,
            net.client_socket,
            net.address(net.server_port),  # a socket with no QUIC pipe attached
            certificate=net.client_cert,
            peer_fingerprint=net.server_cert.fingerprint,
            params=QuicParams(handshake_timeout=0.5),
        )
        failure = await DeferredList([d], consumeErrors=True)
        error = lost(failure[0][1], DirectPathError)
        self.assertIn("no answer", str(error))
        self.assertEqual(error.reason, "no-answer")
        self.assertGreater(net.server_socket.unclaimed, 0)

    async def test_cancel(self):
        """Cancelling an attempt fails it with CancelledError and leaves nothing behind."""
        net = Loopback(self)
        connecting, accepting = net.start()
        connecting.cancel()
        accepting.cancel()
        results = await DeferredList([connecting, accepting], consumeErrors=True)
        for _, failure in results:
            failure.trap(CancelledError)


class Collect(DatagramProtocol):
    """Keeps what it reads; C{arrived} fires once C{count} datagrams came."""

    def __init__(self, count: int) -> None:
        self.count, self.datagrams, self.arrived = count, [], Deferred()

    def datagramReceived(self, data, addr):
        self.datagrams.append(data)
        if len(self.datagrams) == self.count:
            self.arrived.callback(None)


class FakeHandle:
    """A socket whose sendmsg fails as a kernel without GSO does."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def setsockopt(self, *args) -> None:
        pass

    def sendto(self, data, address):
        self.sent.append(bytes(data))

    def sendmsg(self, buffers, ancillary, flags, address):
        raise OSError(errno.EIO, "no GSO here")


class UDPSocketTests(TestCase):
    timeout = 30

    async def test_runs_go_out_segmented_and_arrive_whole(self):
        """Runs of equal datagrams (a shorter one may end a run) to two addresses arrive each whole, in order."""
        owner = UDPSocket()
        sender = reactor.listenUDP(0, owner, interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        first, second = Collect(6), Collect(2)
        ports = [reactor.listenUDP(0, c, interface="127.0.0.1") for c in (first, second)]
        for port in ports:
            self.addCleanup(port.stopListening)
        a, b = (("127.0.0.1", p.getHost().port) for p in ports)
        to_a = [os.urandom(1200) for _ in range(4)] + [os.urandom(300), os.urandom(1200)]
        to_b = [os.urandom(1200), os.urandom(1200)]
        owner.sendDatagrams([(d, a) for d in to_a[:5]] + [(d, b) for d in to_b] + [(to_a[5], a)])
        await DeferredList([first.arrived, second.arrived])
        self.assertEqual((first.datagrams, second.datagrams), (to_a, to_b))
        self.assertEqual(owner.refused, 0)

    def test_falls_back_without_gso(self):
        """A kernel that refuses GSO gets one sendto a datagram, from then on."""
        owner = UDPSocket()
        handle = FakeHandle()
        owner.transport = type("Port", (), {"getHandle": lambda self: handle})()
        owner.startProtocol()
        batch = [(bytes([0x40, n]) * 600, ("127.0.0.1", 9)) for n in range(5)]
        owner.sendDatagrams(batch)
        owner.sendDatagrams(batch)
        self.assertEqual(handle.sent, [d for d, _ in batch] * 2)
        self.assertFalse(owner.gso)


class UnitTests(SynchronousTestCase):
    def test_interfaces(self):
        verifyObject(IDatagramSocket, UDPSocket())

    def test_is_quic(self):
        self.assertTrue(is_quic(b"\x40"))
        self.assertTrue(is_quic(b"\xc3abc"))
        self.assertFalse(is_quic(b"\x00\x01"))  # STUN
        self.assertFalse(is_quic(b""))

    def test_initial_destination_cid(self):
        cid = os.urandom(8)
        initial = b"\xc3\x00\x00\x00\x01\x08" + cid + b"\x00" * 1200
        self.assertEqual(initial_destination_cid(initial), cid)
        self.assertIsNone(initial_destination_cid(initial[:1199]))
        self.assertIsNone(initial_destination_cid(b"\xe3" + initial[1:]))  # a Handshake packet
        self.assertIsNone(initial_destination_cid(b"\xc3\x00\x00\x00\x02" + initial[5:]))  # another version
        self.assertIsNone(initial_destination_cid(b"\xc3\x00\x00\x00\x01\x04" + initial[6:]))  # id too short

    def test_params(self):
        for kwargs in ({"idle_timeout": 0}, {"keepalive": 20.0}, {"window": 1000}, {"send_buffer": 0}):
            with self.assertRaises(ConfigurationError):
                QuicParams(**kwargs)
        self.assertEqual(QuicParams(idle_timeout=9).keepalive_interval, 3)
