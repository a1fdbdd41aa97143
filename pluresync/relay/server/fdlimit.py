"""
The relay's file descriptor limit, raised at start.

Every WebSocket is a file descriptor, and a relay holds two per pair plus
its listeners: tens of thousands.  Most systems start a process with a soft
C{RLIMIT_NOFILE} of 1,024 and a hard limit far above it; beyond the soft
limit C{accept} fails with C{EMFILE} and the relay stops taking
connections.  The soft limit is the process's own to raise, up to the hard
limit, so the relay does that at start, logs it, and reports it in
C{/health} (C{fd_limit}); the hard limit is the operator's (C{ulimit -Hn},
systemd's C{LimitNOFILE}, Docker's C{--ulimit nofile}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

#: Never ask for more than this (an unlimited hard limit still means a table
#: the kernel must be able to allocate; C{fs.nr_open} is 1,048,576 by default).
CEILING = 1 << 20


@dataclass(frozen=True)
class FdLimit:
    """The soft limit before and after, and the hard limit (C{None}: unknown, e.g. on Windows)."""

    before: int | None
    soft: int | None
    hard: int | None

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.soft is None:
            return "file descriptor limit unknown on this platform"
        if self.before == self.soft:
            return f"file descriptor limit {self.soft} (the hard limit is {self.hard})"
        return f"file descriptor limit raised from {self.before} to {self.soft} (the hard limit)"


def raise_nofile(
    getrlimit: Callable[[int], tuple[int, int]] | None = None,
    setrlimit: Callable[[int, tuple[int, int]], None] | None = None,
) -> FdLimit:
    """
    Raise this process's soft C{RLIMIT_NOFILE} to its hard limit (at most
    L{CEILING}); never lower it.  A refusal leaves the limit as it was.
    """
    if resource is None and getrlimit is None:
        return FdLimit(None, None, None)
    which = resource.RLIMIT_NOFILE if resource is not None else 7
    getrlimit = getrlimit or resource.getrlimit
    setrlimit = setrlimit or resource.setrlimit
    soft, hard = getrlimit(which)
    infinity = getattr(resource, "RLIM_INFINITY", -1)
    want = CEILING if hard == infinity else min(hard, CEILING)
    if soft != infinity and soft < want:
        try:
            setrlimit(which, (want, hard))
        except (ValueError, OSError):
            return FdLimit(soft, soft, hard)
        return FdLimit(soft, want, hard)
    return FdLimit(soft, soft, hard)
