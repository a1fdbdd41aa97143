"""
The cluster protocol both relay fronts share (L{pluresync.relay.cluster.protocol}),
without Redis: messages, the look-up steps, and one instance's rules over a
registry on a L{Clock}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pluresync.relay.cluster.protocol import (
    MAX_REMOTE_OFFERS,
    AcceptAnswer,
    AcceptRequest,
    ClusterKeys,
    ClusterNode,
    Gone,
    ListenerAnnounced,
    Offer,
    encode,
    look_up,
    parse,
)
from pluresync.relay.core.pairing import ConnectorState, Registry
from pluresync.relay.core.wire import ErrorCode, ProtocolError

RDV = "ab" * 32
PEER = "cd" * 32
FROM = "ef" * 32
SESSION = "12" * 16
ME = "0" * 16
OTHER = "1" * 16
THIRD = "2" * 16


class MessageTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """Every message parses back to itself."""
        for message in (
            ListenerAnnounced(OTHER, RDV, PEER),
            Offer(RDV, PEER, SESSION, FROM, OTHER),
            Offer(RDV, PEER, SESSION, None, OTHER),
            Gone(SESSION),
            AcceptRequest(SESSION, THIRD, OTHER),
            AcceptAnswer(THIRD, peer=FROM),
            AcceptAnswer(THIRD, peer=None),
            AcceptAnswer(THIRD, error=ErrorCode.PEER_GONE, message="the connector left"),
        ):
            self.assertEqual(parse(encode(message)), message)
            self.assertEqual(parse(encode(message).encode()), message)

    def test_malformed_ignored(self) -> None:
        """Anything malformed parses to None (never an exception)."""
        for data in (
            b"",
            b"\xff",
            "not json",
            "[]",
            "null",
            '{"op": 1}',
            '{"op": "gone"}',
            '{"op": "gone", "session": "XYZ"}',
            '{"op": "incoming", "rdv": "ab", "peer": "cd", "session": "12", "owner": "x"}',
            '{"op": "listener", "instance": "' + OTHER + '", "rdv": 5, "peer": "' + PEER + '"}',
            '{"op": "answer", "req": [], "ok": true}',
            '{"t": "incoming", "session": "' + SESSION + '"}',
            "[" * 100000,
        ):
            self.assertIsNone(parse(data), data[:60])


def _drive(steps: Any, replies: list[Any]) -> tuple[list[Any], Any]:
    """Run look-up C{steps} with canned C{replies}; the commands sent and the result."""
    sent = []
    reply = None
    try:
        while True:
            sent.append(steps.send(reply))
            reply = replies.pop(0)
    except StopIteration as done:
        return sent, done.value


class LookUpTests(SynchronousTestCase):
    keys = ClusterKeys("p:")

    def test_live_and_dead(self) -> None:
        """Own fields are skipped, dead instances' fields deleted, live ones returned."""
        fields = [f"{ME} {PEER}".encode(), f"{OTHER} {PEER}", f"{THIRD} {FROM}", "garbage"]
        sent, found = _drive(look_up(self.keys, RDV, ME), [fields, [b"addr", None], 1])
        self.assertEqual(
            sent,
            [
                ("HKEYS", f"p:lst:{RDV}"),
                ("MGET", f"p:inst:{OTHER}", f"p:inst:{THIRD}"),
                ("HDEL", f"p:lst:{RDV}", f"{THIRD} {FROM}"),
            ],
        )
        self.assertEqual(found, [(OTHER, PEER)])

    def test_nothing(self) -> None:
        sent, found = _drive(look_up(self.keys, RDV, ME, skip=lambda i: i == OTHER), [[f"{OTHER} {PEER}"]])
        self.assertEqual((len(sent), found), (1, []))


class _Channel:
    def __init__(self) -> None:
        self.offers: list[tuple[str, str | None]] = []
        self.errors: list[ProtocolError] = []

    def incoming(self, session: str, peer: str | None) -> None:
        self.offers.append((session, peer))

    def failed(self, error: ProtocolError) -> None:
        self.errors.append(error)


class NodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.callLater, accept_timeout=10)
        self.published: list[tuple[str, Any]] = []
        self.offered: list[tuple[Offer, str]] = []
        self.delivered: list[tuple[Any, Offer]] = []
        self.node: ClusterNode[Any] = ClusterNode(
            ME,
            ClusterKeys("p:"),
            self.registry,
            publish=lambda channel, text: self.published.append((channel, parse(text))),
            offer=lambda message, instance: self.offered.append((message, instance)),
            deliver=lambda item, offer: self.delivered.append((item, offer)),
            shuffle=lambda found: None,
        )

    def test_local_listener_no_look_up(self) -> None:
        self.registry.listen(RDV, PEER, _Channel())
        connector, pending = self.node.connect(RDV, None, FROM, 0, _Channel(), clustered=True, lookup_timeout=2)
        self.assertIsNone(pending)
        self.assertIs(connector.state, ConnectorState.OFFERED)

    def test_stand_in_offers_and_retires(self) -> None:
        """A listener found elsewhere gets the waiting connector's offer; no stand-in stays registered."""
        connector, pending = self.node.connect(RDV, PEER, FROM, 10, _Channel(), clustered=True, lookup_timeout=2)
        self.assertFalse(pending.immediate)
        self.node.looked_up(pending, [(OTHER, "99" * 32), (OTHER, PEER)])
        [(offer, instance)] = self.offered
        self.assertEqual((offer.rdv, offer.peer, offer.from_, instance), (RDV, PEER, FROM, OTHER))
        self.assertIs(connector.state, ConnectorState.OFFERED)
        self.assertFalse(self.registry.has_listener(RDV))
        commands = self.node.offer_commands(offer, instance, "owner-value", 15)
        self.assertEqual(commands[0], ("SET", f"p:ses:{offer.session}", "owner-value", "EX", 15))
        self.assertEqual(parse(commands[1][2]).owner, ME)

    def test_immediate_connector_gives_up(self) -> None:
        """A connector that will not wait gets no-listener once the look-up found nobody."""
        channel = _Channel()
        connector, pending = self.node.connect(RDV, None, None, 0, channel, clustered=True, lookup_timeout=2)
        self.assertTrue(pending.immediate)
        self.node.looked_up(pending, [])
        self.assertEqual([e.code for e in channel.errors], [ErrorCode.NO_LISTENER])
        self.assertEqual(self.registry.pending_count, 0)

    def test_not_clustered_is_local(self) -> None:
        with self.assertRaises(ProtocolError):
            self.node.connect(RDV, None, None, 0, _Channel(), clustered=False, lookup_timeout=2)

    def test_offer_for_a_local_listener(self) -> None:
        """An offer reaches a local listener (round-robin), or is answered with gone."""
        self.assertTrue(self.node.listener_added(RDV, PEER, "first"))
        self.assertFalse(self.node.listener_added(RDV, PEER, "second"))
        offer = Offer(RDV, PEER, SESSION, FROM, OTHER)
        self.node.received(encode(offer))
        self.node.received(encode(offer))
        self.assertEqual([item for item, _ in self.delivered], ["first", "second"])
        self.assertFalse(self.node.listener_removed(RDV, PEER, "first"))
        self.assertTrue(self.node.listener_removed(RDV, PEER, "second"))
        del self.published[:]  # each listener's gone for its offer: test_leaving_listener
        self.node.received(encode(offer))
        self.assertEqual(self.published, [(f"p:i:{OTHER}", Gone(SESSION))])

    def test_leaving_listener(self) -> None:
        """
        A listener leaving while another of its kind is registered (one
        renewing its registration) hands its remote offers on to it, in the
        same session, and nobody is told gone; the last of its kind leaving
        tells the owner of each remote offer (only its own) that it is gone.
        """
        self.node.listener_added(RDV, PEER, "first")
        self.node.listener_added(RDV, PEER, "second")
        other_session = "6f" * 16
        self.node.received(encode(Offer(RDV, PEER, SESSION, FROM, OTHER)))
        self.node.received(encode(Offer(RDV, PEER, other_session, FROM, THIRD)))
        self.assertEqual([item for item, _ in self.delivered], ["first", "second"])
        self.node.listener_removed(RDV, PEER, "first")
        self.assertEqual(self.published, [])
        self.assertEqual(self.delivered[2:], [("second", Offer(RDV, PEER, SESSION, FROM, OTHER))])
        self.node.listener_removed(RDV, PEER, "second")
        self.assertEqual(
            sorted(self.published, key=str),
            sorted([(f"p:i:{OTHER}", Gone(SESSION)), (f"p:i:{THIRD}", Gone(other_session))], key=str),
        )
        self.node.listener_removed(RDV, PEER, "second")
        self.assertEqual(len(self.published), 2, "said once")

    def test_leaving_listener_old_offers(self) -> None:
        """Offers older than the accept timeout are not handed on (their connectors gave up): gone."""
        now = [100.0]
        self.node._clock = lambda: now[0]
        self.node.listener_added(RDV, PEER, "first")
        self.node.received(encode(Offer(RDV, PEER, SESSION, FROM, OTHER)))
        self.node.listener_added(RDV, PEER, "second")
        now[0] += self.registry.accept_timeout + 1
        self.node.listener_removed(RDV, PEER, "first")
        self.assertEqual(self.published, [(f"p:i:{OTHER}", Gone(SESSION))])
        self.assertEqual([item for item, _ in self.delivered], ["first"])

    def test_remote_offers_bounded(self) -> None:
        """A listener remembers at most MAX_REMOTE_OFFERS offers (the oldest go first)."""
        self.node.listener_added(RDV, PEER, "only")
        for n in range(MAX_REMOTE_OFFERS + 5):
            self.node.received(encode(Offer(RDV, PEER, f"{n:032x}", FROM, OTHER)))
        self.node.listener_removed(RDV, PEER, "only")
        sessions = [gone.session for _, gone in self.published]
        self.assertEqual(len(sessions), MAX_REMOTE_OFFERS)
        self.assertEqual(sessions[0], f"{5:032x}")

    def test_announcement_and_gone(self) -> None:
        """An announced listener is offered the waiting connectors; gone fails an offered one."""
        channel = _Channel()
        connector, _ = self.node.connect(RDV, None, None, 10, channel, clustered=True, lookup_timeout=2)
        self.node.received(encode(ListenerAnnounced(ME, RDV, PEER)))  # our own: ignored
        self.assertEqual(self.offered, [])
        self.node.received(encode(ListenerAnnounced(OTHER, RDV, PEER)))
        [(offer, _)] = self.offered
        self.node.received(encode(Gone(offer.session)))
        self.assertEqual([e.code for e in channel.errors], [ErrorCode.NO_LISTENER])

    def test_front_messages_returned(self) -> None:
        request = AcceptRequest(SESSION, THIRD, OTHER)
        self.assertEqual(self.node.received(encode(request)), request)
        self.assertIsNone(self.node.received("garbage"))

    def test_heartbeat(self) -> None:
        self.node.listener_added(RDV, PEER, "x")
        self.assertEqual(
            self.node.heartbeat(6, "addr"),
            [
                ("SET", f"p:inst:{ME}", "addr", "EX", 6),
                ("HSET", f"p:lst:{RDV}", f"{ME} {PEER}", "1"),
                ("EXPIRE", f"p:lst:{RDV}", 6),
            ],
        )

    def test_refusal_with_an_unknown_code(self) -> None:
        """An answer refusing with a code we do not know is still a refusal (no-session), not ignored."""
        answer = parse('{"op": "answer", "req": "' + THIRD + '", "ok": false, "code": "nonsense"}')
        self.assertEqual(answer.error, ErrorCode.NO_SESSION)
