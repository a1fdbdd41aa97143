"""
Streams that outlive their path (issue 9), proven with real relay processes
on 127.0.0.1: an C{auto:} client streams L{STREAM_BYTES} (256 MiB) of a
known pattern to an C{auto:} listener registered on two relays (the
C{azure} and C{vercel} slots), in this process, while the relay carrying
the stream is killed, terminated, stopped, or caps its sessions, or while
the reader pauses for a minute. Each must end with the same sha256 on both
sides, every byte checked in order, exactly one protocol built and one
C{connectionMade} on the listening side, and C{ConnectionDone} on both.

The baseline (no fault) passes on the code before the session layer; the
others fail there, because a stream dies with its path (each failure says
how: e.g. C{stream lost: RelayLostError: ...}). Do not skip or weaken them:
they are the proof the session layer must pass.

C{PLURESYNC_STREAM_TEST_MIB=16} shrinks every transfer for a quick local
run; C{PLURESYNC_STREAM_EXTRA} (tests/streamharness.py, L{SESSION_EXTRA})
adds the session layer's parameters to every endpoint string. Measurements
(time, longest gap in delivery, swaps) go to the log (_trial_temp/test.log).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.trial import unittest

from pluresync.endpoints import pathcache
from pluresync.keys import SyncKey

from .relayprocess import RelayProcess, sockets_closed
from .streamharness import STREAM_BYTES, MiB, Transfer, check_stats, mib, start_relays

log = Logger()

#: Where the fault strikes: 64 MiB into a 256 MiB stream.
FAULT_AT = STREAM_BYTES // 4
#: A relay's session cap in scenario (d), and how many caps the transfer lasts at least.
SESSION_SECONDS = 2.0
CAPS = 5
#: Scenario (f): 64 MiB, the reader pauses at 32 MiB for 60 s (1 s pings).
PAUSED_BYTES = min(64 * MiB, STREAM_BYTES)
PAUSE_SECONDS = float(os.environ.get("PLURESYNC_STREAM_TEST_PAUSE", "60"))
#: How long the stream may take to end after the fault: the rest of the
#: transfer plus a resume (the session layer's resume= default is 30 s).
END_WITHIN = 120.0


def _d(coroutine) -> Deferred:
    return ensureDeferred(coroutine)


class StreamSurvivesPathTests(unittest.TestCase):
    """One stream through real relays, whatever happens to the path under it."""

    def setUp(self) -> None:
        self.key = SyncKey.generate().to_text()
        # A fresh path cache per test: a path remembered by an earlier test
        # would change which relay the stream starts on.
        self.patch(pathcache, "shared", pathcache.PathCache())
        # Runs last (cleanups are LIFO): what is still being torn down must be
        # gone before trial's clean-reactor check.
        self.addCleanup(lambda: _d(sockets_closed(timeout=15)))

    # -- helpers -------------------------------------------------------------------

    def assertDelivered(self, transfer: Transfer) -> None:
        """Every byte once and in order, one connection, a clean end on both sides; log the numbers."""
        receiving = transfer.receiving
        elapsed = transfer.elapsed
        log.info(
            "{size}: {elapsed} s, longest gap in delivery {gap:.3f} s at {at}, "
            "sender paused {pauses} times; {progress}",
            size=mib(transfer.size),
            elapsed=f"{elapsed:.2f}" if elapsed is not None else "-",
            gap=receiving.longest_gap if receiving else 0.0,
            at=mib(receiving.longest_gap_at) if receiving else "-",
            pauses=transfer.sender.pauses if transfer.sender else 0,
            progress=transfer.progress(),
        )
        problems = transfer.problems()
        if problems:
            self.fail("; ".join(problems))
        self.assertEqual(transfer.receiving.sha256, transfer.sender.sha256)
        self.assertEqual((transfer.factory.built, transfer.factory.made), (1, 1))
        check_stats(self, transfer, log.info)

    async def transfer_with_fault(self, fault: Callable[[RelayProcess], Awaitable[None]]) -> Transfer:
        """
        Two relays; once L{FAULT_AT} bytes have arrived, C{fault} strikes the
        relay carrying the stream (as the client's transport names it now);
        then the stream must end cleanly and whole.
        """
        relays = await start_relays(self, self.key)
        transfer = Transfer(self, relays, STREAM_BYTES)
        await transfer.start()
        await transfer.arrived(FAULT_AT, within=60)
        path = transfer.sender.path
        log.info("fault at {at} on {path}", at=mib(transfer.receiving.received), path=path)
        await fault(relays.relay(path))
        await transfer.ended(within=END_WITHIN)
        self.assertDelivered(transfer)
        self.assertNotEqual(transfer.sender.path, path, "the stream still names the failed relay as its path")
        return transfer

    # -- the baseline ----------------------------------------------------------------

    def test_baseline(self) -> Deferred:
        """
        No fault: 256 MiB through the relays arrive whole, on one
        connection, with a clean end on both sides. (Passes before the
        session layer too: it proves the harness.)
        """

        async def run() -> None:
            relays = await start_relays(self, self.key)
            transfer = Transfer(self, relays, STREAM_BYTES)
            await transfer.start()
            await transfer.ended(within=END_WITHIN)
            self.assertDelivered(transfer)

        return _d(run())

    test_baseline.timeout = 180

    # -- (a), (b), (c): the relay carrying the stream fails -----------------------

    def test_relay_killed(self) -> Deferred:
        """
        (a) SIGKILL the relay carrying the stream at 64 MiB (a crash: its
        sockets are reset): the stream goes on through the other relay.
        """

        async def kill(relay: RelayProcess) -> None:
            await Deferred.fromCoroutine(relay.kill()).addTimeout(15, reactor)

        return _d(self.transfer_with_fault(kill))

    test_relay_killed.timeout = 240

    def test_relay_terminated(self) -> Deferred:
        """
        (b) SIGTERM the relay carrying the stream at 64 MiB (a graceful
        shutdown: close 1001 to both sides): the stream goes on through the
        other relay.
        """

        async def terminate(relay: RelayProcess) -> None:
            await Deferred.fromCoroutine(relay.terminate()).addTimeout(15, reactor)

        return _d(self.transfer_with_fault(terminate))

    test_relay_terminated.timeout = 240

    def test_relay_suspended(self) -> Deferred:
        """
        (c) SIGSTOP the relay carrying the stream at 64 MiB (a blackhole: it
        keeps its sockets and answers nothing): the stream notices by a
        missing ack and goes on through the other relay. The relay gets
        SIGCONT at cleanup, before the listener stops, so it can be reaped.
        """

        async def suspend(relay: RelayProcess) -> None:
            relay.suspend()
            self.addCleanup(relay.resume)

        return _d(self.transfer_with_fault(suspend))

    test_relay_suspended.timeout = 240

    # -- (d): session caps ------------------------------------------------------------

    def test_session_seconds_cap(self) -> Deferred:
        """
        (d) One relay with C{--session-seconds 2} ends the session (close
        4029) every 2 s; the sender is paced so the transfer lasts at least
        five caps, and the stream resumes through the same relay each time.
        """

        async def run() -> None:
            relays = await start_relays(
                self, self.key, azure=["--session-seconds", f"{SESSION_SECONDS:g}"], vercel=None
            )
            duration = CAPS * SESSION_SECONDS
            transfer = Transfer(self, relays, STREAM_BYTES, rate=STREAM_BYTES / duration)
            await transfer.start()
            await transfer.ended(within=duration + END_WITHIN)
            self.assertDelivered(transfer)
            self.assertGreaterEqual(transfer.elapsed, (CAPS - 1) * SESSION_SECONDS)
            stats = [s for s in transfer.stats().values() if s is not None]
            if stats:
                self.assertGreaterEqual(max(s["swaps"] for s in stats), CAPS - 2, stats)

        return _d(run())

    test_session_seconds_cap.timeout = 300

    # -- (f): a paused reader -----------------------------------------------------------

    def test_reader_paused(self) -> Deferred:
        """
        (f) With 1 s pings, the reading side pauses its transport for 60 s at
        32 MiB of 64 MiB, then resumes: the connection is still there, no
        byte arrived during the pause, and the rest arrives.
        """

        async def run() -> None:
            relays = await start_relays(self, self.key)
            transfer = Transfer(
                self,
                relays,
                PAUSED_BYTES,
                client={"ping": 1},
                server={"ping": 1},
                receiver={"pause_at": PAUSED_BYTES // 2, "pause_for": PAUSE_SECONDS},
            )
            await transfer.start()
            await transfer.ended(within=PAUSE_SECONDS + END_WITHIN)
            receiving = transfer.receiving
            log.info(
                "paused at {at} for {pause:g} s: resumed {resumed}, {during} bytes arrived during the pause",
                at=mib(receiving.received if receiving.paused_at is None else PAUSED_BYTES // 2),
                pause=PAUSE_SECONDS,
                resumed=receiving.resumed_at is not None,
                during=receiving.during_pause,
            )
            self.assertDelivered(transfer)
            self.assertIsNotNone(receiving.resumed_at, "the reader never resumed")
            self.assertEqual(receiving.during_pause, 0, "bytes arrived while the reader was paused")

        return _d(run())

    test_reader_paused.timeout = PAUSE_SECONDS + 240


class HonestCloseTests(unittest.TestCase):
    """
    Issue 15 #1 (a false clean close): a writer that called
    C{loseConnection()} is told "closed cleanly" only once the reader has
    everything. Before the session layer the writer got C{ConnectionDone}
    5 s after the relay froze with most of the stream undelivered.
    """

    def setUp(self) -> None:
        self.key = SyncKey.generate().to_text()
        self.patch(pathcache, "shared", pathcache.PathCache())
        self.addCleanup(lambda: _d(sockets_closed(timeout=10)))

    def test_frozen_relay_is_not_a_clean_close(self) -> Deferred:
        """
        One relay, frozen (SIGSTOP) while 48 of 64 MiB are still to go; the
        writer has written everything and called C{loseConnection()}. With
        no other path and C{resume=3}, the writer's end is an
        C{UnconfirmedCloseError} that says how much may be undelivered, the
        reader's an error too: neither is C{ConnectionDone}.
        """
        from pluresync.session.session import UnconfirmedCloseError

        async def run() -> None:
            relays = await start_relays(self, self.key, vercel=None)
            size = 64 * MiB
            params = {"resume": "3", "stall": "1"}
            transfer = Transfer(self, relays, size, server=dict(params))
            await transfer.listen()
            writer = _WriteAllThenClose(transfer.pattern, size)
            endpoint = clientFromString(reactor, relays.endpoint(**params))
            await endpoint.connect(Factory.forProtocol(lambda: writer))
            self.addCleanup(lambda: writer.transport.abortConnection() if writer.reason is None else None)
            receiving = await transfer.arrived(16 * MiB, within=60)
            relays.azure.suspend()
            self.addCleanup(relays.azure.resume)
            await gatherResults([writer.ended, receiving.ended]).addTimeout(30, reactor)
            self.assertLess(receiving.received, size)
            self.assertTrue(writer.reason.check(UnconfirmedCloseError), writer.reason)
            self.assertIn("may be undelivered", writer.reason.getErrorMessage())
            self.assertIsNone(receiving.reason.check(ConnectionDone), receiving.reason)

        return _d(run())

    test_frozen_relay_is_not_a_clean_close.timeout = 120


class _WriteAllThenClose(Protocol):
    """Writes C{size} pattern bytes at once (no producer), then C{loseConnection()}: the hostile trial's writer."""

    def __init__(self, pattern, size: int) -> None:
        self._pattern = pattern
        self._size = size
        self.reason = None
        self.ended: Deferred = Deferred()

    def connectionMade(self) -> None:
        for offset in range(0, self._size, MiB):
            self.transport.write(self._pattern.chunk(offset, min(MiB, self._size - offset)))
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.ended.callback(None)
