"""
The durable session over in-memory links on a fake clock: what the user's
protocol sees (bytes, messages, half and full closes, producers), and that
it keeps seeing one connection, every byte once and in order, whatever
happens to the links under it (lost, blackholed, tampered, rotated).
"""

from __future__ import annotations

import random

from twisted.internet.defer import fail
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPullProducer,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pluresync.address import PeerAddress
from pluresync.endpoints.deadline import with_timeout
from pluresync.errors import (
    HandshakeError,
    NotChosenError,
    PeerGoneError,
    PluresyncError,
    RecordError,
    RelayLostError,
    TruncatedStreamError,
)
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.secure.establish import secure_link
from pluresync.secure.frames import RecordType
from pluresync.secure.link import ILinkOwner, LinkRefused
from pluresync.session import session as session_module
from pluresync.session import wire
from pluresync.session.attach import SessionTable, connect
from pluresync.session.params import MIN_WINDOW, SessionParams
from pluresync.session.session import SessionExpiredError, UnconfirmedCloseError, new_hello
from pluresync.session.stream import IMessageTransport, IRecordReceiver
from pluresync.session.wire import Hello, Intent, Status

from .memorypipe import connected_pipes, pump

MAX = wire.MAX_DATA_PAYLOAD
SMALL = SessionParams(window=MIN_WINDOW)


class Recorder(Protocol):
    """Keeps everything that happens to it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Failure | None = None
        self.made = 0
        self.losts = 0

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason
        self.losts += 1

    @property
    def data(self) -> bytes:
        return b"".join(self.received)


@implementer(IRecordReceiver)
class MessageRecorder(Recorder):
    """Wants message boundaries."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []
        self._partial: list[bytes] = []

    def recordReceived(self, payload: bytes, end: bool) -> None:
        self._partial.append(bytes(payload))
        if end:
            self.messages.append(b"".join(self._partial))
            self._partial = []


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    """A protocol that understands half-close, like `pluresync connect`."""

    def __init__(self) -> None:
        super().__init__()
        self.read_lost = 0
        self.write_lost = 0

    def readConnectionLost(self) -> None:
        self.read_lost += 1

    def writeConnectionLost(self) -> None:
        self.write_lost += 1


def numbered(plaintexts) -> list[bytes]:
    """The numbered records (the session's, resent after a loss) among a link's plaintexts."""
    return [p for p in plaintexts if p[0] in wire.NUMBERED]


class GuardedClock(Clock):
    """
    A Clock on which a timer that keeps rescheduling itself for "now" (a
    busy loop on a real reactor) is an error instead of a hung test.
    """

    _immediate = 0

    def advance(self, amount: float) -> None:
        self._immediate = 0
        super().advance(amount)

    def callLater(self, delay, *args, **kwargs):
        if delay <= 0:
            self._immediate += 1
            if self._immediate > 10000:
                raise RuntimeError("a timer keeps rescheduling itself at once: a busy loop on a real reactor")
        return super().callLater(delay, *args, **kwargs)


