"""
pluresync expose / forward: the Forwarder over plain TCP in this process,
and the two commands as processes through a local relay, several
connections at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, quoteStringArgument
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from pluresync.cli.forward import Forwarder
from pluresync.keys import SyncKey

from .localrelay import Collector, LocalRelay
from .processes import spawn


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Protocol):
    """Echoes everything; closes once the client has ended its direction (so the client sees the end)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def echo_server(test) -> int:
    """A half-close-aware echo server on 127.0.0.1; its port."""
    factory = Factory.forProtocol(HalfCloseEcho)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return port.getHost().port


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (for a child process to take)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def exchange(port: int, data: bytes) -> Collector:
    """Connect to 127.0.0.1:port, send data, half-close, and collect until the connection ends."""
    client = Collector()
    factory = Factory.forProtocol(lambda: client)
    factory.noisy = False
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    client.transport.write(data)
    client.transport.loseWriteConnection()
    await client.lost
    return client


class ForwarderTests(TestCase):
    """The Forwarder that expose and forward are, with TCP on both sides."""

    timeout = 30

    async def test_concurrent_connections_with_half_close(self):
        """Three connections at once each get their own data back; their ends travel as half-closes."""
        forwarder = Forwarder(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", echo_server(self)), "echo")
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(forwarder)
        self.addCleanup(port.stopListening)
        payloads = [os.urandom(256 * 1024) + bytes([i]) for i in range(3)]
        clients = await gatherResults(
            [Deferred.fromCoroutine(exchange(port.getHost().port, data)) for data in payloads]
        )
        for client, data in zip(clients, payloads, strict=True):
            self.assertEqual(client.data, data)
            self.assertEqual(client.reason.type.__name__, "ConnectionDone")
        self.assertEqual(forwarder.splices, set())

    async def test_unreachable_target_aborts(self):
        """When --to cannot be reached the incoming connection is cut (not closed cleanly)."""
        forwarder = Forwarder(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", free_port()), "nothing")
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(forwarder)
        self.addCleanup(port.stopListening)
        client = await exchange(port.getHost().port, b"hello?")
        self.assertEqual(client.data, b"")
        self.assertEqual(client.reason.type.__name__, "ConnectionLost")
        self.assertEqual(forwarder.splices, set())


class ExposeForwardProcessTests(TestCase):
    """`pluresync expose` on one side, `pluresync forward` on the other, as processes."""

    timeout = 90

    async def test_three_concurrent_connections_echo_intact(self):
        """3 concurrent 1 MiB connections through forward -> relay -> expose -> echo each get their own echo."""
        relay = LocalRelay(self)
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        keyfile = base / "key"
        SyncKey.generate().write(keyfile)
        endpoint = f"relay:url={relay.url.replace(':', chr(92) + ':')}:keyfile={quoteStringArgument(str(keyfile))}"
        echo = echo_server(self)
        forward_port = free_port()
        expose = spawn(
            self,
            ["-m", "pluresync", "expose", "--to", f"tcp:127.0.0.1:{echo}", endpoint],
            marker=b"listening on",
            env={"PLURESYNC_HOME": str(base / "home-expose")},
        )
        forward = spawn(
            self,
            [
                "-m",
                "pluresync",
                "forward",
                "--listen",
                f"tcp:{forward_port}:interface=127.0.0.1",
                endpoint + ":wait=20",
            ],
            marker=b"listening on",
            env={"PLURESYNC_HOME": str(base / "home-forward")},
        )
        await gatherResults([expose.ready, forward.ready])
        payloads = [os.urandom(1024 * 1024) + bytes([i]) for i in range(3)]
        clients = await gatherResults([Deferred.fromCoroutine(exchange(forward_port, data)) for data in payloads])
        for client, data in zip(clients, payloads, strict=True):
            self.assertEqual(len(client.data), len(data))
            self.assertEqual(client.data, data)
        forward.transport.signalProcess("TERM")
        self.assertEqual(await forward.ended, 0)  # stopping is how forward ends
        err = forward.err.decode()
        self.assertEqual(err.count(" closed after "), 3, err)
        self.assertNotIn("Traceback", err + expose.err.decode())
