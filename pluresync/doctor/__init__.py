"""
C{pluresync doctor}: diagnose the network path to the relays.

For each configured transport (one C{relay:} endpoint, each path of an
C{auto:} endpoint or of a seed config file, or the default C{auto:}) it
checks, in order and each within C{--timeout} seconds: DNS, TCP (to the
relay or to its HTTP proxy), the proxy's CONNECT tunnel, TLS (with the
certificate and a hint when it looks like a TLS-inspecting proxy's), the
WebSocket upgrade with subprotocol C{pluresync.v1}, the relay's HTTP pipe
(which works from here when WebSockets are refused), the relay's C{/health},
and a full pairing round trip with itself under a fresh random key. It prints
one table per transport and an overall verdict, and exits 0 when at least one
transport works end to end, 1 otherwise. See docs/doctor.md.

The CLI registers it as::

    from pluresync.doctor import DoctorOptions, doctor_command
    subCommands = [..., ["doctor", None, DoctorOptions, "Diagnose the network path to the relays."]]
    ... doctor_command(reactor, options.subOptions)  # a Deferred firing with the exit code
"""

from __future__ import annotations

import sys

from twisted.internet.defer import Deferred, gatherResults
from twisted.python import usage

from pluresync.doctor.checks import diagnose
from pluresync.doctor.report import Section, format_report
from pluresync.doctor.targets import targets
from pluresync.errors import ConfigurationError
from pluresync.version import __version__

__all__ = ["DEFAULT_TIMEOUT", "DoctorOptions", "doctor_command", "run_doctor"]

#: Seconds each check may take, unless --timeout says otherwise.
DEFAULT_TIMEOUT = 10.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise ValueError(f"must be more than 0 seconds, got {text!r}")
    return value


class DoctorOptions(usage.Options):
    """The options of C{pluresync doctor}."""

    # The CLI prints "Usage: pluresync doctor " before it (as for its other commands).
    synopsis = "[ENDPOINT] [--config PATH] [--timeout S]"
    longdesc = (
        "Check, step by step, whether this machine can reach the relays: DNS, TCP (or the HTTP proxy "
        "and its CONNECT tunnel), TLS, the WebSocket upgrade, the relay's /health, and a full pairing "
        "round trip with itself (under a fresh random key, so it never meets real peers). ENDPOINT is "
        "a relay: or auto: endpoint string (default: auto:, with PLURESYNC_KEY and PLURESYNC_RELAY*); "
        "--config checks the relays of a seed JSON config file. Exits 0 if at least one transport "
        "works end to end, 1 if none does. Never prints the sync key or a proxy password."
    )
    optParameters = [
        ["config", "c", None, "Check the relays of this seed JSON config file (as auto:config=PATH)."],
        ["timeout", "t", DEFAULT_TIMEOUT, "Seconds each check may take.", _seconds],
    ]

    #: Where the report goes (default: sys.stdout at run time); tests set it.
    out = None

    def parseOptions(self, options=None) -> None:
        """
        As C{usage.Options.parseOptions}, but options may also follow the
        ENDPOINT (C{pluresync doctor relay:azure --timeout 5}), as people type them.
        """
        if options is None:
            options = sys.argv[1:]
        takes_value = {"--config", "-c", "--timeout", "-t"}
        flags: list[str] = []
        positional: list[str] = []
        args = iter(options)
        for arg in args:
            if arg == "--":
                positional += list(args)
                break
            if arg.startswith("-") and arg != "-":
                flags.append(arg)
                if arg in takes_value:
                    value = next(args, None)
                    if value is not None:  # else getopt says the option needs a value
                        flags.append(value)
            else:
                positional.append(arg)
        super().parseOptions(flags + (["--"] if positional else []) + positional)

    def parseArgs(self, endpoint: str | None = None) -> None:
        self["endpoint"] = endpoint

    def opt_version(self) -> None:
        """Print pluresync's version and exit."""
        print(f"pluresync {__version__}")
        sys.exit(0)


def _header(source: str, paths: int, timeout: float) -> str:
    return (
        f"pluresync doctor {__version__}: {paths} transport{'s' if paths != 1 else ''} "
        f"from {source}; each check within {timeout:g} s"
    )


async def run_doctor(reactor, endpoint: str | None, config: str | None, timeout: float, out) -> int:
    """Check every transport (concurrently; the checks of one in order), print the report, return the exit code."""
    try:
        found = targets(endpoint, config)
    except (ConfigurationError, ValueError) as e:
        # Never the endpoint string itself: it may hold a key.
        out.write(f"pluresync doctor: configuration error: {e}\n")
        out.write("overall: FAIL: fix the configuration first (see docs/endpoints.md)\n")
        return 1
    checks = [Deferred.fromCoroutine(diagnose(reactor, path, timeout)) for path in found.paths]
    if found.stun is not None:
        from pluresync.doctor.direct import diagnose_direct

        checks.append(Deferred.fromCoroutine(diagnose_direct(reactor, found.stun, timeout)))
    sections: list[Section] = await gatherResults(checks)
    colour = bool(getattr(out, "isatty", lambda: False)())
    text, code = format_report(_header(found.source, len(found.paths), timeout), sections, colour, found.notes)
    out.write(text)
    flush = getattr(out, "flush", None)
    if flush is not None:
        flush()
    return code


def doctor_command(reactor, options: DoctorOptions) -> Deferred[int]:
    """
    Run C{pluresync doctor} with parsed C{options}: print the report to
    C{options.out} (default stdout) and fire with the exit code, 0 when at
    least one transport works end to end, 1 when none does.
    """
    out = getattr(options, "out", None) or sys.stdout
    return Deferred.fromCoroutine(
        run_doctor(
            reactor,
            options.get("endpoint"),
            options.get("config"),
            float(options.get("timeout") or DEFAULT_TIMEOUT),
            out,
        )
    )
