"""
pluresync listen / connect: the splice underneath (unit tests on fake
transports) and the commands themselves as processes through a local relay.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pluresync.cli.netcat import SharedStdio, stdio_splice
from pluresync.cli.splice import Splice, SpliceFailed
from pluresync.endpoints import relaylistener
from pluresync.errors import PeerGoneError
from pluresync.keys import SyncKey

from .localrelay import LocalRelay
from .processes import spawn


class FakeTransport(StringTransport):
    """A StringTransport that half-closes and aborts, like TCP and SecureChannel."""

    def __init__(self) -> None:
        super().__init__()
        self.write_shut = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_shut = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def unregisterProducer(self) -> None:
        self.producer = None  # real transports allow this twice


def joined() -> tuple[Splice, FakeTransport, FakeTransport]:
    splice = Splice("end a", "end b")
    ta, tb = FakeTransport(), FakeTransport()
    splice.a.makeConnection(ta)
    splice.b.makeConnection(tb)
    return splice, ta, tb


class SpliceTests(SynchronousTestCase):
    """The splice that every command is made of."""

    def test_nothing_flows_before_both_ends_exist(self):
        """The first end is paused until the second connects, then resumed; bytes then go both ways."""
        splice = Splice("a", "b")
        ta, tb = FakeTransport(), FakeTransport()
        splice.a.makeConnection(ta)
        self.assertEqual(ta.producerState, "paused")
        splice.b.makeConnection(tb)
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))
        splice.a.dataReceived(b"to b")
        splice.b.dataReceived(b"to a")
        self.assertEqual((tb.value(), ta.value()), (b"to b", b"to a"))
        self.assertEqual((splice.a.count, splice.b.count), (4, 4))

    def test_backpressure(self):
        """A consumer that pauses its producer pauses reading on the other end, and resumes it."""
        splice, ta, tb = joined()
        self.assertTrue(tb.streaming)
        tb.producer.pauseProducing()  # b's buffer is full
        self.assertEqual(ta.producerState, "paused")
        tb.producer.resumeProducing()
        self.assertEqual(ta.producerState, "producing")
        ta.producer.pauseProducing()
        self.assertEqual(tb.producerState, "paused")

    def test_stop_producing_is_not_an_abort(self):
        """A consumer going away (stopProducing) does not abort the other end: connectionLost decides."""
        splice, ta, tb = joined()
        tb.producer.stopProducing()
        self.assertFalse(ta.aborted or ta.disconnecting)

    def test_half_close_one_way_then_the_other(self):
        """a's EOF half-closes b; b's data still reaches a; b's EOF then closes a fully, and done fires."""
        splice, ta, tb = joined()
        splice.a.readConnectionLost()
        self.assertTrue(tb.write_shut)
        self.assertIsNone(tb.producer)
        self.assertFalse(tb.disconnecting)
        splice.b.dataReceived(b"late reply")
        self.assertEqual(ta.value(), b"late reply")
        splice.b.writeConnectionLost()
        splice.b.readConnectionLost()
        self.assertTrue(ta.disconnecting)  # a's input ended already: a full close, flushed
        self.assertTrue(tb.disconnecting)  # both of b's directions are over
        self.assertNoResult(splice.done)
        splice.a.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(splice.done))

    def test_clean_close_closes_the_other(self):
        """A clean full close of one end closes the other after its buffer (not an abort)."""
        splice, ta, tb = joined()
        splice.b.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(ta.disconnecting)
        self.assertFalse(ta.aborted)
        splice.a.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(splice.done)

    def test_cut_aborts_the_other_and_fails(self):
        """A cut end aborts the other (never a clean EOF), and done fails naming the cut end and why."""
        splice, ta, tb = joined()
        splice.b.connectionLost(Failure(PeerGoneError("the peer vanished")))
        self.assertTrue(ta.aborted)
        splice.a.connectionLost(Failure(ConnectionAborted()))
        failure = self.failureResultOf(splice.done, SpliceFailed)
        self.assertEqual(str(failure.value), "end b was cut: the peer vanished")
        self.assertTrue(failure.value.reason.check(PeerGoneError))

    def test_output_closed_by_its_reader(self):
        """An end whose output closes without being asked (stdout's reader left) fails the splice."""
        splice, ta, tb = joined()
        splice.a.writeConnectionLost()
        self.assertTrue(tb.aborted)
        splice.b.connectionLost(Failure(ConnectionAborted()))
        failure = self.failureResultOf(splice.done, SpliceFailed)
        self.assertEqual(str(failure.value), "end a stopped accepting data")

    def test_lost_before_the_other_connects(self):
        """An end lost while the other is still connecting ends the splice; a late end is closed at once."""
        splice = Splice("a", "b")
        ta, tb = FakeTransport(), FakeTransport()
        splice.a.makeConnection(ta)
        splice.a.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(splice.done)
        splice.b.makeConnection(tb)
        self.assertTrue(tb.disconnecting)

    def test_unreachable(self):
        """An end that could not be connected aborts the waiting one and says so."""
        splice = Splice("a", "the service")
        ta = FakeTransport()
        splice.a.makeConnection(ta)
        splice.unreachable(splice.b, Failure(ConnectionRefusedError("refused")))
        self.assertTrue(ta.aborted)
        splice.a.connectionLost(Failure(ConnectionAborted()))
        failure = self.failureResultOf(splice.done, SpliceFailed)
        self.assertEqual(str(failure.value), "could not open the service: refused")