class Path:
    """
    One pair of memory pipes and the two links over them.

    @ivar client_sent: every record plaintext the initiator's link sealed.
    @ivar server_sent: every record plaintext the responder's link sealed.
    @ivar accepted: what the listener's side came to (a protocol, None for
        a resume, or a Failure).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.a, self.b = connected_pipes()
        self.stalled = False
        self.client_sent: list[bytes] = []
        self.server_sent: list[bytes] = []
        self.client_link = None
        self.server_link = None
        self.accepted: list = []

    def __repr__(self) -> str:
        return f"<Path {self.name}{' stalled' if self.stalled else ''}>"

    def bind(self, pipe, sent, side):
        def bind(link):
            pipe.channel = link
            setattr(self, side, link)
            send_one, send_many = link.sendRecord, link.sendRecords

            def one(plaintext):
                sent.append(bytes(plaintext))
                send_one(plaintext)

            def many(plaintexts):
                sent.extend(bytes(p) for p in plaintexts)
                send_many(plaintexts)

            link.sendRecord, link.sendRecords = one, many
            return pipe

        return bind

    def pump(self) -> None:
        if not self.stalled:
            pump(self.a, self.b)

    def deliver(self, to_server: bool, chunks: int | None = None) -> None:
        """Move what one side wrote (the first C{chunks} writes, or all) to the other, whatever the stall."""
        src, dst = (self.a, self.b) if to_server else (self.b, self.a)
        if dst.lost is not None:
            return
        count = len(src.outgoing) if chunks is None else chunks
        moving, src.outgoing[:count] = src.outgoing[:count], []
        if moving:
            dst.channel.pipeDataReceived(b"".join(moving))

    def kill(self, *, client: bool = True, server: bool = True, why: str = "the relay was killed") -> None:
        """The carrier dies: what was in flight is lost; each chosen side hears it."""
        self.a.outgoing.clear()
        self.b.outgoing.clear()
        if client and self.a.lost is None:
            self.a.end(Failure(RelayLostError(why)))
        if server and self.b.lost is None:
            self.b.end(Failure(RelayLostError(why)))

    @property
    def dead(self) -> bool:
        return self.a.lost is not None and self.b.lost is not None


class Net:
    """
    A client (the initiator, with a reconnect function) and a listener (a
    SessionTable) joined by any number of memory paths, on one Clock.
    """

    def __init__(
        self,
        *,
        params: SessionParams | None = None,
        server_params: SessionParams | None = None,
        protocol=Recorder,
        server_protocol=None,
        resume: bool = True,
    ) -> None:
        self.clock = GuardedClock()
        self.key = SyncKey.generate()
        self.topic = self.key.topic("t")
        self.client_id, self.server_id = PeerIdentity.generate(), PeerIdentity.generate()
        self.params = params or SessionParams()
        self.server_params = server_params or self.params
        self.protocol = protocol
        self.server_protocol = server_protocol or protocol
        self.built: list = []
        self.table = SessionTable(self.clock, self, self.server_params, self.server_id.peer_id)
        self.paths: list[Path] = []
        self.resume = resume
        self.down = False
        self.hang = False
        self.attempt_timeout = 30.0
        self.reconnects = 0
        #: expires_at (seconds from its opening) for the initiator's pipe of new paths
        self.expires_in: float | None = None

    def buildProtocol(self, addr):
        protocol = self.server_protocol()
        protocol.factory_addr = addr
        self.built.append(protocol)
        return protocol

    def open(self, hello, *, identity=None, topic=None) -> tuple[Path, object]:
        path = Path(f"mem:{len(self.paths) + 1}")
        self.paths.append(path)
        if self.expires_in is not None:
            path.a.expires_at = self.clock.seconds() + self.expires_in
        initiating = secure_link(
            path.bind(path.a, path.client_sent, "client_link"),
            initiator=True,
            name=path.name,
            identity=identity or self.client_id,
            topic=topic or self.topic,
            expected_peer=self.server_id.public,
            hello=hello,
        )
        responding = secure_link(
            path.bind(path.b, path.server_sent, "server_link"),
            initiator=False,
            name=path.name,
            identity=self.server_id,
            topic=self.topic,
            resolver=self.table.resolve,
        )
        responding.addCallback(self.table.accept)
        responding.addBoth(path.accepted.append)
        return path, initiating

    def reconnect(self, hello):
        """The session's reconnect function: a new path, bounded as a relay's attempt is (30 s)."""
        self.reconnects += 1
        if self.down:
            return fail(RelayLostError("no relay answers"))
        path, initiating = self.open(hello)
        if self.hang:
            path.stalled = True  # the attempt hangs: its carrier accepted it and went silent
        return with_timeout(self.clock, initiating, self.attempt_timeout, "connecting", PeerAddress(path.name, None))

    def start(self, test):
        path, initiating = self.open(lambda: new_hello(self.params))
        path.pump()
        link = test.successResultOf(initiating)
        factory = _Factory(self.protocol)
        self.client = connect(
            link,
            factory,
            clock=self.clock,
            params=self.params,
            local_id=self.client_id.peer_id,
            reconnect=self.reconnect if self.resume else None,
        )
        self.client_addr = factory.addr
        path.pump()
        test.assertEqual(len(self.built), 1)
        self.server = self.built[0]
        return self.client, self.server

    @property
    def client_session(self):
        return self.client.transport.session

    @property
    def server_session(self):
        return self.server.transport.session

    def pump(self) -> None:
        for path in list(self.paths):
            path.pump()

    def run(self, seconds: float = 0.1, step: float = 0.01) -> None:
        """Let C{seconds} pass in steps, moving what every unstalled path carries between them."""
        for _ in range(max(1, round(seconds / step))):
            self.pump()
            self.clock.advance(step)
        self.pump()

    @property
    def live(self) -> list[Path]:
        return [p for p in self.paths if not p.dead and not p.a.closed and not p.a.aborted]


class _Factory:
    def __init__(self, protocol) -> None:
        self.protocol = protocol
        self.addr = None

    def buildProtocol(self, addr):
        self.addr = addr
        return self.protocol()


def blob(size: int, seed: int = 0) -> bytes:
    """Bytes that differ everywhere, so a lost, repeated or moved piece shows."""
    rng = random.Random(seed)
    return rng.randbytes(size)


class StreamTests(SynchronousTestCase):
    """The user's transport: bytes, messages, what it provides."""

    def test_interfaces(self):
        """The stream provides what Twisted programs expect; the session is what its links deliver to."""
        net = Net()
        client, server = net.start(self)
        for iface in (ITransport, IPushProducer, IConsumer, IMessageTransport):
            self.assertTrue(verifyObject(iface, client.transport))
            self.assertTrue(verifyObject(iface, server.transport))
        self.assertTrue(verifyObject(ILinkOwner, net.client_session))
        self.assertTrue(verifyObject(IPushProducer, net.client_session))
        self.assertEqual(client.transport.getPeer(), PeerAddress("mem:1", net.server_id.peer_id))
        self.assertEqual(client.transport.getHost(), PeerAddress("mem:1", net.client_id.peer_id))
        self.assertEqual(server.transport.getPeer(), PeerAddress("mem:1", net.client_id.peer_id))
        self.assertEqual(net.client_addr, PeerAddress("mem:1", net.server_id.peer_id))
        self.assertEqual(server.factory_addr, PeerAddress("mem:1", net.client_id.peer_id))
        self.assertEqual(client.transport.peer_id, net.server_id.peer_id)
        self.assertEqual((client.made, server.made), (1, 1))
        self.assertTrue(verifyObject(IRecordReceiver, MessageRecorder()))
        self.assertTrue(verifyObject(IHalfCloseableProtocol, HalfCloser()))

    def test_stop_producing_aborts(self):
        """stopProducing on the transport (a consumer giving up) aborts the connection; the peer hears it."""
        net = Net()
        client, server = net.start(self)
        server.transport.stopProducing()
        server.lost.trap(ConnectionAborted)
        net.run()
        client.lost.trap(PeerGoneError)

    def test_peer_address_follows_the_path(self):
        """getPeer and getHost name the path the session is on now."""
        net = Net()
        client, server = net.start(self)
        net.paths[0].kill()
        net.run()
        self.assertEqual(client.transport.getPeer(), PeerAddress("mem:2", net.server_id.peer_id))
        self.assertEqual(server.transport.getHost(), PeerAddress("mem:2", net.server_id.peer_id))

    def test_bytes_both_ways(self):
        """Writes arrive in order on the other side, both directions."""
        net = Net()
        client, server = net.start(self)
        client.transport.write(b"hello ")
        client.transport.writeSequence([b"wor", b"ld"])
        server.transport.write(b"back")
        net.run()
        self.assertEqual(server.data, b"hello world")
        self.assertEqual(client.data, b"back")

    def test_large_write_is_split_into_records(self):
        """A write larger than one record arrives whole, in several records, a few per pipe write."""
        net = Net()
        client, server = net.start(self)
        path = net.paths[0]
        path.a.outgoing.clear()
        data = blob(MAX * 4 + 10)
        client.transport.write(data)
        self.assertEqual(len(numbered(path.client_sent)), 5)
        net.run()
        self.assertEqual(server.data, data)
        self.assertEqual(len(server.received), 5)
        self.assertTrue(all(len(chunk) <= MAX for chunk in server.received))

    def test_message_boundaries(self):
        """writeMessage boundaries survive, including empty and multi-record messages."""
        net = Net(protocol=MessageRecorder)
        client, server = net.start(self)
        messages = [b"one", b"", blob(MAX * 2 + 5), b"last"]
        for m in messages:
            client.transport.writeMessage(m)
        net.run()
        self.assertEqual(server.messages, messages)

    def test_no_plaintext_on_the_wire(self):
        """Every byte a carrier sees is ciphertext: the plaintext is nowhere in it, not after a move either."""
        net = Net()
        client, server = net.start(self)
        secret = b"the quarterly numbers are up 12 percent"
        client.transport.write(secret)
        server.transport.write(secret)
        net.paths[0].kill()
        net.run(1)
        client.transport.write(secret)
        net.run()
        self.assertEqual(server.data, secret * 2)
        self.assertEqual(client.data, secret)
        self.assertEqual(len(net.paths), 2)
        for path in net.paths:
            wire_bytes = b"".join(path.a.tap) + b"".join(path.b.tap)
            self.assertNotIn(secret[:12], wire_bytes)

    def test_writes_after_close_are_ignored(self):
        """As with TCP, writing after loseConnection sends nothing."""
        net = Net()
        client, _ = net.start(self)
        client.transport.loseConnection()
        sent = numbered(net.paths[0].client_sent)
        client.transport.write(b"too late")
        client.transport.writeMessage(b"too late")
        self.assertEqual(numbered(net.paths[0].client_sent), sent)

    def test_factory_refuses(self):
        """A listener factory that builds nothing: the initiator hears the application refused."""

        class Refusing(Net):
            def buildProtocol(self, addr):
                return None

        net = Refusing()
        path, initiating = net.open(lambda: new_hello(net.params))
        path.pump()
        client = connect(
            self.successResultOf(initiating),
            _Factory(Recorder),
            clock=net.clock,
            params=net.params,
            local_id="me",
            reconnect=net.reconnect,
        )
        path.pump()
        [failure] = path.accepted
        failure.trap(PluresyncError)
        self.assertIn("buildProtocol returned None", str(failure.value))
        net.run()
        client.lost.trap(PeerGoneError)
        self.assertIn("refused", str(client.lost.value))
        self.assertEqual(net.reconnects, 0)

    def test_initiator_factory_refuses(self):
        """An initiator factory that builds nothing: connect raises, saying why, and the peer hears it."""
        net = Net()
        path, initiating = net.open(lambda: new_hello(net.params))
        path.pump()

        class Refusing:
            def buildProtocol(self, addr):
                return None

        error = self.assertRaises(
            PluresyncError,
            connect,
            self.successResultOf(initiating),
            Refusing(),
            clock=net.clock,
            params=net.params,
            local_id="me",
            reconnect=net.reconnect,
        )
        self.assertIn("buildProtocol returned None", str(error))
        net.run()
        self.assertEqual(net.built, [])
        [failure] = path.accepted
        failure.trap(NotChosenError)

    def test_stats(self):
        """stats() says where the session is and how much it holds."""
        net = Net()
        client, _ = net.start(self)
        stats = client.transport.stats()
        self.assertEqual(
            set(stats),
            {
                "streams",
                "stream",
                "stream_blocked_bytes",
                "stream_inbox_bytes",
                "path",
                "links",
                "swaps",
                "retransmit_bytes",
                "retransmit_peak",
                "pending_bytes",
                "receive_bytes",
                "phase",
            },
        )
        self.assertEqual((stats["path"], stats["links"], stats["swaps"], stats["phase"]), ("mem:1", 1, 0, "attached"))
        client.transport.write(b"x" * 1000)
        stats = client.transport.stats()
        self.assertEqual(stats["retransmit_bytes"], 1005)
        self.assertEqual(stats["retransmit_peak"], 1005)
        net.run()
        self.assertEqual(client.transport.stats()["retransmit_bytes"], 0)
        net.paths[0].kill()
        self.assertEqual(client.transport.stats()["phase"], "detached")
        net.run()
        stats = client.transport.stats()
        self.assertEqual((stats["path"], stats["swaps"], stats["phase"]), ("mem:2", 1, "attached"))


class CloseTests(SynchronousTestCase):
    """Close means delivered."""

    def test_clean_close(self):
        """loseConnection sends an authenticated close: both sides see ConnectionDone, after the data."""
        net = Net()
        client, server = net.start(self)
        client.transport.write(b"last words")
        client.transport.loseConnection()
        net.run()
        self.assertEqual(server.data, b"last words")
        server.lost.trap(ConnectionDone)
        client.lost.trap(ConnectionDone)
        self.assertEqual((client.losts, server.losts), (1, 1))
        self.assertEqual(len(net.table), 0)

    def test_close_waits_for_the_ack(self):
        """
        The closer's connectionLost waits until the peer acknowledged the
        close; while the acknowledgement is withheld, it does not fire.
        """
        net = Net()
        client, server = net.start(self)
        path = net.paths[0]
        client.transport.write(b"last words")
        client.transport.loseConnection()
        path.a.outgoing, moving = [], path.a.outgoing
        path.b.channel.pipeDataReceived(b"".join(moving))
        self.assertEqual(server.data, b"last words")
        path.b.outgoing.clear()  # the acknowledgement is lost
        net.clock.advance(0.5)
        self.assertIsNone(client.lost)
        self.assertTrue(client.transport.disconnecting)

    def test_unconfirmed_close_without_resume(self):
        """
        A close whose acknowledgement never arrives, and a link then lost
        with no resume, ends in UnconfirmedCloseError saying how many bytes
        may be undelivered; never ConnectionDone.
        """
        net = Net(params=SessionParams(resume=0))
        client, server = net.start(self)
        client.transport.write(b"x" * 100)
        client.transport.loseConnection()
        net.paths[0].kill()
        client.lost.trap(UnconfirmedCloseError)
        self.assertFalse(client.lost.check(ConnectionDone))
        self.assertIn("106 bytes may be undelivered", str(client.lost.value))
        server.lost.trap(TruncatedStreamError)

    def test_unconfirmed_close_after_the_resume_limit(self):
        """A close unacknowledged when the resume limit passes is an UnconfirmedCloseError too."""
        net = Net(params=SessionParams(resume=5))
        client, server = net.start(self)
        client.transport.write(b"x" * 100)
        client.transport.loseConnection()
        net.down = True
        net.paths[0].kill()
        net.run(4.9, step=0.1)
        self.assertIsNone(client.lost)
        net.run(0.2)
        client.lost.trap(UnconfirmedCloseError)
        self.assertIn("may be undelivered", str(client.lost.value))
        server.lost.trap(SessionExpiredError)

    def test_connectionLost_after_the_pipe_flushed(self):
        """
        A clean end is reported once the link's pipe has sent what was
        written (the last ACK), not before; a pipe that never finishes is
        dropped after a while and the end reported anyway.
        """
        for stuck in (False, True):
            with self.subTest(stuck=stuck):
                net = Net()
                client, server = net.start(self)
                path = net.paths[0]
                client.transport.loseConnection()
                path.deliver(to_server=True)  # the close arrives; the listener acknowledges it and ends
                self.assertTrue(path.b.closed)
                self.assertIsNone(server.lost)  # its pipe has not finished sending the ACK
                path.deliver(to_server=False)
                self.assertTrue(path.a.closed)
                self.assertIsNone(client.lost)
                if stuck:
                    path.stalled = True
                    net.run(9.5, step=0.5)
                    self.assertIsNone(client.lost)
                    net.run(1, step=0.5)
                    self.assertTrue(path.a.aborted)
                else:
                    net.pump()
                client.lost.trap(ConnectionDone)
                if not stuck:
                    server.lost.trap(ConnectionDone)
                ended = []
                net.client_session.whenEnded().addCallback(ended.append)
                self.assertEqual(ended, [None])

    def test_crossing_closes(self):
        """
        Both sides close at once: both see one clean close.  What the peer
        wrote just before its close and what arrives after our own
        loseConnection is discarded, as Twisted's TCP stops reading then.
        """
        net = Net()
        client, server = net.start(self)
        client.transport.write(b"from client")
        server.transport.write(b"from server")
        net.run()
        client.transport.write(b"late client")
        server.transport.write(b"late server")
        client.transport.loseConnection()
        server.transport.loseConnection()
        net.run()
        self.assertEqual((server.data, client.data), (b"from client", b"from server"))
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
        self.assertEqual((client.losts, server.losts), (1, 1))
        self.assertEqual(len(net.table), 0)

    def test_abort_reaches_the_peer(self):
        """abortConnection ends this side at once (ConnectionAborted); the peer hears PeerGoneError, not a timeout."""
        net = Net()
        client, server = net.start(self)
        client.transport.abortConnection()
        client.lost.trap(ConnectionAborted)
        net.pump()
        server.lost.trap(PeerGoneError)
        self.assertIn("aborted", str(server.lost.value))
        self.assertEqual(net.reconnects, 0)

    def test_server_abort_reaches_the_client(self):
        """The listener's side aborting ends the initiator at once: it does not try to resume."""
        net = Net()
        client, server = net.start(self)
        server.transport.abortConnection()
        server.lost.trap(ConnectionAborted)
        net.run()
        client.lost.trap(PeerGoneError)
        self.assertEqual(net.reconnects, 0)

    def test_truncation_without_resume(self):
        """A link that ends without the peer's close, and no resume, is a truncation: never a clean end."""
        net = Net(params=SessionParams(resume=0))
        client, server = net.start(self)
        client.transport.write(b"partial")
        net.run()
        net.paths[0].b.end(Failure(ConnectionDone()))
        server.lost.trap(TruncatedStreamError)
        self.assertFalse(server.lost.check(ConnectionDone))


