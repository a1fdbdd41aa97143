"""
The relay session core on a fake front and a fake clock: every phase, every
ending and the code each side gets, the hello timer, labels, and inputs
arriving late or out of turn.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from pluresync.relay.core.session import Phase, RelaySession
from pluresync.relay.core.wire import Accept, Connect, ErrorCode, Listen, ProtocolError

RDV = "ab" * 32
PEER = "0a" * 32
FROM = "0b" * 32
SESSION = "5e" * 16
LIMITS = {"max_message": 262144}


def _hello(**fields: Any) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


class FakeFront:
    """A front that records what the session asks of it, and answers requests as told."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: list[tuple[int, str]] = []
        self.requests: list[Any] = []
        self.unpaired_how: list[str] = []
        self.forgotten = 0
        self.errors: list[ErrorCode] = []
        #: what to do inside listen/connect/accept (e.g. refuse at once)
        self.on_request: Any = None

    def send_control(self, message: bytes) -> None:
        if not self.closed:
            self.sent.append(json.loads(message))

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def listen(self, session: RelaySession, message: Listen) -> None:
        self.requests.append(message)
        self.send_control(b'{"op":"ready"}')
        if self.on_request:
            self.on_request(session)

    def connect(self, session: RelaySession, message: Connect) -> None:
        self.requests.append(message)
        if self.on_request:
            self.on_request(session)

    def accept(self, session: RelaySession, message: Accept) -> None:
        self.requests.append(message)
        if self.on_request:
            self.on_request(session)

    def decline(self, session: RelaySession, message: Any) -> None:
        self.requests.append(message)

    def unpaired(self, how: str) -> None:
        self.unpaired_how.append(how)

    def forget(self) -> None:
        self.forgotten += 1

    def counted(self, code: ErrorCode) -> None:
        self.errors.append(code)


class FakePartner:
    def __init__(self) -> None:
        self.ended: list[tuple[int, str]] = []

    def end(self, code: int, reason: str) -> None:
        self.ended.append((code, reason))