class FakeStdio(FakeTransport):
    """What SharedStdio is given instead of StandardIO."""

    def __init__(self, protocol) -> None:
        super().__init__()
        self.protocol = protocol
        protocol.makeConnection(self)


class SharedStdioTests(SynchronousTestCase):
    """stdin/stdout lent to connections."""

    def setUp(self):
        self.stdios: list[FakeStdio] = []

    def shared(self, keep_open: bool) -> SharedStdio:
        def make(protocol):
            self.stdios.append(FakeStdio(protocol))
            return self.stdios[-1]

        return SharedStdio(None, keep_open=keep_open, make=make)

    def test_made_when_the_peer_arrives(self):
        """stdio is opened only when the peer connects, and then carries bytes both ways."""
        shared = self.shared(False)
        splice = stdio_splice(shared, "the peer")
        self.assertEqual(self.stdios, [])
        peer = FakeTransport()
        splice.b.makeConnection(peer)
        [stdio] = self.stdios
        stdio.protocol.dataReceived(b"from stdin")
        splice.b.dataReceived(b"to stdout")
        self.assertEqual((peer.value(), stdio.value()), (b"from stdin", b"to stdout"))
        self.assertIs(stdio.producer._transport, peer)  # the peer feeds stdout, paced by it

    def test_single_connection_half_closes(self):
        """stdin's EOF half-closes the peer; the peer's EOF closes stdout; both flushed, done fires."""
        shared = self.shared(False)
        splice = stdio_splice(shared, "the peer")
        peer = FakeTransport()
        splice.b.makeConnection(peer)
        [stdio] = self.stdios
        stdio.protocol.readConnectionLost()  # stdin EOF
        self.assertTrue(peer.write_shut)
        splice.b.writeConnectionLost()
        splice.b.readConnectionLost()  # the peer's end of its direction
        self.assertTrue(stdio.disconnecting)  # stdout closed (after its buffer)
        splice.b.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(splice.done)  # stdout not flushed yet
        stdio.protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(splice.done)

    def test_keep_open_lends_stdio_in_turn(self):
        """With --keep-open stdout stays open between connections, and a stdin EOF reaches later ones at once."""
        shared = self.shared(True)
        first = stdio_splice(shared, "first")
        peer1 = FakeTransport()
        first.b.makeConnection(peer1)
        [stdio] = self.stdios
        stdio.protocol.readConnectionLost()  # stdin ended during the first connection
        self.assertTrue(peer1.write_shut)
        first.b.dataReceived(b"one ")
        first.b.readConnectionLost()
        first.b.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(first.done)
        self.assertFalse(stdio.disconnecting)
        self.assertFalse(stdio.write_shut)

        second = stdio_splice(shared, "second")
        peer2 = FakeTransport()
        second.b.makeConnection(peer2)
        self.assertEqual(len(self.stdios), 1)
        self.assertTrue(peer2.write_shut)  # stdin is over: the second peer hears it at once
        second.b.dataReceived(b"two")
        second.b.readConnectionLost()
        second.b.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(second.done)
        self.assertEqual(stdio.value(), b"one two")

    def test_peer_cut_closes_stdout_and_fails(self):
        """A cut peer: what arrived is flushed to stdout, and done fails with the reason."""
        shared = self.shared(False)
        splice = stdio_splice(shared, "the connection to the peer")
        peer = FakeTransport()
        splice.b.makeConnection(peer)
        [stdio] = self.stdios
        splice.b.dataReceived(b"partial")
        splice.b.connectionLost(Failure(PeerGoneError("the peer vanished")))
        self.assertTrue(stdio.disconnecting)
        stdio.protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(splice.done, SpliceFailed)
        self.assertEqual(str(failure.value), "the connection to the peer was cut: the peer vanished")
        self.assertEqual(stdio.value(), b"partial")


