"""Claim certificates on disk and in the registry: ``claim.pem`` and, when the emulator made the key, ``claim.key``.

Two kinds, one issuing path (``_sign_and_register``):

* the long-lived claim of fleet provisioning by claim (issue_claim), built into a device at the factory. Which
  policies it gets is the caller's business (server.create_claim: the built-in claim policy; stack_setup: the
  policies a CloudFormation template attaches);
* the temporary claim of fleet provisioning by trusted user (issue_temporary_claim, what AWS's
  CreateProvisioningClaim returns): valid 5 minutes by default, with a policy of its own that allows
  provisioning through one template only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509

from fleetprov.atomicio import write_atomic, write_new, write_new_private
from fleetprov.emulator.ca import (
    CLAIM_VALIDITY,
    CaMaterial,
    IssuedCertificate,
    PublicKey,
    certificate_id,
    device_validity_problem,
    new_client_key,
    private_key_pem,
)
from fleetprov.emulator.policy import claim_policy_document
from fleetprov.emulator.registry import Registry
from fleetprov.errors import EmulatorError, StorageError, UsageError

CLAIM_COMMON_NAME = "fleetprov claim certificate"
# CreateProvisioningClaim: "the temporary provisioning claim certificate ... expires after five minutes".
TEMPORARY_CLAIM_VALIDITY = dt.timedelta(minutes=5)
# Not the 5 minutes other certificates are backdated by, which would make a 5-minute claim look valid for 10:
# a few seconds, for an installer app and a device whose clocks differ by that much.
TEMPORARY_CLAIM_BACKDATE = dt.timedelta(seconds=5)
TEMPORARY_CLAIM_POLICY_PREFIX = "fleetprov-temporary-claim-"


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
    _register(registry, issued, status)
    return ClaimFiles(out_dir / "claim.pem", key_path, issued.certificate_id)


def _register(registry: Registry, issued: IssuedCertificate, status: str) -> None:
    registry.add_certificate(
        issued.certificate_id, issued.certificate_pem, status=status, kind="claim", created_at=time.time()
    )


def attach_claim_policy(
    registry: Registry, policy_name: str, templates: Optional[tuple[str, ...]], claim_certificate_id: str
) -> None:
    """Create or update ``policy_name`` as the claim policy for ``templates`` (None: all) and attach it."""
    registry.put_policy(policy_name, json.dumps(claim_policy_document(templates), sort_keys=True))
    registry.attach_policy(policy_name, claim_certificate_id)


@dataclass(frozen=True)
class TemporaryClaim:
    files: ClaimFiles  # private_key is always set: the emulator makes the key
    template: str
    policy_name: str
    not_after: dt.datetime


def temporary_claim_policy_name(claim_certificate_id: str) -> str:
    return TEMPORARY_CLAIM_POLICY_PREFIX + claim_certificate_id[:16]


def issue_temporary_claim(
    registry: Registry,
    material: CaMaterial,
    out_dir: Path,
    template: str,
    validity_seconds: float = TEMPORARY_CLAIM_VALIDITY.total_seconds(),
) -> TemporaryClaim:
    """CreateProvisioningClaim: a new claim key and certificate in ``out_dir`` (``claim.key`` 0600, ``claim.pem``),
    registered ACTIVE with a policy of its own that allows provisioning through ``template`` only.

    The certificate runs from TEMPORARY_CLAIM_BACKDATE before now to ``validity_seconds`` after now; the TLS handshake
    refuses it afterwards. Existing files are never overwritten (StorageError); an unknown template
    (EmulatorError) or a bad validity (UsageError) changes nothing. Files and registry change together: the
    files are written inside the registry transaction and removed if it does not commit.
    """
    if registry.template(template) is None:
        served = ", ".join(registry.template_names()) or "none"
        raise EmulatorError(f"the emulator has no provisioning template {template!r} (it has: {served})")
    problem = device_validity_problem(validity_seconds)
    if problem is not None:
        raise UsageError(f"--validity: {problem}")
    validity = dt.timedelta(seconds=validity_seconds)
    certificate_path, key_path = out_dir / "claim.pem", out_dir / "claim.key"
    for path in (certificate_path, key_path):
        if path.exists() or path.is_symlink():
            raise StorageError(f"{path} exists already; not overwriting it")
    created_dir = not out_dir.is_dir()
    written: list[Path] = []
    try:
        try:
            out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
        key = new_client_key()
        issued = material.issuing.sign_client(
            key.public_key(), CLAIM_COMMON_NAME, validity, backdate=TEMPORARY_CLAIM_BACKDATE
        )
        policy_name = temporary_claim_policy_name(issued.certificate_id)
        with registry.transaction():
            _register(registry, issued, "ACTIVE")
            attach_claim_policy(registry, policy_name, (template,), issued.certificate_id)
            for path, data, mode in (
                (key_path, private_key_pem(key).encode(), 0o600),
                (certificate_path, issued.certificate_pem.encode(), 0o644),
            ):
                _write_new(path, data, mode)
                written.append(path)
    except BaseException:
        for path in reversed(written):
            with contextlib.suppress(OSError):
                path.unlink()
        if created_dir:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    return TemporaryClaim(
        ClaimFiles(certificate_path, key_path, issued.certificate_id), template, policy_name, issued.not_after
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        write_new(path, data, mode=mode)
    except StorageError as exc:
        if isinstance(exc.__cause__, FileExistsError):  # appeared since the check: still not ours to replace
            raise StorageError(f"{path} exists already; not overwriting it") from None
        raise


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
