"""
Relay authentication: the authenticators (pure), the relay's --auth options,
the 401 on the upgrade, the client's token parameters and errors, the token
minting command, and that a token never reaches a log.
"""

from __future__ import annotations

import io
import json
import os
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pluresync.endpoints.parsers import RELAY_PARAMETERS, relay_config, relay_token
from pluresync.errors import ConfigurationError, RelayAuthError, RelayUnreachableError
from pluresync.keys import SyncKey
from pluresync.relay.core import auth
from pluresync.relay.core.auth import (
    BAD_SIGNATURE,
    EXPIRED,
    MALFORMED,
    MISSING,
    UNKNOWN_TOKEN,
    AuthConfigError,
    Authenticator,
    AuthResult,
    OpenAuth,
    SignedTokenAuth,
    TokenFileAuth,
    hash_token,
    mint_token,
)
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.authconfig import is_loopback_endpoint
from pluresync.relay.server.service import Options, makeService
from pluresync.relay.server.tokencli import RelayTokenOptions, parse_duration, relay_token_command

from .localrelay import Collector, LocalRelay

SECRET = b"0123456789abcdef0123456789abcdef-relay-secret"
OTHER_SECRET = b"another-secret-another-secret-another-secret"
NOW = 1_700_000_000.0


def bearer(token: str) -> str:
    return f"Bearer {token}"


class ObservedLog:
    """Every log event published while a test runs (twisted.logger, Autobahn's included)."""

    def __init__(self, test) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def assertNever(self, test, secret: str) -> None:
        for event in self.events:
            test.assertNotIn(secret, formatEvent(event))
            test.assertNotIn(secret, repr(event))


class OpenAuthTests(SynchronousTestCase):
    def test_everyone(self):
        """OpenAuth allows any request, header or not, with no tenant."""
        self.assertIsInstance(OpenAuth(), Authenticator)
        self.assertEqual(OpenAuth().check(None, NOW), AuthResult(True, None, None))
        self.assertTrue(OpenAuth().check("Bearer whatever", NOW).ok)


