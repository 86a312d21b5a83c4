"""Tests for fleetprov.emulator.ca: the emulator's CAs, the certificates they issue and CSR validation."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import stat
import subprocess
from pathlib import Path
from typing import Union

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetprov.emulator.ca import (
    CaMaterial,
    CaPaths,
    CsrRejected,
    certificate_id,
    ensure_ca_material,
    validate_csr,
)
from fleetprov.errors import EmulatorError

CsrKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]


def make_csr(key: CsrKey, common_name: str = "device-1") -> str:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def tamper_signature(csr_pem: str) -> str:
    """Flip one bit of the CSR's signature (the DER's last bytes) and re-encode it as PEM."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    assert bytes(der).endswith(csr.signature)  # so the flipped byte below is inside the signature
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> CaMaterial:
    return ensure_ca_material(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_verify(paths: CaPaths, cert_pem: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cert = workdir / "cert.pem"
    cert.write_text(cert_pem)
    return subprocess.run(
        [
            "openssl",
            "verify",
            *extra,
            "-CAfile",
            str(paths.root_cert),
            "-untrusted",
            str(paths.issuing_cert),
            str(cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


# --- CA material on disk -------------------------------------------------------------------------


def test_ensure_ca_material_creates_every_file_with_private_modes(tmp_path: Path) -> None:
    material = ensure_ca_material(tmp_path)

    paths = material.paths
    assert paths == CaPaths.under(tmp_path)
    assert paths.root_cert == tmp_path / "ca" / "root-ca.pem"
    assert mode(tmp_path / "ca") == 0o700
    for key in (paths.root_key, paths.issuing_key, paths.server_key):
        assert mode(key) == 0o600, key
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    for cert in (paths.root_cert, paths.issuing_cert, paths.server_cert):
        assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    # Only the six documented files, no temporary leftovers.
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [
        "issuing-ca.key",
        "issuing-ca.pem",
        "root-ca.key",
        "root-ca.pem",
        "server.key",
        "server.pem",
    ]


def test_ensure_ca_material_reuses_existing_files(tmp_path: Path) -> None:
    first = ensure_ca_material(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "ca").iterdir()}

    second = ensure_ca_material(tmp_path)

    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "ca").iterdir()}
    assert after == before
    assert second.root.cert == first.root.cert
    assert second.issuing.cert == first.issuing.cert
    assert second.paths.root_cert.read_bytes() == first.root.cert.public_bytes(serialization.Encoding.PEM)


def test_two_state_dirs_get_different_roots(tmp_path: Path) -> None:
    one = ensure_ca_material(tmp_path / "one")
    two = ensure_ca_material(tmp_path / "two")
    assert one.root.cert != two.root.cert


def test_ca_hierarchy(material: CaMaterial) -> None:
    root, issuing = material.root.cert, material.issuing.cert
    assert root.issuer == root.subject
    assert issuing.issuer == root.subject
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 1)
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    issuing.verify_directly_issued_by(root)


def test_unreadable_ca_raises_emulator_error(tmp_path: Path) -> None:
    ensure_ca_material(tmp_path)
    CaPaths.under(tmp_path).issuing_key.write_text("not a key")
    with pytest.raises(EmulatorError, match=r"cannot load CA from .*issuing-ca\.pem"):
        ensure_ca_material(tmp_path)


# --- server certificate --------------------------------------------------------------------------


def test_server_certificate_names_localhost_and_loopback(material: CaMaterial) -> None:
    server = x509.load_pem_x509_certificate(material.paths.server_cert.read_bytes())

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.IPv4Address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    server.verify_directly_issued_by(material.root.cert)


def test_server_certificate_verifies_for_tls_with_openssl(material: CaMaterial) -> None:
    paths = material.paths
    for check in (["-verify_hostname", "localhost"], ["-verify_ip", "127.0.0.1"]):
        result = subprocess.run(
            ["openssl", "verify", "-purpose", "sslserver", *check, "-CAfile", str(paths.root_cert),
             str(paths.server_cert)],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"{paths.server_cert}: OK"


def test_server_key_matches_server_certificate(material: CaMaterial) -> None:
    server = x509.load_pem_x509_certificate(material.paths.server_cert.read_bytes())
    key = serialization.load_pem_private_key(material.paths.server_key.read_bytes(), password=None)
    assert key.public_key() == server.public_key()


# --- issued client certificates ------------------------------------------------------------------


def test_certificate_from_csr_verifies_with_openssl(material: CaMaterial, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = material.issuing.sign_csr(make_csr(key))

    result = openssl_verify(material.paths, issued.certificate_pem, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'cert.pem'}: OK"
    client = openssl_verify(material.paths, issued.certificate_pem, tmp_path, "-purpose", "sslclient")
    assert client.returncode == 0, client.stdout + client.stderr

    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    assert cert.public_key() == key.public_key()
    # AWS ignores the CSR's subject.
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "AWS IoT Certificate"
    assert cert.issuer == material.issuing.cert.subject
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert issued.not_after == cert.not_valid_after_utc


def test_chain_needs_the_issuing_ca(material: CaMaterial, tmp_path: Path) -> None:
    """The negative control for the openssl checks: without the intermediate the leaf does not verify."""
    issued = material.issuing.sign_csr(make_csr(ec.generate_private_key(ec.SECP256R1())))
    cert = tmp_path / "cert.pem"
    cert.write_text(issued.certificate_pem)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(material.paths.root_cert), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


def test_client_certificate_is_not_valid_for_server_purpose(material: CaMaterial, tmp_path: Path) -> None:
    issued = material.issuing.sign_csr(make_csr(ec.generate_private_key(ec.SECP256R1())))
    result = openssl_verify(material.paths, issued.certificate_pem, tmp_path, "-purpose", "sslserver")
    assert result.returncode != 0


def test_create_keys_and_certificate_verifies_with_openssl(material: CaMaterial, tmp_path: Path) -> None:
    issued, private_key_pem = material.issuing.create_keys_and_certificate()

    result = openssl_verify(material.paths, issued.certificate_pem, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'cert.pem'}: OK"

    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    assert cert.public_key() == key.public_key()
    assert private_key_pem.startswith("-----BEGIN ") and "ENCRYPTED" not in private_key_pem  # PKCS#8, clear


def test_certificate_id_is_sha256_of_der(material: CaMaterial) -> None:
    issued = material.issuing.sign_csr(make_csr(ec.generate_private_key(ec.SECP256R1())))
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    expected = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    assert issued.certificate_id == expected
    assert certificate_id(cert) == expected
    assert len(expected) == 64
    assert expected == expected.lower()


def test_each_issued_certificate_has_its_own_id(material: CaMaterial) -> None:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()))
    assert material.issuing.sign_csr(csr).certificate_id != material.issuing.sign_csr(csr).certificate_id


# --- CSR validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["P-256", "P-384"])
def test_validate_csr_accepts_ec_curves(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    public_key = validate_csr(make_csr(key))
    assert public_key == key.public_key()


def test_validate_csr_accepts_rsa_2048(rsa2048: rsa.RSAPrivateKey) -> None:
    assert validate_csr(make_csr(rsa2048)) == rsa2048.public_key()


def test_validate_csr_accepts_rsa_3072() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    public_key = validate_csr(make_csr(key))
    assert isinstance(public_key, rsa.RSAPublicKey)
    assert public_key.key_size == 3072


@pytest.mark.parametrize(
    ("csr_pem", "message"),
    [
        ("", "certificateSigningRequest is empty"),
        ("  \n\t", "certificateSigningRequest is empty"),
        ("hello, I am a device", "is not a PEM encoded PKCS#10 request"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "is not a PEM encoded"),
    ],
    ids=["empty", "blank", "garbage", "bad-base64-body"],
)
def test_validate_csr_rejects_text(csr_pem: str, message: str) -> None:
    with pytest.raises(CsrRejected, match=message):
        validate_csr(csr_pem)


def test_validate_csr_rejects_a_certificate(material: CaMaterial) -> None:
    pem = material.root.cert.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CsrRejected, match="is not a PEM encoded PKCS#10 request"):
        validate_csr(pem)


def test_validate_csr_rejects_rsa_1024() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrRejected, match=r"^RSA key of 1024 bits is too short \(minimum 2048\)$"):
        validate_csr(make_csr(key))


