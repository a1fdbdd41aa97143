"""
The contract between pluresync and Autobahn's private state.

The relay and the client read, write, call and override Autobahn internals
(L{pluresync.wsframes.AUTOBAHN_INTERNALS} lists them, with what pluresync
assumes of each). Autobahn documents none of them, so an upgrade may change
one silently: the fast data path would then misparse a stream, or a timer
would run on the wrong reactor, rather than fail. These tests fail first,
and loudly, naming the Autobahn version, the name and the pluresync module
that relies on it; docs/relay.md says how an upgrade is checked.

Each behaviour is checked on Autobahn's own protocol classes (not
pluresync's subclasses, which would hide a change behind their overrides),
fed over a L{StringTransport} with the timers on a L{Clock}.
"""

from __future__ import annotations

import inspect
import os
import re
from collections import deque
from pathlib import Path
from typing import Any

import autobahn
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pluresync.reactortimers import ReactorTimers
from pluresync.wsframes import AUTOBAHN_INTERNALS, OP_BINARY, AutobahnInternal, frame_header

ROOT = Path(__file__).resolve().parent.parent
INTERNALS = {entry.name: entry for entry in AUTOBAHN_INTERNALS}

_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def broken(name: str, detail: str) -> str:
    """The failure message: which Autobahn, what changed, who relies on it, what to do."""
    entry = INTERNALS[name]
    return (
        f"Autobahn {autobahn.__version__} changed {name!r} that {', '.join(entry.users)} relies on: {detail}\n"
        f"pluresync assumes: {entry.assumption}\n"
        "Adapt those modules (or pin Autobahn below this release) before upgrading; "
        "see docs/relay.md, 'Autobahn internals pluresync relies on'."
    )


def masked_frame(payload: bytes, opcode: int = OP_BINARY, fin: bool = True) -> bytes:
    """One frame as a client sends it (masked)."""
    mask = os.urandom(4)
    body = create_xor_masker(mask, len(payload)).process(payload) if payload else b""
    return frame_header(len(payload), opcode, fin, mask) + body


class Transport(StringTransport):
    """A L{StringTransport} that, like a TCP transport, accepts an C{unregisterProducer} without a producer."""

    def unregisterProducer(self) -> None:
        self.producer = self.streaming = None


class RecordingTimers(ReactorTimers):
    """L{ReactorTimers} on a L{Clock} that remembers what was scheduled through it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.scheduled: list[tuple[float, Any]] = []

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> Any:
        self.scheduled.append((delay, func))
        return super().call_later(delay, func, *args, **kwargs)


class RecordingServer(WebSocketServerProtocol):
    """Autobahn's server protocol, recording messages and the oversize hook (nothing else changed)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.oversize: list[tuple[int, int, str]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        self.oversize.append((msg_size, max_msg_size, reason))
        super()._max_message_size_exceeded(msg_size, max_msg_size, reason)


class RelayLikeServer(RecordingServer):
    """The relay's oversize hook: report it, set C{failedByMe}, and leave the connection to the caller."""

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        self.oversize.append((msg_size, max_msg_size, reason))
        self.failedByMe = True


def open_server(
    test: SynchronousTestCase, protocol_class: type = RecordingServer, **options: Any
) -> tuple[RecordingServer, StringTransport, RecordingTimers]:
    """A server protocol past its opening handshake, timers on a Clock, options set as the relay sets them."""
    clock = Clock()
    factory = WebSocketServerFactory(reactor=clock)
    factory.protocol = protocol_class
    timers = factory._batched_timer = RecordingTimers(clock)
    factory.setProtocolOptions(**{"failByDrop": True, "openHandshakeTimeout": 0, **options})
    protocol = factory.buildProtocol(None)
    transport = Transport()
    protocol.makeConnection(transport)
    protocol.dataReceived(_UPGRADE)
    test.assertEqual(protocol.state, WebSocketServerProtocol.STATE_OPEN, transport.value()[:200])
    transport.clear()
    test.addCleanup(lambda: [call.cancel() for call in clock.getDelayedCalls()])
    return protocol, transport, timers


