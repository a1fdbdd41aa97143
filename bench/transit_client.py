"""
A minimal Autobahn client for magic-wormhole's transit relay in WebSocket mode.

What the relay expects (wormhole_transit_relay/transit_server.py,
WebSocketTransitConnection): a plain WebSocket (no subprotocol) at the URL it
was started with; every message must be *binary*; the first one is the
handshake ``please relay <64 hex> for side <16 hex>\\n``; when a second
client sends the same token with a different side the relay answers ``ok\\n``
(one binary message) to both and from then on relays each binary message to
the partner.  Nothing here is encrypted: it carries raw bytes, like
`twist portforward`.

After ``ok\\n`` the WebSocket is presented to an ordinary Twisted protocol as
its transport (one binary message per write; producer registration and read
pausing go to the TCP transport underneath), so the same benchmark protocols
run over it as over TCP and over pluresync.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure


def handshake(token: str, side: str) -> bytes:
    if len(token) != 64 or len(side) != 16:
        raise ValueError("token is 64 hex digits, side 16")
    return f"please relay {token} for side {side}\n".encode("ascii")


class MessageTransport:
    """A paired transit WebSocket as a Twisted transport for an inner protocol."""

    def __init__(self, ws: TransitClientProtocol) -> None:
        self._ws = ws
        self._tcp = ws.transport
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self._ws.sendMessage(bytes(data), isBinary=True)

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._ws.sendClose(1000)

    def abortConnection(self) -> None:
        self._tcp.abortConnection()

    def registerProducer(self, producer, streaming: bool) -> None:
        self._tcp.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._tcp.unregisterProducer()

    def pauseProducing(self) -> None:
        self._tcp.pauseProducing()

    def resumeProducing(self) -> None:
        self._tcp.resumeProducing()

    def stopProducing(self) -> None:
        self._tcp.stopProducing()

    def getPeer(self):
        return self._tcp.getPeer()

    def getHost(self):
        return self._tcp.getHost()


class TransitClientProtocol(WebSocketClientProtocol):
    factory: TransitClientFactory

    def onOpen(self) -> None:
        self._inner = None
        self.sendMessage(self.factory.hello, isBinary=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(payload)
            return
        if payload != b"ok\n":
            self.factory.fail(RuntimeError(f"transit relay said {payload[:40]!r}"))
            self.dropConnection(abort=True)
            return
        self._inner = self.factory.inner_factory.buildProtocol(None)
        self._inner.makeConnection(MessageTransport(self))
        self.factory.paired(self._inner)

    def onClose(self, wasClean: bool, code, reason) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None:
            self._inner = None
            inner.connectionLost(Failure(ConnectionDone(f"close {code}")))
        else:
            self.factory.fail(RuntimeError(f"transit WebSocket closed before pairing: {code} {reason}"))


class TransitClientFactory(WebSocketClientFactory):
    protocol = TransitClientProtocol

    def __init__(self, url: str, hello: bytes, inner_factory) -> None:
        super().__init__(url)
        self.setProtocolOptions(
            tcpNoDelay=True,
            autoFragmentSize=0,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            perMessageCompressionOffers=[],
            openHandshakeTimeout=10,
        )
        self.hello = hello
        self.inner_factory = inner_factory
        self.result: Deferred = Deferred()

    def paired(self, protocol) -> None:
        if not self.result.called:
            self.result.callback(protocol)

    def fail(self, error: Exception) -> None:
        if not self.result.called:
            self.result.errback(Failure(error))


def connect_transit(reactor, port: int, token: str, side: str, inner_factory) -> Deferred:
    """Connect to the transit relay at 127.0.0.1:port; fires with the inner protocol once paired."""
    factory = TransitClientFactory(f"ws://127.0.0.1:{port}/", handshake(token, side), inner_factory)
    TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory).addErrback(factory.fail)
    return factory.result
