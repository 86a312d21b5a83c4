"""Create what an evaluated provisioning template describes: the thing (with its type, groups and billing group),
the policies, the certificate's status and the attachments between them.

Shared by RegisterThing (service.py) and just-in-time provisioning (jit.py), which AWS documents as "calls
RegisterThing" with the CA's template. Failures are ApiRejections carrying the status and error code
RegisterThing replies with; JITP only logs them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Optional

from fleetprov.emulator.policy import Policy, PolicyError
from fleetprov.emulator.registry import Registry
from fleetprov.emulator.templates import ProvisioningPlan, ThingSpec
from fleetprov.errors import EmulatorError
from fleetprov.provisioning import THING_NAME


class ApiRejection(EmulatorError):
    """Ends a request with a ``/rejected`` reply."""

    def __init__(self, status_code: int, error_code: str, error_message: str) -> None:
        super().__init__(error_message)
        self.status_code = status_code
        self.error_code = error_code
        self.error_message = error_message


def apply_plan(registry: Registry, plan: ProvisioningPlan, certificate_id: str, *, now: float) -> None:
    """Create the plan's resources for ``certificate_id``. Call inside ``registry.transaction()``: a rejection
    half-way must leave nothing behind."""
    if plan.certificate is None:
        raise ApiRejection(400, "InvalidParameters", "template declares no AWS::IoT::Certificate resource")
    if plan.certificate.certificate_id != certificate_id:
        # RegisterThing's wording; for JITP, the CertificateId must Ref AWS::IoT::Certificate::Id.
        raise ApiRejection(
            400, "InvalidParameters", "the template's CertificateId is not the certificate of the ownership token"
        )
    policies = [_policy_for(registry, spec.policy_name, spec.policy_document) for spec in plan.policies]
    if plan.thing is not None:
        _put_thing(registry, plan.thing, now)
        registry.attach_thing_principal(plan.thing.thing_name, certificate_id)
    current = registry.certificate(certificate_id)
    if current is None:
        raise ApiRejection(404, "ResourceNotFound", f"certificate {certificate_id} does not exist")
    # A certificate being provisioned is PENDING_ACTIVATION and always takes the template's status; one that is
    # provisioned again keeps its status when the template says DO_NOTHING.
    keep_status = current.status != "PENDING_ACTIVATION" and plan.certificate.status_override == "DO_NOTHING"
    if not keep_status:
        registry.set_certificate_status(certificate_id, plan.certificate.status)
    for name, document in policies:
        registry.put_policy(name, document)
        registry.attach_policy(name, certificate_id)


def _policy_for(registry: Registry, name: Optional[str], document: Optional[str]) -> tuple[str, str]:
    if document is None:
        name = name or ""
        existing = registry.policy_document(name)
        if existing is None:
            raise ApiRejection(404, "ResourceNotFound", f"policy {name} does not exist")
        return name, existing
    try:
        Policy.parse(name or "policy", document)
    except PolicyError as exc:
        raise ApiRejection(400, "InvalidParameters", f"PolicyDocument: {exc.message}") from exc
    # AWS names an inline policy after the hash of its document when PolicyName is absent.
    return name or hashlib.sha256(document.encode()).hexdigest(), document


def _put_thing(registry: Registry, spec: ThingSpec, now: float) -> None:
    for kind, label, names in (
        ("thing_groups", "thing group", spec.thing_groups),
        ("thing_types", "thing type", (spec.thing_type_name,) if spec.thing_type_name else ()),
        ("billing_groups", "billing group", (spec.billing_group,) if spec.billing_group else ()),
    ):
        for name in names:
            if not registry.named_exists(kind, name):
                raise ApiRejection(404, "ResourceNotFound", f"{label} {name} does not exist")
    if not THING_NAME.fullmatch(spec.thing_name):
        raise ApiRejection(
            400,
            "InvalidParameters",
            f"thing name {spec.thing_name[:40]!r} is not 1-128 characters of letters, digits, ':', '_' or '-'",
        )
    existing = registry.thing(spec.thing_name)
    attributes: Mapping[str, str] = spec.attributes
    thing_type = spec.thing_type_name
    groups = tuple(sorted(set(spec.thing_groups)))  # membership is a set, as in AWS
    if existing is not None:
        merged_attributes = {**existing.attributes, **spec.attributes}
        attributes = _override("AttributePayload", spec, existing.attributes, spec.attributes, merged_attributes)
        thing_type = _override("ThingTypeName", spec, existing.thing_type, spec.thing_type_name, None)
        merged_groups = tuple(sorted({*existing.groups, *groups}))
        groups = _override("ThingGroups", spec, existing.groups, groups, merged_groups)
    registry.put_thing(
        spec.thing_name,
        thing_type=thing_type,
        attributes=attributes,
        billing_group=spec.billing_group or (existing.billing_group if existing else None),
        groups=groups,
        now=now,
    )


def _override(prop: str, spec: ThingSpec, old: Any, new: Any, merged: Any) -> Any:
    """Apply OverrideSettings to one property of a thing that already exists (default: DO_NOTHING)."""
    setting = spec.overrides.get(prop, "DO_NOTHING")
    if setting == "REPLACE":
        return new
    if setting == "MERGE":
        return merged
    if setting == "FAIL" and old != new:
        raise ApiRejection(409, "ResourceConflictsException", f"thing {spec.thing_name} exists with a different {prop}")
    return old
