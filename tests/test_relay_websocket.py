"""
The relay over real loopback WebSockets: control phase, pairing, piping,
errors and their close codes, /health, shutdown and flow control.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from zope.interface import implementer

from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.site import build_site

from .relayclient import HandshakeFailed, RelayTestClient, connect
from .relayprocess import poll

RDV = "ab" * 32
RDV2 = "cd" * 32
PEER_A = "0a" * 32
PEER_B = "0b" * 32
PEER_C = "0c" * 32


def _within(d: Deferred[Any], seconds: float = 10.0) -> Deferred[Any]:
    """Fail C{d} if it has not fired within C{seconds}."""
    return d.addTimeout(seconds, reactor)


class RelayTestCase(unittest.TestCase):
    """A relay on 127.0.0.1 with test clients that are cleaned up."""

    limits = RelayLimits(ping_interval=0, ping_timeout=0, hello_timeout=5, accept_timeout=5)

    tls = False

    def setUp(self) -> None:
        self.site, self.factory = build_site(reactor, self.limits)
        if self.tls:
            from twisted.internet.ssl import PrivateCertificate
            from twisted.test import __file__ as twisted_test

            with open(os.path.join(os.path.dirname(twisted_test), "server.pem"), "rb") as pem:
                options = PrivateCertificate.loadPEM(pem.read()).options()
            self.port = reactor.listenSSL(0, self.site, options, interface="127.0.0.1")
        else:
            self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        self.clients: list[RelayTestClient] = []

    @inlineCallbacks
    def tearDown(self) -> Any:
        for client in self.clients:
            client.abort()
        yield _within(gatherResults([c.closed for c in self.clients]))
        yield self.port.stopListening()
        yield _within(self.factory.close_all())

    def relayState(self, name: str, value: int) -> Deferred:
        """
        Fires once the relay's C{stats()[name]} equals C{value}: the relay has
        taken in what the clients sent (bounded: 5 s, then the test fails).
        """
        return Deferred.fromCoroutine(
            poll(lambda: self.factory.stats()[name] == value, timeout=5, interval=0.01, what=f"relay {name} == {value}")
        )

    def client(self, protocols: list[str] | None = None, max_message: int = 0) -> RelayTestClient:
        """A new test client (not yet open)."""
        client = connect(reactor, self.port_number, protocols, max_message, tls=self.tls)
        self.clients.append(client)
        return client

    @inlineCallbacks
    def open(self) -> Any:
        """An open test client."""
        client = self.client()
        yield _within(client.opened)
        return client

    @inlineCallbacks
    def listener(self, rdv: str = RDV, peer: str = PEER_A) -> Any:
        """A listener that got C{ready}."""
        listener = yield self.open()
        listener.send_json({"v": 1, "op": "listen", "rdv": rdv, "peer": peer})
        ready = yield _within(listener.next_json())
        self.assertEqual(dict(ready, limits=None), {"op": "ready", "limits": None, "decline": True})
        return listener

    @inlineCallbacks
    def accept(self, listener: RelayTestClient) -> Any:
        """Accept the listener's next C{incoming} on a new socket; return it and the message."""
        incoming = yield _within(listener.next_json())
        self.assertEqual(incoming["op"], "incoming")
        acceptor = yield self.open()
        acceptor.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
        paired = yield _within(acceptor.next_json())
        self.assertEqual(paired["op"], "paired")
        return acceptor, incoming, paired

    @inlineCallbacks
    def pair(self, rdv: str = RDV, **connect_fields: Any) -> Any:
        """A fresh listener and a connector paired through it."""
        listener = yield self.listener(rdv)
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": rdv, **connect_fields})
        acceptor, _, _ = yield self.accept(listener)
        paired = yield _within(connector.next_json())
        self.assertEqual(paired["op"], "paired")
        return listener, connector, acceptor

    @inlineCallbacks
    def assertPipes(self, a: RelayTestClient, b: RelayTestClient) -> Any:
        """Binary messages go both ways unchanged, boundaries preserved."""
        messages = [b"", b"x", os.urandom(1000), os.urandom(60000)]
        for message in messages:
            a.send_bytes(message)
        for message in messages:
            got = yield _within(b.next_message())
            self.assertEqual(got, (message, True))
        b.send_bytes(b"back")
        got = yield _within(a.next_message())
        self.assertEqual(got, (b"back", True))

    @inlineCallbacks
    def assertClosedWith(self, client: RelayTestClient, code: str | None, close_code: int) -> Any:
        """C{client} gets the error C{code} (if given) and then the close code."""
        if code is not None:
            error = yield _within(client.next_json())
            self.assertEqual(error["op"], "error")
            self.assertEqual(error["code"], code)
            self.assertIsInstance(error["message"], str)
        clean, got, _ = yield _within(client.closed)
        self.assertEqual(got, close_code)


