"""
A real HTTP proxy for integration tests: tinyproxy (Debian package
C{tinyproxy}) on a free 127.0.0.1 port, with a generated configuration in a
temporary directory, driven by Deferreds (no sleeps), stopped at cleanup.

    proxy = yield TinyProxy.start(self, connect_ports=[relay_port])
    ... connect through 127.0.0.1:proxy.port ...
    self.assertIn("CONNECT 127.0.0.1:%d HTTP/1.1" % relay_port, proxy.log())
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest

from .processes import Child

INSTALL_HINT = "tinyproxy is not installed; the HTTP proxy tests need it: apt-get install tinyproxy"

#: How long tinyproxy may take to accept connections, and how often we try.
START_TIMEOUT = 10.0
PROBE_INTERVAL = 0.05
#: How many free ports we try if tinyproxy cannot bind (someone took it).
PORT_ATTEMPTS = 3


def tinyproxy_path(test) -> str:
    """
    The tinyproxy program. Missing: the test fails in CI (C{CI} set) and is
    skipped elsewhere, saying how to install it.
    """
    found = shutil.which("tinyproxy") or next(
        (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if os.environ.get("CI"):
        test.fail(INSTALL_HINT)
    raise SkipTest(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pause(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred(lambda _: call.cancel())
    call = reactor.callLater(seconds, d.callback, None)
    return d


class _Probe(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


def config_text(directory: Path, port: int, connect_ports: list[int], basic_auth: tuple[str, str] | None) -> str:
    """The tinyproxy configuration the tests use."""
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 60",
        "MaxClients 20",
        "Allow 127.0.0.1",
        f'LogFile "{directory / "tinyproxy.log"}"',
        "LogLevel Info",
        f'PidFile "{directory / "tinyproxy.pid"}"',
        # tinyproxy allows CONNECT only to the listed ports (all, without any line).
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    return "\n".join(lines) + "\n"


class TinyProxy:
    """
    One tinyproxy process.

    @ivar port: where it listens on 127.0.0.1.
    @ivar directory: its temporary directory (configuration, log, pid file).
    """

    def __init__(self, port: int, directory: Path, child: Child, transport) -> None:
        self.port = port
        self.directory = directory
        self._child = child
        self._transport = transport

    @property
    def log_path(self) -> Path:
        return self.directory / "tinyproxy.log"

    def log(self) -> str:
        """Everything tinyproxy has logged so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @classmethod
    @inlineCallbacks
    def start(cls, test, connect_ports: list[int], basic_auth: tuple[str, str] | None = None):
        """
        Start tinyproxy allowing CONNECT to C{connect_ports} (and requiring
        C{basic_auth}'s user and password, if given); fire with it once it
        accepts connections. It is stopped at C{test}'s cleanup.
        """
        program = tinyproxy_path(test)
        directory = Path(tempfile.mkdtemp(prefix="tinyproxy-"))
        test.addCleanup(shutil.rmtree, directory, True)
        failures = []
        for _ in range(PORT_ATTEMPTS):
            port = _free_port()
            config = directory / "tinyproxy.conf"
            config.write_text(config_text(directory, port, connect_ports, basic_auth))
            child = Child()
            transport = reactor.spawnProcess(
                child, program, [program, "-d", "-c", str(config)], env=dict(os.environ), path=str(directory)
            )
            proxy = cls(port, directory, child, transport)
            test.addCleanup(proxy.stop)
            accepting = yield proxy._accepting()
            if accepting:
                return proxy
            yield proxy.stop()
            failures.append(f"port {port}: {child.err.decode(errors='replace')[-500:]} {proxy.log()[-1500:]}")
        test.fail("tinyproxy did not start:\n" + "\n".join(failures))

    @inlineCallbacks
    def _accepting(self):
        """Try to connect until it works (True), tinyproxy exits or START_TIMEOUT passes (False)."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=2)
        for _ in range(int(START_TIMEOUT / PROBE_INTERVAL)):
            if self._child.ended.called:
                return False
            try:
                probe = yield endpoint.connect(Factory.forProtocol(_Probe))
            except Exception:
                yield _pause(PROBE_INTERVAL)
                continue
            probe.transport.loseConnection()
            yield probe.lost
            return True
        return False

    @inlineCallbacks
    def stop(self):
        """SIGTERM, and wait (bounded) for it to exit; SIGKILL if it does not."""
        for signal in ("TERM", "KILL"):
            if self._child.ended.called:
                return
            try:
                self._transport.signalProcess(signal)
            except ProcessExitedAlready:
                pass
            try:
                yield self._ended(5.0)
            except Exception:
                continue

    def _ended(self, seconds: float) -> Deferred[None]:
        """Fires when the process has exited; fails after C{seconds}."""
        waiting: Deferred[None] = Deferred()

        def ended(result):
            if not waiting.called:
                waiting.callback(None)
            return result

        self._child.ended.addBoth(ended)
        return waiting.addTimeout(seconds, reactor)


def self_signed(ip: str):
    """
    A throwaway TLS certificate for the IP address C{ip}: the server's
    C{CertificateOptions} and a trust root for C{optionsForClientTLS}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet.ssl import Certificate, PrivateCertificate, trustRootFromCertificates

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    server = PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    return server, trustRootFromCertificates([Certificate.loadPEM(cert_pem)])
