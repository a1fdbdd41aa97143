"""
A deadline on a connection attempt, with the errors Twisted programs expect.

Every path's client and listener bounds its whole attempt (reaching the
carrier, pairing, the handshake) by one C{timeout=}; a caller's cancel and
the deadline end it the same way but must read differently.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.python.failure import Failure

from pluresync.errors import ConnectionTimeoutError


def with_timeout(reactor, d: Deferred, seconds: float, what: str, address) -> Deferred:
    """
    Give C{d} a deadline, and turn its cancellation into the errors Twisted
    programs expect: L{ConnectionTimeoutError} when the deadline passed,
    C{ConnectingCancelledError} when the caller cancelled.
    """
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    timer = reactor.callLater(seconds, expire)

    def finish(result):
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure) and result.check(CancelledError):
            if timed_out:
                return Failure(ConnectionTimeoutError(f"{what} timed out after {seconds:g} s"))
            return Failure(ConnectingCancelledError(address))
        return result

    d.addBoth(finish)
    return d
