"""Which of a TLS identity's files awscrt could not use, and why: awscrt's own errors name none of them.

Only asked after awscrt has refused the files (``session``): a device's files are read here once more, with
cryptography, to say which one to fix. Nothing read is ever shown, only what kind of file it is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def unusable_file(root_ca: Path, certificate: Path, private_key: Optional[Path]) -> Optional[str]:
    """What is wrong with the first unusable file (the root CA, the certificate, the key file, in that order),
    or None when each is what it should be: then awscrt refused for a reason of its own."""
    if _certificates(root_ca) is None:
        return f"{root_ca} (root_ca) holds no PEM certificate"
    chain = _certificates(certificate)
    if chain is None:
        return f"{certificate} holds no PEM certificate"
    if private_key is None:
        return None
    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except OSError as exc:
        return f"cannot read {private_key}: {exc.strerror}"
    except TypeError:
        return f"{private_key} is an encrypted private key: fleetprov needs it unencrypted (mode 0600)"
    except (ValueError, UnsupportedAlgorithm):
        return f"{private_key} is not a PEM private key"
    if key.public_key().public_bytes(_DER, _SPKI) != chain[0].public_key().public_bytes(_DER, _SPKI):
        return f"{private_key} is not the private key of {certificate}"
    return None


def _certificates(path: Path) -> Optional[list[x509.Certificate]]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return None
