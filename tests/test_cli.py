"""The C{pluresync} command: parsing, help, errors, keygen, peer-id, and the pieces the network commands share."""

from __future__ import annotations

import io
import os
import stat
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pluresync.cli import main
from pluresync.cli.home import ensure_identity, home, with_identity
from pluresync.cli.logs import LineObserver
from pluresync.cli.progress import Progress, format_bytes, format_duration
from pluresync.keys import PeerIdentity, SyncKey


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class KeygenTests(SynchronousTestCase):
    """pluresync keygen."""

    def test_out_writes_a_private_file(self):
        """--out writes a 0600 key file and prints only its fingerprint."""
        path = self.mktemp()
        code, out, _ = run("keygen", "--out", path)
        self.assertEqual(code, 0)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        key = SyncKey.from_file(path)
        self.assertIn(key.fingerprint(), out)
        self.assertNotIn(key.to_text(), out)

    def test_never_overwrites(self):
        """An existing file is an error on one line, and stays as it was."""
        path = self.mktemp()
        run("keygen", "--out", path)
        before = open(path).read()
        code, _, err = run("keygen", "--out", path)
        self.assertEqual(code, 1)
        self.assertIn("exists already", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(open(path).read(), before)

    def test_stdout(self):
        """Without --out the key is printed."""
        code, out, _ = run("keygen")
        self.assertEqual(code, 0)
        SyncKey.from_text(out)

    def test_no_command(self):
        """No command is a usage error."""
        code, _, err = run()
        self.assertEqual(code, 2)
        self.assertIn("command", err)


class HelpTests(SynchronousTestCase):
    """--help on every command."""

    COMMANDS = {
        "keygen": ["--out"],
        "peer-id": ["--debug"],
        "listen": ["--keep-open", "--progress", "ENDPOINT"],
        "connect": ["--progress", "ENDPOINT"],
        "expose": ["--to", "ENDPOINT"],
        "forward": ["--listen", "ENDPOINT", "interface=127.0.0.1"],
    }

    def test_top_level(self):
        """pluresync --help exits 0 and lists every command."""
        code, out, _ = run("--help")
        self.assertEqual(code, 0)
        for command in self.COMMANDS:
            self.assertIn(command, out)

    def test_every_command(self):
        """Each command's --help exits 0, names the command and mentions its options."""
        for command, words in self.COMMANDS.items():
            code, out, err = run(command, "--help")
            self.assertEqual((code, err), (0, ""), command)
            self.assertIn(f"Usage: pluresync {command}", out)
            for word in [*words, "--quiet", "--help"]:
                self.assertIn(word, out, f"{command} --help does not mention {word}")

    def test_every_registered_command(self):
        """Every command the parser knows (doctor too, where it exists) answers --help with exit 0."""
        from pluresync.cli import Options

        for name, *_ in Options.subCommands:
            code, out, _ = run(name, "--help")
            self.assertEqual(code, 0, name)
            self.assertIn("--help", out)

    def test_version(self):
        """--version prints the version."""
        from pluresync.version import __version__

        code, out, _ = run("--version")
        self.assertEqual((code, out.strip()), (0, f"pluresync {__version__}"))


class UsageErrorTests(SynchronousTestCase):
    """Mistakes on the command line: one line, exit 2, nothing run."""

    def test_missing_endpoint(self):
        """listen without ENDPOINT."""
        code, _, err = run("listen")
        self.assertEqual(code, 2)
        self.assertEqual(err, "pluresync: error: Wrong number of arguments.\n")

    def test_required_options(self):
        """expose needs --to, forward needs --listen."""
        self.assertEqual(run("expose", "relay:azure")[0], 2)
        code, _, err = run("forward", "relay:azure")
        self.assertEqual(code, 2)
        self.assertIn("--listen is required", err)
        self.assertIn("interface=127.0.0.1", err)

    def test_unknown_command(self):
        """An unknown command."""
        code, _, err = run("frobnicate")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.splitlines()), 1)


class PeerIdTests(SynchronousTestCase):
    """pluresync peer-id and the machine's identity."""

    def setUp(self):
        self.home = Path(self.mktemp()).resolve() / "home"
        old = os.environ.get("PLURESYNC_HOME")
        os.environ["PLURESYNC_HOME"] = str(self.home)
        self.addCleanup(
            lambda: os.environ.pop("PLURESYNC_HOME") if old is None else os.environ.update(PLURESYNC_HOME=old)
        )

    def test_created_private_and_stable(self):
        """The first run makes a 0700 directory and a 0600 identity; every run prints the same id."""
        code, first, _ = run("peer-id")
        self.assertEqual(code, 0)
        self.assertEqual(stat.S_IMODE(os.stat(self.home).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.home / "identity").st_mode), 0o600)
        self.assertEqual(run("peer-id")[1], first)
        self.assertEqual(first.strip(), PeerIdentity.from_file(self.home / "identity").peer_id)
        self.assertNotIn("psid1", first)  # the id, never the private key

    def test_unreadable_identity_is_one_line(self):
        """A broken identity file is an error on one line, exit 1."""
        self.home.mkdir(parents=True)
        (self.home / "identity").write_text("psk1-not-an-identity\n")
        code, out, err = run("peer-id")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertTrue(err.startswith("pluresync: error: this is not a pluresync identity"))


