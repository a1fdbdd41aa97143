"""
The client side of the relay protocol on a fake reactor: deadlines,
cancellation, interfaces, URLs and the listening port's states, without any
socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from pluresync.endpoints.relay import RelayClientEndpoint, RelayConfig, RelayServerEndpoint
from pluresync.endpoints.relaylistener import RelayListeningPort
from pluresync.errors import (
    ConfigurationError,
    ConnectionTimeoutError,
    RelayError,
    RelayLostError,
    RelayUnreachableError,
)
from pluresync.interfaces import IPath, IPathClient, IPathListener, IPipe, IPipeReceiver
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.pipes.websocket import RelaySocketFactory, RelayURL, WebSocketPipe
from pluresync.reactortimers import ReactorTimers
from pluresync.relay.core.wire import (
    SUBPROTOCOL,
    ErrorCode,
    Ready,
    encode_accept,
    encode_error,
    encode_incoming,
    encode_listen,
    encode_paired,
    encode_ready,
)
from pluresync.secure.link import Link

RDV = "ab" * 32
PEER = "0f" * 32


def config(**overrides) -> RelayConfig:
    values = dict(
        name="relay:test",
        relay=RelayURL.parse("wss://relay.example.com"),
        topic=SyncKey.generate().topic(),
        identity=PeerIdentity.generate(),
        timeout=5.0,
    )
    values.update(overrides)
    return RelayConfig(**values)


class ClientEndpointTests(SynchronousTestCase):
    """RelayClientEndpoint.connect on a MemoryReactorClock."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def test_tcp_goes_to_the_relay(self):
        """connect() opens TCP to the relay's port (the fake resolver maps every name to 127.0.0.1)."""
        d = RelayClientEndpoint(self.reactor, config(relay=RelayURL.parse("wss://relay.example.com:8443"))).connect(
            Factory.forProtocol(Protocol)
        )
        self.assertNoResult(d)
        [(host, port, _, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8443))
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)

    def test_timeout(self):
        """A relay that never answers fails the attempt at timeout= with ConnectionTimeoutError."""
        d = RelayClientEndpoint(self.reactor, config(timeout=5.0)).connect(Factory.forProtocol(Protocol))
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        failure = self.failureResultOf(d, ConnectionTimeoutError)
        self.assertIn("timed out after 5 s", str(failure.value))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel(self):
        """Cancelling the attempt gives ConnectingCancelledError and leaves no timer."""
        d = RelayClientEndpoint(self.reactor, config()).connect(Factory.forProtocol(Protocol))
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_listen_timeout(self):
        """Registering at a relay that never answers fails at timeout= too."""
        d = RelayServerEndpoint(self.reactor, config(timeout=3.0)).listen(Factory.forProtocol(Protocol))
        self.reactor.advance(3.1)
        self.failureResultOf(d, ConnectionTimeoutError)


class InterfaceTests(SynchronousTestCase):
    """The objects the relay client hands out provide their interfaces."""

    def test_listening_port(self):
        """RelayListeningPort is an IListeningPort, and the IPathListener auto: keeps alive."""
        relay = config()
        port = RelayListeningPort(MemoryReactorClock(), relay, Factory())
        self.assertTrue(verifyObject(IListeningPort, port))
        self.assertTrue(verifyObject(IPathListener, port))
        self.assertEqual(port.getHost().peer_id, relay.identity.peer_id)

    def test_path(self):
        """A relay's config is an IPath: its client an IPathClient, its listener an IPathListener."""
        reactor = MemoryReactorClock()
        path = config()
        self.assertTrue(verifyObject(IPath, path))
        client = path.client(reactor)
        self.assertTrue(verifyObject(IPathClient, client))
        self.assertTrue(verifyObject(IStreamClientEndpoint, client))
        self.assertEqual(client.name, "relay:test")
        self.assertTrue(verifyObject(IPathListener, path.listener(reactor, Factory())))

    def test_pipe(self):
        """The paired WebSocket, seen by the end-to-end layer, is an IPipe."""
        self.assertTrue(verifyClass(IPipe, WebSocketPipe))

    def test_pipe_receiver(self):
        """What a relay socket delivers to, once paired, is an IPipeReceiver (a link)."""
        self.assertTrue(verifyClass(IPipeReceiver, Link))

    def test_stop_listening_before_registered(self):
        """stopListening during registration abandons it and leaves nothing scheduled."""
        reactor = MemoryReactorClock()
        port = RelayListeningPort(reactor, config(), Factory())
        registering = port.startListening()
        registering.addErrback(lambda f: None)
        self.successResultOf(port.stopListening())
        self.assertEqual(reactor.getDelayedCalls(), [])


