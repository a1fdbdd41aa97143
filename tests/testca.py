"""
A throwaway certificate authority for TLS tests, made with C{cryptography}.

L{TestCA} makes a self-signed CA (EC P-256, so it takes milliseconds) and
issues server certificates for given DNS names and IP addresses, written as
PEM files (chain and key) into a directory. Nothing here is fit for anything
but tests: keys are unencrypted and live in a temporary directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class ServerCert:
    """
    A server certificate issued by a L{TestCA}.

    @ivar cert_path: PEM file with the leaf certificate followed by the CA's
        (the chain a server sends).
    @ivar key_path: PEM file with the leaf's private key (PKCS#8, unencrypted).
    """

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate

    def ssl_endpoint(self, port: int = 0, interface: str = "127.0.0.1") -> str:
        """A Twisted C{ssl:} server endpoint string serving this certificate."""

        def esc(path: Path) -> str:
            return str(path).replace("\\", "\\\\").replace(":", "\\:")

        return f"ssl:{port}:interface={interface}:privateKey={esc(self.key_path)}:certKey={esc(self.cert_path)}"


class TestCA:
    """
    A self-signed CA whose files live in C{directory}.

    @ivar ca_path: PEM file with the CA certificate (what a client trusts).
    """

    __test__ = False  # not a test case, whatever trial or pytest think of the name

    def __init__(self, directory: str | os.PathLike, name: str = "pluresync test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 30 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = _cert_pem(self.certificate)
        self.ca_path = self._unique("ca", ".pem")
        self.ca_path.write_bytes(self.pem)
        self._issued = 0

    def signing_pem(self) -> Path:
        """
        Write the CA's certificate and its private key into one PEM file and
        return its path: what a TLS-inspecting proxy (squid's C{ssl-bump}
        C{tls-cert=}) signs its forged certificates with.
        """
        path = self._unique("ca-with-key", ".pem")
        path.write_bytes(self.pem + _key_pem(self._key))
        path.chmod(0o600)
        return path

    def _unique(self, stem: str, suffix: str) -> Path:
        slug = "".join(c if c.isalnum() else "-" for c in self.name)
        return self.directory / f"{slug}-{stem}{suffix}"

    def issue(
        self,
        dns: tuple[str, ...] | list[str] = ("localhost",),
        ips: tuple[str, ...] | list[str] = ("127.0.0.1",),
        *,
        common_name: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> ServerCert:
        """
        Issue a server certificate whose subjectAltName lists C{dns} names
        and C{ips}, valid from yesterday for 30 days unless C{not_before} /
        C{not_after} say otherwise (pass a past C{not_after} for an expired
        certificate).
        """
        self._issued += 1
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cn = common_name or (list(dns) + list(ips) + ["server"])[0]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _ONE_DAY)
            .not_valid_after(not_after or now + 30 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self._unique(f"server{self._issued}", ".pem")
        key_path = self._unique(f"server{self._issued}", ".key")
        cert_path.write_bytes(_cert_pem(cert) + self.pem)
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        return ServerCert(cert_path, key_path, cert)


def bundle(directory: str | os.PathLike, *cas: TestCA, name: str = "bundle.pem") -> Path:
    """Write the certificates of several CAs into one PEM file (a CA bundle)."""
    path = Path(directory) / name
    path.write_bytes(b"".join(ca.pem for ca in cas))
    return path


class TestPKI:
    """
    The certificates a TLS test run needs, made once per process: a trusted
    CA with certificates for C{localhost}/C{127.0.0.1}, for C{otherhost}
    only, and an expired one; an unrelated second CA; and a bundle of both.
    """

    __test__ = False

    _shared: TestPKI | None = None

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.ca = TestCA(self.directory, "pluresync test CA")
        self.other_ca = TestCA(self.directory, "unrelated test CA")
        self.localhost = self.ca.issue(dns=["localhost"], ips=["127.0.0.1"])
        self.otherhost = self.ca.issue(dns=["otherhost"], ips=[])
        now = _now()
        self.expired = self.ca.issue(
            dns=["localhost"], ips=["127.0.0.1"], not_before=now - 10 * _ONE_DAY, not_after=now - _ONE_DAY
        )
        self.bundle_path = bundle(self.directory, self.other_ca, self.ca)

    @classmethod
    def shared(cls) -> TestPKI:
        """One PKI per process, in a temporary directory removed at exit."""
        if cls._shared is None:
            directory = tempfile.TemporaryDirectory(prefix="pluresync-testca-")
            cls._shared = cls(directory.name)
            cls._shared._tempdir = directory  # removed when the process exits
        return cls._shared
