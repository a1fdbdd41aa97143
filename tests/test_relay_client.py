"""
The client side of the relay protocol on a fake reactor: deadlines,
cancellation, interfaces and URLs, without any socket.
"""

from __future__ import annotations

from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from pluresync.endpoints.relay import RelayClientEndpoint, RelayConfig, RelayListeningPort, RelayServerEndpoint
from pluresync.errors import ConfigurationError, ConnectionTimeoutError
from pluresync.interfaces import IPath, IPathClient, IPathListener, IPipe, IPipeReceiver
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.pipes.websocket import RelayURL, WebSocketPipe
from pluresync.secure.channel import SecureChannel


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
        """What a relay socket delivers to, once paired, is an IPipeReceiver (the secure channel)."""
        self.assertTrue(verifyClass(IPipeReceiver, SecureChannel))

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
