"""
Two connections joined into one: what netcat, expose and forward all are.

A L{Splice} has two L{End}s, each the protocol of one transport (a TCP
connection, an encrypted pluresync stream, or the process's stdin/stdout).
Bytes read from one end are written to the other, and:

 - memory stays bounded: each end's transport is registered as the
   streaming producer of the other's, so a consumer with a full buffer
   pauses reading on the far side (and, through a relay, the sending peer);
 - half-close travels: when one end's input ends (EOF, or the peer's
   authenticated SHUTDOWN) the other end's output is shut with
   C{loseWriteConnection()}, and the opposite direction goes on;
 - an unclean end is never turned into a clean one: if one end is cut
   (C{ConnectionLost}, L{pluresync.errors.TruncatedStreamError}, ...) the
   other is aborted, so a program behind a forwarded port sees a reset,
   not an EOF that would make a truncated stream look complete.

L{Splice.done} fires once both ends are closed: with C{None} if everything
ended cleanly, or fails with L{SpliceFailed} naming the first thing that
went wrong.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: How a connection that simply ended is reported.
_DONE = Failure(ConnectionDone())


class SpliceFailed(Exception):
    """
    One end of a splice ended uncleanly, or stopped taking data.

    @ivar end: the name of that end.
    @ivar reason: the L{Failure} it ended with.
    """

    def __init__(self, end: str, reason: Failure, message: str) -> None:
        super().__init__(message)
        self.end = end
        self.reason = reason


@implementer(IPushProducer)
class _Throttle:
    """
    One end's transport seen as the producer feeding the other end.

    Consumers call C{stopProducing} when they go away; the splice handles
    endings itself (from C{connectionLost}), so that is ignored here rather
    than aborting a connection that may still have a direction to finish.
    """

    def __init__(self, transport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class End(Protocol):
    """
    The protocol on one of the two transports; it only reports to its splice.

    @ivar name: how messages name this end (C{"the peer"}, C{"127.0.0.1:22"}).
    @ivar count: bytes read from this end so far (and handed to the other).
    """

    def __init__(self, splice: Splice, name: str) -> None:
        self.splice = splice
        self.name = name
        self.other: End
        self.count = 0
        self.connected = False
        self.read_done = False  # no more input from this end
        self.write_asked = False  # we shut this end's output
        self.write_done = False  # ... and it is shut
        self.closed = False

    def connectionMade(self) -> None:
        self.connected = True
        self.splice._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.splice._data(self, data)

    def readConnectionLost(self) -> None:
        self.splice._readEnded(self)

    def writeConnectionLost(self) -> None:
        self.splice._writeEnded(self)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.splice._lost(self, reason)


def _abort(transport) -> None:
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()


class Splice:
    """
    Joins two ends; see the module docstring.

    @ivar a: the first end (the one that connected first, by convention).
    @ivar b: the second end.
    @ivar on_connected: called with each end as it connects, before the two
        are joined (netcat attaches stdio when the peer arrives).
    """

    def __init__(self, a_name: str, b_name: str) -> None:
        self.a = End(self, a_name)
        self.b = End(self, b_name)
        self.a.other, self.b.other = self.b, self.a
        self.joined = False
        self.on_connected: Callable[[End], None] | None = None
        self._failure: SpliceFailed | None = None
        self.done: Deferred[None] = Deferred()

    # -- events from the ends ------------------------------------------------

    def _connected(self, end: End) -> None:
        if self.done.called:
            # The other end went away while this one was being connected.
            end.closed = True
            end.transport.loseConnection()
            return
        # Nothing flows until both ends exist: there is nowhere to put it.
        end.transport.pauseProducing()
        if self.on_connected is not None:
            self.on_connected(end)
        if self.a.connected and self.b.connected and not self.joined and not self.done.called:
            self._join()

    def _join(self) -> None:
        self.joined = True
        for end in (self.a, self.b):
            end.other.transport.registerProducer(_Throttle(end.transport), True)
        for end in (self.a, self.b):
            if not end.closed:
                end.transport.resumeProducing()

    def _data(self, source: End, data: bytes) -> None:
        source.count += len(data)
        target = source.other
        if target.closed or target.write_asked:
            return  # nowhere to deliver it any more
        target.transport.write(data)

    def _readEnded(self, source: End) -> None:
        if source.read_done or source.closed:
            return
        source.read_done = True
        target = source.other
        if self.joined and not target.closed and not target.write_asked:
            target.transport.unregisterProducer()  # the source produces no more
            target.write_asked = True
            shut = getattr(target.transport, "loseWriteConnection", None)
            if shut is None or target.read_done:
                # Nothing more either way: a full close, which (unlike a
                # second half-close) reports connectionLost only once what
                # was written has gone out.
                target.transport.loseConnection()
            else:
                shut()
        self._settle(source)

    def _writeEnded(self, end: End) -> None:
        if end.write_done or end.closed:
            return
        end.write_done = True
        if not end.write_asked:
            # It stopped taking data on its own (stdout's reader went away).
            self._lost(end, Failure(ConnectionDone()), f"{end.name} stopped accepting data")
            return
        self._settle(end)

    def _settle(self, end: End) -> None:
        """Both directions of C{end} are finished: close it, cleanly."""
        if end.read_done and end.write_done and not end.closed:
            end.closed = True
            end.transport.loseConnection()
            self._check()

    def _lost(self, end: End, reason: Failure, message: str | None = None) -> None:
        if end.closed:
            return
        end.closed = True
        clean = message is None and reason.check(ConnectionDone) is not None
        if not clean and self._failure is None:
            self._failure = SpliceFailed(end.name, reason, message or f"{end.name} was cut: {reason.getErrorMessage()}")
        other = end.other
        if not other.closed:
            if not other.connected:
                other.closed = True  # never connected: whoever connects it cancels that
            else:
                if self.joined:
                    other.transport.unregisterProducer()  # `end` produces no more
                if clean:
                    other.transport.loseConnection()  # after what is buffered for it
                else:
                    _abort(other.transport)
        self._check()

    def _check(self) -> None:
        if self.a.closed and self.b.closed and not self.done.called:
            if self._failure is None:
                self.done.callback(None)
            else:
                self.done.errback(Failure(self._failure))

    # -- for the commands ------------------------------------------------------

    def unreachable(self, end: End, reason: Failure) -> None:
        """C{end} could not be connected at all: cut the other and fail."""
        self._lost(end, reason, f"could not open {end.name}: {reason.getErrorMessage()}")

    def abort(self) -> None:
        """Cut both ends now (the command is stopping)."""
        for end in (self.a, self.b):
            if end.connected and not end.closed:
                _abort(end.transport)