class PresenceTests(SynchronousTestCase):
    """Each listed name exists where pluresync looks for it, with the kind and signature it uses."""

    def instance(self, owner: str) -> Any:
        """A connected Autobahn protocol (instance attributes exist only after C{connectionMade}), or a factory."""
        if owner == "factory":
            return WebSocketServerFactory(reactor=Clock())
        if owner == "client protocol":
            factory = WebSocketClientFactory("ws://localhost:9/", reactor=Clock())
            factory.protocol = WebSocketClientProtocol
            factory._batched_timer = ReactorTimers(Clock())
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(Transport())
            return protocol
        protocol, _, _ = open_server(self)
        return protocol

    def problem(self, entry: AutobahnInternal) -> str | None:
        """What changed about C{entry} in the installed Autobahn, or C{None}."""
        if entry.parameters is not None:
            classes = {
                "protocol": [WebSocketServerProtocol, WebSocketClientProtocol],
                "server protocol": [WebSocketServerProtocol],
                "client protocol": [WebSocketClientProtocol],
            }[entry.owner]
            for cls in classes:
                method = getattr(cls, entry.name, None)
                if not callable(method):
                    return broken(entry.name, f"{cls.__name__}.{entry.name} is no longer a method")
                names = tuple(inspect.signature(method).parameters)[1:]
                if names != entry.parameters:
                    return broken(entry.name, f"its parameters are now {names}, not {entry.parameters}")
            return None
        instance = self.instance(entry.owner)
        # http_status_line and http_headers exist only once an answer arrived: ClientTests checks them.
        if not hasattr(instance, entry.name) and entry.name not in ("http_status_line", "http_headers"):
            return broken(entry.name, f"a connected {type(instance).__name__} has no attribute {entry.name!r}")
        if entry.name == "_batched_timer" and not callable(getattr(instance._batched_timer, "call_later", None)):
            return broken(entry.name, "the factory's timer has no call_later method")
        return None

    def test_every_name(self) -> None:
        """Every entry of the list; all that changed are reported at once (an upgrade's whole work list)."""
        problems = [problem for problem in map(self.problem, AUTOBAHN_INTERNALS) if problem is not None]
        if problems:
            self.fail(f"{len(problems)} Autobahn internal(s) changed:\n\n" + "\n\n".join(problems))

    def test_listed_names_are_used(self) -> None:
        """The list stays true: each name is still used by the modules it names (a stale entry misleads)."""
        for entry in AUTOBAHN_INTERNALS:
            for user in entry.users:
                source = (ROOT / user).read_text()
                self.assertTrue(re.search(rf"\b{re.escape(entry.name)}\b", source), f"{user} no longer uses {entry}")

    def test_private_names_are_listed(self) -> None:
        """
        Every C{_private} Autobahn attribute that a module built on Autobahn
        touches (C{.name} on anything) is in the list: a new reliance is added there,
        where the contract tests and the docs see it.
        """
        autobahn_names: set[str] = set()
        for owner in ("protocol", "client protocol", "factory"):
            instance = self.instance(owner)
            autobahn_names |= set(dir(instance))
        autobahn_names |= set(dir(WebSocketClientFactory))
        private = {name for name in autobahn_names if name.startswith("_") and not name.startswith("__")}
        used: dict[str, str] = {}
        for path in sorted((ROOT / "pluresync").rglob("*.py")):
            source = path.read_text()
            # Only the modules whose objects are Autobahn's: they import it, or mix in the fast path.
            if not re.search(r"^\s*(from|import) autobahn\b|\bFastDataPath\b", source, re.MULTILINE):
                continue
            for name in re.findall(r"\.(_[A-Za-z]\w*)\b", source):
                if name in private:
                    used.setdefault(name, str(path.relative_to(ROOT)))
        unlisted = {name: where for name, where in used.items() if name not in INTERNALS}
        self.assertEqual(unlisted, {}, "Autobahn internals used but not in pluresync.wsframes.AUTOBAHN_INTERNALS")

    def test_documented(self) -> None:
        """docs/relay.md lists every name (the upgrade checklist is the list)."""
        docs = (ROOT / "docs" / "relay.md").read_text()
        missing = [entry.name for entry in AUTOBAHN_INTERNALS if not re.search(rf"`{re.escape(entry.name)}[`(]", docs)]
        self.assertEqual(missing, [], "docs/relay.md does not list these Autobahn internals")


