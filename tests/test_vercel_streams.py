"""
Streams that outlive their path (issue 9), proof (e): the Vercel relay under
uvicorn ends every socket at its maximum duration, and one stream outlives
many of them.

The Vercel function (C{deploy/vercel/api/relay.py}) runs locally under
uvicorn with Redis, as in L{tests.test_vercel_relay}, with a short maximum
duration (C{PLURESYNC_MAX_DURATION} 5 s, C{PLURESYNC_CLOSE_MARGIN} 1 s: it
announces C{session_seconds} 4 and closes each socket with 1001 four seconds
after its upgrade). A C{relay:} client streams L{STREAM_BYTES} (256 MiB;
C{PLURESYNC_STREAM_TEST_MIB} shrinks it) of the harness's pattern to a
C{relay:} listener, paced to last at least L{CAPS} caps, through one instance,
and through two instances sharing Redis (listener on one, client on the
other). The session moves to a fresh relay socket before each cap (rotation)
and the listener renews its registration before its control socket's cap;
the proof is that the receiving side sees every byte once and in order, on
ONE connection (one C{buildProtocol}), both ends close cleanly, the
retransmit buffer stays within its window, the relay side's memory (uvicorn's
peak RSS, Redis's peak) stays far below the stream, and delivery never stops
for as long as a second. A third variant switches the move before the cap
off, so the function's own 1001 at its maximum duration ends the socket
carrying the stream, mid-stream, each time; the session resumes over a fresh
socket and resends what was not acknowledged, to the same standard.

A last, shorter test makes the listener's part strict: with a 2 s cap the
client connects with C{wait=0}, so a rotation that found the listener's
registration missing (between two control sockets) would be refused at once
with C{no-listener} instead of being held by the relay; every rotation must
still be a planned move. (L{tests.test_listener_renewal} proves renewal with
short connections; this proves it while one session keeps rotating through
the same listener.)

Measurements (time, longest gap, swaps, rotations, renewals, peak memory of
the relay processes and Redis) go to the log (_trial_temp/test.log), lines
starting with C{VERCEL-STREAM}.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger, formatEvent, globalLogPublisher

from pluresync.endpoints import pathcache
from pluresync.keys import SyncKey
from pluresync.session.session import Session

from .relayprocess import escaped_url, poll, sockets_closed
from .streamharness import (
    STREAM_BYTES,
    MiB,
    RelayEndpoints,
    Transfer,
    check_stats,
    mib,
)
from .test_vercel_relay import VercelInstance, _VercelCase

log = Logger()

#: The function's maximum duration and close margin: a 4 s cap on every socket.
MAX_DURATION = 5
CLOSE_MARGIN = 1
CAP = MAX_DURATION - CLOSE_MARGIN
#: How many caps the transfer lasts at least (the sender is paced to it).
CAPS = 4
#: The longest a receiver may wait for the next bytes, at any swap.
GAP_LIMIT = 1.0
#: How long the stream may take to end after its paced duration.
END_WITHIN = 120.0
#: What the relay side may hold at its peak while 256 MiB go through: each
#: uvicorn process's resident memory (about 40 MiB idle) and Redis's
#: used_memory_peak (the function keeps a window of 16 messages per direction
#: of a pair in Redis). Far below the stream, so nothing buffers it whole.
UVICORN_PEAK_RSS_LIMIT = 160 * MiB
REDIS_PEAK_LIMIT = 32 * MiB
#: The listener-renewal test: a 2 s cap, a small stream over this many caps.
SHORT_MAX_DURATION = 3
SHORT_CAP = SHORT_MAX_DURATION - CLOSE_MARGIN
SHORT_CAPS = 4
SHORT_BYTES = min(8 * MiB, STREAM_BYTES)


class SessionEvents:
    """
    The session layer's and the relay listener's log lines from now on
    (some are at debug level, so they are counted here, not read from the
    log file), as C{(wall-clock time, side, text)}: the side is C{client} or
    C{listener} for a session's lines (its initiator or responder), C{port}
    for the listening port's.
    """

    NAMESPACES = ("pluresync.session.", "pluresync.endpoints.relaylistener")

    def __init__(self, test: Any) -> None:
        self.events: list[tuple[float, str, str]] = []
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith(self.NAMESPACES):
            initiator = getattr(event.get("log_source"), "initiator", None)
            side = "port" if initiator is None else "client" if initiator else "listener"
            self.events.append((event.get("log_time", time.time()), side, formatEvent(event)))

    def matching(self, *words: str, side: str | None = None) -> list[str]:
        return [
            text for _, on, text in self.events if (side is None or on == side) and all(word in text for word in words)
        ]

    def summary(self) -> dict[str, int]:
        return {
            "rotations": len(self.matching("moving off", "before the relay's session cap", side="client")),
            "planned moves (client)": len(self.matching("now over", "moved while the old", side="client")),
            "planned moves (listener)": len(self.matching("now over", "moved while the old", side="listener")),
            "resumes": len(self.matching("now over", "(resumed)")),
            "links lost": len(self.matching("lost its link over")),
            "reconnects failed": len(self.matching("reconnecting failed")),
            "renewals": len(self.matching("renewed the listener registration", side="port")),
        }

    def unexpected(self) -> list[str]:
        """What a stream that only ever moves before its caps should never log."""
        return self.matching("lost its link over") + self.matching("reconnecting failed") + self.matching("(resumed)")


def peak_rss(instance: VercelInstance) -> int | None:
    """The uvicorn process's peak resident memory (VmHWM), in bytes; None where /proc has none."""
    pid = getattr(instance._transport, "pid", None)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class VercelStreamTests(_VercelCase):
    """One stream through the Vercel function under uvicorn, across its maximum duration, again and again."""

    timeout = 300

    async def setUp(self) -> None:
        self.key = SyncKey.generate()
        # A fresh path cache per test (as in test_streams_process).
        self.patch(pathcache, "shared", pathcache.PathCache())
        # Runs last (cleanups are LIFO).
        self.addCleanup(lambda: ensureDeferred(sockets_closed(timeout=15)))

    def report(self, text: str, **fields: Any) -> None:
        log.info("VERCEL-STREAM " + text, **fields)

    async def relay_memory(self, instances: list[VercelInstance]) -> dict[str, Any]:
        info = await self.redis.command("INFO", "memory")
        text = info.decode() if isinstance(info, bytes) else str(info)
        redis_peak = next(
            (int(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("used_memory_peak:")), None
        )
        return {"uvicorn_peak_rss": [peak_rss(i) for i in instances], "redis_used_memory_peak": redis_peak}

    def assertWhole(self, transfer: Transfer, events: SessionEvents, cap: float) -> dict[str, Any]:
        """Every byte once and in order on one connection, clean ends, bounded buffers; return the numbers."""
        receiving, sender = transfer.receiving, transfer.sender
        stats = transfer.stats()
        numbers = {
            "size": mib(transfer.size),
            "elapsed": transfer.elapsed,
            "longest_gap": receiving.longest_gap if receiving else None,
            "longest_gap_at": mib(receiving.longest_gap_at) if receiving else None,
            "sender_pauses": sender.pauses if sender else None,
            "cap": cap,
            "stats": stats,
            "events": events.summary(),
            "progress": transfer.progress(),
        }
        self.report("{numbers}", numbers=numbers)
        problems = transfer.problems()
        if problems:
            self.fail("; ".join(problems) + f"\nsession events: {events.events}")
        self.assertEqual(receiving.sha256, sender.sha256)
        self.assertEqual((transfer.factory.built, transfer.factory.made), (1, 1))
        self.assertEqual(len(transfer.factory.protocols), 1)
        check_stats(self, transfer, log.info)
        sender_stats = stats["sender"]
        self.assertIsNotNone(sender_stats, "the client's transport has no stats(): no session layer")
        self.assertGreaterEqual(
            sender_stats["swaps"], 2, f"the stream moved {sender_stats['swaps']} times across {transfer.elapsed} s"
        )
        self.assertLess(
            receiving.longest_gap,
            GAP_LIMIT,
            f"delivery stopped for {receiving.longest_gap:.3f} s at {mib(receiving.longest_gap_at)}; "
            f"session events: {events.events}",
        )
        return numbers

    async def stream_across_caps(self, instances: list[VercelInstance]) -> tuple[dict[str, Any], SessionEvents]:
        """
        L{STREAM_BYTES} from a client through C{instances[-1]} to a listener
        through C{instances[0]}, paced to last L{CAPS} caps.
        """
        events = SessionEvents(self)
        relays = RelayEndpoints(self.key.to_text(), escaped_url(instances[0].port), escaped_url(instances[-1].port))
        duration = CAPS * CAP
        transfer = Transfer(self, relays, STREAM_BYTES, rate=STREAM_BYTES / duration)
        started = time.monotonic()
        await transfer.start()
        await transfer.ended(within=duration + END_WITHIN)
        numbers = self.assertWhole(transfer, events, CAP)
        self.assertGreaterEqual(transfer.elapsed, (CAPS - 1) * CAP)
        memory = await self.relay_memory(instances)
        for rss in memory["uvicorn_peak_rss"]:
            if rss is not None:
                self.assertLess(rss, UVICORN_PEAK_RSS_LIMIT, memory)
        if memory["redis_used_memory_peak"] is not None:
            self.assertLess(memory["redis_used_memory_peak"], REDIS_PEAK_LIMIT, memory)
        self.report(
            "{mib} through {n} instance(s) in {s:.1f} s (wall {wall:.1f} s): longest gap {gap:.3f} s at {at}, "
            "swaps {swaps}, events {events}, memory {memory}",
            mib=mib(transfer.size),
            n=len(instances),
            s=transfer.elapsed,
            wall=time.monotonic() - started,
            gap=transfer.receiving.longest_gap,
            at=mib(transfer.receiving.longest_gap_at),
            swaps={side: s["swaps"] if s else None for side, s in numbers["stats"].items()},
            events=numbers["events"],
            memory=memory,
        )
        return numbers, events

    async def test_one_instance(self):
        """
        (e) 256 MiB through one instance whose every socket ends 4 s after
        its upgrade, paced over 16 s: the stream moves to a fresh socket
        before each cap, whole and in order, on one connection.
        """
        instances = await self.start_instances(
            1, {"PLURESYNC_MAX_DURATION": str(MAX_DURATION), "PLURESYNC_CLOSE_MARGIN": str(CLOSE_MARGIN)}
        )
        await self.stream_across_caps(instances)

    async def test_two_instances(self):
        """
        (e) The same across two instances sharing Redis: the listener
        registers (and renews) through instance 1, the client connects (and
        rotates) through instance 2, so every socket pair crosses Redis.
        """
        instances = await self.start_instances(
            2, {"PLURESYNC_MAX_DURATION": str(MAX_DURATION), "PLURESYNC_CLOSE_MARGIN": str(CLOSE_MARGIN)}
        )
        await self.stream_across_caps(instances)

    async def test_cap_reached(self):
        """
        (e) The relay itself ends the socket carrying the stream: with the
        session's move before the cap switched off (as if the move had
        failed, or the client's clock ran late), every socket is closed
        with 1001 at the function's maximum duration, mid-stream, and the
        session resumes over a fresh socket, resending what was not
        acknowledged: still whole, in order, on one connection, with no
        gap of a second.
        """
        # Test-only: no rotation, so the relay's close is what moves the stream.
        self.patch(Session, "_scheduleRotation", lambda session, state: None)
        instances = await self.start_instances(
            1, {"PLURESYNC_MAX_DURATION": str(MAX_DURATION), "PLURESYNC_CLOSE_MARGIN": str(CLOSE_MARGIN)}
        )
        numbers, events = await self.stream_across_caps(instances)
        summary = numbers["events"]
        self.assertEqual(summary["rotations"], 0, summary)
        ended = events.matching("lost its link over", "going away", side="client")
        self.assertGreaterEqual(len(ended), 2, events.events)
        self.assertGreaterEqual(len(events.matching("now over", "(resumed)", side="client")), 2, events.events)

    async def test_listener_registered_while_session_rotates(self):
        """
        A 2 s cap; a small stream paced over four caps, the client with
        C{wait=0}: each rotation is a new pairing through the one listener,
        whose control socket is itself replaced every 1.5 s. A rotation that
        fell between two registrations would be refused (no-listener) and the
        link would then die at its cap: instead every rotation is a planned
        move, no link is lost, the listener renewed at least three times and
        is left with one registration.
        """
        await self.listener_registered_while_session_rotates(1)

    async def test_listener_registered_across_instances_while_session_rotates(self):
        """
        The same with the listener on instance 1 and the client on instance
        2: every rotation's offer crosses Redis to the listener's instance,
        and must survive the listener replacing its control socket there.
        """
        await self.listener_registered_while_session_rotates(2)

    async def listener_registered_while_session_rotates(self, count: int) -> None:
        instances = await self.start_instances(
            count, {"PLURESYNC_MAX_DURATION": str(SHORT_MAX_DURATION), "PLURESYNC_CLOSE_MARGIN": str(CLOSE_MARGIN)}
        )
        events = SessionEvents(self)
        relays = RelayEndpoints(self.key.to_text(), escaped_url(instances[0].port), escaped_url(instances[-1].port))
        duration = SHORT_CAPS * SHORT_CAP
        transfer = Transfer(self, relays, SHORT_BYTES, rate=SHORT_BYTES / duration, client={"wait": 0})
        await transfer.start()
        await transfer.ended(within=duration + END_WITHIN)
        numbers = self.assertWhole(transfer, events, SHORT_CAP)
        summary = numbers["events"]
        self.report("listener renewal while rotating ({n} instance(s)): {summary}", n=count, summary=summary)
        self.assertEqual(events.unexpected(), [], f"session events: {events.events}")
        self.assertGreaterEqual(summary["rotations"], SHORT_CAPS - 1, summary)
        self.assertEqual(summary["planned moves (client)"], summary["rotations"], events.events)
        self.assertEqual(summary["planned moves (listener)"], summary["rotations"], events.events)
        self.assertGreaterEqual(summary["renewals"], SHORT_CAPS - 1, summary)
        self.assertTrue(transfer.port.connected)

        async def one_listener() -> bool:
            return (await instances[0].health())["listeners"] == 1

        await poll(one_listener, timeout=5, what="one listener registration left at the relay")