class SignedTokenTests(SynchronousTestCase):
    def setUp(self):
        self.auth = SignedTokenAuth(SECRET)
        self.token = mint_token(SECRET, "acme", 3600, NOW)

    def test_format(self):
        """psrt1.<base64url JSON payload>.<base64url 32-byte HMAC>, the payload as documented."""
        prefix, payload, signature = self.token.split(".")
        self.assertEqual(prefix, "psrt1")
        decoded = json.loads(auth._b64decode(payload))
        self.assertEqual(decoded, {"exp": int(NOW + 3600), "t": "acme", "v": 1})
        self.assertEqual(len(auth._b64decode(signature)), 32)
        self.assertNotIn("=", self.token)

    def test_good(self):
        """A fresh token is accepted and names its tenant; the scheme is case-insensitive."""
        self.assertEqual(self.auth.check(bearer(self.token), NOW), AuthResult.allow("acme"))
        self.assertTrue(self.auth.check(f"bearer  {self.token} ", NOW + 10).ok)

    def test_expired_with_skew(self):
        """Accepted until exp + skew (60 s), refused with expired after."""
        self.assertTrue(self.auth.check(bearer(self.token), NOW + 3600 + 59).ok)
        self.assertEqual(self.auth.check(bearer(self.token), NOW + 3600 + 61), AuthResult.refuse(EXPIRED))
        self.assertTrue(SignedTokenAuth(SECRET, skew=0).check(bearer(self.token), NOW + 3600).ok)
        self.assertFalse(SignedTokenAuth(SECRET, skew=0).check(bearer(self.token), NOW + 3601).ok)

    def test_wrong_secret(self):
        """A token signed with another secret is bad-signature."""
        other = mint_token(OTHER_SECRET, "acme", 3600, NOW)
        self.assertEqual(self.auth.check(bearer(other), NOW), AuthResult.refuse(BAD_SIGNATURE))

    def test_tampered(self):
        """Changing the payload (another tenant, a later expiry) or the signature breaks it."""
        prefix, payload, signature = self.token.split(".")
        forged_payload = auth._b64encode(json.dumps({"exp": int(NOW + 10**9), "t": "root", "v": 1}).encode())
        for forged in (
            f"{prefix}.{forged_payload}.{signature}",
            f"{prefix}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}",
            f"{prefix}.{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{signature}",
        ):
            self.assertFalse(self.auth.check(bearer(forged), NOW).ok, forged)

    def test_malformed(self):
        """Missing header, other schemes, wrong shapes: missing / malformed (never bad-signature)."""
        self.assertEqual(self.auth.check(None, NOW).reason, MISSING)
        self.assertEqual(self.auth.check("  ", NOW).reason, MISSING)
        for header in (
            "Basic dXNlcjpwYXNz",
            "Bearer",
            "Bearer a b",
            "Bearer tok\r\nX: y",
            "Bearer " + "x" * 5000,
            "Bearer psrt1.abc",
            "Bearer psrt2.e30.AAAA",
            "Bearer psrt1.e30.c2ln",  # signature of the wrong length
            "Bearer psrt1.e3@.AAAA",
            bearer(self.token.replace("psrt1", "PSRT1")),
        ):
            self.assertEqual(self.auth.check(header, NOW).reason, MALFORMED, header)

    def test_signed_bad_payloads(self):
        """A correctly signed but invalid payload (v, tenant, exp types) is malformed."""
        for payload in (
            {"exp": NOW + 60, "t": "acme", "v": 2},
            {"exp": NOW + 60, "t": "acme", "v": True},
            {"exp": NOW + 60, "t": "bad name", "v": 1},
            {"exp": "soon", "t": "acme", "v": 1},
            {"t": "acme", "v": 1},
            [1, 2],
        ):
            signed = "psrt1." + auth._b64encode(json.dumps(payload).encode())
            token = f"{signed}.{auth._b64encode(auth._signature(SECRET, signed))}"
            self.assertEqual(self.auth.check(bearer(token), NOW).reason, MALFORMED, payload)

    def test_rotation(self):
        """With several secrets every one verifies; from_file signs with the first line."""
        both = SignedTokenAuth([OTHER_SECRET, SECRET])
        self.assertTrue(both.check(bearer(self.token), NOW).ok)
        self.assertTrue(both.check(bearer(mint_token(OTHER_SECRET, "b", 60, NOW)), NOW).ok)

    def test_constant_time_compare_used(self):
        """The signature is compared with hmac.compare_digest (through auth._compare), per secret."""
        calls = []

        def spy(a, b):
            calls.append((len(a), len(b)))
            return auth.hmac.compare_digest(a, b)

        self.patch(auth, "_compare", spy)
        self.assertTrue(SignedTokenAuth([OTHER_SECRET, SECRET]).check(bearer(self.token), NOW).ok)
        self.assertEqual(calls, [(32, 32), (32, 32)])

    def test_mint_refuses(self):
        """mint_token refuses a bad tenant, a lifetime <= 0 and a short secret."""
        self.assertRaises(ValueError, mint_token, SECRET, "no spaces", 60, NOW)
        self.assertRaises(ValueError, mint_token, SECRET, "acme", 0, NOW)
        self.assertRaises(ValueError, mint_token, b"short", "acme", 60, NOW)
        self.assertRaises(AuthConfigError, SignedTokenAuth, b"short")

    def test_results_never_carry_the_token(self):
        """No result, reason or repr contains the token."""
        for header in (bearer(self.token), bearer(self.token + "x"), bearer(mint_token(OTHER_SECRET, "a", 1, NOW))):
            result = self.auth.check(header, NOW)
            self.assertNotIn(self.token.split(".")[2], repr(result))
        self.assertNotIn(SECRET.decode(), repr(self.auth))

    def test_secret_file(self):
        """from_file reads one secret per line (comments skipped), re-reads on change, refuses short ones."""
        path = Path(self.mktemp())
        path.write_bytes(b"# relay secrets, newest first\n" + SECRET + b"\n")
        signed = SignedTokenAuth.from_file(str(path), check_interval=0)
        self.assertTrue(signed.check(bearer(self.token), NOW).ok)
        path.write_bytes(OTHER_SECRET + b"\n")
        os.utime(path, ns=(10**18, 10**18))
        self.assertEqual(signed.check(bearer(self.token), NOW).reason, BAD_SIGNATURE)
        path.write_bytes(b"too short\n")
        self.assertRaises(AuthConfigError, SignedTokenAuth.from_file, str(path))
        path.write_bytes(b"\n# nothing\n")
        self.assertRaises(AuthConfigError, SignedTokenAuth.from_file, str(path))
        self.assertRaises(AuthConfigError, SignedTokenAuth.from_file, str(path) + ".missing")


