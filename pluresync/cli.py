"""
The C{pluresync} command.

Each subcommand is a C{usage.Options}; errors are one line on stderr (the
traceback only with C{--debug}), and secrets are never printed unless asked
for (C{keygen} without C{--out} prints the new key, since that is its job).
"""

from __future__ import annotations

import sys

from twisted.python import usage

from pluresync._version import __version__
from pluresync.errors import PluresyncError
from pluresync.keys import SyncKey


class _Options(usage.Options):
    """usage.Options without Twisted's own --version (ours is on the top level)."""

    def opt_version(self) -> None:
        """Print pluresync's version and exit."""
        print(f"pluresync {__version__}")
        sys.exit(0)


class KeygenOptions(_Options):
    synopsis = "pluresync keygen [--out PATH]"
    longdesc = (
        "Make a new random sync key. With --out, write it to a new file readable "
        "only by you (mode 0600; an existing file is never overwritten) and print "
        "its fingerprint; without, print the key itself."
    )
    optParameters = [["out", "o", None, "Write the key to this new file."]]

    def run(self) -> int:
        key = SyncKey.generate()
        if self["out"]:
            key.write(self["out"])
            print(f"wrote a new sync key to {self['out']} (fingerprint {key.fingerprint()})")
        else:
            print(key.to_text())
        return 0


class Options(_Options):
    synopsis = "pluresync COMMAND [options]"
    longdesc = "End-to-end encrypted peer-to-peer connections (see docs/)."
    optFlags = [["debug", None, "Show tracebacks for errors."]]
    subCommands = [["keygen", None, KeygenOptions, "Make a new sync key."]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command (try --help)")


def main(argv: list[str] | None = None) -> int:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"pluresync: {e}", file=sys.stderr)
        return 2
    try:
        return options.subOptions.run()
    except (PluresyncError, OSError) as e:
        if options["debug"]:
            raise
        print(f"pluresync: error: {e}", file=sys.stderr)
        return 1
