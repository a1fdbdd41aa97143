"""
The built wheel, installed outside the checkout, exposes every plugin.

Editable installs and running from the checkout can hide packaging mistakes
(a missing C{twisted.plugins} entry, a stray C{__init__.py} under twisted/,
a shipped C{dropin.cache}), so this builds a real wheel and imports it from
a directory that holds nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
from twisted.plugin import getPlugins
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor as C, IStreamServerEndpointStringParser as S)
from twisted.application.service import IServiceMaker
import pluresync
assert pluresync.__file__.startswith({target!r}), pluresync.__file__
print(sorted(p.prefix for p in getPlugins(C) if p.__module__.startswith("pluresync")))
print(sorted(p.prefix for p in getPlugins(S) if p.__module__.startswith("pluresync")))
print(sorted(p.tapname for p in getPlugins(IServiceMaker) if p.tapname.startswith("pluresync")))
"""


class WheelTests(SynchronousTestCase):
    """Build, install, discover."""

    def setUp(self):
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
            + ["-w", str(self.work), str(ROOT)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        [self.wheel] = self.work.glob("pluresync-*.whl")
        self.target = self.work / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(self.target), str(self.wheel)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        self.env = {**os.environ, "PYTHONPATH": str(self.target)}

    def run_python(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, *args], cwd=str(self.work), env=self.env, capture_output=True, text=True, timeout=120
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_wheel_contents(self):
        """The wheel ships both plugin modules, no twisted/__init__.py and no dropin.cache."""
        names = zipfile.ZipFile(self.wheel).namelist()
        self.assertIn("twisted/plugins/pluresync_endpoints.py", names)
        self.assertIn("twisted/plugins/pluresync_relay.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])

    def test_plugins_found(self):
        """getPlugins finds the relay parsers (once each) and the relay service maker."""
        out = self.run_python("-c", _PROBE.format(target=str(self.target))).splitlines()
        self.assertEqual(out, ["['auto', 'relay']", "['auto', 'relay']", "['pluresync-relay']"])

    def test_twist_help(self):
        """`twist --help` lists pluresync-relay."""
        self.assertIn("pluresync-relay", self.run_python("-m", "twisted", "--help"))
