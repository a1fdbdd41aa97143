"""
One-line explanations of why a C{wss://} connection to a relay failed in TLS.

What a client sees when TLS goes wrong (Twisted 26, pyOpenSSL 26, OpenSSL 3/4;
found by running each case against a relay on 127.0.0.1):

 - untrusted CA, expired or not-yet-valid certificate: the connection is lost
   with C{OpenSSL.SSL.Error([('SSL routines', '', 'certificate verify
   failed')])}; which of them it was is only in the TLS connection (its
   verification code and the certificate chain the server sent);
 - certificate valid but for other names: C{service_identity}'s
   C{VerificationError} (Twisted checks the name while verifying the leaf);
 - a server that does not speak TLS: C{ConnectionLost} before any cipher was
   negotiated when it closes without answering (a pluresync relay serving
   plain C{ws://} does that), or C{OpenSSL.SSL.Error(... 'wrong version
   number')} when it answers in plain text (an HTTP server's C{400}).

Autobahn keeps only a text of the reason (C{wasNotCleanReason}: C{"SSL error:
certificate verify failed (in )"}, or C{"peer dropped the TCP connection
without previous WebSocket closing handshake"} for the others), so the caller
passes the C{Failure} its C{connectionLost} received and, for details, the
TLS transport (or its C{OpenSSL.SSL.Connection}).
"""

from __future__ import annotations

import datetime

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

try:
    from service_identity import VerificationError
except ImportError:  # pragma: no cover - twisted[tls] installs it
    VerificationError = ()  # type: ignore[assignment,misc]

_codes = SSL.X509VerificationCodes
_UNTRUSTED = {
    _codes.ERR_UNABLE_TO_GET_ISSUER_CERT,
    _codes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    _codes.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    _codes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
    _codes.ERR_SELF_SIGNED_CERT_IN_CHAIN,
    _codes.ERR_CERT_UNTRUSTED,
}
#: OpenSSL's words for "the bytes that came back are not TLS records".
_NOT_TLS_REASONS = ("wrong version number", "packet length too long", "record layer failure", "unknown protocol")


def _untrusted(host: str) -> str:
    return (
        f"the relay's TLS certificate for {host} is not signed by a trusted CA "
        "(a TLS-inspecting proxy, or a private relay: pass ca=PATH with its CA bundle)"
    )


def _openssl_connection(transport) -> SSL.Connection | None:
    if isinstance(transport, SSL.Connection):
        return transport
    handle = getattr(transport, "getHandle", None)
    try:
        handle = handle() if handle is not None else None
    except Exception:
        return None
    return handle if isinstance(handle, SSL.Connection) else None


def _verify_code(connection: SSL.Connection | None) -> int | None:
    """OpenSSL's verification result; pyOpenSSL has no public accessor for it."""
    if connection is None:
        return None
    try:
        from OpenSSL._util import lib

        return int(lib.SSL_get_verify_result(connection._ssl))
    except Exception:
        return None


def _leaf(connection: SSL.Connection | None):
    """The certificate the server sent (even if it failed verification), as C{cryptography}'s."""
    if connection is None:
        return None
    try:
        chain = connection.get_peer_cert_chain(as_cryptography=True)
    except Exception:
        return None
    return chain[0] if chain else None


def _names(certificate, limit: int = 4) -> str | None:
    from cryptography import x509

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except Exception:
        names = []
    if not names:
        try:
            names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        except Exception:
            names = []
    if not names:
        return None
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _validity(certificate) -> tuple[datetime.datetime, datetime.datetime] | None:
    try:
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    except Exception:
        return None


def describe_tls_failure(failure_or_exception, host: str, port: int | None = None, *, transport=None) -> str | None:
    """
    Explain a failed TLS connection to a relay in one line, or return
    C{None} when C{failure_or_exception} is not a TLS failure (or not one we
    can tell apart from other connection losses).

    @param failure_or_exception: what the client protocol's C{connectionLost}
        received (a L{Failure}), or the exception itself.
    @param host: the host name (or address) we connected to, as in the URL.
    @param port: its port, for the "did not answer TLS" message.
    @param transport: the TLS transport the failure happened on
        (C{TLSMemoryBIOProtocol}) or its C{OpenSSL.SSL.Connection}, if
        still at hand: it tells an expired certificate from an untrusted
        one, which names a certificate holds, and whether any TLS came back.
    """
    error = failure_or_exception.value if isinstance(failure_or_exception, Failure) else failure_or_exception
    connection = _openssl_connection(transport)
    where = host if port is None else (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    not_tls = f"{where} did not answer TLS: is the relay serving plain ws:// (use ws://) or behind a TLS terminator?"

    if VerificationError and isinstance(error, VerificationError):
        leaf = _leaf(connection)
        names = _names(leaf) if leaf is not None else None
        if names:
            return f"the relay's TLS certificate is not valid for {host} (it names {names})"
        return f"the relay's TLS certificate is not valid for {host}"

    if isinstance(error, SSL.Error) and not isinstance(error, SSL.SysCallError):
        reasons = [str(part[-1]) for part in (error.args[0] if error.args and isinstance(error.args[0], list) else [])]
        text = "; ".join(r for r in reasons if r) or str(error) or type(error).__name__
        if "certificate verify failed" in text:
            code = _verify_code(connection)
            leaf = _leaf(connection)
            validity = _validity(leaf) if leaf is not None else None
            now = datetime.datetime.now(datetime.UTC)
            if code == _codes.ERR_CERT_HAS_EXPIRED or (code is None and validity and validity[1] < now):
                when = f" on {validity[1]:%Y-%m-%d %H:%M} UTC" if validity else ""
                return f"the relay's TLS certificate for {host} expired{when} (or this machine's clock is wrong)"
            if code == _codes.ERR_CERT_NOT_YET_VALID or (code is None and validity and validity[0] > now):
                when = f" until {validity[0]:%Y-%m-%d %H:%M} UTC" if validity else ""
                return f"the relay's TLS certificate for {host} is not valid yet{when} (is this machine's clock right?)"
            if code in _UNTRUSTED or (code is None and leaf is not None):
                return _untrusted(host)
            if code is not None and code != _codes.OK:
                try:
                    from OpenSSL._util import ffi, lib

                    detail = ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
                except Exception:
                    detail = f"OpenSSL verification error {code}"
                return f"the relay's TLS certificate for {host} was rejected: {detail}"
            return (
                f"the relay's TLS certificate for {host} failed verification (not signed by a trusted CA, "
                "or expired; for a private relay pass ca=PATH with its CA bundle)"
            )
        if any(reason in text for reason in _NOT_TLS_REASONS):
            return not_tls
        return f"the TLS handshake with {where} failed: {text}"

    if isinstance(error, (ConnectionLost, ConnectionDone, SSL.SysCallError)):
        # Closed before the server's hello was even understood: no TLS came back.
        if connection is not None and connection.get_cipher_name() is None:
            return not_tls
        return None
    return None
