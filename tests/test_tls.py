"""
C{wss://}: relay endpoints over TLS to a relay on 127.0.0.1 whose certificate
comes from a test CA (L{tests.testca}), and the one-line explanations of TLS
failures (L{pluresync.dial.tlserrors}).

Each failing connection's real reason (what C{RelaySocketProtocol.connectionLost}
receives, and the TLS connection it happened on) is captured and explained
with L{describe_tls_failure}, so these tests pass whether or not
C{pipes/websocket.py} already uses it; once it does (L{WIRED}), the error the user
gets must carry the same explanation.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from OpenSSL import SSL
from service_identity.exceptions import DNSMismatch, VerificationError
from service_identity.hazmat import DNS_ID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pluresync.dial import tlserrors
from pluresync.dial.tlserrors import describe_tls_failure
from pluresync.errors import ConfigurationError, RelayUnreachableError
from pluresync.keys import SyncKey
from pluresync.pipes import websocket as relaysocket
from pluresync.pipes.websocket import RelaySocketProtocol
from pluresync.relay.server.site import build_site

from .localrelay import Collector, Listening
from .testca import ServerCert, TestPKI

#: Does pipes/websocket.py explain TLS failures with describe_tls_failure yet?
#: (The lead wires it in; until then the user-facing message is Autobahn's.)
WIRED = getattr(relaysocket, "describe_tls_failure", None) is describe_tls_failure

UNTRUSTED = (
    "the relay's TLS certificate for localhost is not signed by a trusted CA "
    "(a TLS-inspecting proxy, or a private relay: pass ca=PATH with its CA bundle)"
)


def _esc(text) -> str:
    return str(text).replace("\\", "\\\\").replace(":", "\\:")


class _BadRequest(Protocol):
    """A plain HTTP server's answer to whatever it is sent: 400, and close."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()


class _Tracked(ProtocolWrapper):
    def makeConnection(self, transport) -> None:
        self.lost: Deferred = Deferred()
        self.factory.open.add(self)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        arrived = self.factory.arrived
        if not arrived.called:
            arrived.callback(None)
        super().dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)
        self.lost.callback(None)


class _TrackingFactory(WrappingFactory):
    """Keeps every server-side connection until it is gone, TLS handshake or not."""

    protocol = _Tracked
    noisy = False

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self.open: set[_Tracked] = set()
        #: fires when the first bytes from any client arrive
        self.arrived: Deferred = Deferred()


class TLSRelay:
    """
    A relay on an ephemeral loopback port, over TLS with C{cert}'s
    certificate (or plain WebSocket if C{cert} is None). Every TCP connection
    is tracked (outside TLS: Autobahn wants the TLS transport itself), and
    the cleanup waits until each is closed, so tests end with a clean
    reactor without sleeping.
    """

    def __init__(self, test: TestCase, cert: ServerCert | None, clock=None) -> None:
        self.site, self.factory = build_site(clock or reactor)
        factory = self.site
        if cert is not None:
            pem = cert.key_path.read_text("ascii") + cert.cert_path.read_text("ascii")
            options = PrivateCertificate.loadPEM(pem).options()
            factory = TLSMemoryBIOFactory(options, False, self.site)
        self.tracking = _TrackingFactory(factory)
        self.port = reactor.listenTCP(0, self.tracking, interface="127.0.0.1")
        test.addCleanup(self.stop)

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    async def stop(self) -> None:
        await self.factory.close_all()
        await self.port.stopListening()
        # Connections that never became relay WebSockets (failed handshakes)
        # end by themselves once the client hung up; wait for each.
        await DeferredList([protocol.lost for protocol in list(self.tracking.open)])


class _Capture:
    """
    Records what C{RelaySocketProtocol.connectionLost} receives: the reason,
    and the TLS connection (C{OpenSSL.SSL.Connection}) it happened on, taken
    before Twisted drops it.
    """

    def __init__(self, test: TestCase) -> None:
        self.lost: list[tuple[Failure, object]] = []
        original = RelaySocketProtocol.connectionLost
        capture = self

        def connectionLost(protocol, reason):
            try:
                connection = protocol.transport.getHandle()
            except AttributeError:  # a TCP transport has let go of its socket by now
                connection = None
            capture.lost.append((reason, connection))
            return original(protocol, reason)

        test.patch(RelaySocketProtocol, "connectionLost", connectionLost)

    def describe(self, host: str, port: int) -> str | None:
        reason, connection = self.lost[-1]
        return describe_tls_failure(reason, host, port, transport=connection)


