"""
Curve25519 keys and Diffie-Hellman, the only DH function we speak.
"""

from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import CryptoError
from nacl.utils import random

from pluresync.noise.errors import NoiseError

DHLEN = 32


def generate_private_key() -> bytes:
    """
    Return a fresh X25519 private key.

    Clamping is left to the scalar multiplication, as X25519 defines it, so
    any 32 random bytes are a valid key.
    """
    return random(DHLEN)


def public_key(private: bytes) -> bytes:
    """Return the X25519 public key that goes with C{private}."""
    return crypto_scalarmult_base(check_key(private, "private key"))


def dh(private: bytes, remote_public: bytes) -> bytes:
    """
    Return the X25519 shared secret.

    libsodium refuses low-order points (the all-zero result), which only a
    misbehaving peer can send, so that becomes a L{NoiseError}.
    """
    try:
        return crypto_scalarmult(private, remote_public)
    except CryptoError:
        raise NoiseError("the peer sent an invalid Curve25519 public key; the handshake cannot continue") from None


def check_key(key: bytes, what: str) -> bytes:
    """
    Return C{key} as C{bytes}, or raise C{ValueError} if it is not 32 bytes.

    The message names the role of the key, never its value.
    """
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) != DHLEN:
        raise ValueError(f"{what} must be {DHLEN} bytes, not {len(key)}")
    return key
