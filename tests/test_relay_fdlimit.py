"""The relay raises its soft file descriptor limit at start and reports it (issue 11)."""

from __future__ import annotations

import json
import resource

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from pluresync.relay.server.fdlimit import CEILING, FdLimit, raise_nofile
from pluresync.relay.server.service import Options, makeService


class Limits:
    """A fake C{getrlimit}/C{setrlimit} pair."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        return self.limits

    def set(self, which: int, limits: tuple[int, int]) -> None:
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


class RaiseTests(unittest.SynchronousTestCase):
    def test_up_to_the_hard_limit(self) -> None:
        """The soft limit goes up to the hard one; the hard one is left alone."""
        limits = Limits(1024, 524288)
        self.assertEqual(raise_nofile(limits.get, limits.set), FdLimit(1024, 524288, 524288))
        self.assertEqual(limits.calls, [(524288, 524288)])

    def test_capped(self) -> None:
        """An unlimited or huge hard limit gives at most CEILING."""
        for hard in (resource.RLIM_INFINITY, 1 << 30):
            limits = Limits(1024, hard)
            self.assertEqual(raise_nofile(limits.get, limits.set).soft, CEILING)
            self.assertEqual(limits.calls, [(CEILING, hard)])

    def test_never_lowered(self) -> None:
        """A soft limit already at or above what we would ask for is kept, untouched."""
        for soft in (CEILING, resource.RLIM_INFINITY):
            limits = Limits(soft, resource.RLIM_INFINITY)
            self.assertEqual(raise_nofile(limits.get, limits.set).soft, soft)
            self.assertEqual(limits.calls, [])

    def test_refused(self) -> None:
        """If the system refuses, the limit stays as it was and says so."""
        limits = Limits(1024, 4096, refuse=True)
        self.assertEqual(raise_nofile(limits.get, limits.set), FdLimit(1024, 1024, 4096))

    def test_describe(self) -> None:
        self.assertEqual(
            FdLimit(1024, 4096, 4096).describe(), "file descriptor limit raised from 1024 to 4096 (the hard limit)"
        )
        self.assertEqual(FdLimit(4096, 4096, 8192).describe(), "file descriptor limit 4096 (the hard limit is 8192)")


class ServiceTests(unittest.TestCase):
    def test_health_reports_it(self) -> None:
        """Once the service started, /health carries the process's soft limit as C{fd_limit}."""
        config = Options()
        config.parseOptions(["--port", "tcp:0", "--auth", "open"])
        service = makeService(config, reactor=MemoryReactorClock())
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        request = DummyRequest([b""])
        body = json.loads(service.site.health.render_GET(request))
        self.assertEqual(body["fd_limit"], resource.getrlimit(resource.RLIMIT_NOFILE)[0])