class WSSEndToEndTests(TestCase):
    """relay: endpoints through a relay serving wss:// with a private CA's certificate."""

    timeout = 30

    def setUp(self):
        self.pki = TestPKI.shared()
        self.keyfile = self.mktemp()
        SyncKey.generate().write(self.keyfile)

    def relay(self, cert: ServerCert | None, clock=None) -> TLSRelay:
        return TLSRelay(self, cert, clock)

    def endpoint(self, relay: TLSRelay, host: str = "localhost", scheme: str = "wss", **params) -> str:
        url = _esc(f"{scheme}://{host}:{relay.port_number}/")
        extra = "".join(f":{k}={_esc(v)}" for k, v in params.items())
        return f"relay:url={url}:keyfile={_esc(self.keyfile)}:timeout=10{extra}"

    async def listen(self, description: str) -> Listening:
        listening = Listening()
        port = await serverFromString(reactor, description).listen(listening.factory)
        self.addCleanup(port.stopListening)
        return listening

    async def connect(self, description: str) -> Collector:
        protocol = await clientFromString(reactor, description).connect(Factory.forProtocol(Collector))
        self.addCleanup(protocol.transport.abortConnection)
        return protocol

    async def exchange(self, description: str) -> None:
        """A listener and a client through C{description}'s relay, bytes both ways, clean close."""
        listening = await self.listen(description)
        accepted = listening.next()
        client = await self.connect(description)
        server = await accepted
        got = Deferred()
        server.dataArrived = lambda _: len(server.data) >= 13 and not got.called and got.callback(None)
        client.transport.write(b"hello through")
        await got
        self.assertEqual(server.data, b"hello through")
        server.transport.write(b"TLS works")
        server.transport.loseConnection()
        await client.lost
        client.reason.trap(ConnectionDone)
        self.assertEqual(client.data, b"TLS works")
        await server.lost

    async def refused(self, description: str) -> RelayUnreachableError:
        """Connect through C{description}, which must fail before reaching the relay's WebSocket."""
        with self.assertRaises(RelayUnreachableError) as caught:
            await self.connect(description)
        return caught.exception

    async def test_ca_file(self):
        """
        A relay served as its users serve it, on a Twisted ssl: endpoint
        string; with ca= naming its CA, a listener and a client exchange
        bytes over wss://.
        """
        site, factory = build_site(reactor)
        port = await serverFromString(reactor, self.pki.localhost.ssl_endpoint()).listen(site)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.close_all)
        url = _esc(f"wss://localhost:{port.getHost().port}/")
        await self.exchange(f"relay:url={url}:keyfile={_esc(self.keyfile)}:ca={_esc(self.pki.ca.ca_path)}")

    async def test_ca_bundle(self):
        """A ca= bundle holding the relay's CA after an unrelated one is trusted just the same."""
        relay = self.relay(self.pki.localhost)
        await self.exchange(self.endpoint(relay, ca=self.pki.bundle_path))

    async def test_by_ip_address(self):
        """A certificate naming IP:127.0.0.1 is valid for wss://127.0.0.1 (no SNI is sent for an address)."""
        relay = self.relay(self.pki.localhost)
        await self.exchange(self.endpoint(relay, host="127.0.0.1", ca=self.pki.ca.ca_path))

    async def test_system_trust_store_refuses_private_ca(self):
        """
        Without ca=, the system's trust store does not know the test CA:
        RelayUnreachableError, explained as an untrusted CA.
        """
        relay = self.relay(self.pki.localhost)
        capture = _Capture(self)
        error = await self.refused(self.endpoint(relay))
        self.assertIsInstance(capture.lost[-1][0].value, SSL.Error)
        self.assertEqual(capture.describe("localhost", relay.port_number), UNTRUSTED)
        if WIRED:
            self.assertEqual(str(error), UNTRUSTED)

    async def test_other_ca(self):
        """ca= naming an unrelated CA fails exactly like an unknown CA."""
        relay = self.relay(self.pki.localhost)
        capture = _Capture(self)
        error = await self.refused(self.endpoint(relay, ca=self.pki.other_ca.ca_path))
        self.assertEqual(capture.describe("localhost", relay.port_number), UNTRUSTED)
        if WIRED:
            self.assertEqual(str(error), UNTRUSTED)

    async def test_listener_refused_too(self):
        """A listener's registration fails the same way as a client's connect()."""
        relay = self.relay(self.pki.localhost)
        capture = _Capture(self)
        with self.assertRaises(RelayUnreachableError) as caught:
            await self.listen(self.endpoint(relay, ca=self.pki.other_ca.ca_path))
        self.assertEqual(capture.describe("localhost", relay.port_number), UNTRUSTED)
        if WIRED:
            self.assertEqual(str(caught.exception), UNTRUSTED)

    async def test_hostname_mismatch(self):
        """
        A certificate from the trusted CA but for otherhost only, reached as
        localhost: service_identity's VerificationError, explained with the
        names the certificate holds.
        """
        relay = self.relay(self.pki.otherhost)
        capture = _Capture(self)
        error = await self.refused(self.endpoint(relay, ca=self.pki.ca.ca_path))
        self.assertIsInstance(capture.lost[-1][0].value, VerificationError)
        expected = "the relay's TLS certificate is not valid for localhost (it names otherhost)"
        self.assertEqual(capture.describe("localhost", relay.port_number), expected)
        if WIRED:
            self.assertEqual(str(error), expected)

    async def test_ip_address_mismatch(self):
        """Reached as 127.0.0.1, a certificate that names only otherhost is refused too."""
        relay = self.relay(self.pki.otherhost)
        capture = _Capture(self)
        error = await self.refused(self.endpoint(relay, host="127.0.0.1", ca=self.pki.ca.ca_path))
        expected = "the relay's TLS certificate is not valid for 127.0.0.1 (it names otherhost)"
        self.assertEqual(capture.describe("127.0.0.1", relay.port_number), expected)
        if WIRED:
            self.assertEqual(str(error), expected)

    async def test_expired(self):
        """An expired certificate from the trusted CA is refused, and the message says it expired."""
        relay = self.relay(self.pki.expired)
        capture = _Capture(self)
        error = await self.refused(self.endpoint(relay, ca=self.pki.ca.ca_path))
        text = capture.describe("localhost", relay.port_number)
        self.assertIn("the relay's TLS certificate for localhost expired on ", text)
        if WIRED:
            self.assertEqual(str(error), text)

    async def test_plain_relay(self):
        """
        wss:// to a relay serving plain ws://. The relay reads the
        ClientHello as the start of an HTTP request line and waits for its
        CRLF (a ClientHello seldom holds one) until its open_timeout (10 s
        by default; a fake clock here) closes the connection; the client
        sees ConnectionLost before any cipher was negotiated. (With a CRLF
        inside, the relay answers 400 at once: 'wrong version number'.)
        """
        clock = Clock()
        relay = self.relay(None, clock)
        capture = _Capture(self)
        connecting = Deferred.fromCoroutine(self.refused(self.endpoint(relay)))
        await relay.tracking.arrived
        clock.advance(relay.factory.limits.open_timeout)
        error = await connecting
        self.assertTrue(capture.lost[-1][0].check(ConnectionLost, SSL.Error), capture.lost[-1][0])
        expected = (
            f"localhost:{relay.port_number} did not answer TLS: is the relay serving plain ws:// "
            "(use ws://) or behind a TLS terminator?"
        )
        self.assertEqual(capture.describe("localhost", relay.port_number), expected)
        if WIRED:
            self.assertEqual(str(error), expected)

    async def test_plain_http_server(self):
        """
        wss:// to a server that answers in plain HTTP at once (a web server's
        400): OpenSSL's 'wrong version number', explained the same way.
        """
        tracking = _TrackingFactory(Factory.forProtocol(_BadRequest))
        port = reactor.listenTCP(0, tracking, interface="127.0.0.1")
        self.addCleanup(lambda: DeferredList([p.lost for p in list(tracking.open)]))
        self.addCleanup(port.stopListening)
        capture = _Capture(self)
        number = port.getHost().port
        url = _esc(f"wss://localhost:{number}/")
        error = await self.refused(f"relay:url={url}:keyfile={_esc(self.keyfile)}:timeout=10")
        self.assertIsInstance(capture.lost[-1][0].value, SSL.Error)
        self.assertIn("wrong version number", str(capture.lost[-1][0].value))
        expected = (
            f"localhost:{number} did not answer TLS: is the relay serving plain ws:// (use ws://) "
            "or behind a TLS terminator?"
        )
        self.assertEqual(capture.describe("localhost", number), expected)
        if WIRED:
            self.assertEqual(str(error), expected)

    async def test_ws_to_tls_relay(self):
        """ws:// to a TLS relay is no TLS failure of ours: the error is the usual unreachable one."""
        relay = self.relay(self.pki.localhost)
        capture = _Capture(self)
        error = await self.refused(self.endpoint(relay, scheme="ws"))
        self.assertIsNone(capture.describe("localhost", relay.port_number))
        self.assertIn("could not open a WebSocket to the relay at localhost", str(error))

    def test_wiring(self):
        """pipes/websocket.py explains TLS failures with describe_tls_failure."""
        self.assertTrue(WIRED)

    if not WIRED:
        test_wiring.skip = "pipes/websocket.py does not call describe_tls_failure yet"


