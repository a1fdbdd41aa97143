"""Child processes for integration tests, driven by Deferreds (no sleeps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

ROOT = Path(__file__).resolve().parent.parent


class Child(ProcessProtocol):
    """
    A child process whose output is kept.

    @ivar ready: fires when C{marker} appears on stdout or stderr.
    @ivar ended: fires with the exit code (or the signal's negative number).
    """

    def __init__(self, marker: bytes | None = None) -> None:
        self.marker = marker
        self.out = b""
        self.err = b""
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def _check(self) -> None:
        if self.marker and not self.ready.called and self.marker in self.out + self.err:
            self.ready.callback(None)

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def processEnded(self, reason) -> None:
        if self.marker and not self.ready.called:
            self.ready.errback(
                AssertionError(f"process ended before {self.marker!r}: {self.out!r} {self.err[-2000:]!r}")
            )
        value = reason.value
        if isinstance(value, ProcessDone):
            code = 0
        else:
            code = value.exitCode if value.exitCode is not None else -value.signal
        self.ended.callback(code)


def spawn(test, args: list[str], marker: bytes | None = None, env: dict | None = None, cwd=None) -> Child:
    """Run C{python args...} with the checkout importable; stopped at cleanup."""
    child = Child(marker)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    transport = reactor.spawnProcess(
        child, sys.executable, [sys.executable, *args], env=environment, path=str(cwd or ROOT)
    )

    async def stop() -> None:
        if not child.ended.called:
            try:
                transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
        await child.ended

    test.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return child