class HalfCloseTests(SynchronousTestCase):
    """loseWriteConnection: the SHUTDOWN record."""

    def test_half_close_then_reply(self):
        """
        One side ends its direction; the other reads to the end, replies, and
        ends its own: both see a clean close, nothing is lost.
        """
        net = Net(protocol=HalfCloser)
        left, right = net.start(self)
        left.transport.write(b"request")
        left.transport.loseWriteConnection()
        self.assertEqual(left.write_lost, 1)
        net.run()
        self.assertEqual(right.data, b"request")
        self.assertEqual(right.read_lost, 1)
        self.assertIsNone(right.lost)
        right.transport.write(b"response")
        right.transport.loseWriteConnection()
        net.run()
        self.assertEqual(left.data, b"response")
        left.lost.trap(ConnectionDone)
        right.lost.trap(ConnectionDone)

    def test_plain_protocol_is_closed_at_end_of_input(self):
        """A protocol that is not half-closeable is closed at the peer's SHUTDOWN, as with TCP."""
        net = Net()
        left, right = net.start(self)
        left.transport.write(b"all of it")
        left.transport.loseWriteConnection()
        net.run()
        self.assertEqual(right.data, b"all of it")
        right.lost.trap(ConnectionDone)
        left.lost.trap(ConnectionDone)

    def test_writes_after_half_close_are_dropped(self):
        """After loseWriteConnection nothing more is sent."""
        net = Net(protocol=HalfCloser)
        left, _ = net.start(self)
        left.transport.loseWriteConnection()
        sent = numbered(net.paths[0].client_sent)
        self.assertEqual(sent[-1], wire.shutdown_record(0))
        left.transport.write(b"late")
        left.transport.writeMessage(b"late")
        self.assertEqual(numbered(net.paths[0].client_sent), sent)

    def test_data_after_shutdown_is_refused(self):
        """A peer that sends data after its SHUTDOWN breaks the protocol: RecordError, and the peer is told so."""
        net = Net(protocol=HalfCloser)
        left, right = net.start(self)
        net.client_session.send((wire.shutdown_record(0), b""))
        net.client_session.send((wire.record_head(RecordType.DATA, 0), b"sneaky"))
        net.run()
        right.lost.trap(RecordError)
        self.assertEqual(right.data, b"")
        left.lost.trap(PeerGoneError)
        self.assertIn("broke the protocol", str(left.lost.value))

    def test_close_while_half_closed(self):
        """
        loseConnection still closes cleanly after either direction was shut,
        and the other side sees an orderly end.
        """
        for shut_ours in (True, False):
            with self.subTest(shut_ours=shut_ours):
                net = Net(protocol=HalfCloser)
                left, right = net.start(self)
                if shut_ours:
                    left.transport.loseWriteConnection()
                else:
                    right.transport.loseWriteConnection()
                    net.run()
                    self.assertEqual(left.read_lost, 1)
                left.transport.loseConnection()
                net.run()
                left.lost.trap(ConnectionDone)
                right.lost.trap(ConnectionDone)

    def test_pipe_lost_while_half_closed_is_truncation(self):
        """Without resume, a pipe that ends during a half-close, without the peer's CLOSE, is a truncated stream."""
        net = Net(protocol=HalfCloser, params=SessionParams(resume=0))
        left, right = net.start(self)
        left.transport.loseWriteConnection()
        net.run()
        self.assertEqual(right.read_lost, 1)
        net.paths[0].b.end(Failure(ConnectionDone()))
        right.lost.trap(TruncatedStreamError)

    def test_half_close_survives_a_lost_link(self):
        """With resume, a lost link during a half-close changes nothing: the reply still comes back."""
        net = Net(protocol=HalfCloser)
        left, right = net.start(self)
        left.transport.write(b"request")
        left.transport.loseWriteConnection()
        net.run()
        net.paths[0].kill()
        net.run()
        right.transport.write(b"response")
        right.transport.loseWriteConnection()
        net.run()
        self.assertEqual((right.data, left.data), (b"request", b"response"))
        # left had shut its side: the peer's SHUTDOWN closes it instead
        self.assertEqual((right.read_lost, left.read_lost), (1, 0))
        left.lost.trap(ConnectionDone)
        right.lost.trap(ConnectionDone)
        self.assertEqual(len(net.built), 1)

    def test_shutdown_twice_is_one_shutdown(self):
        """A second loseWriteConnection sends nothing and does not close."""
        net = Net(protocol=HalfCloser)
        left, _ = net.start(self)
        left.transport.loseWriteConnection()
        sent = numbered(net.paths[0].client_sent)
        left.transport.loseWriteConnection()
        self.assertEqual(numbered(net.paths[0].client_sent), sent)
        self.assertEqual(left.write_lost, 1)
        self.assertFalse(net.paths[0].a.closed)


@implementer(IPushProducer)
class Pusher:
    """A streaming producer that writes C{chunk}-sized pieces of C{data} while it is not paused."""

    def __init__(self, transport, data: bytes, chunk: int = 16384) -> None:
        self.transport = transport
        self.data = data
        self.chunk = chunk
        self.sent = 0
        self.paused = False
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True
        self.events.append("pause")

    def resumeProducing(self) -> None:
        assert self.paused, "resumed while producing"
        self.paused = False
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")

    def produce(self) -> None:
        while not self.paused and self.sent < len(self.data):
            self.transport.write(self.data[self.sent : self.sent + self.chunk])
            self.sent += self.chunk


@implementer(IPullProducer)
class Puller:
    """A pull producer: one chunk per resumeProducing, then it unregisters."""

    def __init__(self, transport, chunks: list[bytes]) -> None:
        self.transport = transport
        self.chunks = list(chunks)
        self.calls = 0

    def resumeProducing(self) -> None:
        self.calls += 1
        if self.chunks:
            self.transport.write(self.chunks.pop(0))
        if not self.chunks:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        pass


