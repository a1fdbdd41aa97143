"""
Noise's HandshakeState: a generic interpreter of handshake patterns.

Every pattern runs through the same token loop, so the code paths the test
vectors exercise are the ones every supported pattern uses.
"""

from collections.abc import Sequence

from pluresync.noise.cipher import (
    MAX_MESSAGE_LENGTH,
    TAG_LENGTH,
    CipherState,
    SymmetricState,
)
from pluresync.noise.errors import NoiseError
from pluresync.noise.keys import DHLEN, check_key, dh, generate_private_key, public_key
from pluresync.noise.patterns import HandshakePattern, cipher_of, parse_protocol_name

_DH_TOKENS = frozenset({"ee", "es", "se", "ss"})


class HandshakeState:
    """
    One party's side of a Noise handshake.

    Call L{write_message} and L{read_message} in the pattern's order until
    L{finished}, then L{split} for the transport ciphers. Any L{NoiseError}
    leaves the state unusable: it may have absorbed attacker input.
    """

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        *,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        """
        @param e: a fixed ephemeral key, for test vectors only: reusing an
            ephemeral across handshakes destroys their secrecy.
        @param rs: the peer's static public key, for patterns that need it
            in advance (IK). Patterns that transmit it refuse it here, so
            nobody mistakes it for a pin; compare L{remote_static} instead.
        @raise ValueError: unsupported protocol, or keys/psks that do not
            fit the pattern.
        """
        pattern = parse_protocol_name(protocol_name)
        self._initiator = bool(initiator)
        self._messages = pattern.messages
        self._psk_mode = pattern.psk_count > 0

        self._s = None if s is None else check_key(s, "static private key")
        self._s_pub = None if self._s is None else public_key(self._s)
        self._e = None if e is None else check_key(e, "ephemeral private key")
        self._e_pub = None if self._e is None else public_key(self._e)
        self._rs = None if rs is None else check_key(rs, "remote static public key")
        self._re: bytes | None = None

        psks = [check_key(psk, "psk") for psk in psks]
        if len(psks) != pattern.psk_count:
            raise ValueError(f"{pattern.name} needs {pattern.psk_count} psk(s), got {len(psks)}")
        self._psks = iter(psks)
        self._check_keys_fit(pattern)

        self._symmetric = SymmetricState(protocol_name.encode("ascii"), cipher_of(protocol_name))
        self._symmetric.mix_hash(bytes(prologue))
        # Initiator's pre-message keys are hashed first, whoever we are.
        for tokens, sender_is_initiator in (
            (pattern.initiator_premessage, True),
            (pattern.responder_premessage, False),
        ):
            ours = sender_is_initiator == self._initiator
            for token in tokens:
                if token != "s":
                    raise ValueError(f"unsupported pre-message token {token!r}")
                self._symmetric.mix_hash(self._s_pub if ours else self._rs)

        self._index = 0
        self._failed = False
        self._split: tuple[CipherState, CipherState] | None = None

    def _check_keys_fit(self, pattern: HandshakePattern) -> None:
        """Fail at construction, not halfway through the handshake."""
        we_send_s = any("s" in tokens for i, tokens in enumerate(pattern.messages) if (i % 2 == 0) == self._initiator)
        ours, theirs = (
            (pattern.initiator_premessage, pattern.responder_premessage)
            if self._initiator
            else (pattern.responder_premessage, pattern.initiator_premessage)
        )
        if (we_send_s or "s" in ours) and self._s is None:
            raise ValueError(f"{pattern.name} needs our static private key (s)")
        if "s" in theirs and self._rs is None:
            raise ValueError(f"{pattern.name} needs the peer's static public key in advance (rs)")
        if "s" not in theirs and self._rs is not None:
            raise ValueError(
                f"{pattern.name} learns the peer's static key during the "
                "handshake; do not pass rs, compare remote_static afterwards"
            )

    @property
    def finished(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._index == len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        """The transcript hash; both sides agree on it only if nobody meddled."""
        return self._symmetric.handshake_hash

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once the pattern has revealed it."""
        return self._rs

    def write_message(self, payload: bytes = b"") -> bytes:
        """
        Produce our next handshake message, carrying C{payload}.

        @raise ValueError: the message would exceed Noise's size limit; the
            state is untouched and can be retried with a smaller payload.
        @raise NoiseError: it is not our turn, or the state is spent.
        """
        tokens = self._next_tokens(sending=True)
        payload = bytes(payload)
        length = self._outgoing_length(tokens, len(payload))
        if length > MAX_MESSAGE_LENGTH:
            raise ValueError(
                f"handshake message would be {length} bytes, over Noise's "
                f"limit of {MAX_MESSAGE_LENGTH}; send a smaller payload"
            )
        symmetric = self._symmetric
        parts = []
        try:
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = generate_private_key()
                        self._e_pub = public_key(self._e)
                    parts.append(self._e_pub)
                    self._mix_ephemeral(self._e_pub)
                elif token == "s":
                    parts.append(symmetric.encrypt_and_hash(self._s_pub))
                else:
                    self._mix_secret(token)
            parts.append(symmetric.encrypt_and_hash(payload))
        except BaseException:
            self._failed = True
            raise
        self._index += 1
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """
        Consume the peer's next handshake message and return its payload.

        @raise NoiseError: the message is malformed, oversized, fails
            authentication (including a wrong psk), or arrives out of turn.
        """
        tokens = self._next_tokens(sending=False)
        try:
            payload = self._read(tokens, bytes(message))
        except BaseException:
            self._failed = True
            raise
        self._index += 1
        return payload

    def _read(self, tokens: tuple[str, ...], message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LENGTH:
            raise NoiseError(f"handshake message of {len(message)} bytes exceeds Noise's limit of {MAX_MESSAGE_LENGTH}")
        symmetric = self._symmetric
        position = 0

        def take(count: int) -> bytes:
            nonlocal position
            if len(message) - position < count:
                raise NoiseError("handshake message is truncated")
            field = message[position : position + count]
            position += count
            return field

        for token in tokens:
            if token == "e":
                self._re = take(DHLEN)
                self._mix_ephemeral(self._re)
            elif token == "s":
                size = DHLEN + (TAG_LENGTH if symmetric.has_key else 0)
                self._rs = symmetric.decrypt_and_hash(take(size))
            else:
                self._mix_secret(token)
        return symmetric.decrypt_and_hash(message[position:])

    def split(self) -> tuple[CipherState, CipherState]:
        """
        Return C{(send, receive)} transport ciphers for this party.

        Repeated calls return the same pair: two independent ciphers with the
        same key would reuse nonces.

        @raise NoiseError: the handshake has not finished or has failed.
        """
        self._check_usable()
        if self._split is None:
            if not self.finished:
                raise NoiseError("cannot split before the handshake has finished")
            c1, c2 = self._symmetric.split()
            self._split = (c1, c2) if self._initiator else (c2, c1)
            # Forward secrecy: nothing here may re-derive the session keys.
            self._e = None
            self._s = None
        return self._split

    def _check_usable(self) -> None:
        if self._failed:
            raise NoiseError("this handshake already failed; start a new one on a new connection")

    def _next_tokens(self, sending: bool) -> tuple[str, ...]:
        """Return the tokens of the next message, refusing out-of-turn use."""
        self._check_usable()
        if self.finished:
            raise NoiseError("the handshake is finished; use split()")
        initiators_turn = self._index % 2 == 0
        if (initiators_turn == self._initiator) != sending:
            expected = "write_message" if not sending else "read_message"
            raise NoiseError(f"out of turn: handshake message {self._index + 1} must be handled with {expected}")
        return self._messages[self._index]

    def _outgoing_length(self, tokens: tuple[str, ...], payload_length: int) -> int:
        """Predict the message size, so an oversize write changes nothing."""
        keyed = self._symmetric.has_key
        length = 0
        for token in tokens:
            if token == "e":
                length += DHLEN
                keyed = keyed or self._psk_mode
            elif token == "s":
                length += DHLEN + (TAG_LENGTH if keyed else 0)
            else:
                keyed = True
        return length + payload_length + (TAG_LENGTH if keyed else 0)

    def _mix_ephemeral(self, e_pub: bytes) -> None:
        # With a psk, encryption can start before any DH, and every
        # handshake restarts at nonce 0: mixing the ephemeral into the key
        # keeps that key unique per handshake even though the psk is not.
        self._symmetric.mix_hash(e_pub)
        if self._psk_mode:
            self._symmetric.mix_key(e_pub)

    def _mix_secret(self, token: str) -> None:
        if token == "psk":
            self._symmetric.mix_key_and_hash(next(self._psks))
            return
        if token not in _DH_TOKENS:
            raise ValueError(f"unknown Noise token {token!r}")
        # A DH token names the initiator's key first, the responder's second.
        mine, theirs = token if self._initiator else token[::-1]
        private = self._e if mine == "e" else self._s
        remote = self._re if theirs == "e" else self._rs
        self._symmetric.mix_key(dh(private, remote))
