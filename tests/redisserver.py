"""
A real C{redis-server} (the Debian package) on 127.0.0.1 for the cluster
tests, and a cluster of real relay processes sharing it.

 - L{RedisServer}: C{redis-server --port FREE --save '' --appendonly no},
   started and stopped with Deferreds (no sleeps); C{kill()} then
   C{restart()} keeps the port, as a restarted Redis would.
 - L{start_cluster}: N L{RelayProcess}es with C{--redis} and their own
   cluster link ports, all killed at the test's cleanup.

Without C{redis-server} the tests are skipped, except under CI (C{CI} set),
where that is a failure: C{.ci/run} installs it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.trial.unittest import SkipTest

from .relayprocess import RelayProcess, free_port, poll

MISSING = "redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)"


def redis_server_binary(test: Any) -> str:
    """The path of C{redis-server}; skip (fail under CI) when missing."""
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            test.fail(MISSING)
        raise SkipTest(MISSING)
    return path


class ProcessOutput(ProcessProtocol):
    """A server process's last output (bounded) and a Deferred for its end."""

    def __init__(self, keep: int = 200_000) -> None:
        self.output = bytearray()
        self.keep = keep
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        del self.output[: -self.keep]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class _Ping(Protocol):
    def __init__(self) -> None:
        self.answer: Deferred[bytes] = Deferred()
        self.data = b""

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n" in self.data and not self.answer.called:
            self.answer.callback(self.data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.answer.called:
            self.answer.callback(self.data)


class RedisServer:
    """One C{redis-server} child process on 127.0.0.1 (no persistence)."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self._protocol: ProcessOutput | None = None
        self._transport: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.ended.called

    @property
    def output(self) -> str:
        return self._protocol.output.decode(errors="replace") if self._protocol else ""

    async def start(self) -> RedisServer:
        """Spawn and wait (bounded) until it answers PING."""
        self._protocol = ProcessOutput()
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ]
        self._transport = reactor.spawnProcess(self._protocol, self.binary, args, env=dict(os.environ))
        await poll(self._answers, timeout=15, interval=0.05, what=f"redis-server on port {self.port} answering PING")
        return self

    async def _answers(self) -> bool:
        if not self.running:
            raise AssertionError(f"redis-server exited:\n{self.output}")
        ping = _Ping()
        try:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=1), ping)
        except Exception:
            return False
        return b"+PONG" in await ping.answer

    async def command(self, *args: str) -> Any:
        """Run one Redis command on a fresh connection; its reply."""
        import txredisapi

        connection = await txredisapi.Connection(
            "127.0.0.1", self.port, reconnect=False, connectTimeout=5, replyTimeout=5
        )
        try:
            return await connection.execute_command(*args)
        finally:
            await connection.disconnect()

    async def kill(self) -> None:
        """SIGKILL (a crash: every connection reset) and wait for the exit."""
        if self.running:
            self._transport.signalProcess("KILL")
            await self._protocol.ended

    async def restart(self) -> RedisServer:
        """Start again on the same port (empty: nothing is persisted)."""
        assert not self.running
        return await self.start()

    async def cleanup(self) -> None:
        await self.kill()


async def start_redis(test: Any) -> RedisServer:
    """A started L{RedisServer} that C{test} kills at its cleanup."""
    server = RedisServer(redis_server_binary(test))
    test.addCleanup(lambda: ensureDeferred(server.cleanup()))
    return await server.start()


def write_secret(test: Any) -> str:
    """A fresh cluster secret file in the test's temporary directory."""
    path = os.path.abspath(test.mktemp())
    with open(path, "w") as f:
        f.write(os.urandom(32).hex())
    return path


def cluster_args(redis: RedisServer, secret_file: str, extra: list[str] = ()) -> list[str]:
    """The relay options of one cluster instance (a fresh link port)."""
    link_port = free_port()
    return [
        "--redis",
        redis.url,
        "--cluster-listen",
        f"tcp:{link_port}:interface=127.0.0.1",
        "--cluster-address",
        f"127.0.0.1:{link_port}",
        "--cluster-secret-file",
        secret_file,
        *extra,
    ]


async def start_cluster(test: Any, redis: RedisServer, count: int = 3, extra: list[str] = ()) -> list[RelayProcess]:
    """C{count} relay processes sharing C{redis}, killed at C{test}'s cleanup."""
    secret = write_secret(test)
    relays = [RelayProcess(extra=cluster_args(redis, secret, extra)) for _ in range(count)]
    for relay in relays:
        test.addCleanup(lambda relay=relay: ensureDeferred(relay.cleanup()))
    for relay in relays:
        await relay.start()
    # Every instance has joined once its /health says Redis is fine.
    for relay in relays:
        await poll(
            lambda relay=relay: _redis_ok(relay),
            timeout=15,
            what=f"the relay on port {relay.port} connecting to Redis",
        )
    return relays


async def _redis_ok(relay: RelayProcess) -> bool:
    health = await relay.health()
    return health.get("checks", {}).get("redis") is True