class ParserStateTests(SynchronousTestCase):
    """
    What L{pluresync.wsframes.FastDataPath} reads to decide that it may take
    over: it may only parse from a frame boundary, outside a message, with
    Autobahn's buffer handed over.
    """

    def test_frame_split_across_reads(self) -> None:
        """
        Mid-frame, C{current_frame} is set; an incomplete header waits in
        C{data}; after the last byte both are clear and the message arrived.
        """
        protocol, _, _ = open_server(self)
        frame = masked_frame(b"x" * 300)  # a 16-bit length: a 2+2+4 byte header
        self.assertIsNone(protocol.current_frame, broken("current_frame", "not None between frames after the upgrade"))
        protocol.dataReceived(frame[:3])
        if protocol.current_frame is not None:
            self.fail(broken("current_frame", "set before the whole header arrived"))
        if protocol.data != frame[:3]:
            self.fail(broken("data", f"an incomplete header is not kept in data (data={protocol.data!r})"))
        protocol.dataReceived(frame[3:20])
        if protocol.current_frame is None:
            self.fail(broken("current_frame", "None while the payload of a frame is incomplete"))
        protocol.dataReceived(frame[20:])
        if protocol.current_frame is not None or protocol.inside_message:
            self.fail(broken("current_frame", "still set after the frame's last byte"))
        if protocol.data != b"":
            self.fail(broken("data", f"bytes left after a whole frame: {protocol.data!r}"))
        self.assertEqual(protocol.messages, [(b"x" * 300, True)])

    def test_fragmented_message(self) -> None:
        """Between the fragments of a message, C{inside_message} is True while C{current_frame} is None."""
        protocol, _, _ = open_server(self)
        protocol.dataReceived(masked_frame(b"first", fin=False))
        if protocol.current_frame is not None:
            self.fail(broken("current_frame", "set after a whole (non-final) frame"))
        if protocol.inside_message is not True:
            self.fail(broken("inside_message", "not True between the fragments of a message"))
        protocol.dataReceived(masked_frame(b"last", opcode=0, fin=True))
        if protocol.inside_message:
            self.fail(broken("inside_message", "still True after the final fragment"))
        self.assertEqual(protocol.messages, [(b"firstlast", True)])

    def test_data_received_hook(self) -> None:
        """C{_dataReceived} parses what it is handed, after what C{data} held (the fast path's handoff)."""
        protocol, _, _ = open_server(self)
        frame = masked_frame(b"handed back")
        protocol.dataReceived(frame[:1])
        protocol._dataReceived(frame[1:])
        if protocol.messages != [(b"handed back", True)]:
            self.fail(broken("_dataReceived", f"bytes handed to it were not parsed as frames: {protocol.messages}"))

    def test_oversize_message(self) -> None:
        """A frame, or a fragmented message, over C{maxMessagePayloadSize} calls C{_max_message_size_exceeded}."""
        for frames in ([masked_frame(b"y" * 200)], [masked_frame(b"y" * 60, fin=False), masked_frame(b"y" * 60, 0)]):
            protocol, transport, _ = open_server(self, maxFramePayloadSize=100, maxMessagePayloadSize=100)
            for frame in frames:
                protocol.dataReceived(frame)
            if len(protocol.oversize) != 1:
                self.fail(
                    broken("_max_message_size_exceeded", f"calls for {len(frames)} frame(s): {protocol.oversize}")
                )
            size, limit, reason = protocol.oversize[0]
            if limit != 100 or size <= 100 or not isinstance(reason, str):
                self.fail(broken("_max_message_size_exceeded", f"called with {protocol.oversize[0]}"))
            self.assertEqual(protocol.messages, [])
            self.assertTrue(transport.disconnecting)

    def test_failed_by_me(self) -> None:
        """
        With the relay's hook (C{failedByMe} set, no drop), nothing of the
        oversize message is delivered and the hook is not called again.
        """
        protocol, _, _ = open_server(self, RelayLikeServer, maxFramePayloadSize=100, maxMessagePayloadSize=100)
        protocol.dataReceived(masked_frame(b"z" * 60, fin=False) + masked_frame(b"z" * 60, 0, fin=False))
        protocol.dataReceived(masked_frame(b"z" * 60, 0))
        if protocol.messages:
            self.fail(broken("failedByMe", "a message was delivered after the oversize hook set it"))
        if len(protocol.oversize) != 1:
            self.fail(broken("failedByMe", f"the oversize hook was called again after it was set: {protocol.oversize}"))


