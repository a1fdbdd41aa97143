"""
The rendezvous registry (pure core) with a fake clock.
"""

from __future__ import annotations

import itertools

from twisted.internet.task import Clock
from twisted.trial import unittest

from pluresync.relay.core.pairing import ConnectorState, Registry
from pluresync.relay.core.wire import ErrorCode, ProtocolError

RDV = "ab" * 32
RDV2 = "cd" * 32
PEER_A = "0a" * 32
PEER_B = "0b" * 32
FROM = "0c" * 32


class FakeListenerChannel:
    """A listener channel recording C{incoming} calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def incoming(self, session: str, peer: str | None) -> None:
        self.calls.append((session, peer))


class FakeConnectorChannel:
    """A connector channel recording failures."""

    def __init__(self) -> None:
        self.errors: list[ProtocolError] = []

    def failed(self, error: ProtocolError) -> None:
        self.errors.append(error)

    @property
    def codes(self) -> list[ErrorCode]:
        return [error.code for error in self.errors]


class RegistryTests(unittest.TestCase):
    """Every pairing rule, with a Clock for the timers."""

    def setUp(self) -> None:
        self.clock = Clock()
        counter = itertools.count()
        self.registry = Registry(
            self.clock.callLater,
            max_pending=3,
            accept_timeout=10,
            max_wait=120,
            default_wait=30,
            new_session=lambda: f"{next(counter):032x}",
        )

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [], "timers left behind")

    def listen(self, rdv: str = RDV, peer: str = PEER_A) -> tuple[object, FakeListenerChannel]:
        channel = FakeListenerChannel()
        return self.registry.listen(rdv, peer, channel), channel

    def connect(
        self, rdv: str = RDV, peer: str | None = None, from_: str | None = FROM, wait: float | None = None
    ) -> tuple[object, FakeConnectorChannel]:
        channel = FakeConnectorChannel()
        return self.registry.connect(rdv, peer, from_, wait, channel), channel

    def test_connect_to_listener(self) -> None:
        """A connector is offered to a registered listener; accept pairs them."""
        _, listener = self.listen()
        connector, channel = self.connect()
        self.assertEqual(listener.calls, [("0" * 32, FROM)])
        self.assertEqual(self.registry.pending_count, 1)
        pairing = self.registry.accept("0" * 32)
        self.assertIs(pairing.connector, connector)
        self.assertEqual((pairing.listener_peer, pairing.connector_peer), (PEER_A, FROM))
        self.assertEqual((self.registry.pending_count, self.registry.paired_count), (0, 1))
        self.registry.unpair(connector)  # type: ignore[arg-type]
        self.registry.unpair(connector)  # type: ignore[arg-type]
        self.assertEqual(self.registry.paired_count, 0)
        self.assertEqual(channel.errors, [])

    def test_accept_twice(self) -> None:
        """A session can be accepted once; the second accept is no-session."""
        self.listen()
        connector, _ = self.connect()
        self.registry.accept("0" * 32)
        error = self.assertRaises(ProtocolError, self.registry.accept, "0" * 32)
        self.assertEqual(error.code, ErrorCode.NO_SESSION)
        self.registry.remove_connector(connector)  # type: ignore[arg-type]

    def test_accept_unknown(self) -> None:
        """An unknown session is no-session."""
        error = self.assertRaises(ProtocolError, self.registry.accept, "f" * 32)
        self.assertEqual(error.code, ErrorCode.NO_SESSION)

    def test_wait_for_listener(self) -> None:
        """A connector waits; a listener arriving within the wait gets it."""
        connector, channel = self.connect(wait=5)
        self.clock.advance(4)
        _, listener = self.listen()
        self.assertEqual(len(listener.calls), 1)
        self.clock.advance(5)  # past the wait, but it is offered now: no failure
        self.assertEqual(channel.codes, [])
        self.clock.advance(5)  # the accept timer (10 s after the offer) fires
        self.assertEqual(channel.codes, [ErrorCode.TIMEOUT])
        self.assertEqual(connector.state, ConnectorState.DONE)  # type: ignore[attr-defined]

    def test_wait_expires(self) -> None:
        """With no listener the connector gets no-listener after its wait."""
        _, channel = self.connect(wait=5)
        self.clock.advance(4.9)
        self.assertEqual(channel.codes, [])
        self.clock.advance(0.1)
        self.assertEqual(channel.codes, [ErrorCode.NO_LISTENER])
        self.assertEqual(self.registry.pending_count, 0)

    def test_waiting_queries(self) -> None:
        """
        waiting_for and waiting_rendezvous show exactly the connectors still
        waiting: not those offered, expired or gone (the fronts rely on it
        instead of keeping lists of their own, which could pile up).
        """
        offered, _ = self.connect(wait=5)
        expiring, _ = self.connect(wait=2)
        leaving, _ = self.connect(rdv="c" * 64, wait=5)
        self.assertEqual(self.registry.waiting_for(RDV), [offered, expiring])
        self.assertEqual(sorted(self.registry.waiting_rendezvous()), sorted([RDV, "c" * 64]))
        self.registry.remove_connector(leaving)
        self.clock.advance(2)
        self.assertEqual(self.registry.waiting_for(RDV), [offered])
        self.assertEqual(self.registry.waiting_rendezvous(), [RDV])
        self.listen()
        self.assertEqual(self.registry.waiting_for(RDV), [])
        self.assertEqual(self.registry.waiting_rendezvous(), [])
        self.clock.advance(10)

    def test_default_wait_and_clamp(self) -> None:
        """No wait means 30 s; a wait above max_wait is clamped to it."""
        _, default = self.connect()
        _, huge = self.connect(wait=10_000)
        self.clock.advance(30)
        self.assertEqual(default.codes, [ErrorCode.NO_LISTENER])
        self.assertEqual(huge.codes, [])
        self.clock.advance(90)
        self.assertEqual(huge.codes, [ErrorCode.NO_LISTENER])

    def test_wait_zero(self) -> None:
        """wait=0 without a listener fails at once with no-listener."""
        error = self.assertRaises(ProtocolError, self.connect, wait=0)
        self.assertEqual(error.code, ErrorCode.NO_LISTENER)
        self.assertEqual(self.registry.pending_count, 0)

    def test_accept_timeout(self) -> None:
        """An offered connector not accepted within accept_timeout gets timeout."""
        self.listen()
        _, channel = self.connect()
        self.clock.advance(10)
        self.assertEqual(channel.codes, [ErrorCode.TIMEOUT])
        error = self.assertRaises(ProtocolError, self.registry.accept, "0" * 32)
        self.assertEqual(error.code, ErrorCode.NO_SESSION)

    def test_listener_gone(self) -> None:
        """A listener that goes away fails its offered connectors with no-listener."""
        listener, _ = self.listen()
        _, first = self.connect()
        _, second = self.connect()
        self.registry.remove_listener(listener)  # type: ignore[arg-type]
        self.registry.remove_listener(listener)  # type: ignore[arg-type]
        self.assertEqual(first.codes, [ErrorCode.NO_LISTENER])
        self.assertEqual(second.codes, [ErrorCode.NO_LISTENER])
        self.assertEqual((self.registry.listener_count, self.registry.pending_count), (0, 0))

    def test_listener_gone_offered_again(self) -> None:
        """
        A listener that goes away while another of its rdv is registered
        (a listener renewing its registration): its offered connectors are
        offered to the other in the same session, with a new accept timer;
        an accept from either pairs them.
        """
        old, old_channel = self.listen()
        _, first = self.connect()
        _, second = self.connect()
        _, new_channel = self.listen()
        self.clock.advance(9)
        self.registry.remove_listener(old)  # type: ignore[arg-type]
        sessions = [session for session, _ in old_channel.calls]
        self.assertEqual(new_channel.calls, [(session, FROM) for session in sessions])
        self.assertEqual((first.errors, second.errors), ([], []))
        self.assertEqual(self.registry.pending_count, 2)
        self.clock.advance(9)  # past the first offer's accept timeout, not the second's
        self.assertEqual((first.errors, second.errors), ([], []))
        for session in sessions:
            self.registry.accept(session)
        self.assertEqual((self.registry.pending_count, self.registry.paired_count), (0, 2))

    def test_listener_gone_not_offered_to_the_wrong_peer(self) -> None:
        """A connector that asked for the listener's peer id is not offered to a listener with another one."""
        old, _ = self.listen(peer=PEER_A)
        _, channel = self.connect(peer=PEER_A)
        _, other = self.listen(peer=PEER_B)
        self.registry.remove_listener(old)  # type: ignore[arg-type]
        self.assertEqual(other.calls, [])
        self.assertEqual(channel.codes, [ErrorCode.NO_LISTENER])

    def test_listener_gone_keeps_accepted(self) -> None:
        """An accepted session survives its listener's control socket."""
        listener, _ = self.listen()
        connector, channel = self.connect()
        self.registry.accept("0" * 32)
        self.registry.remove_listener(listener)  # type: ignore[arg-type]
        self.assertEqual(channel.errors, [])
        self.assertEqual(self.registry.paired_count, 1)
        self.registry.remove_connector(connector)  # type: ignore[arg-type]
        self.assertEqual(self.registry.paired_count, 0)

    def test_peer_selection(self) -> None:
        """peer= selects the listener with that peer id among those of an rdv."""
        _, a = self.listen(peer=PEER_A)
        _, b = self.listen(peer=PEER_B)
        for _ in range(2):
            self.connect(peer=PEER_B)
        self.assertEqual((len(a.calls), len(b.calls)), (0, 2))
        for session in ("0" * 32, f"{1:032x}"):
            self.registry.accept(session)

    def test_peer_waits_for_its_listener(self) -> None:
        """A connector with peer= ignores other listeners and waits for its own."""
        _, a = self.listen(peer=PEER_A)
        _, channel = self.connect(peer=PEER_B, wait=5)
        _, b = self.listen(peer=PEER_B)
        self.assertEqual((len(a.calls), len(b.calls)), (0, 1))
        self.registry.accept("0" * 32)
        self.assertEqual(channel.errors, [])

    def test_round_robin(self) -> None:
        """Without peer=, connectors go round-robin over the listeners of an rdv."""
        _, a = self.listen(peer=PEER_A)
        _, b = self.listen(peer=PEER_B)
        for _ in range(3):
            self.connect()
        self.assertEqual((len(a.calls), len(b.calls)), (2, 1))
        sessions = [s for s, _ in a.calls + b.calls]
        for session in sessions:
            self.registry.accept(session)

    def test_rdv_isolation(self) -> None:
        """Listeners of another rdv never see a connector."""
        _, other = self.listen(rdv=RDV2)
        _, channel = self.connect(wait=1)
        self.clock.advance(1)
        self.assertEqual(other.calls, [])
        self.assertEqual(channel.codes, [ErrorCode.NO_LISTENER])

    def test_max_pending(self) -> None:
        """Beyond max_pending pending connectors of an rdv: rate-limited."""
        for _ in range(3):
            self.connect(wait=1)
        error = self.assertRaises(ProtocolError, self.connect, wait=1)
        self.assertEqual(error.code, ErrorCode.RATE_LIMITED)
        self.connect(rdv=RDV2, wait=1)  # another rdv is not affected
        self.clock.advance(1)
        self.assertEqual(self.registry.pending_count, 0)

    def test_connector_gone(self) -> None:
        """A connector that leaves is forgotten: its session cannot be accepted."""
        _, listener = self.listen()
        connector, channel = self.connect()
        waiting, _ = self.connect(rdv=RDV2)
        self.registry.remove_connector(connector)  # type: ignore[arg-type]
        self.registry.remove_connector(waiting)  # type: ignore[arg-type]
        self.registry.remove_connector(waiting)  # type: ignore[arg-type]
        error = self.assertRaises(ProtocolError, self.registry.accept, listener.calls[0][0])
        self.assertEqual(error.code, ErrorCode.NO_SESSION)
        self.assertEqual(channel.errors, [])
        self.assertEqual(self.registry.pending_count, 0)

    def test_done_absorbs(self) -> None:
        """A finished connector ignores later inputs (timers, removal, unpair)."""
        connector, channel = self.connect(wait=1)
        self.clock.advance(1)
        self.registry.remove_connector(connector)  # type: ignore[arg-type]
        self.registry.unpair(connector)  # type: ignore[arg-type]
        self.listen()
        self.assertEqual(channel.codes, [ErrorCode.NO_LISTENER])
        self.assertEqual(connector.state, ConnectorState.DONE)  # type: ignore[attr-defined]

    def test_session_ids(self) -> None:
        """The default session ids are 32 lowercase hex characters, all different."""
        registry = Registry(self.clock.callLater)
        channel = FakeListenerChannel()
        registry.listen(RDV, PEER_A, channel)
        for _ in range(5):
            registry.connect(RDV, None, None, None, FakeConnectorChannel())
        sessions = [s for s, _ in channel.calls]
        self.assertEqual(len(set(sessions)), 5)
        for session in sessions:
            self.assertRegex(session, r"^[0-9a-f]{32}$")
        self.clock.advance(10)
