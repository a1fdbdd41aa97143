"""
C{pluresync doctor} (L{pluresync.doctor}): every check against real servers
on 127.0.0.1 (an in-process relay, a TLS relay with a test CA, tinyproxy, a
plain web server, a silent server, a refused port), the exit code, the
report's rows and fixes, and that no secret is ever printed.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from twisted.web.static import File
from zope.interface import directlyProvides, providedBy

from pluresync.doctor import DoctorOptions, doctor_command
from pluresync.doctor import report as report_module
from pluresync.doctor.report import FAIL, OK, WARN, Row, Section
from pluresync.doctor.tlsinfo import inspection_product, summary
from pluresync.keys import SyncKey

from .httpproxy import TinyProxy
from .localrelay import LocalRelay
from .test_tls import TLSRelay, _TrackingFactory
from .testca import TestCA, TestPKI

_ENVIRONMENT = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "PLURESYNC_KEY",
    "PLURESYNC_RELAY",
    "PLURESYNC_RELAY_FALLBACK",
    "REQUEST_METHOD",
)


def _esc(text) -> str:
    return str(text).replace("\\", "\\\\").replace(":", "\\:")


def _refused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Silent(Protocol):
    """Accepts a connection and never says a word."""


class _FakeResolver:
    """A name resolver that knows a few names (and no others), for DNS without the network."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.names.get(hostName, []):
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return None


class _ResolvingReactor:
    """The real reactor with another name resolver."""

    def __init__(self, resolver: _FakeResolver) -> None:
        self.nameResolver = resolver
        directlyProvides(self, *providedBy(reactor))

    def __getattr__(self, name):
        return getattr(reactor, name)


class DoctorTestCase(TestCase):
    """Runs the doctor with a clean environment and captures its report."""

    timeout = 60

    def setUp(self) -> None:
        environ = {k: v for k, v in os.environ.items() if k.lower() not in _ENVIRONMENT and k not in _ENVIRONMENT}
        self.patch(os, "environ", environ)
        self.key = SyncKey.generate()
        self.pki = TestPKI.shared()

    async def doctor(self, *argv: str, reactor_=None, out=None) -> tuple[int, str]:
        """Run C{pluresync doctor ARGV}; the exit code and the report."""
        options = DoctorOptions()
        options.parseOptions(list(argv))
        options.out = out or io.StringIO()
        code = await doctor_command(reactor_ or reactor, options)
        text = options.out.getvalue()
        # Whatever happened, the sync key's text is never printed.
        self.assertNotIn(self.key.to_text(), text)
        self.assertNotIn(self.key.to_text()[5:25], text)
        return code, text

    def row(self, text: str, check: str, section: str | None = None) -> str:
        """The table line of C{check} (in C{section}, if given)."""
        if section is not None:
            text = text.split(section + "  ", 1)[1].split("\n\n", 1)[0]
        for line in text.splitlines():
            if line.startswith(f"  {check} ") and not line.startswith("  fix"):
                return line
        self.fail(f"no {check!r} row in:\n{text}")

    def verdict(self, text: str, check: str, section: str | None = None) -> str:
        return self.row(text, check, section)[2:].split()[len(check.split()) :][0]

    def relay_endpoint(self, url: str, **params) -> str:
        extra = "".join(f":{k}={_esc(v)}" for k, v in params.items())
        return f"relay:url={_esc(url)}:key={self.key.to_text()}{extra}"

    def tracked_server(self, factory) -> int:
        """Listen on 127.0.0.1 with C{factory}; cleanup waits until every connection is gone."""
        tracking = _TrackingFactory(factory)
        port = reactor.listenTCP(0, tracking, interface="127.0.0.1")

        async def stop() -> None:
            await port.stopListening()
            for protocol in list(tracking.open):
                protocol.transport.loseConnection()
            await DeferredList([protocol.lost for protocol in list(tracking.open)])

        self.addCleanup(stop)
        return port.getHost().port