class SharedStateTests(SynchronousTestCase):
    """What a relay socket assumes to keep its own dict small (websocket.py, C{RelayProtocol._compact})."""

    def test_options_copied_only_when_missing(self) -> None:
        """C{_connectionMade} copies a C{CONFIG_ATTRS} option only into a protocol that has none (C{hasattr})."""

        class FromFactory(RecordingServer):
            def __getattr__(self, name: str) -> Any:
                if name in WebSocketServerProtocol.CONFIG_ATTRS and "factory" in self.__dict__:
                    return getattr(self.factory, name)
                raise AttributeError(name)

        protocol, _, _ = open_server(self, FromFactory, autoPingInterval=7)
        copied = set(WebSocketServerProtocol.CONFIG_ATTRS) & set(vars(protocol))
        if copied:
            self.fail(broken("CONFIG_ATTRS", f"copied although the protocol had them: {sorted(copied)}"))
        self.assertEqual(protocol.autoPingInterval, 7)

    def test_send_queue_unused(self) -> None:
        """C{sendData} appends to C{send_queue} only when asked for a synchronous or chopped write."""
        protocol, transport, _ = open_server(self)
        appended: list[Any] = []

        class Watching(deque):
            def append(self, item: Any) -> None:
                appended.append(item)

        protocol.send_queue = Watching()
        protocol.sendMessage(b"x" * 100, True)
        protocol.sendPing(b"p")
        protocol.sendClose(1000)
        if appended:
            self.fail(broken("send_queue", f"a plain write was queued: {appended}"))
        self.assertTrue(transport.value())


class TimerTests(SynchronousTestCase):
    """Every Autobahn timer goes through the factory's C{_batched_timer}, which the relay and client replace."""

    def test_auto_ping(self) -> None:
        """
        The next ping is C{call_later(interval, _sendAutoPing)}; a sent ping
        sets C{autoPingPending} and schedules C{onAutoPingTimeout};
        C{_cancelAutoPingTimeoutCall} clears both and schedules the next ping.
        """
        protocol, transport, timers = open_server(self, autoPingInterval=10, autoPingTimeout=5)
        if (10, protocol._sendAutoPing) not in timers.scheduled:
            self.fail(broken("_batched_timer", f"no call_later(10, _sendAutoPing) after opening: {timers.scheduled}"))
        if protocol.autoPingPendingCall is None:
            self.fail(broken("autoPingPendingCall", "None while the next ping is scheduled"))
        timers._reactor.advance(10)
        if transport.value()[:1] != b"\x89":
            self.fail(broken("_sendAutoPing", f"no ping frame sent when its timer ran: {transport.value()[:8]!r}"))
        if not protocol.autoPingPending or protocol.autoPingTimeoutCall is None:
            self.fail(broken("autoPingPending", "no pending ping payload or timeout after a ping was sent"))
        if (5, protocol.onAutoPingTimeout) not in timers.scheduled:
            self.fail(
                broken("autoPingTimeoutCall", f"not scheduled as call_later(5, onAutoPingTimeout): {timers.scheduled}")
            )
        protocol._cancelAutoPingTimeoutCall()
        if protocol.autoPingTimeoutCall is not None or protocol.autoPingPending is not None:
            self.fail(broken("_cancelAutoPingTimeoutCall", "the timeout or the pending ping survived it"))
        if timers.scheduled[-1] != (10, protocol._sendAutoPing):
            self.fail(broken("_cancelAutoPingTimeoutCall", f"did not schedule the next ping: {timers.scheduled[-1]}"))
        timers._reactor.advance(10 + 5)
        self.assertFalse(transport.disconnecting, "a ping answered by traffic must not time out")

    def test_close_handshake_timer(self) -> None:
        """A close we send sets C{closedByMe} and starts C{closeHandshakeTimeoutCall} on the factory timer."""
        protocol, _, timers = open_server(self, closeHandshakeTimeout=3)
        protocol.sendCloseFrame(code=1000, isReply=False)
        if protocol.closedByMe is not True:
            self.fail(broken("closedByMe", "not True after this side sent the first close frame"))
        if protocol.closeHandshakeTimeoutCall is None or timers.scheduled[-1][0] != 3:
            self.fail(broken("closeHandshakeTimeoutCall", f"not started through _batched_timer: {timers.scheduled}"))

    def test_not_clean_reason(self) -> None:
        """A connection lost without a close handshake leaves a text in C{wasNotCleanReason}."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        protocol, _, _ = open_server(self)
        protocol.connectionLost(Failure(ConnectionLost()))
        if not isinstance(protocol.wasNotCleanReason, str) or not protocol.wasNotCleanReason:
            self.fail(broken("wasNotCleanReason", f"is {protocol.wasNotCleanReason!r} after an unclean loss"))


class RefusingServer(WebSocketServerProtocol):
    """Autobahn's server protocol, recording the two hooks of a refused upgrade."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        self.calls.append(f"failHandshake {code}")
        super().failHandshake(reason, code, responseHeaders)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        self.calls.append(f"sendHttpErrorResponse {code}")
        super().sendHttpErrorResponse(code, reason, responseHeaders)


