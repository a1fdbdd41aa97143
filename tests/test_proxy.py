"""
HTTP proxy support: L{ProxyConfig}, L{proxy_for} and L{ProxyTunnelEndpoint}.

The unit tests run on a memory reactor and string transports (no sockets);
the integration tests at the end tunnel through a real tinyproxy on
127.0.0.1 (see L{tests.httpproxy}).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import HostnameAddress, IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport, SynchronousResolver
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pluresync.dial.proxy import MAX_RESPONSE_HEADER, ProxyConfig, ProxyTunnelEndpoint, proxy_for
from pluresync.errors import ConfigurationError, RelayUnreachableError

from .httpproxy import TinyProxy
from .localrelay import Collector, LocalRelay

SECRET = "s3cr3t-pa55"


class Recorder(Protocol):
    """The caller's protocol in unit tests: records what it is given."""

    def __init__(self) -> None:
        self.made = 0
        self.data: list[bytes] = []
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


class RecordingFactory(Factory):
    """Builds L{Recorder}s and remembers the address it was given."""

    protocol = Recorder

    def __init__(self) -> None:
        self.addresses: list[Any] = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        return super().buildProtocol(addr)


# -- ProxyConfig.parse ------------------------------------------------------------


class ParseTests(unittest.SynchronousTestCase):
    """L{ProxyConfig.parse}: what it accepts, what it refuses, and that it never shows a password."""

    def test_accepted_forms(self) -> None:
        """Scheme optional, port default 80, trailing slash, IPv6 literals, percent-encoded credentials."""
        cases = {
            "http://proxy.corp:3128": ProxyConfig("proxy.corp", 3128),
            "http://proxy.corp:3128/": ProxyConfig("proxy.corp", 3128),
            "proxy.corp:3128": ProxyConfig("proxy.corp", 3128),
            "HTTP://Proxy.Corp:3128": ProxyConfig("proxy.corp", 3128),
            "http://proxy.corp": ProxyConfig("proxy.corp", 80),
            "  http://10.1.2.3:8080  ": ProxyConfig("10.1.2.3", 8080),
            "http://[::1]:3128": ProxyConfig("::1", 3128),
            "http://alice:pw@proxy.corp:3128": ProxyConfig("proxy.corp", 3128, "alice", "pw"),
            "alice:pw@proxy.corp:3128": ProxyConfig("proxy.corp", 3128, "alice", "pw"),
            "http://alice@proxy.corp:3128": ProxyConfig("proxy.corp", 3128, "alice", ""),
            "http://a%40b:p%3Aw%40x@proxy.corp:3128": ProxyConfig("proxy.corp", 3128, "a@b", "p:w@x"),
        }
        for url, expected in cases.items():
            with self.subTest(url=url):
                self.assertEqual(ProxyConfig.parse(url), expected)

    def test_refused(self) -> None:
        """Other schemes, paths, bad ports and missing hosts are ConfigurationErrors naming the problem."""
        cases = {
            f"socks5://bob:{SECRET}@proxy.corp:1080": "unsupported proxy scheme 'socks5://'",
            f"socks5h://bob:{SECRET}@proxy.corp:1080": "unsupported proxy scheme 'socks5h://'",
            f"https://bob:{SECRET}@proxy.corp:443": "unsupported proxy scheme 'https://'",
            f"http://bob:{SECRET}@proxy.corp:99999": "bad port",
            f"http://bob:{SECRET}@proxy.corp:0": "bad port",
            f"http://bob:{SECRET}@proxy.corp:port": "bad port",
            f"http://bob:{SECRET}@proxy.corp:3128/path": "without a path",
            f"http://bob:{SECRET}@proxy.corp:3128/?q=1": "without a path",
            f"http://bob:{SECRET}@:3128": "no valid host",
            "": "empty",
            "   ": "empty",
        }
        for url, needle in cases.items():
            with self.subTest(url=url):
                with self.assertRaises(ConfigurationError) as e:
                    ProxyConfig.parse(url)
                self.assertIn(needle, str(e.exception))
                self.assertNotIn(SECRET, str(e.exception))
                self.assertIsInstance(e.exception, ValueError)

    def test_password_with_url_delimiters_not_echoed(self) -> None:
        """A password holding '/', '#' or '?' breaks URL parsing; the error still hides all of it."""
        for url in ("http://bob:pa/ss@proxy:3128", "http://bob:pa#ss@proxy:3128", "http://bob:pa?ss@proxy:3128"):
            with self.subTest(url=url):
                with self.assertRaises(ConfigurationError) as e:
                    ProxyConfig.parse(url)
                self.assertNotIn("pa", str(e.exception).replace("path", ""))
                self.assertIn("bob:***@", str(e.exception))

    def test_source_named_in_errors(self) -> None:
        """The variable or parameter the URL came from starts the message."""
        with self.assertRaises(ConfigurationError) as e:
            ProxyConfig.parse("socks5://h:1080", "ALL_PROXY")
        self.assertTrue(str(e.exception).startswith("ALL_PROXY: "), str(e.exception))

    def test_repr_and_str_hide_password(self) -> None:
        """str() and repr() show the user and ***, never the password; without credentials just the address."""
        proxy = ProxyConfig.parse(f"http://bob:{SECRET}@proxy.corp:3128", "HTTPS_PROXY")
        self.assertEqual(str(proxy), "http://bob:***@proxy.corp:3128")
        self.assertEqual(repr(proxy), "ProxyConfig('http://bob:***@proxy.corp:3128', source='HTTPS_PROXY')")
        self.assertNotIn(SECRET, repr(proxy) + str(proxy) + proxy.describe() + f"{proxy}" + f"{[proxy]}")
        self.assertEqual(str(ProxyConfig.parse("proxy.corp:3128")), "http://proxy.corp:3128")
        self.assertEqual(str(ProxyConfig("::1", 8080)), "http://[::1]:8080")
        self.assertEqual(proxy.describe(), "http://proxy.corp:3128 (from HTTPS_PROXY)")

    def test_authorization(self) -> None:
        """Basic credentials are base64(user:password) in UTF-8; none without a user name."""
        self.assertIsNone(ProxyConfig("p", 1).authorization())
        self.assertEqual(ProxyConfig("p", 1, "bob", "pw").authorization(), b"Basic " + base64.b64encode(b"bob:pw"))
        self.assertEqual(
            ProxyConfig("p", 1, "j\u00f6", "").authorization(), b"Basic " + base64.b64encode(b"j\xc3\xb6:")
        )

    def test_frozen(self) -> None:
        """ProxyConfig is immutable and hashable."""
        proxy = ProxyConfig("p", 1)
        with self.assertRaises(AttributeError):
            proxy.port = 2  # type: ignore[misc]
        self.assertEqual(hash(proxy), hash(ProxyConfig("p", 1, source="X")))


