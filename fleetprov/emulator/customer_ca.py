"""Customer CA certificates, the emulator's RegisterCACertificate: what ``fleetprov emulator register-ca`` accepts,
and which registered CA issued a device certificate.

A registered CA is trusted by the broker's TLS listener (broker.py). With auto-registration, device certificates
it issued are registered when they first connect: provisioned with the CA's template (JITP), or left
PENDING_ACTIVATION for an activation step (JITR). See jit.py.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fleetprov.emulator.ca import certificate_id
from fleetprov.emulator.registry import CaCertificateRecord, Registry
from fleetprov.emulator.templates import TemplateError, parse_template
from fleetprov.errors import EmulatorError

# The parameters a JITP template may declare: AWS fills them from the device certificate (see jit.py).
JIT_PARAMETERS = frozenset(
    {
        "AWS::IoT::Certificate::Country",
        "AWS::IoT::Certificate::Organization",
        "AWS::IoT::Certificate::OrganizationalUnit",
        "AWS::IoT::Certificate::DistinguishedNameQualifier",
        "AWS::IoT::Certificate::StateName",
        "AWS::IoT::Certificate::CommonName",
        "AWS::IoT::Certificate::SerialNumber",
        "AWS::IoT::Certificate::Id",
    }
)


@dataclass(frozen=True)
class CaSettings:
    """How a registered CA's device certificates are treated when they first connect."""

    auto_registration: bool
    template: Optional[str]  # JITP template body, already validated; None: JITR
    mode: str  # DEFAULT or SNI_ONLY
    activation_command: Optional[str]  # JITR only: run at each registration event


def load_ca_certificate(data: bytes, source: str) -> x509.Certificate:
    """The one CA certificate in ``data`` (PEM); EmulatorError naming ``source`` when it is not that."""
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise EmulatorError(f"{source}: not a PEM certificate ({exc})") from exc
    if len(certificates) != 1:
        raise EmulatorError(f"{source}: holds {len(certificates)} certificates; give the CA certificate alone")
    certificate = certificates[0]
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise EmulatorError(f"{source}: not a CA certificate (no basicConstraints CA:TRUE)") from None
    except ValueError as exc:  # a malformed extension
        raise EmulatorError(f"{source}: cannot read the certificate's extensions ({exc})") from exc
    if not constraints.ca:
        raise EmulatorError(f"{source}: not a CA certificate (basicConstraints CA:FALSE)")
    try:
        usage: Optional[x509.KeyUsage] = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise EmulatorError(f"{source}: the CA certificate's keyUsage does not allow keyCertSign")
    if certificate.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise EmulatorError(f"{source}: the CA certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    return certificate


def read_template(path: Path) -> str:
    """A JITP template body from ``path``, checked as CreateProvisioningTemplate would; errors name the file.

    The file holds the template body, or AWS's registration config ``{"templateBody": "...", "roleArn": ...}``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EmulatorError(f"--template {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise EmulatorError(f"--template {path}: not JSON: {exc}") from exc
    if isinstance(document, dict) and isinstance(document.get("templateBody"), str):
        text = document["templateBody"]
    try:
        template = parse_template(text)
    except TemplateError as exc:
        raise EmulatorError(f"--template {path}: {exc.message}") from exc
    unknown = sorted(template.parameter_names - JIT_PARAMETERS)
    if unknown:
        raise EmulatorError(
            f"--template {path}: a JITP template can only declare parameters taken from the certificate "
            f"(AWS::IoT::Certificate::...), not {', '.join(unknown)}"
        )
    return text


def check_activation_command(command: str) -> None:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise EmulatorError(f"--activation-command {command!r}: {exc}") from exc
    if not argv:
        raise EmulatorError("--activation-command is empty")


def register_ca(registry: Registry, certificate: x509.Certificate, settings: CaSettings, *, now: float) -> str:
    """Register the CA ACTIVE (or update the settings of one already registered); returns its caCertificateId."""
    if settings.activation_command is not None:
        check_activation_command(settings.activation_command)
    ca_id = certificate_id(certificate)
    registry.put_ca_certificate(
        CaCertificateRecord(
            ca_certificate_id=ca_id,
            pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
            status="ACTIVE",
            auto_registration=settings.auto_registration,
            template=settings.template,
            mode=settings.mode,
            activation_command=settings.activation_command,
            created_at=now,
        )
    )
    return ca_id


def issuing_ca(leaf: x509.Certificate, cas: Sequence[CaCertificateRecord]) -> Optional[CaCertificateRecord]:
    """The registered ACTIVE CA that signed ``leaf``: its subject is the leaf's issuer and its key verifies the
    leaf's signature (a CA merely named like the issuer is not it)."""
    for record in cas:
        if record.status != "ACTIVE":
            continue
        ca = x509.load_pem_x509_certificate(record.pem.encode())
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return record
    return None
