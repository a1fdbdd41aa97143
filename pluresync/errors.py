"""
The one error tree of pluresync.

Every message is written for the person who will read it: it says what went
wrong and what to do, and it never carries a key, topic, psk or full
rendezvous id (a short prefix at most).
"""

from collections.abc import Sequence

from twisted.internet.error import ConnectionLost


class PluresyncError(Exception):
    """Base of every error pluresync raises on purpose."""


class ConfigurationError(PluresyncError, ValueError):
    """A parameter, endpoint string or key file is wrong; nothing was sent."""


class KeyFileError(ConfigurationError):
    """A sync key or identity file is missing, unreadable or malformed."""


class HandshakeError(PluresyncError):
    """The end-to-end handshake with the peer did not complete."""


class WrongKeyError(HandshakeError):
    """The peer does not share our sync key (or topic)."""

    def __init__(self, detail: str = "") -> None:
        message = (
            "handshake failed: the peer does not share this sync key "
            "(check that both sides use the same key file and topic)"
        )
        if detail:
            message = f"{message}; {detail}"
        super().__init__(message)


class VersionError(HandshakeError):
    """The peer speaks another version of the end-to-end protocol."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "the peer runs an older pluresync (end-to-end protocol version 1); this side needs version 2 "
            "(streams that survive a change of relay): upgrade pluresync on both sides"
        )


class NotChosenError(HandshakeError):
    """The connecting peer completed the handshake but used another path (it raced several)."""


class PeerMismatchError(HandshakeError):
    """The peer proved a different identity from the one we asked for."""


class RecordError(PluresyncError):
    """A record failed authentication or is malformed: the stream was tampered with."""


class TruncatedStreamError(PluresyncError, ConnectionLost):
    """
    The stream ended without the peer's authenticated close record, so data
    may be missing. It is a C{ConnectionLost}, never a C{ConnectionDone}, so
    Twisted protocols that only know Twisted's errors still see an unclean end.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__doc__.split("\n")[0]


class PeerGoneError(TruncatedStreamError):
    """The peer vanished (its side of the relay pair closed without a clean close)."""


class StreamResetError(PeerGoneError):
    """
    The peer ended one stream of a shared session without a clean end (its
    application aborted it); the session and its other streams go on.
    """


class StreamOpenError(PluresyncError):
    """
    A new stream on an existing session could not be opened.

    @ivar reason: the listener's RESET reason byte (L{pluresync.session.wire.ResetReason}),
        or C{None} when the session ended before the listener answered.
    """

    def __init__(self, message: str, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class RelayLostError(TruncatedStreamError):
    """The connection to the relay was lost (the relay died, restarted or was cut off)."""


class ConnectionTimeoutError(PluresyncError):
    """No peer connection was established within the configured timeout."""


class DirectPathError(PluresyncError):
    """
    No direct path to the peer could be opened; the relay keeps carrying
    the stream (docs/troubleshooting.md, "Why direct failed").

    @ivar reason: why, as a short code: C{both-symmetric}, C{udp-blocked},
        C{no-answer}, C{one-way}, C{unreachable} or C{no-candidates}; for
        the QUIC pipe on a punched path also C{certificate} (a pinned
        certificate did not match) or C{quic-handshake} (the QUIC
        handshake failed or the peer broke the pipe's rules).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RelayError(PluresyncError):
    """
    The relay refused or ended our request.

    @ivar code: the relay's error code (C{no-listener}, C{timeout}, ...), or
        C{None} when the relay could not be reached at all.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RelayUnreachableError(RelayError):
    """We could not open a WebSocket to the relay (DNS, TCP, TLS or HTTP upgrade)."""


class RelayAuthError(RelayUnreachableError):
    """
    The relay refused the WebSocket upgrade with HTTP 401: it requires a
    valid relay token and we sent none, or one it does not accept
    (C{code} is C{"unauthorized"}). The message never contains the token.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "unauthorized")


class RelayBusyError(RelayUnreachableError):
    """
    The relay refused the WebSocket upgrade for now: HTTP 429 (too many
    connections from our address; C{code} C{"rate-limited"}) or 503 (at its
    connection limit, or shutting down; C{code} C{"busy"}).

    @ivar retry_after: the seconds its C{Retry-After} asked us to wait
        (C{None}: it gave none).
    """

    def __init__(self, message: str, code: str, retry_after: float | None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class StunError(PluresyncError):
    """A STUN query for our public address failed: no answer, an error answer, or an unusable one."""


class StunFormatError(StunError, ValueError):
    """
    A datagram is not a well-formed STUN message (or not STUN at all).

    @ivar reason: what is wrong with it, for a debug log line.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StunUnreachableError(StunError):
    """No answer can come back from a STUN server: the request could not be sent, or nothing answered."""


class StunTimeoutError(StunUnreachableError):
    """A STUN server did not answer in time: UDP to it is blocked, or it is down."""


class StunErrorResponse(StunError):
    """
    A STUN server answered with an error response.

    @ivar code: the STUN error code (e.g. 420, 401).
    @ivar reason: the server's reason phrase (sanitised, shortened).
    """

    def __init__(self, message: str, code: int, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class CertificateMismatchError(DirectPathError):
    """
    A QUIC certificate is not the one whose fingerprint was exchanged inside
    the end-to-end encrypted channel: the peer's (we refused it), or ours
    (the peer refused it).  Someone else answered at the peer's address, or
    the fingerprints were mixed up between two attempts.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "certificate")


class DirectPipeLostError(TruncatedStreamError):
    """
    A direct connection to the peer (no relay) ended without an orderly
    close: reset, timed out, or cut off by a network change.
    """


class LanError(PluresyncError):
    """Finding or reaching a peer on the local network failed."""


class LanDiscoveryError(LanError):
    """
    LAN discovery (mDNS/DNS-SD) cannot run here: the optional zeroconf
    package is missing, or no multicast socket could be opened.
    """


class LanConnectError(LanError):
    """
    No TCP connection could be opened to any address a LAN peer advertised.

    @ivar attempts: C{(address, what went wrong)} for each address tried, in order.
    """

    def __init__(
        self, attempts: Sequence[tuple[str, str]], prefix: str = "could not reach the peer on the LAN"
    ) -> None:
        self.attempts = list(attempts)
        detail = "; ".join(f"{address}: {why}" for address, why in self.attempts) or "no address to try"
        super().__init__(f"{prefix}: {detail}")


class LanConnectTimeoutError(LanConnectError, ConnectionTimeoutError):
    """The deadline passed before a TCP connection to any advertised address opened."""


class LanNoPeerError(LanError):
    """
    Nobody answered a LAN search for this key and topic in time: no listener
    runs on this network, or multicast (mDNS) does not reach it.
    """
