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


_WHEEL: list = []


def _built_wheel() -> tuple[Path, Path, Path]:
    """
    Build the wheel and install it into a directory of its own, once per test
    run (building is the slow part); removed when the process exits.
    """
    if not _WHEEL:
        import atexit
        import shutil
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="pluresync-wheel-")).resolve()
        atexit.register(shutil.rmtree, work, True)
        # Build from a copy: setuptools writes build/ into the source tree,
        # and parallel test workers must not share it.
        source = work / "src"
        shutil.copytree(
            ROOT,
            source,
            ignore=shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "_trial_temp*", "*.egg-info"),
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
            + ["-w", str(work), str(source)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        [wheel] = work.glob("pluresync-*.whl")
        target = work / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        _WHEEL.extend([work, wheel, target])
    return tuple(_WHEEL)


class WheelTests(SynchronousTestCase):
    """Build, install, discover."""

    def setUp(self):
        self.work, self.wheel, self.target = _built_wheel()
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
        """getPlugins finds the endpoint parsers (once each) and the relay service maker."""
        out = self.run_python("-c", _PROBE.format(target=str(self.target))).splitlines()
        self.assertEqual(out, ["['auto', 'direct', 'relay']", "['auto', 'direct', 'relay']", "['pluresync-relay']"])

    def test_twist_help(self):
        """`twist --help` lists pluresync-relay."""
        self.assertIn("pluresync-relay", self.run_python("-m", "twisted", "--help"))


_EDITABLE_PROBE = """
import os
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
[maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == "pluresync-relay"]
import pluresync
print(os.path.realpath(pluresync.__file__))
"""


class EditableInstallTests(SynchronousTestCase):
    """
    The README's two commands share one virtualenv: `pip install .` (to run
    the relay) and `pip install -e '.[test]'` (to run the tests).  In either
    order, `twist pluresync-relay` must then be found (issue 15): PEP 660
    editable installs through an import hook hide twisted/plugins/ from
    Twisted's plugin scan.  Each order runs in a fresh virtualenv whose
    dependencies come from this one (no index is used), from a directory
    outside the checkout.
    """

    #: trial -j hands its workers its sys.path as PYTHONPATH: it would make
    #: this checkout's own install visible to pip and Python in the new venv.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def install(self, venv: Path, *args: str) -> None:
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
            cwd=str(venv.parent),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def venv_with(self, *installs: tuple[str, ...]) -> tuple[Path, Path]:
        import shutil
        import sysconfig
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="pluresync-editable-")).resolve()
        self.addCleanup(shutil.rmtree, work, True)
        source = work / "src"
        shutil.copytree(
            ROOT,
            source,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "venv", "build", "dist", "_trial_temp*", "*.egg-info", "dropin.cache"
            ),
        )
        venv = work / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], env=self.env, check=True, capture_output=True, timeout=120
        )
        site = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        # Dependencies (Twisted, Autobahn, ...) from this interpreter's site-packages, after the venv's own.
        # (every site-packages directory this interpreter sees, in case its own pulls in another)
        sites = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
        (Path(site) / "zz_pluresync_deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(sites)))
        for args in installs:
            self.install(venv, *[str(source) if a == "SRC" else a for a in args])
        return venv, source

    def assert_relay_found(self, venv: Path, source: Path, editable: bool) -> None:
        env = self.env
        python = str(venv / "bin" / "python")
        result = subprocess.run(
            [python, "-m", "twisted", "pluresync-relay", "--help"],
            cwd=str(venv.parent),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("--open-timeout", result.stdout)
        where = subprocess.run(
            [python, "-c", _EDITABLE_PROBE], cwd=str(venv.parent), env=env, capture_output=True, text=True, timeout=120
        )
        self.assertEqual(where.returncode, 0, where.stderr)
        # The plugin's package is the one just installed (not this checkout's).
        self.assertEqual(where.stdout.strip().startswith(str(source)), editable, where.stdout)

    def test_install_then_editable(self):
        """`pip install .` then `pip install -e .`: the editable one wins, and the relay is found."""
        venv, source = self.venv_with(("SRC",), ("-e", "SRC"))
        self.assert_relay_found(venv, source, editable=True)

    def test_editable_then_install(self):
        """`pip install -e .` then `pip install .`: the regular one wins, and the relay is found."""
        venv, source = self.venv_with(("-e", "SRC"), ("SRC",))
        self.assert_relay_found(venv, source, editable=False)


class PackageListTests(SynchronousTestCase):
    """setup.cfg lists packages by hand (find: cannot see twisted.plugins)."""

    def test_every_package_listed(self):
        """Every pluresync package directory is in setup.cfg's packages list, so the wheel ships it."""
        import configparser

        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        listed = set(config["options"]["packages"].split())
        found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "pluresync").rglob("__init__.py")}
        self.assertEqual(found - listed, set())