class SessionTestCase(unittest.TestCase):
    hello_timeout = 5.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.front = FakeFront()
        self.lines: list[str] = []
        self.session = RelaySession(
            self.front,
            self.clock.callLater,
            hello_timeout=self.hello_timeout,
            announced_limits=LIMITS,
            default_retry=7.0,
            log=self.lines.append,
        )

    def open(self, tenant: str | None = None) -> None:
        self.session.opened(tenant)
        self.assertIs(self.session.phase, Phase.HELLO)

    def pair(self) -> FakePartner:
        self.open()
        self.session.control(_hello(op="connect", rdv=RDV, **{"from": FROM}), False)
        partner = FakePartner()
        self.session.paired(partner, PEER, SESSION)
        self.assertIs(self.session.phase, Phase.PAIRED)
        return partner

    def assertEndedWith(self, code: int) -> None:
        self.assertIs(self.session.phase, Phase.CLOSED)
        self.assertEqual([c for c, _ in self.front.closed], [code])
        self.assertEqual(self.front.forgotten, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ControlPhaseTests(SessionTestCase):
    def test_listen(self) -> None:
        """A listen registers; each offer becomes an incoming message; the label names rdv and peer."""
        self.open(tenant="acme")
        self.session.control(_hello(op="listen", rdv=RDV, peer=PEER), False)
        self.assertIs(self.session.phase, Phase.LISTENING)
        self.assertEqual(self.front.requests, [Listen(RDV, PEER)])
        self.session.incoming(SESSION, FROM)
        self.assertEqual(self.front.sent[-1], {"op": "incoming", "session": SESSION, "peer": FROM})
        self.assertEqual(self.session.label, f"rdv={RDV[:8]} peer={PEER[:8]} tenant=acme")
        self.assertEqual(self.clock.getDelayedCalls(), [], "the hello timer stops at the hello")

    def test_offer_during_registration_follows_ready(self) -> None:
        """A registry that offers a waiting connector while the listener registers: ready comes first."""
        self.front.on_request = lambda session: session.incoming(SESSION, None)
        self.open()
        self.session.control(_hello(op="listen", rdv=RDV, peer=PEER), False)
        self.assertEqual([m["op"] for m in self.front.sent], ["ready", "incoming"])

    def test_connect_and_accept(self) -> None:
        """connect and accept both wait for pairing; paired tells the peer and the limits."""
        for hello, expected in (
            (_hello(op="connect", rdv=RDV, peer=PEER, wait=3), Connect(RDV, PEER, None, 3.0)),
            (_hello(op="accept", session=SESSION), Accept(SESSION)),
        ):
            self.setUp()
            self.open()
            self.session.control(hello, False)
            self.assertIs(self.session.phase, Phase.CONNECTING)
            self.assertEqual(self.front.requests, [expected])
            self.session.paired(FakePartner(), PEER, SESSION, label="rdv=abababab from=-")
            self.assertEqual(self.front.sent, [{"op": "paired", "peer": PEER, "limits": LIMITS}])
            self.assertEqual(self.session.label, f"rdv=abababab from=- session={SESSION[:8]}")

    def test_hello_timeout(self) -> None:
        """No control message in time: timeout (4008) with an error message."""
        self.open()
        self.clock.advance(self.hello_timeout)
        self.assertEqual(self.front.sent[0]["code"], "timeout")
        self.assertIn("5 s", self.front.sent[0]["message"])
        self.assertEndedWith(4008)
        self.assertEqual(self.front.errors, [ErrorCode.TIMEOUT])

    def test_bad_hellos(self) -> None:
        """Each malformed or misplaced message ends the socket with its code and a message."""
        cases = [
            (b"\x00binary", True, "bad-request", 4000),
            (b"not json", False, "bad-request", 4000),
            (_hello(op="dance"), False, "bad-request", 4000),
            (_hello(op="listen", rdv="short", peer=PEER), False, "bad-request", 4000),
            (b"{" + b" " * 5000 + b"}", False, "too-large", 4009),
        ]
        for payload, binary, code, close in cases:
            self.setUp()
            self.open()
            self.session.control(payload, binary)
            self.assertEqual(self.front.sent[0]["op"], "error")
            self.assertEqual(self.front.sent[0]["code"], code, payload[:20])
            self.assertEndedWith(close)

    def test_second_message(self) -> None:
        """After the hello, before pairing, any message is bad-request, with a reason for each kind."""
        for binary, reason in ((False, "only one control message per socket"), (True, "binary message before pairing")):
            self.setUp()
            self.open()
            self.session.control(_hello(op="listen", rdv=RDV, peer=PEER), False)
            self.session.control(b"more", binary)
            self.assertEqual(self.front.sent[-1]["message"], reason)
            self.assertEndedWith(4000)

    def test_decline(self) -> None:
        """
        A listener's control socket may decline an offered session (handed to
        the front); a decline as a socket's first message is bad-request.
        """
        from pluresync.relay.core.wire import Decline

        self.open()
        self.session.control(_hello(op="listen", rdv=RDV, peer=PEER), False)
        decline = _hello(op="decline", session="ab" * 16, code="rate-limited", reason="HTTP 429", retry=2)
        self.session.control(decline, False)
        self.assertEqual(self.front.requests[-1], Decline("ab" * 16, ErrorCode.RATE_LIMITED, "HTTP 429", 2.0))
        self.assertEqual(self.front.closed, [])
        self.setUp()
        self.open()
        self.session.control(decline, False)
        self.assertEndedWith(4000)

    def test_refused_during_request(self) -> None:
        """A front refusing inside the request (a listener cap): the error, and the relay's retry hint."""
        self.front.on_request = lambda session: session.failed(ProtocolError(ErrorCode.RATE_LIMITED, "at most 1"))
        self.open()
        self.session.control(_hello(op="listen", rdv=RDV, peer=PEER), False)
        self.assertEqual(
            self.front.sent[-1], {"op": "error", "code": "rate-limited", "message": "at most 1", "retry": 7.0}
        )
        self.assertEndedWith(4029)

    def test_registry_gives_up(self) -> None:
        """The registry failing a waiting connector: its error message and close code."""
        self.open()
        self.session.control(_hello(op="connect", rdv=RDV), False)
        self.session.failed(ProtocolError(ErrorCode.NO_LISTENER, "no listener for this rendezvous"))
        self.assertEqual(self.front.sent[-1]["code"], "no-listener")
        self.assertEndedWith(4004)
        self.assertIn(f"error no-listener rdv={RDV[:8]} from=-: no listener for this rendezvous", self.lines)


class EndingTests(SessionTestCase):
    def test_clean_close_passes_through(self) -> None:
        """The client closes with 1000: its partner gets 1000 'peer closed'."""
        partner = self.pair()
        self.session.client_closed(clean=True)
        self.assertEqual(partner.ended, [(1000, "peer closed")])
        self.assertEqual(self.front.unpaired_how, ["closed 1000"])
        self.assertEqual(self.front.errors, [])
        self.assertIs(self.session.phase, Phase.CLOSED)

    def test_vanished_client(self) -> None:
        """Any other end of the client: its partner gets peer-gone (4010), counted."""
        partner = self.pair()
        self.session.client_closed(clean=False)
        self.assertEqual(partner.ended, [(4010, "peer-gone")])
        self.assertEqual(self.front.errors, [ErrorCode.PEER_GONE])

    def test_error_after_pairing(self) -> None:
        """An error after pairing: no error message, its own code here, peer-gone there."""
        partner = self.pair()
        sent = len(self.front.sent)
        self.session.failed(ProtocolError(ErrorCode.TOO_LARGE, "messages are at most 1 bytes"))
        self.assertEqual(len(self.front.sent), sent)
        self.assertEqual(partner.ended, [(4010, "peer-gone")])
        self.assertEqual(self.front.closed, [(4009, "too-large")])

    def test_text_after_pairing(self) -> None:
        partner = self.pair()
        self.session.control(b"{}", False)
        self.assertEqual(self.front.closed, [(4000, "bad-request")])
        self.assertEqual(partner.ended, [(4010, "peer-gone")])

    def test_partner_ended(self) -> None:
        """The partner's end reaches this client with the partner's code; the pair is released here too."""
        for code, reason in ((1000, "peer closed"), (4010, "peer-gone"), (1001, "going away")):
            self.setUp()
            partner = self.pair()
            self.session.partner_ended(code, reason)
            self.assertEqual(self.front.closed, [(code, reason)])
            self.assertEqual(partner.ended, [], "the partner is not told its own end")
            self.assertEqual(len(self.front.unpaired_how), 1)

    def test_going_away(self) -> None:
        """Shutdown: 1001 here and for the partner; before pairing, 1001 with no message."""
        partner = self.pair()
        self.session.go_away()
        self.assertEqual(partner.ended, [(1001, "going away")])
        self.assertEqual(self.front.closed, [(1001, "going away")])
        self.setUp()
        self.open()
        self.session.go_away()
        self.assertEqual(self.front.sent, [])
        self.assertEndedWith(1001)

    def test_cap(self) -> None:
        """A session cap: 4029 with the retry hint on both ends."""
        partner = self.pair()
        self.session.cap_reached("bytes", 2.5)
        self.assertEqual(partner.ended, [(4029, "rate-limited retry=2.5")])
        self.assertEqual(self.front.closed, [(4029, "rate-limited retry=2.5")])
        self.assertEqual(self.front.errors, [ErrorCode.RATE_LIMITED])

    def test_closed_absorbs_everything(self) -> None:
        """After the end, no input sends, closes, registers or ends anything again."""
        partner = self.pair()
        self.session.client_closed(clean=True)
        before = (list(self.front.sent), list(self.front.closed), list(partner.ended), self.front.forgotten)
        self.session.control(b"{}", False)
        self.session.incoming(SESSION, None)
        self.session.failed(ProtocolError(ErrorCode.TIMEOUT, "late"))
        self.session.partner_ended(1000, "peer closed")
        self.session.paired(FakePartner(), None, SESSION)
        self.session.client_closed(clean=False)
        self.session.go_away()
        self.session.cap_reached("bytes", 1)
        self.session.opened(None)
        after = (self.front.sent, self.front.closed, partner.ended, self.front.forgotten)
        self.assertEqual(before, after)

    def test_out_of_turn_inputs_change_nothing(self) -> None:
        """Inputs that cannot apply in a phase (an offer to a connector, a pair for a listener) are ignored."""
        self.open()
        self.session.control(_hello(op="connect", rdv=RDV), False)
        self.session.incoming(SESSION, None)
        self.session.partner_ended(1000, "x")
        self.session.cap_reached("bytes", 1)
        self.assertIs(self.session.phase, Phase.CONNECTING)
        self.assertEqual(self.front.sent, [])
        self.setUp()
        self.open()
        self.session.control(_hello(op="listen", rdv=RDV, peer=PEER), False)
        self.session.paired(FakePartner(), None, SESSION)
        self.assertIs(self.session.phase, Phase.LISTENING)

    def test_client_gone_before_open(self) -> None:
        """A socket that never opened: nothing to send, its registrations forgotten."""
        self.session.client_closed(clean=False)
        self.assertIs(self.session.phase, Phase.CLOSED)
        self.assertEqual(self.front.forgotten, 1)
        self.assertEqual((self.front.sent, self.front.closed), ([], []))
