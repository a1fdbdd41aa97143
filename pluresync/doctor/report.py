"""
The doctor's report: one row per check, one table per transport, one
overall verdict line. Plain aligned text; colours only on a terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

OK = "ok"
WARN = "warn"
FAIL = "FAIL"
SKIPPED = "skipped"

_COLOURS = {OK: "\x1b[32m", WARN: "\x1b[33m", FAIL: "\x1b[31;1m", SKIPPED: "\x1b[2m"}
_RESET = "\x1b[0m"


@dataclass(frozen=True)
class Row:
    """
    One check's outcome.

    @ivar check: the check's name (C{dns}, C{tcp}, C{proxy}, C{tls},
        C{websocket}, C{health}, C{round trip}).
    @ivar verdict: L{OK}, L{WARN}, L{FAIL} or L{SKIPPED}.
    @ivar seconds: how long it took, if it ran.
    @ivar detail: what was found, one line.
    @ivar fix: what to do about a failure or warning, one line.
    """

    check: str
    verdict: str
    seconds: float | None = None
    detail: str = ""
    fix: str | None = None


@dataclass
class Section:
    """One transport's rows, in the order they ran."""

    name: str
    where: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: advice about a path rather than a transport to use (the direct
    #: path's UDP and NAT): not counted in the overall verdict
    advice: bool = False

    @property
    def works(self) -> bool:
        """Whether a message made it through end to end (the round trip passed)."""
        return any(row.check == "round trip" and row.verdict == OK for row in self.rows)

    def row(self, check: str) -> Row | None:
        for row in self.rows:
            if row.check == check:
                return row
        return None


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def _paint(text: str, verdict: str, colour: bool) -> str:
    return f"{_COLOURS[verdict]}{text}{_RESET}" if colour and verdict in _COLOURS else text


def format_section(section: Section, colour: bool = False) -> list[str]:
    """The lines of one transport's table, its notes and fixes."""
    if section.advice:
        status = "advice"
    else:
        status = "works" if section.works else "does not work"
    lines = [f"{section.name}  {section.where}  [{status}]"]
    lines += [f"  note: {note}" for note in section.notes]
    header = ("check", "verdict", "time", "detail")
    cells = [(row.check, row.verdict, _time(row.seconds), row.detail) for row in section.rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(3)]
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header[:3], widths, strict=True)) + "  " + header[3])
    for row, (check, verdict, took, detail) in zip(section.rows, cells, strict=True):
        verdict_cell = _paint(verdict.ljust(widths[1]), row.verdict, colour)
        lines.append(f"  {check.ljust(widths[0])}  {verdict_cell}  {took.rjust(widths[2])}  {detail}".rstrip())
    for row in section.rows:
        if row.fix and row.verdict in (FAIL, WARN):
            lines.append(f"  fix ({row.check}): {row.fix}")
    return lines


def overall(sections: Sequence[Section]) -> tuple[str, int]:
    """The overall verdict line and the exit code (0: at least one transport works)."""
    sections = [s for s in sections if not s.advice]
    working = [s.name for s in sections if s.works]
    total = len(sections)
    if working:
        which = ", ".join(working)
        verb = "works" if len(working) == 1 else "work"
        line = (
            f"overall: ok: {len(working)} of {total} transport{'s' if total != 1 else ''} {verb} end to end ({which})"
        )
        return line, 0
    line = (
        f"overall: FAIL: none of {total} transport{'s' if total != 1 else ''} works end to end; see the fixes above"
        if total
        else "overall: FAIL: no transport to check"
    )
    return line, 1


def format_report(
    header: str, sections: Sequence[Section], colour: bool = False, notes: Sequence[str] = ()
) -> tuple[str, int]:
    """The whole report's text and the exit code."""
    lines = [header, *(_paint(f"warning: {note}", WARN, colour) for note in notes), ""]
    for section in sections:
        lines += format_section(section, colour)
        lines.append("")
    verdict, code = overall(sections)
    lines.append(_paint(verdict, OK if code == 0 else FAIL, colour))
    return "\n".join(lines) + "\n", code