class LocalRelayTests(DoctorTestCase):
    """Against an in-process relay."""

    async def test_all_ok(self) -> None:
        """
        Every check passes against a working relay: exit 0, a round trip
        line with its latency, /health's fields, no fix lines.
        """
        relay = LocalRelay(self)
        code, text = await self.doctor(self.relay_endpoint(relay.url))
        self.assertEqual(code, 0, text)
        for check in ("dns", "tcp", "websocket", "health", "round trip"):
            self.assertEqual(self.verdict(text, check), OK, text)
        self.assertEqual(self.verdict(text, "tls"), "skipped")
        self.assertRegex(self.row(text, "round trip"), r"message round trip [0-9.]+ ms")
        self.assertIn("status=ok version=", self.row(text, "health"))
        self.assertIn("(direct, no proxy)", self.row(text, "tcp"))
        self.assertNotIn("fix (", text)
        self.assertIn("overall: ok: 1 of 1 transport works end to end (relay:127.0.0.1)", text)

    async def test_round_trip_never_uses_the_key(self) -> None:
        """
        The round trip pairs under a fresh random key: the relay never sees
        the rendezvous id of the user's key.
        """
        relay = LocalRelay(self)
        code, text = await self.doctor(self.relay_endpoint(relay.url))
        self.assertEqual(code, 0, text)
        self.assertNotIn(self.key.topic().rendezvous_id.hex().encode(), relay.tapped)

    async def test_refused_port(self) -> None:
        """A relay URL whose port refuses: TCP FAIL with the fix, the rest skipped, exit 1."""
        port = _refused_port()
        code, text = await self.doctor(self.relay_endpoint(f"ws://127.0.0.1:{port}"))
        self.assertEqual(code, 1, text)
        self.assertEqual(self.verdict(text, "tcp"), FAIL)
        self.assertIn("connection refused", self.row(text, "tcp"))
        for check in ("websocket", "health", "round trip"):
            self.assertEqual(self.verdict(text, check), "skipped")
        self.assertIn(f"fix (tcp): TCP to port {port} refused: a firewall blocks it, or nothing listens there", text)
        self.assertIn("set HTTP_PROXY=http://PROXY:PORT", text)
        self.assertIn("overall: FAIL: none of 1 transport works end to end", text)

    async def test_auto_one_good_one_dead(self) -> None:
        """An auto: with a good and a dead relay: exit 0, one section works, the other has its FAIL."""
        relay = LocalRelay(self)
        dead = f"ws://127.0.0.1:{_refused_port()}"
        code, text = await self.doctor(
            f"auto:azure={_esc(relay.url)}:vercel={_esc(dead)}:key={self.key.to_text()}", "--timeout", "5"
        )
        self.assertEqual(code, 0, text)
        self.assertIn(f"relay:azure  {relay.url}/  [works]", text)
        self.assertIn(f"relay:vercel  {dead}/  [does not work]", text)
        self.assertEqual(self.verdict(text, "round trip", "relay:azure"), OK)
        self.assertEqual(self.verdict(text, "tcp", "relay:vercel"), FAIL)
        self.assertEqual(text.count(" FAIL "), 1, text)
        self.assertIn("overall: ok: 1 of 2 transports works end to end (relay:azure)", text)

    async def test_default_auto_from_the_environment(self) -> None:
        """
        No argument: the default auto:, its relays from PLURESYNC_RELAY and
        PLURESYNC_RELAY_FALLBACK and its key from PLURESYNC_KEY.
        """
        relay = LocalRelay(self)
        os.environ["PLURESYNC_RELAY"] = relay.url
        os.environ["PLURESYNC_RELAY_FALLBACK"] = relay.url
        os.environ["PLURESYNC_KEY"] = self.key.to_text()
        code, text = await self.doctor()
        self.assertEqual(code, 0, text)
        self.assertIn("from auto: (the default)", text)
        self.assertIn("overall: ok: 2 of 2 transports work end to end (relay:azure, relay:vercel)", text)
        self.assertNotIn("warning:", text)

    async def test_no_key_is_a_warning(self) -> None:
        """
        Without any sync key the network is still checked (under a throwaway
        key), and the report warns that programs will need one.
        """
        relay = LocalRelay(self)
        code, text = await self.doctor(f"relay:url={_esc(relay.url)}")
        self.assertEqual(code, 0, text)
        self.assertIn("warning: sync key: no sync key: pass keyfile=PATH or set PLURESYNC_KEY", text)

    async def test_config_file(self) -> None:
        """--config checks the relays of a seed config file; its key is never printed."""
        relay = LocalRelay(self)
        dead = f"ws://127.0.0.1:{_refused_port()}"
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"syncRelay": dead, "syncRelayFallback": relay.url, "syncKey": self.key.to_text()}, f)
        code, text = await self.doctor("--config", path, "--timeout", "5")
        self.assertEqual(code, 0, text)
        self.assertIn(f"auto: with the config file {path}", text)
        self.assertEqual(self.verdict(text, "tcp", "relay:azure"), FAIL)
        self.assertEqual(self.verdict(text, "round trip", "relay:vercel"), OK)

    async def test_configuration_error(self) -> None:
        """A bad endpoint string: one line naming the problem, exit 1, and not the string (it may hold a key)."""
        code, text = await self.doctor(f"relay:bogus=1:key={self.key.to_text()}")
        self.assertEqual(code, 1)
        self.assertIn("configuration error: relay endpoint: unknown parameter(s) bogus", text)
        self.assertIn("overall: FAIL", text)

    async def test_dns(self) -> None:
        """A host name goes through the reactor's resolver; its addresses are shown, and TCP uses them."""
        relay = LocalRelay(self)
        resolver = _FakeResolver({"relay.doctor.test": ["127.0.0.1"]})
        url = relay.url.replace("127.0.0.1", "relay.doctor.test")
        code, text = await self.doctor(self.relay_endpoint(url), reactor_=_ResolvingReactor(resolver))
        self.assertEqual(code, 0, text)
        self.assertIn("relay.doctor.test -> 127.0.0.1", self.row(text, "dns"))
        self.assertIn("relay.doctor.test", resolver.asked)

    async def test_dns_failure(self) -> None:
        """A name that does not resolve: DNS FAIL with its fix, everything after it skipped, exit 1."""
        resolver = _FakeResolver({})
        code, text = await self.doctor(
            self.relay_endpoint("wss://nowhere.doctor.test"), reactor_=_ResolvingReactor(resolver)
        )
        self.assertEqual(code, 1, text)
        self.assertEqual(self.verdict(text, "dns"), FAIL)
        self.assertIn("nowhere.doctor.test: no addresses found", text)
        self.assertIn("fix (dns): DNS failed: check the relay URL's host name, or your resolver", text)
        for check in ("tcp", "tls", "websocket", "health", "round trip"):
            self.assertEqual(self.verdict(text, check), "skipped")