class RelayURLTests(SynchronousTestCase):
    """Relay URLs."""

    def test_defaults(self):
        """wss defaults to 443 and path /; ws to 80."""
        url = RelayURL.parse("wss://relay.example.com")
        self.assertEqual(
            (url.secure, url.host, url.port, url.url), (True, "relay.example.com", 443, "wss://relay.example.com:443/")
        )
        self.assertEqual(RelayURL.parse("ws://127.0.0.1:8080/r").url, "ws://127.0.0.1:8080/r")

    def test_ipv6(self):
        """IPv6 literals keep their brackets in the URL."""
        url = RelayURL.parse("ws://[::1]:9000")
        self.assertEqual((url.host, url.port, url.url), ("::1", 9000, "ws://[::1]:9000/"))

    def test_refused(self):
        """Other schemes, credentials, queries and bad ports are refused."""
        for bad in ("http://x", "wss://", "wss://u:p@x", "wss://x/?token=1", "wss://x:99999"):
            self.assertRaises(ConfigurationError, RelayURL.parse, bad)


class FakeControl:
    """
    A relay socket as the listening port sees it: when it was opened and
    answered, the cap the relay announced, how it ended; it can only be
    closed.
    """

    def __init__(self, sent_at: float, answered_at: float, session_seconds: float | None = None) -> None:
        self.closed: list[int] = []
        self.sent_at = sent_at
        self.answered_at = answered_at
        self.session_seconds = session_seconds
        self.close_code: int | None = None

    @property
    def expires_at(self) -> float | None:
        return None if self.session_seconds is None else self.sent_at + self.session_seconds

    @property
    def closed_on_purpose(self) -> bool:
        return self.close_code in (1001, 4029)

    def sendClose(self, code: int) -> None:
        self.closed.append(code)


@dataclass(frozen=True)
class ScriptedRelay(RelayConfig):
    """A relay path whose sockets the test answers by hand: each open() is recorded with its callbacks."""

    opened: list = field(default_factory=list, compare=False)
    #: when each socket was opened (its upgrade request)
    opened_at: list = field(default_factory=list, compare=False)

    def open(self, reactor, hello: bytes, **callbacks) -> Deferred:
        d: Deferred = Deferred()
        self.opened.append((hello, callbacks, d))
        self.opened_at.append(reactor.seconds())
        return d


