"""
A pipe over a plain TCP connection: the direct path's carrier between
peers that can reach each other (two peers on one LAN).

The link above does its own framing and seals every record with Noise, so
the bytes go onto TCP as they are: no framing, no TLS, no relay messages.
Whoever answers on the TCP connection must still complete the end-to-end
handshake, which needs the sync key, so a stranger that accepts (or opens)
a connection gets nothing but a failed handshake.

Both ends are the same object, a L{TCPPipe}: the connecting side gets one
from L{connect_tcp_pipe}, the accepting side from L{TCPPipeFactory}, which
hands each accepted connection to a callback.  A pipe exists before anyone
reads from it: until it is L{attached <TCPPipe.attach>} to its receiver (a
link), it reads nothing from the socket, so TCP holds the peer back and
nothing is buffered here.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.errors import DirectPipeLostError, LanConnectError
from pluresync.interfaces import IPipe, IPipeReceiver

#: The path name a LAN pipe reports unless its maker names it otherwise
#: (what a link and its session show as the path that carries them).
DEFAULT_NAME = "direct:lan"
#: Bytes a peer may get onto the pipe before it is attached (a transport that
#: delivers despite the paused reading); more is not a pluresync peer.
MAX_UNATTACHED_BYTES = 64 * 1024


@implementer(IPipe)
class TCPPipe(Protocol):
    """
    One TCP connection to the peer, as an L{IPipe}.

    Backpressure runs through the TCP transport both ways: L{pauseReading}
    stops reading the socket (the kernel's window then stops the peer), and
    a producer registered here is paused while the socket's send buffer is
    full.

    @ivar name: the path's name, for the link and session above.
    """

    def __init__(self, reactor, name: str = DEFAULT_NAME) -> None:
        self._reactor = reactor
        self.name = name
        self._receiver: IPipeReceiver | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._lost: Failure | None = None
        self._paused = False
        self._ending = False

    def __repr__(self) -> str:
        return f"<TCPPipe {self.name} {self.peer}>"

    @property
    def peer(self) -> IAddress | None:
        """The other end's address, once connected."""
        return self.transport.getPeer() if self.transport is not None else None

    # -- the transport's side ---------------------------------------------

    def connectionMade(self) -> None:
        # Records are small and latency-bound (the handshake, acks, pings).
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        if self._receiver is None:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        receiver = self._receiver
        if receiver is not None:
            receiver.pipeDataReceived(data)
            return
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > MAX_UNATTACHED_BYTES:
            self._early.clear()
            self._lost = Failure(
                DirectPipeLostError(f"the peer at {_address(self.peer)} sent too much before the handshake began")
            )
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._lost is None:
            self._lost = self._ending_reason(reason)
        receiver, self._receiver = self._receiver, None
        if receiver is not None and not self._early:
            receiver.pipeLost(self._lost)
        elif receiver is not None:
            # Still delivering what came before the end: the end follows it.
            self._receiver = receiver

    def _ending_reason(self, reason: Failure) -> Failure:
        if reason.check(ConnectionDone):
            return Failure(ConnectionDone())
        return Failure(
            DirectPipeLostError(
                f"the direct connection to the peer at {_address(self.peer)} was lost ({reason.getErrorMessage()})"
            )
        )

    # -- the link's side --------------------------------------------------

    def attach(self, receiver: IPipeReceiver) -> TCPPipe:
        """
        Deliver to C{receiver} from now on, and start reading.

        Shaped as C{secure_link}'s C{bind_pipe}: it returns the pipe.  What
        arrived before (or an end that came before) is delivered on the
        next reactor turn, never from inside this call: the caller is still
        wiring the receiver up.
        """
        if self._receiver is not None:
            raise RuntimeError("this pipe already has a receiver")
        self._receiver = receiver
        if self._early or self._lost is not None:
            self._reactor.callLater(0, self._deliverEarly)
        elif not self._paused and not self._ending:
            self.transport.resumeProducing()
        return self

    def _deliverEarly(self) -> None:
        early, self._early = self._early, []
        self._early_size = 0
        for data in early:
            if self._receiver is None:
                return
            self._receiver.pipeDataReceived(data)
        receiver = self._receiver
        if receiver is None:
            return
        if self._lost is not None:
            self._receiver = None
            receiver.pipeLost(self._lost)
        elif not self._paused and not self._ending:
            self.transport.resumeProducing()

    def write(self, data: bytes) -> None:
        if not self._ending and self._lost is None:
            self.transport.write(data)

    def pauseReading(self) -> None:
        self._paused = True
        if self._lost is None and not self._ending:
            self.transport.pauseProducing()

    def resumeReading(self) -> None:
        self._paused = False
        if self._lost is None and not self._ending and self._receiver is not None and not self._early:
            self.transport.resumeProducing()

    def registerProducer(self, producer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def close(self) -> None:
        """Send what is buffered, then end the connection (the peer sees an orderly end)."""
        self._ending = True
        self.transport.loseConnection()

    def abort(self) -> None:
        self._ending = True
        self.transport.abortConnection()


def _address(address: IAddress | None) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else "an unknown address"


class TCPPipeFactory(Factory):
    """
    Turns each accepted TCP connection into a L{TCPPipe} and hands it to
    C{on_pipe} (the listener's side runs the handshake as responder on it).

    C{on_pipe} is called from C{connectionMade}; it should attach the pipe
    before it returns or soon after (the pipe reads nothing until then).  If
    it raises, the connection is dropped.
    """

    _log = Logger()
    noisy = False  # one line per accepted connection would be noise

    def __init__(self, reactor, on_pipe: Callable[[TCPPipe], object], name: str = DEFAULT_NAME) -> None:
        self._reactor = reactor
        self._on_pipe = on_pipe
        self._name = name

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return _AcceptedPipe(self._reactor, self._name, self._accepted)

    def _accepted(self, pipe: TCPPipe) -> None:
        try:
            self._on_pipe(pipe)
        except Exception:
            self._log.failure("dropping a LAN connection: its handler failed")
            pipe.abort()


class _AcceptedPipe(TCPPipe):
    """A pipe on an accepted connection: reports itself once connected."""

    def __init__(self, reactor, name: str, accepted: Callable[[TCPPipe], None]) -> None:
        super().__init__(reactor, name)
        self._accepted = accepted

    def connectionMade(self) -> None:
        super().connectionMade()
        self._accepted(self)


def listen_tcp_pipes(
    reactor, on_pipe: Callable[[TCPPipe], object], *, port: int = 0, interface: str = "", name: str = DEFAULT_NAME
) -> Deferred[IListeningPort]:
    """
    Accept TCP connections as pipes, on every IPv4 interface by default (a
    LAN peer may come in on any of them) and a port the system picks (so
    the port number says nothing about who listens: see docs/security.md).

    @return: a Deferred firing with the listening port (its C{getHost().port}
        is what to advertise).
    """
    return TCP4ServerEndpoint(reactor, port, interface=interface).listen(TCPPipeFactory(reactor, on_pipe, name))


def connect_tcp_pipe(
    reactor, address: IAddress, *, timeout: float = 5.0, name: str = DEFAULT_NAME
) -> Deferred[TCPPipe]:
    """
    Open a TCP connection to C{address} (an C{IPv4Address}) as a pipe.

    @param timeout: give up connecting after this many seconds.
    @return: a Deferred firing with the connected, not yet attached pipe, or
        failing with L{LanConnectError}; cancelling it abandons the attempt
        (C{ConnectingCancelledError}).
    """
    host, port = address.host, address.port
    connecting = TCP4ClientEndpoint(reactor, host, port, timeout=timeout).connect(_ClientPipeFactory(reactor, name))

    def failed(failure: Failure) -> Failure:
        if failure.check(CancelledError, ConnectingCancelledError):
            return Failure(ConnectingCancelledError(address))
        return Failure(LanConnectError([(f"{host}:{port}", failure.getErrorMessage())]))

    return connecting.addErrback(failed)


class _ClientPipeFactory(Factory):
    noisy = False

    def __init__(self, reactor, name: str) -> None:
        self._reactor = reactor
        self._name = name

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return TCPPipe(self._reactor, self._name)