class NotARelayTests(DoctorTestCase):
    """Servers that are not pluresync relays."""

    async def test_static_web_server(self) -> None:
        """A plain web server (static files): the upgrade FAILs as 'not a pluresync relay', /health 404s."""
        root = FilePath(self.mktemp())
        root.makedirs()
        root.child("index.html").setContent(b"<h1>just a web site</h1>")
        port = self.tracked_server(Site(File(root.path)))
        code, text = await self.doctor(self.relay_endpoint(f"ws://127.0.0.1:{port}"))
        self.assertEqual(code, 1, text)
        self.assertEqual(self.verdict(text, "tcp"), OK)
        self.assertEqual(self.verdict(text, "websocket"), FAIL)
        self.assertIn(
            "not a pluresync relay: HTTP 200 OK instead of the WebSocket upgrade", self.row(text, "websocket")
        )
        self.assertIn("fix (websocket): not a pluresync relay: check the relay URL", text)
        self.assertEqual(self.verdict(text, "health"), FAIL)
        self.assertIn("fix (health): /health not found: not a pluresync relay", text)
        self.assertEqual(self.verdict(text, "round trip"), "skipped")

    async def test_silent_server(self) -> None:
        """A server that accepts TCP but never answers: the upgrade and /health time out, bounded by --timeout."""
        port = self.tracked_server(Factory.forProtocol(_Silent))
        started = reactor.seconds()
        code, text = await self.doctor(self.relay_endpoint(f"ws://127.0.0.1:{port}"), "--timeout", "0.3")
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(code, 1, text)
        self.assertEqual(self.verdict(text, "tcp"), OK)
        self.assertIn("no answer to the upgrade within 0.3 s", self.row(text, "websocket"))
        self.assertIn("no answer within 0.3 s", self.row(text, "health"))


