"""
A connection pool against a relay's per-address limits (issue 15, item 3),
with real relay processes: the defaults admit a pool of 50 connect()s at
once from one address; clients honour Retry-After on 429 (both the
connector and the listener's accept socket), within their timeout; and when
the wait does not fit, the error says why at once.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pluresync.endpoints.relay import busy_delay
from pluresync.errors import RelayBusyError, RelayError
from pluresync.keys import SyncKey

from .localrelay import Collector
from .relayprocess import start_relay


class PoolTests(TestCase):
    timeout = 90

    async def _pool(self, relay, count: int, timeout: float = 30) -> tuple[list, list, float]:
        # reuse=off: each connect its own relay sockets (with sharing, the
        # connects would be streams of one session, one pair at the relay).
        key = SyncKey.generate().to_text()
        base = f"relay:url={relay.escaped_url}:key={key}"
        port = await serverFromString(reactor, base).listen(Factory.forProtocol(Collector))
        client = f"{base}:wait=10:reuse=off"
        self.addCleanup(port.stopListening)
        started = reactor.seconds()
        results = await DeferredList(
            [
                clientFromString(reactor, f"{client}:timeout={timeout:g}").connect(Factory.forProtocol(Collector))
                for _ in range(count)
            ],
            consumeErrors=True,
        )
        elapsed = reactor.seconds() - started
        connected = [value for ok, value in results if ok]
        failed = [value for ok, value in results if not ok]
        for protocol in connected:
            protocol.transport.loseConnection()
        for protocol in connected:
            await protocol.lost
        return connected, failed, elapsed

    async def test_fifty_at_once_default_limits(self) -> None:
        """50 simultaneous connect()s from one address, default limits: all connect."""
        relay = await start_relay(self)
        connected, failed, elapsed = await self._pool(relay, 50)
        self.assertEqual([f.getErrorMessage() for f in failed], [])
        self.assertEqual(len(connected), 50)
        self.assertLess(elapsed, 30)

    async def test_retry_after_honoured(self) -> None:
        """
        Against tight limits (2 new sockets a second, 3 at once), 6 connects at
        once are refused 429 on some of their connector and accept sockets,
        wait the Retry-After and all connect, within their timeout.
        """
        relay = await start_relay(self, ["--connections-per-second", "2", "--connections-burst", "3"])
        connected, failed, elapsed = await self._pool(relay, 6)
        self.assertEqual([f.getErrorMessage() for f in failed], [])
        self.assertEqual(len(connected), 6)
        metrics = await _metrics(relay)
        self.assertIn('pluresync_relay_refused_total{reason="limit"}', metrics)
        refused = float(metrics.split('pluresync_relay_refused_total{reason="limit"} ')[1].split()[0])
        self.assertGreater(refused, 0)

    async def test_gives_up_at_once_with_the_cause(self) -> None:
        """
        When the relay's Retry-After does not fit in what is left of the
        timeout, connect() fails at once with a RelayBusyError saying 429,
        not with a timeout later.
        """
        relay = await start_relay(self, ["--connections-per-second", "0.05", "--connections-burst", "1"])
        key = SyncKey.generate().to_text()
        base = f"relay:url={relay.escaped_url}:key={key}"
        # The listener's control socket takes the only token.
        port = await serverFromString(reactor, base).listen(Factory.forProtocol(Collector))
        self.addCleanup(port.stopListening)
        started = reactor.seconds()
        with self.assertRaises(RelayBusyError) as caught:
            await clientFromString(reactor, f"{base}:timeout=5").connect(Factory.forProtocol(Collector))
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertEqual(caught.exception.code, "rate-limited")
        self.assertIn("HTTP 429", str(caught.exception))
        self.assertIn("too many connections from this address", str(caught.exception))


class BusyDelayTests(SynchronousTestCase):
    def test_jittered_never_early(self) -> None:
        """The wait is the Retry-After stretched by 0-50 %, never shorter."""
        self.assertEqual(busy_delay(2.0, 0, uniform=lambda a, b: a), 2.0)
        self.assertEqual(busy_delay(2.0, 0, uniform=lambda a, b: b), 3.0)

    def test_without_retry_after(self) -> None:
        """No Retry-After: a doubling delay from 0.25 s."""
        self.assertEqual([busy_delay(None, n, uniform=lambda a, b: a) for n in range(3)], [0.25, 0.5, 1.0])


async def _metrics(relay) -> str:
    import treq

    response = await treq.get(f"http://127.0.0.1:{relay.port}/metrics".encode(), persistent=False)
    return await response.text()


class DeclineTests(TestCase):
    timeout = 60

    async def test_refused_accept_reported_at_once(self) -> None:
        """
        The listener's accept socket is refused (429, Retry-After beyond what
        it may wait): the listener declines on its control socket, and the
        connector fails at once with the real cause, not "the listener did
        not accept in time" at the relay's accept timeout (20 s here).
        """
        relay = await start_relay(
            self, ["--connections-per-second", "0.1", "--connections-burst", "2", "--accept-timeout", "20"]
        )
        key = SyncKey.generate().to_text()
        base = f"relay:url={relay.escaped_url}:key={key}"
        port = await serverFromString(reactor, base).listen(Factory.forProtocol(Collector))
        self.addCleanup(port.stopListening)
        started = reactor.seconds()
        with self.assertRaises(RelayError) as caught:
            await clientFromString(reactor, f"{base}:timeout=25").connect(Factory.forProtocol(Collector))
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertEqual(caught.exception.code, "rate-limited")
        self.assertIn("the listener could not accept", str(caught.exception))
        self.assertIn("HTTP 429", str(caught.exception))
        self.assertIn("declined", relay.output)