class _PortCase(SynchronousTestCase):
    """A RelayListeningPort on a Clock, at a relay whose sockets the test opens, answers and ends by hand."""

    def setUp(self):
        self.clock = Clock()
        self.relay = ScriptedRelay(**vars(config(timeout=5.0)))
        self.port = RelayListeningPort(self.clock, self.relay, Factory.forProtocol(Protocol))
        self.controls: dict[int, FakeControl] = {}

    def answer(self, index: int = -1, session_seconds: float | None = None) -> FakeControl:
        """The relay says ready on the index-th socket opened (announcing C{session_seconds})."""
        index %= len(self.relay.opened)
        control = FakeControl(self.relay.opened_at[index], self.clock.seconds(), session_seconds)
        self.controls[index] = control
        limits = {"session_seconds": session_seconds, "max_message": 262144}
        self.relay.opened[index][2].callback((control, Ready(limits)))
        return control

    def refuse(self, index: int = -1) -> None:
        self.relay.opened[index][2].errback(RelayError("refused", "rate-limited"))

    def lose(self, index: int = -1, code: int = 1006) -> None:
        """The control socket of the index-th registration ends with C{code}."""
        index %= len(self.relay.opened)
        if index in self.controls:
            self.controls[index].close_code = code
        self.relay.opened[index][1]["on_lost"](Failure(RelayLostError("the relay went away")))

    def offer(self, session: str = "ab" * 16, index: int = -1) -> None:
        self.relay.opened[index][1]["on_incoming"](session, None)

    def listens(self) -> list[int]:
        """The indexes of the sockets opened to register (not to accept)."""
        return [i for i, (hello, _, _) in enumerate(self.relay.opened) if b'"listen"' in hello]

    def delays(self) -> list[float]:
        """Seconds from now to each scheduled call."""
        return sorted(call.getTime() - self.clock.seconds() for call in self.clock.getDelayedCalls())