class TLSTests(DoctorTestCase):
    """wss:// relays with certificates from a test CA."""

    async def test_untrusted_ca(self) -> None:
        """Without ca=, the test CA is unknown: TLS FAIL, the certificate shown, the fix names ca=."""
        relay = TLSRelay(self, self.pki.localhost)
        code, text = await self.doctor(
            self.relay_endpoint(f"wss://localhost:{relay.port_number}"),
            reactor_=_ResolvingReactor(_FakeResolver({"localhost": ["127.0.0.1"]})),
        )
        self.assertEqual(code, 1, text)
        self.assertEqual(self.verdict(text, "tls"), FAIL)
        row = self.row(text, "tls")
        self.assertIn("not signed by a trusted CA", row)
        self.assertIn("issuer CN=pluresync test CA", row)
        self.assertIn("fix (tls): pass ca=PATH with the relay's CA", text)
        for check in ("websocket", "health", "round trip"):
            self.assertEqual(self.verdict(text, check), "skipped")

    async def test_with_ca(self) -> None:
        """With ca= naming the test CA, every check passes over TLS, and the certificate is described."""
        relay = TLSRelay(self, self.pki.localhost)
        code, text = await self.doctor(
            self.relay_endpoint(f"wss://127.0.0.1:{relay.port_number}", ca=self.pki.ca.ca_path)
        )
        self.assertEqual(code, 0, text)
        row = self.row(text, "tls")
        self.assertEqual(self.verdict(text, "tls"), OK, text)
        self.assertIn("verified against the CA(s) in ca=: subject CN=localhost; issuer CN=pluresync test CA", row)
        self.assertRegex(row, r"expires \d{4}-\d\d-\d\d \(in \d+ days\)")
        self.assertIn(f"GET https://127.0.0.1:{relay.port_number}/health: 200", self.row(text, "health"))
        self.assertEqual(self.verdict(text, "round trip"), OK)

    async def test_inspection_product(self) -> None:
        """A certificate whose issuer names an inspection product is flagged as TLS inspection."""
        ca = TestCA(self.mktemp(), "Zscaler Intermediate Root CA")
        relay = TLSRelay(self, ca.issue(dns=["localhost"], ips=["127.0.0.1"]))
        code, text = await self.doctor(self.relay_endpoint(f"wss://127.0.0.1:{relay.port_number}"))
        self.assertEqual(code, 1, text)
        self.assertIn("TLS inspection by Zscaler", self.row(text, "tls"))
        self.assertIn("fix (tls): TLS inspection: pass ca=PATH with your company's CA", text)

    async def test_expired(self) -> None:
        """An expired certificate: TLS FAIL saying so, the fix about the clock and renewal."""
        relay = TLSRelay(self, self.pki.expired)
        code, text = await self.doctor(
            self.relay_endpoint(f"wss://127.0.0.1:{relay.port_number}", ca=self.pki.ca.ca_path)
        )
        self.assertEqual(code, 1, text)
        self.assertIn("expired on", self.row(text, "tls"))
        self.assertIn("fix (tls): check this machine's clock", text)

    async def test_plain_relay_as_wss(self) -> None:
        """wss:// to a plain ws:// relay port: TLS FAIL, the fix says to use ws://."""
        relay = TLSRelay(self, None)
        code, text = await self.doctor(self.relay_endpoint(f"wss://127.0.0.1:{relay.port_number}"), "--timeout", "0.5")
        self.assertEqual(code, 1, text)
        self.assertEqual(self.verdict(text, "tls"), FAIL)
        self.assertIn("did not finish a TLS handshake within 0.5 s", self.row(text, "tls"))
        self.assertIn("fix (tls): is it a plain ws:// relay (then use ws:// in the relay URL)?", text)


