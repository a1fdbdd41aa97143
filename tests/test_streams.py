"""
Many streams on one session (caps bit 3), over in-memory links on a fake
clock: opening in one message, per-stream credit (a stalled stream stalls
no other), each stream's own end (FINISH, RESET, half-close), the
listener's limits, idle sessions, and streams through lost links.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pluresync.errors import PeerGoneError, RecordError, StreamOpenError, StreamResetError
from pluresync.secure.frames import RecordType
from pluresync.session import wire
from pluresync.session.params import MIN_WINDOW, SessionParams
from pluresync.session.streams import INITIAL_CREDIT, MIN_STREAM_WINDOW
from pluresync.session.wire import ResetReason

from .test_session import MessageRecorder, Net, Pusher, Recorder, _Factory, blob, numbered


class Opener:
    """Opens streams on the initiator's session and keeps what came of each."""

    def __init__(self, net: Net, protocol=Recorder) -> None:
        self.net = net
        self.protocol = protocol
        self.results: list = []

    def open(self):
        d = self.net.client_session.mux.open(_Factory(self.protocol))
        d.addBoth(self.results.append)
        return d


def started(test, **kwargs) -> tuple[Net, Recorder, Recorder]:
    net = Net(**kwargs)
    client, server = net.start(test)
    return net, client, server


def opened(test, net: Net, count: int, protocol=Recorder) -> list:
    """Open C{count} streams and let them through: the initiator's protocols, in order."""
    opener = Opener(net, protocol)
    for _ in range(count):
        opener.open()
    net.run(0.1)
    for result in opener.results:
        if isinstance(result, Failure):
            result.raiseException()
    test.assertEqual(len(opener.results), count)
    return opener.results


class OpenTests(SynchronousTestCase):
    """A stream on an existing session: one message, its own connection."""

    def test_both_sides_carry_streams(self):
        net, client, server = started(self)
        self.assertIsNotNone(net.client_session.mux)
        self.assertIsNotNone(net.server_session.mux)
        self.assertEqual(net.client_session.stats()["streams"], 1)

    def test_open_is_one_message(self):
        """The listener builds the stream's protocol from one OPEN; the opener's connect fires on its WINDOW."""
        net, client, server = started(self)
        path = net.paths[0]
        before = len(numbered(path.client_sent))
        opener = Opener(net)
        opener.open()
        self.assertEqual(numbered(path.client_sent)[before:], [wire.open_record(2)])
        self.assertEqual(opener.results, [])
        path.deliver(to_server=True)
        self.assertEqual(len(net.built), 2)
        path.deliver(to_server=False)
        [protocol] = opener.results
        self.assertEqual(protocol.made, 1)
        self.assertEqual(net.built[1].made, 1)
        self.assertEqual(len(net.paths), 1)  # no new link, no new handshake

    def test_stream_interfaces(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        for transport in (protocol.transport, net.built[1].transport):
            verifyObject(ITransport, transport)
            verifyObject(IPushProducer, transport)
            verifyObject(IConsumer, transport)
            self.assertEqual(transport.getPeer().transport, "mem:1")
        self.assertEqual(protocol.transport.stream_id, 2)
        self.assertEqual(net.built[1].transport.stream_id, 2)

    def test_each_stream_its_own_bytes(self):
        net, client, server = started(self, protocol=MessageRecorder)
        streams = [client, *opened(self, net, 5, MessageRecorder)]
        for n, protocol in enumerate(streams):
            protocol.transport.writeMessage(blob(200_000 + n, seed=n))
        for n, protocol in enumerate(net.built):
            protocol.transport.writeMessage(blob(100_000 + n, seed=100 + n))
        net.run(1)
        for n, protocol in enumerate(net.built):
            self.assertEqual(protocol.messages, [blob(200_000 + n, seed=n)])
        for n, protocol in enumerate(streams):
            self.assertEqual(protocol.messages, [blob(100_000 + n, seed=100 + n)])

    def test_factory_refuses(self):
        """The listener's factory builds no protocol: the opener's connect fails, the session goes on."""
        net, client, server = started(self)
        net.server_session.mux.factory = _Factory(lambda: None)
        opener = Opener(net)
        opener.open()
        net.run(0.1)
        [failure] = opener.results
        failure.trap(StreamOpenError)
        self.assertEqual(failure.value.reason, ResetReason.REFUSED)
        self.assertIn("refused", str(failure.value))
        client.transport.write(b"still here")
        net.run(0.1)
        self.assertEqual(server.data, b"still here")

    def test_opener_factory_refuses(self):
        net, client, server = started(self)
        with self.assertRaises(StreamOpenError):
            net.client_session.mux.open(_Factory(lambda: None))
        self.assertEqual(len(net.client_session.mux), 1)

    def test_too_many_streams(self):
        """Beyond the listener's max_streams an OPEN is refused with a clear error."""
        net, client, server = started(self, server_params=SessionParams(max_streams=3))
        opener = Opener(net)
        for _ in range(3):
            opener.open()
        net.run(0.1)
        self.assertEqual(len(net.built), 3)
        ok, ok2, refused = opener.results
        refused.trap(StreamOpenError)
        self.assertEqual(refused.value.reason, ResetReason.TOO_MANY)
        self.assertIn("max_streams", str(refused.value))
        ok.transport.loseConnection()
        net.run(0.1)
        opened(self, net, 1)  # room again

    def test_opening_too_fast(self):
        """A burst beyond the rate is refused; the bucket refills with time."""
        params = SessionParams(max_streams=4, open_rate=1.0)
        net, client, server = started(self, server_params=params)
        opener = Opener(net)
        for _ in range(6):
            opener.open()
            net.run(0.01, step=0.01)
            if isinstance(opener.results[-1], Failure):
                break
            opener.results[-1].transport.loseConnection()
            net.run(0.01, step=0.01)
        refused = opener.results[-1]
        refused.trap(StreamOpenError)
        self.assertEqual(refused.value.reason, ResetReason.TOO_FAST)
        net.run(2)
        opened(self, net, 1)

    def test_cancelled_open_is_reset(self):
        """Giving up an open tells the listener, which ends the stream it built."""
        net, client, server = started(self)
        path = net.paths[0]
        d = Opener(net).open()
        path.deliver(to_server=True)
        d.cancel()
        net.run(0.1)
        self.assertEqual(len(net.built), 2)
        net.built[1].lost.trap(StreamResetError)
        self.assertEqual(len(net.client_session.mux), 1)
        self.assertEqual(len(net.server_session.mux), 1)

    def test_open_survives_a_lost_link(self):
        """The OPEN is numbered (resent), the WINDOW that accepts it is sent again on the new link."""
        net, client, server = started(self)
        path = net.paths[0]
        opener = Opener(net)
        opener.open()
        path.deliver(to_server=True)
        path.kill()
        net.run(2)
        [protocol] = opener.results
        self.assertEqual(protocol.made, 1)
        self.assertEqual(len(net.built), 2)
        protocol.transport.write(b"over the new link")
        net.run(0.1)
        self.assertEqual(net.built[1].data, b"over the new link")

    def test_peer_without_streams(self):
        """A peer that predates caps bit 3: one stream per session, as before."""
        net, client, server = started(self, server_params=SessionParams(streams=False))
        self.assertIsNone(net.client_session.mux)
        self.assertIsNone(net.server_session.mux)
        client.transport.write(b"x")
        client.transport.loseConnection()
        net.run(0.1)
        self.assertEqual(server.data, b"x")
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)


