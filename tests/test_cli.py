"""The C{pluresync} command (the parts that exist so far)."""

from __future__ import annotations

import io
import os
import stat
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from pluresync.cli import main
from pluresync.keys import SyncKey


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