class ProxyTests(DoctorTestCase):
    """Through tinyproxy."""

    async def test_explicit_proxy(self) -> None:
        """proxy=: the TCP row names the proxy and where it came from; CONNECT and all else ok."""
        relay = LocalRelay(self)
        relay_port = relay.port.getHost().port
        proxy = await TinyProxy.start(self, connect_ports=[relay_port])
        code, text = await self.doctor(self.relay_endpoint(relay.url, proxy=f"http://127.0.0.1:{proxy.port}"))
        self.assertEqual(code, 0, text)
        self.assertIn(f"to the proxy http://127.0.0.1:{proxy.port} (from proxy=): connected", self.row(text, "tcp"))
        self.assertIn(
            f"CONNECT 127.0.0.1:{relay_port} through http://127.0.0.1:{proxy.port}: tunnel open",
            self.row(text, "proxy"),
        )
        self.assertEqual(self.verdict(text, "round trip"), OK)
        self.assertIn(f"CONNECT 127.0.0.1:{relay_port} HTTP/1.1", proxy.log())

    async def test_environment_proxy_with_password(self) -> None:
        """HTTP_PROXY with credentials: the row says so, and the password is never printed."""
        relay = LocalRelay(self)
        relay_port = relay.port.getHost().port
        secret = "s3cr3t-doctor-pw"
        proxy = await TinyProxy.start(self, connect_ports=[relay_port], basic_auth=("alice", secret))
        os.environ["HTTP_PROXY"] = f"http://alice:{secret}@127.0.0.1:{proxy.port}"
        code, text = await self.doctor(self.relay_endpoint(relay.url))
        self.assertEqual(code, 0, text)
        self.assertIn(f"to the proxy http://127.0.0.1:{proxy.port} (from HTTP_PROXY)", self.row(text, "tcp"))
        self.assertNotIn(secret, text)

    async def test_wss_through_proxy(self) -> None:
        """wss:// through the proxy: TLS runs inside the CONNECT tunnel and is verified with ca=."""
        relay = TLSRelay(self, self.pki.localhost)
        proxy = await TinyProxy.start(self, connect_ports=[relay.port_number])
        os.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{proxy.port}"
        code, text = await self.doctor(
            self.relay_endpoint(f"wss://127.0.0.1:{relay.port_number}", ca=self.pki.ca.ca_path)
        )
        self.assertEqual(code, 0, text)
        self.assertIn("(from HTTPS_PROXY)", self.row(text, "tcp"))
        self.assertEqual(self.verdict(text, "tls"), OK)
        self.assertIn(f"CONNECT 127.0.0.1:{relay.port_number} HTTP/1.1", proxy.log())

    async def test_proxy_refuses_port(self) -> None:
        """A proxy whose rules refuse CONNECT to the relay's port: the proxy row FAILs with the fix."""
        relay = LocalRelay(self)
        proxy = await TinyProxy.start(self, connect_ports=[443])
        code, text = await self.doctor(self.relay_endpoint(relay.url, proxy=f"http://127.0.0.1:{proxy.port}"))
        self.assertEqual(code, 1, text)
        self.assertEqual(self.verdict(text, "tcp"), OK)
        self.assertEqual(self.verdict(text, "proxy"), FAIL)
        self.assertIn("refused to open a tunnel", self.row(text, "proxy"))
        self.assertIn("fix (proxy): the proxy does not allow CONNECT to port", text)

    async def test_proxy_unreachable(self) -> None:
        """A proxy address that refuses: TCP FAIL naming the proxy; the fix says where it came from."""
        relay = LocalRelay(self)
        port = _refused_port()
        os.environ["http_proxy"] = f"127.0.0.1:{port}"
        code, text = await self.doctor(self.relay_endpoint(relay.url))
        self.assertEqual(code, 1, text)
        self.assertIn(
            f"to the proxy http://127.0.0.1:{port} (from http_proxy): connection refused", self.row(text, "tcp")
        )
        self.assertIn("fix (tcp): the proxy is unreachable: check its address (it comes from http_proxy)", text)