class ListeningPortMachineTests(_PortCase):
    """RelayListeningPort's states (registering, listening, waiting, stopping, stopped) on a Clock."""

    def test_registers_with_a_listen(self):
        """startListening sends the listen hello and fires with the port once the relay is ready."""
        d = self.port.startListening()
        [(hello, _, _)] = self.relay.opened
        self.assertEqual(hello, encode_listen(self.relay.rendezvous_hex, self.relay.identity.peer_id))
        self.assertNoResult(d)
        self.assertFalse(self.port.connected)
        self.answer()
        self.assertIs(self.successResultOf(d), self.port)
        self.assertTrue(self.port.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_failure_without_keep_trying(self):
        """A failed first registration fails startListening and tries no more."""
        d = self.port.startListening()
        self.refuse()
        self.failureResultOf(d, RelayError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.port.connected)
        self.successResultOf(self.port.stopListening())

    def test_first_failure_with_keep_trying(self):
        """keep_trying: the caller hears the first failure; registering goes on in the background."""
        d = self.port.startListening(keep_trying=True)
        self.refuse()
        self.failureResultOf(d, RelayError)
        [retry] = self.clock.getDelayedCalls()
        self.assertTrue(0.8 <= retry.getTime() <= 1.2, retry.getTime())
        self.clock.advance(1.2)
        self.assertEqual(len(self.relay.opened), 2)
        self.answer()
        self.assertTrue(self.port.connected)

    def test_registration_timeout_is_retried(self):
        """A relay that never answers: timeout= ends the attempt, and keep_trying tries again."""
        d = self.port.startListening(keep_trying=True)
        self.clock.advance(5.0)
        self.failureResultOf(d, ConnectionTimeoutError)
        self.clock.advance(1.2)
        self.assertEqual(len(self.relay.opened), 2)

    def test_backoff_doubles_to_the_cap_and_resets(self):
        """Each failed try doubles the wait (with jitter) up to max_delay; a registration resets it."""
        self.port.startListening()
        self.answer()
        self.lose()
        self.assertFalse(self.port.connected)
        waits = []
        for _ in range(8):
            [retry] = self.clock.getDelayedCalls()
            waits.append(retry.getTime() - self.clock.seconds())
            self.clock.advance(waits[-1])
            self.refuse()
        for wait, nominal in zip(waits, (1, 2, 4, 8, 16, 32, 60, 60), strict=True):
            self.assertTrue(0.8 * nominal <= wait <= 1.2 * nominal, (wait, nominal))
        [retry] = self.clock.getDelayedCalls()
        self.clock.advance(retry.getTime() - self.clock.seconds())
        self.answer()
        self.lose()
        [retry] = self.clock.getDelayedCalls()
        self.assertLessEqual(retry.getTime() - self.clock.seconds(), 1.2)

    def test_stop_while_listening(self):
        """stopListening closes the control socket (1000) and fires once it is closed."""
        self.port.startListening()
        control = self.answer()
        stopped = self.port.stopListening()
        self.assertEqual(control.closed, [1000])
        self.assertNoResult(stopped)
        again = self.port.stopListening()
        self.lose()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(self.successResultOf(again))
        self.assertFalse(self.port.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(self.port.stopListening())

    def test_stop_while_waiting(self):
        """stopListening during the backoff cancels the retry."""
        self.port.startListening()
        self.answer()
        self.lose()
        self.successResultOf(self.port.stopListening())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(120)
        self.assertEqual(len(self.relay.opened), 1)

    def test_stop_while_registering(self):
        """stopListening abandons a registration under way: startListening fails as cancelled."""
        d = self.port.startListening(keep_trying=True)
        self.successResultOf(self.port.stopListening())
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_from_the_start_callback(self):
        """The caller may stop the port from startListening's own callback."""
        d = self.port.startListening()
        stops = []
        d.addCallback(lambda port: stops.append(port.stopListening()))
        control = self.answer()
        self.assertEqual(control.closed, [1000])
        self.lose()
        self.successResultOf(stops[0])

    def test_incoming_is_accepted_on_a_new_socket(self):
        """Each incoming opens a new socket with an accept hello; stopping abandons it."""
        self.port.startListening()
        self.answer()
        self.offer("cd" * 16)
        self.assertEqual(len(self.relay.opened), 2)
        self.assertEqual(self.relay.opened[1][0], encode_accept("cd" * 16))
        self.port.stopListening()
        self.assertTrue(self.relay.opened[1][2].called)  # the accept's socket was cancelled
        self.offer("ef" * 16, index=0)
        self.assertEqual(len(self.relay.opened), 2)

    def test_stop_abandons_accepts_after_a_loss(self):
        """An accept still in its handshake when the registration drops is abandoned by a stop in the backoff."""
        self.port.startListening()
        self.answer()
        self.offer("cd" * 16)
        self.lose(index=0)
        self.assertFalse(self.relay.opened[1][2].called)
        self.successResultOf(self.port.stopListening())
        self.assertTrue(self.relay.opened[1][2].called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_start_twice(self):
        """startListening again while registering waits for the same registration; once up, it is up."""
        first = self.port.startListening()
        second = self.port.startListening()
        self.assertEqual(len(self.relay.opened), 1)
        self.answer()
        self.assertIs(self.successResultOf(first), self.port)
        self.assertIs(self.successResultOf(second), self.port)
        self.assertIs(self.successResultOf(self.port.startListening()), self.port)


class RenewalTests(_PortCase):
    """
    RelayListeningPort at a relay that caps its sockets' life
    (C{session_seconds}): renewed before the cap, make-before-break; an end
    on purpose (1001, a cap) is followed by a new registration at once.
    """

    def listening(self, session_seconds: float | None = 295, answer_after: float = 0.2) -> FakeControl:
        self.port.startListening()
        self.clock.advance(answer_after)
        return self.answer(session_seconds=session_seconds)

    def test_renews_before_the_cap(self):
        """
        The next registration opens RENEW_MARGIN (10 s) before the cap,
        counted from the first one's upgrade request; only once it is ready
        is the first one closed (1000), and its end then is no news.
        """
        old = self.listening(295)
        self.assertEqual(self.delays(), [284.8])
        self.clock.advance(284.7)
        self.assertEqual(self.listens(), [0])
        self.clock.advance(0.1)
        self.assertEqual(self.listens(), [0, 1])
        self.assertEqual(old.closed, [])
        self.assertTrue(self.port.connected)
        self.clock.advance(0.3)
        new = self.answer(session_seconds=295)
        self.assertEqual(old.closed, [1000])
        self.assertEqual(new.closed, [])
        self.assertEqual(self.delays(), [285 - 0.3])
        self.lose(index=0, code=1000)
        self.assertTrue(self.port.connected)
        self.assertEqual(self.listens(), [0, 1])
        self.assertEqual(self.delays(), [285 - 0.3])

    def test_short_cap(self):
        """A short cap (--session-seconds 2) is renewed a quarter of it early: 1.5 s after the request."""
        self.listening(2, answer_after=0.1)
        self.assertEqual(self.delays(), [1.4])
        self.clock.advance(1.4)
        self.assertEqual(self.listens(), [0, 1])

    def test_no_cap_no_renewal(self):
        """Without an announced cap nothing is scheduled."""
        self.listening(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_offers_on_both_while_renewing(self):
        """
        Offers on the registration in use and on the next one are accepted
        alike; an offer made again (the relay moved it from the registration
        we closed) is accepted once.
        """
        self.listening(295)
        self.clock.advance(284.8)
        self.offer("c1" * 16, index=0)
        new = self.answer(index=1, session_seconds=295)
        self.offer("c2" * 16, index=1)
        self.offer("c1" * 16, index=1)
        accepts = [hello for hello, _, _ in self.relay.opened if b'"accept"' in hello]
        self.assertEqual(accepts, [encode_accept("c1" * 16), encode_accept("c2" * 16)])
        self.assertEqual(new.closed, [])

    def test_offered_again_after_the_accept_gave_up(self):
        """The same session offered after timeout= (the first accept has given up by then) is accepted again."""
        self.listening(None)
        self.offer("c1" * 16, index=0)
        self.clock.advance(4.9)
        self.offer("c1" * 16, index=0)
        self.clock.advance(0.2)
        self.offer("c1" * 16, index=0)
        accepts = [hello for hello, _, _ in self.relay.opened if b'"accept"' in hello]
        self.assertEqual(accepts, [encode_accept("c1" * 16)] * 2)

    def test_old_ends_first(self):
        """The one in use ends before the next one is ready: that one is already on its way."""
        self.listening(295)
        self.clock.advance(284.8)
        self.lose(index=0, code=1001)
        self.assertFalse(self.port.connected)
        self.assertEqual(self.listens(), [0, 1])
        self.assertEqual(self.delays(), [5.0])  # its deadline (timeout=), no retry
        new = self.answer(session_seconds=295)
        self.assertTrue(self.port.connected)
        self.assertEqual(new.closed, [])
        self.assertEqual(self.delays(), [285])

    def test_old_ends_first_and_the_next_fails(self):
        """... and if the next one then fails, the backoff begins at its first delay."""
        self.listening(295)
        self.clock.advance(284.8)
        self.lose(index=0, code=1001)
        self.refuse()
        [wait] = self.delays()
        self.assertTrue(0.8 <= wait <= 1.2, wait)

    def test_renewal_fails(self):
        """
        A renewal that fails keeps the registration in use; when the relay
        ends it at its cap (here without a close frame, 1006), the port
        registers again at once.
        """
        old = self.listening(2, answer_after=0.1)
        self.clock.advance(1.4)
        self.refuse()
        self.assertTrue(self.port.connected)
        self.assertEqual(old.closed, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0.5)  # the cap: 2 s after the first request
        self.lose(index=0, code=1006)
        self.assertEqual(self.listens(), [0, 1, 2])
        self.assertEqual(self.delays(), [5.0])  # its deadline (timeout=), no retry

    def test_going_away_registers_again_at_once(self):
        """
        A healthy registration ended with 1001 (relay shutdown, the Vercel
        cap) is followed by a new one at once; if that fails, the backoff
        runs from its first delay (1 s, then 2 s).
        """
        self.listening(None)
        self.clock.advance(30)
        self.lose(code=1001)
        self.assertEqual(self.listens(), [0, 1])
        self.refuse()
        waits = []
        for _ in range(2):
            [wait] = self.delays()
            waits.append(wait)
            self.clock.advance(wait)
            self.refuse()
        self.assertTrue(0.8 <= waits[0] <= 1.2 and 1.6 <= waits[1] <= 2.4, waits)

    def test_rate_limited_close_registers_again_at_once(self):
        """So is one closed with 4029 (a cap)."""
        self.listening(None)
        self.clock.advance(30)
        self.lose(code=4029)
        self.assertEqual(self.listens(), [0, 1])

    def test_early_end_backs_off(self):
        """
        A registration ended with 1001 less than the backoff's first delay
        after it was ready is a loss: the backoff, so registering again at
        once never tries faster than the backoff would.
        """
        self.listening(None)
        self.clock.advance(0.5)
        self.lose(code=1001)
        self.assertEqual(self.listens(), [0])
        [wait] = self.delays()
        self.assertTrue(0.8 <= wait <= 1.2, wait)

    def test_other_losses_back_off(self):
        """A control socket lost otherwise (1006 before its cap) waits the backoff, as before."""
        self.listening(295)
        self.clock.advance(100)
        self.lose(code=1006)
        self.assertEqual(self.listens(), [0])
        [wait] = self.delays()
        self.assertTrue(0.8 <= wait <= 1.2, wait)

    def test_stop_while_renewing(self):
        """stopListening while renewing abandons the next registration and closes the one in use."""
        old = self.listening(295)
        self.clock.advance(284.8)
        stopped = self.port.stopListening()
        self.assertTrue(self.relay.opened[1][2].called)  # cancelled
        self.assertEqual(old.closed, [1000])
        self.assertNoResult(stopped)
        self.lose(index=0, code=1000)
        self.successResultOf(stopped)
        self.assertFalse(self.port.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_the_renewal(self):
        """stopListening while listening leaves no renewal timer."""
        self.listening(295)
        self.port.stopListening()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lose(code=1000)
        self.clock.advance(600)
        self.assertEqual(self.listens(), [0])


class ScriptedRelayProtocol(WebSocketServerProtocol):
    """A relay that records the hello and answers with the test's script of text messages."""

    factory: ScriptedRelayFactory

    def onConnect(self, request):
        return self.factory.subprotocol

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.hellos.append(payload)
        for message in self.factory.script:
            self.sendMessage(message, False)
        if self.factory.close_code is not None:
            # (sendCloseFrame: Autobahn's sendClose refuses 1001, which relays send)
            self.sendCloseFrame(code=self.factory.close_code, isReply=False)


class ScriptedRelayFactory(WebSocketServerFactory):
    protocol = ScriptedRelayProtocol

    def __init__(self, clock, script, subprotocol: str = SUBPROTOCOL, close_code: int | None = None) -> None:
        super().__init__("ws://relay.test:80/", reactor=clock)
        self.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=5, autoPingInterval=0)
        self._batched_timer = ReactorTimers(clock)
        self.script = script
        self.subprotocol = subprotocol
        self.close_code = close_code
        self.hellos: list[bytes] = []


@implementer(IPipeReceiver)
class Receiver:
    """What a paired relay socket delivers to, keeping it."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: list[Failure] = []

    def pipeDataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def pipeLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class RelaySocketTests(SynchronousTestCase):
    """The client's relay socket against a scripted relay, pumped in memory on a fake clock."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.incoming: list[tuple[str, str | None]] = []
        self.lost: list[Failure] = []

    def run_script(
        self, *script: bytes, subprotocol: str = SUBPROTOCOL, close_code: int | None = None, answer_after: float = 0
    ):
        """
        Connect a client socket to a relay that answers its hello with
        C{script}; C{answer_after} seconds pass on the clock between the
        client's upgrade request and the relay reading it.
        """
        hello = encode_listen(RDV, PEER)
        client_factory = RelaySocketFactory(
            self.clock,
            RelayURL.parse("ws://relay.test"),
            hello,
            ping_interval=0,
            ping_timeout=0,
            on_incoming=lambda session, peer: self.incoming.append((session, peer)),
            on_lost=self.lost.append,
        )
        self.relay = ScriptedRelayFactory(self.clock, list(script), subprotocol, close_code)
        server = self.relay.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        client = client_factory.buildProtocol(None)
        self.pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False, clock=self.clock
        )
        self.clock.advance(answer_after)
        self.flush()
        return client, client_factory.answer

    def flush(self) -> None:
        for _ in range(20):
            if not self.pump.flush():
                return

    def test_ready(self):
        """The hello goes out as given; ready (with its limits) is the answer."""
        client, answer = self.run_script(encode_ready({"max_message": 262144}))
        self.assertEqual(self.relay.hellos, [encode_listen(RDV, PEER)])
        protocol, message = self.successResultOf(answer)
        self.assertIs(protocol, client)
        self.assertEqual(message, Ready(limits={"max_message": 262144}))

    def test_limits_kept(self):
        """
        The socket keeps the announced session_seconds and when the answer
        came; it expires that long after the upgrade request went out (no
        relay counts from earlier), not after the answer.
        """
        self.clock.advance(100)
        client, answer = self.run_script(encode_ready({"session_seconds": 295, "max_message": 262144}), answer_after=2)
        self.successResultOf(answer)
        self.assertEqual((client.session_seconds, client.answered_at), (295, 102))
        self.assertEqual(client.expires_at, 395)

    def test_no_cap(self):
        """No session_seconds (null, absent, an older relay's bare ready): expires_at is None."""
        for ready in (encode_ready({"session_seconds": None, "max_message": 262144}), encode_ready()):
            client, answer = self.run_script(ready)
            self.successResultOf(answer)
            self.assertIsNone(client.session_seconds)
            self.assertIsNone(client.expires_at)
        self.assertEqual(client.answered_at, 0)

    def test_pipe_expires(self):
        """The pipe of a paired socket says when the relay will end it: its socket's expires_at."""
        self.clock.advance(10)
        client, answer = self.run_script(encode_paired(PEER, {"session_seconds": 2}), answer_after=0.5)
        self.successResultOf(answer)
        pipe = client.becomePipe(Receiver())
        self.assertEqual(pipe.expires_at, 12)
        self.assertEqual(client.answered_at, 10.5)

    def test_how_it_ended(self):
        """The socket keeps its close code; 1001 (going away) and 4029 (a cap) are ends on purpose."""
        for code, on_purpose in ((1001, True), (4029, True), (1000, False), (4000, False)):
            client, answer = self.run_script(encode_ready(), close_code=code)
            self.successResultOf(answer)
            self.assertEqual((client.close_code, client.closed_on_purpose), (code, on_purpose))

    def test_incoming_after_ready(self):
        """Each incoming on a registered control socket reaches on_incoming."""
        self.run_script(encode_ready(), encode_incoming("cd" * 16, PEER), encode_incoming("ef" * 16, None))
        self.assertEqual(self.incoming, [("cd" * 16, PEER), ("ef" * 16, None)])

    def test_error(self):
        """An error message, then the close: the relay's code and message, never the raw JSON."""
        _, answer = self.run_script(
            encode_error(ErrorCode.NO_LISTENER, "nobody"), close_code=ErrorCode.NO_LISTENER.close_code
        )
        error = self.failureResultOf(answer, RelayError).value
        self.assertEqual(error.code, "no-listener")
        self.assertIn("refused: no-listener: nobody", str(error))

    def test_malformed(self):
        """A message that is not protocol v1 is a protocol error that says what is wrong."""
        _, answer = self.run_script(b'{"op":"incoming","session":"not-a-session"}')
        error = self.failureResultOf(answer, RelayError).value
        self.assertEqual(error.code, "bad-request")
        self.assertIn("malformed control message", str(error))
        self.assertIn('"session"', str(error))

    def test_unexpected(self):
        """A second answer on a registered control socket is a protocol error: the registration is lost."""
        self.run_script(encode_ready(), encode_paired(PEER))
        [reason] = self.lost
        self.assertIn("unexpected 'paired' message", reason.getErrorMessage())

    def test_not_a_pluresync_relay(self):
        """A server that does not speak pluresync.v1 is unreachable, saying so."""
        _, answer = self.run_script(subprotocol=None)
        self.assertIn("not a pluresync relay", str(self.failureResultOf(answer, RelayUnreachableError).value))
