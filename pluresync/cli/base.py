"""
What every C{pluresync} command shares: the option base class and the one
exception type that becomes a one-line error.

Kept apart from the command modules so each of them imports only this and
the library, never each other.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from pluresync import __version__


class CommandError(Exception):
    """
    A failure the command has already put into words for the user; it is
    printed as C{pluresync: error: MESSAGE} and the command exits 1.
    """


class BaseOptions(usage.Options):
    """
    usage.Options with pluresync's C{--version} instead of Twisted's, and the
    C{--debug}/C{--quiet} flags every command takes (so they can be written
    after the command name, where people put them).
    """

    optFlags = [
        ["debug", None, "Show tracebacks for errors, and debug log messages."],
        ["quiet", "q", "Log nothing but errors."],
    ]

    def opt_version(self) -> None:
        """Print pluresync's version and exit."""
        print(f"pluresync {__version__}")
        sys.exit(0)


class EndpointArgument:
    """
    A mixin for commands that take exactly one positional ENDPOINT argument;
    usage.Options turns a wrong count into a usage error (exit 2).
    """

    endpoint: str

    def parseArgs(self, endpoint: str) -> None:  # noqa: N802 (Twisted's name)
        self.endpoint = endpoint


def describe_address(address) -> str:
    """
    An address as people read it: C{relay:azure peer e73237fbda33665e…} for
    a pluresync peer, C{127.0.0.1:2222} for TCP, the C{repr} otherwise.
    """
    if getattr(address, "peer_id", None) is not None or hasattr(address, "transport"):
        return str(address)
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
