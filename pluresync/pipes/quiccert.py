"""
The QUIC pipe's certificates: ephemeral, self-signed, and trusted only by
the fingerprint that the peers exchanged inside their end-to-end encrypted
channel.

No certificate authority can vouch for a peer behind a NAT, and none is
needed: each side makes a fresh key pair and certificate for one direct
attempt, sends the SHA-256 of its certificate's DER (its I{fingerprint}) to
the peer through the secure channel (signaling over the relay), and accepts
only the certificate with the fingerprint it was given.

The server's certificate is checked by TLS itself (qh3's
C{assert_fingerprint}).  The client's cannot be: qh3 2.1's server never
asks for a client certificate (it has no CertificateRequest state).  So the
client proves its certificate after the handshake, inside the connection:
it sends the certificate and an ECDSA signature, by the certificate's key,
over a context string, the connection's original destination connection id
and both fingerprints (L{proof_message}).  That is sound because the client
sends it only once TLS has shown the server to be the pinned peer, so
nobody else ever sees it; the connection id and the server's fingerprint
(fresh for each attempt) make a proof worthless on any other connection
even to that peer.  A TLS exporter would bind it tighter, but qh3 offers
none.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pluresync.errors import CertificateMismatchError, ConfigurationError

#: Bytes of a fingerprint: SHA-256 of the certificate's DER.
FINGERPRINT_SIZE = 32
#: What a client's proof signs first, so that the signature means nothing
#: in any other protocol.
PROOF_CONTEXT = b"pluresync/1 quic client certificate\x00"
#: How long an ephemeral certificate claims to be valid.  Nobody checks the
#: dates (the fingerprint is the trust), but a certificate that is already
#: expired can trip up a TLS stack, so it covers the longest pipe generously.
VALIDITY = datetime.timedelta(days=30)


def fingerprint_of(der: bytes) -> bytes:
    """The fingerprint of a certificate: SHA-256 of its DER."""
    return hashlib.sha256(der).digest()


def short(fingerprint: bytes) -> str:
    """A fingerprint as errors and logs show it: a prefix, enough to tell two apart."""
    return fingerprint[:6].hex()


def check_fingerprint(fingerprint: bytes) -> bytes:
    """A fingerprint given by the caller, checked for its size."""
    if not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_SIZE:
        raise ConfigurationError(
            f"a QUIC certificate fingerprint is the {FINGERPRINT_SIZE}-byte SHA-256 of the certificate's DER"
        )
    return fingerprint


def proof_message(connection_id: bytes, server_fingerprint: bytes, client_fingerprint: bytes) -> bytes:
    """What the client signs to prove its certificate on one connection."""
    return b"".join((PROOF_CONTEXT, bytes([len(connection_id)]), connection_id, server_fingerprint, client_fingerprint))


@dataclass(frozen=True, eq=False)
class QuicCertificate:
    """
    One side's ephemeral certificate (ECDSA P-256: qh3 does not offer
    Ed25519 signatures by default) and its private key, which is never shown.

    @ivar der: the certificate, DER-encoded.
    @ivar fingerprint: SHA-256 of C{der}, what the peer must be given.
    """

    der: bytes
    fingerprint: bytes
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> QuicCertificate:
        """A new key pair and a self-signed certificate naming nobody (CN=pluresync)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pluresync")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + VALIDITY)
            .sign(key, hashes.SHA256())
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        return cls(der, fingerprint_of(der), key)

    def certificate_pem(self) -> bytes:
        return x509.load_der_x509_certificate(self.der).public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def prove(self, connection_id: bytes, server_fingerprint: bytes) -> bytes:
        """(client) The signature that proves this certificate on one connection (L{proof_message})."""
        message = proof_message(connection_id, server_fingerprint, self.fingerprint)
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_proof(
    der: bytes, signature: bytes, *, expected: bytes, connection_id: bytes, server_fingerprint: bytes
) -> None:
    """
    (server) Accept the client's certificate and proof, or raise
    L{CertificateMismatchError}: the certificate must have the pinned
    fingerprint and have signed this connection's L{proof_message}.
    """
    fingerprint = fingerprint_of(der)
    if not hmac.compare_digest(fingerprint, expected):
        raise CertificateMismatchError(
            f"the peer's QUIC certificate (sha256 {short(fingerprint)}...) is not the one exchanged in the "
            f"secure channel (sha256 {short(expected)}...): someone else answered at the peer's address"
        )
    try:
        public_key = x509.load_der_x509_certificate(der).public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("not an EC key")
        public_key.verify(
            signature, proof_message(connection_id, server_fingerprint, fingerprint), ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, ValueError):
        raise CertificateMismatchError(
            "the peer did not prove it holds the key of its QUIC certificate (bad signature)"
        ) from None
