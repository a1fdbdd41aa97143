"""
The four paths a benchmark stream can take, and running one listening peer
and one connecting peer (two `peer.py` processes) over a path.

  direct       Twisted TCP socket to Twisted TCP socket on loopback
  portforward  through `twist portforward` (plain TCP, no crypto): the baseline
  transit      through magic-wormhole's transit relay, WebSocket mode (no crypto)
  pluresync    through `twist pluresync-relay`, relay: endpoints (encrypted)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from relays import PYTHON, RelayProcess, child_env, portforward

HERE = Path(__file__).resolve().parent
PATHS = ("direct", "portforward", "transit", "pluresync")


class Relays:
    """The long-lived relays of one run (portforward is per stream: its destination varies)."""

    def __init__(self, scratch: Path, transit: RelayProcess, pluresync: RelayProcess, keyfile: Path) -> None:
        self.scratch = scratch
        self.transit = transit
        self.pluresync = pluresync
        self.keyfile = keyfile


def _peer(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, str(HERE / "peer.py"), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        text=True,
    )


def _ready_port(proc: subprocess.Popen, timeout: float) -> int:
    # The READY line comes first; a listener that dies says why on stderr.
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if not line.startswith("READY ") or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"listener did not get ready: {line!r} {proc.stderr.read()[-2000:]}")
    return int(line.split()[1])


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"peer {proc.args[2:]} did not finish in {timeout} s") from None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            if "error" in result:
                raise RuntimeError(f"peer {proc.args[3:6]} failed: {result['error']}\n{err[-2000:]}")
            return result
    raise RuntimeError(f"peer {proc.args[2:]} printed no result (rc {proc.returncode}):\n{err[-3000:]}")


def run_pair(
    path: str,
    relays: Relays,
    listen_role: str,
    connect_role: str,
    extra: list[str],
    timeout: float,
    profile_prefix: str | None = None,
) -> tuple[dict, dict, float]:
    """
    Run a listening and a connecting peer over `path`; return both results
    and the CPU seconds the relay process (if any) used meanwhile.
    """
    extra = [*extra, "--timeout", str(timeout)]
    forward = None
    procs: list[subprocess.Popen] = []
    try:
        if path in ("direct", "portforward"):
            common = ["--transport", "tcp"]
        elif path == "transit":
            common = [
                "--transport",
                "transit",
                "--port",
                str(relays.transit.port),
                "--token",
                f"{time.time_ns():064x}"[-64:],
            ]
        else:
            common = [
                "--transport",
                "pluresync",
                "--port",
                str(relays.pluresync.port),
                "--keyfile",
                str(relays.keyfile),
            ]
        if profile_prefix:
            listener_extra = [*extra, "--profile", f"{profile_prefix}-{listen_role}.prof"]
            extra = [*extra, "--profile", f"{profile_prefix}-{connect_role}.prof"]
        else:
            listener_extra = extra
        listener = _peer([*common, "--role", listen_role, *listener_extra])
        procs.append(listener)
        port = _ready_port(listener, 30)
        if path == "direct":
            common = [*common, "--port", str(port)]
        elif path == "portforward":
            forward = portforward(port, relays.scratch)
            common = [*common, "--port", str(forward.port)]
        relay = {"direct": None, "portforward": forward, "transit": relays.transit, "pluresync": relays.pluresync}[path]
        cpu_before = relay.cpu_seconds() if relay is not None else 0.0
        connector = _peer([*common, "--role", connect_role, *extra])
        procs.append(connector)
        connected = _result(connector, timeout + 10)
        listened = _result(listener, timeout + 10)
        relay_cpu = relay.cpu_seconds() - cpu_before if relay is not None else 0.0
        return listened, connected, relay_cpu
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if forward is not None:
            forward.stop()
