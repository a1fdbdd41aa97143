"""
A small LAN for tests: hosts in network namespaces on one bridge, where
multicast (mDNS) works, as it does not on C{lo}.

::

    <lab>-sw   a bridge, br0
    <lab>-a    eth0 10.99.0.1/24 on br0
    <lab>-b    eth0 10.99.0.2/24 on br0   (and so on)

Programs run inside a host with C{ip netns exec} as real processes; at test
cleanup, also when the test failed, the lab kills them by pid (C{ip netns
del} would leave them running) and then deletes its namespaces.  Names carry
this process's pid and a counter, so labs of parallel test processes never
meet; a lab left behind by a process that died is removed by the next lab.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready

from .processes import ROOT, Child

#: Every lab namespace's name starts with this, then the pid that made it.
PREFIX = "pslan"
_labs = itertools.count()
_probed: list[str | None] = []


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def unavailable() -> str | None:
    """Why no lab can be built here (for a skip), or C{None}."""
    if _probed:
        return _probed[0]
    reason = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "building a LAN of network namespaces needs root"
    elif shutil.which("ip") is None:
        reason = "building a LAN of network namespaces needs iproute2's `ip`"
    else:
        probe = f"{PREFIX}{os.getpid()}probe"
        made = _ip("netns", "add", probe, check=False)
        _ip("netns", "del", probe, check=False)
        if made.returncode != 0:
            reason = f"cannot create a network namespace here: {made.stderr.strip()}"
    _probed.append(reason)
    return reason


def _kill_namespace(name: str) -> None:
    """Kill every process left in namespace C{name} (by pid), then delete it."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


def _sweep() -> None:
    """Remove labs whose making process is gone (it was killed before its cleanup ran)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        digits = "".join(itertools.takewhile(str.isdigit, name[len(PREFIX) :]))
        if digits and int(digits) != os.getpid() and not os.path.exists(f"/proc/{digits}"):
            _kill_namespace(name)


class LanLab:
    """
    C{hosts} hosts on one bridge, removed at C{test}'s cleanup.

    @ivar addresses: each host's IPv4 address, by host name (C{"a"}, C{"b"}, ...).
    """

    def __init__(self, test, hosts: int = 2) -> None:
        reason = unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        _sweep()
        self.name = f"{PREFIX}{os.getpid()}x{next(_labs)}"
        self._namespaces: list[str] = []
        self._children: list[tuple[Child, object]] = []
        # Registered first, so it runs even when the setup below fails half way.
        test.addCleanup(self._teardown)
        switch = self._namespace("sw")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        self.addresses: dict[str, str] = {}
        for index in range(hosts):
            host = chr(ord("a") + index)
            namespace = self._namespace(host)
            port = f"p{host}"
            _ip("link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", port, "netns", switch)
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            address = f"10.99.0.{index + 1}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            self.addresses[host] = address

    def _namespace(self, suffix: str) -> str:
        name = f"{self.name}-{suffix}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def spawn(self, host: str, args: list[str], marker: bytes | None = None, env: dict | None = None) -> Child:
        """Run C{python args...} inside C{host}, with the checkout importable."""
        child = Child(marker)
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        # `ip netns exec` execs the command: the pid is python's own.
        transport = reactor.spawnProcess(
            child,
            "ip",
            ["ip", "netns", "exec", f"{self.name}-{host}", sys.executable, *args],
            env=environment,
            path=str(ROOT),
        )
        self._children.append((child, transport))
        return child

    async def _teardown(self) -> None:
        ending = []
        for child, transport in self._children:
            if not child.ended.called:
                try:
                    transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
            ending.append(child.ended)
        if ending:
            # SIGKILL cannot be ignored: each ends at once; the bound is for a stuck reap.
            waited: Deferred = DeferredList(ending, consumeErrors=True)
            await waited.addTimeout(10, reactor)
        for namespace in reversed(self._namespaces):
            _kill_namespace(namespace)
