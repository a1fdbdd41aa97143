"""
A paired relay socket against an independent WebSocket implementation: two
clients framed by the C{websockets} library (sans-I/O, over Twisted TCP to
an in-process relay on 127.0.0.1), not by Autobahn or L{pluresync.wsframes}.

After pairing the relay forwards frames itself (L{pluresync.wsframes.FrameForwarder});
these tests hold it to RFC 6455 for every frame kind a client may send:
each length form, fragmented messages with control frames between the
fragments (answered by the relay, never forwarded), and the close.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from websockets.frames import Opcode
from websockets.protocol import Protocol as WebSocket
from websockets.protocol import Side, State

from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.site import build_site
from pluresync.wsframes import FrameForwarder

RDV = "ab" * 32


class WebSocketsClient(Protocol):
    """
    A relay client: an HTTP upgrade written by hand, then every frame framed
    and parsed by C{websockets}; each write of ours is split in small pieces
    so the relay's reads cut frames at odd places.
    """

    def __init__(self) -> None:
        self.ws = WebSocket(Side.CLIENT, state=State.OPEN, max_size=None)
        self.events: list[Any] = []
        self.opened: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._head = b""
        self._waiters: list[tuple[Any, Deferred]] = []

    def connectionMade(self) -> None:
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: pluresync.v1\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        if not self.opened.called:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            head, data = self._head.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101"), head
            self.opened.callback(None)
        self.ws.receive_data(data)
        self.events += self.ws.events_received()
        self.flush()
        self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            if len(self.events) >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(self.events[: waiter[0]])

    def connectionLost(self, reason: Any) -> None:
        self.ws.receive_eof()
        self.events += self.ws.events_received()
        self.lost.callback(None)

    def flush(self, piece: int = 0) -> None:
        """Write what C{websockets} framed (its pongs and close answers too), in pieces of C{piece} bytes."""
        data = b"".join(self.ws.data_to_send())
        if not piece:
            self.transport.write(data)
            return
        for at in range(0, len(data), piece):
            self.transport.write(data[at : at + piece])

    def send_json(self, message: dict) -> None:
        self.ws.send_text(json.dumps(message).encode())
        self.flush()

    def events_until(self, count: int) -> Deferred:
        """The first C{count} frames received, once they are."""
        d: Deferred = Deferred()
        self._waiters.append((count, d))
        self._check()
        return d.addTimeout(10, reactor)

    def data_frames(self) -> list[tuple[int, bytes, bool]]:
        return [(int(e.opcode), bytes(e.data), e.fin) for e in self.events if e.opcode < Opcode.CLOSE]


class InteropTests(unittest.TestCase):
    """A paired relay socket, held against C{websockets} on both ends."""

    def setUp(self) -> None:
        limits = RelayLimits(ping_interval=0, ping_timeout=0, hello_timeout=5, accept_timeout=5)
        self.site, self.factory = build_site(reactor, limits)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.clients: list[WebSocketsClient] = []

    @inlineCallbacks
    def tearDown(self) -> Any:
        for client in self.clients:
            if client.transport is not None:
                client.transport.abortConnection()
        for client in self.clients:
            yield client.lost.addTimeout(10, reactor)
        yield self.port.stopListening()
        yield self.factory.close_all().addTimeout(10, reactor)

    @inlineCallbacks
    def open(self) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = WebSocketsClient()
        yield connectProtocol(endpoint, client)
        self.clients.append(client)
        yield client.opened.addTimeout(10, reactor)
        return client

    @inlineCallbacks
    def pair(self) -> Any:
        listener = yield self.open()
        listener.send_json({"v": 1, "op": "listen", "rdv": RDV, "peer": "0a" * 32})
        yield listener.events_until(1)
        connector = yield self.open()
        connector.send_json({"v": 1, "op": "connect", "rdv": RDV})
        (_, incoming) = yield listener.events_until(2)
        acceptor = yield self.open()
        acceptor.send_json({"v": 1, "op": "accept", "session": json.loads(incoming.data)["session"]})
        yield acceptor.events_until(1)
        yield connector.events_until(1)
        # From here on, only data frames count.
        connector.events.clear()
        acceptor.events.clear()
        return connector, acceptor

    @inlineCallbacks
    def test_every_frame_kind(self) -> Any:
        """
        Every length form, empty frames and a fragmented message with a ping
        and a pong between its fragments, written in 7-byte pieces: the
        partner parses each data frame as it was framed; the ping is
        answered by the relay to its sender and neither control frame is
        forwarded.
        """
        connector, acceptor = yield self.pair()
        forwarders = [s for s in self.factory.sockets if isinstance(s._frames, FrameForwarder)]
        self.assertEqual(len(forwarders), 2)
        sent: list[tuple[int, bytes, bool]] = []
        ws = connector.ws
        for size in (0, 1, 125, 126, 65535, 65536, 70000):
            payload = os.urandom(size)
            ws.send_binary(payload)
            sent.append((int(Opcode.BINARY), payload, True))
        first, middle = os.urandom(3000), os.urandom(70000)
        ws.send_binary(first, fin=False)
        ws.send_ping(b"between")
        ws.send_continuation(middle, fin=False)
        ws.send_pong(b"unsolicited")
        ws.send_continuation(b"", fin=True)
        sent += [(int(Opcode.BINARY), first, False), (int(Opcode.CONT), middle, False), (int(Opcode.CONT), b"", True)]
        connector.flush(piece=7)
        yield acceptor.events_until(len(sent))
        self.assertEqual(acceptor.data_frames(), sent)
        yield connector.events_until(1)
        self.assertEqual([(e.opcode, bytes(e.data)) for e in connector.events], [(Opcode.PONG, b"between")])
        # And back, in one write.
        acceptor.ws.send_binary(b"back")
        acceptor.flush()
        yield connector.events_until(2)
        self.assertEqual(connector.data_frames(), [(int(Opcode.BINARY), b"back", True)])

    @inlineCallbacks
    def test_close_between_fragments(self) -> Any:
        """
        A close in the middle of a fragmented message is answered with its
        code and ends the pair: the partner gets the fragment sent before
        it, then a close frame of its own (1000, the peer closed), both
        parsed by C{websockets}.
        """
        connector, acceptor = yield self.pair()
        connector.ws.send_binary(b"start", fin=False)
        connector.ws.send_close(1000, "done")
        connector.flush(piece=3)
        yield connector.lost.addTimeout(10, reactor)
        yield acceptor.lost.addTimeout(10, reactor)
        self.assertEqual(connector.ws.close_rcvd.code, 1000)
        self.assertEqual(acceptor.data_frames(), [(int(Opcode.BINARY), b"start", False)])
        self.assertEqual((acceptor.ws.close_rcvd.code, acceptor.ws.close_rcvd.reason), (1000, "peer closed"))

    @inlineCallbacks
    def test_dropped_mid_frame(self) -> Any:
        """
        A sender gone in the middle of a frame: the partner never sees a part
        of that frame, only the frames before it and a well-formed close
        (4010, peer gone).
        """
        connector, acceptor = yield self.pair()
        connector.ws.send_binary(b"whole")
        connector.ws.send_binary(os.urandom(100_000))
        stream = b"".join(connector.ws.data_to_send())
        connector.transport.write(stream[:50_000])
        yield acceptor.events_until(1)
        connector.transport.abortConnection()
        yield acceptor.lost.addTimeout(10, reactor)
        self.assertEqual(acceptor.data_frames(), [(int(Opcode.BINARY), b"whole", True)])
        self.assertEqual(acceptor.ws.close_rcvd.code, 4010)