class PairingTests(RelayTestCase):
    """Listen, connect, accept, pipe, close."""

    @inlineCallbacks
    def test_listen_ready(self) -> Any:
        """A listen gets ready, and the listener counts in /health."""
        yield self.listener()
        self.assertEqual(self.factory.stats()["listeners"], 1)

    @inlineCallbacks
    def test_connect_incoming_accept_paired(self) -> Any:
        """
        A connector's from goes to the listener in incoming and to the
        acceptor in paired; the connector's paired names the listener.
        """
        listener = yield self.listener(peer=PEER_A)
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "from": PEER_B, "wait": 5})
        acceptor, incoming, paired = yield self.accept(listener)
        self.assertEqual(set(incoming), {"op", "session", "peer"})
        self.assertEqual(incoming["peer"], PEER_B)
        self.assertRegex(incoming["session"], r"^[0-9a-f]{32}$")
        self.assertEqual(dict(paired, limits=None), {"op": "paired", "peer": PEER_B, "limits": None})
        connector_paired = yield _within(connector.next_json())
        self.assertEqual(dict(connector_paired, limits=None), {"op": "paired", "peer": PEER_A, "limits": None})
        self.assertEqual(self.factory.stats()["sessions"], 1)
        yield self.assertPipes(connector, acceptor)

    @inlineCallbacks
    def test_connect_without_from(self) -> Any:
        """Without from, incoming and the acceptor's paired carry a null peer."""
        listener = yield self.listener()
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV})
        acceptor, incoming, paired = yield self.accept(listener)
        self.assertIsNone(incoming["peer"])
        self.assertIsNone(paired["peer"])

    @inlineCallbacks
    def test_clean_close_propagates(self) -> Any:
        """A 1000 close on one side closes the other with 1000 after the data."""
        _, connector, acceptor = yield self.pair()
        connector.send_bytes(b"last words")
        connector.close_normally()
        got = yield _within(acceptor.next_message())
        self.assertEqual(got, (b"last words", True))
        clean, code, _ = yield _within(acceptor.closed)
        self.assertEqual((clean, code), (True, 1000))
        self.assertEqual(self.factory.stats()["sessions"], 0)

    @inlineCallbacks
    def test_drop_gives_peer_gone(self) -> Any:
        """A side that drops its TCP connection leaves its partner peer-gone."""
        _, connector, acceptor = yield self.pair()
        acceptor.abort()
        yield self.assertClosedWith(connector, None, 4010)

    @inlineCallbacks
    def test_many_connectors_one_listener(self) -> Any:
        """Each connector of one listener becomes its own pair."""
        listener = yield self.listener()
        connectors = []
        for index in range(3):
            connector = yield self.open()
            connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "from": f"{index:064x}"})
            connectors.append(connector)
        acceptors = {}
        for _ in connectors:
            acceptor, incoming, _ = yield self.accept(listener)
            acceptors[int(incoming["peer"], 16)] = acceptor
        for index, connector in enumerate(connectors):
            yield _within(connector.next_json())
            connector.send_bytes(b"%d" % index)
            got = yield _within(acceptors[index].next_message())
            self.assertEqual(got, (b"%d" % index, True))
        self.assertEqual(self.factory.stats()["sessions"], 3)

    @inlineCallbacks
    def test_peer_selects_listener(self) -> Any:
        """A connector with peer= only reaches the listener with that peer id."""
        listener_a = yield self.listener(peer=PEER_A)
        listener_b = yield self.listener(peer=PEER_B)
        for _ in range(2):
            connector = yield self.open()
            connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "peer": PEER_B})
            _, _, _ = yield self.accept(listener_b)
            paired = yield _within(connector.next_json())
            self.assertEqual(paired["peer"], PEER_B)
        self.assertEqual(listener_a.received.pending, [])

    @inlineCallbacks
    def test_round_robin(self) -> Any:
        """Without peer=, connectors alternate between the listeners of an rdv."""
        listener_a = yield self.listener(peer=PEER_A)
        listener_b = yield self.listener(peer=PEER_B)
        for listener in (listener_a, listener_b, listener_a):
            connector = yield self.open()
            connector.send_json({"v": 1, "op": "connect", "rdv": RDV})
            incoming = yield _within(listener.next_json())
            self.assertEqual(incoming["op"], "incoming")

    @inlineCallbacks
    def test_connector_waits_for_listener(self) -> Any:
        """A connector that arrives first is matched when the listener registers."""
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 10})
        yield self.relayState("pending", 1)
        listener = yield self.listener()
        yield self.accept(listener)
        paired = yield _within(connector.next_json())
        self.assertEqual(paired["op"], "paired")


