"""
The installed command: C{python -m twisted pluresync-relay} in a real
process, a pair moving bytes through it, then SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from .relayclient import connect

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RDV = "ab" * 32
PEER = "cd" * 32


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RelayProcess(ProcessProtocol):
    """Collects the relay's output; C{ended} fires with the exit code."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))


class ProcessTests(unittest.TestCase):
    """twist pluresync-relay end to end."""

    @inlineCallbacks
    def wait_until_up(self, port: int, process: RelayProcess) -> Any:
        """Poll /health until it answers (at most 20 s)."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        url = b"http://127.0.0.1:%d/health" % port
        for _ in range(200):
            if process.ended.called:
                self.fail(f"the relay exited early:\n{process.output.decode(errors='replace')}")
            try:
                response = yield agent.request(b"GET", url).addTimeout(5, reactor)
                body = yield readBody(response)
                return body
            except ConnectError:
                yield deferLater(reactor, 0.1, lambda: None)
        self.fail(f"the relay did not come up:\n{process.output.decode(errors='replace')}")

    @inlineCallbacks
    def test_twist_relay(self) -> Any:
        """
        The relay starts under twist, pairs two clients that exchange bytes,
        and on SIGTERM closes them with 1001 and exits 0.
        """
        port = free_port()
        process = RelayProcess()
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            [
                sys.executable,
                "-m",
                "twisted",
                "--log-format",
                "text",
                "pluresync-relay",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            env=env,
            path=REPO_ROOT,
        )
        try:
            body = yield self.wait_until_up(port, process)
            self.assertIn(b'"status":"ok"', body)
            listener = connect(reactor, port)
            yield listener.opened.addTimeout(10, reactor)
            listener.send_json({"v": 1, "op": "listen", "rdv": RDV, "peer": PEER})
            ready = yield listener.next_json().addTimeout(10, reactor)
            self.assertEqual(dict(ready, limits=None), {"op": "ready", "limits": None, "decline": True})
            connector = connect(reactor, port)
            yield connector.opened.addTimeout(10, reactor)
            connector.send_json({"v": 1, "op": "connect", "rdv": RDV, "wait": 10})
            incoming = yield listener.next_json().addTimeout(10, reactor)
            acceptor = connect(reactor, port)
            yield acceptor.opened.addTimeout(10, reactor)
            acceptor.send_json({"v": 1, "op": "accept", "session": incoming["session"]})
            for client in (acceptor, connector):
                paired = yield client.next_json().addTimeout(10, reactor)
                self.assertEqual(paired["op"], "paired")
            payload = os.urandom(200_000)
            connector.send_bytes(payload)
            got = yield acceptor.next_message().addTimeout(10, reactor)
            self.assertEqual(got, (payload, True))
            acceptor.send_bytes(b"thanks")
            got = yield connector.next_message().addTimeout(10, reactor)
            self.assertEqual(got, (b"thanks", True))

            transport.signalProcess("TERM")
            for client in (listener, connector, acceptor):
                _, code, _ = yield client.closed.addTimeout(15, reactor)
                self.assertEqual(code, 1001)
            status = yield process.ended.addTimeout(15, reactor)
            output = process.output.decode(errors="replace")
            # twist stops cleanly, then (since Twisted 22) re-raises the
            # signal so the exit status says "terminated by SIGTERM" (143 in
            # a shell); it exits 0 only when stopped otherwise.
            self.assertIn(status, [(0, None), (None, signal.SIGTERM)], output)
            self.assertIn("Main loop terminated", output)
            self.assertIn("going away", output)
            self.assertNotIn("Traceback", output)
            self.assertIn("pluresync relay", output)
            self.assertNotIn(RDV, output)
        finally:
            if not process.ended.called:
                transport.signalProcess("KILL")
                yield process.ended
