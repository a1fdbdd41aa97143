"""
Cold start: what a fresh process pays to import pluresync.

Three kinds of process start pluresync cold, and each is paid again and again:
every C{twist} or C{clientFromString} process scans Twisted's plugins (which
imports C{twisted/plugins/pluresync_endpoints.py}), and the Vercel function
imports the ASGI app on every cold start of an instance. So this runs each
case as a fresh process, N times, interleaved (so drift on the machine hits
every case alike), with C{python -c pass} as the baseline in the same run,
and prints the median wall time and the largest peak RSS of each.

    python bench/coldstart.py                     # this checkout, 10 runs each
    python bench/coldstart.py -n 20 --source before=/tmp/old --source after=.

C{--source NAME=DIR} measures the pluresync tree in DIR (put first on
C{PYTHONPATH}, and the processes run in DIR), so two trees can be compared
in one run; the installed dependencies are those of this interpreter. One
more, untimed, run of each case reports how many modules it loaded and which
of the heavy ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What a light import must not load; the probe run reports which of these did.
HEAVY = (
    "pluresync.api",
    "nacl",
    "autobahn",
    "treq",
    "txaio",
    "twisted",
    "twisted.internet.defer",
    "twisted.internet.reactor",
)

#: The ASGI cold start: what the Vercel function does when an instance
#: starts, i.e. run its entry module deploy/vercel/api/relay.py (import the
#: app, create it from the environment). Run from the file (the process runs
#: in the measured tree), so each tree is measured with its own entry.
ASGI = (
    "import os\n"
    "os.environ.update(PLURESYNC_REDIS_URL='redis://127.0.0.1:1/0', PLURESYNC_AUTH='open')\n"
    "entry = 'deploy/vercel/api/relay.py'\n"
    "exec(compile(open(entry).read(), entry, 'exec'), {'__name__': 'relay'})\n"
)

#: name -> code run by C{python -c}; None means the C{twist --help} command.
CASES: dict[str, str | None] = {
    "python -c pass": "pass",
    "import pluresync": "import pluresync",
    # What Twisted's plugin scan loads before it reaches any plugin module:
    # the part of the plugin case that is not pluresync's.
    "twisted.plugin (scan itself)": "import twisted.plugin",
    "endpoint plugin module": "import twisted.plugins.pluresync_endpoints",
    "ASGI cold start": ASGI,
    "twist --help": None,
}

_TWIST = (
    "import sys\n"
    "from twisted.application.twist._twist import Twist\n"
    "try:\n"
    "    Twist.main(['twist', '--help'])\n"
    "except SystemExit:\n"
    "    pass\n"
)

_PROBE = (
    "import sys\n"
    "loaded = len(sys.modules)\n"
    "import json\n"
    "print(json.dumps({{'modules': loaded, 'heavy': [m for m in {heavy!r} if m in sys.modules]}}))\n"
)


def _command(code: str | None) -> list[str]:
    if code is None:
        twist = Path(sys.executable).with_name("twist")
        return [str(twist), "--help"] if twist.exists() else [sys.executable, "-m", "twisted", "--help"]
    return [sys.executable, "-c", code]


def _environment(source: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(source)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PYTHONSTARTUP", None)
    return env


def run_once(code: str | None, source: Path) -> tuple[float, float]:
    """One fresh process: (wall ms, peak RSS MiB), from fork to reaped."""
    start = time.perf_counter()
    process = subprocess.Popen(
        _command(code), cwd=source, env=_environment(source), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = (time.perf_counter() - start) * 1000
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{_command(code)} failed in {source} ({process.returncode}):\n{error}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def probe(code: str | None, source: Path) -> dict:
    """What the case loaded: the module count and the heavy modules present."""
    body = (_TWIST if code is None else code) + "\n" + _PROBE.format(heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", body], cwd=source, env=_environment(source), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="timed runs of each case (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (bytecode, dropin.cache)")
    parser.add_argument(
        "--source", action="append", default=[], metavar="NAME=DIR", help="a pluresync tree to measure (repeatable)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the raw results")
    options = parser.parse_args(argv)
    sources = {}
    for spec in options.source or [f"this checkout={ROOT}"]:
        name, _, directory = spec.rpartition("=")
        sources[name or directory] = Path(directory).resolve()

    runs: dict[tuple[str, str], list[tuple[float, float]]] = {(s, c): [] for s in sources for c in CASES}
    for round_ in range(options.warmup + options.n):
        for source_name, source in sources.items():
            for case, code in CASES.items():
                result = run_once(code, source)
                if round_ >= options.warmup:
                    runs[source_name, case].append(result)
        print(f"round {round_ + 1}/{options.warmup + options.n}", file=sys.stderr)

    print(f"Python {sys.version.split()[0]}, median of {options.n} fresh processes each, interleaved\n")
    print("| tree | case | median ms | over `python -c pass` ms | max RSS MiB | modules | heavy modules loaded |")
    print("|---|---|---:|---:|---:|---:|---|")
    results = []
    for source_name, source in sources.items():
        baseline = statistics.median(w for w, _ in runs[source_name, "python -c pass"])
        for case, code in CASES.items():
            walls = [w for w, _ in runs[source_name, case]]
            rss = max(r for _, r in runs[source_name, case])
            loaded = probe(code, source)
            median = statistics.median(walls)
            heavy = ", ".join(loaded["heavy"]) or "none"
            print(
                f"| {source_name} | {case} | {median:.0f} | {median - baseline:+.0f} | {rss:.1f} "
                f"| {loaded['modules']} | {heavy} |"
            )
            results.append({"tree": source_name, "case": case, "wall_ms": walls, "max_rss_mib": rss, **loaded})
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
