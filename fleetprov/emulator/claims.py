"""Claim certificates on disk and in the registry: ``claim.pem`` and, when the emulator made the key, ``claim.key``.

Which policies a claim gets is the caller's business (server.create_claim: the built-in claim policy;
stack_setup: the policies a CloudFormation template attaches).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509

from fleetprov.atomicio import write_atomic, write_new_private
from fleetprov.emulator.ca import CLAIM_VALIDITY, CaMaterial, PublicKey, certificate_id, new_client_key, private_key_pem
from fleetprov.emulator.registry import Registry

CLAIM_COMMON_NAME = "fleetprov claim certificate"


@dataclass(frozen=True)
class ClaimFiles:
    certificate: Path
    private_key: Optional[Path]  # None: issued from a CSR, so the key is wherever the CSR was made
    certificate_id: str


def issue_claim(
    registry: Registry, material: CaMaterial, out_dir: Path, public_key: Optional[PublicKey] = None,
    status: str = "ACTIVE",
) -> ClaimFiles:  # fmt: skip
    """Issue a claim certificate into ``out_dir`` and register it with ``status``, without policies.

    For ``public_key`` (from a CSR) when given: only ``claim.pem`` is written, and a ``claim.key`` left from
    an earlier claim is removed. Otherwise the emulator makes the key and writes it to ``claim.key`` (0600).
    """
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path: Optional[Path] = out_dir / "claim.key"
    # The old pair goes first: whatever step a crash interrupts, no claim.pem is left beside a key not its own,
    # and a claim.pem that is not (yet) registered is issued again at the next start.
    for stale in ("claim.pem", "claim.key"):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / stale).unlink()
    if public_key is None:
        key = new_client_key()
        public_key = key.public_key()
        write_new_private(out_dir / "claim.key", private_key_pem(key).encode())
    else:
        key_path = None
    # The claim keeps its own lifetime: serve's certificate_validity is for device certificates only.
    issued = material.issuing.sign_client(public_key, CLAIM_COMMON_NAME, CLAIM_VALIDITY)
    write_atomic(out_dir / "claim.pem", issued.certificate_pem.encode())
    registry.add_certificate(
        issued.certificate_id, issued.certificate_pem, status=status, kind="claim", created_at=time.time()
    )
    return ClaimFiles(out_dir / "claim.pem", key_path, issued.certificate_id)


def existing_claim(claim_dir: Path, registry: Registry) -> Optional[tuple[ClaimFiles, x509.Certificate]]:
    """The claim in ``claim_dir`` and its certificate, if there is one the registry knows."""
    try:
        certificate = x509.load_pem_x509_certificate((claim_dir / "claim.pem").read_bytes())
    except (OSError, ValueError):
        return None
    cert_id = certificate_id(certificate)
    if registry.certificate(cert_id) is None:
        return None
    key = claim_dir / "claim.key"
    return ClaimFiles(claim_dir / "claim.pem", key if key.exists() else None, cert_id), certificate