class FlowTests(SynchronousTestCase):
    """Credit, the producer membrane, and a paused reader."""

    def test_streaming_producer_follows_the_credit(self):
        """
        A streaming producer registered on the stream is paused when the
        peer's credit is used up (nothing acknowledged yet) and resumed when
        ACKs grant more; it is never registered on a pipe, not after a
        move either.
        """
        net = Net(params=SMALL)
        client, server = net.start(self)
        data = blob(4 * SMALL.window, seed=1)
        pusher = Pusher(client.transport, data)
        verifyObject(IPushProducer, pusher)
        client.transport.registerProducer(pusher, True)
        pusher.produce()
        self.assertTrue(pusher.paused)
        self.assertLessEqual(pusher.sent, SMALL.window + pusher.chunk)
        self.assertGreaterEqual(pusher.sent, SMALL.window - pusher.chunk)
        self.assertIs(net.paths[0].a.producer, net.client_session)
        killed = False
        for _ in range(200):
            net.run(0.02)
            if not killed and pusher.sent > 2 * SMALL.window:
                net.paths[-1].kill()
                killed = True
                self.assertTrue(pusher.paused)  # no link: nothing can be sent
            pusher.produce()
            for path in net.paths:
                self.assertNotIn(pusher, (path.a.producer, path.b.producer))
            if len(server.data) == len(data):
                break
        self.assertEqual(server.data, data)
        self.assertGreater(pusher.events.count("resume"), 2)
        self.assertLessEqual(client.transport.stats()["retransmit_peak"], SMALL.window)
        self.assertEqual(len(net.paths), 2)
        self.assertIs(net.paths[1].a.producer, net.client_session)
        client.transport.unregisterProducer()
        client.transport.loseConnection()
        net.run()
        client.lost.trap(ConnectionDone)
        self.assertNotIn("stop", pusher.events)

    def test_producer_registered_while_not_writable_starts_paused(self):
        """A producer registered when the credit is used up is paused at once."""
        net = Net(params=SMALL)
        client, _ = net.start(self)
        client.transport.write(blob(SMALL.window + 10))
        pusher = Pusher(client.transport, b"")
        client.transport.registerProducer(pusher, True)
        self.assertEqual(pusher.events, ["pause"])
        self.assertRaises(RuntimeError, client.transport.registerProducer, Pusher(client.transport, b""), True)

    def test_producer_stopped_when_the_session_fails(self):
        """A producer on a stream that ends in error is stopped."""
        net = Net(params=SessionParams(resume=0))
        client, _ = net.start(self)
        pusher = Pusher(client.transport, b"")
        client.transport.registerProducer(pusher, True)
        net.paths[0].kill()
        client.lost.trap(RelayLostError)
        self.assertEqual(pusher.events[-1], "stop")

    def test_pull_producer_is_driven(self):
        """A pull producer (streaming=False) is asked for more while the session can take it, and only then."""
        net = Net(params=SMALL)
        client, server = net.start(self)
        chunks = [blob(30000, seed=i) for i in range(40)]
        puller = Puller(client.transport, chunks)
        verifyObject(IPullProducer, puller)
        net.paths[0].stalled = True  # no acks: the credit runs out
        client.transport.registerProducer(puller, False)
        net.clock.advance(0)
        for _ in range(40):
            net.clock.advance(0)
        calls = puller.calls
        self.assertLess(calls, 12)  # one window's worth, and a record more
        self.assertGreater(calls, 7)
        net.paths[0].stalled = False
        for _ in range(100):
            net.run(0.02)
            if not puller.chunks:
                break
        net.run()
        self.assertEqual(server.data, b"".join(chunks))
        self.assertEqual(puller.calls, 40)

    def test_paused_reader_keeps_the_links_alive(self):
        """
        Pausing the reading side stops delivery (and with it the credit):
        the sender stops within the window, yet the links go on reading and
        answering pings, so a reader paused far longer than ping + stall is
        not mistaken for a dead path; resuming delivers everything.
        """
        params = SessionParams(window=MIN_WINDOW, ping=1, stall=1)
        net = Net(params=params)
        client, server = net.start(self)
        server.transport.pauseProducing()
        data = blob(3 * params.window, seed=2)
        client.transport.write(data)
        net.run(30, step=0.05)
        self.assertEqual(server.data, b"")
        self.assertTrue(net.paths[0].b.reading)
        self.assertEqual((len(net.paths), net.reconnects), (1, 0))
        self.assertEqual(client.transport.stats()["swaps"], 0)
        self.assertLessEqual(client.transport.stats()["retransmit_peak"], params.window)
        self.assertLessEqual(server.transport.stats()["receive_bytes"], params.window + MAX + 5)
        self.assertGreater(client.transport.stats()["pending_bytes"], params.window)
        server.transport.resumeProducing()
        net.run(2)
        self.assertEqual(server.data, data)
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)

    def test_close_reaches_a_paused_reader(self):
        """
        The peer's data and close arrived while our protocol was not
        reading (the closer was told they were delivered, and ended):
        however long the pause, they are delivered when it resumes, then
        a clean close; they are not dropped when the resume limit passes.
        """
        net = Net(params=SessionParams(resume=5))
        client, server = net.start(self)
        server.transport.pauseProducing()
        data = blob(100000, 24)
        client.transport.write(data)
        client.transport.loseConnection()
        net.run(1)
        client.lost.trap(ConnectionDone)
        net.run(60, step=0.5)
        self.assertEqual(server.data, b"")
        self.assertIsNone(server.lost)
        server.transport.resumeProducing()
        self.assertEqual(server.data, data)
        server.lost.trap(ConnectionDone)

    def test_pause_inside_dataReceived(self):
        """Records already received are held when the protocol pauses mid-delivery."""
        net = Net()
        client, server = net.start(self)

        def pausing(data, original=server.dataReceived):
            original(data)
            server.transport.pauseProducing()

        server.dataReceived = pausing
        client.transport.write(b"1")
        client.transport.write(b"2")
        net.run()
        self.assertEqual(server.received, [b"1"])
        server.transport.resumeProducing()
        self.assertEqual(server.received, [b"1", b"2"])

    def test_pause_from_connectionMade(self):
        """A protocol that pauses reading in connectionMade gets nothing until it resumes."""

        class Pausing(Recorder):
            def connectionMade(self):
                super().connectionMade()
                self.transport.pauseProducing()

        net = Net(server_protocol=Pausing)
        client, server = net.start(self)
        client.transport.write(b"held")
        net.run()
        self.assertEqual(server.data, b"")
        server.transport.resumeProducing()
        self.assertEqual(server.data, b"held")

    def test_credit_violation(self):
        """
        A peer that sends far beyond the credit it was given breaks the
        session's protocol: the receiver holds no more than its window,
        ends the session with a RecordError and tells the peer so (another
        link would only bring the same records again).
        """
        net = Net(params=SMALL)
        client, server = net.start(self)
        server.transport.pauseProducing()
        net.client_session._peer_max = 10 * SMALL.window  # a sender that ignores the credit
        client.transport._credit = 10 * SMALL.window  # the stream's too
        client.transport.write(blob(3 * SMALL.window))
        net.run(2)
        self.assertLessEqual(net.server_session.stats()["receive_bytes"], SMALL.window + MAX + 64)
        server.lost.trap(RecordError)
        self.assertIn("credit", str(server.lost.value))
        client.lost.trap(PeerGoneError)
        self.assertIn("broke the protocol", str(client.lost.value))
        self.assertEqual(net.reconnects, 0)

    def test_record_too_short_for_its_stream_id(self):
        """
        A DATA record without its stream id, arriving in order (the path
        that hands records straight to the stream), ends the session as a
        protocol error that both sides are told; what came before it was
        delivered.
        """
        net = Net()
        client, server = net.start(self)
        client.transport.write(b"before")
        net.client_session.send((bytes((RecordType.DATA,)) + b"\x00", b""))
        net.run()
        self.assertEqual(server.data, b"before")
        server.lost.trap(RecordError)
        self.assertIn("too short for its stream id", str(server.lost.value))
        client.lost.trap(PeerGoneError)
        self.assertIn("broke the protocol", str(client.lost.value))

    def test_pause_inside_data_received_holds_what_follows(self):
        """
        A protocol that pauses its transport inside dataReceived gets
        nothing more until it resumes, then everything in order.
        """

        class PauseOnFirst(Recorder):
            def dataReceived(self, data):
                super().dataReceived(data)
                if len(self.data) == len(data):
                    self.transport.pauseProducing()

        net = Net(server_protocol=PauseOnFirst)
        client, server = net.start(self)
        client.transport.write(b"one")
        net.run()
        client.transport.write(b"two")
        client.transport.write(b"three")
        net.run()
        self.assertEqual(server.data, b"one")
        server.transport.resumeProducing()
        net.run()
        self.assertEqual(server.data, b"onetwothree")


@implementer(session_module.IControlReceiver)
class Signals:
    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []

    def controlReceived(self, kind, body):
        self.received.append((kind, body))


class ControlTests(SynchronousTestCase):
    """CONTROL records: path signaling beside the stream, for whoever manages the paths."""

    def test_signals_reach_the_receiver(self):
        """A CONTROL record reaches the peer's receiver, kind and body apart; the stream sees nothing."""
        net = Net()
        client, server = net.start(self)
        signals = Signals()
        verifyObject(session_module.IControlReceiver, signals)
        net.server_session.signals = signals
        self.assertTrue(net.client_session.sendControl(wire.ControlKind.DIRECT_OFFER, b"candidates"))
        client.transport.write(b"data")
        net.run()
        self.assertEqual(signals.received, [(wire.ControlKind.DIRECT_OFFER, b"candidates")])
        self.assertEqual(server.data, b"data")

    def test_unknown_or_unheard_signals_are_ignored(self):
        """A kind nobody knows, or no receiver at all: ignored, and the session carries on."""
        net = Net()
        client, server = net.start(self)
        net.client_session.sendControl(0xEE, b"from a later version")
        net.server_session.sendControl(wire.ControlKind.DIRECT_FAILED, b"\x00\x00\x00\x01\x01")
        client.transport.write(b"still here")
        net.run()
        self.assertEqual(server.data, b"still here")
        self.assertIsNone(server.lost)
        self.assertIsNone(client.lost)

    def test_no_signal_without_a_link(self):
        """With no link (detached), a signal is not sent, and the caller is told."""
        net = Net()
        net.start(self)
        net.paths[0].kill()
        self.assertFalse(net.client_session.sendControl(wire.ControlKind.DIRECT_OFFER, b"x"))

    def test_peer_caps(self):
        """Each side knows the capability bits the other sent in its hello or READY."""
        net = Net()
        net.start(self)
        # (bit 2, AES-GCM, depends on this machine's CPU)
        both = wire.Caps.RESUME | wire.Caps.STREAMS
        self.assertEqual(net.client_session.peer_caps & ~wire.Caps.AESGCM, both)
        self.assertEqual(net.server_session.peer_caps & ~wire.Caps.AESGCM, both)


