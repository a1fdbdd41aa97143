"""
A session's life (pluresync.session.lifecycle) on a Clock, with fake links:
attached, detached, the resume limit, reconnecting, the clean end that waits
for its pipes, and the ends that do not.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pluresync.errors import RelayLostError
from pluresync.secure.frames import RecordType
from pluresync.session import wire
from pluresync.session.params import SessionParams
from pluresync.session.session import Phase, Session, SessionExpiredError, UnconfirmedCloseError
from pluresync.session.stream import Stream


class FakePipe:
    def __init__(self) -> None:
        self.producer = None

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class FakeLink:
    """A link in use, as a session sees it; the test delivers its records and its end."""

    def __init__(self, name: str = "relay:fake") -> None:
        self.name = name
        self.pipe = FakePipe()
        self.usable = True
        self.owner = None
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def adopt(self, owner) -> None:
        self.owner = owner

    def sendRecord(self, plaintext) -> None:
        self.sent.append(bytes(plaintext))

    def sendRecords(self, plaintexts) -> None:
        self.sent.extend(bytes(p) for p in plaintexts)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.usable = False

    def kinds(self) -> list[int]:
        return [record[0] for record in self.sent]

    def lose(self, reason: Failure) -> None:
        """The pipe ended: the owner hears it."""
        self.usable = False
        self.owner.linkLost(self, reason)


class Ended(Protocol):
    def __init__(self) -> None:
        self.reason = None

    def connectionLost(self, reason) -> None:
        self.reason = reason


PARAMS = SessionParams(resume=5.0)


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reconnects: list[Deferred] = []
        self.session = Session(
            self.clock,
            initiator=True,
            ident=b"\x01" * 16,
            peer_static=b"\x02" * 32,
            params=PARAMS,
            peer_max=PARAMS.window,
            reconnect=self.reconnect,
        )
        self.stream = Stream(self.session, 0, "local")
        self.protocol = Ended()
        self.first = FakeLink()
        self.session.addLink(self.first, 0, PARAMS.window)
        self.stream.attach(self.protocol)

    def reconnect(self, hello) -> Deferred:
        self.hellos = getattr(self, "hellos", []) + [hello()]
        d: Deferred = Deferred()
        self.reconnects.append(d)
        return d

    def test_attached_on_its_first_link(self):
        """A session with a link is attached; its first records there are START and ACK."""
        self.assertIs(self.session.phase, Phase.ATTACHED)
        self.assertEqual(self.first.kinds()[:2], [RecordType.START, RecordType.ACK])

    def test_lost_link_detaches_and_reconnects_next_turn(self):
        """Losing the only link detaches the session; the initiator reconnects on the next turn, with a RESUME hello."""
        self.first.lose(Failure(RelayLostError("gone")))
        self.assertIs(self.session.phase, Phase.DETACHED)
        self.assertEqual(self.reconnects, [])
        self.clock.advance(0)
        self.assertEqual(len(self.reconnects), 1)
        self.assertEqual(self.hellos[0].intent, wire.Intent.RESUME)
        self.assertEqual(self.hellos[0].session_id, b"\x01" * 16)

    def test_back_before_the_limit(self):
        """A link that comes back within the resume limit reattaches; the limit's clock stops."""
        self.first.lose(Failure(RelayLostError("gone")))
        self.clock.advance(1)
        second = FakeLink("relay:other")
        self.session.addLink(second, 0, PARAMS.window)
        self.assertIs(self.session.phase, Phase.ATTACHED)
        self.assertEqual(self.session.path, "relay:other")
        self.clock.advance(PARAMS.resume * 2)
        self.assertIsNone(self.protocol.reason)

    def test_the_resume_limit(self):
        """No link within the limit: the session ends with SessionExpiredError saying why."""
        self.first.lose(Failure(RelayLostError("the relay died")))
        self.clock.advance(0)
        self.clock.advance(PARAMS.resume)
        self.assertIs(self.session.phase, Phase.ENDED)
        self.protocol.reason.trap(SessionExpiredError)
        self.assertIn("no path to the peer within 5 s", self.protocol.reason.getErrorMessage())
        self.assertTrue(self.reconnects[-1].called)  # the attempt in flight was cancelled

    def test_clean_end_waits_for_the_pipes(self):
        """
        A confirmed close is reported only once the link's pipe has closed
        (flushing), so the last bytes left the process first.
        """
        self.stream.loseConnection()  # the CLOSE is numbered record 0: nothing else was sent
        self.session.linkRecord(self.first, RecordType.ACK, wire.ack_record(1, PARAMS.window * 2))
        self.assertTrue(self.first.closed)
        self.assertIsNone(self.protocol.reason)
        self.first.lose(Failure(ConnectionDone()))
        self.protocol.reason.trap(ConnectionDone)

    def test_flush_gives_up(self):
        """A pipe that never closes after a clean end is dropped after the flush timeout; the end is still clean."""
        self.stream.loseConnection()  # the CLOSE is numbered record 0: nothing else was sent
        self.session.linkRecord(self.first, RecordType.ACK, wire.ack_record(1, PARAMS.window * 2))
        self.clock.advance(10)
        self.assertTrue(self.first.aborted)
        self.protocol.reason.trap(ConnectionDone)

    def test_close_unconfirmed(self):
        """A close whose acknowledgement never comes ends with UnconfirmedCloseError, never ConnectionDone."""
        self.stream.write(b"x" * 1000)
        self.stream.loseConnection()
        self.first.lose(Failure(RelayLostError("gone")))
        self.clock.advance(0)
        self.clock.advance(PARAMS.resume)
        self.protocol.reason.trap(UnconfirmedCloseError)
        self.assertIn("may be undelivered", self.protocol.reason.getErrorMessage())

    def test_abort_tells_the_peer(self):
        """abortConnection sends ABORT on the link and ends at once."""
        self.stream.abortConnection()
        self.assertEqual(self.first.kinds()[-1], RecordType.ABORT)
        self.protocol.reason.trap(ConnectionAborted)
        self.assertIs(self.session.phase, Phase.ENDED)

    def test_peer_abort(self):
        """An ABORT from the peer ends the session at once with PeerGoneError, and sends none back."""
        self.session.linkRecord(self.first, RecordType.ABORT, wire.abort_record(wire.AbortReason.ABORTED))
        self.assertIn("the peer aborted", self.protocol.reason.getErrorMessage())
        self.assertNotIn(RecordType.ABORT, self.first.kinds())

    def test_link_after_the_end_is_dropped(self):
        """A link that arrives after the session ended is aborted; nothing changes."""
        self.stream.abortConnection()
        late = FakeLink()
        self.session.addLink(late, 0, PARAMS.window)
        self.assertTrue(late.aborted)
        self.assertIs(self.session.phase, Phase.ENDED)

    def test_resume_zero(self):
        """With resume=0 the first lost link ends the session, with its error."""
        clock = Clock()
        session = Session(
            clock,
            initiator=False,
            ident=b"\x03" * 16,
            peer_static=b"\x04" * 32,
            params=SessionParams(resume=0),
            peer_max=PARAMS.window,
        )
        stream = Stream(session, 0, "local")
        protocol = Ended()
        link = FakeLink()
        session.addLink(link, 0, PARAMS.window)
        stream.attach(protocol)
        link.lose(Failure(RelayLostError("gone")))
        protocol.reason.trap(RelayLostError)
        self.assertEqual(clock.getDelayedCalls(), [])
