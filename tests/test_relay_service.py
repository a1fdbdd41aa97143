"""
C{twist pluresync-relay}: options, makeService, the plugin, and stopService.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.service import Options, RelayService, makeService, port_endpoint

from .relayclient import connect

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OptionsTests(unittest.TestCase):
    """Parsing of the command line."""

    def test_defaults(self) -> None:
        """
        No options: tcp:8080 (every interface), which needs an --auth
        choice; with one, the default limits.
        """
        self.assertRaises(usage.UsageError, parse)
        options = parse("--auth", "open")
        self.assertEqual(options["endpoint"], "tcp:8080")
        self.assertEqual(options["limits"], RelayLimits())

    def test_bare_number(self) -> None:
        """A bare port number means tcp:N."""
        self.assertEqual(parse("--port", "443", "--auth", "open")["endpoint"], "tcp:443")
        self.assertEqual(parse("-p", "8443", "--auth", "open")["endpoint"], "tcp:8443")

    def test_endpoint_string(self) -> None:
        """An endpoint string is kept as is."""
        for endpoint in ("tcp:9000:interface=127.0.0.1", "ssl:443:privateKey=k.pem", "unix:/tmp/r"):
            self.assertEqual(parse("--port", endpoint, "--auth", "open")["endpoint"], endpoint)

    def test_tls(self) -> None:
        """--tls-cert/--tls-key turn a bare or tcp: port into ssl: (key defaults to cert)."""
        self.assertEqual(
            parse("--port", "443", "--auth", "open", "--tls-cert", "/c/cert.pem", "--tls-key", "/c/key.pem")[
                "endpoint"
            ],
            "ssl:443:privateKey=/c/key.pem:certKey=/c/cert.pem",
        )
        self.assertEqual(
            port_endpoint("tcp:443:interface=0.0.0.0", "C:\\x\\both.pem"),
            "ssl:443:interface=0.0.0.0:privateKey=C\\:\\\\x\\\\both.pem:certKey=C\\:\\\\x\\\\both.pem",
        )

    def test_tls_errors(self) -> None:
        """TLS options need a tcp port, and a key needs a certificate."""
        self.assertRaises(usage.UsageError, parse, "--port", "unix:/tmp/r", "--tls-cert", "c.pem")
        self.assertRaises(usage.UsageError, parse, "--tls-key", "k.pem")

    def test_limits(self) -> None:
        """Every limit option reaches the limits."""
        options = parse(
            "--auth",
            "open",
            "--max-message",
            "200000",
            "--open-timeout",
            "3",
            "--hello-timeout",
            "4",
            "--ping-interval",
            "5",
            "--ping-timeout",
            "6",
            "--max-connections",
            "7",
            "--max-pending",
            "8",
            "--max-wait",
            "9",
            "--accept-timeout",
            "10.5",
        )
        self.assertEqual(
            options["limits"],
            RelayLimits(
                max_message=200000,
                open_timeout=3,
                hello_timeout=4,
                ping_interval=5,
                ping_timeout=6,
                max_connections=7,
                max_pending=8,
                max_wait=9,
                accept_timeout=10.5,
            ),
        )

    def test_bad_limits(self) -> None:
        """Negative, non-numeric or too small limits are usage errors."""
        for argv in (
            ("--max-wait", "-1"),
            ("--max-pending", "x"),
            ("--accept-timeout", "nan"),
            ("--max-message", "10"),
        ):
            self.assertRaises(usage.UsageError, parse, *argv)


class ServiceTests(unittest.TestCase):
    """makeService and the plugin."""

    def test_make_service(self) -> None:
        """makeService returns a relay service listening on the endpoint."""
        memory = MemoryReactorClock()
        service = makeService(parse("--port", "tcp:1234", "--auth", "open"), reactor=memory)
        self.assertIsInstance(service, RelayService)
        verifyObject(IService, service)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(memory.tcpServers[0][0], 1234)
        return service.stopService()

    def test_plugin(self) -> None:
        """The plugin is found by getPlugins and provides IServiceMaker."""
        import twisted.plugins

        plugin_dir = os.path.join(REPO_ROOT, "twisted", "plugins")
        if plugin_dir not in twisted.plugins.__path__:
            twisted.plugins.__path__.append(plugin_dir)
        found = [p for p in getPlugins(IServiceMaker) if p.tapname == "pluresync-relay"]
        self.assertEqual(len(found), 1)
        plugin = found[0]
        verifyObject(IServiceMaker, plugin)
        self.assertIs(plugin.options, Options)
        self.assertEqual(plugin.module, "pluresync.relay.server.service")
        self.assertEqual(plugin.tapname, "pluresync-relay")


class StopServiceTests(unittest.TestCase):
    """stopService closes every WebSocket with 1001."""

    @inlineCallbacks
    def test_stop_service_going_away(self) -> Any:
        """A listener and a fresh socket get 1001; stopService's Deferred fires."""
        port = free_port()
        service = makeService(parse("--port", f"tcp:{port}:interface=127.0.0.1", "--ping-interval", "0"))
        service.privilegedStartService()
        service.startService()
        listener = connect(reactor, port)
        fresh = connect(reactor, port)
        yield listener.opened.addTimeout(10, reactor)
        yield fresh.opened.addTimeout(10, reactor)
        listener.send_json({"v": 1, "op": "listen", "rdv": "ab" * 32, "peer": "cd" * 32})
        yield listener.next_json().addTimeout(10, reactor)
        yield service.stopService().addTimeout(10, reactor)
        for client in (listener, fresh):
            _, code, reason = yield client.closed.addTimeout(10, reactor)
            self.assertEqual(code, 1001)
        self.assertEqual(service.factory.sockets, set())
