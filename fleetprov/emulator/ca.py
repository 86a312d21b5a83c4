"""The emulator's certificate authorities and everything they sign.

Layout under ``STATE/ca/``:

* ``root-ca.pem`` / ``root-ca.key`` -- stands in for Amazon Root CA 1: the one CA a device trusts.
* ``server.pem`` / ``server.key`` -- the broker's certificate for ``localhost`` and 127.0.0.1, signed by the root.
* ``issuing-ca.pem`` / ``issuing-ca.key`` -- an intermediate signed by the root that issues claim and device
  certificates, as AWS issues device certificates from a CA other than the one devices trust.

Created once; later runs load them. Keys are written 0600 from their first byte.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetprov.atomicio import write_atomic, write_new_private
from fleetprov.errors import EmulatorError

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]
PublicKey = Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey]

ORGANIZATION = "fleetprov emulator"
CA_VALIDITY = dt.timedelta(days=3650)
# Device certificates (CreateCertificateFromCsr, CreateKeysAndCertificate): the default of serve's
# --certificate-validity / certificate_validity. AWS-issued ones run until 2049; ten years will do.
DEVICE_VALIDITY = dt.timedelta(days=3650)
CLAIM_VALIDITY = dt.timedelta(days=3650)  # claim certificates, whatever the device certificates' validity
BACKDATE = dt.timedelta(minutes=5)  # not_before lies this far before issue, for devices whose clock is behind
# The latest time X.509 can express (GeneralizedTime, RFC 5280 4.1.2.5); no certificate runs longer.
LATEST_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
MIN_RSA_BITS = 2048
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class CsrRejected(EmulatorError):
    """A CSR the service refuses; the message says why and goes into the 400 reply."""


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_pem: str
    certificate_id: str
    not_after: dt.datetime


@dataclass(frozen=True)
class CaPaths:
    root_cert: Path
    root_key: Path
    server_cert: Path
    server_key: Path
    issuing_cert: Path
    issuing_key: Path

    @classmethod
    def under(cls, state_dir: Path) -> CaPaths:
        ca = state_dir / "ca"
        return cls(
            root_cert=ca / "root-ca.pem",
            root_key=ca / "root-ca.key",
            server_cert=ca / "server.pem",
            server_key=ca / "server.key",
            issuing_cert=ca / "issuing-ca.pem",
            issuing_key=ca / "issuing-ca.key",
        )


def certificate_id(cert: x509.Certificate) -> str:
    """AWS IoT's certificate id: the SHA-256 of the DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def device_validity_problem(seconds: float, now: dt.datetime | None = None) -> str | None:
    """Why ``seconds`` cannot be the validity of device certificates, or None if it can.

    A positive, finite number of seconds whose not-after, counted from ``now``, X.509 can still express.
    """
    if not (math.isfinite(seconds) and seconds > 0):
        return "must be a positive number of seconds"
    longest = (LATEST_NOT_AFTER - (now or _now())).total_seconds()
    if seconds > longest:
        return (
            f"{seconds:g} seconds is too long: certificates cannot run past "
            f"{LATEST_NOT_AFTER:%Y-%m-%dT%H:%M:%SZ} (at most {int(longest)} seconds from now)"
        )
    return None


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: PublicKey, validity: dt.timedelta,
    backdate: dt.timedelta = BACKDATE,
) -> x509.CertificateBuilder:  # fmt: skip
    now = _now()
    # Seconds only: X.509 drops the fraction, so not_after is issue time + validity rounded down.
    not_after = LATEST_NOT_AFTER if validity >= LATEST_NOT_AFTER - now else now + validity
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca_extensions(builder: x509.CertificateBuilder, path_length: int | None) -> x509.CertificateBuilder:
    return builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True).add_extension(
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


def _leaf_extensions(
    builder: x509.CertificateBuilder, issuer_cert: x509.Certificate, usage: x509.ObjectIdentifier
) -> x509.CertificateBuilder:
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )


class CertificateAuthority:
    """A CA certificate with its key, able to sign leaf certificates.

    ``device_validity`` is the lifetime of the device certificates it issues (sign_csr,
    create_keys_and_certificate, and sign_client unless told otherwise).
    """

    def __init__(
        self, cert: x509.Certificate, key: PrivateKey, device_validity: dt.timedelta = DEVICE_VALIDITY
    ) -> None:
        self.cert = cert
        self.key = key
        self.device_validity = device_validity

    def with_device_validity(self, validity: dt.timedelta) -> CertificateAuthority:
        """The same CA issuing device certificates valid for ``validity``; EmulatorError if it cannot be one."""
        problem = device_validity_problem(validity.total_seconds())
        if problem is not None:
            raise EmulatorError(f"certificate validity: {problem}")
        return CertificateAuthority(self.cert, self.key, validity)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise EmulatorError(f"cannot load CA from {cert_path} / {key_path}: {exc}") from exc
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise EmulatorError(f"{key_path}: unsupported CA key type")
        return cls(cert, key)

    def sign_client(
        self, public_key: PublicKey, common_name: str, validity: dt.timedelta | None = None,
        backdate: dt.timedelta = BACKDATE,
    ) -> IssuedCertificate:  # fmt: skip
        """A client certificate valid from ``backdate`` before now to ``validity`` (default: device_validity)
        after now."""
        lifetime = self.device_validity if validity is None else validity
        builder = _builder(_name(common_name), self.cert.subject, public_key, lifetime, backdate)
        cert = _leaf_extensions(builder, self.cert, ExtendedKeyUsageOID.CLIENT_AUTH).sign(self.key, hashes.SHA256())
        return IssuedCertificate(
            certificate_pem=_cert_pem(cert).decode(),
            certificate_id=certificate_id(cert),
            not_after=cert.not_valid_after_utc,
        )

    def sign_csr(self, csr_pem: str) -> IssuedCertificate:
        """Validate a device's CSR and issue a client certificate for its key (CreateCertificateFromCsr)."""
        public_key = validate_csr(csr_pem)
        # AWS ignores the CSR's subject and issues "CN=AWS IoT Certificate"; so do we.
        return self.sign_client(public_key, "AWS IoT Certificate")

    def create_keys_and_certificate(self) -> tuple[IssuedCertificate, str]:
        """CreateKeysAndCertificate: a fresh RSA 2048 key and its certificate."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issued = self.sign_client(key.public_key(), "AWS IoT Certificate")
        return issued, _key_pem(key).decode()


def validate_csr(csr_pem: str) -> PublicKey:
    """Return the CSR's public key, or raise CsrRejected naming what is wrong with it."""
    if not isinstance(csr_pem, str) or not csr_pem.strip():
        raise CsrRejected("certificateSigningRequest is empty")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, UnicodeEncodeError) as exc:
        raise CsrRejected(f"certificateSigningRequest is not a PEM encoded PKCS#10 request: {exc}") from exc
    try:
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise CsrRejected(f"certificateSigningRequest cannot be read: {exc}") from exc
    if not signature_ok:
        raise CsrRejected("certificateSigningRequest signature does not verify")
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CsrRejected(f"RSA key of {public_key.key_size} bits is too short (minimum {MIN_RSA_BITS})")
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ACCEPTED_CURVES):
            raise CsrRejected(f"elliptic curve {public_key.curve.name} is not supported (use P-256 or P-384)")
        return public_key
    raise CsrRejected(f"key type {type(public_key).__name__} is not supported (use RSA or EC P-256/P-384)")


@dataclass(frozen=True)
class CaMaterial:
    paths: CaPaths
    root: CertificateAuthority
    issuing: CertificateAuthority


def ensure_ca_material(state_dir: Path) -> CaMaterial:
    """Create the CAs and the server certificate on first run; load them afterwards."""
    paths = CaPaths.under(state_dir)
    paths.root_cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not paths.root_cert.exists():
        _create_ca_material(paths)
    return CaMaterial(
        paths=paths,
        root=CertificateAuthority.load(paths.root_cert, paths.root_key),
        issuing=CertificateAuthority.load(paths.issuing_cert, paths.issuing_key),
    )


def _create_ca_material(paths: CaPaths) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = _name("fleetprov emulator Root CA 1")
    root_cert = _ca_extensions(_builder(root_name, root_name, root_key.public_key(), CA_VALIDITY), path_length=1).sign(
        root_key, hashes.SHA256()
    )

    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing_builder = _builder(_name("fleetprov emulator Issuing CA"), root_name, issuing_key.public_key(), CA_VALIDITY)
    issuing_cert = _ca_extensions(issuing_builder, path_length=0).sign(root_key, hashes.SHA256())

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_builder = _builder(_name("localhost"), root_name, server_key.public_key(), CA_VALIDITY).add_extension(
        x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                x509.IPAddress(ipaddress.IPv6Address("::1")),
            ]
        ),
        critical=False,
    )
    server_cert = _leaf_extensions(server_builder, root_cert, ExtendedKeyUsageOID.SERVER_AUTH).sign(
        root_key, hashes.SHA256()
    )

    # Keys first, the root certificate last: its presence marks the material complete.
    write_new_private(paths.root_key, _key_pem(root_key))
    write_new_private(paths.issuing_key, _key_pem(issuing_key))
    write_new_private(paths.server_key, _key_pem(server_key))
    write_atomic(paths.issuing_cert, _cert_pem(issuing_cert))
    # The server presents its chain; clients only need the root.
    write_atomic(paths.server_cert, _cert_pem(server_cert))
    write_atomic(paths.root_cert, _cert_pem(root_cert))


def new_client_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> str:
    return _key_pem(key).decode()