def escaped_url(relay: LocalRelay) -> str:
    return relay.url.replace(":", "\\:")


class NetcatProcessTests(TestCase):
    """`pluresync listen` and `pluresync connect` as processes, through a relay in this process."""

    timeout = 90

    def setUp(self):
        self.relay = LocalRelay(self)
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        self.keyfile = base / "key"
        SyncKey.generate().write(self.keyfile)
        self.homes = [base / "home-listen", base / "home-connect"]
        self.endpoint = f"relay:url={escaped_url(self.relay)}:keyfile={quoteStringArgument(str(self.keyfile))}"

    def run_cli(self, args: list[str], home: Path, stdin: bytes | None = None, marker: bytes | None = None):
        child = spawn(self, ["-m", "pluresync", *args], marker=marker, env={"PLURESYNC_HOME": str(home)})
        if stdin is not None:
            child.transport.write(stdin)
            child.transport.closeStdin()
        return child

    async def test_five_mebibytes_each_way_is_exact(self):
        """5 MiB from connect's stdin reach listen's stdout and a reply comes back, both intact; both exit 0."""
        upload, reply = os.urandom(5 * 1024 * 1024), os.urandom(300_000)
        listener = self.run_cli(["listen", self.endpoint], self.homes[0], stdin=reply)
        connector = self.run_cli(["connect", "--progress", self.endpoint + ":wait=20"], self.homes[1], stdin=upload)
        self.assertEqual(await connector.ended, 0, connector.err.decode())
        self.assertEqual(await listener.ended, 0, listener.err.decode())
        self.assertEqual(hashlib.sha256(listener.out).hexdigest(), hashlib.sha256(upload).hexdigest())
        self.assertEqual(hashlib.sha256(connector.out).hexdigest(), hashlib.sha256(reply).hexdigest())
        summary = connector.err.decode().splitlines()[-1]
        self.assertRegex(summary, r"^pluresync: sent 5\.0 MiB, received 293\.0 KiB in [\d.]+ s \(.+/s\)$")

    async def test_failing_connect_is_one_line(self):
        """Nobody listening (wait=0): exactly one line on stderr, no traceback, exit 1."""
        connector = self.run_cli(["connect", self.endpoint + ":wait=0"], self.homes[1], stdin=b"")
        self.assertEqual(await connector.ended, 1)
        lines = connector.err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("pluresync: error: "), lines)
        self.assertIn("no-listener", lines[0])
        self.assertEqual(connector.out, b"")

    async def test_bad_endpoint_is_one_line(self):
        """A wrong endpoint string is one line naming the problem, exit 1; --debug adds the traceback."""
        child = self.run_cli(["listen", self.endpoint + ":bogus=1"], self.homes[0], stdin=b"")
        self.assertEqual(await child.ended, 1)
        self.assertEqual(len(child.err.decode().splitlines()), 1)
        self.assertIn("unknown parameter(s) bogus", child.err.decode())
        debug = self.run_cli(["listen", "--debug", self.endpoint + ":bogus=1"], self.homes[0], stdin=b"")
        self.assertEqual(await debug.ended, 1)
        self.assertIn("Traceback", debug.err.decode())

    async def test_peer_id_is_stable_and_is_the_listeners(self):
        """peer-id prints the same id twice, and a connector with that peer= reaches the listener."""
        first = self.run_cli(["peer-id"], self.homes[0])
        second = self.run_cli(["peer-id"], self.homes[0])
        self.assertEqual((await first.ended, await second.ended), (0, 0))
        peer_id = first.out.decode().strip()
        self.assertRegex(peer_id, "^[0-9a-f]{64}$")
        self.assertEqual(second.out.decode().strip(), peer_id)
        listener = self.run_cli(["listen", self.endpoint], self.homes[0], stdin=b"it is me")
        connector = self.run_cli(
            ["connect", f"{self.endpoint}:wait=20:peer={peer_id}"], self.homes[1], stdin=b"who are you?"
        )
        self.assertEqual(await connector.ended, 0, connector.err.decode())
        self.assertEqual(await listener.ended, 0, listener.err.decode())
        self.assertEqual((connector.out, listener.out), (b"it is me", b"who are you?"))
        self.assertIn(peer_id, listener.err.decode())

    async def test_refused_peer_notice_and_close_leave_the_process(self):
        """
        connect with peer= naming another id than the listener proves exits
        1 only after its refusal notice (0x02) and its WebSocket close 1000
        have reached the relay, so the listener learns "refused", not a
        dropped peer (issue 12's CLI bug: the process exited before they left).
        """
        # A listener that declares one peer id to the relay and proves another.
        someone_else = "ab" * 32
        declare = relaylistener.encode_listen
        self.patch(relaylistener, "encode_listen", lambda rdv, peer: declare(rdv, someone_else))
        endpoint = serverFromString(reactor, self.endpoint)
        port = await endpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        connector = self.run_cli(["connect", f"{self.endpoint}:wait=20:peer={someone_else}"], self.homes[1], stdin=b"")
        self.assertEqual(await connector.ended, 1)
        self.assertIn("not the requested", connector.err.decode())
        streams = [websocket_frames(stream) for stream in self.relay._tap.tapped]
        (frames,) = [f for f in streams if f and b'"op":"connect"' in f[0][1]]
        binary = [payload for opcode, payload in frames if opcode == 2]
        closes = [payload for opcode, payload in frames if opcode == 8]
        self.assertEqual(binary[-1], b"\x00\x01\x02", "the refusal notice is the connector's last message")
        self.assertEqual([c[:2] for c in closes], [b"\x03\xe8"], "then a close 1000")


def websocket_frames(stream: bytes) -> list[tuple[int, bytes]]:
    """A client's WebSocket frames as the relay received them: (opcode, unmasked payload), after the upgrade."""
    rest = bytes(stream).partition(b"\r\n\r\n")[2]
    frames = []
    i = 0
    while i + 2 <= len(rest):
        opcode, length = rest[i] & 0x0F, rest[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(rest[i : i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(rest[i : i + 8], "big"), i + 8
        mask, i = rest[i : i + 4], i + 4
        payload = rest[i : i + length]
        if len(payload) < length:
            break
        frames.append((opcode, bytes(b ^ mask[j % 4] for j, b in enumerate(payload))))
        i += length
    return frames
