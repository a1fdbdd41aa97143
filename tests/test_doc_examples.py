"""
Every code example in README.md and docs/ is run, so none can rot.

The rules a document follows:
 - a ```python block that calls C{task.react} is a whole program: it is run
   (unless it is quoted from docs/examples/, whose files have their own tests)
   (in a temporary directory holding C{demo.key}, with the documented
   C{ws://127.0.0.1:8080} relay replaced by one the test started), and must
   exit 0;
 - any other ```python block must say ```python fragment: it is compiled
   (inside an C{async def}, so C{await} is allowed) and its imports are run,
   so every name it imports from pluresync or Twisted exists;
 - in ```sh blocks, every C{pluresync ...} and C{twist pluresync-relay ...}
   command line has its options parsed by the real option parsers;
 - blocks with another language (json, or none) are data or output.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from pluresync.keys import SyncKey

from .localrelay import LocalRelay
from .processes import ROOT, spawn

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
DOCUMENTED_RELAY = "ws://127.0.0.1:8080"


def blocks(kind: str):
    """(document, line, info string, code) of every block whose language is C{kind}."""
    for document in DOCUMENTS:
        text = document.read_text("utf-8")
        for match in BLOCK.finditer(text):
            info = match.group(1).strip()
            if info.split(" ")[0] == kind:
                line = text.count("\n", 0, match.start()) + 1
                yield document.relative_to(ROOT), line, info, match.group(2)


EXAMPLES = {path: path.read_text("utf-8") for path in sorted((ROOT / "docs" / "examples").glob("*.py"))}


def programs():
    """
    Whole programs to run here; a block quoted from docs/examples/ is left
    out: the example file itself is run by its own test (test_programs,
    test_docs), with the arguments and peers it needs.
    """
    return [
        b for b in blocks("python") if "task.react(" in b[3] and not any(b[3] in text for text in EXAMPLES.values())
    ]


class FragmentTests(SynchronousTestCase):
    """Python blocks that are not whole programs."""

    def test_fragments_are_marked_and_compile(self):
        """Each non-program python block says `fragment`, compiles, and its imports resolve."""
        problems = []
        for document, line, info, code in blocks("python"):
            if "task.react(" in code:
                continue
            where = f"{document}:{line}"
            if info != "python fragment":
                problems.append(f"{where}: a python block that is not a whole program must say ```python fragment")
                continue
            try:
                tree = ast.parse("async def _example():\n" + textwrap.indent(code, "    "))
            except SyntaxError as e:
                problems.append(f"{where}: does not compile: {e}")
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    try:
                        exec(compile(ast.Module([node], []), where, "exec"), {})
                    except Exception as e:
                        problems.append(f"{where}: {ast.unparse(node)}: {e}")
        self.assertEqual(problems, [])


class ProgramTests(TestCase):
    """Python blocks that are whole programs: each is run against a real relay."""

    timeout = 120

    async def test_programs_run(self):
        """Every whole-program example exits 0 (and they exist: the docs show at least one)."""
        found = programs()
        self.assertTrue(found, "the docs have no runnable python example")
        relay = LocalRelay(self)
        for document, line, _, code in found:
            work = Path(self.mktemp()).resolve()
            work.mkdir(parents=True)
            SyncKey.generate().write(work / "demo.key")
            (work / "example.py").write_text(code.replace(DOCUMENTED_RELAY, relay.url))
            child = spawn(self, [str(work / "example.py")], cwd=work, env={"RELAY_URL": relay.url})
            code_ = await child.ended
            self.assertEqual(code_, 0, f"{document}:{line} failed: {child.err.decode()[-1500:]}")


def _commands():
    """Every `pluresync ...` / `twist pluresync-relay ...` line of the sh blocks."""
    for document, line, _, code in blocks("sh"):
        # Join continuation lines (a trailing backslash) into one command.
        lines = code.replace("\\\n", " ").splitlines()
        for offset, raw in enumerate(lines):
            text = raw.strip()
            text = text[2:] if text.startswith("$ ") else text
            text = text.split("  #")[0].strip()
            if not text or text.startswith("#"):
                continue
            for part in re.split(r"\s*(?:&&|\|\|?|;)\s*", text):
                words = shlex.split(part)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                if words and Path(words[0]).name in ("pluresync", "twist"):
                    yield f"{document}:{line + offset + 1}", words


class ShellCommandTests(SynchronousTestCase):
    """The command lines the docs tell people to type."""

    def test_command_lines_parse(self):
        """Each documented pluresync / twist pluresync-relay command line is accepted by its parser."""
        from twisted.python import usage

        from pluresync.cli import Options as CLIOptions
        from pluresync.relay.server.service import Options as RelayOptions

        problems = []
        for where, words in _commands():
            program, args = Path(words[0]).name, words[1:]
            try:
                if program == "twist":
                    if not args or args[0] != "pluresync-relay":
                        continue
                    RelayOptions().parseOptions(args[1:])
                else:
                    options = CLIOptions()
                    options.parseOptions(args)
            except (usage.UsageError, SystemExit) as e:
                if isinstance(e, SystemExit) and e.code in (0, None):
                    continue
                problems.append(f"{where}: {' '.join(words)}: {e}")
        self.assertEqual(problems, [])
        self.assertTrue(list(_commands()))


if sys.platform == "win32":  # pragma: no cover
    del ProgramTests
