"""
A planned move (the initiator moves before a relay's cap) while the old
pipe has paused the session, and so the user's streaming producer: the move
registers the session on the new pipe, which resumes the producer, and a
producer that writes at once when resumed (PatternSender, FileSender's
pull, most bulk writers) must not put numbered records on the new link
before its START; the peer refuses them ("the peer sent a numbered record
on a link before START") and, since 3450f59, aborts the whole session.

Found by tests/test_vercel_streams.py under load (test_one_instance failed 5
of 9 runs with three runs in parallel on 2 CPUs). Fails until
Session._activate sends START (or a forced move's resend) before it
registers on the new pipe.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase

from pluresync.secure.frames import RecordType
from pluresync.session import wire
from pluresync.session.params import SessionParams

from .test_session import Net, Pusher, blob


class EagerPusher(Pusher):
    """A L{Pusher} that writes as soon as it is resumed (as a file sender or the stream harness's sender do)."""

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self.produce()


class RotationWithAPausedWriterTests(SynchronousTestCase):
    def test_start_comes_first_on_the_new_link(self):
        """
        The writer is paused by the old pipe when the rotation comes and
        writes as soon as the new pipe resumes it: START still comes first
        on the new link, and the stream goes on whole.
        """
        net = Net(params=SessionParams(stall=100, ping=100))
        net.expires_in = 4.0  # the session moves to a new link at 3 s
        client, server = net.start(self)
        data = blob(64 * 16384, seed=3)
        pusher = EagerPusher(client.transport, data)
        client.transport.registerProducer(pusher, True)
        pusher.produce()  # 1 MiB, within the credit: all written
        net.run(2.9)
        old = net.paths[0]
        # The old pipe's buffer is full: it pauses the session, which pauses the writer.
        old.a.producer.pauseProducing()
        self.assertTrue(pusher.paused)
        written_before = pusher.sent
        pusher.data += blob(8 * 16384, seed=4)  # more to write once resumed
        net.run(0.2)  # the rotation at 3 s
        self.assertEqual(len(net.paths), 2)
        new = net.paths[1]
        kinds = [p[0] for p in new.client_sent]
        first_numbered = next((i for i, k in enumerate(kinds) if k in wire.NUMBERED), None)
        self.assertGreater(pusher.sent, written_before, "the writer was not resumed by the move")
        self.assertIsNotNone(first_numbered)
        self.assertIn(
            RecordType.START,
            kinds[:first_numbered],
            "numbered records went out on the new link before its START: "
            f"{[RecordType(k).name for k in kinds[: first_numbered + 2]]}",
        )
        net.run(1)
        self.assertIsNone(server.lost, server.lost and server.lost.getErrorMessage())
        self.assertEqual(server.data, pusher.data)
        client.transport.unregisterProducer()
        client.transport.loseConnection()
        net.run(1)
        client.lost.trap(ConnectionDone)
        server.lost.trap(ConnectionDone)