class ResumeTests(SynchronousTestCase):
    """
    A link lost at every interesting moment: every byte arrives once and in
    order, both ways, and the listener builds one protocol.
    """

    def assertIntact(self, net, client_sent: bytes, server_sent: bytes) -> None:
        self.assertEqual(len(net.server.data), len(client_sent))
        self.assertEqual(net.server.data, client_sent)
        self.assertEqual(len(net.client.data), len(server_sent))
        self.assertEqual(net.client.data, server_sent)
        self.assertEqual(len(net.built), 1)
        self.assertEqual((net.client.made, net.server.made), (1, 1))

    def finish(self, net) -> None:
        """Close from the client: both sides end cleanly, once."""
        net.client.transport.loseConnection()
        net.run(1)
        net.client.lost.trap(ConnectionDone)
        net.server.lost.trap(ConnectionDone)
        self.assertEqual((net.client.losts, net.server.losts), (1, 1))

    def test_lost_before_any_ack(self):
        """Records that never reached the peer are resent on the next link."""
        net = Net()
        client, server = net.start(self)
        up, down = blob(200000, 1), blob(150000, 2)
        client.transport.write(up)
        server.transport.write(down)
        net.paths[0].kill()
        self.assertIsNone(client.lost)
        net.run(1)
        self.assertIntact(net, up, down)
        self.assertEqual(len(net.paths), 2)
        self.assertEqual(net.client_session.stats()["swaps"], 1)
        self.finish(net)

    def test_resent_is_what_was_written_not_what_the_buffer_became(self):
        """
        The resend queue keeps the user's immutable bytes, never a buffer
        the user may change: a bytearray, a memoryview of one, and a
        message written and then overwritten arrive as they were written.
        """
        net = Net()
        client, server = net.start(self)
        up = bytearray(blob(100000, 5))
        view_of = bytearray(b"view" * 10)
        message = bytearray(b"as it was")
        client.transport.write(up)
        client.transport.write(memoryview(view_of)[4:])
        client.transport.writeMessage(message)
        expected = bytes(up) + bytes(view_of[4:]) + bytes(message)
        up[:] = b"x" * len(up)
        view_of[:] = b"y" * len(view_of)
        message[:] = b"z" * len(message)
        net.paths[0].kill()  # nothing was delivered: all of it is resent
        net.run(1)
        self.assertEqual(server.data, expected)
        self.assertEqual(net.client_session.stats()["swaps"], 1)
        self.finish(net)

    def test_lost_with_data_unacked(self):
        """Records that arrived but whose ACK was lost are not delivered twice."""
        net = Net()
        client, server = net.start(self)
        up, down = blob(200000, 3), blob(150000, 4)
        client.transport.write(up)
        server.transport.write(down)
        path = net.paths[0]
        path.deliver(to_server=True)
        path.deliver(to_server=False)
        self.assertEqual((server.data, client.data), (up, down))
        net.paths[0].kill()  # the ACKs both ways are lost
        net.run(1)
        self.assertIntact(net, up, down)
        self.finish(net)

    def test_lost_halfway(self):
        """A link lost with part of a write delivered: the rest follows, once."""
        net = Net()
        client, server = net.start(self)
        up = blob(6 * MAX, 5)
        client.transport.write(up)
        net.paths[0].deliver(to_server=True, chunks=1)
        net.run(0.02)  # an ACK for part of it may come back
        net.paths[0].kill()
        net.run(1)
        self.assertIntact(net, up, b"")
        self.finish(net)

    def test_lost_twice_in_a_row(self):
        """The link that replaces a lost one is lost too, during its handshake or just after."""
        net = Net()
        client, server = net.start(self)
        up, down = blob(100000, 6), blob(100000, 7)
        client.transport.write(up)
        server.transport.write(down)
        net.paths[0].kill()
        net.clock.advance(0)  # the session reconnects on the next turn
        self.assertEqual(len(net.paths), 2)
        net.paths[1].kill()  # mid-handshake
        net.run(0.5)
        net.paths[-1].kill()  # just after the resume
        net.run(1)
        self.assertIntact(net, up, down)
        self.finish(net)

    def test_server_hears_the_loss_late(self):
        """
        The initiator loses its pipe and resumes before the listener's old
        pipe ends (a relay tells the two sides apart); what the listener
        had sent on the old link is still delivered.
        """
        net = Net()
        client, server = net.start(self)
        up, down = blob(100000, 8), blob(100000, 9)
        client.transport.write(up)
        server.transport.write(down)
        old = net.paths[0]
        old.kill(server=False)
        old.stalled = True
        net.run(0.5)
        # at once, not after the listener's side of the old link times out
        self.assertEqual((len(server.data), len(client.data)), (len(up), len(down)))
        more = blob(1000, 10)
        server.transport.write(more)
        net.run(0.5)
        old.kill()
        net.run(1)
        self.assertIntact(net, up, down + more)
        self.finish(net)

    def held_across_two_links(self):
        """
        Records sent on a link that stalls, then a planned move to a new
        link where later records arrive first: the receiver holds them.
        """
        params = SessionParams(stall=100, ping=100)
        net = Net(params=params)
        net.expires_in = 4.0  # rotate at 3 s
        client, server = net.start(self)
        first_up, first_down = blob(100000, 11), blob(100000, 12)
        old = net.paths[0]
        old.stalled = True
        client.transport.write(first_up)
        server.transport.write(first_down)
        net.run(3.1)
        self.assertEqual(len(net.paths), 2)
        self.assertEqual(net.client_session.path, "mem:2")
        then_up, then_down = blob(50000, 13), blob(50000, 14)
        client.transport.write(then_up)
        server.transport.write(then_down)
        net.run(0.2)
        self.assertEqual((server.data, client.data), (b"", b""))
        self.assertGreater(net.server_session.stats()["receive_bytes"], 50000)
        self.assertGreater(net.client_session.stats()["receive_bytes"], 50000)
        return net, old, first_up + then_up, first_down + then_down

    def test_held_records_then_the_old_link_drains(self):
        """Records held out of order are delivered when the stalled link delivers its part."""
        net, old, up, down = self.held_across_two_links()
        old.stalled = False
        net.run(0.5)
        self.assertIntact(net, up, down)
        self.assertTrue(old.dead)  # retired once drained
        self.finish(net)

    def test_held_records_then_the_old_link_dies(self):
        """Records held out of order are delivered once the lost link's part is resent."""
        net, old, up, down = self.held_across_two_links()
        old.kill()
        net.run(1)
        self.assertIntact(net, up, down)
        self.finish(net)

    def test_planned_move_new_link_lost(self):
        """During a planned move (two live links) the new link is lost: the old one carries on, or another."""
        net, old, up, down = self.held_across_two_links()
        net.paths[1].kill()
        old.stalled = False
        net.run(1)
        self.assertIntact(net, up, down)
        self.finish(net)

    def test_planned_move_old_link_lost_while_idle(self):
        """
        A planned move where only the old link had carried records in one
        direction: when it dies, those records still arrive (nothing later
        is held that would ask for them again).
        """
        params = SessionParams(stall=100, ping=100)
        net = Net(params=params)
        net.expires_in = 4.0
        client, server = net.start(self)
        down = blob(100000, 15)
        old = net.paths[0]
        old.stalled = True
        server.transport.write(down)
        net.run(3.1)
        self.assertEqual(net.client_session.path, "mem:2")
        old.kill()
        net.run(1)
        self.assertIntact(net, b"", down)
        self.finish(net)

    def test_close_unacked(self):
        """
        The close reached the listener but its ACK was lost with the link:
        the listener ended the session cleanly; the initiator comes back,
        learns the close arrived, and ends cleanly too.
        """
        net = Net()
        client, server = net.start(self)
        up = blob(10000, 16)
        client.transport.write(up)
        client.transport.loseConnection()
        path = net.paths[0]
        path.deliver(to_server=True)
        self.assertIsNone(server.lost)  # ended, but its pipe has not sent the ACK yet
        path.kill()  # and never will
        server.lost.trap(ConnectionDone)
        self.assertIsNone(client.lost)
        net.run(1)
        client.lost.trap(ConnectionDone)
        self.assertEqual(server.data, up)
        self.assertEqual(len(net.built), 1)
        self.assertEqual(net.paths[-1].accepted[0].value.answer.status, Status.ENDED)

    def test_close_while_detached(self):
        """A close made while no link carries the session goes out, after the data, once one does."""
        net = Net()
        client, server = net.start(self)
        net.down = True
        net.paths[0].kill()
        up = blob(5000, 25)
        client.transport.write(up)
        client.transport.loseConnection()
        net.run(1)
        self.assertIsNone(client.lost)
        net.down = False
        net.run(3)
        self.assertEqual(server.data, up)
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)

    def test_crossing_closes_across_a_lost_link(self):
        """
        Both sides close at once and the link is lost after the
        listener's close reached the initiator but before the initiator's
        reached the listener: the initiator comes back to deliver its
        close (the listener is still there, waiting for it), and both end
        cleanly, at once, not at the resume limit.
        """
        net = Net()
        client, server = net.start(self)
        client.transport.loseConnection()
        server.transport.loseConnection()
        path = net.paths[0]
        path.deliver(to_server=False)  # the listener's CLOSE arrives; the initiator's is lost
        path.kill()
        net.run(2)
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
        self.assertEqual(len(net.built), 1)

    def test_peer_close_then_lost_ack(self):
        """
        The listener closes; its close reaches the initiator, whose
        acknowledgement is lost with the link while the initiator's own
        last write is unconfirmed: the initiator comes back once, so the
        listener learns its close arrived (ConnectionDone, at once, not an
        UnconfirmedCloseError at the resume limit); the initiator ends
        with a truncated stream (its write was never confirmed).  (A
        session of one stream with a peer that predates caps bit 3: with
        streams, the listener's close is a FINISH, test_streams.py.)
        """
        net = Net(params=SessionParams(streams=False))
        client, server = net.start(self)
        client.transport.write(b"crossing the close")
        server.transport.loseConnection()
        path = net.paths[0]
        path.deliver(to_server=False)
        path.kill()
        net.run(2)
        server.lost.trap(ConnectionDone)
        client.lost.trap(TruncatedStreamError)
        self.assertIn("not confirmed", str(client.lost.value))

    def test_close_lost(self):
        """The close never reached the listener: it is resent with what preceded it."""
        net = Net()
        client, server = net.start(self)
        up = blob(10000, 17)
        client.transport.write(up)
        client.transport.loseConnection()
        net.paths[0].kill()
        net.run(1)
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
        self.assertEqual(server.data, up)

    def test_shutdown_in_flight(self):
        """A half-close lost with its link arrives once on the next, after the data before it."""
        net = Net(protocol=HalfCloser)
        client, server = net.start(self)
        up = blob(10000, 18)
        client.transport.write(up)
        client.transport.loseWriteConnection()
        net.paths[0].kill()
        net.run(1)
        self.assertEqual((server.data, server.read_lost), (up, 1))
        server.transport.write(b"reply")
        net.paths[-1].kill()
        net.run(1)
        server.transport.loseWriteConnection()
        net.run(1)
        self.assertEqual(client.data, b"reply")
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
        self.assertEqual((server.read_lost, len(net.built)), (1, 1))

    def test_messages_across_moves(self):
        """Message boundaries and order hold across lost links."""
        net = Net(protocol=MessageRecorder)
        client, server = net.start(self)
        messages = [blob(n, n) for n in (0, 1, 100, MAX, MAX + 1, 3 * MAX + 7, 5)]
        for i, m in enumerate(messages):
            client.transport.writeMessage(m)
            if i % 2:
                net.paths[-1].kill()
            net.run(0.3)
        self.assertEqual(server.messages, messages)

    def test_tampered_record_fails_the_link_not_the_session(self):
        """A record tampered with on the way fails its link; the session resumes and nothing is lost."""
        net = Net()
        client, server = net.start(self)
        up = blob(3 * MAX, 19)
        client.transport.write(up)
        path = net.paths[0]
        path.a.outgoing[0] = path.a.outgoing[0][:-1] + bytes([path.a.outgoing[0][-1] ^ 1])
        net.run(1)
        self.assertTrue(path.b.aborted)
        self.assertEqual(len(net.paths), 2)
        self.assertIntact(net, up, b"")
        self.assertIsNone(client.lost)
        self.finish(net)

    def test_replayed_record_fails_the_link_not_the_session(self):
        """A record delivered twice fails its link; the session resumes and the record counts once."""
        net = Net()
        client, server = net.start(self)
        up = b"once"
        client.transport.write(up)
        path = net.paths[0]
        path.a.outgoing.append(path.a.outgoing[-1])
        net.run(1)
        self.assertEqual(len(net.paths), 2)
        self.assertIntact(net, up, b"")
        self.finish(net)

    def test_dropped_record_fails_the_link_not_the_session(self):
        """A record missing on a link fails it; the session resumes and resends it."""
        net = Net()
        client, server = net.start(self)
        for piece in (b"one ", b"two ", b"three"):
            client.transport.write(piece)
        path = net.paths[0]
        del path.a.outgoing[1]
        net.run(1)
        self.assertEqual(len(net.paths), 2)
        self.assertIntact(net, b"one two three", b"")
        self.finish(net)

    def test_close_confirmed_by_the_resume_answer(self):
        """
        Our close reached the peer, whose session stays open (its own data
        is not yet confirmed), and the ACK was lost with the link: the
        resume's answer confirms the close, and the session ends cleanly
        without carrying on over the new link.
        """
        net = Net()
        client, server = net.start(self)
        server.transport.write(blob(50000, 20))
        client.transport.loseConnection()
        path = net.paths[0]
        path.deliver(to_server=True)
        self.assertIsNone(server.lost)
        path.kill(server=False)  # the listener hears of it late: its session stays attached
        path.stalled = True
        net.run(1)
        client.lost.trap(ConnectionDone)
        # The listener's own data was never confirmed: it waits out its
        # resume limit (the initiator might come back for a close that
        # crossed), then ends with an error.
        net.run(net.params.resume + net.params.stall + 1, step=0.5)
        self.assertEqual(net.clock.getDelayedCalls(), [])
        self.assertIsNotNone(server.lost)


