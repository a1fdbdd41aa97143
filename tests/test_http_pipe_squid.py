"""
The HTTP pipe through Debian's squid as a TLS-inspecting proxy that denies
WebSocket upgrades (tests/squidproxy.py): squid decrypts every CONNECT with
certificates it forges under its own CA (the only CA the peers trust, as on
a corporate laptop), refuses the WebSocket, and passes plain HTTPS requests.
The peers find that out by themselves (C{pipe=auto}), and stream 64 MiB each
way through it; a paused reader holds its writer back.  Skipped, saying how
to install it, without squid-openssl.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from pluresync.endpoints import pathcache
from pluresync.keys import SyncKey
from pluresync.relay.server.site import build_site

from .relayprocess import sockets_closed, start_relay
from .squidproxy import Squid, squid_path
from .streamharness import STREAM_BYTES, MiB, RelayEndpoints, Transfer, mib, window
from .testca import TestCA, TestPKI

log = Logger()

SIZE = min(64 * MiB, STREAM_BYTES)
PAUSE_AT = 8 * MiB
PAUSE_SECONDS = 3.0


def _d(coroutine) -> Deferred:
    return ensureDeferred(coroutine)


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


class SquidInspectingProxyTests(unittest.TestCase):
    """Two peers behind squid ssl_bump with WebSockets denied."""

    timeout = 300

    def setUp(self) -> None:
        squid_path(self)
        self.key = SyncKey.generate().to_text()
        self.patch(pathcache, "shared", pathcache.PathCache())
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.addCleanup(lambda: _d(sockets_closed(timeout=15)))
        self.lines: list[str] = []

        def observe(event):
            if event.get("log_namespace", "").startswith("pluresync") and event.get("log_format"):
                self.lines.append(event["log_format"].format(**{k: v for k, v in event.items() if isinstance(k, str)}))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def start(self) -> tuple[RelayEndpoints, Squid]:
        pki = TestPKI.shared()
        inspection = TestCA(self.mktemp(), "corporate inspection CA")
        site, factory = build_site(reactor)
        port = await serverFromString(reactor, pki.localhost.ssl_endpoint()).listen(site)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.close_all)
        squid = await Squid.start(self, inspection, pki.ca.ca_path)
        self.addCleanup(lambda: log.info("squid access log:\n{log}", log=squid.access_log()[-3000:]))
        url = _escaped(f"wss://localhost:{port.getHost().port}")
        # The peers trust only the proxy's CA, as a managed laptop does.
        extra = f":ca={_escaped(str(inspection.ca_path))}:proxy={_escaped(squid.url)}"
        return RelayEndpoints(self.key + extra, url, url), squid

    def test_falls_back_and_streams_both_ways(self) -> Deferred:
        """
        pipe=auto: squid refuses the WebSocket, the peers use the HTTP pipe
        (said once, remembered), and 64 MiB go each way with equal sha256.
        """

        async def run() -> None:
            endpoints, squid = await self.start()
            # Two streams, one each way, each on a topic of its own.
            there = Transfer(self, endpoints, SIZE, client={"topic": "there"}, server={"topic": "there"})
            back = Transfer(self, endpoints, SIZE, client={"topic": "back"}, server={"topic": "back"})
            await there.start()
            await back.start()
            await gatherResults([_d(there.ended(within=240)), _d(back.ended(within=240))], consumeErrors=True)
            for transfer in (there, back):
                self.assertEqual(transfer.problems(), [], transfer.progress())
                log.info("{size} through squid in {elapsed:.2f} s", size=mib(SIZE), elapsed=transfer.elapsed)
            said = [line for line in self.lines if "using the relay's HTTP pipe on this network" in line]
            self.assertEqual(len(said), 1, self.lines)
            self.assertIn("/pipe", squid.access_log())

        return _d(run())

    def test_paused_reader(self) -> Deferred:
        """Through squid on the HTTP pipe, a paused reader holds its writer to the session's window."""

        async def run() -> None:
            endpoints, _ = await self.start()
            transfer = Transfer(self, endpoints, SIZE, receiver={"pause_at": PAUSE_AT, "pause_for": PAUSE_SECONDS})
            await transfer.start()
            receiving = await transfer.arrived(PAUSE_AT, within=120)
            ahead: list[int] = []
            reactor.callLater(PAUSE_SECONDS - 0.5, lambda: ahead.append(transfer.sender.sent - receiving.received))
            await transfer.ended(within=240)
            self.assertEqual(transfer.problems(), [], transfer.progress())
            self.assertEqual(receiving.during_pause, 0)
            self.assertLessEqual(ahead[0], window() + 4 * MiB, "the paused reader did not hold the writer back")

        return _d(run())


class SquidForwardProxyTests(unittest.TestCase):
    """
    Squid as a plain forward proxy, configured as its stock squid.conf is
    (CONNECT only to 443) and refusing WebSockets: to a plain relay on
    another port the WebSocket's tunnel is refused; the HTTP pipe's requests
    are forwarded (absolute URIs), and two peers stream through them.
    """

    timeout = 300

    def setUp(self) -> None:
        squid_path(self)
        self.key = SyncKey.generate().to_text()
        self.patch(pathcache, "shared", pathcache.PathCache())
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.addCleanup(lambda: _d(sockets_closed(timeout=15)))

    def test_streams_both_ways(self) -> Deferred:
        async def run() -> None:
            relay = await start_relay(self, [])
            squid = await Squid.start(self)
            self.addCleanup(lambda: log.info("squid access log:\n{log}", log=squid.access_log()[-3000:]))
            endpoints = RelayEndpoints(self.key + f":proxy={_escaped(squid.url)}", relay.escaped_url, relay.escaped_url)
            there = Transfer(self, endpoints, SIZE, client={"topic": "there"}, server={"topic": "there"})
            back = Transfer(self, endpoints, SIZE, client={"topic": "back"}, server={"topic": "back"})
            await there.start()
            await back.start()
            await gatherResults([_d(there.ended(within=240)), _d(back.ended(within=240))], consumeErrors=True)
            for transfer in (there, back):
                self.assertEqual(transfer.problems(), [], transfer.progress())
            access = squid.access_log()
            self.assertIn(f"CONNECT 127.0.0.1:{relay.port}", access)  # refused: TCP_DENIED/403
            self.assertIn("TCP_DENIED/403", access)
            self.assertIn(f"POST http://127.0.0.1:{relay.port}/pipe", access)

        return _d(run())
