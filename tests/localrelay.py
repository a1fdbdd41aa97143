"""
A real relay on 127.0.0.1 for integration tests, in-process, with a tap on
every byte it receives.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from pluresync.keys import SyncKey
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.site import build_site


class _Tap(ProtocolWrapper):
    def makeConnection(self, transport) -> None:
        self.received = bytearray()
        self.factory.tapped.append(self.received)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        super().dataReceived(data)


def websocket_payloads(stream: bytes) -> bytes:
    """
    Everything a client sent on one WebSocket connection, as the relay sees
    it after unmasking: the HTTP upgrade request, then each frame's payload.
    """
    head, sep, rest = bytes(stream).partition(b"\r\n\r\n")
    out = bytearray(head + sep)
    i = 0
    while i + 2 <= len(rest):
        length = rest[i + 1] & 0x7F
        masked = rest[i + 1] & 0x80
        i += 2
        if length == 126:
            length = int.from_bytes(rest[i : i + 2], "big")
            i += 2
        elif length == 127:
            length = int.from_bytes(rest[i : i + 8], "big")
            i += 8
        mask = rest[i : i + 4] if masked else b"\0\0\0\0"
        i += 4 if masked else 0
        payload = rest[i : i + length]
        out += bytes(b ^ mask[j % 4] for j, b in enumerate(payload))
        i += length
    return bytes(out)


class _TappingFactory(WrappingFactory):
    protocol = _Tap

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self.tapped: list[bytes] = []


class LocalRelay:
    """
    A relay listening on an ephemeral loopback port.

    @ivar tapped: every byte any client sent to the relay, in arrival order.
    """

    def __init__(self, test, limits: RelayLimits | None = None, authenticator=None) -> None:
        site, self.factory = build_site(reactor, limits or RelayLimits(), authenticator=authenticator)
        self._tap = _TappingFactory(site)
        self.port = reactor.listenTCP(0, self._tap, interface="127.0.0.1")
        self.url = f"ws://127.0.0.1:{self.port.getHost().port}"
        self._stopped = False
        test.addCleanup(self.stop)
        test.addCleanup(abort_live_collectors)

    @property
    def tapped(self) -> bytes:
        """Every byte every client sent, unmasked, connection after connection."""
        return b"".join(websocket_payloads(stream) for stream in self._tap.tapped)

    @property
    def tapped_raw(self) -> bytes:
        """Every byte every client sent, as it came (HTTP pipes: nothing is masked)."""
        return b"".join(bytes(stream) for stream in self._tap.tapped)

    def endpoint(self, key: SyncKey, **params: str) -> str:
        """An endpoint string for this relay (key passed as text: test only)."""
        url = self.url.replace(":", "\\:")
        extra = "".join(f":{k}={v}" for k, v in params.items())
        return f"relay:url={url}:key={key.to_text()}{extra}"

    def stop(self) -> Deferred:
        """Close every relay socket (1001) and stop listening."""
        if self._stopped:
            return Deferred.fromCoroutine(_nothing())
        self._stopped = True
        d = self.factory.close_all()
        d.addCallback(lambda _: self.port.stopListening())
        return d

    def kill(self) -> None:
        """Drop every connection at once, as a crashed relay would."""
        self._stopped = True
        self.port.stopListening()
        for protocol in list(self._tap.protocols):
            protocol.transport.abortConnection()


async def _nothing() -> None:
    return None


#: Every Collector connected and not yet lost, so a test's end can abort
#: them: a session whose relay goes away would otherwise wait out its
#: resume limit, and trial would find its timer.
_live: set = set()


def abort_live_collectors() -> None:
    """Abort every Collector still connected (a test's last cleanup)."""
    for protocol in list(_live):
        transport = protocol.transport
        if transport is not None:
            transport.abortConnection()
            # A listener's stream ends alone; its session (shared by
            # streams) would wait for the initiator to come back.
            session = getattr(transport, "session", None)
            if session is not None:
                session.abort()
    _live.clear()


def shared_sessions_ended(seconds: float = 20.0) -> Deferred:
    """
    Fires once every session this reactor's connects share has ended (or
    fails after C{seconds}): a session closes a moment after its last
    stream's C{connectionLost}, and may have to resume to do it.
    """
    from twisted.internet.defer import DeferredList

    from pluresync.session.pool import pool_for

    ending = [session.whenEnded() for session in pool_for(reactor).sessions()]
    return DeferredList(ending, fireOnOneErrback=True).addTimeout(seconds, reactor)


class Collector(Protocol):
    """A user protocol that keeps what it receives and how it ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.made: Deferred = Deferred()
        #: fires with None when the connection is lost; the reason is in C{reason}
        self.lost: Deferred = Deferred()
        self.reason = None

    def connectionMade(self) -> None:
        _live.add(self)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.dataArrived(data)

    def dataArrived(self, data: bytes) -> None:
        """Hook for tests."""

    def connectionLost(self, reason) -> None:
        _live.discard(self)
        self.reason = reason
        self.lost.callback(None)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Listening:
    """A relay listener whose accepted protocols are Collectors, kept in order."""

    def __init__(self) -> None:
        self.accepted: list[Collector] = []
        self.waiting: list[Deferred] = []
        self.factory = Factory.forProtocol(self._build)

    def _build(self) -> Collector:
        protocol = Collector()
        self.accepted.append(protocol)
        if self.waiting:
            protocol.made.addCallback(self.waiting.pop(0).callback)
        return protocol

    def next(self) -> Deferred:
        """Fires with the next protocol accepted from now on, once it is connected."""
        d = Deferred()
        self.waiting.append(d)
        return d
