"""
Real relays and dead relays on 127.0.0.1 for failover tests, driven by
Deferreds (no sleeps).

 - L{RelayProcess}: a real C{twist pluresync-relay} child process on a free
   port. C{start()} fires once C{/health} answers; C{terminate()} (SIGTERM,
   graceful: 1001 to every client), C{kill()} (SIGKILL, a crash),
   C{suspend()}/C{resume()} (SIGSTOP/SIGCONT, a hung relay), and
   C{restart()} on the same port.
 - L{Blackhole}: a TCP server that accepts connections and never answers
   (a relay behind a firewall that drops, or a wedged one), and records
   every connection's end, so a test can prove nobody left it half open.
 - L{poll}: wait (bounded) until a condition holds, re-checking with
   C{reactor.callLater}.
 - L{sockets_closed}: wait (bounded) until no TCP connection is left in
   the reactor, so trial's clean-reactor check sees what the code left, not
   what is still being torn down.

Nothing here sleeps: every wait is a Deferred with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool, readBody

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def escaped_url(port: int) -> str:
    """C{ws://127.0.0.1:PORT} escaped for an endpoint string."""
    return f"ws\\://127.0.0.1\\:{port}"


async def poll(
    check: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "the condition",
) -> Any:
    """
    Call C{check} (it may return a Deferred/coroutine) until it returns a
    true value, every C{interval} seconds for at most C{timeout} seconds;
    return that value, or raise C{AssertionError} naming C{what}.
    """
    start = reactor.seconds()
    last = None
    for _ in range(int(timeout / interval) + 2):
        last = check()
        if isinstance(last, (Deferred, Awaitable)):
            last = await last
        if last:
            return last
        if reactor.seconds() - start >= timeout:
            break
        await deferLater(reactor, interval, lambda: None)
    raise AssertionError(f"{what} did not happen within {timeout:g} s (last: {last!r})")


def _open_tcp() -> list:
    return [s for s in (*reactor.getReaders(), *reactor.getWriters()) if isinstance(s, (tcp.Client, tcp.Server))]


async def sockets_closed(timeout: float = 5.0) -> None:
    """Wait until the reactor holds no TCP connection (listening ports aside)."""
    await poll(lambda: not _open_tcp(), timeout=timeout, interval=0.02, what="closing every TCP connection")


class _Output(ProcessProtocol):
    """Keeps a relay's output; C{ended} fires with (exit code, signal)."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        del self.output[:-200_000]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))


class RelayProcess:
    """
    One C{python -m twisted pluresync-relay} process on 127.0.0.1.

    Use C{await relay.start()}; register C{relay.cleanup} with C{addCleanup}
    (L{start_relay} does both). The port stays the same across
    L{restart}s, so endpoint strings made from L{url} stay valid.

    @ivar port: the TCP port it listens on.
    @ivar generation: how many times it was started.
    """

    #: How long a start may take before it counts as failed (a cold start
    #: under load takes a few seconds: the plugin scan, Autobahn, NaCl).
    start_timeout = 30.0

    def __init__(self, port: int | None = None, extra: list[str] = ()) -> None:
        self.port = port if port is not None else free_port()
        self.extra = list(extra)
        self.generation = 0
        self._protocol: _Output | None = None
        self._transport = None
        self._suspended = False

    # -- what clients use --------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def escaped_url(self) -> str:
        return escaped_url(self.port)

    @property
    def output(self) -> str:
        """Everything the current (or last) process printed."""
        return self._protocol.output.decode(errors="replace") if self._protocol else ""

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.ended.called

    @property
    def pid(self) -> int | None:
        return self._transport.pid if self.running else None

    # -- life cycle ----------------------------------------------------------

    async def start(self, *, retry_ports: int = 3) -> RelayProcess:
        """
        Spawn the relay and wait until C{/health} answers. If the process
        exits first (its port was taken between L{free_port} and its bind),
        try again on a fresh port, up to C{retry_ports} times, but only on
        the first start: a restart must keep its port.
        """
        for attempt in range(retry_ports + 1):
            self._spawn()
            try:
                await self._wait_healthy()
                return self
            except _ExitedEarly:
                if self.generation > 1 or attempt == retry_ports:
                    raise AssertionError(f"the relay on port {self.port} exited early:\n{self.output}") from None
                self.generation -= 1
                self.port = free_port()
        raise AssertionError("unreachable")

    async def restart(self) -> RelayProcess:
        """Start again on the same port (the previous process must have ended)."""
        assert not self.running, "restart() needs the previous process to have ended"
        self._spawn()
        try:
            await self._wait_healthy()
        except _ExitedEarly:
            raise AssertionError(f"the relay did not restart on port {self.port}:\n{self.output}") from None
        return self

    def _spawn(self) -> None:
        self.generation += 1
        self._protocol = _Output()
        self._suspended = False
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        args = [
            sys.executable,
            "-m",
            "twisted",
            "--log-format",
            "text",
            "pluresync-relay",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            *self.extra,
        ]
        self._transport = reactor.spawnProcess(self._protocol, sys.executable, args, env=env, path=str(ROOT))

    async def _wait_healthy(self) -> dict:
        start = reactor.seconds()
        ended = self._protocol.ended
        while reactor.seconds() - start < self.start_timeout:
            if ended.called:
                raise _ExitedEarly()
            try:
                return await self.health(timeout=2)
            except Exception:
                if ended.called:
                    raise _ExitedEarly() from None
                await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"the relay on port {self.port} did not answer /health:\n{self.output}")

    async def health(self, timeout: float = 5.0) -> dict:
        """C{GET /health}, decoded (fails if the relay does not answer in time)."""
        import treq

        pool = _QuietPool(reactor, persistent=False)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=timeout))
        response = await client.get(f"http://127.0.0.1:{self.port}/health".encode(), timeout=timeout)
        body = await readBody(response)
        return json.loads(body)

    def signal(self, name: str) -> None:
        """Send a signal (C{"TERM"}, C{"KILL"}, C{"STOP"}, C{"CONT"}, ...)."""
        if not self.running:
            return
        try:
            if name in ("STOP", "CONT"):
                # Twisted's signalProcess knows only a few names; os.kill all.
                os.kill(self._transport.pid, getattr(signal, "SIG" + name))
            else:
                self._transport.signalProcess(name)
        except (ProcessExitedAlready, ProcessLookupError):
            pass

    def ended(self) -> Deferred:
        """Fires with (exit code, signal) when the current process has ended."""
        d: Deferred = Deferred()
        self._protocol.ended.addBoth(lambda result: (d.callback(result), result)[1])
        return d

    async def terminate(self) -> tuple[int | None, int | None]:
        """SIGTERM (graceful: 1001 to every WebSocket) and wait for the exit."""
        self.resume()
        self.signal("TERM")
        return await self.ended()

    async def kill(self) -> tuple[int | None, int | None]:
        """SIGKILL (a crash: the kernel resets every connection) and wait for the exit."""
        self.signal("KILL")
        return await self.ended()

    def suspend(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing."""
        self.signal("STOP")
        self._suspended = True

    def resume(self) -> None:
        """SIGCONT (after L{suspend}; harmless otherwise)."""
        if self._suspended:
            self._suspended = False
            self.signal("CONT")

    async def cleanup(self) -> None:
        """Resume if stopped, then SIGKILL and wait: for C{addCleanup}."""
        if self._protocol is None:
            return
        if self.running:
            self.resume()
            self.signal("KILL")
        await self._protocol.ended


class _ExitedEarly(Exception):
    pass


class _QuietPool(HTTPConnectionPool):
    """A pool whose connections do not log "Starting factory" on every poll."""

    class _factory(HTTPConnectionPool._factory):
        noisy = False


async def start_relay(test, extra: list[str] = ()) -> RelayProcess:
    """A started L{RelayProcess} that C{test} kills at its cleanup."""
    relay = RelayProcess(extra=extra)
    test.addCleanup(lambda: ensureDeferred(relay.cleanup()))
    return await relay.start()


class _Silent(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        made = self.factory._made
        self.factory._made = []
        for d in made:
            d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data  # read, so the peer is not slowed by flow control; never answer

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class Blackhole(Factory):
    """
    A TCP server on 127.0.0.1 that accepts every connection and never
    answers. C{connections} lists them in arrival order, each with a
    C{lost} Deferred; at cleanup the port is closed and any connection still
    open is aborted (so a test must check C{lost} itself to prove the
    client closed it).
    """

    protocol = _Silent

    def __init__(self, test) -> None:
        self.connections: list[_Silent] = []
        self._made: list[Deferred] = []
        self._port = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.port = self._port.getHost().port
        test.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def escaped_url(self) -> str:
        return escaped_url(self.port)

    @property
    def open_connections(self) -> list[_Silent]:
        return [c for c in self.connections if not c.lost.called]

    def next_connection(self) -> Deferred[_Silent]:
        """Fires with the next connection to arrive."""
        d: Deferred[_Silent] = Deferred()
        self._made.append(d)
        return d

    async def stop(self) -> None:
        await self._port.stopListening()
        for connection in self.open_connections:
            connection.transport.abortConnection()
        for connection in self.connections:
            await connection.lost
