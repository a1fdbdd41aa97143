"""
A minimal Autobahn WebSocket client for the relay tests.

Each L{RelayTestClient} exposes Deferreds: C{opened} (fires with the client
once the upgrade succeeded, errbacks if it failed), C{closed} (fires with
C{(wasClean, code, reason)}), and C{next_message()} / C{next_json()} for
what the relay sent, in order.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint

SUBPROTOCOL = "pluresync.v1"


class HandshakeFailed(Exception):
    """The WebSocket upgrade did not succeed; args: (code, reason)."""


class RelayTestClient(WebSocketClientProtocol):
    """One test WebSocket to the relay."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[RelayTestClient] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.received: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()
        self.binary_bytes = 0

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # Autobahn leaves this timer running after the connection is gone.
        if getattr(self, "closeHandshakeTimeoutCall", None) is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        if not self.opened.called:
            self.opened.errback(HandshakeFailed(code, reason))
            self.opened.addErrback(lambda _: None)
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))

    def next_message(self) -> Deferred[tuple[bytes, bool]]:
        """The next message from the relay: C{(payload, isBinary)}."""
        return self.received.get()

    def next_json(self) -> Deferred[dict[str, Any]]:
        """The next message, which must be a JSON text message, decoded."""

        def decode(message: tuple[bytes, bool]) -> dict[str, Any]:
            payload, is_binary = message
            if is_binary:
                raise AssertionError(f"expected a text message, got binary {payload[:40]!r}")
            return json.loads(payload.decode("utf-8"))

        return self.next_message().addCallback(decode)

    def send_json(self, obj: Any) -> None:
        """Send C{obj} as a JSON text message."""
        self.sendMessage(json.dumps(obj).encode("utf-8"), False)

    def send_text(self, text: bytes) -> None:
        """Send raw bytes in a text message."""
        self.sendMessage(text, False)

    def send_bytes(self, data: bytes) -> None:
        """Send C{data} as one binary message."""
        self.sendMessage(data, True)

    def close_normally(self) -> Deferred[tuple[bool, int | None, str | None]]:
        """Close with 1000 and return C{closed}."""
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, "bye")
        return self.closed

    def abort(self) -> Deferred[tuple[bool, int | None, str | None]]:
        """Drop the TCP connection (no close frame) and return C{closed}."""
        if self.transport is not None and self.state != self.STATE_CLOSED:
            self.transport.abortConnection()
        return self.closed


def connect(
    reactor: Any,
    port: int,
    protocols: list[str] | None = None,
    max_message: int = 0,
    tls: bool = False,
) -> RelayTestClient:
    """
    Open a test WebSocket to the relay on 127.0.0.1:C{port}.

    @param protocols: the subprotocols offered (default: C{pluresync.v1}).
    @param tls: use C{wss://} (the server certificate is not verified).
    @return: the client; wait on its C{opened}.
    """
    if protocols is None:
        protocols = [SUBPROTOCOL]
    scheme = "wss" if tls else "ws"
    factory = WebSocketClientFactory(f"{scheme}://127.0.0.1:{port}/", protocols=protocols, reactor=reactor)
    factory.protocol = RelayTestClient
    factory.setProtocolOptions(
        maxFramePayloadSize=max_message,
        maxMessagePayloadSize=max_message,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=5,
        serverConnectionDropTimeout=5,
        autoPingInterval=0,
        autoPingTimeout=0,
        perMessageCompressionOffers=[],
    )
    client = factory.buildProtocol(None)
    assert isinstance(client, RelayTestClient)
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls:
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import CertificateOptions

        endpoint = wrapClientTLS(CertificateOptions(verify=False), endpoint)
    from twisted.internet.endpoints import connectProtocol

    def failed(reason: Any) -> None:
        client.opened.errback(reason)
        client.closed.callback((False, None, str(reason.value)))

    connectProtocol(endpoint, client).addErrback(failed)
    return client