class CreditTests(SynchronousTestCase):
    """Each stream's own credit: a paused reader holds back its stream only."""

    def test_stalled_stream_stalls_no_other(self):
        params = SessionParams(window=MIN_WINDOW * 4)
        net, client, server = started(self, params=params)
        [other] = opened(self, net, 1)
        server.transport.pauseProducing()
        stalled = blob(4 * params.window, seed=1)
        moving = blob(4 * params.window, seed=2)
        client.transport.write(stalled)
        other.transport.write(moving)
        net.run(2)
        self.assertEqual(net.built[1].data, moving)
        self.assertEqual(server.data, b"")
        held = server.transport.stats()["stream_inbox_bytes"]
        self.assertLessEqual(held, params.window)
        self.assertGreater(client.transport.stats()["stream_blocked_bytes"], 0)
        self.assertLessEqual(net.client_session.stats()["retransmit_peak"], params.window + MIN_STREAM_WINDOW)
        server.transport.resumeProducing()
        net.run(2)
        self.assertEqual(server.data, stalled)

    def test_streams_share_the_window(self):
        """A receiver grants each stream a fair share of its window, never less than the minimum."""
        net, client, server = started(self)
        table = net.server_session.mux
        self.assertEqual(table.window, net.server_params.window)
        opened(self, net, 3)
        self.assertEqual(table.window, max(MIN_STREAM_WINDOW, net.server_params.window // 4))

    def test_new_stream_starts_with_the_initial_credit(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        net.built[1].transport.pauseProducing()
        protocol.transport.write(blob(4 * MIN_STREAM_WINDOW))
        net.run(1)
        inbox = net.built[1].transport.stats()["stream_inbox_bytes"]
        self.assertGreaterEqual(inbox, INITIAL_CREDIT)
        self.assertLessEqual(inbox, net.server_session.mux.window + INITIAL_CREDIT)

    def test_credit_violation_ends_the_session(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        net.built[1].transport.pauseProducing()
        protocol.transport._credit = 1 << 40  # a sender that ignores the stream's credit
        protocol.transport.write(blob(8 * net.server_params.window // 2))
        net.run(1)
        net.built[1].lost.trap(RecordError)
        client.lost.trap(PeerGoneError)

    def test_producer_follows_the_stream_credit(self):
        net, client, server = started(self, server_params=SessionParams(window=MIN_WINDOW))
        [protocol] = opened(self, net, 1)
        net.built[1].transport.pauseProducing()

        class Producer:
            paused = 0
            resumed = 0

            def pauseProducing(self):
                self.paused += 1

            def resumeProducing(self):
                self.resumed += 1

            def stopProducing(self):
                pass

        producer = Producer()
        protocol.transport.registerProducer(producer, True)
        protocol.transport.write(blob(MIN_STREAM_WINDOW * 8))
        self.assertEqual(producer.paused, 1)
        net.built[1].transport.resumeProducing()
        net.run(1)
        self.assertEqual(producer.resumed, 1)


class _EagerPusher(Pusher):
    """A producer that writes as soon as it is resumed (as a splice or a file sender does)."""

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self.produce()


class FairnessTests(SynchronousTestCase):
    def test_busy_streams_take_turns(self):
        """Two streams that always have more to send share the session: neither waits for the other to finish."""
        params = SessionParams(window=MIN_WINDOW)
        net, client, server = started(self, params=params)
        [other] = opened(self, net, 1)
        size = 16 * params.window
        pushers = [_EagerPusher(p.transport, blob(size, seed=n)) for n, p in enumerate((client, other))]
        for pusher, protocol in zip(pushers, (client, other), strict=True):
            protocol.transport.registerProducer(pusher, True)
        for pusher in pushers:
            pusher.produce()
        receivers = (server, net.built[1])
        for _ in range(2000):
            net.run(0.01, step=0.01)
            if any(len(r.data) >= size for r in receivers):
                break
        done = [len(r.data) for r in receivers]
        self.assertEqual(max(done), size)
        self.assertGreater(min(done), size // 3, f"one stream starved: {done}")


class EndTests(SynchronousTestCase):
    """Each stream ends by itself; the session ends with the initiator's last stream."""

    def test_finish_ends_one_stream(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        protocol.transport.write(b"last words")
        protocol.transport.loseConnection()
        net.run(0.1)
        protocol.lost.trap(ConnectionDone)
        net.built[1].lost.trap(ConnectionDone)
        self.assertEqual(net.built[1].data, b"last words")
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)
        client.transport.write(b"go on")
        net.run(0.1)
        self.assertEqual(server.data, b"go on")

    def test_listener_finishes(self):
        """The listener's close of a stream is a FINISH: the initiator's protocol ends cleanly, the session stays."""
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        server.transport.write(b"bye")
        server.transport.loseConnection()
        net.run(0.1)
        self.assertEqual(client.data, b"bye")
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
        self.assertIsNone(protocol.lost)
        protocol.transport.loseConnection()
        net.run(0.1)
        protocol.lost.trap(ConnectionDone)
        self.assertEqual(len(net.table), 0)  # the initiator's last stream ended: so did the session

    def test_last_stream_closes_the_session(self):
        net, client, server = started(self)
        client.transport.write(b"x")
        client.transport.loseConnection()
        net.run(0.1)
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
        self.assertEqual(server.data, b"x")
        self.assertEqual(len(net.table), 0)
        close = [p for p in numbered(net.paths[0].client_sent) if p[0] == RecordType.CLOSE]
        self.assertEqual(len(close), 1)

    def test_linger_keeps_an_idle_session(self):
        params = SessionParams(linger=5.0)
        net, client, server = started(self, params=params)
        client.transport.loseConnection()
        net.run(0.1)
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
        self.assertEqual(len(net.table), 1)
        net.run(3)
        [protocol] = opened(self, net, 1)
        protocol.transport.loseConnection()
        net.run(4)
        self.assertEqual(len(net.table), 1)  # the linger started again at the last stream's end
        net.run(2)
        self.assertEqual(len(net.table), 0)
        self.assertFalse(net.client_session.mux.accepting)

    def test_reset_leaves_the_others(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        protocol.transport.write(blob(300_000))
        protocol.transport.abortConnection()
        client.transport.write(b"unaffected")
        net.run(0.5)
        protocol.lost.trap(ConnectionAborted)
        net.built[1].lost.trap(StreamResetError)
        self.assertIsInstance(net.built[1].lost.value, PeerGoneError)
        self.assertEqual(server.data, b"unaffected")
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)

    def test_writes_after_a_reset_are_dropped(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        net.built[1].transport.abortConnection()
        net.run(0.1)
        before = len(numbered(net.paths[0].client_sent))
        protocol.transport.write(b"too late")
        protocol.transport.loseConnection()
        self.assertEqual(len(numbered(net.paths[0].client_sent)), before)
        self.assertEqual(protocol.losts, 1)

    def test_listener_reset(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        net.built[1].transport.abortConnection()
        net.run(0.1)
        protocol.lost.trap(StreamResetError)
        self.assertIsNone(client.lost)

    def test_half_close_per_stream(self):
        from .test_session import HalfCloser

        net, client, server = started(self, protocol=HalfCloser)
        [protocol] = opened(self, net, 1, HalfCloser)
        protocol.transport.write(b"request")
        protocol.transport.loseWriteConnection()
        net.run(0.1)
        listener = net.built[1]
        self.assertEqual((listener.data, listener.read_lost), (b"request", 1))
        listener.transport.write(b"reply")
        listener.transport.loseWriteConnection()
        net.run(0.1)
        self.assertEqual(protocol.data, b"reply")
        protocol.lost.trap(ConnectionDone)
        listener.lost.trap(ConnectionDone)
        self.assertIsNone(client.lost)

    def test_paused_reader_reads_before_the_end(self):
        """A FINISH (or the session's CLOSE) waits behind what a paused reader holds."""
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        listener = net.built[1]
        listener.transport.pauseProducing()
        protocol.transport.write(b"held")
        protocol.transport.loseConnection()
        client.transport.loseConnection()
        net.run(1)
        protocol.lost.trap(ConnectionDone)
        self.assertIsNone(listener.lost)
        self.assertEqual(listener.data, b"")
        listener.transport.resumeProducing()
        self.assertEqual(listener.data, b"held")
        listener.lost.trap(ConnectionDone)

    def test_crossing_finishes(self):
        net, client, server = started(self)
        [protocol] = opened(self, net, 1)
        protocol.transport.write(blob(500_000, seed=3))
        net.built[1].transport.write(blob(500_000, seed=4))
        protocol.transport.loseConnection()
        net.built[1].transport.loseConnection()
        net.run(1)
        protocol.lost.trap(ConnectionDone)
        net.built[1].lost.trap(ConnectionDone)
        self.assertIsNone(client.lost)

    def test_session_loss_ends_every_stream(self):
        net, client, server = started(self, resume=False)
        streams = opened(self, net, 3)
        net.paths[0].kill()
        net.run(0.1)
        for protocol in [client, *streams]:
            self.assertIsNotNone(protocol.lost)
        net.run(31, step=1)  # the listener waits out its resume limit
        for protocol in [client, *streams, *net.built]:
            self.assertIsNotNone(protocol.lost)
            self.assertEqual(protocol.losts, 1)


class PathTests(SynchronousTestCase):
    """Streams move with their session."""

    def test_streams_survive_lost_links(self):
        net, client, server = started(self, protocol=MessageRecorder)
        streams = [client, *opened(self, net, 4, MessageRecorder)]
        sent = {}
        for n, protocol in enumerate(streams):
            sent[n] = [blob(150_000, seed=10 * n + i) for i in range(3)]
            for message in sent[n]:
                protocol.transport.writeMessage(message)
        net.paths[0].deliver(to_server=True, chunks=3)
        net.paths[0].kill()
        net.run(1)
        net.paths[-1].kill()
        net.run(2)
        for n, protocol in enumerate(net.built):
            self.assertEqual(protocol.messages, sent[n])
        self.assertGreaterEqual(len(net.paths), 3)

    def test_streams_move_with_a_planned_rotation(self):
        """A relay's announced cap moves the session make-before-break: every stream goes on, nothing resent."""
        net = Net(protocol=MessageRecorder)
        net.expires_in = 2.0
        client, server = net.start(self)
        streams = [client, *opened(self, net, 3, MessageRecorder)]
        for round_ in range(4):
            for n, protocol in enumerate(streams):
                protocol.transport.writeMessage(blob(50_000, seed=100 * round_ + n))
            net.run(1.0)
            for path in net.live:
                if net.clock.seconds() >= path.a.expires_at:
                    path.a.closed = path.b.closed = True
        net.run(1)
        for n, protocol in enumerate(net.built):
            self.assertEqual(protocol.messages, [blob(50_000, seed=100 * r + n) for r in range(4)])
        self.assertGreaterEqual(net.client_session.swaps, 1)
        self.assertIsNone(client.lost)

    def test_protocol_errors(self):
        """An OPEN out of turn, or data on a stream never opened, ends the session: the peer broke the protocol."""
        for plaintext in (wire.open_record(4), wire.data_record(RecordType.DATA, 8, b"x"), wire.open_record(3)):
            with self.subTest(plaintext=plaintext):
                net, client, server = started(self)
                net.client_session.send((plaintext, b""))
                net.run(0.1)
                server.lost.trap(RecordError)
                client.lost.trap(PeerGoneError)
