"""
One connection out of several candidate addresses: the first that connects
wins.

A LAN peer advertises every address it has (wired, wireless, a VPN, a
container bridge), and from here some of them lead nowhere, or to another
host that happens to use the same private address.  Trying them one after
another would wait out a TCP timeout on each dead one; opening all at once
would open connections only to drop them.  So, as C{auto:} races its paths
(happy eyeballs, RFC 8305): start the first; start the next when the
previous one has failed, or has not succeeded within C{stagger}; the first
success wins and every attempt still running is cancelled.

What counts as "connected" is the caller's C{attempt}: a TCP connection
(L{connect_lan_pipe}), or a TCP connection and a completed end-to-end
handshake, which also rules out the wrong host behind a shared address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IAddress
from twisted.python.failure import Failure

from pluresync.errors import LanConnectError, LanConnectTimeoutError
from pluresync.pipes.tcp import DEFAULT_NAME, TCPPipe, connect_tcp_pipe

#: Head start of each candidate over the next (RFC 8305's connection attempt delay).
DEFAULT_STAGGER = 0.25

Candidate = TypeVar("Candidate")
Result = TypeVar("Result")


def connect_first(
    reactor,
    candidates: Sequence[Candidate],
    attempt: Callable[[Candidate], Deferred[Result]],
    *,
    stagger: float = DEFAULT_STAGGER,
    timeout: float = 10.0,
    discard: Callable[[Result], object] | None = None,
    describe: Callable[[Candidate], str] = str,
) -> Deferred[Result]:
    """
    Race C{attempt} over C{candidates}, in their order, with a head start of
    C{stagger} seconds each.

    @param discard: disposes of a success that came too late to be used (an
        attempt that completed while being cancelled).
    @param describe: names a candidate in error messages.
    @return: a Deferred firing with the first success; failing with
        L{LanConnectError} (every attempt and why it failed) when all failed,
        L{LanConnectTimeoutError} when C{timeout} passed first; cancelling it
        cancels every attempt (C{ConnectingCancelledError}).
    """
    return _FirstConnection(reactor, list(candidates), attempt, stagger, timeout, discard, describe).start()


def connect_lan_pipe(
    reactor,
    addresses: Sequence[IAddress],
    *,
    stagger: float = DEFAULT_STAGGER,
    timeout: float = 10.0,
    name: str = DEFAULT_NAME,
) -> Deferred[TCPPipe]:
    """
    The first TCP connection that opens to any of C{addresses} (C{IPv4Address}es,
    best first, as L{pluresync.direct.lan.discover} gives them), as a pipe
    not yet attached.  The losers are closed before they carry a byte.
    """
    return connect_first(
        reactor,
        addresses,
        lambda address: connect_tcp_pipe(reactor, address, timeout=timeout, name=name),
        stagger=stagger,
        timeout=timeout,
        discard=lambda pipe: pipe.abort(),
        describe=lambda address: f"{address.host}:{address.port}",
    )


def _why(failure: Failure) -> str:
    if failure.check(CancelledError, ConnectingCancelledError):
        return "cancelled"
    if failure.check(LanConnectError) and len(failure.value.attempts) == 1:
        return failure.value.attempts[0][1]
    return failure.getErrorMessage()


class _FirstConnection:
    """One race; its state lives as long as the race."""

    def __init__(
        self,
        reactor,
        candidates: list,
        attempt: Callable[[Any], Deferred],
        stagger: float,
        timeout: float,
        discard: Callable[[Any], object] | None,
        describe: Callable[[Any], str],
    ) -> None:
        self._reactor = reactor
        self._candidates = candidates
        self._attempt = attempt
        self._stagger = stagger
        self._timeout = timeout
        self._discard = discard
        self._describe = describe
        self._next = 0
        self._running: dict[int, Deferred] = {}
        self._failures: dict[int, str] = {}
        self._head_start = None
        self._deadline = None
        self._done = False
        self.result: Deferred = Deferred(self._cancel)

    def start(self) -> Deferred:
        if not self._candidates:
            self._done = True
            self.result.errback(Failure(LanConnectError([])))
            return self.result
        self._deadline = self._reactor.callLater(self._timeout, self._timedOut)
        self._startNext()
        return self.result

    def _startNext(self) -> None:
        if self._head_start is not None and self._head_start.active():
            self._head_start.cancel()
        self._head_start = None
        if self._done or self._next >= len(self._candidates):
            return
        index = self._next
        self._next += 1
        try:
            d = self._attempt(self._candidates[index])
        except Exception:
            d = Deferred()
            d.errback()
        self._running[index] = d
        if self._next < len(self._candidates) and not self._done:
            self._head_start = self._reactor.callLater(self._stagger, self._startNext)
        d.addCallbacks(self._won, self._lost, callbackArgs=(index,), errbackArgs=(index,))

    def _won(self, result, index: int) -> None:
        self._running.pop(index, None)
        if self._done:
            if self._discard is not None:
                self._discard(result)
            return
        self._finish()
        self.result.callback(result)

    def _lost(self, failure: Failure, index: int) -> None:
        self._running.pop(index, None)
        if self._done:
            return
        self._failures[index] = _why(failure)
        if self._next < len(self._candidates):
            # A refused address hands its turn to the next at once.
            self._startNext()
        elif not self._running:
            self._finish()
            self.result.errback(Failure(LanConnectError(self._report())))

    def _report(self, pending: str = "still connecting") -> list[tuple[str, str]]:
        """Each candidate and what became of it: why it failed, C{pending} if still running, or not tried."""
        report = []
        for index, candidate in enumerate(self._candidates):
            if index in self._failures:
                why = self._failures[index]
            elif index in self._running:
                why = pending
            else:
                why = "not tried"
            report.append((self._describe(candidate), why))
        return report

    def _timedOut(self) -> None:
        self._deadline = None
        if self._done:
            return
        report = self._report(pending=f"no connection within {self._timeout:g} s")
        self._finish()
        self.result.errback(
            Failure(LanConnectTimeoutError(report, prefix=f"no LAN address answered within {self._timeout:g} s"))
        )

    def _finish(self) -> None:
        """Stop the clocks and cancel every attempt still running."""
        self._done = True
        for call in (self._head_start, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._head_start = self._deadline = None
        running = list(self._running.values())
        self._running.clear()
        for d in running:
            d.cancel()

    def _cancel(self, d: Deferred) -> None:
        if self._done:
            return
        self._finish()
        d.errback(Failure(ConnectingCancelledError(None)))
