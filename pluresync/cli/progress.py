"""
The C{--progress} display: bytes sent and received, rate and elapsed time.

On a terminal it is one live line, rewritten in place (C{\\r}) at most four
times a second, so it costs nothing next to the transfer; into a file or a
pipe (a log) it is a plain line every few seconds instead, since carriage
returns make logs unreadable. Either way a summary line ends it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from twisted.internet.task import LoopingCall

#: Seconds between updates of the live line (at most ~4 per second).
LIVE_INTERVAL = 0.25
#: Seconds between plain lines when stderr is not a terminal.
PLAIN_INTERVAL = 5.0

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(count: float) -> str:
    """C{5242880} -> C{"5.0 MiB"}: binary units, one decimal above bytes."""
    value = float(count)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """C{3.25} -> C{"3.2 s"}; a minute or more as C{"M:SS"} or C{"H:MM:SS"}."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(count: float, seconds: float) -> str:
    return f"{format_bytes(count / seconds if seconds > 0 else 0)}/s"


class Progress:
    """
    Reports the counters of one transfer on C{stream}.

    @param counters: returns C{(sent, received)} in bytes, read at each update.
    @param live: rewrite one line in place (a terminal) instead of printing lines.
    """

    def __init__(
        self,
        clock,
        stream: TextIO,
        counters: Callable[[], tuple[int, int]],
        live: bool,
        prefix: str = "pluresync: ",
    ) -> None:
        self._clock = clock
        self._stream = stream
        self._counters = counters
        self._live = live
        self._prefix = prefix
        self._started: float | None = None
        self._last = (0.0, 0)  # (time, total bytes) at the previous update
        self._width = 0
        self._call = LoopingCall(self._update)
        self._call.clock = clock

    @classmethod
    def for_stream(cls, clock, stream: TextIO, counters: Callable[[], tuple[int, int]]) -> Progress:
        """Live on a terminal, plain lines otherwise."""
        isatty = getattr(stream, "isatty", None)
        return cls(clock, stream, counters, live=bool(isatty and isatty()))

    def start(self) -> None:
        self._started = self._clock.seconds()
        self._last = (self._started, 0)
        self._call.start(LIVE_INTERVAL if self._live else PLAIN_INTERVAL, now=False)

    def _update(self) -> None:
        sent, received = self._counters()
        now = self._clock.seconds()
        total = sent + received
        then, before = self._last
        self._last = (now, total)
        line = (
            f"sent {format_bytes(sent)}, received {format_bytes(received)}, "
            f"{format_rate(total - before, now - then)}, {format_duration(now - self._started)}"
        )
        if self._live:
            padding = " " * max(0, self._width - len(line))
            self._width = len(line)
            self._stream.write(f"\r{self._prefix}{line}{padding}")
        else:
            self._stream.write(f"{self._prefix}{line}\n")
        self._stream.flush()

    def stop(self) -> None:
        """Stop updating and print the summary line (once)."""
        if self._started is None:
            return
        if self._call.running:
            self._call.stop()
        sent, received = self._counters()
        elapsed = self._clock.seconds() - self._started
        self._started = None
        line = (
            f"sent {format_bytes(sent)}, received {format_bytes(received)} "
            f"in {format_duration(elapsed)} ({format_rate(sent + received, elapsed)})"
        )
        if self._live and self._width:
            self._stream.write("\r" + " " * (len(self._prefix) + self._width) + "\r")
        self._stream.write(f"{self._prefix}{line}\n")
        self._stream.flush()
