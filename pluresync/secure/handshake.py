"""
The end-to-end handshake: C{Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b}.

XX lets each side learn and authenticate the other's static key (its peer
id); psk3 mixes the topic's pre-shared key into the last message, so only a
peer holding the same sync key and topic completes it. The connecting side is
the initiator::

    initiator                                  responder
    -> e                                     (frame 1)
                           <- e, ee, s, es   (frame 2)
    -> s, se, psk                            (frame 3)
                           <- READY record   (or an abort frame)
    -> USE record (or CLOSE, if another path won a race)

The initiator waits for READY before it reports success, so a wrong key
fails C{connect()} on both sides instead of failing a connection that looked
established; the responder waits for USE before it builds a protocol, so an
initiator racing several relays leaves no stray connections at listeners.

The READY, USE and CLOSE records travel after the Noise messages, sealed
with the new keys, so this module only produces the keys:
L{pluresync.secure.link} sends and checks those records.

This module is pure (no I/O): L{Handshake} takes frame bodies and returns
frame bodies to send; L{pluresync.secure.link} drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pluresync.errors import HandshakeError, PeerMismatchError, VersionError, WrongKeyError
from pluresync.keys import PeerIdentity, Topic, format_peer_id
from pluresync.noise import CipherState, HandshakeState, NoiseError
from pluresync.secure.frames import AbortReason

PROTOCOL_NAME = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"
#: Kept from version 1: the end-to-end version is negotiated inside the
#: handshake's payloads (pluresync.session.wire), not by the prologue, so a
#: version 1 peer completes the handshake and hears a clear refusal.
PROLOGUE = b"pluresync.v1"
_MIN_NOISE_MESSAGE = 32


@dataclass
class Secured:
    """
    The outcome of a completed handshake.

    @ivar payload: (responder) the initiator's frame-3 payload: its session
        hello (L{pluresync.session.wire.Hello}), empty from a version 1 peer.
    @ivar handshake_hash: the transcript hash, the same on both sides; a
        new session's identity is derived from it.
    """

    send: CipherState
    receive: CipherState
    remote_static: bytes
    payload: bytes = b""
    handshake_hash: bytes = b""


class HandshakeAborted(Exception):
    """Raised by L{Handshake.receive} with the abort frame to send, then the error."""

    def __init__(self, notice: bytes | None, error: HandshakeError) -> None:
        super().__init__(str(error))
        self.notice = notice
        self.error = error


class Handshake:
    """
    One side of the handshake.

    @param expected_peer: (initiator) the responder's static public key we
        insist on, from C{peer=}; any other identity is refused.
    @param firewall: (responder) called with the initiator's peer id once it
        is proven; return C{False} to refuse the peer.
    @param payload: (initiator) makes the frame-3 payload, when frame 3 is
        written: encrypted, and bound to this handshake's fresh ephemerals,
        so nobody else can read or replay it.
    """

    def __init__(
        self,
        initiator: bool,
        identity: PeerIdentity,
        topic: Topic,
        *,
        expected_peer: bytes | None = None,
        firewall: Callable[[str], bool] | None = None,
        payload: Callable[[], bytes] | None = None,
    ) -> None:
        self.initiator = initiator
        self._payload = payload
        self._expected_peer = expected_peer
        self._firewall = firewall
        self._noise = HandshakeState(
            PROTOCOL_NAME,
            initiator,
            prologue=PROLOGUE,
            s=identity.private,
            psks=[topic.psk],
        )
        self._secured: Secured | None = None
        self._reads = 0

    def start(self) -> list[bytes]:
        """The frame bodies to send first (the initiator's opening message)."""
        return [self._noise.write_message()] if self.initiator else []

    def receive(self, body: bytes) -> tuple[list[bytes], Secured | None]:
        """
        Take one frame body from the peer.

        @return: the frame bodies to send, and the L{Secured} result when
            the responder is done (after frame 3).  The initiator's keys are
            ready after frame 2 but not yet confirmed: it gets them from
            L{pending} to open the READY record that confirms them.
        @raise HandshakeAborted: the handshake failed; send its notice (if
            any), then close.
        """
        if len(body) < _MIN_NOISE_MESSAGE:
            raise HandshakeAborted(None, abort_error(body))
        self._reads += 1
        try:
            payload = self._noise.read_message(body)
        except NoiseError:
            # Only frame 3 (the responder's second read) depends on the psk,
            # so only there does a failure mean the keys differ.
            if not self.initiator and self._reads == 2:
                raise HandshakeAborted(bytes([AbortReason.WRONG_KEY]), WrongKeyError()) from None
            raise HandshakeAborted(
                bytes([AbortReason.MALFORMED]),
                HandshakeError("handshake failed: the peer sent a malformed or tampered message"),
            ) from None
        remote = self._noise.remote_static
        if self.initiator:
            if self._expected_peer is not None and remote != self._expected_peer:
                raise HandshakeAborted(
                    bytes([AbortReason.REFUSED]),
                    PeerMismatchError(
                        f"the listener is peer {format_peer_id(remote)[:12]}…, "
                        f"not the requested {format_peer_id(self._expected_peer)[:12]}…"
                    ),
                )
            out = [self._noise.write_message(self._payload() if self._payload is not None else b"")]
            send, receive = self._noise.split()
            self._secured = Secured(send, receive, remote, handshake_hash=self._noise.handshake_hash)
            return out, None
        if not self._noise.finished:
            return [self._noise.write_message()], None
        if self._firewall is not None and not self._firewall(format_peer_id(remote)):
            raise HandshakeAborted(
                bytes([AbortReason.REFUSED]),
                HandshakeError(f"peer {format_peer_id(remote)[:12]}… refused by the firewall"),
            )
        send, receive = self._noise.split()
        return [], Secured(send, receive, remote, payload, self._noise.handshake_hash)

    def pending(self) -> Secured:
        """(initiator) the keys, to decrypt the READY record that confirms them."""
        assert self._secured is not None
        return self._secured


def abort_error(body: bytes) -> HandshakeError:
    """The error a frame that is not a Noise message stands for (an abort notice, or garbage)."""
    if len(body) == 1:
        try:
            reason = AbortReason(body[0])
        except ValueError:
            reason = None
        if reason is AbortReason.WRONG_KEY:
            return WrongKeyError("the peer could not authenticate our handshake")
        if reason is AbortReason.REFUSED:
            return HandshakeError("handshake refused: the peer does not accept this peer id")
        if reason is AbortReason.VERSION:
            return VersionError()
    return HandshakeError(
        "handshake failed: the peer gave up (it may not share this sync key, or be a different program)"
    )