class ParamsTests(SynchronousTestCase):
    """The session's knobs are checked where they are made."""

    def test_limits(self):
        for bad in (
            {"window": MIN_WINDOW - 1},
            {"window": (1 << 30) + 1},
            {"resume": -1},
            {"stall": 0},
            {"ping": 0},
            {"rotate": -1},
        ):
            with self.subTest(**bad):
                self.assertRaises(ValueError, SessionParams, **bad)
        self.assertEqual(SessionParams(resume=0).resume, 0)


class RefusalTests(SynchronousTestCase):
    """Resumes that must not work, and sessions that cannot be resumed."""

    def resume_hello(self, net, ident: bytes):
        return lambda: Hello(Intent.RESUME, ident, 0, net.params.window)

    def assertUntouched(self, net) -> None:
        """The real session is where it was: attached over its first path, carrying bytes."""
        net.client.transport.write(b"still here")
        net.run()
        self.assertEqual(net.server.data, b"still here")
        self.assertEqual(net.client_session.path, "mem:1")
        self.assertEqual(len(net.built), 1)
        self.assertIsNone(net.server.lost)

    def test_unknown_session(self):
        """A resume naming a session the listener does not hold is refused with UNKNOWN_SESSION."""
        net = Net()
        net.start(self)
        path, initiating = net.open(self.resume_hello(net, b"\x42" * wire.SESSION_ID_SIZE))
        path.pump()
        failure = self.failureResultOf(initiating, LinkRefused)
        self.assertEqual(failure.value.answer.status, Status.UNKNOWN_SESSION)
        path.accepted[0].trap(LinkRefused)
        self.assertUntouched(net)

    def test_not_yours(self):
        """
        Another peer with the same sync key, naming the session id, is
        refused with NOT_YOURS (the session is bound to the proven peer),
        while the session lives and after it ended.
        """
        net = Net()
        net.start(self)
        intruder = PeerIdentity.generate()
        ident = net.client_session.ident
        path, initiating = net.open(self.resume_hello(net, ident), identity=intruder)
        path.pump()
        self.assertEqual(self.failureResultOf(initiating, LinkRefused).value.answer.status, Status.NOT_YOURS)
        self.assertUntouched(net)
        net.client.transport.loseConnection()
        net.run()
        net.server.lost.trap(ConnectionDone)
        path, initiating = net.open(self.resume_hello(net, ident), identity=intruder)
        path.pump()
        self.assertEqual(self.failureResultOf(initiating, LinkRefused).value.answer.status, Status.NOT_YOURS)

    def test_session_id_is_bound_to_the_first_handshake(self):
        """Both sides derive the same session id, and a new session gets a new one."""
        net = Net()
        net.start(self)
        self.assertEqual(net.client_session.ident, net.server_session.ident)
        self.assertEqual(len(net.client_session.ident), wire.SESSION_ID_SIZE)
        other = Net()
        other.start(self)
        self.assertNotEqual(other.client_session.ident, net.client_session.ident)

    def test_replayed_handshake(self):
        """
        The recorded bytes of earlier links (a new session's, and a
        resume's) replayed to the listener fail the handshake: frame 3 is
        bound to the responder's fresh ephemeral key.  Nothing is built or
        resumed.
        """
        net = Net()
        client, server = net.start(self)
        client.transport.write(b"before")
        net.run()
        net.paths[0].kill()
        net.run()
        self.assertEqual(net.client_session.path, "mem:2")
        for recorded in net.paths[:2]:
            with self.subTest(path=recorded.name):
                replay = Path("replay")
                responding = secure_link(
                    replay.bind(replay.b, replay.server_sent, "server_link"),
                    initiator=False,
                    name="replay",
                    identity=net.server_id,
                    topic=net.topic,
                    resolver=net.table.resolve,
                )
                responding.addCallback(net.table.accept)
                replay.b.channel.pipeDataReceived(b"".join(recorded.a.tap))
                self.failureResultOf(responding, HandshakeError)
                self.assertTrue(replay.b.closed)
        client.transport.write(b" after")
        net.run()
        self.assertEqual(server.data, b"before after")
        self.assertEqual(len(net.built), 1)
        self.assertEqual(net.client_session.path, "mem:2")

    def test_no_resume(self):
        """resume=0: the session ends with its first link, on both sides, with the link's error."""
        net = Net(params=SessionParams(resume=0))
        client, server = net.start(self)
        client.transport.write(b"x")
        net.paths[0].kill()
        client.lost.trap(RelayLostError)
        server.lost.trap(RelayLostError)
        self.assertEqual(net.reconnects, 0)
        self.assertEqual(net.clock.getDelayedCalls(), [])

    def test_no_reconnect_function(self):
        """An initiator given no way to reconnect ends with its link, whatever its resume limit."""
        net = Net(resume=False, server_params=SessionParams(resume=0))
        client, server = net.start(self)
        net.paths[0].kill()
        client.lost.trap(RelayLostError)
        server.lost.trap(RelayLostError)

    def test_resume_limit(self):
        """No path within the resume limit: both sides end with SessionExpiredError, saying so."""
        net = Net(params=SessionParams(resume=5))
        client, server = net.start(self)
        client.transport.write(b"unconfirmed")
        net.down = True
        net.paths[0].kill()
        net.run(4.9, step=0.1)
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)
        self.assertGreater(net.reconnects, 3)
        net.run(0.2)
        for side in (client, server):
            side.lost.trap(SessionExpiredError)
            self.assertIn("no path to the peer within 5 s", str(side.lost.value))
        self.assertIn("16 bytes sent were not confirmed", str(client.lost.value))
        reconnects = net.reconnects
        net.run(10, step=0.5)
        self.assertEqual(net.reconnects, reconnects)
        self.assertEqual(net.clock.getDelayedCalls(), [])
        self.assertEqual(len(net.table), 0)

    def test_expiry_after_a_path_closed_cleanly(self):
        """
        A path the relay closed in an orderly way (its session cap) and no
        way back: the error says no path came back, not that the connection
        "was closed cleanly".
        """
        net = Net(params=SessionParams(resume=5))
        client, server = net.start(self)
        net.down = True
        path = net.paths[0]
        path.a.closed = path.b.closed = True
        net.run(6, step=0.1)
        for side in (client, server):
            side.lost.trap(SessionExpiredError)
            self.assertIn("no path to the peer within 5 s", str(side.lost.value))
            self.assertNotIn("closed cleanly", str(side.lost.value))

    def test_reconnect_backoff(self):
        """Failed reconnects are retried with a growing delay, up to a cap."""
        net = Net(params=SessionParams(resume=60))
        net.start(self)
        net.down = True
        net.paths[0].kill()
        net.run(30, step=0.05)
        self.assertGreater(net.reconnects, 10)
        self.assertLess(net.reconnects, 30)
        net.down = False
        net.run(3, step=0.05)
        self.assertEqual(net.client_session.stats()["phase"], "attached")

    def test_hung_reconnect_attempt(self):
        """
        A reconnect attempt that hangs (its carrier accepted it, then went
        silent) is given up and another made in time: with the defaults (a
        relay's attempt may take 30 s, the resume limit is 30 s) one hung
        attempt must not use up the whole resume limit.
        """
        net = Net()
        client, server = net.start(self)
        net.hang = True
        net.paths[0].kill()
        net.run(1)
        self.assertEqual(net.reconnects, 1)
        net.hang = False
        net.run(net.params.resume - 1.5, step=0.1)
        self.assertIsNone(client.lost)
        self.assertEqual(net.client_session.stats()["phase"], "attached")
        self.assertGreater(net.reconnects, 1)

    def test_back_after_the_limit(self):
        """
        A peer that comes back after the listener's resume limit: the
        listener has ended the session and answers ENDED; the initiator
        ends with an error (a truncated stream, not a handshake error),
        never a clean close.
        """
        net = Net(params=SessionParams(resume=60), server_params=SessionParams(resume=5))
        client, server = net.start(self)
        client.transport.write(b"unconfirmed")
        net.down = True
        net.paths[0].kill()
        net.run(6, step=0.1)
        server.lost.trap(SessionExpiredError)
        self.assertIsNone(client.lost)
        net.down = False
        net.run(3, step=0.05)
        self.assertIsNotNone(client.lost)
        self.assertIsInstance(net.paths[-1].accepted[0], Failure)
        net.paths[-1].accepted[0].trap(LinkRefused)
        self.assertFalse(client.lost.check(ConnectionDone))
        self.assertIn("ended", str(client.lost.value))
        client.lost.trap(TruncatedStreamError)
        self.assertEqual(len(net.built), 1)

    def test_listener_forgot_the_session(self):
        """
        A listener that no longer knows the session (it restarted) answers
        UNKNOWN_SESSION; after a few such answers the initiator believes it
        and ends with an error.
        """
        net = Net()
        client, _ = net.start(self)
        net.table = SessionTable(net.clock, net, net.server_params, net.server_id.peer_id)
        net.paths[0].kill()
        net.run(5, step=0.05)
        self.assertIsNotNone(client.lost)
        self.assertFalse(client.lost.check(ConnectionDone))
        self.assertIn("does not know this session", str(client.lost.value))
        client.lost.trap(TruncatedStreamError)
        self.assertEqual(net.reconnects, 3)


