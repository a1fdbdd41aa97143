"""
Failover of C{auto:} endpoints between two real relay processes on
127.0.0.1: the primary (the C{azure} slot) refusing, blackholed, killed,
shutting down, hung, and both relays down; the backup (the C{vercel} slot)
taking over; a racing client leaving nothing behind.

Timing bounds are generous (CI machines are slow and shared); the measured
times are logged (C{twisted.logger}, in _trial_temp/test.log) for the
benchmark's reader.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.trial import unittest

from pluresync.endpoints import pathcache
from pluresync.endpoints.auto import AutoConnectError, AutoTimeoutError
from pluresync.keys import SyncKey

from .localrelay import Collector
from .relayprocess import Blackhole, RelayProcess, escaped_url, free_port, poll, sockets_closed, start_relay

log = Logger()

AZURE = "relay:azure"
VERCEL = "relay:vercel"
#: The head start used by most tests.
DELAY = 0.3
#: The race's deadline: every failover must be far below it.
TIMEOUT = 10.0


def _d(coroutine) -> Deferred:
    return ensureDeferred(coroutine)


class Served(Factory):
    """The listener's factory: a L{Collector} per peer, counted."""

    def __init__(self) -> None:
        self.built: list[Collector] = []
        self._waiters: list[tuple[int, Deferred]] = []

    def buildProtocol(self, addr) -> Collector:
        protocol = Collector()
        protocol.factory = self
        protocol.address = addr
        self.built.append(protocol)
        for waiter in [w for w in self._waiters if len(self.built) >= w[0]]:
            self._waiters.remove(waiter)
            waiter[1].callback(protocol)
        return protocol

    def count_reaches(self, n: int) -> Deferred:
        """Fires once C{buildProtocol} has been called C{n} times."""
        d: Deferred = Deferred()
        if len(self.built) >= n:
            d.callback(self.built[n - 1])
        else:
            self._waiters.append((n, d))
        return d


