"""fleetprov.certcheck: an issued certificate is checked, and what the device stores is the certificate
re-encoded from what was parsed, never the text the service sent."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetprov.certcheck import check_certificate
from fleetprov.errors import EX_DATAERR, BadServiceData

NOW = dt.datetime.now(dt.timezone.utc)
KEY = ec.generate_private_key(ec.SECP256R1())
SPKI = KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()


def _certificate() -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .sign(KEY, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


CERTIFICATE = _certificate()


@pytest.mark.parametrize(
    "sent",
    [CERTIFICATE, CERTIFICATE.replace("\n", "\r\n"), "\n  " + CERTIFICATE + "\n\n"],
    ids=["as-is", "crlf", "blank-around"],
)
def test_the_stored_certificate_is_re_encoded(sent: str) -> None:
    checked = check_certificate(sent, SPKI)
    assert checked.certificate_pem == CERTIFICATE


@pytest.mark.parametrize(
    ("sent", "says"),
    [
        (CERTIFICATE + KEY_PEM, "holds 2 PEM blocks: AWS IoT sends exactly one certificate"),
        (CERTIFICATE + CERTIFICATE, "holds 2 PEM blocks"),
        ("commit: ok\n" + CERTIFICATE, "not a PEM X.509 certificate (one CERTIFICATE block, nothing around it)"),
        (CERTIFICATE + "A" * 3_000_000, "nothing around it"),
        (CERTIFICATE.replace("CERTIFICATE", "X509 CRL"), "nothing around it"),
    ],
    ids=["key-after", "two-certificates", "text-before", "tail", "other-block"],
)
def test_anything_but_one_certificate_block_is_refused(sent: str, says: str) -> None:
    with pytest.raises(BadServiceData) as caught:
        check_certificate(sent, SPKI)
    assert says in caught.value.message
    assert caught.value.exit_code == EX_DATAERR
    assert caught.value.step == "check-certificate"