class IdleMemoryTests(RelayTestCase):
    """What an idle paired socket keeps in its own dict (RelayProtocol._compact)."""

    @inlineCallbacks
    def test_compact_after_pairing(self) -> Any:
        """
        A paired socket's dict fits a 64-slot table (at most 42 entries,
        against Autobahn's ~100), its factory options are read from the
        factory, its write queue is the shared empty one, and it still pipes
        and closes as before.
        """
        from autobahn.websocket.protocol import WebSocketServerProtocol

        from pluresync.relay.server.websocket import _NO_WRITE_QUEUE, _SHARED_START, RelayProtocol

        _, connector, acceptor = yield self.pair()
        paired = [s for s in self.factory.sockets if s._partner is not None]
        self.assertEqual(len(paired), 2)
        for socket in paired:
            self.assertLessEqual(len(vars(socket)), 42, sorted(vars(socket)))
            self.assertIs(socket.send_queue, _NO_WRITE_QUEUE)
            self.assertEqual(socket.autoPingInterval, self.factory.autoPingInterval)
            self.assertNotIn("autoPingInterval", vars(socket))
            self.assertIsNone(socket.http_headers)
        # The shared start values are plain attributes of Autobahn's, never methods.
        for name in _SHARED_START:
            self.assertFalse(callable(getattr(WebSocketServerProtocol, name, None)), name)
            self.assertFalse(isinstance(getattr(WebSocketServerProtocol, name, None), property), name)
        self.assertFalse(hasattr(RelayProtocol, "send_queue"))
        yield self.assertPipes(connector, acceptor)
        connector.sendClose(1000)
        clean, code, _ = yield _within(acceptor.closed)
        self.assertEqual(code, 1000)