class NoSwitchOffTests(SynchronousTestCase):
    """There is no parameter that turns certificate verification off."""

    def test_refused(self):
        """verify=, insecure=, tls= (and friends) are unknown parameters, for clients and listeners."""
        for name in ("verify", "insecure", "tls", "verify_ssl", "no_verify"):
            for parse in (clientFromString, serverFromString):
                with self.assertRaises(ConfigurationError) as caught:
                    parse(reactor, f"relay:url=wss\\://localhost\\:1/:key=x:{name}=0")
                self.assertIn(f"unknown parameter(s) {name};", str(caught.exception))


def _handshake(cert: ServerCert, ca_paths=(), hostname: bytes = b"localhost"):
    """
    A TLS handshake in memory between a pyOpenSSL client that verifies
    against C{ca_paths} and a server with C{cert}.

    @return: the client's C{SSL.Connection} and the C{SSL.Error} it raised (or None).
    """
    server_context = SSL.Context(SSL.TLS_METHOD)
    server_context.use_certificate_chain_file(str(cert.cert_path))
    server_context.use_privatekey_file(str(cert.key_path))
    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.set_verify(SSL.VERIFY_PEER)
    for path in ca_paths:
        client_context.load_verify_locations(str(path))
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(hostname)
    done = set()
    for _ in range(10):
        for me, peer in ((client, server), (server, client)):
            try:
                me.do_handshake()
                done.add(me)
            except SSL.WantReadError:
                pass
            except SSL.Error as error:
                if me is client:
                    return client, error
                raise
            try:
                peer.bio_write(me.bio_read(65536))
            except SSL.WantReadError:
                pass
        if len(done) == 2:
            return client, None
    raise AssertionError("the in-memory handshake did not finish")


