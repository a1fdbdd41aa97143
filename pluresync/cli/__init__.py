"""
The C{pluresync} command.

Each subcommand is a C{usage.Options} in its own module (keygen.py: keygen
and peer-id; netcat.py: listen and connect; forward.py: expose and forward).
Errors are one line on stderr, C{pluresync: error: ...}, exit 1 (usage
errors exit 2); the traceback only with C{--debug}. Secrets are never printed
unless asked for (C{keygen} without C{--out} prints the new key, since that
is its job).

Commands that touch the network are C{command(reactor, options) ->
Deferred[int]}, run under C{twisted.internet.task.react}, which provides the
reactor; the others are plain C{options.run() -> int}.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python import usage
from twisted.python.failure import Failure

from pluresync.cli.base import BaseOptions, CommandError
from pluresync.cli.forward import ExposeOptions, ForwardOptions, expose_command, forward_command
from pluresync.cli.keygen import KeygenOptions, PeerIdOptions
from pluresync.cli.netcat import ConnectOptions, ListenOptions, connect_command, listen_command

__all__ = ["Options", "main"]

#: Exit code of a one-shot command stopped by a signal (Ctrl-C) before it finished.
INTERRUPTED = 130

#: Network commands: name -> (command(reactor, options), exit code when stopped by a signal).
#: expose and forward (and listen --keep-open) run until stopped, so that is a normal end for them.
_NETWORK: dict[str, tuple[Callable[..., Deferred], int]] = {
    "listen": (lambda reactor, options: Deferred.fromCoroutine(listen_command(reactor, options)), INTERRUPTED),
    "connect": (lambda reactor, options: Deferred.fromCoroutine(connect_command(reactor, options)), INTERRUPTED),
    "expose": (expose_command, 0),
    "forward": (forward_command, 0),
}

_SUBCOMMANDS = [
    ["keygen", None, KeygenOptions, "Make a new sync key."],
    ["peer-id", None, PeerIdOptions, "Print this machine's peer id (for others' peer=)."],
    ["listen", None, ListenOptions, "Wait for a peer; stdin to it, it to stdout (netcat -l)."],
    ["connect", None, ConnectOptions, "Connect to a peer; stdin to it, it to stdout (netcat)."],
    ["expose", None, ExposeOptions, "Let peers reach a local service (e.g. --to tcp:localhost:22)."],
    ["forward", None, ForwardOptions, "Reach a peer's exposed service through a local port."],
]

# Written separately; registered only where they exist. doctor is a network
# command (doctor_command(reactor, options)); relay-token has options.run().
try:
    from pluresync.doctor import DoctorOptions, doctor_command
except ImportError:
    pass
else:
    _SUBCOMMANDS.append(["doctor", None, DoctorOptions, "Check the way to the relays, step by step."])
    _NETWORK["doctor"] = (doctor_command, INTERRUPTED)


try:
    from pluresync.relay.server.tokencli import RelayTokenOptions
except ImportError:
    pass
else:
    _SUBCOMMANDS.append(["relay-token", None, RelayTokenOptions, "Mint a relay token (for relay operators)."])


class Options(BaseOptions):
    synopsis = "Usage: pluresync COMMAND [options]"
    longdesc = (
        "End-to-end encrypted peer-to-peer connections. Run `pluresync COMMAND --help` "
        "for a command's options; docs/cli.md has examples."
    )
    subCommands = _SUBCOMMANDS

    def getSynopsis(self) -> str:
        # A command's help starts with ours: "Usage: pluresync listen ...".
        return "Usage: pluresync" if getattr(self, "subCommand", None) else self.synopsis

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command (try --help)")

    def flag(self, name: str) -> bool:
        """A flag given before or after the command's name."""
        return bool(self.get(name) or (self.subOptions is not None and self.subOptions.get(name)))


def _describe(error: BaseException) -> str:
    """An exception as the rest of the error line: its message, with its type if the message is unclear."""
    if isinstance(error, (CommandError, ValueError, OSError)) or type(error).__module__.startswith("pluresync"):
        return str(error) or type(error).__name__
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _report(failure: Failure, debug: bool) -> int:
    if debug:
        failure.printTraceback(file=sys.stderr)
    print(f"pluresync: error: {_describe(failure.value)}", file=sys.stderr)
    return 1


#: How long a network command's exit waits for its connections to finish closing.
DRAIN_SECONDS = 5.0
_DRAIN_STEP = 0.01


def _open_connections(reactor) -> list:
    """This process's TCP connections the reactor still drives (stdio and listening ports are not connections)."""
    from twisted.internet.tcp import Connection

    return [s for s in {*reactor.getReaders(), *reactor.getWriters()} if isinstance(s, Connection)]


async def drain(reactor, limit: float = DRAIN_SECONDS) -> None:
    """
    Let what the command handed its connections leave the process before it
    exits, on every exit path: a refused handshake, for one, writes its
    abort notice and a WebSocket close and fails at once, and stopping the
    reactor then would drop both (the peer would hear its relay's
    C{peer-gone} instead of the refusal).  A connection has finished
    closing when the reactor stops driving it; one that does not within
    C{limit} seconds (the relay pipes' own close-handshake timeout) is left
    to the exit.  The reactor gives no event for "every connection is
    gone", so this polls, a bounded number of times.
    """
    from twisted.internet.task import deferLater

    for _ in range(int(limit / _DRAIN_STEP)):
        if not _open_connections(reactor):
            return
        await deferLater(reactor, _DRAIN_STEP, lambda: None)


def _run_network(name: str, options: Options) -> int:
    """Run a network command under C{react}; its result (or error) becomes the exit code."""
    from twisted.internet import task

    from pluresync.cli.logs import start_logging

    command, interrupted = _NETWORK[name]
    if options.subOptions.get("keep-open"):
        interrupted = 0  # serving until stopped is what it was asked to do
    debug = options.flag("debug")
    codes: list[int] = []

    def run(reactor) -> Deferred:
        start_logging(sys.stderr, debug=debug, quiet=options.flag("quiet"))
        d = maybeDeferred(command, reactor, options.subOptions)
        d.addCallbacks(
            lambda code: codes.append(0 if code is None else int(code)), lambda f: codes.append(_report(f, debug))
        )
        d.addCallback(lambda _: Deferred.fromCoroutine(drain(reactor)))
        return d

    try:
        task.react(run)
    except SystemExit:
        pass
    if codes:
        return codes[0]
    if interrupted:
        print("pluresync: interrupted", file=sys.stderr)
    return interrupted


def main(argv: list[str] | None = None) -> int:
    """The console script: parse, run one command, return its exit code."""
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"pluresync: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    name = options.subCommand
    if name in _NETWORK:
        return _run_network(name, options)
    try:
        return options.subOptions.run()
    except Exception as e:
        if options.flag("debug"):
            traceback.print_exc()
        print(f"pluresync: error: {_describe(e)}", file=sys.stderr)
        return 1
