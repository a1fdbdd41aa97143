"""
A listener's registration across relay caps (C{session_seconds}), with real
relays: C{twist pluresync-relay --session-seconds 2} (which announces the cap
but ends only pairs at it) and the Vercel function under uvicorn with a 2 s
cap (which ends every socket at it, the listener's control socket too).
Connectors that will not wait for a listener (C{wait=0}: a gap in the
registration would fail them with C{no-listener} at once) keep connecting,
three at a time, while the listener renews its registration again and again.

Every wait is bounded; nothing sleeps.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import TestCase

from pluresync.keys import SyncKey

from .localrelay import Collector, shared_sessions_ended
from .redisserver import start_redis
from .relayprocess import escaped_url, poll, start_relay
from .test_vercel_relay import VercelInstance, _require_servers

log = Logger()

#: How long the connectors keep connecting: about four renewals at a 2 s cap.
SECONDS = 7.0
#: Connectors connecting at once.
LOOPS = 3


async def _listeners(health: Any) -> bool:
    return (await health())["listeners"] == 1


class Echo(Protocol):
    """The listener's protocol: sends back what it gets."""

    #: connected and not yet lost: a session whose relay socket was cut by a
    #: cap during its close waits out its resume limit, so the test's end aborts it
    live: set = set()

    def connectionMade(self) -> None:
        self.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.live.discard(self)

    @classmethod
    def abort_all(cls) -> None:
        for protocol in list(cls.live):
            protocol.transport.abortConnection()


class _RenewalCase(TestCase):
    timeout = 90

    def count_renewals(self) -> list[Any]:
        """The listener's "renewed" log events from now on (at debug level, so counted here)."""
        events: list[Any] = []

        def observe(event: dict[str, Any]) -> None:
            if str(event.get("log_format", "")).startswith("renewed the listener registration"):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    async def ping(self, endpoint: str) -> None:
        """Connect, have one message echoed, close."""
        protocol = await clientFromString(reactor, endpoint).connect(Factory.forProtocol(Collector))
        echoed: Deferred[None] = Deferred()

        def arrived(data: bytes) -> None:
            if protocol.data == b"ping" and not echoed.called:
                echoed.callback(None)

        protocol.dataArrived = arrived
        protocol.transport.write(b"ping")
        try:
            await echoed.addTimeout(10, reactor)
        finally:
            protocol.transport.loseConnection()
        await protocol.lost.addTimeout(10, reactor)

    async def keep_connecting(self, endpoint: str, seconds: float = SECONDS) -> tuple[int, list[str]]:
        """Connect again and again for C{seconds}; how many pings went through, and every failure."""
        done = 0
        failures: list[str] = []
        until = reactor.seconds() + seconds
        while reactor.seconds() < until:
            try:
                await self.ping(endpoint)
                done += 1
            except Exception as error:
                failures.append(f"{type(error).__name__}: {error}")
        return done, failures

    async def stays_registered(
        self, url: str, health: Any, *, connect_url: str | None = None, seconds: float = SECONDS
    ) -> int:
        """
        Listen through C{url}, connect LOOPS at a time for C{seconds} with
        wait=0 (through C{connect_url}, another instance of the same relay,
        if given): every connection must go through, and the relay is left
        with one registration (C{health}: its C{/health}); return the
        renewals seen.
        """
        key = SyncKey.generate().to_text()
        renewals = self.count_renewals()
        endpoint = f"relay:url={url}:key={key}"
        port = await serverFromString(reactor, endpoint).listen(Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        self.addCleanup(Echo.abort_all)
        connecting = f"relay:url={connect_url or url}:key={key}:wait=0"
        results = await gatherResults([ensureDeferred(self.keep_connecting(connecting, seconds)) for _ in range(LOOPS)])
        # The loops' connections were streams of one session, which closes
        # after the last of them (and may have to come back from a cap first).
        await shared_sessions_ended()
        pings = sum(done for done, _ in results)
        failures = [failure for _, loop_failures in results for failure in loop_failures]
        log.info(
            "renewal test through {url}: {pings} connections, {renewals} renewals, failures: {failures}",
            url=url,
            pings=pings,
            renewals=len(renewals),
            failures=failures,
        )
        self.assertEqual(failures, [])
        self.assertGreater(pings, 3 * LOOPS)
        self.assertTrue(port.connected)
        # The registrations it replaced were closed (their close may still be under way).
        await poll(lambda: ensureDeferred(_listeners(health)), timeout=5, what="one listener left at the relay")
        return len(renewals)


class TwistedRelayRenewalTests(_RenewalCase):
    """C{twist pluresync-relay --session-seconds 2}."""

    async def test_listener_stays_registered(self):
        """
        The relay announces a 2 s cap in C{ready}: the listener renews its
        registration every 1.5 s, make-before-break, and no connector is
        ever told no-listener.
        """
        relay = await start_relay(self, ["--session-seconds", "2", "--connections-per-second", "0"])
        renewals = await self.stays_registered(escaped_url(relay.port), relay.health)
        self.assertGreaterEqual(renewals, 3)


class VercelRelayRenewalTests(_RenewalCase):
    """The Vercel function with a 2 s cap (PLURESYNC_MAX_DURATION 3, PLURESYNC_CLOSE_MARGIN 1)."""

    async def test_listener_stays_registered(self):
        """
        The function closes every socket with 1001 2 s after its upgrade,
        the listener's control socket too: the listener has its next
        registration ready before that, and no connector is ever told
        no-listener.
        """
        _require_servers(self)
        redis = await start_redis(self)
        instance = VercelInstance(redis.url, {"PLURESYNC_MAX_DURATION": "3", "PLURESYNC_CLOSE_MARGIN": "1"})
        self.addCleanup(lambda: ensureDeferred(instance.cleanup()))
        await instance.start()
        renewals = await self.stays_registered(escaped_url(instance.port), instance.health)
        self.assertGreaterEqual(renewals, 3)

    async def test_listener_stays_registered_across_instances(self):
        """
        Two instances sharing Redis, the listener on instance 1 and the
        connectors on instance 2, for 12 s (about eight renewals): each
        connector's offer crosses Redis to the listener's instance, where it
        may reach the control socket the listener is replacing; it must
        still be accepted (offered again to the next registration, as one
        instance does for its own connectors), never end in no-listener.
        """
        _require_servers(self)
        redis = await start_redis(self)
        env = {"PLURESYNC_MAX_DURATION": "3", "PLURESYNC_CLOSE_MARGIN": "1"}
        one, two = VercelInstance(redis.url, env), VercelInstance(redis.url, env)
        for instance in (one, two):
            self.addCleanup(lambda i=instance: ensureDeferred(i.cleanup()))
            await instance.start()
        renewals = await self.stays_registered(
            escaped_url(one.port), one.health, connect_url=escaped_url(two.port), seconds=12.0
        )
        self.assertGreaterEqual(renewals, 6)
