"""Tests for fleetprov.factory: keygen, CSR subjects for JITP, lab-CA signing and their error paths."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path
from typing import Union

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetprov import factory
from fleetprov.errors import EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_USAGE, FleetprovError

Key = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

FULL = factory.Subject(
    common_name="thing-1",
    country="DE",
    organization="Acme GmbH",
    organizational_unit="Line 3",
    state="Bavaria",
    serial_number="SN-0042",
    dn_qualifier="batch.7",
)


def make_ca(directory: Path, *, ca: bool = True, key: Key | None = None) -> tuple[Path, Path, Key]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, key


def exit_code(excinfo: pytest.ExceptionInfo[FleetprovError]) -> int:
    return excinfo.value.exit_code


@pytest.mark.parametrize("key_type", factory.KEY_TYPES)
def test_keygen_writes_a_0600_key_of_the_type(tmp_path: Path, key_type: str) -> None:
    out = tmp_path / "device.key"
    factory.keygen(out, key_type)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = factory.load_private_key(out)
    if key_type.startswith("ec-"):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[key_type]
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == int(key_type[4:])


def test_keygen_refuses_to_overwrite_and_bad_types(tmp_path: Path) -> None:
    out = tmp_path / "device.key"
    out.write_text("precious")
    with pytest.raises(FleetprovError, match="exists already") as excinfo:
        factory.keygen(out, "ec-p256")
    assert exit_code(excinfo) == EX_CANTCREAT
    assert out.read_text() == "precious"
    with pytest.raises(FleetprovError, match="--key-type") as excinfo:
        factory.keygen(tmp_path / "other.key", "dsa-1024")
    assert exit_code(excinfo) == EX_USAGE
    assert not (tmp_path / "other.key").exists()


def test_subject_fields_round_trip_through_csr_and_certificate(tmp_path: Path) -> None:
    factory.keygen(tmp_path / "device.key", "ec-p256")
    request = factory.csr(tmp_path / "device.key", tmp_path / "device.csr", FULL)
    assert factory.subject_of(request.subject) == FULL
    loaded = factory.load_csr(tmp_path / "device.csr")
    assert factory.subject_of(loaded.subject) == FULL
    assert stat.S_IMODE((tmp_path / "device.csr").stat().st_mode) == 0o644

    ca_cert, ca_key, _ = make_ca(tmp_path)
    cert = factory.sign(tmp_path / "device.csr", ca_cert, ca_key, tmp_path / "device.pem", "10")
    assert factory.subject_of(cert.subject) == FULL
    assert factory.describe(cert)[0] == (
        "subject: C=DE, ST=Bavaria, O=Acme GmbH, OU=Line 3, CN=thing-1, serialNumber=SN-0042, dnQualifier=batch.7"
    )


def test_only_common_name_is_required(tmp_path: Path) -> None:
    factory.keygen(tmp_path / "device.key", "ec-p384")
    request = factory.csr(tmp_path / "device.key", tmp_path / "device.csr", factory.Subject("thing-2"))
    assert factory.subject_of(request.subject) == factory.Subject("thing-2")


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        (factory.Subject("thing", country="USA"), "--country must be exactly 2 letters"),
        (factory.Subject("thing", country="1A"), "--country must be exactly 2 letters"),
        (factory.Subject(""), "--cn must not be empty"),
        (factory.Subject("  "), "--cn must not be empty"),
        (factory.Subject("thing", organization=""), "--organization must not be empty"),
        (factory.Subject("thing", state="line\nbreak"), "--state .* control characters"),
        (factory.Subject("thing", serial_number="a_b"), "--serial-number .* only letters"),
        (factory.Subject("thing", dn_qualifier="x" * 65), "--dn-qualifier is longer than 64"),
    ],
)
def test_bad_subject_values_are_usage_errors(tmp_path: Path, subject: factory.Subject, message: str) -> None:
    factory.keygen(tmp_path / "device.key", "ec-p256")
    with pytest.raises(FleetprovError, match=message) as excinfo:
        factory.csr(tmp_path / "device.key", tmp_path / "device.csr", subject)
    assert exit_code(excinfo) == EX_USAGE
    assert not (tmp_path / "device.csr").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read key"), (b"not a key", "not a readable private key")],
)
def test_unusable_key_is_a_config_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    key = tmp_path / "device.key"
    if content is not None:
        key.write_bytes(content)
    with pytest.raises(FleetprovError, match=message) as excinfo:
        factory.csr(key, tmp_path / "device.csr", factory.Subject("thing"))
    assert exit_code(excinfo) == EX_CONFIG


def test_encrypted_key_is_a_config_error(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "device.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(FleetprovError, match="encrypted") as excinfo:
        factory.load_private_key(path)
    assert exit_code(excinfo) == EX_CONFIG


def _csr_file(tmp_path: Path, key: Key) -> Path:
    path = tmp_path / "device.csr"
    path.write_bytes(factory.make_csr(key, factory.Subject("thing")).public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)])
def test_issued_certificate_is_a_client_certificate_of_the_ca(tmp_path: Path, key: Key) -> None:
    ca_cert, ca_key, ca_private = make_ca(tmp_path)
    cert = factory.sign(_csr_file(tmp_path, key), ca_cert, ca_key, tmp_path / "device.pem", "365")

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    assert cert.public_key() == key.public_key()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment == isinstance(key, rsa.RSAPrivateKey)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_private.public_key()).digest
    assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365)
    again = factory.sign(tmp_path / "device.csr", ca_cert, ca_key, tmp_path / "again.pem", "365")
    assert again.serial_number != cert.serial_number


def test_ca_certificate_and_key_must_match(tmp_path: Path) -> None:
    ca_cert, _, _ = make_ca(tmp_path)
    other = tmp_path / "other.key"
    factory.keygen(other, "ec-p256")
    csr = _csr_file(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(FleetprovError, match="does not match CA certificate") as excinfo:
        factory.sign(csr, ca_cert, other, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_CONFIG
    assert not (tmp_path / "device.pem").exists()


def test_ca_certificate_must_be_a_ca(tmp_path: Path) -> None:
    ca_cert, ca_key, _ = make_ca(tmp_path, ca=False)
    csr = _csr_file(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(FleetprovError, match="not a CA certificate") as excinfo:
        factory.sign(csr, ca_cert, ca_key, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_CONFIG


def test_csr_with_a_bad_signature_is_refused(tmp_path: Path) -> None:
    ca_cert, ca_key, _ = make_ca(tmp_path)
    request = factory.make_csr(rsa.generate_private_key(65537, 2048), factory.Subject("thing"))
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte is the signature's
    path = tmp_path / "device.csr"
    path.write_bytes(bytes(der))
    with pytest.raises(FleetprovError, match=r"signature of CSR .* does not verify") as excinfo:
        factory.sign(path, ca_cert, ca_key, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_DATAERR
    assert not (tmp_path / "device.pem").exists()


def test_unreadable_csr_and_bad_days(tmp_path: Path) -> None:
    ca_cert, ca_key, _ = make_ca(tmp_path)
    path = tmp_path / "device.csr"
    path.write_text("-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(FleetprovError, match="not a readable CSR") as excinfo:
        factory.sign(path, ca_cert, ca_key, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_DATAERR
    for days in ("0", "-1", "soon", "36501"):
        with pytest.raises(FleetprovError, match="--days") as excinfo:
            factory.sign(path, ca_cert, ca_key, tmp_path / "device.pem", days)
        assert exit_code(excinfo) == EX_USAGE
