"""
Cluster links: one TCP connection between two relay instances per
cross-instance session, carrying that session's bytes.

A connector waits on instance B (which owns the session); the listener's
C{accept} socket lands on instance C.  C opens a link to B's cluster
address, both prove they hold the cluster secret, B pairs its connector
socket with the link and C pairs its accept socket with the link.  From then
on each instance treats the link as the partner socket of a local pair:

 - the link's byte stream is a sequence of unmasked WebSocket data frames
   (what a relay sends to a client), so a frame read from a client socket
   goes onto the link with the same header the relay would write to a local
   partner, and a frame read from the link goes to the client unchanged:
   binary message boundaries (and fragments) cross instances intact;
 - the link's TCP transport and the client's are coupled as producer and
   consumer, exactly like the two sockets of a local pair, so a slow reader
   on one instance slows the writer on the other (TCP backpressure crosses
   the link);
 - the pair ends with a WebSocket close frame on the link (1000: the peer
   closed normally; anything else: the peer is gone), then TCP close.

The set-up messages are length-prefixed JSON (4-byte big-endian length).
Authentication is an HMAC-SHA256 challenge-response over both instances'
nonces and the session id, keyed with the cluster secret, in both
directions: an outsider reaching the link port can neither claim a session
nor pose as its owner.  The link carries the peers' end-to-end encrypted
records, never plaintext, and is meant for a private network (it is not
encrypted itself).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pluresync.interfaces import IPairEnd
from pluresync.relay.core.session import CLOSE_REASONS
from pluresync.relay.core.wire import CLOSE_NORMAL, ErrorCode, ProtocolError
from pluresync.relay.server.pair import TransportEnd
from pluresync.wsframes import OP_CLOSE, FrameError, FrameReader, frame_header

log = Logger(namespace="pluresync.relay.cluster.service")

LINK_VERSION = 1
MAX_SETUP_MESSAGE = 4096
_LEN = struct.Struct(">I")
_SESSION = re.compile(r"[0-9a-f]{32}")
_MAC = re.compile(r"[0-9a-f]{64}")


def link_mac(secret: bytes, purpose: bytes, server_nonce: bytes, client_nonce: bytes, session: str) -> str:
    """HMAC-SHA256 of one set-up step (C{purpose}: C{b"accept"} or C{b"paired"})."""
    message = b"pluresync-cluster-link/1 " + purpose + b"\n" + server_nonce + client_nonce + session.encode("ascii")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class LinkClosed(Exception):
    """The link ended (or failed to set up); args: a human-readable reason."""


@implementer(IPairEnd)
class LinkProtocol(TransportEnd, Protocol):
    """
    One end of a cluster link.  After set-up it is the L{IPairEnd} that
    stands, in this instance's pair, for the client socket on the other
    instance.
    """

    setup_timeout = 10.0

    def __init__(self, secret: bytes, reactor: Any, max_message: int) -> None:
        self._secret = secret
        self._reactor = reactor
        self._max_message = max_message
        self._buffer = b""
        self._frames: FrameReader | None = None
        self._setup_timer: Any = None
        self._linked: IPairEnd | None = None  # the local socket while paired
        self._closing = False
        self._paused = False
        self._close_code: int | None = None
        #: bytes of data frames read from the other instance
        self.received = 0
        self.session = ""
        #: fires (with None) when the TCP connection is gone
        self.lost: Deferred[None] = Deferred()

    @property
    def is_open(self) -> bool:
        """Whether the link can still carry frames."""
        return not self._closing and self.transport is not None and bool(self.connected)

    def close(self, code: int, reason: str) -> None:
        """End the link with a close frame carrying C{code}; idempotent."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self._linked = None
        payload = struct.pack(">H", code) + reason.encode("utf-8")[:123]
        self.transport.write(frame_header(len(payload), OP_CLOSE) + payload)
        self.transport.loseConnection()

    # -- IPairEnd ----------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self.is_open

    def pauseProducing(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The pair ends through end(), with a close code.
        pass

    def end(self, code: int, reason: str) -> None:
        self.close(code, reason)

    # -- set-up helpers --------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.setTcpKeepAlive(1)
        self._setup_timer = self._reactor.callLater(self.setup_timeout, self._setup_expired)

    def _setup_expired(self) -> None:
        self._setup_timer = None
        self.setup_failed("the cluster link set-up timed out")
        self.transport.abortConnection()

    def _stop_setup_timer(self) -> None:
        if self._setup_timer is not None:
            self._setup_timer.cancel()
            self._setup_timer = None

    def send_setup(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode("utf-8")
        self.transport.write(_LEN.pack(len(body)) + body)

    def dataReceived(self, data: bytes) -> None:
        if self._frames is not None:
            self._feed(data)
            return
        self._buffer += data
        while self._frames is None and len(self._buffer) >= 4:
            (length,) = _LEN.unpack_from(self._buffer)
            if length > MAX_SETUP_MESSAGE:
                self.setup_failed("oversized cluster link set-up message")
                self.transport.abortConnection()
                return
            if len(self._buffer) < 4 + length:
                return
            body, self._buffer = self._buffer[4 : 4 + length], self._buffer[4 + length :]
            try:
                message = json.loads(body)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.setup_failed("malformed cluster link set-up message")
                self.transport.abortConnection()
                return
            self.setup_message(message)
            if self.transport is None or self._closing:
                return

    def setup_message(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def setup_failed(self, reason: str) -> None:
        """Set-up did not succeed (hook)."""

    # -- the data phase --------------------------------------------------------

    def link_to(self, local: IPairEnd) -> None:
        """
        Start forwarding to C{local}, the relay socket this link is paired
        with; what arrived after the set-up is delivered by L{flush}, once
        that socket's client has been told it is paired.
        """
        self._stop_setup_timer()
        self._linked = local
        self._frames = FrameReader(
            masked=False, max_message=self._max_message, on_data=self._on_data, on_control=lambda raw: None
        )

    def flush(self) -> None:
        """Deliver the frames that arrived during set-up (after the local socket was told C{paired})."""
        rest, self._buffer = self._buffer, b""
        if rest:
            self._feed(rest)

    def _on_data(self, payload: bytes, opcode: int, fin: bool) -> None:
        local = self._linked
        if local is not None:
            self.received += len(payload)
            local.writeData(payload, opcode, fin)

    def _feed(self, data: bytes) -> None:
        try:
            handoff = self._frames.feed(data)  # type: ignore[union-attr]
        except FrameError as error:
            log.warn("cluster link: bad frame from the other instance: {error}", error=error.message)
            self._end_local(ErrorCode.PEER_GONE.close_code, "peer-gone")
            self.transport.abortConnection()
            return
        if handoff is not None:
            code = CLOSE_NORMAL
            if len(handoff) >= 4 and handoff[1] & 0x7F >= 2:
                (code,) = struct.unpack_from(">H", handoff, 2)
            self._close_code = code
            self._end_local(code, "")
            self._closing = True
            self.transport.loseConnection()

    def _end_local(self, code: int, how: str) -> None:
        """
        The other instance ended the pair: end it here too.  Its client's
        normal close reaches ours as 1000; any other end, as C{peer-gone}.
        """
        local, self._linked = self._linked, None
        if local is None:
            return
        self._closing = True
        if code == CLOSE_NORMAL:
            local.end(CLOSE_NORMAL, CLOSE_REASONS[CLOSE_NORMAL])
        else:
            local.end(ErrorCode.PEER_GONE.close_code, ErrorCode.PEER_GONE.value)

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_setup_timer()
        if self._frames is None:
            self.setup_failed("the cluster link closed during set-up")
        if self._linked is not None:
            self._end_local(ErrorCode.PEER_GONE.close_code, "peer-gone")
        self._closing = True
        self.lost.callback(None)


class LinkServer(LinkProtocol):
    """
    The session owner's end: proves the client holds the secret, then asks
    C{factory.accept(session, link)} to pair the session's connector.
    """

    factory: LinkServerFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.links.add(self)
        self._nonce = os.urandom(16)
        self.send_setup({"v": LINK_VERSION, "nonce": self._nonce.hex()})

    def setup_message(self, message: dict[str, Any]) -> None:
        try:
            session = str(message["session"])
            client_nonce = bytes.fromhex(str(message["nonce"]))
            mac = str(message["mac"])
        except (KeyError, ValueError):
            self._refuse("malformed cluster link request")
            return
        if not (_SESSION.fullmatch(session) and _MAC.fullmatch(mac)):
            # Checked before any hashing: an outsider's odd bytes must not
            # raise inside link_mac or compare_digest.
            self._refuse("malformed cluster link request")
            return
        expected = link_mac(self._secret, b"accept", self._nonce, client_nonce, session)
        if message.get("op") != "accept" or len(client_nonce) != 16 or not hmac.compare_digest(mac, expected):
            self._refuse("cluster link authentication failed (wrong cluster secret?)")
            return
        self.session = session
        self._stop_setup_timer()
        try:
            local, pairing = self.factory.accept(session, self)
        except ProtocolError as error:
            self.send_setup({"ok": False, "code": error.code.value, "message": error.message})
            self._closing = True
            self.transport.loseConnection()
            return
        reply_mac = link_mac(self._secret, b"paired", self._nonce, client_nonce, session)
        self.send_setup({"ok": True, "peer": pairing.connector_peer, "mac": reply_mac})
        self.link_to(local)
        local.pair_remote(self, pairing.listener_peer, pairing.connector, session)
        self.flush()

    def _refuse(self, reason: str) -> None:
        log.warn("cluster link refused: {reason}", reason=reason)
        self._closing = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.links.discard(self)
        super().connectionLost(reason)


class LinkServerFactory(Factory):
    """
    Builds L{LinkServer}s.

    @param accept: C{(session, link) -> (connector_socket, pairing)}:
        accepts the session in the registry (the caller then pairs the
        connector's socket with the link) or raises L{ProtocolError}.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        secret: bytes,
        max_message: int,
        accept: Callable[[str, LinkServer], tuple[Any, Any]],
    ) -> None:
        self.reactor = reactor
        self.secret = secret
        self.max_message = max_message
        self.accept = accept
        self.links: set[LinkProtocol] = set()

    def buildProtocol(self, addr: Any) -> LinkServer:
        protocol = LinkServer(self.secret, self.reactor, self.max_message)
        protocol.factory = self
        return protocol


class LinkClient(LinkProtocol):
    """
    The accepting instance's end: C{result} fires with C{(link, peer)}
    once the owner paired the session, or fails with L{ProtocolError}
    (the owner refused: C{no-session}, C{peer-gone}) or L{LinkClosed}.
    """

    def __init__(self, secret: bytes, reactor: Any, max_message: int, session: str) -> None:
        super().__init__(secret, reactor, max_message)
        self.session = session
        self._nonce = os.urandom(16)
        self._server_nonce: bytes | None = None
        self.result: Deferred[tuple[LinkClient, str | None]] = Deferred()

    def setup_message(self, message: dict[str, Any]) -> None:
        if self._server_nonce is None:
            try:
                nonce = bytes.fromhex(str(message["nonce"]))
            except (KeyError, ValueError):
                nonce = b""
            if message.get("v") != LINK_VERSION or len(nonce) != 16:
                self.setup_failed("the other instance speaks another cluster link version")
                self.transport.abortConnection()
                return
            self._server_nonce = nonce
            mac = link_mac(self._secret, b"accept", nonce, self._nonce, self.session)
            self.send_setup({"op": "accept", "session": self.session, "nonce": self._nonce.hex(), "mac": mac})
            return
        self._stop_setup_timer()
        if not message.get("ok"):
            try:
                code = ErrorCode(message.get("code"))
            except ValueError:
                code = ErrorCode.NO_SESSION
            self._fire_error(ProtocolError(code, str(message.get("message") or code.value)))
            self._closing = True
            self.transport.loseConnection()
            return
        expected = link_mac(self._secret, b"paired", self._server_nonce, self._nonce, self.session)
        answer = str(message.get("mac", ""))
        if not (_MAC.fullmatch(answer) and hmac.compare_digest(answer, expected)):
            self.setup_failed("the other instance failed cluster link authentication")
            self.transport.abortConnection()
            return
        peer = message.get("peer")
        # Stop parsing set-up messages: what follows is frames, delivered
        # once the caller calls link_to().
        self._frames = _PENDING  # type: ignore[assignment]
        if not self.result.called:
            self.result.callback((self, peer if isinstance(peer, str) else None))

    def dataReceived(self, data: bytes) -> None:
        if self._frames is _PENDING:
            self._buffer += data
            return
        super().dataReceived(data)

    def link_to(self, local: Any) -> None:
        self._frames = None
        super().link_to(local)

    def setup_failed(self, reason: str) -> None:
        self._fire_error(LinkClosed(reason))

    def _fire_error(self, error: Exception) -> None:
        if not self.result.called:
            self.result.errback(error)


_PENDING: Any = object()
