"""Put what a CloudFormation template describes (cloudformation.CloudStack) into the emulator's state directory
and registry: the provisioning templates with their hooks, the IoT policies, thing groups, thing types and
billing groups, and the claim certificate with exactly the policies the template attaches to it.

Every start installs the template again, so a changed file changes what the emulator serves. The claim
certificate is kept across starts while it still fits the file (same CSR key, or the emulator's own key when
the CSR parameter has no value; same attached policies); otherwise a new one is issued and the old one becomes
INACTIVE, much as a stack update replaces a certificate.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from fleetprov.atomicio import write_atomic
from fleetprov.emulator import lambda_runner
from fleetprov.emulator.ca import CaMaterial, PublicKey, validate_csr
from fleetprov.emulator.claims import ClaimFiles, existing_claim, issue_claim
from fleetprov.emulator.cloudformation import CloudStack, StackClaim, StackFunction, StackTemplate
from fleetprov.emulator.registry import Registry
from fleetprov.errors import ConfigError

log = logging.getLogger(__name__)

FUNCTIONS_DIR = "lambda"


def install_stack(stack: CloudStack, registry: Registry, material: CaMaterial, state_dir: Path, *,
                  region: str) -> Optional[ClaimFiles]:  # fmt: skip
    """Install ``stack``; returns its claim certificate, or None when the template declares none."""
    for line in stack.not_emulated:
        log.info("not emulated: %s", line)
    for line in stack.warnings:
        log.warning("%s: %s", stack.path, line)
    registry.add_named("thing_groups", stack.thing_groups)
    registry.add_named("thing_types", stack.thing_types)
    registry.add_named("billing_groups", stack.billing_groups)
    for policy in stack.policies:
        registry.put_policy(policy.name, policy.document)
    for template in stack.templates:
        _install_template(stack, template, registry, state_dir, region)
    claim = None if stack.claim is None else _install_claim(stack, stack.claim, registry, material, state_dir / "claim")
    ids = {} if claim is None or stack.claim is None else {stack.claim.logical_id: claim.certificate_id}
    for name, value in stack.outputs_for(ids).items():
        log.info("output %s: %s", name, value)
    return claim


def served_templates(stack: CloudStack) -> list[str]:
    return [template.name for template in stack.templates if template.enabled]


def hook_command(directory: Path) -> tuple[str, ...]:
    """The command hook that runs the function installed in ``directory``: isolated mode (no PYTHON* variables,
    no user site-packages) and no bytecode written beside the code, whose directory Lambda keeps read-only."""
    return (sys.executable, "-I", "-B", str(Path(lambda_runner.__file__).resolve()), str(directory.resolve()))


def _install_template(stack: CloudStack, template: StackTemplate, registry: Registry, state_dir: Path,
                      region: str) -> None:  # fmt: skip
    if not template.enabled:
        if registry.template(template.name) is not None:
            raise ConfigError(
                f"{stack.path}: Resources.{template.logical_id}: template {template.name} is not Enabled, but this "
                "state directory serves it from an earlier start: use a new state directory",
                step="config",
            )
        log.warning("template %s is not Enabled (AWS's default is false): not served", template.name)
        return
    if template.hook is None:
        registry.put_template(template.name, template.body, None)
        log.info("template %s from %s", template.name, stack.path)
        return
    directory = install_function(template.hook, state_dir / FUNCTIONS_DIR, region)
    registry.put_template(template.name, template.body, hook_command(directory), str(directory.resolve()))
    log.info("template %s from %s, pre-provisioning hook %s (%s, index.%s, %g s)", template.name, stack.path,
             template.hook.name, template.hook.runtime, template.hook.handler, template.hook.timeout)  # fmt: skip


def install_function(function: StackFunction, functions_dir: Path, region: str) -> Path:
    """Write the function's code and description under ``functions_dir``; returns its directory."""
    functions_dir.mkdir(mode=0o700, exist_ok=True)
    directory = functions_dir / function.logical_id  # logical ids are alphanumeric: a safe directory name
    directory.mkdir(mode=0o700, exist_ok=True)
    write_atomic(directory / lambda_runner.CODE_FILE, function.code.encode())
    description = {
        "name": function.name,
        "arn": function.arn,
        "handler": function.handler,
        "runtime": function.runtime,
        "timeout": function.timeout,
        "memory_mb": function.memory_mb,
        "environment": dict(function.environment),
        "region": region,
    }
    write_atomic(directory / lambda_runner.FUNCTION_FILE, json.dumps(description, indent=2).encode())
    if sys.version_info[:2] != _runtime_version(function.runtime):
        log.info("not emulated: %s runs with this machine's Python %d.%d, not %s",
                 function.name, *sys.version_info[:2], function.runtime)  # fmt: skip
    return directory


def _runtime_version(runtime: str) -> tuple[int, ...]:
    return tuple(int(part) for part in runtime.removeprefix("python").split("."))


def _install_claim(stack: CloudStack, spec: StackClaim, registry: Registry, material: CaMaterial,
                   claim_dir: Path) -> ClaimFiles:  # fmt: skip
    public_key = None if spec.csr is None else validate_csr(spec.csr)  # read_stack has checked it
    found = existing_claim(claim_dir, registry)
    if found is not None and _fits(found[0], found[1], public_key, spec, registry):
        claim = found[0]
    else:
        claim = issue_claim(registry, material, claim_dir, public_key, spec.status)
        if found is not None:
            registry.set_certificate_status(found[0].certificate_id, "INACTIVE")
            log.info("claim certificate %s no longer fits %s: replaced by %s, and INACTIVE now",
                     found[0].certificate_id, stack.path, claim.certificate_id)  # fmt: skip
    with registry.transaction():
        registry.set_certificate_status(claim.certificate_id, spec.status)
        for policy in spec.policies:
            registry.attach_policy(policy, claim.certificate_id)
    source = "the emulator's key" if claim.private_key is not None else "the CSR's key"
    log.info("claim certificate %s (%s, %s), policies: %s", claim.certificate_id, source, spec.status,
             ", ".join(spec.policies) or "none: it cannot connect")  # fmt: skip
    return claim


def _fits(claim: ClaimFiles, certificate: x509.Certificate, wanted: Optional[PublicKey], spec: StackClaim,
          registry: Registry) -> bool:  # fmt: skip
    """Whether the claim on disk is the one the file describes: same key, same policies."""
    # Without a CSR the emulator's own key fits; with one, the certificate must be for the CSR's key.
    same_key = claim.private_key is not None if wanted is None else _der(certificate.public_key()) == _der(wanted)
    policies = {name for name, _ in registry.policies_for_certificate(claim.certificate_id)}
    return same_key and policies == set(spec.policies)


def _der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