class TokenFileTests(SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        self.token = auth.new_random_token()
        self.write(f"# allowed tokens\n\n{hash_token(self.token)} alice\n{hash_token('other-token')} bob\n")
        self.reports: list[str] = []
        self.auth = TokenFileAuth(str(self.path), check_interval=5, report=self.reports.append)

    def write(self, text: str, stamp: int = 0) -> None:
        self.path.write_text(text)
        if stamp:
            os.utime(self.path, ns=(stamp, stamp))

    def test_random_tokens(self):
        """new_random_token: 43 base64url characters (256 bits), different each time."""
        self.assertEqual(len(self.token), 43)
        self.assertNotEqual(self.token, auth.new_random_token())

    def test_good_and_wrong(self):
        """A listed token gives its tenant; another is unknown-token; no header is missing."""
        self.assertEqual(self.auth.check(bearer(self.token), NOW), AuthResult.allow("alice"))
        self.assertEqual(self.auth.check(bearer("other-token"), NOW), AuthResult.allow("bob"))
        self.assertEqual(self.auth.check(bearer(self.token + "x"), NOW).reason, UNKNOWN_TOKEN)
        self.assertEqual(self.auth.check(None, NOW).reason, MISSING)
        self.assertEqual(len(self.auth), 2)

    def test_file_holds_hashes_only(self):
        """The file format stores sha256:HEX, never the token."""
        self.assertNotIn(self.token, self.path.read_text())
        self.assertRegex(hash_token("x"), r"^sha256:[0-9a-f]{64}$")

    def test_reload_on_change(self):
        """Revoking and adding take effect at the next check after the interval; not before."""
        new = auth.new_random_token()
        self.write(f"{hash_token(new)} carol\n", stamp=10**18)
        self.assertTrue(self.auth.check(bearer(new), NOW).ok)
        self.assertFalse(self.auth.check(bearer(self.token), NOW).ok)
        self.write(f"{hash_token(self.token)} alice\n", stamp=2 * 10**18)
        self.assertFalse(self.auth.check(bearer(self.token), NOW + 2).ok)  # within the interval: no stat
        self.assertTrue(self.auth.check(bearer(self.token), NOW + 7).ok)
        self.assertFalse(self.auth.check(bearer(new), NOW + 7).ok)

    def test_broken_reload_keeps_previous(self):
        """A reload that fails keeps the last good list and is reported once, without the line's content."""
        self.auth.check(bearer(self.token), NOW)
        self.write(f"{self.token} alice\n", stamp=10**18)  # a raw token pasted by mistake
        self.assertTrue(self.auth.check(bearer(self.token), NOW + 10).ok)
        self.assertTrue(self.auth.check(bearer(self.token), NOW + 20).ok)
        self.assertEqual(len(self.reports), 1)
        self.assertIn("line 1", self.reports[0])
        self.assertNotIn(self.token, self.reports[0])

    def test_bad_files(self):
        """At start a malformed or missing file is an AuthConfigError naming the line, never its content."""
        for text in (f"{self.token}\n", "sha256:abc alice\n", f"{hash_token('x')} bad/name\n", f"{hash_token('x')}\n"):
            self.write(text)
            error = self.assertRaises(AuthConfigError, TokenFileAuth, str(self.path))
            self.assertIn("line 1", str(error))
            self.assertNotIn(self.token, str(error))
        self.assertRaises(AuthConfigError, TokenFileAuth, str(self.path) + ".missing")

    def test_constant_time_compare_over_every_entry(self):
        """The digest is compared with every entry (no early exit) through compare_digest."""
        calls = []

        def spy(a, b):
            calls.append(1)
            return auth.hmac.compare_digest(a, b)

        self.patch(auth, "_compare", spy)
        self.assertTrue(self.auth.check(bearer(self.token), NOW).ok)
        self.assertEqual(len(calls), 2)


class TokenCommandTests(SynchronousTestCase):
    def setUp(self):
        self.secret_file = Path(self.mktemp())
        self.secret_file.write_bytes(SECRET + b"\n" + OTHER_SECRET + b"\n")

    def test_durations(self):
        self.assertEqual(parse_duration("30d"), 30 * 86400)
        self.assertEqual(parse_duration("12h"), 43200)
        self.assertEqual(parse_duration("90"), 90)
        self.assertEqual(parse_duration("2w"), 14 * 86400)
        for bad in ("0", "-1d", "soon", "1y", ""):
            self.assertRaises(ValueError, parse_duration, bad)

    def test_relay_token_command(self):
        """It signs with the first secret of the file; the relay accepts the token."""
        token = relay_token_command(str(self.secret_file), "acme", "1h", now=NOW)
        self.assertEqual(SignedTokenAuth(SECRET, skew=0).check(bearer(token), NOW + 3600), AuthResult.allow("acme"))
        self.assertFalse(SignedTokenAuth(SECRET, skew=0).check(bearer(token), NOW + 3601).ok)
        self.assertRaises(ConfigurationError, relay_token_command, str(self.secret_file) + ".x", "acme", "1h")
        self.assertRaises(ConfigurationError, relay_token_command, str(self.secret_file), "a b", "1h")

    def test_options_signed(self):
        """pluresync relay-token --secret-file --tenant --ttl prints one token and returns 0."""
        options = RelayTokenOptions()
        options.parseOptions(["--secret-file", str(self.secret_file), "--tenant", "acme", "--ttl", "30d"])
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(options.run(), 0)
        token = out.getvalue().strip()
        self.assertTrue(SignedTokenAuth.from_file(str(self.secret_file)).check(bearer(token), time.time()).ok)

    def test_options_random(self):
        """--random prints a token, and on stderr the tokens-file line that accepts it."""
        options = RelayTokenOptions()
        options.parseOptions(["--random", "--tenant", "bob"])
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(options.run(), 0)
        token = out.getvalue().strip()
        line = err.getvalue().split(": ", 1)[1].strip()
        self.assertNotIn(token, err.getvalue())
        path = Path(self.mktemp())
        path.write_text(line + "\n")
        self.assertEqual(TokenFileAuth(str(path)).check(bearer(token), NOW), AuthResult.allow("bob"))

    def test_options_errors(self):
        for argv in (
            ["--tenant", "acme"],
            ["--secret-file", "x"],
            ["--random", "--secret-file", "x", "--tenant", "a"],
            ["--random", "--tenant", "bad name"],
            ["--secret-file", "x", "--tenant", "a", "--ttl", "forever"],
        ):
            self.assertRaises(usage.UsageError, RelayTokenOptions().parseOptions, argv)


class RelayOptionsTests(SynchronousTestCase):
    """--auth, --auth-tokens-file, --auth-secret-file and the loopback rule."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_loopback_endpoints(self):
        for endpoint, loopback in (
            ("tcp:8080", False),
            ("tcp:8080:interface=0.0.0.0", False),
            ("tcp:8080:interface=127.0.0.1", True),
            ("tcp:8080:interface=127.1.2.3", True),
            ("tcp6:8080:interface=\\:\\:1", True),
            ("tcp6:8080:interface=\\:\\:", False),
            ("ssl:443:interface=127.0.0.1:privateKey=k.pem", True),
            ("unix:/tmp/relay.sock", False),
            ("systemd:domain=INET:index=0", False),
            ("tcp:8080:interface=localhost", False),
        ):
            self.assertEqual(is_loopback_endpoint(endpoint), loopback, endpoint)

    def service(self, *argv: str):
        return makeService(self.parse(*argv), MemoryReactorClock())

    def test_loopback_default_is_open(self):
        service = self.service("--port", "tcp:8080:interface=127.0.0.1")
        self.assertIsInstance(service.factory.authenticator, OpenAuth)
        self.assertEqual(service.auth_warnings, ())

    def test_non_loopback_needs_auth(self):
        """A bare port (all interfaces) without --auth is refused with a message that says what to do."""
        for argv in ((), ("--port", "8080"), ("--port", "tcp:8080:interface=0.0.0.0"), ("--port", "unix:/tmp/r")):
            error = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn("no --auth mode was chosen", str(error))
            self.assertIn("--auth open", str(error))
            self.assertIn("--auth signed --auth-secret-file", str(error))

    def test_make_service_refuses_non_loopback(self):
        """makeService applies the same rule to an Options it did not see parsed: one clear line, exit 1."""
        options = Options()
        options["endpoint"] = "tcp:8080"
        options["limits"] = RelayLimits()
        error = self.assertRaises(SystemExit, makeService, options, MemoryReactorClock())
        self.assertIn("twist pluresync-relay: error: the relay would listen on tcp:8080", str(error.code))

    def test_explicit_open_warns(self):
        """--auth open on every interface is allowed, and logged as a warning at start."""
        log = ObservedLog(self)
        service = self.service("--port", "8080", "--auth", "open")
        self.assertIsInstance(service.factory.authenticator, OpenAuth)
        service.startService()
        self.addCleanup(service.stopService)
        warnings = [formatEvent(e) for e in log.events if e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("--auth open: anyone who can reach tcp:8080" in w for w in warnings), warnings)
        self.assertTrue(any("authentication: open" in t for t in log.texts()))

    def test_tokens_and_signed(self):
        tokens = Path(self.mktemp())
        tokens.write_text(f"{hash_token('t')} alice\n")
        secret = Path(self.mktemp())
        secret.write_bytes(SECRET)
        os.chmod(secret, 0o600)
        os.chmod(tokens, 0o600)
        service = self.service("--port", "443", "--auth", "tokens", "--auth-tokens-file", str(tokens))
        self.assertIsInstance(service.factory.authenticator, TokenFileAuth)
        service = self.service("--port", "443", "--auth", "signed", "--auth-secret-file", str(secret))
        self.assertIsInstance(service.factory.authenticator, SignedTokenAuth)
        self.assertEqual(service.auth_warnings, ())
        # A file alone implies its mode.
        service = self.service("--auth-secret-file", str(secret))
        self.assertIsInstance(service.factory.authenticator, SignedTokenAuth)

    def test_readable_secret_warns(self):
        secret = Path(self.mktemp())
        secret.write_bytes(SECRET)
        os.chmod(secret, 0o644)
        service = self.service("--auth", "signed", "--auth-secret-file", str(secret))
        self.assertTrue(any("chmod 600" in w for w in service.auth_warnings))

    def test_auth_errors(self):
        """Option mistakes are usage errors; unusable files stop makeService; no file content is quoted."""
        secret = Path(self.mktemp())
        secret.write_bytes(b"short")
        loopback = ("--port", "tcp:1:interface=127.0.0.1")
        for argv in (
            ("--auth", "maybe"),
            ("--auth", "tokens"),
            ("--auth", "signed"),
            ("--auth", "open", "--auth-secret-file", str(secret)),
            ("--auth-tokens-file", "a", "--auth-secret-file", "b"),
        ):
            self.assertRaises(usage.UsageError, self.parse, *loopback, *argv)
        for argv in (
            ("--auth", "signed", "--auth-secret-file", str(secret)),
            ("--auth", "tokens", "--auth-tokens-file", str(secret) + ".missing"),
        ):
            error = self.assertRaises(SystemExit, self.service, *loopback, *argv)
            self.assertIn("twist pluresync-relay: error: --auth", str(error.code))
            self.assertNotIn("short", str(error.code))


class ClientTokenTests(SynchronousTestCase):
    """token=, tokenfile= and PLURESYNC_RELAY_TOKEN."""

    def test_parameters_known(self):
        self.assertLessEqual({"token", "tokenfile"}, RELAY_PARAMETERS)

    def test_sources(self):
        path = Path(self.mktemp())
        path.write_text("file-token\n")
        self.assertEqual(relay_token("abc.def", None, {}), "abc.def")
        self.assertEqual(relay_token(None, str(path), {}), "file-token")
        self.assertEqual(relay_token(None, None, {"PLURESYNC_RELAY_TOKEN": "env-token"}), "env-token")
        self.assertEqual(relay_token(None, None, {"PLURESYNC_RELAY_TOKEN": str(path)}), "file-token")
        self.assertEqual(relay_token(None, None, {"PLURESYNC_RELAY_TOKEN": ""}), None)
        self.assertEqual(relay_token(None, None, {}), None)
        self.assertEqual(relay_token("param", None, {"PLURESYNC_RELAY_TOKEN": "env"}), "param")

    def test_errors_never_show_the_token(self):
        path = Path(self.mktemp())
        path.write_text("two words\n")
        for call in (
            lambda: relay_token("secret\r\nX-Injected: 1", None, {}),
            lambda: relay_token("secret", str(path), {}),
            lambda: relay_token(None, str(path), {}),
            lambda: relay_token(None, str(path) + ".missing", {}),
            lambda: relay_token(None, None, {"PLURESYNC_RELAY_TOKEN": "/nonexistent/token"}),
            lambda: relay_token(None, None, {"PLURESYNC_RELAY_TOKEN": "secret with spaces"}),
        ):
            error = self.assertRaises(ConfigurationError, call)
            self.assertNotIn("secret", str(error))
            self.assertNotIn("two words", str(error))

    def test_config_repr_hides_token(self):
        config = relay_config(url="ws://127.0.0.1:1", key=SyncKey.generate().to_text(), token="hidden-token-value")
        self.assertEqual(config.token, "hidden-token-value")
        self.assertNotIn("hidden-token-value", repr(config))
        self.assertNotIn("hidden-token-value", str(config))


class _RawUpgrade(Protocol):
    """Sends one WebSocket upgrade request and keeps the response head."""

    def __init__(self, headers: str) -> None:
        self.request = (
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: pluresync.v1\r\n{headers}\r\n"
        ).encode()
        self.received = b""
        self.head: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.head.called:
            self.head.callback(self.received.split(b"\r\n\r\n")[0].decode())

    def connectionLost(self, reason) -> None:
        if not self.head.called:
            self.head.callback(self.received.decode())
        self.lost.callback(None)


class RelayAuthLoopbackTests(TestCase):
    """A relay with signed tokens on 127.0.0.1, raw upgrades and pluresync endpoints."""

    timeout = 30

    def setUp(self):
        self.log = ObservedLog(self)
        self.relay = LocalRelay(self, authenticator=SignedTokenAuth(SECRET))
        self.key = SyncKey.generate()
        self.token = mint_token(SECRET, "acme", 3600, reactor.seconds())

    async def upgrade(self, headers: str = "") -> str:
        protocol = _RawUpgrade(headers)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port.getHost().port)
        await connectProtocol(endpoint, protocol)
        head = await protocol.head
        protocol.transport.abortConnection()
        await protocol.lost
        return head

    async def test_401_before_any_websocket(self):
        """Without a token, or with a bad one: HTTP 401 with WWW-Authenticate: Bearer, and no WebSocket."""
        for headers in ("", "Authorization: Bearer nonsense\r\n", f"Authorization: Bearer {self.token}x\r\n"):
            head = await self.upgrade(headers)
            status = head.split("\r\n")[0]
            self.assertTrue(status.startswith("HTTP/1.1 401 Unauthorized"), head)
            self.assertIn("WWW-Authenticate: Bearer", head)
            self.assertNotIn("Sec-WebSocket-Accept", head)
        self.assertEqual(self.relay.factory.stats()["listeners"], 0)
        self.log.assertNever(self, self.token)
        self.log.assertNever(self, "nonsense")

    async def test_101_with_token(self):
        """With the right token the upgrade succeeds."""
        head = await self.upgrade(f"Authorization: Bearer {self.token}\r\n")
        self.assertTrue(head.startswith("HTTP/1.1 101"), head)

    async def test_client_without_token(self):
        """A pluresync client or listener without a token gets RelayAuthError saying how to give one."""
        endpoint = clientFromString(reactor, self.relay.endpoint(self.key, wait="0"))
        error = await self.assertFailure(endpoint.connect(Factory.forProtocol(Collector)), RelayAuthError)
        self.assertIsInstance(error, RelayUnreachableError)
        self.assertEqual(error.code, "unauthorized")
        self.assertIn("requires a relay token and none was given (HTTP 401 (missing))", str(error))
        self.assertIn("tokenfile=", str(error))
        self.assertIn("PLURESYNC_RELAY_TOKEN", str(error))
        listening = serverFromString(reactor, self.relay.endpoint(self.key))
        await self.assertFailure(listening.listen(Factory.forProtocol(Collector)), RelayAuthError)

    async def test_client_with_wrong_token(self):
        """An expired or foreign token: RelayAuthError naming the reason, never the token."""
        for token, reason in (
            (mint_token(SECRET, "acme", 1, reactor.seconds() - 3600), "expired"),
            (mint_token(OTHER_SECRET, "acme", 3600, reactor.seconds()), "bad-signature"),
        ):
            endpoint = clientFromString(reactor, self.relay.endpoint(self.key, wait="0", token=token))
            error = await self.assertFailure(endpoint.connect(Factory.forProtocol(Collector)), RelayAuthError)
            self.assertIn(f"refused our relay token (HTTP 401 ({reason}))", str(error))
            self.assertNotIn(token, str(error))
            self.log.assertNever(self, token)

    async def test_pair_with_token(self):
        """With the token both sides pair and talk; the tenant is logged, the token never."""
        tokenfile = Path(self.mktemp())
        tokenfile.write_text(self.token + "\n")
        received = []
        arrived: Deferred[None] = Deferred()
        factory = Factory.forProtocol(Collector)
        accepted: Deferred[Collector] = Deferred()

        def data(chunk: bytes) -> None:
            received.append(chunk)
            if not arrived.called:
                arrived.callback(None)

        def build(addr):
            protocol = Collector()
            protocol.dataArrived = data
            protocol.made.addCallback(accepted.callback)
            return protocol

        factory.buildProtocol = build
        port = await serverFromString(reactor, self.relay.endpoint(self.key, tokenfile=str(tokenfile))).listen(factory)
        self.addCleanup(port.stopListening)
        self.patch(os, "environ", {**os.environ, "PLURESYNC_RELAY_TOKEN": self.token})
        client = await clientFromString(reactor, self.relay.endpoint(self.key, wait="5")).connect(
            Factory.forProtocol(Collector)
        )
        self.addCleanup(client.transport.abortConnection)
        server = await accepted
        client.transport.write(b"hello")
        await arrived
        self.assertEqual(b"".join(received), b"hello")
        self.assertIsNotNone(server)
        texts = self.log.texts()
        self.assertTrue(any(t.startswith("listener ready") and "tenant=acme" in t for t in texts), texts)
        self.assertTrue(any(t.startswith("paired") and "tenant=acme" in t for t in texts), texts)
        self.log.assertNever(self, self.token)
        self.log.assertNever(self, self.token.split(".")[2])
        self.assertIn(b"Authorization: Bearer ", self.relay.tapped)
