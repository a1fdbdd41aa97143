"""
Debian's squid (package C{squid-openssl}) for integration tests: a
TLS-inspecting proxy (C{ssl_bump}: it decrypts what clients send through
CONNECT with certificates it forges under a test CA, as corporate proxies
do) that denies WebSocket upgrades (C{http_upgrade_request_protocols}).  It
runs on a free 127.0.0.1 port with a generated configuration in a temporary
directory, driven by Deferreds (no sleeps), and is stopped at cleanup.

    squid = await Squid.start(test, bump_ca=ca, upstream_ca=relay_ca.ca_path)
    ... proxy=http://127.0.0.1:squid.port, ca=ca.ca_path ...
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest

from .processes import Child
from .relayprocess import free_port
from .testca import TestCA

INSTALL_HINT = (
    "squid with OpenSSL is not installed; the TLS-inspecting proxy tests need it: apt-get install squid-openssl"
)
#: Where Debian puts squid's certificate generator.
CERTGEN = "/usr/lib/squid/security_file_certgen"
START_TIMEOUT = 20.0
PROBE_INTERVAL = 0.05


def squid_path(test) -> str:
    """squid, with ssl_bump support; skip (fail in CI) saying how to install it."""
    found = shutil.which("squid") or ("/usr/sbin/squid" if os.access("/usr/sbin/squid", os.X_OK) else None)
    if found and os.access(CERTGEN, os.X_OK):
        try:
            version = subprocess.run([found, "-v"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            version = ""
        if "--with-openssl" in version:
            return found
    if os.environ.get("CI"):
        test.fail(INSTALL_HINT)
    raise SkipTest(INSTALL_HINT)


def config_text(directory: Path, port: int, bump_pem: Path | None, upstream_ca: Path | None, user: str) -> str:
    """
    A squid.conf for 127.0.0.1 clients only that refuses WebSockets: a
    TLS-inspecting proxy (with C{bump_pem}), or else a plain forward proxy
    that, like squid's stock configuration, tunnels (CONNECT) only to 443.
    """
    if bump_pem is not None:
        mode = [
            f"http_port 127.0.0.1:{port} ssl-bump generate-host-certificates=on "
            f"dynamic_cert_mem_cache_size=4MB tls-cert={bump_pem}",
            f"sslcrtd_program {CERTGEN} -s {directory / 'ssl_db'} -M 4MB",
            "sslcrtd_children 3 startup=1 idle=1",
            "acl step1 at_step SslBump1",
            "ssl_bump peek step1",
            "ssl_bump bump all",
            f"tls_outgoing_options cafile={upstream_ca}",
        ]
    else:
        mode = [
            f"http_port 127.0.0.1:{port}",
            "acl SSL_ports port 443",
            "acl CONNECT method CONNECT",
            "http_access deny CONNECT !SSL_ports",
        ]
    return "\n".join(
        [
            *mode,
            "acl loopback src 127.0.0.1/32",
            "http_access allow loopback",
            "http_access deny all",
            # What corporate proxies do to WebSockets (and squid's default, said out loud).
            "http_upgrade_request_protocols WebSocket deny all",
            "cache deny all",
            f"pid_filename {directory / 'squid.pid'}",
            f"cache_log {directory / 'cache.log'}",
            f"access_log stdio:{directory / 'access.log'}",
            f"coredump_dir {directory}",
            f"cache_effective_user {user}",
            "visible_hostname pluresync-test-proxy",
            "shutdown_lifetime 0 seconds",
            "",
        ]
    )


class _Probe(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class Squid:
    """One squid process. @ivar port: where it listens on 127.0.0.1. @ivar directory: its files."""

    def __init__(self, port: int, directory: Path, child: Child, transport) -> None:
        self.port = port
        self.directory = directory
        self._child = child
        self._transport = transport

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> str:
        try:
            return (self.directory / "access.log").read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def cache_log(self) -> str:
        try:
            return (self.directory / "cache.log").read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @classmethod
    async def start(cls, test, bump_ca: TestCA | None = None, upstream_ca: Path | None = None) -> Squid:
        """
        Start squid bumping TLS with certificates forged under C{bump_ca}
        and trusting C{upstream_ca} for the servers it connects to (without
        them: a plain forward proxy); it is stopped at C{test}'s cleanup.
        """
        program = squid_path(test)
        directory = Path(tempfile.mkdtemp(prefix="squid-"))
        test.addCleanup(shutil.rmtree, directory, True)
        user = pwd.getpwuid(os.getuid()).pw_name
        if os.getuid() == 0:
            # squid drops root; its files must be the proxy user's.
            user = "proxy"
        bump = upstream = None
        if bump_ca is not None:
            subprocess.run(
                [CERTGEN, "-c", "-s", str(directory / "ssl_db"), "-M", "4MB"], check=True, capture_output=True
            )
            bump, upstream = directory / "bump.pem", directory / "upstream-ca.pem"
            shutil.copy(bump_ca.signing_pem(), bump)
            shutil.copy(upstream_ca, upstream)
        if os.getuid() == 0:
            for path in [directory, *directory.rglob("*")]:
                shutil.chown(path, user, user)
        port = free_port()
        config = directory / "squid.conf"
        config.write_text(config_text(directory, port, bump, upstream, user))
        child = Child()
        transport = reactor.spawnProcess(
            child, program, [program, "-N", "-f", str(config)], env=dict(os.environ), path=str(directory)
        )
        squid = cls(port, directory, child, transport)
        test.addCleanup(squid.stop)
        if not await squid._accepting():
            test.fail(f"squid did not start: {child.err.decode(errors='replace')[-800:]}\n{squid.cache_log()[-2000:]}")
        return squid

    async def _accepting(self) -> bool:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=2)
        for _ in range(int(START_TIMEOUT / PROBE_INTERVAL)):
            if self._child.ended.called:
                return False
            try:
                probe = await endpoint.connect(Factory.forProtocol(_Probe))
            except Exception:
                await _pause(PROBE_INTERVAL)
                continue
            probe.transport.loseConnection()
            await probe.lost
            return True
        return False

    async def stop(self) -> None:
        """SIGTERM, and wait (bounded) for it to exit; SIGKILL if it does not."""
        for signal in ("TERM", "KILL"):
            if self._child.ended.called:
                return
            try:
                self._transport.signalProcess(signal)
            except ProcessExitedAlready:
                return
            try:
                await self._ended(10.0)
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


def _pause(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred(lambda _: call.cancel())
    call = reactor.callLater(seconds, d.callback, None)
    return d