class WithIdentityTests(SynchronousTestCase):
    """The machine's identity added to relay:/auto: endpoint strings."""

    def identity(self, directory: str = "home") -> Path:
        base = Path(self.mktemp()).resolve() / directory
        base.mkdir(parents=True)
        return base / "identity"

    def test_added_escaped(self):
        """relay:, direct: and auto: strings without identity= get it (created now), with : and \\ escaped."""
        path = self.identity("a:b")
        quoted = str(path).replace(":", "\\:")
        self.assertEqual(with_identity("relay:azure:keyfile=k", path), f"relay:azure:keyfile=k:identity={quoted}")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(with_identity("auto:keyfile=k", path), f"auto:keyfile=k:identity={quoted}")
        self.assertEqual(with_identity("direct:keyfile=k", path), f"direct:keyfile=k:identity={quoted}")
        self.assertEqual(os.listdir(path.parent), ["identity"])  # no temporary file left behind

    def test_left_alone(self):
        """A string with its own identity=, or of another type, is unchanged (and no identity is made)."""
        path = self.identity()
        for description in ("relay:azure:identity=mine", "tcp:2222:interface=127.0.0.1", "relay\\:odd", "unix:/s"):
            self.assertEqual(with_identity(description, path), description)
        self.assertFalse(path.exists())

    def test_escaped_colons_do_not_split(self):
        """An escaped colon in a value is not a separator (url=ws\\://...)."""
        path = self.identity()
        description = "relay:url=ws\\://h\\:1:keyfile=k"
        self.assertEqual(with_identity(description, path), f"{description}:identity={path}")

    def test_existing_identity_is_kept(self):
        """An identity that exists is used as it is."""
        path = self.identity()
        mine = PeerIdentity.from_file(path, create=True)
        self.assertEqual(ensure_identity(path), mine)

    def test_home(self):
        """PLURESYNC_HOME, else ~/.pluresync."""
        self.assertEqual(home({"PLURESYNC_HOME": "/srv/p"}), Path("/srv/p"))
        self.assertEqual(home({}), Path("~/.pluresync").expanduser())


class ProgressTests(SynchronousTestCase):
    """The --progress display."""

    def test_formats(self):
        """Bytes in binary units, durations in seconds or M:SS."""
        self.assertEqual(format_bytes(512), "512 B")
        self.assertEqual(format_bytes(5 * 1024 * 1024), "5.0 MiB")
        self.assertEqual(format_duration(3.25), "3.2 s")
        self.assertEqual(format_duration(125), "2:05")
        self.assertEqual(format_duration(3725), "1:02:05")

    def test_live_line_throttled(self):
        """On a terminal: one line rewritten with \\r at most 4 times a second, then a summary line."""
        clock, stream, counts = Clock(), io.StringIO(), [0, 0]
        progress = Progress(clock, stream, lambda: tuple(counts), live=True)
        progress.start()
        counts[0] = 1024 * 1024
        clock.advance(0.1)
        self.assertEqual(stream.getvalue(), "")
        clock.advance(0.15)
        self.assertEqual(stream.getvalue(), "\rpluresync: sent 1.0 MiB, received 0 B, 4.0 MiB/s, 0.2 s")
        for _ in range(4):
            clock.advance(0.25)
        self.assertEqual(stream.getvalue().count("\r"), 5)
        self.assertNotIn("\n", stream.getvalue())
        progress.stop()
        self.assertTrue(stream.getvalue().endswith("pluresync: sent 1.0 MiB, received 0 B in 1.2 s (819.2 KiB/s)\n"))
        clock.advance(10)
        self.assertEqual(stream.getvalue().count("\n"), 1)

    def test_plain_lines(self):
        """Not a terminal: a plain line every few seconds, no \\r, and the summary."""
        clock, stream = Clock(), io.StringIO()
        progress = Progress.for_stream(clock, stream, lambda: (10, 20))
        progress.start()
        clock.advance(1)
        self.assertEqual(stream.getvalue(), "")
        clock.advance(4)
        progress.stop()
        self.assertEqual(
            stream.getvalue(),
            "pluresync: sent 10 B, received 20 B, 6 B/s, 5.0 s\npluresync: sent 10 B, received 20 B in 5.0 s (6 B/s)\n",
        )


class LogTests(SynchronousTestCase):
    """Log lines of the network commands."""

    def lines(self, events, **flags) -> str:
        stream = io.StringIO()
        observer = LineObserver(stream, **flags)
        for event in events:
            observer(event)
        return stream.getvalue()

    def event(self, level, namespace, text, **extra):
        return {"log_level": level, "log_namespace": namespace, "log_format": text, **extra}

    def test_levels(self):
        """Ours at info, anyone's warnings; Twisted's info chatter only with --debug; --quiet keeps errors."""
        events = [
            self.event(LogLevel.info, "pluresync.cli.forward", "connection 1 closed"),
            self.event(LogLevel.info, "twisted.internet.tcp", "Starting factory"),
            self.event(LogLevel.warn, "pluresync.endpoints.relay", "lost the registration"),
            self.event(LogLevel.error, "twisted", "it broke"),
        ]
        self.assertEqual(
            self.lines(events),
            "pluresync: connection 1 closed\npluresync: warning: lost the registration\npluresync: error: it broke\n",
        )
        self.assertIn("Starting factory", self.lines(events, debug=True))
        self.assertEqual(self.lines(events, quiet=True), "pluresync: error: it broke\n")

    def test_failure_without_traceback(self):
        """A logged failure adds its message, and its traceback only with --debug."""
        try:
            raise ValueError("bad value")
        except ValueError:
            failure = Failure()
        event = self.event(LogLevel.critical, "pluresync", "oops", log_failure=failure)
        self.assertEqual(self.lines([event]), "pluresync: error: oops: bad value\n")
        self.assertIn("Traceback", self.lines([event], debug=True))
