"""
The single error the Noise layer raises for anything the peer can cause.

Callers catch L{NoiseError} once and know the handshake or stream is dead;
mistakes in how our own code calls the layer raise C{ValueError} instead, so
they are not mistaken for an attack.
"""

from pluresync.errors import PluresyncError


class NoiseError(PluresyncError):
    """
    A Noise message failed authentication, was malformed or came out of turn.

    After a L{HandshakeState} raises this, it refuses all further use: a
    half-processed handshake has mixed attacker-chosen input into its keys.
    """
