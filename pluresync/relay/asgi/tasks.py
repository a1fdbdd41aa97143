"""
Background tasks of one Vercel relay instance.

Each socket, pipe and Redis subscription of the instance runs work in
asyncio tasks that nobody awaits; this keeps a reference to each (asyncio
holds only weak ones, so an unreferenced task may vanish mid-flight) and logs
what failed instead of letting the loop print "exception never retrieved".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("pluresync.relay.asgi")


class Tasks:
    """The instance's running tasks (see the module docstring)."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run C{coroutine} in a task kept until it is done."""
        task = asyncio.ensure_future(coroutine)
        self.running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("relay task failed: %r", task.exception())

    def cancel_all(self) -> None:
        for task in list(self.running):
            task.cancel()


async def quiet(awaitable: Awaitable[Any]) -> None:
    """Await C{awaitable}, ignoring its failure (best-effort Redis clean-up: every key has a TTL)."""
    try:
        await awaitable
    except Exception:
        pass
