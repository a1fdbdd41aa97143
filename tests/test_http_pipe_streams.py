"""
Streams over the HTTP pipe through a real relay process on 127.0.0.1:
64 MiB each way with a WebSocket peer and an HTTP peer, and with two HTTP
peers (sha256 equal, every byte checked in order, one connection, a clean
close on both sides), and a paused reader that holds its writer back with
the relay's memory bounded.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.logger import Logger
from twisted.trial import unittest

from pluresync.endpoints import pathcache
from pluresync.keys import SyncKey

from .httpproxy import InspectingProxy
from .relayprocess import sockets_closed, start_relay
from .streamharness import STREAM_BYTES, MiB, RelayEndpoints, Transfer, mib, window

log = Logger()

#: Bytes each way (64 MiB; PLURESYNC_STREAM_TEST_MIB=16 shrinks it).
SIZE = min(64 * MiB, STREAM_BYTES)
#: The paused reader: where it pauses and for how long.
PAUSE_AT = 8 * MiB
PAUSE_SECONDS = 3.0
#: The relay's resident memory may grow at most this much over a paused
#: stream (it holds no more than its socket buffers; the session's window,
#: 16 MiB by default, bounds what is in flight anyway).
RELAY_GROWTH_LIMIT = 48 * MiB


def _d(coroutine) -> Deferred:
    return ensureDeferred(coroutine)


def _rss(pid: int | None, field: str = "VmRSS") -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class HttpPipeStreamTests(unittest.TestCase):
    """Big streams over the HTTP pipe, through a relay process."""

    timeout = 240

    def setUp(self) -> None:
        self.key = SyncKey.generate().to_text()
        self.patch(pathcache, "shared", pathcache.PathCache())
        self.patch(pathcache, "pipes", pathcache.PathCache())
        self.addCleanup(lambda: _d(sockets_closed(timeout=15)))

    def assertDelivered(self, transfer: Transfer) -> None:
        problems = transfer.problems()
        self.assertEqual(problems, [], transfer.progress())
        self.assertEqual(transfer.sender.sha256, transfer.receiving.sha256)

    async def both_ways(self, first: str, second: str) -> None:
        relay = await start_relay(self, [])
        url = relay.escaped_url
        endpoints = RelayEndpoints(self.key, url, url)
        # One stream from a `first` peer to a `second` listener, one the other way, at once.
        # Each on a topic of its own, so each client meets its own listener.
        there = Transfer(
            self, endpoints, SIZE, client={"pipe": first, "topic": "there"}, server={"pipe": second, "topic": "there"}
        )
        back = Transfer(
            self, endpoints, SIZE, client={"pipe": second, "topic": "back"}, server={"pipe": first, "topic": "back"}
        )
        await gatherResults([_d(there.start()), _d(back.start())], consumeErrors=True)
        await gatherResults([_d(there.ended(within=200)), _d(back.ended(within=200))], consumeErrors=True)
        for transfer in (there, back):
            self.assertDelivered(transfer)
            log.info("{size} in {elapsed:.2f} s", size=mib(SIZE), elapsed=transfer.elapsed)

    def test_websocket_and_http(self) -> Deferred:
        """A WebSocket peer and an HTTP peer: 64 MiB each way, at once."""
        return _d(self.both_ways("ws", "http"))

    def test_http_and_http(self) -> Deferred:
        """Two HTTP peers: 64 MiB each way, at once."""
        return _d(self.both_ways("http", "http"))

    def test_paused_reader(self) -> Deferred:
        """
        The HTTP listener's reader pauses for 3 s at 8 MiB: nothing arrives
        during the pause, the writer is held back (it writes no more than the
        session's window beyond what was read), the relay's memory stays
        bounded, and the rest arrives.
        """

        async def run() -> None:
            relay = await start_relay(self, [])
            url = relay.escaped_url
            transfer = Transfer(
                self,
                RelayEndpoints(self.key, url, url),
                SIZE,
                client={"pipe": "http"},
                server={"pipe": "http"},
                receiver={"pause_at": PAUSE_AT, "pause_for": PAUSE_SECONDS},
            )
            before = _rss(relay.pid)
            await transfer.start()
            receiving = await transfer.arrived(PAUSE_AT, within=60)
            # Near the pause's end: how far the writer got while nobody read.
            ahead: list[int] = []
            reactor.callLater(PAUSE_SECONDS - 0.5, lambda: ahead.append(transfer.sender.sent - receiving.received))
            peak: list[int | None] = []
            reactor.callLater(PAUSE_SECONDS - 0.4, lambda: peak.append(_rss(relay.pid)))
            await transfer.ended(within=200)
            self.assertDelivered(transfer)
            self.assertEqual(receiving.during_pause, 0)
            self.assertIsNotNone(receiving.resumed_at)
            log.info(
                "writer ahead by {ahead} during the pause; relay RSS {before} -> {peak}",
                ahead=ahead,
                before=before,
                peak=peak,
            )
            self.assertLessEqual(ahead[0], window() + 4 * MiB, "the paused reader did not hold the writer back")
            if before is not None and peak and peak[0] is not None:
                self.assertLess(peak[0] - before, RELAY_GROWTH_LIMIT, f"relay RSS {before} -> {peak[0]}")

        return _d(run())

    def test_stream_moves_from_websocket_to_http_pipe(self) -> Deferred:
        """
        A stream starts on WebSockets through a proxy; at a quarter of it the
        proxy drops every connection and from then on refuses WebSockets: the
        session resumes over HTTP pipes (pipe=auto finds them by itself) and
        the stream goes on, every byte once and in order, one connection.
        """

        async def run() -> None:
            relay = await start_relay(self, [])
            proxy = InspectingProxy(self)
            extra = f":proxy={proxy.url.replace(':', chr(92) + ':')}"
            url = relay.escaped_url
            transfer = Transfer(self, RelayEndpoints(self.key + extra, url, url), SIZE)
            await transfer.start()
            await transfer.arrived(SIZE // 4, within=60)
            self.assertEqual(proxy.denied, 0)
            proxy.deny_upgrade = True
            proxy.cut()
            await transfer.ended(within=200)
            self.assertDelivered(transfer)
            self.assertGreater(proxy.denied, 0)
            self.assertIn("(HTTP pipe)", relay.output)

        return _d(run())
