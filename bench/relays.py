"""
The relay processes under test, each a separate OS process on 127.0.0.1:
Twisted's plain TCP port forwarder, magic-wormhole's transit relay (its
WebSocket listener) and the pluresync relay.

Every process is started with the hard RLIMIT_NOFILE as its soft limit (the
memory benchmark holds up to ~10,000 sockets in one relay) and its output
goes to a log file in the run's scratch directory, never to a pipe nobody
reads.  `stop()` sends SIGINT (Twisted stops cleanly; a relay started with
`profile=` runs under bench/profiled_twist.py and writes its cProfile then),
and SIGKILL after a few seconds.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The pluresync code under test (relay and peers): this checkout, or a
#: scratch copy given in $PLURESYNC_REPO (to measure a proposed change).
CODE = Path(os.environ.get("PLURESYNC_REPO", REPO)).resolve()
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    """Soft fd limit up to the hard limit (in this process and its children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(CODE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RelayProcess:
    """One `twist ...` process; `port` is where clients connect."""

    def __init__(self, name: str, twist_args: list[str], port: int, scratch: Path, profile: Path | None = None) -> None:
        self.name = name
        self.port = port
        self.log_path = scratch / f"{name}-{port}.log"
        if profile is None:
            command = [PYTHON, "-m", "twisted", *twist_args]
        else:
            command = [PYTHON, str(Path(__file__).with_name("profiled_twist.py")), str(profile), *twist_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=str(scratch),
            preexec_fn=raise_nofile,
        )
        try:
            wait_for_port(port, self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def portforward(dest_port: int, scratch: Path) -> RelayProcess:
    port = free_port()
    return RelayProcess(
        "portforward",
        [
            "portforward",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--dest_port",
            str(dest_port),
            "--host",
            "127.0.0.1",
        ],
        port,
        scratch,
    )


def transit_relay(scratch: Path, profile: Path | None = None) -> RelayProcess:
    """magic-wormhole-transit-relay; `port` is its WebSocket listener."""
    port, tcp_port = free_port(), free_port()
    return RelayProcess(
        "transitrelay",
        [
            "transitrelay",
            f"--websocket=tcp:{port}:interface=127.0.0.1",
            f"--websocket-url=ws://127.0.0.1:{port}/",
            f"--port=tcp:{tcp_port}:interface=127.0.0.1",
        ],
        port,
        scratch,
        profile=profile,
    )


def pluresync_relay(scratch: Path, extra: list[str] = (), profile: Path | None = None) -> RelayProcess:
    port = free_port()
    return RelayProcess(
        "pluresync-relay",
        ["pluresync-relay", "--port", f"tcp:{port}:interface=127.0.0.1", *extra],
        port,
        scratch,
        profile=profile,
    )