class DescribeTests(SynchronousTestCase):
    """describe_tls_failure on constructed exceptions and on in-memory TLS connections."""

    def setUp(self):
        self.pki = TestPKI.shared()

    def test_not_tls_failures(self):
        """Failures that are not about TLS are not explained: None."""
        for error in (
            ConnectionRefusedError(),
            DNSLookupError("localhost"),
            ConnectionDone(),
            ConnectionLost(),
            ValueError("x"),
            SSL.SysCallError(-1, "Unexpected EOF"),
        ):
            self.assertIsNone(describe_tls_failure(error, "localhost", 443), error)

    def test_failure_or_exception(self):
        """A Failure is explained like the exception it carries."""
        error = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("localhost"))])
        self.assertEqual(
            describe_tls_failure(Failure(error), "localhost"),
            describe_tls_failure(error, "localhost"),
        )

    def test_hostname_mismatch_without_connection(self):
        """Without the TLS connection, a mismatch is reported without the certificate's names."""
        error = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("relay.example"))])
        self.assertEqual(
            describe_tls_failure(error, "relay.example"), "the relay's TLS certificate is not valid for relay.example"
        )

    def test_verify_failed_without_connection(self):
        """A bare 'certificate verify failed' cannot tell an untrusted CA from an expiry; it says both."""
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        text = describe_tls_failure(error, "relay.example", 443)
        self.assertEqual(
            text,
            "the relay's TLS certificate for relay.example failed verification (not signed by a trusted CA, "
            "or expired; for a private relay pass ca=PATH with its CA bundle)",
        )

    def test_not_tls(self):
        """OpenSSL's 'wrong version number' (plain text came back) means the server did not answer TLS."""
        error = SSL.Error([("SSL routines", "", "wrong version number")])
        self.assertEqual(
            describe_tls_failure(error, "relay.example", 8443),
            "relay.example:8443 did not answer TLS: is the relay serving plain ws:// (use ws://) "
            "or behind a TLS terminator?",
        )
        self.assertTrue(describe_tls_failure(error, "::1", 443).startswith("[::1]:443 did not answer TLS"))

    def test_other_handshake_failure(self):
        """Other TLS errors are reported with OpenSSL's words."""
        error = SSL.Error([("SSL routines", "", "tlsv1 alert protocol version")])
        self.assertEqual(
            describe_tls_failure(error, "relay.example", 443),
            "the TLS handshake with relay.example:443 failed: tlsv1 alert protocol version",
        )

    def test_lost_with_plain_transport(self):
        """ConnectionLost on a transport that is not TLS (ws://) is not explained."""

        class TCP:
            def getHandle(self):
                return object()

        self.assertIsNone(describe_tls_failure(ConnectionLost(), "localhost", 80, transport=TCP()))

    def test_untrusted(self):
        """A real verification failure against no CA: untrusted, with the advice about ca=."""
        connection, error = _handshake(self.pki.localhost)
        self.assertIsNotNone(error)
        self.assertEqual(describe_tls_failure(error, "localhost", transport=connection), UNTRUSTED)

    def test_other_ca(self):
        """The same against an unrelated CA."""
        connection, error = _handshake(self.pki.localhost, [self.pki.other_ca.ca_path])
        self.assertEqual(describe_tls_failure(error, "localhost", transport=connection), UNTRUSTED)

    def test_expired(self):
        """An expired certificate is called expired, with its date."""
        connection, error = _handshake(self.pki.expired, [self.pki.ca.ca_path])
        end = self.pki.expired.certificate.not_valid_after_utc
        self.assertEqual(
            describe_tls_failure(error, "localhost", transport=connection),
            f"the relay's TLS certificate for localhost expired on {end:%Y-%m-%d %H:%M} UTC "
            "(or this machine's clock is wrong)",
        )

    def test_not_yet_valid(self):
        """A certificate valid only from tomorrow is called not valid yet."""
        now = datetime.datetime.now(datetime.UTC)
        cert = self.pki.ca.issue(
            not_before=now + datetime.timedelta(days=1), not_after=now + datetime.timedelta(days=9)
        )
        connection, error = _handshake(cert, [self.pki.ca.ca_path])
        text = describe_tls_failure(error, "localhost", transport=connection)
        self.assertTrue(text.startswith("the relay's TLS certificate for localhost is not valid yet until "), text)

    def test_without_openssl_verify_code(self):
        """
        If OpenSSL's verification code cannot be read (pyOpenSSL has no public
        accessor), the certificate the server sent still tells expiry apart.
        """
        self.patch(tlserrors, "_verify_code", lambda connection: None)
        connection, error = _handshake(self.pki.expired, [self.pki.ca.ca_path])
        self.assertIn("expired on", describe_tls_failure(error, "localhost", transport=connection))
        connection, error = _handshake(self.pki.localhost)
        self.assertEqual(describe_tls_failure(error, "localhost", transport=connection), UNTRUSTED)

    def test_mismatch_names(self):
        """A mismatch names what the certificate holds: DNS names, then IP addresses; long lists are cut."""
        cert = self.pki.ca.issue(
            dns=["a.example", "b.example", "c.example", "d.example", "e.example"], ips=["10.0.0.1"]
        )
        connection, error = _handshake(cert, [self.pki.ca.ca_path])
        self.assertIsNone(error)
        mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("localhost"))])
        self.assertEqual(
            describe_tls_failure(mismatch, "localhost", transport=connection),
            "the relay's TLS certificate is not valid for localhost "
            "(it names a.example, b.example, c.example, d.example and 2 more)",
        )
        connection, _ = _handshake(self.pki.localhost, [self.pki.ca.ca_path])
        self.assertEqual(
            describe_tls_failure(mismatch, "relay.example", transport=connection),
            "the relay's TLS certificate is not valid for relay.example (it names localhost, 127.0.0.1)",
        )


class TestCATests(SynchronousTestCase):
    """The test CA makes what the TLS tests rely on."""

    def test_certificates(self):
        """Server certificates carry the SANs asked for, are signed by their CA and not by the other."""
        pki = TestPKI.shared()
        leaf = pki.localhost.certificate
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        leaf.verify_directly_issued_by(pki.ca.certificate)
        with self.assertRaises((ValueError, InvalidSignature)):
            leaf.verify_directly_issued_by(pki.other_ca.certificate)
        self.assertEqual(pki.bundle_path.read_bytes(), pki.other_ca.pem + pki.ca.pem)
        self.assertEqual(pki.localhost.key_path.stat().st_mode & 0o777, 0o600)