class BlackholeTests(SynchronousTestCase):
    """A link that stops delivering is found by its silence, on the clock."""

    def test_busy_link_blackholed(self):
        """A link carrying data that goes silent is dropped after `stall` seconds; the session moves on."""
        net = Net()
        client, server = net.start(self)
        up = blob(20000, 21)
        client.transport.write(up)
        net.run(0.05)
        self.assertEqual(server.data, up)
        old = net.paths[0]
        old.stalled = True
        start = net.clock.seconds()
        more = blob(20000, 22)
        client.transport.write(more)
        net.run(net.params.stall - 0.1)
        self.assertEqual(len(net.paths), 1)
        self.assertEqual(net.client_session.path, "mem:1")
        net.run(0.3)
        self.assertEqual(len(net.paths), 2)
        self.assertTrue(old.a.aborted)
        self.assertLessEqual(net.clock.seconds() - start, net.params.stall + 0.3)
        net.run(0.5)
        self.assertEqual(net.client_session.path, "mem:2")
        self.assertEqual(server.data, up + more)
        self.assertEqual(len(net.built), 1)
        net.run(net.params.ping + net.params.stall + 1, step=0.1)
        self.assertEqual(net.server_session.stats()["links"], 1)
        client.transport.loseConnection()
        net.run()
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)

    def test_idle_link_blackholed(self):
        """An idle link that goes silent is pinged, and dropped within ping + stall seconds."""
        net = Net()
        client, server = net.start(self)
        net.run(net.params.ping * 2, step=0.1)  # idle: pings answered, nothing moves
        self.assertEqual(len(net.paths), 1)
        net.paths[0].stalled = True
        net.run(net.params.ping + net.params.stall + 0.2, step=0.1)
        self.assertEqual(len(net.paths), 2)
        net.run(0.5)
        self.assertEqual(net.client_session.path, "mem:2")
        client.transport.write(b"after")
        net.run()
        self.assertEqual(server.data, b"after")

    def test_blackholed_during_data_the_other_way(self):
        """A blackhole while the listener sends: its bytes arrive once, in order, over the next link."""
        net = Net()
        client, server = net.start(self)
        down = blob(300000, 23)
        server.transport.write(down)
        net.paths[0].deliver(to_server=False, chunks=2)
        net.paths[0].stalled = True
        net.run(net.params.stall + 1)
        self.assertEqual(client.data, down)
        self.assertEqual(len(net.built), 1)

    def test_listener_finds_the_blackhole_too(self):
        """
        The listener's side of a blackholed link is dropped by its own
        silence timer; with no initiator coming back, the listener's
        session ends at its resume limit.
        """
        net = Net(params=SessionParams(resume=5))
        client, server = net.start(self)
        net.down = True
        net.paths[0].stalled = True
        server.transport.write(b"into the void")
        net.run(net.params.stall + 0.5)
        self.assertEqual(net.server_session.stats()["phase"], "detached")
        net.run(5, step=0.1)
        server.lost.trap(SessionExpiredError)
        client.lost.trap(SessionExpiredError)


class RotationTests(SynchronousTestCase):
    """A pipe that says when it will end (expires_at) is left before it does, without resending."""

    def test_planned_move(self):
        """
        The initiator opens a new link `rotate` seconds (at most a quarter
        of the time left) before expires_at, moves to it without resending
        anything, and retires the old link with DETACH once it drained.
        """
        net = Net(params=SessionParams(stall=10, ping=30))  # no silence timer during the test
        net.expires_in = 40.0  # rotate at 30 s
        client, server = net.start(self)
        up, down = [], []
        for i in range(29):
            up.append(blob(5000, 100 + i))
            down.append(blob(5000, 200 + i))
            client.transport.write(up[-1])
            server.transport.write(down[-1])
            net.run(1, step=0.05)
        self.assertEqual(len(net.paths), 1)
        old = net.paths[0]
        old.stalled = True  # records in flight on the old link during the move
        up.append(blob(50000, 300))
        down.append(blob(50000, 301))
        client.transport.write(up[-1])
        server.transport.write(down[-1])
        net.run(1.1)
        self.assertEqual(len(net.paths), 2)
        new = net.paths[1]
        self.assertEqual(net.client_session.path, "mem:2")
        self.assertEqual(net.server_session.path, "mem:2")
        up.append(blob(5000, 302))
        down.append(blob(5000, 303))
        client.transport.write(up[-1])
        server.transport.write(down[-1])
        net.run(0.2)
        old.stalled = False
        net.run(1)
        self.assertEqual(server.data, b"".join(up))
        self.assertEqual(client.data, b"".join(down))
        # nothing was sent twice: what the old link carried is not on the new one
        for sent in ("client_sent", "server_sent"):
            on_old = set(numbered(getattr(old, sent)))
            on_new = set(numbered(getattr(new, sent)))
            self.assertTrue(on_old and on_new)
            self.assertEqual(len(on_old & on_new), 0, f"{sent}: records sent on both links")
        self.assertIn(wire.detach_record(wire.DetachReason.MOVED), old.client_sent)
        self.assertTrue(old.dead)
        self.assertFalse(new.a.closed)
        self.assertEqual(net.client_session.stats()["links"], 1)
        self.assertEqual(net.server_session.stats()["links"], 1)
        self.assertEqual(net.client_session.stats()["swaps"], 1)
        self.assertEqual(len(net.built), 1)

    def test_rotation_margin(self):
        """The move starts `rotate` seconds before the end, or a quarter of the time left if that is less."""
        for expires_in, moves_at in ((100.0, 80.0), (8.0, 6.0)):
            with self.subTest(expires_in=expires_in):
                net = Net()
                net.expires_in = expires_in
                net.start(self)
                net.run(moves_at - 0.1, step=0.1)
                self.assertEqual(len(net.paths), 1)
                net.run(0.3)
                self.assertEqual(len(net.paths), 2)
                net.run(0.5)
                self.assertEqual(net.client_session.path, "mem:2")

    def test_every_cap(self):
        """A relay that ends every link after a short cap: the session rotates again and again, losing nothing."""
        net = Net()
        net.expires_in = 4.0
        client, server = net.start(self)
        up = []
        for i in range(40):
            up.append(blob(3000, 400 + i))
            client.transport.write(up[-1])
            net.run(0.5)
            for path in net.paths:
                expires = getattr(path.a, "expires_at", None)
                if expires is not None and net.clock.seconds() >= expires and not path.dead:
                    path.a.closed = path.b.closed = True  # the relay ends it at its cap (1001)
        net.run(1)
        self.assertEqual(server.data, b"".join(up))
        self.assertGreater(len(net.paths), 4)
        self.assertEqual(len(net.built), 1)
        self.assertIsNone(client.lost)

    def test_failed_rotation_keeps_the_link(self):
        """A rotation whose new link cannot be made leaves the session on the old link, working."""
        net = Net()
        net.expires_in = 40.0
        client, server = net.start(self)
        net.down = True
        net.run(31, step=0.1)
        self.assertEqual(net.reconnects, 1)
        self.assertEqual(net.client_session.path, "mem:1")
        client.transport.write(b"still")
        net.run()
        self.assertEqual(server.data, b"still")

    def test_listener_does_not_rotate(self):
        """Only the initiator opens links: an expiring pipe on the listener's side changes nothing by itself."""
        net = Net()
        client, server = net.start(self)
        net.paths[0].b.expires_at = 10.0
        net.run(12, step=0.1)
        self.assertEqual(len(net.paths), 1)


