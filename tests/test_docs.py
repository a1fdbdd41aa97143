"""
The user documentation keeps its promises: its examples run as written
against a real relay, its relative links lead to files that exist, and the
endpoint reference names every parameter the parser accepts.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from pluresync.endpoints.parsers import DIRECT_PARAMETERS, DIRECT_RELAY_PARAMETERS, RELAY_PARAMETERS, auto_parameters
from pluresync.keys import SyncKey

from .localrelay import LocalRelay
from .processes import ROOT, spawn

DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(markdown: str) -> list[str]:
    """
    The targets of the Markdown links in C{markdown} that are not URLs (not
    counting links inside code), as written: C{path}, C{path#anchor} or C{#anchor}.
    """
    text = _INLINE_CODE.sub("", _FENCE.sub("", markdown))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of C{markdown} (lower case, punctuation dropped, spaces to -)."""
    seen: dict[str, int] = {}
    result = set()
    for line in _FENCE.sub("", markdown).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


class ExampleTests(TestCase):
    """The example programs of docs/examples, run as the docs tell users to run them."""

    timeout = 60

    def setUp(self):
        self.relay = LocalRelay(self)
        self.keyfile = str(Path(self.mktemp()).resolve())
        SyncKey.generate().write(self.keyfile)
        self.env = {"RELAY_URL": self.relay.url, "KEYFILE": self.keyfile}

    def assertEchoed(self, child) -> None:
        """C{child} is api_echo.py's client side and printed the echoed messages in order."""
        lines = child.out.decode().splitlines()
        self.assertRegex(lines[-4], r"^connected to peer [0-9a-f]{16}\.\.\. via relay:azure$")
        self.assertEqual(lines[-3:], ["HELLO", "EACH SEND IS ONE MESSAGE", "BYE"])

    async def test_api_echo_in_one_process(self):
        """api_echo.py without arguments runs a listener and a client and prints the echoes."""
        child = spawn(self, ["docs/examples/api_echo.py"], env=self.env)
        self.assertEqual(await child.ended, 0, child.err.decode()[-2000:])
        self.assertEqual(child.out.decode().splitlines()[0], "listening")
        self.assertEchoed(child)

    async def test_api_echo_as_two_processes(self):
        """api_echo.py listen and api_echo.py connect, as two programs, talk through the relay."""
        listener = spawn(self, ["docs/examples/api_echo.py", "listen"], b"listening", self.env)
        await listener.ready
        client = spawn(self, ["docs/examples/api_echo.py", "connect"], env=self.env)
        self.assertEqual(await client.ended, 0, client.err.decode()[-2000:])
        self.assertEchoed(client)
        self.assertEqual(listener.err, b"", listener.err.decode()[-3000:])

    async def test_endpoint_client_fetches_from_twist_web(self):
        """
        endpoint_client.py gets a file from `twist web --listen relay:...`,
        the pairing shown in docs/endpoints.md.
        """
        site = Path(self.mktemp()).resolve()
        site.mkdir()
        (site / "hello.txt").write_bytes(b"hello through the relay\n")
        description = f"relay:url={self.relay.url.replace(':', chr(92) + ':')}:keyfile={self.keyfile}"
        spawn(self, ["-m", "twisted", "web", "--listen", description, "--path", str(site)])
        # wait=20: the relay holds the client until `twist web` has registered.
        client = spawn(
            self, ["docs/examples/endpoint_client.py", "/hello.txt"], env={"RELAY": description + ":wait=20"}
        )
        self.assertEqual(await client.ended, 0, client.err.decode()[-2000:])
        self.assertEqual(client.out, b"200 24 bytes\nhello through the relay\n")


class DocumentTests(SynchronousTestCase):
    """The Markdown files themselves."""

    def documents(self) -> list[Path]:
        """README.md and every docs/*.md."""
        return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

    def test_link_parser(self):
        """relative_links finds relative targets and skips URLs and code; anchors() slugs headings."""
        text = (
            "[a](docs/a.md) [b](b.md#part) [c](https://example.com) [d](#here)\n"
            '`[e](e.md)`\n```\n[f](f.md)\n```\n[g](../g.py "title")'
        )
        self.assertEqual(relative_links(text), ["docs/a.md", "b.md#part", "#here", "../g.py"])
        self.assertEqual(
            anchors("# A title\n## 5. The `peer=` part, and more\n```\n# not a heading\n```\n## A title\n"),
            {"a-title", "5-the-peer-part-and-more", "a-title-1"},
        )

    def test_relative_links_resolve(self):
        """
        Every relative link in README.md and docs/*.md points to a file or
        folder that exists, and a #anchor to a heading of that document.
        """
        broken = []
        for document in self.documents():
            for link in relative_links(document.read_text("utf-8")):
                path, _, anchor = link.partition("#")
                target = (document.parent / path) if path else document
                if not target.exists():
                    broken.append(f"{document.relative_to(ROOT)}: {link}")
                elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text("utf-8")):
                    broken.append(f"{document.relative_to(ROOT)}: {link} (no such heading)")
        self.assertEqual(broken, [])

    def test_every_endpoint_parameter_is_documented(self):
        """Each parameter the relay:, direct: and auto: parsers accept appears in docs/endpoints.md as `name=`."""
        text = (DOCS / "endpoints.md").read_text("utf-8")
        every = RELAY_PARAMETERS | DIRECT_PARAMETERS | DIRECT_RELAY_PARAMETERS | auto_parameters()
        missing = sorted(name for name in every if f"`{name}=" not in text)
        self.assertEqual(missing, [])

    def test_examples_are_referenced(self):
        """Every program in docs/examples is linked from at least one document."""
        text = "".join(document.read_text("utf-8") for document in self.documents())
        unreferenced = [p.name for p in sorted((DOCS / "examples").glob("*.py")) if f"examples/{p.name}" not in text]
        self.assertEqual(unreferenced, [])
