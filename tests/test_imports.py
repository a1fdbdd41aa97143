"""
Importing pluresync where it is imported often stays light.

Three imports are paid again and again, by processes that need little of
pluresync: C{import pluresync}; Twisted's plugin scan, which imports
C{twisted/plugins/pluresync_endpoints.py} in every C{twist} and
C{clientFromString} process (and swallows a failing import, which then
surfaces as "Unknown endpoint type"); and the Vercel function's cold start.
None of them may load the client API, NaCl, Autobahn, treq or the reactor.

Each case runs in a fresh interpreter: what a module imports as a side effect
can only be seen from a clean C{sys.modules}. A failure names the chain of
imports that pulled the heavy module in (from C{python -X importtime}), so
the import to move is in the message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

#: Never loaded by a light import: the client API, the crypto, the WebSocket
#: and HTTP client libraries. Prefixes: C{"nacl"} covers C{nacl.bindings}.
HEAVY = ("pluresync.api", "pluresync.keys", "nacl", "autobahn", "txaio", "treq", "OpenSSL", "cryptography")

#: Twisted's reactor machinery, which an endpoint parser needs only once it
#: builds an endpoint.
REACTOR = (
    "twisted.internet.reactor",
    "twisted.internet.defer",
    "twisted.internet.base",
    "twisted.internet.task",
    "twisted.internet.protocol",
    "twisted.internet.endpoints",
    "twisted.internet.ssl",
)

#: The parts of pluresync that build endpoints and carry bytes: the parsers
#: import them when a string is parsed, never at plugin-scan time.
PATHS = ("pluresync.endpoints.relay", "pluresync.endpoints.auto", "pluresync.pipes", "pluresync.secure")
PATHS += ("pluresync.dial", "pluresync.relay", "pluresync.noise")

#: What the Vercel function does when an instance starts: run its entry
#: module, deploy/vercel/api/relay.py (import the app, create it from the
#: environment). Run from the file, not from a copy of its import line, so
#: the test follows wherever the entry finds C{create_app}.
ASGI_COLD_START = (
    "import os\n"
    "os.environ.update(PLURESYNC_REDIS_URL='redis://127.0.0.1:1/0', PLURESYNC_AUTH='open')\n"
    f"entry = {str(ROOT / 'deploy' / 'vercel' / 'api' / 'relay.py')!r}\n"
    "exec(compile(open(entry).read(), entry, 'exec'), {'__name__': 'relay'})\n"
)

_REPORT = "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _chains(importtime: str, modules: list[str]) -> list[str]:
    """
    For each of C{modules}, the chain of imports that loaded it, outermost
    first, read from C{-X importtime} output (children are printed before
    their parent, indented two more spaces).
    """
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or line.endswith("| imported package"):
            continue
        name_field = line.rsplit("|", 1)[-1]
        name = name_field.lstrip()
        rows.append((len(name_field) - len(name), name))
    chains = []
    for module in modules:
        index = next((i for i, (_, name) in enumerate(rows) if name == module), None)
        if index is None:
            continue
        depth, chain = rows[index][0], [module]
        for row_depth, name in rows[index + 1 :]:
            if row_depth < depth:
                chain.append(name)
                depth = row_depth
        chains.append(" <- ".join(chain))
    return chains


class LightImportTests(SynchronousTestCase):
    """What each frequently paid import leaves in C{sys.modules}."""

    def loaded(self, code: str) -> tuple[set[str], str]:
        """Run C{code} in a fresh interpreter: (its sys.modules, its importtime log)."""
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code + _REPORT],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, f"{code!r} failed:\n{result.stderr[-3000:]}")
        return set(json.loads(result.stdout.splitlines()[-1])), result.stderr

    def assertNotLoaded(self, code: str, *prefixes: str) -> set[str]:
        """Fail, naming each import chain, when C{code} loads a module under one of C{prefixes}."""
        modules, importtime = self.loaded(code)
        found = sorted(m for m in modules if _matches(m, prefixes))
        # Report the outermost offender of each family only (nacl, not nacl.bindings too).
        roots = [m for m in found if not any(m.startswith(other + ".") for other in found)]
        if roots:
            self.fail(
                f"{code.strip()!r} loads what it must not: {', '.join(roots)}\n"
                "import chains (module <- what was being imported when it loaded <- ...):\n  "
                + "\n  ".join(_chains(importtime, roots) or roots)
            )
        return modules

    def test_package(self) -> None:
        """
        C{import pluresync} loads no Twisted at all: the public names
        (C{create_transport}, C{SyncKey}, C{PeerIdentity}) come on first use.
        """
        modules = self.assertNotLoaded("import pluresync", *HEAVY, "twisted", "zope", *PATHS)
        self.assertIn("pluresync", modules)

    def test_version(self) -> None:
        """The version is read without importing anything heavy (C{--version}, C{/health})."""
        self.assertNotLoaded("from pluresync import __version__", *HEAVY, "twisted", "zope")

    def test_endpoint_plugin(self) -> None:
        """
        The endpoint plugin module, imported by every plugin scan, loads the
        parser interfaces and nothing of the endpoints, the crypto or the reactor.
        """
        modules = self.assertNotLoaded(
            "import twisted.plugins.pluresync_endpoints", *HEAVY, *REACTOR, *PATHS, "pluresync.config"
        )
        self.assertIn("pluresync.endpoints.parsers", modules)

    def test_relay_plugin(self) -> None:
        """
        The C{twist pluresync-relay} plugin module names its service module
        and imports none of pluresync (Twisted's C{ServiceMaker} itself brings
        C{twisted.internet.defer}, as for Twisted's own plugins, but no reactor).
        """
        self.assertNotLoaded("import twisted.plugins.pluresync_relay", *HEAVY, "twisted.internet.reactor", "pluresync")

    def test_asgi_cold_start(self) -> None:
        """
        The Vercel function's cold start (import the app, create it) loads no
        Twisted, NaCl, Autobahn or client API: it runs on asyncio and the pure
        relay core only.
        """
        modules = self.assertNotLoaded(ASGI_COLD_START, *HEAVY, "twisted", "pluresync.relay.server")
        self.assertIn("pluresync.relay.core.wire", modules)


class LazyNameTests(SynchronousTestCase):
    """The lazily resolved public names behave like eagerly imported ones."""

    def test_public_names(self) -> None:
        """Each name in C{__all__} is the object its defining module holds."""
        import pluresync
        from pluresync import PeerIdentity, SyncKey, __version__, create_transport
        from pluresync.api import create_transport as api_create_transport
        from pluresync.keys import PeerIdentity as KeysPeerIdentity
        from pluresync.keys import SyncKey as KeysSyncKey
        from pluresync.version import __version__ as version

        self.assertIs(create_transport, api_create_transport)
        self.assertIs(SyncKey, KeysSyncKey)
        self.assertIs(PeerIdentity, KeysPeerIdentity)
        self.assertEqual(__version__, version)
        self.assertEqual(sorted(pluresync.__all__), ["PeerIdentity", "SyncKey", "__version__", "create_transport"])
        for name in pluresync.__all__:
            self.assertIs(getattr(pluresync, name), locals()[name])

    def test_dir(self) -> None:
        """C{dir(pluresync)} lists every public name, resolved or not (completion, C{help()})."""
        import pluresync

        self.assertTrue(set(pluresync.__all__) <= set(dir(pluresync)))

    def test_unknown_name(self) -> None:
        """An unknown attribute is an C{AttributeError} (so C{hasattr} and C{from ... import} fail normally)."""
        import pluresync

        self.assertFalse(hasattr(pluresync, "no_such_name"))
        with self.assertRaises(ImportError):
            exec("from pluresync import no_such_name", {})

    def test_names_in_a_fresh_process(self) -> None:
        """
        In a fresh interpreter, C{from pluresync import create_transport}
        imports the client API then (the lazy path itself, not a module this
        test process had already loaded).
        """
        code = (
            "import sys, pluresync\n"
            "assert 'pluresync.api' not in sys.modules\n"
            "from pluresync import create_transport, SyncKey, PeerIdentity, __version__\n"
            "import pluresync.api, pluresync.keys\n"
            "assert create_transport is pluresync.api.create_transport\n"
            "assert (SyncKey, PeerIdentity) == (pluresync.keys.SyncKey, pluresync.keys.PeerIdentity)\n"
            "print('ok')\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "ok"), result.stderr[-3000:])


class ImportChainTests(SynchronousTestCase):
    """The failure message names the right chain (the diagnosis is the point of the message)."""

    def test_chain(self) -> None:
        """A child printed before its parents is traced up to the top-level import."""
        log = "\n".join(
            [
                "import time: self [us] | cumulative | imported package",
                "import time:        10 |         10 |       nacl.bindings",
                "import time:        10 |         20 |     nacl",
                "import time:        10 |         10 |     json",
                "import time:        10 |         40 |   pluresync.keys",
                "import time:        10 |         50 | pluresync.relay.asgi.app",
            ]
        )
        self.assertEqual(_chains(log, ["nacl"]), ["nacl <- pluresync.keys <- pluresync.relay.asgi.app"])
        self.assertEqual(_chains(log, ["absent"]), [])
