"""
The client side of the HTTP pipe (pipes/http.py) on fakes: where its
requests go, and that what it hands the end-to-end layer is an IPipe.  Its
behaviour against a relay is in test_http_pipe_relay, test_http_pipe_proxy
and test_http_pipe_streams.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from pluresync.errors import RelayUnreachableError
from pluresync.interfaces import IPipe
from pluresync.pipes.http import HttpPipe, HttpRelaySocket, RelayEndpoints, pipe_url
from pluresync.pipes.websocket import RelayURL


class PipeURLTests(TestCase):
    def test_urls(self):
        """The pipe's URL is the relay URL's path joined with 'pipe', ws becoming http."""
        cases = {
            "ws://127.0.0.1:8080": b"http://127.0.0.1:8080/pipe",
            "wss://relay.example.net": b"https://relay.example.net:443/pipe",
            "wss://relay.example.net/relay": b"https://relay.example.net:443/relay/pipe",
            "wss://relay.example.net/relay/": b"https://relay.example.net:443/relay/pipe",
            "ws://[::1]:9/": b"http://[::1]:9/pipe",
        }
        for url, expected in cases.items():
            self.assertEqual(pipe_url(RelayURL.parse(url)), expected, url)


class InterfaceTests(TestCase):
    def test_pipe(self):
        reactor = MemoryReactorClock()
        socket = HttpRelaySocket(reactor, RelayURL.parse("ws://127.0.0.1:1"), b"{}")
        verifyObject(IPipe, HttpPipe(socket))

    def test_nothing_before_start(self):
        """Building a socket opens nothing; start() makes one TCP connection (the downstream)."""
        reactor = MemoryReactorClock()
        socket = HttpRelaySocket(reactor, RelayURL.parse("ws://127.0.0.1:1"), b"{}")
        self.assertEqual(reactor.tcpClients, [])
        answer = socket.start()
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("127.0.0.1", 1)])
        socket.abort()
        # Dropped before the relay answered: the answer says so.
        failure = self.failureResultOf(answer, RelayUnreachableError)
        self.assertIn("ended before it was open", failure.getErrorMessage())

    def test_endpoints_through_a_proxy(self):
        """
        To a wss:// relay through a proxy, requests go to the proxy (for a
        tunnel), and Agent's connection factories are quiet.
        """
        from twisted.internet.protocol import Factory, Protocol

        from pluresync.dial.proxy import ProxyConfig

        reactor = MemoryReactorClock()
        proxy = ProxyConfig.parse("http://127.0.0.1:3128")
        endpoint = RelayEndpoints(reactor, RelayURL.parse("wss://relay:443"), None, proxy).endpointForURI(None)
        factory = Factory.forProtocol(Protocol)
        endpoint.connect(factory)
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("127.0.0.1", 3128)])
        self.assertFalse(factory.noisy)
