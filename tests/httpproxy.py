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


# -- a proxy that reads what it tunnels -------------------------------------------


class _ProxyServerSide(Protocol):
    """The proxy's connection to the relay: everything it answers goes back to the client as it comes."""

    def __init__(self, client: _ProxyClientSide) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.upstreamConnected(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.client.upstreamLost()


class _ProxyClientSide(Protocol):
    """
    One client connection to L{InspectingProxy}: a CONNECT, then the HTTP
    requests inside the tunnel, read (plain http, as a TLS-inspecting proxy
    reads them once it has decrypted them) and passed on, refused or held.
    """

    def __init__(self, proxy: InspectingProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.server: _ProxyServerSide | None = None
        self.tunnelled = False
        self.raw = False
        self.held: list[bytes] = []
        self.held_for_server = b""
        self.forwarding = False
        # request parsing: "head", "length" (n bytes left), "chunk-size", "chunk" (n left), "chunk-end", "trailer"
        self.state = "connect"
        self.left = 0

    def connectionMade(self) -> None:
        self.proxy.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.raw:
            self.forwardRaw(data)
            return
        self.buffer += data
        # Bounded: each turn consumes a head, a line or a piece of a body.
        for _ in range(100_000):
            if not self.buffer or self.raw or self.transport is None or self.transport.disconnecting:
                break
            if not self.step():
                break
        if self.raw and self.buffer:
            rest, self.buffer = self.buffer, b""
            self.forwardRaw(rest)

    def forwardRaw(self, data: bytes) -> None:
        """A WebSocket's frames, after the upgrade: passed on, or (C{mute_websocket}) swallowed."""
        if not self.proxy.mute_websocket:
            self.forward(data)

    def step(self) -> bool:
        """Consume what the state allows; False when more bytes are needed."""
        if self.state in ("connect", "head", "chunk-size", "chunk-end", "trailer"):
            end = self.buffer.find(b"\r\n\r\n" if self.state in ("connect", "head") else b"\r\n")
            if end < 0:
                return False
            size = end + (4 if self.state in ("connect", "head") else 2)
            piece, self.buffer = self.buffer[:size], self.buffer[size:]
            return self.line(piece)
        take = min(self.left, len(self.buffer))
        piece, self.buffer = self.buffer[:take], self.buffer[take:]
        self.left -= take
        self.body(piece)
        if self.left == 0:
            if self.state == "length":
                self.requestEnded()
            else:
                self.state = "chunk-end"
        return True

    def line(self, piece: bytes) -> bool:
        if self.state == "connect":
            first = piece.split(b"\r\n", 1)[0].split()
            forward = len(first) == 3 and first[1].startswith(b"http://")
            if len(first) < 2 or not (first[0] == b"CONNECT" or forward):
                self.transport.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                self.transport.loseConnection()
                return False
            if forward:
                # A plain forward request (GET http://host:port/path): this
                # connection's requests all go to that host, in origin form.
                self.forwarding = True
                authority = first[1][len(b"http://") :].split(b"/", 1)[0]
                host, _, port = authority.decode().rpartition(":")
            else:
                host, _, port = first[1].decode().rpartition(":")
                self.proxy.connects += 1
            self.transport.pauseProducing()
            from twisted.internet.endpoints import TCP4ClientEndpoint

            endpoint = TCP4ClientEndpoint(reactor, host.strip("[]"), int(port))
            endpoint.connect(Factory.forProtocol(lambda: _ProxyServerSide(self))).addErrback(
                lambda _: self.transport.loseConnection()
            )
            self.state = "head"
            return self.line(piece) if forward else True
        if self.state == "head":
            first, sep, rest = piece.partition(b"\r\n")
            parts = first.split()
            if len(parts) == 3 and parts[1].startswith(b"http://"):
                if not self.forwarding:
                    self.transport.loseConnection()
                    return False
                self.proxy.forwarded += 1
                _, slash, path = parts[1][len(b"http://") :].partition(b"/")
                piece = b" ".join((parts[0], (slash + path) or b"/", parts[2])) + sep + rest
            headers = {}
            for line in piece.split(b"\r\n")[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            self.proxy.requests += 1
            if b"upgrade" in headers and self.proxy.deny_upgrade:
                self.proxy.denied += 1
                body = b"<html><body>WebSockets are not allowed here</body></html>"
                self.transport.write(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (len(body), body)
                )
                self.transport.loseConnection()
                return False
            self.forwardPart(piece)
            if b"upgrade" in headers:
                self.requestEnded()
                self.raw = True  # a WebSocket: bytes both ways from now on
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self.state = "chunk-size"
            elif int(headers.get(b"content-length", b"0") or 0) > 0:
                self.state = "length"
                self.left = int(headers[b"content-length"])
            else:
                self.requestEnded()
            return True
        self.forwardPart(piece)
        if self.state == "chunk-size":
            size = int(piece.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.state = "trailer"
            else:
                self.state, self.left = "chunk", size
        elif self.state == "chunk-end":
            self.state = "chunk-size"
        elif self.state == "trailer" and piece == b"\r\n":
            self.requestEnded()
        return True

    def body(self, piece: bytes) -> None:
        self.forwardPart(piece)

    def forwardPart(self, piece: bytes) -> None:
        if self.proxy.hold_bodies:
            self.held.append(piece)
        else:
            self.forward(piece)

    def requestEnded(self) -> None:
        self.state = "head"
        if self.held:
            held, self.held = b"".join(self.held), []
            self.proxy.held_requests += 1
            self.forward(held)

    def forward(self, data: bytes) -> None:
        if self.server is not None:
            self.server.transport.write(data)
        else:
            self.held_for_server += data

    def upstreamConnected(self, server: _ProxyServerSide) -> None:
        self.server = server
        # Each side's outgoing buffer throttles the other's reading.
        server.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(server.transport, True)
        if not self.forwarding:
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        early, self.held_for_server = self.held_for_server, b""
        if early:
            server.transport.write(early)
        self.transport.resumeProducing()

    def upstreamLost(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.loseConnection()


class InspectingProxy(Factory):
    """
    An HTTP proxy on 127.0.0.1, in this process, that reads the HTTP inside
    its CONNECT tunnels (to a C{ws://} relay, as a TLS-inspecting proxy
    reads them after decrypting) and the plain requests it forwards
    (C{POST http://host:port/pipe}), and, as corporate proxies do:

     - C{deny_upgrade}: answers any request with C{Upgrade:} with a 403 page;
     - C{hold_bodies}: holds every request's body until it has ended, then
       passes the whole request on (so a streaming body never arrives);
     - C{mute_websocket}: lets the upgrade through, then swallows every
       frame the client sends (the relay never hears from it).

    @ivar connects, requests, denied, held_requests, forwarded: what it saw.
    """

    def __init__(
        self, test, *, deny_upgrade: bool = False, hold_bodies: bool = False, mute_websocket: bool = False
    ) -> None:
        self.deny_upgrade = deny_upgrade
        self.hold_bodies = hold_bodies
        self.mute_websocket = mute_websocket
        self.connections: list[_ProxyClientSide] = []
        self.connects = self.requests = self.denied = self.held_requests = self.forwarded = 0
        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        test.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def buildProtocol(self, addr) -> _ProxyClientSide:
        return _ProxyClientSide(self)

    def cut(self) -> None:
        """Drop every connection through the proxy (a proxy restart, a Wi-Fi change); keep listening."""
        connections, self.connections = self.connections, []
        for connection in connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
            if connection.server is not None and connection.server.transport is not None:
                connection.server.transport.abortConnection()

    def stop(self) -> Deferred:
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
            if connection.server is not None and connection.server.transport is not None:
                connection.server.transport.abortConnection()
        return self.listening.stopListening()