class FailoverTests(unittest.TestCase):
    """C{auto:} endpoints when one relay (or both) fails, with real relay processes."""

    timeout = 180

    def setUp(self) -> None:
        self.key = SyncKey.generate().to_text()
        # A fresh path cache per test: a winner remembered by an earlier
        # test (or connection) would change which path is tried first.
        self.patch(pathcache, "shared", pathcache.PathCache())
        self.protocols: list[Collector] = []
        self.served: list[Served] = []
        self._closer = False
        # Runs last (cleanups are LIFO): whatever is still being torn down
        # must be gone before trial's clean-reactor check.
        self.addCleanup(lambda: _d(sockets_closed(timeout=10)))

    # -- helpers ----------------------------------------------------------------

    def auto(self, azure: str, vercel: str, **params: Any) -> str:
        # Failover between relays: a LAN path (this host's own listener,
        # found by mDNS) would win every race.
        params.setdefault("direct", "off")
        extra = "".join(f":{name}={value}" for name, value in params.items())
        return f"auto:key={self.key}:azure={azure}:vercel={vercel}{extra}"

    async def two_relays(self) -> tuple[RelayProcess, RelayProcess]:
        """Start the primary and the backup at the same time."""
        azure, vercel = await gatherResults([_d(start_relay(self)), _d(start_relay(self))])
        return azure, vercel

    def track(self, protocol: Collector) -> Collector:
        """Close C{protocol} at cleanup (after the test, before the relays die)."""
        self.protocols.append(protocol)
        if not self._closer:
            self._addCloser()
        return protocol

    def _addCloser(self) -> None:
        self._closer = True
        self.addCleanup(lambda: _d(self._closeProtocols()))

    async def _closeProtocols(self) -> None:
        for served in self.served:
            self.protocols.extend(p for p in served.built if p not in self.protocols)
        for protocol in self.protocols:
            if not protocol.lost.called and protocol.transport is not None:
                protocol.transport.abortConnection()
        for protocol in self.protocols:
            await protocol.lost.addTimeout(10, reactor)

    async def listen(self, description: str) -> tuple[Any, Served]:
        """Listen with C{description}; stopped at cleanup."""
        served = Served()
        port = await serverFromString(reactor, description).listen(served)
        self.addCleanup(port.stopListening)
        self.served.append(served)
        # Registered after stopListening's cleanup, so it runs before it.
        self._addCloser()
        return port, served

    async def connect(self, description: str) -> tuple[Collector, float]:
        """Connect with C{description}; the protocol and the seconds it took."""
        started = reactor.seconds()
        protocol = await clientFromString(reactor, description).connect(Factory.forProtocol(Collector))
        elapsed = reactor.seconds() - started
        self.track(protocol)
        return protocol, elapsed

    async def connect_fails(self, description: str) -> tuple[Exception, float]:
        started = reactor.seconds()
        try:
            protocol = await clientFromString(reactor, description).connect(Factory.forProtocol(Collector))
        except Exception as e:
            return e, reactor.seconds() - started
        self.track(protocol)
        self.fail(f"connect() succeeded through {protocol.transport.getPeer().transport}")

    async def echo(self, client: Collector, served: Served, index: int) -> None:
        """Prove the connection carries bytes: the listener's protocol gets them."""
        server = await served.count_reaches(index).addTimeout(10, reactor)
        self.track(server)
        got: Deferred = Deferred()
        server.dataArrived = lambda data: None if got.called or server.data != b"ping" else got.callback(None)
        client.transport.write(b"ping")
        await got.addTimeout(10, reactor)

    async def survives(self, client: Collector, server: Collector, path: str, within: float) -> float:
        """
        The session of C{client} moves to C{path} within C{within} seconds and
        still carries bytes to the same listener protocol (no new one, no
        connectionLost); the seconds the move took.
        """
        started = reactor.seconds()
        await poll(
            lambda: client.transport.getPeer().transport == path,
            timeout=within,
            interval=0.02,
            what=f"moving to {path}",
        )
        moved = reactor.seconds() - started
        got: Deferred = Deferred()
        marker = b"still here"
        server.dataArrived = lambda data: None if got.called or not server.data.endswith(marker) else got.callback(None)
        client.transport.write(marker)
        await got.addTimeout(10, reactor)
        self.assertFalse(client.lost.called)
        self.assertFalse(server.lost.called)
        return moved

    # -- 1. refused ---------------------------------------------------------------

    def test_primary_refuses(self) -> Deferred:
        """
        Nothing listens on the primary's port: the refusal hands the turn to
        the backup at once (no head-start wait), the client connects through
        it well within delay + 2 s, and its peer address names the backup.
        """

        async def run() -> None:
            vercel = await start_relay(self)
            dead = escaped_url(free_port())
            port, served = await self.listen(self.auto(dead, vercel.escaped_url, timeout=TIMEOUT))
            self.assertEqual(port.transports, {AZURE: False, VERCEL: True})
            client, elapsed = await self.connect(self.auto(dead, vercel.escaped_url, delay=DELAY, timeout=TIMEOUT))
            log.info("refused primary: connected through the backup in {elapsed:.3f} s", elapsed=elapsed)
            self.assertEqual(client.transport.getPeer().transport, VERCEL)
            self.assertLess(elapsed, DELAY + 2)
            self.assertLess(elapsed, TIMEOUT / 4)
            await self.echo(client, served, 1)
            self.assertEqual(served.built[0].transport.getPeer().transport, VERCEL)

            # Fail fast: with a head start far longer than a pairing, a
            # refused primary still costs nothing.
            self.patch(pathcache, "shared", pathcache.PathCache())
            client, elapsed = await self.connect(self.auto(dead, vercel.escaped_url, delay=5, timeout=TIMEOUT))
            log.info("refused primary, delay=5: connected in {elapsed:.3f} s", elapsed=elapsed)
            self.assertEqual(client.transport.getPeer().transport, VERCEL)
            self.assertLess(elapsed, 2.5)

        return _d(run())

    # -- 2. blackholed --------------------------------------------------------------

    def test_primary_blackholed(self) -> Deferred:
        """
        The primary accepts TCP and never answers: the backup starts after
        the head start and wins (elapsed >= delay, far below the timeout),
        and the client then closes its socket to the blackhole: no
        half-open connection is left behind.
        """

        async def run() -> None:
            vercel = await start_relay(self)
            hole = Blackhole(self)
            await self.listen(self.auto(hole.escaped_url, vercel.escaped_url, relays="vercel", timeout=TIMEOUT))
            arrived = hole.next_connection()
            client, elapsed = await self.connect(
                self.auto(hole.escaped_url, vercel.escaped_url, delay=DELAY, timeout=TIMEOUT)
            )
            log.info("blackholed primary: connected through the backup in {elapsed:.3f} s", elapsed=elapsed)
            self.assertEqual(client.transport.getPeer().transport, VERCEL)
            self.assertGreaterEqual(elapsed, DELAY - 0.01)
            self.assertLess(elapsed, DELAY + 2)
            self.assertLess(elapsed, TIMEOUT / 4)
            connection = await arrived.addTimeout(5, reactor)
            self.assertIn(b"GET / HTTP/1.1", connection.received)
            self.assertEqual(len(hole.connections), 1)
            await connection.lost.addTimeout(5, reactor)
            self.assertEqual(hole.open_connections, [])

        return _d(run())

    # -- 3. killed, restarted ---------------------------------------------------------

    def test_streams_of_one_session_survive_the_primary_killed(self) -> Deferred:
        """
        Three connects from the same C{auto:} string are three streams of
        one session; SIGKILL the primary: the session moves to the backup
        and every stream carries on, to the same listener protocols.
        """

        async def run() -> None:
            azure, vercel = await self.two_relays()
            port, served = await self.listen(self.auto(azure.escaped_url, vercel.escaped_url, timeout=TIMEOUT))
            await poll(lambda: all(port.transports.values()), timeout=10, what="registering on both relays")
            string = self.auto(azure.escaped_url, vercel.escaped_url, delay=2, timeout=TIMEOUT)
            clients = [(await self.connect(string))[0] for _ in range(3)]
            self.assertEqual(len({id(c.transport.session) for c in clients}), 1)
            self.assertEqual(sorted(c.transport.stream_id for c in clients), [0, 2, 4])
            for index, client in enumerate(clients, 1):
                await self.echo(client, served, index)
            servers = {p.transport.stream_id: p for p in served.built}
            await azure.kill()
            for client in clients:
                await self.survives(client, servers[client.transport.stream_id], VERCEL, within=5)
            self.assertEqual(len(served.built), 3)

        return Deferred.fromCoroutine(run())

    def test_primary_killed_and_restarted(self) -> Deferred:
        """
        SIGKILL the primary while an C{auto:} listener is registered on both
        relays: a connection through it moves to the backup (the session
        resumes there), a new client connects through the backup at once;
        after the primary is
        restarted on the same port, the listener registers there again by
        itself, and a client that may use only the primary connects.
        """

        async def run() -> None:
            azure, vercel = await self.two_relays()
            port, served = await self.listen(self.auto(azure.escaped_url, vercel.escaped_url, timeout=TIMEOUT))
            await poll(lambda: all(port.transports.values()), timeout=10, what="registering on both relays")
            before, _ = await self.connect(self.auto(azure.escaped_url, vercel.escaped_url, delay=2, timeout=TIMEOUT))
            self.assertEqual(before.transport.getPeer().transport, AZURE)
            await self.echo(before, served, 1)

            await azure.kill()
            killed = reactor.seconds()
            moved = await self.survives(before, served.built[0], VERCEL, within=5)
            log.info("killed primary: the session moved to the backup in {t:.3f} s", t=moved)

            client, elapsed = await self.connect(
                self.auto(azure.escaped_url, vercel.escaped_url, delay=DELAY, timeout=TIMEOUT)
            )
            log.info("killed primary: connected through the backup in {elapsed:.3f} s", elapsed=elapsed)
            self.assertEqual(client.transport.getPeer().transport, VERCEL)
            self.assertLess(elapsed, DELAY + 2)
            await self.echo(client, served, 2)
            await poll(lambda: not port.transports[AZURE], timeout=5, what="the listener noticing the kill")
            self.assertTrue(port.transports[VERCEL])

            await azure.restart()
            restarted = reactor.seconds()
            # Backoff from 1 s (±20 %), doubling while the relay was down:
            # about 1 + 2 + 4 s at worst while it restarts, then one more try.
            await poll(lambda: port.transports[AZURE], timeout=30, interval=0.1, what="re-registering on the primary")
            log.info(
                "listener back on the restarted primary {back:.2f} s after the restart, {total:.2f} s after the kill",
                back=reactor.seconds() - restarted,
                total=reactor.seconds() - killed,
            )
            health = await azure.health()
            self.assertEqual(health["listeners"], 1)

            self.patch(pathcache, "shared", pathcache.PathCache())
            only, _ = await self.connect(
                self.auto(azure.escaped_url, vercel.escaped_url, relays="azure", delay=DELAY, timeout=TIMEOUT)
            )
            self.assertEqual(only.transport.getPeer().transport, AZURE)
            await self.echo(only, served, 3)

        return _d(run())

    # -- 4. graceful shutdown --------------------------------------------------------

    def test_primary_shuts_down(self) -> Deferred:
        """
        SIGTERM the primary (it closes every WebSocket with 1001): a
        connection through it moves to the backup at once, the same
        protocols on both sides; new clients fail over to the backup at once.
        """

        async def run() -> None:
            azure, vercel = await self.two_relays()
            port, served = await self.listen(self.auto(azure.escaped_url, vercel.escaped_url, timeout=TIMEOUT))
            await poll(lambda: all(port.transports.values()), timeout=10, what="registering on both relays")
            before, _ = await self.connect(self.auto(azure.escaped_url, vercel.escaped_url, delay=2, timeout=TIMEOUT))
            self.assertEqual(before.transport.getPeer().transport, AZURE)
            await self.echo(before, served, 1)
            server_side = served.built[0]

            azure.signal("TERM")
            moved = await self.survives(before, server_side, VERCEL, within=2)
            log.info("SIGTERM: the session moved to the backup in {t:.3f} s", t=moved)

            # At once, while the primary may still be on its way out.
            client, elapsed = await self.connect(
                self.auto(azure.escaped_url, vercel.escaped_url, delay=DELAY, timeout=TIMEOUT)
            )
            log.info("SIGTERM'd primary: new client through the backup in {elapsed:.3f} s", elapsed=elapsed)
            self.assertEqual(client.transport.getPeer().transport, VERCEL)
            self.assertLess(elapsed, DELAY + 1.5)
            await self.echo(client, served, 2)
            status = await azure.ended().addTimeout(15, reactor)
            self.assertNotIn("Traceback", azure.output)
            self.assertIn(status[1], (None, 15))

        return _d(run())

    # -- 5. both down ----------------------------------------------------------------

    def test_both_refused(self) -> Deferred:
        """
        Both relays killed: C{connect()} fails fast with one
        C{AutoConnectError} that names both paths and why each failed.
        """

        async def run() -> None:
            azure, vercel = await self.two_relays()
            await gatherResults([_d(azure.kill()), _d(vercel.kill())])
            error, elapsed = await self.connect_fails(
                self.auto(azure.escaped_url, vercel.escaped_url, delay=DELAY, timeout=TIMEOUT)
            )
            log.info("both relays down: failed after {elapsed:.3f} s: {e}", elapsed=elapsed, e=error)
            self.assertIsInstance(error, AutoConnectError)
            self.assertLess(elapsed, TIMEOUT / 2)
            self.assertEqual([name for name, _ in error.attempts], [AZURE, VERCEL])
            message = str(error)
            for name, relay in ((AZURE, azure), (VERCEL, vercel)):
                self.assertIn(f"{name}: could not reach the relay at 127.0.0.1:{relay.port}", message)
            for name, why in error.attempts:
                self.assertIn("refused", why, name)

        return _d(run())

    def test_refused_costs_nothing(self) -> Deferred:
        """
        A refused path fails over at once: with both paths refused and a
        head start of 5 s, C{connect()} fails within a fraction of a second.
        """

        async def run() -> None:
            dead1, dead2 = escaped_url(free_port()), escaped_url(free_port())
            error, elapsed = await self.connect_fails(self.auto(dead1, dead2, delay=5, timeout=TIMEOUT))
            log.info("both refused, delay=5: failed after {elapsed:.3f} s", elapsed=elapsed)
            self.assertIsInstance(error, AutoConnectError)
            self.assertLess(elapsed, 0.2)

        return _d(run())

    def test_both_blackholed(self) -> Deferred:
        """
        Both relays blackholed: C{connect()} fails with
        C{AutoTimeoutError} when the total timeout passes (not before, not
        much later), naming both paths; both sockets are closed.
        """

        async def run() -> None:
            primary, backup = Blackhole(self), Blackhole(self)
            timeout = 2.0
            error, elapsed = await self.connect_fails(
                self.auto(primary.escaped_url, backup.escaped_url, delay=DELAY, timeout=timeout)
            )
            log.info("both relays blackholed: failed after {elapsed:.3f} s: {e}", elapsed=elapsed, e=error)
            self.assertIsInstance(error, AutoConnectError)
            self.assertIsInstance(error, AutoTimeoutError)
            self.assertGreaterEqual(elapsed, timeout - 0.01)
            self.assertLess(elapsed, timeout + 2)
            self.assertEqual([name for name, _ in error.attempts], [AZURE, VERCEL])
            for name, why in error.attempts:
                self.assertRegex(why, r"timed out after 2 s|no answer within 2 s", name)
            self.assertIn(AZURE, str(error))
            self.assertIn(VERCEL, str(error))
            for hole in (primary, backup):
                self.assertEqual(len(hole.connections), 1)
                await hole.connections[0].lost.addTimeout(5, reactor)

        return _d(run())

    # -- 6. keepalive -----------------------------------------------------------------

    def test_keepalive_notices_hung_relay(self) -> Deferred:
        """
        A relay that stops answering (SIGSTOP) is noticed by the session's
        own liveness within C{stall=} seconds and the connection moves to
        the backup; with C{ping=1} the listener shows that path down; after
        SIGCONT the listener registers there again.
        """

        async def run() -> None:
            azure, vercel = await self.two_relays()
            port, served = await self.listen(self.auto(azure.escaped_url, vercel.escaped_url, ping=1, timeout=TIMEOUT))
            await poll(lambda: all(port.transports.values()), timeout=10, what="registering on both relays")
            client, _ = await self.connect(
                self.auto(azure.escaped_url, vercel.escaped_url, ping=1, delay=2, timeout=TIMEOUT)
            )
            self.assertEqual(client.transport.getPeer().transport, AZURE)
            await self.echo(client, served, 1)
            server_side = served.built[0]

            stopped = reactor.seconds()
            azure.suspend()
            self.addCleanup(azure.resume)
            noticed = await self.survives(client, server_side, VERCEL, within=5)
            log.info("SIGSTOP: the session moved to the backup after {t:.3f} s", t=noticed)
            self.assertEqual(len(served.built), 1)
            await poll(lambda: not port.transports[AZURE], timeout=5, what="the listener noticing the hung relay")
            down = reactor.seconds() - stopped
            log.info("SIGSTOP: listener noticed after {t:.3f} s", t=down)
            self.assertLess(down, 5)
            self.assertTrue(port.transports[VERCEL])

            # Meanwhile the backup serves.
            other, elapsed = await self.connect(
                self.auto(azure.escaped_url, vercel.escaped_url, ping=1, delay=DELAY, timeout=TIMEOUT)
            )
            self.assertEqual(other.transport.getPeer().transport, VERCEL)
            self.assertLess(elapsed, DELAY + 2)

            azure.resume()
            resumed = reactor.seconds()
            await poll(lambda: port.transports[AZURE], timeout=30, interval=0.1, what="re-registering after SIGCONT")
            log.info("SIGCONT: listener back after {t:.3f} s", t=reactor.seconds() - resumed)

        return _d(run())

    # -- 7. race cleanliness -------------------------------------------------------------

    def test_race_leaves_nothing(self) -> Deferred:
        """
        Both relays up and C{delay=0} (both paths start together), five
        connections: each reaches the listener's factory exactly once (the
        losing path is closed before the listener builds anything), and the
        relays hold exactly the five winning sessions, then none once they
        are closed.
        """

        async def run() -> None:
            azure, vercel = await self.two_relays()
            port, served = await self.listen(self.auto(azure.escaped_url, vercel.escaped_url, timeout=TIMEOUT))
            await poll(lambda: all(port.transports.values()), timeout=10, what="registering on both relays")
            winners = []
            clients = []
            for i in range(5):
                client, _ = await self.connect(
                    # reuse=off: five races, five sessions (not five streams of one)
                    self.auto(azure.escaped_url, vercel.escaped_url, delay=0, timeout=TIMEOUT, reuse="off")
                )
                clients.append(client)
                winners.append(client.transport.getPeer().transport)
                server = await served.count_reaches(i + 1).addTimeout(10, reactor)
                self.assertEqual(server.address.transport, winners[-1])
                self.assertEqual(len(served.built), i + 1)
            log.info("delay=0 race winners: {winners}", winners=winners)

            async def counts() -> tuple[int, int]:
                a, v = await gatherResults([_d(azure.health()), _d(vercel.health())])
                return a["sessions"] + v["sessions"], a["pending"] + v["pending"]

            async def settled(want: int) -> bool:
                return await counts() == (want, 0)

            await poll(lambda: _d(settled(5)), timeout=10, interval=0.1, what="five sessions, none pending")
            self.assertEqual(len(served.built), 5)
            for client in clients:
                client.transport.loseConnection()
            for client in clients:
                await client.lost.addTimeout(10, reactor)
            await poll(lambda: _d(settled(0)), timeout=10, interval=0.1, what="no sessions left on the relays")
            self.assertEqual(len(served.built), 5)

        return _d(run())