class RefusedUpgradeTests(SynchronousTestCase):
    """The relay counts refused upgrades in its C{failHandshake} override."""

    def test_refused_upgrade(self) -> None:
        """A bad upgrade goes through C{failHandshake}, which answers through C{sendHttpErrorResponse}."""
        clock = Clock()
        factory = WebSocketServerFactory(reactor=clock)
        factory.protocol = RefusingServer
        factory._batched_timer = ReactorTimers(clock)
        factory.setProtocolOptions(openHandshakeTimeout=0)
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        protocol.dataReceived(_UPGRADE.replace(b"Version: 13", b"Version: 99"))
        if protocol.calls != ["failHandshake 400", "sendHttpErrorResponse 400"]:
            self.fail(broken("failHandshake", f"a bad upgrade made these calls: {protocol.calls}"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400"), transport.value()[:40])


class ClientTests(SynchronousTestCase):
    """What the client reads to explain a refused upgrade."""

    def test_refused_upgrade(self) -> None:
        """After a 401 answer, C{http_status_line} holds the status line and C{wasNotCleanReason} says why."""
        clock = Clock()
        factory = WebSocketClientFactory("ws://localhost:9/", reactor=clock)
        factory.protocol = WebSocketClientProtocol
        factory._batched_timer = ReactorTimers(clock)
        factory.setProtocolOptions(openHandshakeTimeout=0)
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        protocol.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        status = getattr(protocol, "http_status_line", None)
        if status != "HTTP/1.1 401 Unauthorized":
            self.fail(broken("http_status_line", f"is {status!r} after a 401 answer"))
        if not isinstance(protocol.wasNotCleanReason, str) or not protocol.wasNotCleanReason:
            self.fail(broken("wasNotCleanReason", f"is {protocol.wasNotCleanReason!r} after a refused upgrade"))

    def test_refused_upgrade_headers(self) -> None:
        """After a 429 answer, C{http_headers} holds its headers by lower-case name (Retry-After)."""
        clock = Clock()
        factory = WebSocketClientFactory("ws://localhost:9/", reactor=clock)
        factory.protocol = WebSocketClientProtocol
        factory._batched_timer = ReactorTimers(clock)
        factory.setProtocolOptions(openHandshakeTimeout=0)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(Transport())
        protocol.dataReceived(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n")
        headers = getattr(protocol, "http_headers", None)
        if not isinstance(headers, dict) or headers.get("retry-after") != "3":
            self.fail(broken("http_headers", f"is {headers!r} after a 429 answer with Retry-After: 3"))

    def test_close_code_table(self) -> None:
        """
        onCloseFrame validates codes against the base class's
        CLOSE_STATUS_CODES_ALLOWED (pluresync widens that for 1014 alone).
        """
        import inspect

        from autobahn.websocket.protocol import WebSocketProtocol

        source = inspect.getsource(WebSocketProtocol.onCloseFrame)
        if "WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED" not in source:
            self.fail(broken("CLOSE_STATUS_CODES_ALLOWED", "onCloseFrame no longer reads it from WebSocketProtocol"))
