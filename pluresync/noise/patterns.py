"""
Handshake patterns, and turning a Noise protocol name into one.

Patterns are data, not code: L{HandshakeState} interprets the tokens, so
supporting another pattern means adding a table row, not a code path.
"""

import re
from dataclasses import dataclass

# Base patterns from the Noise spec, section 7: (initiator pre-message,
# responder pre-message, messages). Message i is sent by the initiator when
# i is even.
_Tokens = tuple[str, ...]
_BASE_PATTERNS: dict[str, tuple[_Tokens, _Tokens, tuple[_Tokens, ...]]] = {
    "NN": ((), (), (("e",), ("e", "ee"))),
    "XX": ((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
    "IK": ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
}

_PRIMITIVES = {"DH": ("25519",), "cipher": ("ChaChaPoly", "AESGCM"), "hash": ("BLAKE2b",)}

# The base name is upper case (and digits, for deferred patterns); modifiers
# start lower case and are joined by "+".
_PATTERN_NAME = re.compile(r"([A-Z][A-Z0-9]*)((?:[a-z][a-z0-9]*)(?:\+[a-z][a-z0-9]*)*)?")
_PSK_MODIFIER = re.compile(r"psk(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class HandshakePattern:
    """
    A fully modified pattern, ready to interpret.

    @ivar name: the pattern part of the protocol name, e.g. C{XXpsk3}.
    """

    name: str
    initiator_premessage: tuple[str, ...]
    responder_premessage: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @property
    def psk_count(self) -> int:
        """How many psks the caller must supply, in order of use."""
        return sum(tokens.count("psk") for tokens in self.messages)


def parse_protocol_name(protocol_name: str) -> HandshakePattern:
    """
    Return the pattern named by C{protocol_name}, such as
    C{Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b}.

    The name is hashed into the handshake, so both sides must agree on it
    byte for byte; anything we cannot honour exactly is refused rather than
    approximated.

    @raise ValueError: naming the unsupported part.
    """
    parts = protocol_name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise ValueError(f"{protocol_name!r} is not a Noise protocol name (expected Noise_PATTERN_DH_CIPHER_HASH)")
    for (kind, wanted), got in zip(_PRIMITIVES.items(), parts[2:], strict=False):
        if got not in wanted:
            raise ValueError(f"unsupported Noise {kind} function {got!r}: supported: {', '.join(wanted)}")
    return _parse_pattern(parts[1])


def cipher_of(protocol_name: str) -> str:
    """The cipher function a (valid) protocol name names: C{ChaChaPoly} or C{AESGCM}."""
    return protocol_name.split("_")[3]


def _parse_pattern(name: str) -> HandshakePattern:
    match = _PATTERN_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"malformed Noise pattern name {name!r}")
    base, modifiers = match.group(1), match.group(2)
    if base not in _BASE_PATTERNS:
        raise ValueError(
            f"unsupported Noise handshake pattern {base!r}: supported are {', '.join(sorted(_BASE_PATTERNS))}"
        )
    initiator_pre, responder_pre, base_messages = _BASE_PATTERNS[base]
    messages = [list(tokens) for tokens in base_messages]
    seen: set[str] = set()
    for modifier in modifiers.split("+") if modifiers else ():
        psk = _PSK_MODIFIER.fullmatch(modifier)
        if psk is None:
            raise ValueError(f"unsupported Noise pattern modifier {modifier!r}: only pskN is supported")
        if modifier in seen:
            raise ValueError(f"Noise pattern modifier {modifier!r} is repeated")
        seen.add(modifier)
        position = int(psk.group(1))
        if position > len(messages):
            raise ValueError(f"modifier {modifier!r} refers to a message that {base} does not have")
        # psk0 opens the first message; pskN closes message N.
        if position == 0:
            messages[0].insert(0, "psk")
        else:
            messages[position - 1].append("psk")
    return HandshakePattern(
        name=name,
        initiator_premessage=initiator_pre,
        responder_premessage=responder_pre,
        messages=tuple(tuple(tokens) for tokens in messages),
    )