class TimeoutTests(RelayTestCase):
    """Waits and timeouts, with short limits."""

    limits = RelayLimits(ping_interval=0, ping_timeout=0, hello_timeout=0.2, accept_timeout=0.2, max_wait=0.3)

    @inlineCallbacks
    def test_wait_then_no_listener(self) -> Any:
        """A connector without a listener gets no-listener after its wait."""
        healthy = yield self.pair(RDV2)
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 0.1})
        yield self.assertClosedWith(connector, "no-listener", 4004)
        yield self.assertPipes(healthy[1], healthy[2])

    @inlineCallbacks
    def test_wait_clamped_to_max_wait(self) -> Any:
        """A wait beyond max_wait is clamped (here 1000 s becomes 0.3 s)."""
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 1000})
        yield self.assertClosedWith(connector, "no-listener", 4004)

    @inlineCallbacks
    def test_wait_zero(self) -> Any:
        """wait=0 fails at once when no listener is there."""
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 0})
        yield self.assertClosedWith(connector, "no-listener", 4004)

    @inlineCallbacks
    def test_peer_mismatch_no_listener(self) -> Any:
        """A connector whose peer= matches no listener gets no-listener."""
        yield self.listener(peer=PEER_A)
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "peer": PEER_C, "wait": 0.1})
        yield self.assertClosedWith(connector, "no-listener", 4004)

    @inlineCallbacks
    def test_accept_timeout(self) -> Any:
        """A listener that does not accept in time leaves the connector timed out."""
        healthy = yield self.pair(RDV2)
        listener = yield self.listener()
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV})
        incoming = yield _within(listener.next_json())
        yield self.assertClosedWith(connector, "timeout", 4008)
        # The session is gone now.
        late = yield self.open()
        late.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
        yield self.assertClosedWith(late, "no-session", 4005)
        yield self.assertPipes(healthy[1], healthy[2])

    @inlineCallbacks
    def test_silent_client(self) -> Any:
        """A client that sends no control message gets timeout."""
        healthy = yield self.pair(RDV2)
        silent = yield self.open()
        yield self.assertClosedWith(silent, "timeout", 4008)
        yield self.assertPipes(healthy[1], healthy[2])


