"""
The Twisted relay front driven entirely on a fake clock: each client is an
Autobahn WebSocket joined to the relay's site by an in-memory pump
(L{twisted.test.iosim}), so timers (Autobahn's pings and handshake timeouts
included) run only when the test advances the clock.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pluresync.interfaces import IPairEnd
from pluresync.reactortimers import ReactorTimers
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.core.session import Phase
from pluresync.relay.server.site import build_site

RDV = "ab" * 32
PEER_L = "0a" * 32
PEER_C = "0c" * 32


class RawClient(WebSocketClientProtocol):
    """A client that records every message and how the socket closed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Any] = []
        self.close_code: int | None = None
        self.pings = 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(payload if isBinary else json.loads(payload))

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code

    def hello(self, **fields: Any) -> None:
        self.sendMessage(json.dumps({"v": 1, **fields}).encode(), False)


class PumpedRelayTests(unittest.TestCase):
    """A relay site on a MemoryReactorClock, clients pumped in memory."""

    limits = RelayLimits(ping_interval=20, ping_timeout=10, hello_timeout=5, accept_timeout=5, open_timeout=10)

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site, self.factory = build_site(self.clock, self.limits)
        self.pumps: list[iosim.IOPump] = []

    def client(self) -> RawClient:
        factory = WebSocketClientFactory("ws://relay.test:80/", protocols=["pluresync.v1"], reactor=self.clock)
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=5, autoPingInterval=0)
        factory._batched_timer = ReactorTimers(self.clock)
        factory.protocol = RawClient
        client = factory.buildProtocol(None)
        server = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.flush()
        return client

    def flush(self) -> None:
        for _ in range(20):
            if not any([pump.flush() for pump in self.pumps]):
                return

    def sockets(self) -> dict[Phase, list[Any]]:
        phases: dict[Phase, list[Any]] = {}
        for socket in self.factory.sockets:
            phases.setdefault(socket.session.phase, []).append(socket)
        return phases

    def offer(self) -> tuple[RawClient, RawClient]:
        """A listener and a connector it has been offered (not yet accepted)."""
        listener = self.client()
        listener.hello(op="listen", rdv=RDV, peer=PEER_L)
        connector = self.client()
        connector.hello(op="connect", rdv=RDV, **{"from": PEER_C})
        self.flush()
        self.assertEqual([m["op"] for m in listener.messages], ["ready", "incoming"])
        return listener, connector

    def pair(self) -> tuple[RawClient, RawClient, RawClient]:
        listener, connector = self.offer()
        acceptor = self.client()
        acceptor.hello(op="accept", session=listener.messages[1]["session"])
        self.flush()
        self.assertEqual(connector.messages[0]["op"], "paired")
        self.assertEqual(connector.messages[0]["peer"], PEER_L)
        self.assertEqual(acceptor.messages[0]["peer"], PEER_C)
        return listener, connector, acceptor

    def test_pair_forwards_both_ways(self) -> None:
        """Paired sockets are IPairEnds; binary messages cross unchanged; a clean close passes through."""
        listener, connector, acceptor = self.pair()
        paired = self.sockets()[Phase.PAIRED]
        self.assertEqual(len(paired), 2)
        for socket in paired:
            self.assertTrue(verifyObject(IPairEnd, socket))
        connector.sendMessage(b"x" * 70000, True)
        acceptor.sendMessage(b"back", True)
        self.flush()
        self.assertEqual(acceptor.messages[1:], [b"x" * 70000])
        self.assertEqual(connector.messages[1:], [b"back"])
        self.assertEqual(self.factory.stats()["sessions"], 1)
        connector.sendClose(1000)
        self.flush()
        self.assertEqual(acceptor.close_code, 1000)
        self.assertEqual(self.factory.stats()["sessions"], 0)
        self.assertEqual(listener.close_code, None, "the listener stays registered")

    def test_hello_timeout_on_the_clock(self) -> None:
        """The hello timer runs on the injected clock: nothing happens until it is advanced."""
        client = self.client()
        self.clock.advance(4.9)
        self.flush()
        self.assertIsNone(client.close_code)
        self.clock.advance(0.2)
        self.flush()
        self.assertEqual(client.messages[0]["code"], "timeout")
        self.assertEqual(client.close_code, 4008)

    def test_pings_on_the_clock(self) -> None:
        """Autobahn's pings are scheduled on the injected reactor, not on the global one."""
        client = self.client()
        client.hello(op="listen", rdv=RDV, peer=PEER_L)
        self.flush()
        for expected in (1, 2):
            self.clock.advance(self.limits.ping_interval)
            self.flush()
            self.assertEqual(client.pings, expected)
        self.assertIsNone(client.close_code, "each ping was answered")

    def test_vanished_peer(self) -> None:
        """A client dropping its TCP connection: its partner gets peer-gone (4010)."""
        _, connector, acceptor = self.pair()
        connector.transport.abortConnection()
        self.flush()
        self.assertEqual(acceptor.close_code, 4010)
        self.assertEqual(
            self.factory.stats(), {"connections": 1, "opening": 0, "listeners": 1, "sessions": 0, "pending": 0}
        )

    def test_shutdown(self) -> None:
        """close_all: every socket, paired or not, gets 1001; the Deferred fires when all are gone."""
        listener, connector, acceptor = self.pair()
        waiting = self.client()
        done = self.factory.close_all()
        self.flush()
        self.assertEqual([c.close_code for c in (listener, connector, acceptor, waiting)], [1001, 1001, 1001, 1001])
        self.assertIsNone(self.successResultOf(done))

    def test_shutdown_with_an_offer_pending(self) -> None:
        """A connector offered but not yet accepted gets 1001 too, never no-listener, whatever the order."""
        listener, connector = self.offer()
        self.factory.close_all()
        self.flush()
        self.assertEqual(connector.messages, [], "no error message at shutdown")
        self.assertEqual((connector.close_code, listener.close_code), (1001, 1001))

    def test_both_sides_share_one_label(self) -> None:
        """The acceptor is logged under the connector's name and the session, once."""
        self.pair()
        labels = {socket.session.label for socket in self.sockets()[Phase.PAIRED]}
        self.assertEqual(len(labels), 1, labels)
        (label,) = labels
        self.assertEqual(label.count("session="), 1, label)
        self.assertTrue(label.startswith(f"rdv={RDV[:8]} from={PEER_C[:8]}"), label)
