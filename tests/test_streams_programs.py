"""
Programs with connection pools through `pluresync forward` and `pluresync
expose`, a relay process with its default limits between them: every
local connection is a stream of one session, so the relay holds one pair
however many connections the program opens.

 - `redis-benchmark -c 50` (50 connections at once) against a real
   redis-server behind `expose`;
 - `curl --parallel` fetching 50 files from `twist web` behind `expose`.

Both need Debian packages (redis-server brings redis-benchmark; curl):
the tests skip with the reason when they are missing; `.ci/run` installs them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from pluresync.keys import SyncKey

from .processes import spawn
from .redisserver import start_redis
from .relayprocess import escaped_url, free_port, poll, start_relay


def _require(test, *programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise SkipTest(f"needs {', '.join(missing)} (Debian: redis-server, curl; .ci/run installs them)")


class PoolThroughForwardTests(TestCase):
    timeout = 120

    async def forward_to(self, relay, listener: list[str], ready) -> int:
        """
        A listener process (C{listener}: its arguments after the endpoint's
        place, written C{{endpoint}}) and `pluresync forward` to it through
        C{relay}; the forward's local port, once both are ready (C{ready}
        waits for the listener).
        """
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        keyfile = base / "key"
        SyncKey.generate().write(keyfile)
        endpoint = f"relay:url={escaped_url(relay.port)}:keyfile={quoteStringArgument(str(keyfile))}"
        args = [endpoint if arg == "{endpoint}" else arg for arg in listener]
        marker = b"listening on" if args[1] == "pluresync" else None
        served = spawn(self, args, marker=marker, env={"PLURESYNC_HOME": str(base / "home-listener")})
        await ready(served)
        port = free_port()
        forward = spawn(
            self,
            ["-m", "pluresync", "forward", "--listen", f"tcp:{port}:interface=127.0.0.1", endpoint + ":wait=20"],
            marker=b"listening on",
            env={"PLURESYNC_HOME": str(base / "home-forward")},
        )
        await forward.ready
        self.children = (served, forward)
        return port

    async def test_redis_benchmark_50_connections(self):
        _require(self, "redis-server", "redis-benchmark")
        redis = await start_redis(self)
        relay = await start_relay(self)
        port = await self.forward_to(
            relay,
            ["-m", "pluresync", "expose", "--to", f"tcp:127.0.0.1:{redis.port}", "{endpoint}"],
            lambda expose: expose.ready,
        )
        out, err, code = await getProcessOutputAndValue(
            shutil.which("redis-benchmark"),
            ["-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", "5000", "-t", "set,get", "-q"],
            env=os.environ,
        )
        text = out.decode(errors="replace")
        self.assertEqual(code, 0, text + err.decode(errors="replace"))
        self.assertIn("GET:", text)
        self.assertIn("requests per second", text)
        health = await relay.health()
        self.assertEqual(health["sessions"], 1, health)  # one pair for 50 connections (forward keeps it)
        for child in self.children:
            self.assertNotIn(b"Traceback", child.err)

    async def test_curl_parallel_50_files_from_twist_web(self):
        _require(self, "curl")
        relay = await start_relay(self)
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        files = {f"f{n}.bin": os.urandom(64 * 1024 + n) for n in range(50)}
        for name, data in files.items():
            (root / name).write_bytes(data)
        port = await self.forward_to(
            relay,
            ["-m", "twisted", "web", "--listen", "{endpoint}", "--path", str(root)],
            lambda web: poll(lambda: _d_listeners(relay), timeout=30, what="twist web registered at the relay"),
        )
        out_dir = Path(self.mktemp()).resolve()
        out_dir.mkdir(parents=True)
        args = ["--parallel", "--parallel-max", "50", "--silent", "--show-error", "--fail"]
        for name in files:
            args += [f"http://127.0.0.1:{port}/{name}", "-o", str(out_dir / name)]
        out, err, code = await getProcessOutputAndValue(shutil.which("curl"), args, env=os.environ)
        self.assertEqual(code, 0, err.decode(errors="replace"))
        for name, data in files.items():
            got = (out_dir / name).read_bytes()
            self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest(), name)
        for child in self.children:
            self.assertNotIn(b"Traceback", child.err)
        health = await relay.health()
        self.assertEqual(health["sessions"], 1, health)  # one pair for 50 requests


async def _listeners(relay) -> bool:
    return (await relay.health()).get("listeners", 0) >= 1


def _d_listeners(relay):
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(_listeners(relay))