# -- proxy_for ----------------------------------------------------------------------


class ProxyForTests(unittest.SynchronousTestCase):
    """L{proxy_for}: precedence of proxy=, the scheme's variable, ALL_PROXY, and NO_PROXY."""

    def choose(
        self,
        environ: dict[str, str],
        secure: bool = True,
        explicit: str | None = None,
        host: str = "relay.example.net",
        port: int = 443,
    ):
        """The proxy for C{host:port} as C{host:port} text, or None."""
        proxy = proxy_for(host, port, secure, explicit=explicit, environ=environ)
        return None if proxy is None else f"{proxy.host}:{proxy.port}"

    def test_precedence(self) -> None:
        """explicit > scheme variable (lower case before upper) > ALL_PROXY; empty counts as unset."""
        cases = [
            # (environ, secure, explicit, expected)
            ({}, True, None, None),
            ({"HTTPS_PROXY": "hs:1"}, True, None, "hs:1"),
            ({"https_proxy": "ls:1", "HTTPS_PROXY": "hs:1"}, True, None, "ls:1"),
            ({"https_proxy": "", "HTTPS_PROXY": "hs:1"}, True, None, "hs:1"),
            ({"HTTP_PROXY": "h:1"}, True, None, None),  # wss ignores HTTP_PROXY
            ({"HTTPS_PROXY": "hs:1"}, False, None, None),  # ws ignores HTTPS_PROXY
            ({"HTTP_PROXY": "h:1", "HTTPS_PROXY": "hs:1"}, False, None, "h:1"),
            ({"http_proxy": "lh:1", "HTTP_PROXY": "h:1"}, False, None, "lh:1"),
            ({"ALL_PROXY": "a:1"}, True, None, "a:1"),
            ({"all_proxy": "la:1", "ALL_PROXY": "a:1"}, False, None, "la:1"),
            ({"ALL_PROXY": "a:1", "HTTPS_PROXY": "hs:1"}, True, None, "hs:1"),
            ({"HTTPS_PROXY": "hs:1"}, True, "http://ex:2", "ex:2"),
            ({"HTTPS_PROXY": "hs:1", "ALL_PROXY": "a:1"}, True, "none", None),
            ({"HTTPS_PROXY": "hs:1"}, True, "DIRECT", None),
            ({"HTTPS_PROXY": "hs:1", "NO_PROXY": "*"}, True, "http://ex:2", "ex:2"),  # NO_PROXY: env only
            ({"HTTP_PROXY": "h:1", "REQUEST_METHOD": "GET"}, False, None, None),  # httpoxy: CGI
            ({"http_proxy": "lh:1", "REQUEST_METHOD": "GET"}, False, None, "lh:1"),
        ]
        for environ, secure, explicit, expected in cases:
            with self.subTest(environ=environ, secure=secure, explicit=explicit):
                self.assertEqual(self.choose(environ, secure, explicit), expected)

    def test_source_recorded(self) -> None:
        """The chosen proxy knows which variable (or proxy=) it came from."""
        self.assertEqual(proxy_for("h", 443, True, explicit=None, environ={"https_proxy": "p:1"}).source, "https_proxy")
        self.assertEqual(proxy_for("h", 443, True, explicit="p:1", environ={}).source, "proxy=")

    def test_default_environ(self) -> None:
        """Without environ=, os.environ is read."""
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
        self.addCleanup(os.environ.update, saved)
        os.environ["HTTPS_PROXY"] = "from-os:3128"
        self.addCleanup(os.environ.pop, "HTTPS_PROXY")
        self.assertEqual(proxy_for("relay", 443, True).host, "from-os")

    def test_no_proxy(self) -> None:
        """A table of NO_PROXY entries and relay hosts: which relays bypass the proxy."""
        # (NO_PROXY, relay host, relay port, bypassed?)
        cases = [
            ("*", "relay.example.net", 443, True),
            ("example.net", "relay.example.net", 443, True),
            (".example.net", "relay.example.net", 443, True),
            ("*.example.net", "relay.example.net", 443, True),
            ("example.net", "example.net", 443, True),
            (".example.net", "example.net", 443, True),
            ("example.net", "badexample.net", 443, False),
            ("example.net", "example.net.evil.com", 443, False),
            ("relay.example.net", "RELAY.Example.NET.", 443, True),
            ("other.org, example.net", "relay.example.net", 443, True),
            ("other.org,,  example.net ", "relay.example.net", 443, True),
            ("other.org example.net", "relay.example.net", 443, True),
            ("other.org", "relay.example.net", 443, False),
            ("", "relay.example.net", 443, False),
            ("relay.example.net:443", "relay.example.net", 443, True),
            ("relay.example.net:8443", "relay.example.net", 443, False),
            ("example.net:443", "relay.example.net", 443, True),
            ("localhost", "localhost", 8080, True),
            ("localhost", "127.0.0.1", 8080, False),  # no DNS: names never match IPs
            ("127.0.0.1", "127.0.0.1", 8080, True),
            ("127.0.0.1:8080", "127.0.0.1", 8080, True),
            ("127.0.0.1:8081", "127.0.0.1", 8080, False),
            ("127.0.0.2", "127.0.0.1", 8080, False),
            ("0.0.1", "127.0.0.1", 8080, False),  # no suffix matching on IPs
            ("127.0.0.0/8", "127.0.0.1", 8080, True),
            ("10.0.0.0/8", "10.200.3.4", 443, True),
            ("10.0.0.0/8", "11.0.0.1", 443, False),
            ("192.168.1.7/24", "192.168.1.200", 443, True),  # host bits ignored
            ("10.0.0.0/8", "relay.example.net", 443, False),
            ("::1", "::1", 443, True),
            ("0:0::1", "::1", 443, True),
            ("[::1]:443", "::1", 443, True),
            ("[::1]:80", "::1", 443, False),
            ("fd00::/8", "fd12::5", 443, True),
            ("fd00::/8", "10.0.0.1", 443, False),
            ("not-a-net/99", "10.0.0.1", 443, False),
        ]
        for no_proxy, host, port, bypassed in cases:
            with self.subTest(no_proxy=no_proxy, host=host, port=port):
                environ = {"HTTPS_PROXY": "proxy.corp:3128", "NO_PROXY": no_proxy}
                self.assertEqual(self.choose(environ, host=host, port=port) is None, bypassed)

    def test_loopback_not_implicitly_excluded(self) -> None:
        """As in curl, localhost and 127.0.0.1 use the proxy unless NO_PROXY lists them."""
        environ = {"HTTP_PROXY": "proxy.corp:3128"}
        self.assertEqual(self.choose(environ, False, host="127.0.0.1", port=8080), "proxy.corp:3128")
        self.assertEqual(self.choose(environ, False, host="localhost", port=8080), "proxy.corp:3128")

    def test_lower_case_no_proxy_wins(self) -> None:
        """no_proxy is read before NO_PROXY."""
        environ = {"HTTPS_PROXY": "p:1", "no_proxy": "other.org", "NO_PROXY": "*"}
        self.assertEqual(self.choose(environ), "p:1")

    def test_bad_environment_proxy(self) -> None:
        """An unusable proxy in the environment names the variable and the ways around it, without its password."""
        with self.assertRaises(ConfigurationError) as e:
            proxy_for("relay", 443, True, explicit=None, environ={"ALL_PROXY": f"socks5://u:{SECRET}@s:1080"})
        message = str(e.exception)
        self.assertIn("ALL_PROXY: unsupported proxy scheme 'socks5://'", message)
        self.assertIn("NO_PROXY", message)
        self.assertIn("proxy=none", message)
        self.assertNotIn(SECRET, message)

    def test_bad_environment_proxy_bypassed(self) -> None:
        """A relay covered by NO_PROXY does not even look at the proxy's URL."""
        environ = {"ALL_PROXY": "socks5://s:1080", "NO_PROXY": "relay"}
        self.assertIsNone(proxy_for("relay", 443, True, explicit=None, environ=environ))

    def test_bad_explicit_proxy(self) -> None:
        """A bad proxy= value is an error naming proxy=; an empty one too."""
        for value, needle in (("socks5://s:1080", "proxy=: unsupported"), ("", "proxy=: give http://HOST:PORT")):
            with self.subTest(value=value):
                with self.assertRaises(ConfigurationError) as e:
                    proxy_for("relay", 443, True, explicit=value, environ={})
                self.assertIn(needle, str(e.exception))


