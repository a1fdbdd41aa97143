"""
The Noise Protocol Framework (revision 34) for 25519, ChaChaPoly or AESGCM, and BLAKE2b.

Only the patterns pluresync uses (NN, IK, XX and their psk variants) are
supported; anything else is refused by name rather than half-implemented.
"""

from pluresync.noise.cipher import (
    MAX_MESSAGE_LENGTH,
    MAX_PLAINTEXT_LENGTH,
    CipherState,
)
from pluresync.noise.errors import NoiseError
from pluresync.noise.handshake import HandshakeState
from pluresync.noise.keys import generate_private_key, public_key

__all__ = [
    "MAX_MESSAGE_LENGTH",
    "MAX_PLAINTEXT_LENGTH",
    "CipherState",
    "HandshakeState",
    "NoiseError",
    "generate_private_key",
    "public_key",
]
