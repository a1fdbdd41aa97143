"""
Endpoint strings that Twisted's parser mishandles (issue 15, item 4): a
trailing backslash, a parameter given twice, and C{ws://host:0}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from pluresync.endpoints.strings import check_endpoint_string, split_endpoint_string
from pluresync.errors import ConfigurationError
from pluresync.pipes.websocket import RelayURL

from .relayprocess import ROOT


class SplitTests(SynchronousTestCase):
    def test_like_twisted(self) -> None:
        """Escapes and '=' in values split as Twisted splits them."""
        self.assertEqual(
            split_endpoint_string(r"relay:azure:url=wss\://r\:8443:topic=a=b:keyfile=C\:\\k"),
            (["relay", "azure"], {"url": "wss://r:8443", "topic": "a=b", "keyfile": "C:\\k"}),
        )

    def test_trailing_backslash(self) -> None:
        """A ValueError (ConfigurationError) naming the problem, not Twisted's RuntimeError."""
        with self.assertRaises(ConfigurationError) as caught:
            check_endpoint_string("relay:azure:keyfile=key\\")
        self.assertIsInstance(caught.exception, ValueError)
        self.assertIn("ends with a backslash", str(caught.exception))
        # An escaped backslash at the end is fine.
        check_endpoint_string("relay:azure:keyfile=key\\\\")

    def test_duplicate(self) -> None:
        """keyfile=A:keyfile=B is refused, naming the key and not the values."""
        with self.assertRaises(ConfigurationError) as caught:
            check_endpoint_string("relay:azure:keyfile=SECRET-A:keyfile=SECRET-B")
        self.assertIn("keyfile= more than once", str(caught.exception))
        self.assertNotIn("SECRET", str(caught.exception))


class PortZeroTests(SynchronousTestCase):
    def test_port_zero_refused(self) -> None:
        """ws://host:0 is refused like other bad ports (it was taken as port 80)."""
        for url in ("ws://127.0.0.1:0", "wss://relay.example.net:0/"):
            with self.assertRaises(ConfigurationError) as caught:
                RelayURL.parse(url)
            self.assertIn("bad port", str(caught.exception))


class CommandLineTests(SynchronousTestCase):
    """Through the `pluresync` command, which appends :identity=... to the string."""

    def run_cli(self, *argv: str) -> subprocess.CompletedProcess:
        home = self.mktemp()
        os.makedirs(home)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PLURESYNC_HOME": home}
        return subprocess.run(
            [sys.executable, "-m", "pluresync", *argv], capture_output=True, text=True, timeout=60, env=env
        )

    def test_trailing_backslash(self) -> None:
        result = self.run_cli("connect", "relay:url=ws\\://127.0.0.1\\:9:keyfile=mykey\\")
        self.assertEqual(result.returncode, 1)
        self.assertIn("ends with a backslash", result.stderr)
        self.assertNotIn("identity", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)

    def test_duplicate(self) -> None:
        result = self.run_cli("listen", "relay:url=ws\\://127.0.0.1\\:9:keyfile=A:keyfile=B")
        self.assertEqual(result.returncode, 1)
        self.assertIn("keyfile= more than once", result.stderr)