# -- ProxyTunnelEndpoint on a memory reactor ------------------------------------------


PROXY = ProxyConfig("proxy.example", 3128, source="HTTPS_PROXY")
AUTH_PROXY = ProxyConfig("proxy.example", 3128, "bob", SECRET, source="HTTPS_PROXY")


class RecordingResolver(SynchronousResolver):
    """Resolves every name to 127.0.0.1 (as the memory reactor's does) and records the names."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def resolveHostName(self, receiver, hostName, portNumber=0, *args, **kwargs):
        self.names.append(hostName)
        return super().resolveHostName(receiver, hostName, portNumber, *args, **kwargs)


class Attempt:
    """One connect() through a L{ProxyTunnelEndpoint} on a L{MemoryReactorClock}."""

    def __init__(
        self, proxy: ProxyConfig = PROXY, host: str = "relay.example.net", port: int = 443, factory=None
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.resolved: list[str] = []
        self.reactor.installNameResolver(RecordingResolver(self.resolved))
        self.factory = factory if factory is not None else RecordingFactory()
        self.endpoint = ProxyTunnelEndpoint(self.reactor, proxy, host, port)
        self.result = self.endpoint.connect(self.factory)
        self.transport: StringTransport | None = None

    def tcp(self):
        """The proxy's (host, port) and factory that the endpoint asked the reactor to connect to."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        return host, port, factory

    def connected(self) -> StringTransport:
        """Complete the TCP connection to the proxy with a string transport, as tcp.Client would."""
        _, _, factory = self.tcp()
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.9.9.9", 3128))
        self.transport = StringTransport()
        self.transport.protocol = protocol  # as Twisted's TCP transport has
        protocol.makeConnection(self.transport)
        return self.transport

    def receive(self, data: bytes) -> None:
        """Bytes from the proxy, delivered as the TCP transport would."""
        self.transport.protocol.dataReceived(data)