class ErrorTests(RelayTestCase):
    """Each bad input gets its code, and a concurrent pair keeps working."""

    limits = RelayLimits(ping_interval=0, ping_timeout=0, max_message=135168, max_pending=2)

    @inlineCallbacks
    def bad(self, send: Any, code: str, close_code: int) -> Any:
        healthy = yield self.pair(RDV2)
        client = yield self.open()
        send(client)
        yield self.assertClosedWith(client, code, close_code)
        yield self.assertPipes(healthy[1], healthy[2])

    def test_not_json(self) -> Any:
        """A text message that is not JSON: bad-request."""
        return self.bad(lambda c: c.send_text(b"{nope"), "bad-request", 4000)

    def test_not_object(self) -> Any:
        """A JSON array: bad-request."""
        return self.bad(lambda c: c.send_text(b"[1]"), "bad-request", 4000)

    def test_unknown_op(self) -> Any:
        """An unknown op: bad-request."""
        return self.bad(lambda c: c.send_json({"v": 1, "op": "dance"}), "bad-request", 4000)

    def test_wrong_version(self) -> Any:
        """v other than 1: bad-request."""
        return self.bad(
            lambda c: c.send_json({"v": 2, "op": "listen", "rdv": RDV, "peer": PEER_A}),
            "bad-request",
            4000,
        )

    def test_bad_rdv(self) -> Any:
        """An rdv that is not 64 lowercase hex characters: bad-request."""
        return self.bad(
            lambda c: c.send_json({"v": 1, "op": "connect", "rdv": RDV.upper()}),
            "bad-request",
            4000,
        )

    def test_binary_before_pairing(self) -> Any:
        """A binary message as the first message: bad-request."""
        return self.bad(lambda c: c.send_bytes(b"\x00"), "bad-request", 4000)

    def test_oversize_control(self) -> Any:
        """A control message above 4096 bytes: too-large."""
        message = {"v": 1, "op": "listen", "rdv": RDV, "peer": PEER_A, "pad": "x" * 5000}
        return self.bad(lambda c: c.send_json(message), "too-large", 4009)

    def test_oversize_frame(self) -> Any:
        """A frame above max_message: too-large, even in the control phase."""
        return self.bad(lambda c: c.send_bytes(b"x" * 140000), "too-large", 4009)

    def test_second_control_message(self) -> Any:
        """A second control message on a listener socket: bad-request."""

        def send(client: RelayTestClient) -> None:
            client.send_json({"v": 1, "op": "listen", "rdv": RDV, "peer": PEER_A})
            client.send_json({"v": 1, "op": "listen", "rdv": RDV, "peer": PEER_A})

        @inlineCallbacks
        def check() -> Any:
            healthy = yield self.pair(RDV2)
            client = yield self.open()
            send(client)
            ready = yield _within(client.next_json())
            self.assertEqual(dict(ready, limits=None), {"op": "ready", "limits": None, "decline": True})
            yield self.assertClosedWith(client, "bad-request", 4000)
            self.assertEqual(self.factory.stats()["listeners"], 1)
            yield self.assertPipes(healthy[1], healthy[2])

        return check()

    def test_accept_unknown_session(self) -> Any:
        """An accept for a session nobody offered: no-session."""
        return self.bad(
            lambda c: c.send_json({"v": 1, "op": "accept", "session": "0" * 32}),
            "no-session",
            4005,
        )

    @inlineCallbacks
    def test_accept_taken_session(self) -> Any:
        """A second accept of the same session: no-session."""
        listener = yield self.listener()
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV})
        acceptor, incoming, _ = yield self.accept(listener)
        second = yield self.open()
        second.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
        yield self.assertClosedWith(second, "no-session", 4005)
        yield _within(connector.next_json())
        yield self.assertPipes(connector, acceptor)

    @inlineCallbacks
    def test_text_after_pairing(self) -> Any:
        """A text message after pairing: sender bad-request 4000, partner 4010."""
        healthy = yield self.pair(RDV2)
        _, connector, acceptor = yield self.pair()
        connector.send_text(b"{}")
        yield self.assertClosedWith(connector, None, 4000)
        yield self.assertClosedWith(acceptor, None, 4010)
        yield self.assertPipes(healthy[1], healthy[2])

    @inlineCallbacks
    def test_oversize_after_pairing(self) -> Any:
        """A frame above max_message after pairing: 4009, partner 4010."""
        _, connector, acceptor = yield self.pair()
        connector.send_bytes(b"y" * 140000)
        yield self.assertClosedWith(connector, None, 4009)
        yield self.assertClosedWith(acceptor, None, 4010)

    @inlineCallbacks
    def test_listener_gone_no_listener(self) -> Any:
        """Connectors offered to a listener that vanishes get no-listener at once."""
        healthy = yield self.pair(RDV2)
        listener = yield self.listener()
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 60})
        yield _within(listener.next_json())
        listener.abort()
        yield self.assertClosedWith(connector, "no-listener", 4004)
        yield self.assertPipes(healthy[1], healthy[2])

    @inlineCallbacks
    def test_rate_limited(self) -> Any:
        """Beyond max_pending waiting connectors per rdv: rate-limited."""
        healthy = yield self.pair(RDV2)
        for _ in range(2):
            waiting = yield self.open()
            waiting.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 60})
        yield self.relayState("pending", 2)
        extra = yield self.open()
        extra.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 60})
        yield self.assertClosedWith(extra, "rate-limited", 4029)
        yield self.assertPipes(healthy[1], healthy[2])

    @inlineCallbacks
    def test_missing_subprotocol(self) -> Any:
        """An upgrade without pluresync.v1 is refused (HTTP 400), nothing else breaks."""
        healthy = yield self.pair(RDV2)
        client = self.client(protocols=["other"])
        yield self.assertFailure(_within(client.opened), HandshakeFailed)
        yield _within(client.closed)
        yield self.assertPipes(healthy[1], healthy[2])