@pytest.mark.parametrize(("curve", "name"), [(ec.SECP521R1(), "secp521r1"), (ec.SECP256K1(), "secp256k1")])
def test_validate_csr_rejects_other_curves(curve: ec.EllipticCurve, name: str) -> None:
    with pytest.raises(CsrRejected, match=rf"^elliptic curve {name} is not supported \(use P-256 or P-384\)$"):
        validate_csr(make_csr(ec.generate_private_key(curve)))


def test_validate_csr_rejects_ed25519() -> None:
    with pytest.raises(CsrRejected, match=r"^key type Ed25519PublicKey is not supported"):
        validate_csr(make_csr(ed25519.Ed25519PrivateKey.generate()))


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_validate_csr_rejects_tampered_signature(kind: str, rsa2048: rsa.RSAPrivateKey) -> None:
    key: CsrKey = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa2048
    tampered = tamper_signature(make_csr(key))
    with pytest.raises(CsrRejected, match="signature does not verify"):
        validate_csr(tampered)


def test_sign_csr_rejects_what_validate_csr_rejects(material: CaMaterial) -> None:
    with pytest.raises(CsrRejected, match="certificateSigningRequest is empty"):
        material.issuing.sign_csr("")


def test_csr_rejected_is_an_emulator_error() -> None:
    assert issubclass(CsrRejected, EmulatorError)