class OptionsTests(SynchronousTestCase):
    """DoctorOptions."""

    def test_defaults(self) -> None:
        """No arguments: the default auto:, 10 s per check."""
        options = DoctorOptions()
        options.parseOptions([])
        self.assertIsNone(options["endpoint"])
        self.assertIsNone(options["config"])
        self.assertEqual(options["timeout"], 10.0)

    def test_arguments(self) -> None:
        """An ENDPOINT, --config and --timeout."""
        options = DoctorOptions()
        options.parseOptions(["auto:relays=vercel", "--config", "c.json", "--timeout", "2.5"])
        self.assertEqual(
            (options["endpoint"], options["config"], options["timeout"]), ("auto:relays=vercel", "c.json", 2.5)
        )

    def test_bad(self) -> None:
        """A timeout that is no positive number, or two endpoints, are usage errors."""
        for argv in (["--timeout", "0"], ["--timeout", "soon"], ["relay:azure", "auto:"]):
            self.assertRaises(usage.UsageError, DoctorOptions().parseOptions, argv)


def _certificate(issuer_cn: str, issuer_o: str | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = [x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]
    if issuer_o:
        issuer.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, issuer_o))
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.net")]))
        .issuer_name(x509.Name(issuer))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=40, hours=1))
        .sign(key, hashes.SHA256())
    )


class ReportTests(SynchronousTestCase):
    """The report's text and the certificate hints, without any network."""

    def test_inspection_products(self) -> None:
        """Known inspection products are recognised in the issuer's O or CN; public CAs are not."""
        self.assertEqual(inspection_product([_certificate("ZscalerRootCertificate-2048-SHA256")]), "Zscaler")
        self.assertEqual(inspection_product([_certificate("caas", "Netskope Inc")]), "Netskope")
        self.assertEqual(inspection_product([_certificate("Cisco Umbrella Secondary SubCA")]), "Cisco Umbrella")
        self.assertIsNone(inspection_product([_certificate("R11", "Let's Encrypt")]))

    def test_summary(self) -> None:
        """The certificate line: subject, issuer (CN and O), expiry."""
        text = summary(_certificate("R11", "Let's Encrypt"))
        self.assertIn("subject CN=relay.example.net; issuer CN=R11, O=Let's Encrypt; expires ", text)
        self.assertIn("(in 40 days)", text)

    def test_table_and_colours(self) -> None:
        """Aligned columns; colours only when asked (a terminal); fixes under the table."""
        section = Section("relay:x", "ws://x:80/")
        section.rows += [
            Row("dns", OK, 0.0123, "x -> 10.0.0.1"),
            Row("round trip", FAIL, 1.5, "pairing: no answer", "try again"),
        ]
        text, code = report_module.format_report("header", [section])
        self.assertEqual(code, 1)
        lines = text.splitlines()
        self.assertIn("  dns         ok       12.3 ms  x -> 10.0.0.1", lines)
        self.assertIn("  round trip  FAIL     1500 ms  pairing: no answer", lines)
        self.assertIn("  fix (round trip): try again", lines)
        self.assertNotIn("\x1b[", text)
        coloured, _ = report_module.format_report("header", [section], colour=True)
        self.assertIn("\x1b[31;1mFAIL", coloured)

    def test_warn_does_not_fail(self) -> None:
        """A warning row does not make a transport fail; only the round trip decides."""
        section = Section("relay:x", "ws://x:80/")
        section.rows += [Row("health", WARN, 0.1, "404", "harmless"), Row("round trip", OK, 0.1, "ok")]
        self.assertEqual(report_module.overall([section])[1], 0)


class TerminalTests(DoctorTestCase):
    """The report on a terminal."""

    async def test_tty_colours(self) -> None:
        """When the output is a terminal, verdicts are coloured."""

        class TTY(io.StringIO):
            def isatty(self) -> bool:
                return True

        relay = LocalRelay(self)
        code, text = await self.doctor(self.relay_endpoint(relay.url), out=TTY())
        self.assertEqual(code, 0)
        self.assertIn("\x1b[32mok", text)
