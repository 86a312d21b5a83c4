"""Check an issued certificate before anything is committed: it parses, it is for our key, it is valid now.

A service (or something pretending to be one) that hands back a certificate for another key would leave the
device with credentials that can never connect; better to refuse it here, with nothing stored.

What is stored is the certificate re-encoded from what was parsed (CertificateFacts.certificate_pem), never the
text the service sent: AWS IoT sends exactly one PEM CERTIFICATE block, so a certificatePem with anything else
(text around it, a second block, a private key after it) is refused as bad service data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetprov.errors import BadServiceData, printable

CLOCK_SKEW = dt.timedelta(minutes=5)
# One PEM block and nothing around it but line breaks; what is inside is for cryptography to judge.
_ONE_PEM_CERTIFICATE = re.compile(r"\s*-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\s*")
_PEM_BEGIN = "-----BEGIN "


@dataclass(frozen=True)
class CertificateFacts:
    certificate_id: str  # SHA-256 of the DER, as AWS IoT computes it
    not_before: dt.datetime
    not_after: dt.datetime
    certificate_pem: str  # re-encoded from the parsed DER: what the device stores


def _one_certificate(certificate_pem: str, step: str) -> x509.Certificate:
    blocks = certificate_pem.count(_PEM_BEGIN)
    if blocks > 1:
        raise BadServiceData(
            f"the issued certificate holds {blocks} PEM blocks: AWS IoT sends exactly one certificate", step=step
        )
    if not _ONE_PEM_CERTIFICATE.fullmatch(certificate_pem):
        raise BadServiceData(
            "the issued certificate is not a PEM X.509 certificate (one CERTIFICATE block, nothing around it)",
            step=step,
        )
    try:
        return x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise BadServiceData(f"the issued certificate is not a PEM X.509 certificate: {exc}", step=step) from exc


def check_certificate(
    certificate_pem: str,
    expected_public_key_der: bytes,
    *,
    expected_id: Optional[str] = None,
    now: Optional[dt.datetime] = None,
    step: str = "check-certificate",
) -> CertificateFacts:
    certificate = _one_certificate(certificate_pem, step)
    public_key = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public_key != expected_public_key_der:
        raise BadServiceData("the issued certificate is not for this device's key", step=step)
    der = certificate.public_bytes(serialization.Encoding.DER)
    certificate_id = hashlib.sha256(der).hexdigest()
    if expected_id is not None and expected_id.lower() != certificate_id:
        raise BadServiceData(
            f"the service said certificate {printable(expected_id, 16)}, "
            f"but the certificate's id is {certificate_id[:16]}...",
            step=step,
        )
    now = now or dt.datetime.now(dt.timezone.utc)
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not (not_before - CLOCK_SKEW <= now <= not_after):
        raise BadServiceData(
            f"the issued certificate is valid from {not_before:%Y-%m-%dT%H:%M:%SZ} to {not_after:%Y-%m-%dT%H:%M:%SZ},"
            f" not now ({now:%Y-%m-%dT%H:%M:%SZ})",
            step=step,
        )
    return CertificateFacts(
        certificate_id, not_before, not_after, certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    )