class RandomScheduleTests(SynchronousTestCase):
    """
    A property: whatever a seeded random schedule of writes, pumps (whole
    or partial), clock jumps, link kills (both ends, or one end while the
    other lingers), blackholes, tampering, failed reconnects and a paused
    reader does, once everything is let through, every message arrives
    exactly once and in order both ways, the listener built one protocol,
    and the retransmit queue never held more than the window and a record.
    Links announce that they expire (as a relay's session cap does) and
    are ended when they do, so planned moves mix with forced ones.
    """

    STEPS = 200
    PARAMS = SessionParams(window=MIN_WINDOW, stall=1.0, ping=3.0, resume=1000.0)

    def message(self, rng, tag: bytes, n: int) -> bytes:
        size = rng.choice((0, 1, 10, 100, 1000, 5000, 20000, 40000, MAX - 7, MAX, 2 * MAX + 3))
        return tag + n.to_bytes(4, "big") + rng.randbytes(size)

    def records(self, messages) -> int:
        return sum(max(1, -(-len(m) // MAX)) for m in messages)

    def network(self, seed: int) -> tuple[random.Random, Net]:
        rng = random.Random(seed)
        self.patch(session_module, "random", random.Random(seed))  # the reconnect jitter
        net = Net(params=self.PARAMS, protocol=MessageRecorder)
        net.expires_in = rng.uniform(2.0, 6.0)
        net.start(self)
        self.paused = False
        return rng, net

    def disturb(self, rng, net, action: float) -> None:
        """One step of the schedule that is not a write (C{action} in [0.3, 1))."""
        live = net.live
        if action < 0.50:
            net.pump()
        elif action < 0.58 and live:
            path = rng.choice(live)
            if not path.stalled:
                to_server = rng.random() < 0.5
                pending = len((path.a if to_server else path.b).outgoing)
                path.deliver(to_server, rng.randint(0, pending))
        elif action < 0.72:
            net.clock.advance(rng.uniform(0, 0.6))
        elif action < 0.79 and live:
            path = rng.choice(live)
            if rng.random() < 0.7:
                path.kill()
            else:  # one end hears it; the other lingers, blackholed
                path.kill(server=rng.random() < 0.5, client=True)
                path.stalled = True
        elif action < 0.86 and live:
            path = rng.choice(live)
            path.stalled = not path.stalled
        elif action < 0.90:
            net.down = not net.down
        elif action < 0.94:
            self.paused = not self.paused
            transport = net.server.transport
            (transport.pauseProducing if self.paused else transport.resumeProducing)()
        elif live:
            path = rng.choice(live)
            outgoing = path.a.outgoing if rng.random() < 0.5 else path.b.outgoing
            if outgoing:
                i = rng.randrange(len(outgoing))
                if rng.random() < 0.5:
                    del outgoing[i]  # a record lost on its link
                else:
                    outgoing[i] = outgoing[i][:-1] + bytes([outgoing[i][-1] ^ 0x40])
        for path in net.live:  # the relay ends a link at its cap
            if net.clock.seconds() >= path.a.expires_at:
                path.a.closed = path.b.closed = True

    def letThrough(self, net, done) -> None:
        """Everything works again: run until C{done()} (bounded)."""
        net.down = False
        if self.paused:
            net.server.transport.resumeProducing()
        for path in net.paths:
            path.stalled = False
        for _ in range(600):
            net.run(0.2, step=0.02)
            if done():
                break
        net.run(1)

    def schedule(self, seed: int) -> None:
        rng, net = self.network(seed)
        client, server = net.client, net.server
        up: list[bytes] = []
        down: list[bytes] = []
        for _ in range(self.STEPS):
            action = rng.random()
            if action < 0.30:
                for _ in range(rng.randint(5, 30)):
                    up.append(self.message(rng, b"u", len(up)))
                    client.transport.writeMessage(up[-1])
                for _ in range(rng.randint(5, 30)):
                    down.append(self.message(rng, b"d", len(down)))
                    server.transport.writeMessage(down[-1])
            else:
                self.disturb(rng, net, action)
            self.assertIsNone(client.lost)
            self.assertIsNone(server.lost)
        self.letThrough(net, lambda: len(server.messages) >= len(up) and len(client.messages) >= len(down))
        self.assertGreater(self.records(up) + self.records(down), 1500)
        self.assertEqual((len(server.messages), len(client.messages)), (len(up), len(down)))
        self.assertTrue(server.messages == up, "the listener's messages differ from what was sent")
        self.assertTrue(client.messages == down, "the initiator's messages differ from what was sent")
        self.assertEqual(len(net.built), 1)
        self.assertEqual((client.made, server.made), (1, 1))
        bound = self.PARAMS.window + wire.MAX_DATA_PAYLOAD + 5
        for side in (client, server):
            self.assertLessEqual(side.transport.stats()["retransmit_peak"], bound)
        client.transport.loseConnection()
        net.run(1)
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)

    def closing(self, seed: int) -> None:
        """
        The same, with a close (by either side, or both) half way through,
        the disturbances going on after it: the closer ends cleanly once
        the network lets it, after everything it wrote arrived; the other
        side ends cleanly, or with a truncated stream if the closer left
        before confirming what it was still sending (as a TCP peer that
        closes resets the connection).
        """
        rng, net = self.network(seed)
        client, server = net.client, net.server
        up: list[bytes] = []
        down: list[bytes] = []
        closer = rng.choice(("client", "server", "both"))
        for step in range(self.STEPS // 2):
            action = rng.random()
            if step == self.STEPS // 4:
                if closer != "server":
                    client.transport.loseConnection()
                if closer != "client":
                    server.transport.loseConnection()
            elif action < 0.30 and step < self.STEPS // 4:
                for _ in range(rng.randint(1, 10)):
                    up.append(self.message(rng, b"u", len(up)))
                    client.transport.writeMessage(up[-1])
                    down.append(self.message(rng, b"d", len(down)))
                    server.transport.writeMessage(down[-1])
            elif action >= 0.30:
                self.disturb(rng, net, action)
        self.letThrough(net, lambda: client.lost is not None and server.lost is not None)
        self.assertIsNotNone(client.lost, "the initiator never ended")
        self.assertIsNotNone(server.lost, "the listener never ended")
        if closer == "client":
            self.assertTrue(server.messages == up, "the listener's messages differ from what was sent")
            client.lost.trap(ConnectionDone)
        elif closer == "server":
            self.assertTrue(client.messages == down, "the initiator's messages differ from what was sent")
            server.lost.trap(ConnectionDone)
        for side in (client, server):
            side.lost.trap(ConnectionDone, TruncatedStreamError)
            self.assertEqual(side.losts, 1)
        self.assertEqual(len(net.built), 1)
        self.assertEqual(len(net.table), 0)

    def test_seed_1(self):
        self.schedule(1)

    def test_seed_2(self):
        self.schedule(2)

    def test_seed_3(self):
        self.schedule(3)

    def test_seed_4(self):
        """(Before 3450f59 this seed lost records the listener sent on a link that ended late on its side.)"""
        self.schedule(4)

    def test_seed_25(self):
        """(So did this one.)"""
        self.schedule(25)

    def test_closing_seeds(self):
        for seed in (1, 2, 3, 4, 5, 6):
            with self.subTest(seed=seed):
                self.closing(seed)

    def test_closing_seed_161(self):
        """(Crossing closes: the initiator gave up with its close unconfirmed; the listener waited for it.)"""
        self.closing(161)

    def test_closing_seed_178(self):
        """(Crossing closes: the listener waited for the confirmation of a close the peer no longer needed.)"""
        self.closing(178)
