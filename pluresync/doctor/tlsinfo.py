"""
What the doctor says about a relay's TLS certificate: a one-line summary
(subject, issuer, expiry) and a hint when the certificate looks like a
TLS-inspecting proxy's rather than the relay's own.

The hint is a heuristic, and says so: a certificate chain that names a
well-known inspection product, or a public relay whose certificate does not
chain to the system's trust store, is what inspection usually looks like;
nothing here can prove it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

#: Names that TLS-inspecting products put in the certificates they make
#: (issuer organisation or common name), lower case, with the product's
#: name as shown. Short on purpose: it only turns a guess into a hint.
INSPECTION_PRODUCTS: tuple[tuple[str, str], ...] = (
    ("zscaler", "Zscaler"),
    ("netskope", "Netskope"),
    ("palo alto networks", "Palo Alto Networks"),
    ("fortinet", "Fortinet (FortiGate)"),
    ("fortigate", "Fortinet (FortiGate)"),
    ("blue coat", "Blue Coat / Symantec ProxySG"),
    ("bluecoat", "Blue Coat / Symantec ProxySG"),
    ("symantec", "Blue Coat / Symantec ProxySG"),
    ("cisco umbrella", "Cisco Umbrella"),
    ("sophos", "Sophos"),
    ("forcepoint", "Forcepoint"),
)

#: A certificate that expires within this many days gets a warning.
EXPIRY_WARNING_DAYS = 14


def _attribute(name: x509.Name, oid) -> str | None:
    try:
        values = name.get_attributes_for_oid(oid)
    except Exception:
        return None
    return str(values[0].value) if values else None


def describe_name(name: x509.Name) -> str:
    """C{CN=..., O=...} (the parts people recognise), or the full RFC 4514 form."""
    parts = []
    for label, oid in (("CN", NameOID.COMMON_NAME), ("O", NameOID.ORGANIZATION_NAME)):
        value = _attribute(name, oid)
        if value:
            parts.append(f"{label}={value}")
    if parts:
        return ", ".join(parts)
    try:
        return name.rfc4514_string() or "(empty)"
    except Exception:
        return "(unreadable)"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def expiry(certificate: x509.Certificate, now: datetime.datetime | None = None) -> tuple[str, int | None]:
    """C{("expires 2026-03-01 (in 29 days)", 29)}; days is C{None} if unreadable."""
    try:
        end = certificate.not_valid_after_utc
    except Exception:
        return "expiry unreadable", None
    days = (end - (now or _now())).days
    if days < 0:
        return f"expired {end:%Y-%m-%d} ({-days} days ago)", days
    return f"expires {end:%Y-%m-%d} (in {days} days)", days


def summary(certificate: x509.Certificate, now: datetime.datetime | None = None) -> str:
    """C{subject CN=relay.example.net, issuer CN=R11, O=Let's Encrypt, expires ...}."""
    return (
        f"subject {describe_name(certificate.subject)}; issuer {describe_name(certificate.issuer)}; "
        f"{expiry(certificate, now)[0]}"
    )


def inspection_product(chain: Sequence[x509.Certificate]) -> str | None:
    """
    The inspection product a certificate chain names (in an issuer's or
    subject's organisation, unit or common name), or C{None}.
    """
    for certificate in chain:
        for name in (certificate.issuer, certificate.subject):
            for oid in (NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME):
                value = (_attribute(name, oid) or "").lower()
                for needle, product in INSPECTION_PRODUCTS:
                    if needle in value:
                        return product
    return None
