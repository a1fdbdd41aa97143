"""
Rules of the layout that a reader relies on, checked on the source.

 - no module of pluresync imports a private name (C{_x}) of another module,
   nor a private module;
 - no module sets a private attribute on another object (C{other._x = ...});
   an object's private state is written by that object's own methods only;
 - the pure parts (the relay core, the keys and wire rules a second relay
   front or a second client needs) import neither Twisted, Autobahn nor
   asyncio;
 - a path (the relay endpoint today, direct later) is reached only through
   the endpoints and pipes it owns: the secure layer never imports an
   endpoint or a pipe.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

PACKAGE = Path(__file__).resolve().parent.parent / "pluresync"

#: Packages whose modules must stay free of any event loop or WebSocket library.
PURE = ("relay/core",)
#: What the pure modules may not import (as the first part of a dotted name).
LOOPS = {"twisted", "autobahn", "asyncio", "txaio", "txredisapi", "redis"}

#: Private names of other projects pluresync imports, each for a reason
#: stated where it is used; a new one fails until it is added here.
THIRD_PARTY_PRIVATE = {
    # OpenSSL's verify result, to explain a TLS failure in one line (with a fallback).
    ("pluresync/dial/tlserrors.py", "OpenSSL._util"),
    # Twisted's endpoint-string parser, so the doctor reads strings exactly as endpoints do.
    ("pluresync/doctor/targets.py", "twisted.internet.endpoints._parse"),
}


#: What the client may use of the relay: its message rules, on a WebSocket and on the HTTP pipe.
CLIENT_WIRE = ("pluresync.relay.core.wire", "pluresync.relay.core.httpwire")


def _modules() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        found.append((relative, ast.parse(path.read_text(), relative)))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own(target: ast.expr) -> bool:
    """Whether C{target} (the object whose attribute is set) is the code's own object."""
    return isinstance(target, ast.Name) and target.id in ("self", "cls")


class LayoutRuleTests(unittest.TestCase):
    def test_no_private_imports(self) -> None:
        """
        No module imports another module's private name or a private module;
        other projects' private names only from the list above.
        """
        problems = []
        used = set()
        for path, tree in _modules():
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    module = "." * node.level + (node.module or "")
                    names = [f"{module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    if not any(_private(part) for part in name.lstrip(".").split(".")):
                        continue
                    allowed = {m for p, m in THIRD_PARTY_PRIVATE if p == path and name.startswith(m)}
                    if allowed and not name.startswith(("pluresync", ".")):
                        used |= {(path, m) for m in allowed}
                    else:
                        problems.append(f"{path}:{node.lineno}: {name}")
        self.assertEqual(problems, [], "private names imported across modules:\n" + "\n".join(problems))
        self.assertEqual(used, THIRD_PARTY_PRIVATE, "a listed private import is gone: drop it from the list")

    def test_no_private_writes(self) -> None:
        """No module sets (or deletes) a private attribute of an object other than self/cls."""
        problems = []
        for path, tree in _modules():
            for node in ast.walk(tree):
                targets: list[ast.expr] = []
                if isinstance(node, ast.Assign | ast.Delete):
                    targets = list(node.targets)
                elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                    targets = [node.target]
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("setattr", "delattr")
                    and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str)
                    and _private(node.args[1].value)
                    and not _own(node.args[0])
                ):
                    problems.append(f"{path}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
                for target in targets:
                    for part in ast.walk(target):
                        if isinstance(part, ast.Attribute) and _private(part.attr) and not _own(part.value):
                            problems.append(f"{path}:{node.lineno}: {ast.unparse(part)} = ...")
        self.assertEqual(problems, [], "private attributes written from outside:\n" + "\n".join(problems))

    def test_pure_core(self) -> None:
        """The relay core imports no event loop and no WebSocket library (both fronts share it)."""
        problems = []
        for path, tree in _modules():
            if not any(path.startswith(f"pluresync/{pure}/") for pure in PURE):
                continue
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                problems += [f"{path}:{node.lineno}: {n}" for n in names if n.split(".")[0] in LOOPS]
        self.assertEqual(problems, [], "the pure core imports an event loop:\n" + "\n".join(problems))

    def test_secure_layer_knows_no_path(self) -> None:
        """secure/ (the end-to-end layer every path uses) imports no endpoint, pipe or relay front."""
        problems = []
        for path, tree in _modules():
            if not path.startswith("pluresync/secure/"):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    if node.module.startswith(("pluresync.endpoints", "pluresync.pipes", "pluresync.relay.server")):
                        problems.append(f"{path}:{node.lineno}: {node.module}")
        self.assertEqual(problems, [], "\n".join(problems))

    def test_client_knows_only_the_wire(self) -> None:
        """
        The client's layers use the relay's message rules (relay/core/wire.py,
        and httpwire.py for the HTTP pipe) and nothing else of the relay.
        """
        problems = []
        client = ("pluresync/endpoints/", "pluresync/pipes/", "pluresync/secure/", "pluresync/dial/")
        for path, tree in _modules():
            if not path.startswith(client):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pluresync.relay"):
                    if node.module not in CLIENT_WIRE:
                        problems.append(f"{path}:{node.lineno}: {node.module}")
        self.assertEqual(problems, [], "\n".join(problems))
