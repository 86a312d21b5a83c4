"""Who is connecting and what they may do: certificate status at CONNECT, IoT policies for every action.

A connection is identified by its client certificate (id = SHA-256 of the DER). Only ACTIVE certificates
connect; the policies attached to the certificate, with the thing the connection is associated with (policy.py
says which), decide every publish, subscribe and delivery -- exactly what AWS IoT Core checks, minus the parts
the emulator does not model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from fleetprov.emulator.policy import AttachedThing, Policy, PolicyContext, PolicyError, Request, is_allowed
from fleetprov.emulator.registry import Registry
from fleetprov.errors import EmulatorError


class ConnectionRefused(EmulatorError):
    """The certificate or client may not connect; the message says why (logged, never sent)."""


@dataclass(frozen=True)
class Identity:
    certificate_id: str
    kind: str  # "claim" or "device"
    policies: tuple[Policy, ...]
    context: PolicyContext

    def allows(self, action: str, resource: str) -> bool:
        return is_allowed(self.policies, Request(action, resource), self.context)


def identify(registry: Registry, peer_der: Optional[bytes], client_id: str, *, region: str, account: str) -> Identity:
    """Decide whether this certificate and client id may connect; raise ConnectionRefused if not."""
    if not peer_der:
        raise ConnectionRefused("no client certificate presented")
    certificate_id = hashlib.sha256(peer_der).hexdigest()
    record = registry.certificate(certificate_id)
    if record is None:
        raise ConnectionRefused(f"certificate {certificate_id[:12]} is not registered")
    if record.status != "ACTIVE":
        raise ConnectionRefused(f"certificate {certificate_id[:12]} is {record.status}")
    try:
        policies = tuple(
            Policy.parse(name, document) for name, document in registry.policies_for_certificate(certificate_id)
        )
    except PolicyError as exc:
        raise ConnectionRefused(f"certificate {certificate_id[:12]}: attached policy is invalid: {exc}") from exc
    identity = Identity(
        certificate_id=certificate_id,
        kind=record.kind,
        policies=policies,
        context=PolicyContext(
            region=region,
            account=account,
            client_id=client_id,
            attached_things=_attached_things(registry, certificate_id),
            certificate_id=certificate_id,
        ),
    )
    if not identity.allows("iot:Connect", client_id):
        raise ConnectionRefused(
            f"certificate {certificate_id[:12]}: policy does not allow iot:Connect as {client_id!r}"
        )
    return identity


def _attached_things(registry: Registry, certificate_id: str) -> tuple[AttachedThing, ...]:
    """The things attached to the certificate, as the connection's policy variables see them (the policy picks
    the one the client id or an exclusive attachment names)."""
    things = []
    for attachment in registry.thing_attachments(certificate_id):
        record = registry.thing(attachment.thing)
        things.append(
            AttachedThing(
                name=attachment.thing,
                exclusive=attachment.exclusive,
                thing_type=record.thing_type if record else None,
                attributes=record.attributes if record else {},
            )
        )
    return tuple(things)
