"""Check an issued certificate before anything is committed: it parses, it is for our key, it is valid now.

A service (or something pretending to be one) that hands back a certificate for another key would leave the
device with credentials that can never connect; better to refuse it here, with nothing stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetprov.errors import BadServiceData, printable

CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateFacts:
    certificate_id: str  # SHA-256 of the DER, as AWS IoT computes it
    not_before: dt.datetime
    not_after: dt.datetime


def check_certificate(
    certificate_pem: str,
    expected_public_key_der: bytes,
    *,
    expected_id: Optional[str] = None,
    now: Optional[dt.datetime] = None,
    step: str = "check-certificate",
) -> CertificateFacts:
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    except (ValueError, UnicodeEncodeError) as exc:
        raise BadServiceData(f"the issued certificate is not a PEM X.509 certificate: {exc}", step=step) from exc
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
    return CertificateFacts(certificate_id, not_before, not_after)