class HealthAndShutdownTests(RelayTestCase):
    """/health and the 1001 shutdown."""

    @inlineCallbacks
    def test_health(self) -> Any:
        """/health is JSON with the documented fields and live counts, no ids."""
        yield self.pair()
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV2, "wait": 60})
        yield self.relayState("pending", 1)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield Agent(reactor, pool=pool).request(b"GET", b"http://127.0.0.1:%d/health" % self.port_number)
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        health = json.loads(body)
        self.assertEqual(
            set(health),
            {
                "status",
                "version",
                "uptime",
                "ready",
                "checks",
                "connections",
                "opening",
                "listeners",
                "sessions",
                "pending",
            },
        )
        self.assertEqual(health["status"], "ok")
        self.assertEqual(
            (health["connections"], health["listeners"], health["sessions"], health["pending"]),
            (4, 1, 1, 1),
        )
        self.assertNotIn(RDV.encode(), body)
        self.assertNotIn(RDV2.encode(), body)
        yield pool.closeCachedConnections()

    @inlineCallbacks
    def test_close_all_going_away(self) -> Any:
        """close_all closes listeners, waiting connectors and pairs with 1001."""
        listener, connector, acceptor = yield self.pair()
        waiting = yield self.open()
        waiting.send_json({"v": 1, "op": "connect", "rdv": RDV2, "wait": 60})
        fresh = yield self.open()
        yield self.relayState("pending", 1)
        yield _within(self.factory.close_all())
        for client in (listener, connector, acceptor, waiting, fresh):
            clean, code, reason = yield _within(client.closed)
            self.assertEqual(code, 1001)
            self.assertEqual(client.received.pending, [])


@implementer(IPushProducer)
class Flood:
    """Sends C{total} bytes in binary messages, respecting its transport's backpressure."""

    def __init__(self, client: RelayTestClient, total: int, size: int) -> None:
        self.client = client
        self.total = total
        self.chunk = os.urandom(size)
        self.sent = 0
        self.paused = False

    def start(self) -> None:
        self.client.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.total:
            self.client.sendMessage(self.chunk, True)
            self.sent += len(self.chunk)

    def stopProducing(self) -> None:
        self.paused = True


class FlowControlTests(RelayTestCase):
    """A stalled reader stops its writer; the relay buffers a bounded amount."""

    limits = RelayLimits(ping_interval=0, ping_timeout=0)

    def relay_buffered(self) -> int:
        """Bytes the relay holds in its sockets' write buffers and Autobahn's read buffers."""
        total = 0
        for protocol in self.factory.sockets:
            transport = protocol.transport
            if self.tls:
                # TLSMemoryBIOProtocol over the TCP transport.
                total += sum(map(len, getattr(transport, "_appSendBuffer", [])))
                transport = transport.transport
            total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            total += len(protocol.data or b"")
            total += sum(map(len, getattr(protocol, "message_data", None) or []))
            total += sum(map(len, getattr(protocol, "frame_data", None) or []))
        return total

    @inlineCallbacks
    def test_stalled_reader_bounds_relay_memory(self) -> Any:
        """
        The reader stops reading and the writer tries to send 50 MiB: the
        writer is paused, the relay never holds 1 MiB for the pair, and once
        the reader resumes every byte arrives.
        """
        _, writer, reader = yield self.pair()
        reader.transport.pauseProducing()
        received = []
        reader.onMessage = lambda payload, is_binary: received.append(len(payload))
        flood = Flood(writer, 50 * 1024 * 1024, 65536)
        flood.start()
        peak = 0
        last_sent = -1
        for _ in range(400):  # at most 20 s
            yield deferLater(reactor, 0.05, lambda: None)
            peak = max(peak, self.relay_buffered())
            if flood.paused and flood.sent == last_sent:
                break
            last_sent = flood.sent
        self.assertTrue(flood.paused, "the writer was never paused")
        self.assertLess(flood.sent, flood.total)
        self.assertLess(peak, 1024 * 1024)
        reader.transport.resumeProducing()
        for _ in range(1200):  # at most 60 s
            if sum(received) == flood.total:
                break
            peak = max(peak, self.relay_buffered())
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sum(received), flood.total)
        self.assertLess(peak, 1024 * 1024)


class TLSFlowControlTests(FlowControlTests):
    """The same flow control over TLS (the transport is TLSMemoryBIOProtocol)."""

    tls = True


class TLSPairingTests(RelayTestCase):
    """Pairing and piping over wss://."""

    tls = True

    @inlineCallbacks
    def test_pair_over_tls(self) -> Any:
        """A pair over TLS moves bytes both ways and closes cleanly."""
        _, connector, acceptor = yield self.pair()
        yield self.assertPipes(connector, acceptor)
        connector.close_normally()
        clean, code, _ = yield _within(acceptor.closed)
        self.assertEqual(code, 1000)