def _result(test: unittest.SynchronousTestCase, d: Deferred):
    return test.successResultOf(d)


class TunnelTests(unittest.SynchronousTestCase):
    """The CONNECT exchange, success and every failure, without sockets."""

    def test_interface(self) -> None:
        """ProxyTunnelEndpoint provides IStreamClientEndpoint."""
        self.assertTrue(verifyObject(IStreamClientEndpoint, ProxyTunnelEndpoint(MemoryReactorClock(), PROXY, "h", 1)))

    def test_connects_to_proxy(self) -> None:
        """TCP goes to the proxy's address, through the injected reactor; nothing yet to the caller's factory."""
        attempt = Attempt()
        host, port, _ = attempt.tcp()
        self.assertEqual(attempt.resolved, ["proxy.example"])
        self.assertEqual((host, port), ("127.0.0.1", 3128))
        self.assertNoResult(attempt.result)
        self.assertEqual(attempt.factory.addresses, [])

    def test_request_bytes(self) -> None:
        """Without credentials the request is exactly the CONNECT line and Host."""
        attempt = Attempt()
        transport = attempt.connected()
        self.assertEqual(
            transport.value(), b"CONNECT relay.example.net:443 HTTP/1.1\r\nHost: relay.example.net:443\r\n\r\n"
        )

    def test_request_bytes_with_basic_auth(self) -> None:
        """With credentials a Proxy-Authorization: Basic header follows Host."""
        attempt = Attempt(AUTH_PROXY)
        transport = attempt.connected()
        token = base64.b64encode(f"bob:{SECRET}".encode()).decode()
        self.assertEqual(
            transport.value(),
            (
                "CONNECT relay.example.net:443 HTTP/1.1\r\n"
                "Host: relay.example.net:443\r\n"
                f"Proxy-Authorization: Basic {token}\r\n"
                "\r\n"
            ).encode(),
        )

    def test_request_ipv6_and_idn(self) -> None:
        """IPv6 relays are bracketed; international names go out in IDNA form."""
        self.assertTrue(
            ProxyTunnelEndpoint(None, PROXY, "::1", 8443).request().startswith(b"CONNECT [::1]:8443 HTTP/1.1\r\n")
        )
        request = ProxyTunnelEndpoint(None, PROXY, "b\u00fccher.example", 443).request()
        self.assertTrue(request.startswith(b"CONNECT xn--bcher-kva.example:443 HTTP/1.1\r\n"), request)

    def test_success_hands_over(self) -> None:
        """On 200 the caller's protocol gets the same transport, the Deferred fires with it, later data goes to it."""
        attempt = Attempt()
        transport = attempt.connected()
        attempt.receive(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: test\r\n\r\n")
        protocol = _result(self, attempt.result)
        self.assertIsInstance(protocol, Recorder)
        self.assertIs(protocol.transport, transport)
        self.assertIs(transport.protocol, protocol)
        self.assertEqual(protocol.made, 1)
        self.assertEqual(protocol.data, [])
        self.assertEqual(attempt.factory.addresses, [HostnameAddress(b"relay.example.net", 443)])
        attempt.receive(b"later")
        self.assertEqual(protocol.data, [b"later"])
        transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(protocol.reason.value, ConnectionDone)
        self.assertFalse(transport.disconnecting or transport.disconnected)

    def test_trailing_bytes_delivered(self) -> None:
        """Bytes that arrive in the same read as the proxy's header block reach the caller's protocol."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(b"HTTP/1.0 200 OK\r\n\r\n\x16\x03\x01first bytes\r\n\r\n")
        protocol = _result(self, attempt.result)
        self.assertEqual(b"".join(protocol.data), b"\x16\x03\x01first bytes\r\n\r\n")

    def test_response_in_small_pieces(self) -> None:
        """A header block that arrives one byte at a time (bare LF line ends too) still opens the tunnel."""
        for response in (b"HTTP/1.1 200 Connection established\r\nA: b\r\n\r\nxy", b"HTTP/1.1 200 OK\nA: b\n\nxy"):
            with self.subTest(response=response):
                attempt = Attempt()
                attempt.connected()
                for i in range(len(response) - 3):
                    attempt.receive(response[i : i + 1])
                self.assertNoResult(attempt.result)
                attempt.receive(response[-3:])
                protocol = _result(self, attempt.result)
                self.assertEqual(b"".join(protocol.data), b"xy")

    def test_any_2xx_opens(self) -> None:
        """Any 2xx answer to CONNECT means tunnel mode (RFC 9110 9.3.6)."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIsInstance(_result(self, attempt.result), Recorder)

    def failure(self, attempt: Attempt) -> str:
        """The attempt's failure: a RelayUnreachableError; the connection to the proxy aborted."""
        failure = self.failureResultOf(attempt.result, RelayUnreachableError)
        if attempt.transport is not None:
            self.assertTrue(attempt.transport.disconnected, "the connection to the proxy was not aborted")
        self.assertEqual(attempt.factory.addresses, [])
        self.assertIsNone(failure.value.code)
        return str(failure.value)

    def test_407_without_credentials(self) -> None:
        """407 without credentials: the proxy requires authentication, and how to give it."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n\r\n<html>..."
        )
        self.assertEqual(
            self.failure(attempt),
            "the HTTP proxy http://proxy.example:3128 (from HTTPS_PROXY) requires authentication "
            "(407 Proxy Authentication Required): give credentials as "
            "proxy=http\\://USER\\:PASSWORD@proxy.example\\:3128 in the endpoint string or as "
            "http://USER:PASSWORD@proxy.example:3128 in HTTPS_PROXY (percent-encode @ and : in them)",
        )

    def test_407_with_credentials(self) -> None:
        """407 although credentials were sent: refused, naming the user but never the password."""
        attempt = Attempt(AUTH_PROXY)
        attempt.connected()
        attempt.receive(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        message = self.failure(attempt)
        self.assertIn("refused the credentials of user 'bob'", message)
        self.assertIn("407 Proxy Authentication Required", message)
        self.assertNotIn(SECRET, message)
        self.assertNotIn(base64.b64encode(f"bob:{SECRET}".encode()).decode(), message)

    def test_401_is_authentication_too(self) -> None:
        """tinyproxy answers wrong credentials with 401: that is an authentication failure as well."""
        attempt = Attempt(AUTH_PROXY)
        attempt.connected()
        attempt.receive(b"HTTP/1.0 401 Unauthorized\r\n\r\n")
        self.assertIn("refused the credentials of user 'bob' (401 Unauthorized)", self.failure(attempt))

    def test_502(self) -> None:
        """Another status: the proxy's code and reason phrase, the proxy's address and the target."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(
            self.failure(attempt),
            "the HTTP proxy http://proxy.example:3128 (from HTTPS_PROXY) refused to open a tunnel to "
            "relay.example.net:443: 502 Bad Gateway (the proxy could not reach the relay)",
        )

    def test_403(self) -> None:
        """403 hints at the proxy's rules (e.g. ports allowed for CONNECT); odd bytes in the reason are masked."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(b"HTTP/1.1 403 Access\x1b[31m violation\r\n\r\n")
        message = self.failure(attempt)
        self.assertIn(
            "403 Access?[31m violation (its rules may not allow CONNECT to this host or to port 443)", message
        )

    def test_malformed_status(self) -> None:
        """A reply that is not HTTP/1.x fails, quoting (a bounded part of) its first line."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(b"SSH-2.0-OpenSSH_9.2" + b"x" * 500 + b"\r\n\r\n")
        message = self.failure(attempt)
        self.assertIn("gave a malformed answer to CONNECT: 'SSH-2.0-OpenSSH_9.2xxx", message)
        self.assertLess(len(message), 300)

    def test_oversized_header_block(self) -> None:
        """A header block that does not end within 16 KiB is refused and the connection aborted."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Filler: " + b"a" * 100 + b"\r\n"
        for _ in range(MAX_RESPONSE_HEADER // len(line) + 1):
            if attempt.result.called:
                break
            attempt.receive(line)
        self.assertIn("larger than 16384 bytes", self.failure(attempt))

    def test_header_block_just_within_limit(self) -> None:
        """A header block of exactly 16 KiB (with its blank line) is accepted."""
        attempt = Attempt()
        attempt.connected()
        head = b"HTTP/1.1 200 OK\r\nX: "
        tail = b"\r\n\r\n"
        attempt.receive(head + b"a" * (MAX_RESPONSE_HEADER - len(head) - len(tail)) + tail + b"after")
        self.assertEqual(b"".join(_result(self, attempt.result).data), b"after")

    def test_closed_before_answer(self) -> None:
        """The proxy hangs up before answering: a message saying so."""
        attempt = Attempt()
        attempt.connected()
        attempt.receive(b"HTTP/1.1 200")
        attempt.transport.protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(attempt.result, RelayUnreachableError)
        self.assertIn("closed the connection before answering CONNECT relay.example.net:443", str(failure.value))

    def test_proxy_unreachable(self) -> None:
        """TCP to the proxy fails: the message names the proxy, so users do not blame the relay."""
        attempt = Attempt()
        _, _, factory = attempt.tcp()
        factory.clientConnectionFailed(attempt.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        attempt.reactor.advance(1)  # HostnameEndpoint: no more addresses to try
        message = self.failure(attempt)
        self.assertTrue(
            message.startswith("could not connect to the HTTP proxy http://proxy.example:3128 (from HTTPS_PROXY): "),
            message,
        )
        self.assertIn("Connection was refused", message)
        self.assertIn("the proxy, not the relay, is unreachable", message)

    def test_cancel_while_connecting(self) -> None:
        """Cancelling before TCP is up stops the connection attempt: ConnectingCancelledError."""
        attempt = Attempt()
        attempt.result.cancel()
        failure = self.failureResultOf(attempt.result, ConnectingCancelledError)
        self.assertEqual(failure.value.address, HostnameAddress(b"relay.example.net", 443))
        self.assertTrue(attempt.reactor.connectors[-1].stoppedConnecting)

    def test_cancel_while_waiting_for_answer(self) -> None:
        """
        Cancelling after CONNECT was sent aborts the TCP connection and fails
        with ConnectingCancelledError; a late answer is ignored.
        """
        attempt = Attempt()
        transport = attempt.connected()
        attempt.receive(b"HTTP/1.1 200 Conn")
        attempt.result.cancel()
        self.failureResultOf(attempt.result, ConnectingCancelledError)
        self.assertTrue(transport.disconnected)
        attempt.receive(b"ection established\r\n\r\n")
        transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(attempt.factory.addresses, [])

    def test_refusal_detaches_the_request(self) -> None:
        """
        After the proxy refuses, the request reports nothing more: a late
        answer or loss on the aborted connection cannot fire the result twice.
        """
        attempt = Attempt()
        transport = attempt.connected()
        attempt.receive(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        self.failureResultOf(attempt.result, RelayUnreachableError)
        self.assertTrue(transport.disconnected)
        attempt.receive(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(attempt.factory.addresses, [])

    def test_connect_never_raises(self) -> None:
        """An impossible target fails the Deferred instead of raising."""
        for host, port in (("bad host", 443), ("", 443), ("h\r\nX: y", 443), ("h", 0), ("h", 70000)):
            with self.subTest(host=host, port=port):
                d = ProxyTunnelEndpoint(MemoryReactorClock(), PROXY, host, port).connect(RecordingFactory())
                self.failureResultOf(d, ValueError)

    def test_factory_failure(self) -> None:
        """A factory that raises (or builds None) fails the Deferred and aborts the tunnel."""

        class Broken(Factory):
            def buildProtocol(self, addr):
                raise RuntimeError("no protocol today")

        class Nothing(Factory):
            def buildProtocol(self, addr):
                return None

        for factory, error in ((Broken(), RuntimeError), (Nothing(), ValueError)):
            with self.subTest(factory=factory):
                attempt = Attempt(factory=factory)
                transport = attempt.connected()
                attempt.receive(b"HTTP/1.1 200 OK\r\n\r\n")
                self.failureResultOf(attempt.result, error)
                self.assertTrue(transport.disconnected)

    def test_transport_without_protocol_attribute(self) -> None:
        """With a transport that has no .protocol the tunnel request forwards data and the end."""
        attempt = Attempt()
        _, _, factory = attempt.tcp()
        wrapper = factory.buildProtocol(IPv4Address("TCP", "10.9.9.9", 3128))
        transport = StringTransport()
        wrapper.makeConnection(transport)
        wrapper.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nab")
        protocol = _result(self, attempt.result)
        wrapper.dataReceived(b"cd")
        wrapper.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(b"".join(protocol.data), b"abcd")
        self.assertIsInstance(protocol.reason.value, ConnectionDone)


class TinyProxyHelperTests(unittest.SynchronousTestCase):
    """tests.httpproxy: a missing tinyproxy fails in CI and is skipped elsewhere, saying how to install it."""

    def setUp(self) -> None:
        from . import httpproxy

        self.httpproxy = httpproxy
        self.patch(httpproxy.shutil, "which", lambda name: None)
        self.patch(httpproxy.os, "access", lambda path, mode: False)

    def test_missing_in_ci_fails(self) -> None:
        """With CI set, the test fails with the apt-get hint."""
        self.patch(self.httpproxy.os, "environ", {"CI": "true"})
        with self.assertRaises(self.failureException) as e:
            self.httpproxy.tinyproxy_path(self)
        self.assertIn("apt-get install tinyproxy", str(e.exception))

    def test_missing_elsewhere_skips(self) -> None:
        """Without CI, the test is skipped with the apt-get hint."""
        self.patch(self.httpproxy.os, "environ", {})
        with self.assertRaises(unittest.SkipTest) as e:
            self.httpproxy.tinyproxy_path(self)
        self.assertIn("apt-get install tinyproxy", str(e.exception))

    def test_config(self) -> None:
        """The generated configuration: loopback only, CONNECT ports, Basic auth, log and pid file in the directory."""
        from pathlib import Path

        text = self.httpproxy.config_text(Path("/tmp/x"), 8888, [443, 8443], ("u", "p"))
        self.assertEqual(
            text.splitlines(),
            [
                "Port 8888",
                "Listen 127.0.0.1",
                "Timeout 60",
                "MaxClients 20",
                "Allow 127.0.0.1",
                'LogFile "/tmp/x/tinyproxy.log"',
                "LogLevel Info",
                'PidFile "/tmp/x/tinyproxy.pid"',
                "ConnectPort 443",
                "ConnectPort 8443",
                "BasicAuth u p",
            ],
        )


# -- through a real tinyproxy -------------------------------------------------------------


class Echo(Protocol):
    """Sends back what it receives; tracked so tests can wait for its end."""

    def connectionMade(self) -> None:
        self.factory.live.append(self)
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.ended.callback(None)


def _within(d: Deferred, seconds: float = 10.0) -> Deferred:
    return d.addTimeout(seconds, reactor)


class TinyProxyTests(unittest.TestCase):
    """ProxyTunnelEndpoint against a real tinyproxy on 127.0.0.1."""

    def echo_server(self, tls=None) -> int:
        """
        An echo server on 127.0.0.1 (TLS with C{tls} options); its port.
        Stopped, and its connections awaited, at cleanup.
        """
        factory = Factory.forProtocol(Echo)
        factory.live = []
        if tls is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, factory, tls, interface="127.0.0.1")

        @inlineCallbacks
        def stop():
            yield port.stopListening()
            for echo in factory.live:
                if not echo.ended.called:
                    echo.transport.abortConnection()
                yield _within(echo.ended)

        self.addCleanup(stop)
        return port.getHost().port

    @inlineCallbacks
    def round_trip(self, endpoint) -> Any:
        """Connect a Collector through C{endpoint}, echo some bytes, close, await the end."""
        factory = Factory.forProtocol(Collector)
        client = yield _within(endpoint.connect(factory))
        done: Deferred[None] = Deferred()
        payload = os.urandom(100_000)
        client.dataArrived = lambda _: (
            done.callback(None) if len(client.data) >= len(payload) and not done.called else None
        )
        client.transport.write(payload)
        yield _within(done)
        self.assertEqual(client.data, payload)
        client.transport.loseConnection()
        yield _within(client.lost)
        return client

    @inlineCallbacks
    def test_echo_through_tinyproxy(self) -> Any:
        """Bytes round-trip through tinyproxy's tunnel, and tinyproxy's log shows our CONNECT."""
        port = self.echo_server()
        proxy = yield TinyProxy.start(self, connect_ports=[port])
        config = ProxyConfig.parse(f"http://127.0.0.1:{proxy.port}")
        yield self.round_trip(ProxyTunnelEndpoint(reactor, config, "127.0.0.1", port))
        self.assertIn(f"CONNECT 127.0.0.1:{port} HTTP/1.1", proxy.log())

    @inlineCallbacks
    def test_basic_auth(self) -> Any:
        """With BasicAuth: no credentials → authentication error, wrong ones → refused, right ones → tunnel."""
        port = self.echo_server()
        proxy = yield TinyProxy.start(self, connect_ports=[port], basic_auth=("alice", SECRET))
        address = f"127.0.0.1:{proxy.port}"
        none = ProxyTunnelEndpoint(reactor, ProxyConfig.parse(f"http://{address}", "HTTPS_PROXY"), "127.0.0.1", port)
        error = yield self.assertFailure(_within(none.connect(Factory.forProtocol(Collector))), RelayUnreachableError)
        self.assertIn(f"the HTTP proxy http://{address} (from HTTPS_PROXY) requires authentication (407", str(error))
        self.assertIn(f"proxy=http\\://USER\\:PASSWORD@{address.replace(':', chr(92) + ':')}", str(error))
        wrong = ProxyTunnelEndpoint(reactor, ProxyConfig.parse(f"http://alice:nope@{address}"), "127.0.0.1", port)
        error = yield self.assertFailure(_within(wrong.connect(Factory.forProtocol(Collector))), RelayUnreachableError)
        self.assertIn("refused the credentials of user 'alice'", str(error))
        self.assertNotIn("nope", str(error))
        right = ProxyTunnelEndpoint(reactor, ProxyConfig.parse(f"http://alice:{SECRET}@{address}"), "127.0.0.1", port)
        yield self.round_trip(right)
        self.assertIn(f"CONNECT 127.0.0.1:{port} HTTP/1.1", proxy.log())

    @inlineCallbacks
    def test_port_not_allowed(self) -> Any:
        """tinyproxy refuses CONNECT to a port not in its ConnectPort list: its 403 and our hint."""
        port = self.echo_server()
        proxy = yield TinyProxy.start(self, connect_ports=[port + 1 if port < 65535 else port - 1])
        endpoint = ProxyTunnelEndpoint(reactor, ProxyConfig("127.0.0.1", proxy.port), "127.0.0.1", port)
        connecting = _within(endpoint.connect(Factory.forProtocol(Collector)))
        error = yield self.assertFailure(connecting, RelayUnreachableError)
        self.assertIn(f"refused to open a tunnel to 127.0.0.1:{port}: 403", str(error))
        self.assertIn("may not allow CONNECT", str(error))

    @inlineCallbacks
    def test_proxy_not_listening(self) -> Any:
        """No proxy at the address: the error names the proxy, not the relay."""
        probe = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        free = probe.getHost().port
        yield probe.stopListening()
        endpoint = ProxyTunnelEndpoint(reactor, ProxyConfig("127.0.0.1", free, source="proxy="), "127.0.0.1", 9)
        connecting = _within(endpoint.connect(Factory.forProtocol(Collector)))
        error = yield self.assertFailure(connecting, RelayUnreachableError)
        self.assertIn(f"could not connect to the HTTP proxy http://127.0.0.1:{free} (from proxy=)", str(error))

    @inlineCallbacks
    def test_tls_inside_tunnel(self) -> Any:
        """wrapClientTLS around the tunnel: TLS (verified) runs end to end; the proxy sees only CONNECT host:port."""
        from .httpproxy import self_signed

        server_options, trust = self_signed("127.0.0.1")
        port = self.echo_server(tls=server_options)
        proxy = yield TinyProxy.start(self, connect_ports=[port])
        from twisted.internet.ssl import optionsForClientTLS

        tunnel = ProxyTunnelEndpoint(reactor, ProxyConfig("127.0.0.1", proxy.port), "127.0.0.1", port)
        yield self.round_trip(wrapClientTLS(optionsForClientTLS("127.0.0.1", trustRoot=trust), tunnel))
        self.assertIn(f"CONNECT 127.0.0.1:{port} HTTP/1.1", proxy.log())

    @inlineCallbacks
    def test_relay_through_tinyproxy(self) -> Any:
        """A pluresync relay reached through tinyproxy answers a listen hello with ready; the CONNECT is in the log."""
        from pluresync.pipes.websocket import RelaySocketFactory, RelayURL
        from pluresync.relay.core.wire import Ready, encode_listen

        relay = LocalRelay(self)
        relay_port = relay.port.getHost().port
        proxy = yield TinyProxy.start(self, connect_ports=[relay_port])
        lost: Deferred[Failure] = Deferred()
        factory = RelaySocketFactory(
            reactor,
            RelayURL.parse(relay.url),
            encode_listen("ab" * 32, "0a" * 32),
            ping_interval=0,
            ping_timeout=0,
            on_lost=lambda failure: lost.callback(failure.value),
        )
        endpoint = ProxyTunnelEndpoint(reactor, ProxyConfig("127.0.0.1", proxy.port), "127.0.0.1", relay_port)
        yield _within(endpoint.connect(factory))
        protocol, answer = yield _within(factory.answer)
        self.assertIsInstance(answer, Ready)
        self.assertIn(f"CONNECT 127.0.0.1:{relay_port} HTTP/1.1", proxy.log())
        self.assertIn(encode_listen("ab" * 32, "0a" * 32), relay.tapped)
        protocol.sendClose(1000)
        yield _within(lost)
