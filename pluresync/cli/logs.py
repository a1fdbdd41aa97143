"""
Log messages of the network commands, as lines on stderr.

stdout belongs to the data (netcat) and stays untouched: Twisted is told not
to redirect standard I/O. By default pluresync's own messages at info level
and everyone's warnings are shown, one line each (a logged failure adds its
message, not its traceback); C{--quiet} keeps errors only; C{--debug} shows
everything, tracebacks included. Twisted's own chatter at info level
("Starting factory ...") is noise for a command line and is left out.
"""

from __future__ import annotations

from typing import TextIO

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
from zope.interface import implementer


@implementer(ILogObserver)
class LineObserver:
    """Writes each event that passes the level as one C{pluresync: ...} line."""

    def __init__(self, stream: TextIO, debug: bool = False, quiet: bool = False) -> None:
        self._stream = stream
        self._debug = debug
        self._quiet = quiet

    def _wanted(self, event: dict) -> bool:
        level = event.get("log_level", LogLevel.info)
        if self._debug:
            return True
        if self._quiet:
            return level >= LogLevel.error
        if level >= LogLevel.warn:
            return True
        return level >= LogLevel.info and str(event.get("log_namespace", "")).startswith("pluresync")

    def __call__(self, event: dict) -> None:
        if not self._wanted(event):
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            if self._debug:
                text = f"{text}\n{failure.getTraceback().rstrip()}"
            else:
                text = f"{text}: {failure.getErrorMessage()}"
        level = event.get("log_level", LogLevel.info)
        prefix = "pluresync: " + ("warning: " if level == LogLevel.warn else "error: " if level > LogLevel.warn else "")
        self._stream.write(prefix + text + "\n")
        self._stream.flush()


def start_logging(stream: TextIO, debug: bool = False, quiet: bool = False) -> None:
    """Send the process's log events to C{stream} (once per process)."""
    globalLogBeginner.beginLoggingTo([LineObserver(stream, debug, quiet)], discardBuffer=True, redirectStandardIO=False)
