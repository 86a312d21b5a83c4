"""RegisterThing through the unmodified awsiotsdk V2 client: every template feature, every rejection path,
pre-provisioning hooks, and what the registered identity may then do."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from awsiot import iotidentity

from tests.support import (
    Emulator,
    connect,
    connect_claim,
    identity_v2,
    key_pem,
    register,
    rejection,
    start_emulator,
    write_identity,
)

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    base = tmp_path_factory.mktemp("configured")
    config = base / "emulator.yaml"
    config.write_text(
        f"""
templates:
  sensor: {DATA / "sensor-template.json"}
  orphan: {DATA / "orphan-group-template.json"}
  strict: {DATA / "strict-template.json"}
  hooked:
    path: {DATA.parent.parent / "fleetprov/emulator/data/demo-template.json"}
    hook: {sys.executable} {DATA / "hook.py"}
policies:
  sensor-policy: {DATA / "sensor-policy.json"}
thing_groups: [prod-devices, dev-devices]
thing_types: [sensor]
billing_groups: [paying]
"""
    )
    running = start_emulator(base / "state", "--config", str(config))
    yield running
    assert running.stop() == 0, running.log()


def _thing(emulator: Emulator, name: str) -> dict[str, Any]:
    [thing] = [t for t in emulator.admin("things") if t["thingName"] == name]
    return thing


def _certificate(emulator: Emulator, certificate_id: str) -> dict[str, Any]:
    [cert] = [c for c in emulator.admin("certificates") if c["certificateId"] == certificate_id]
    return cert


def test_every_template_feature_in_prod(configured: Emulator) -> None:
    result = register(configured, "sensor", {"SerialNumber": "p1"}, "sensor-p1-claim")
    assert result["thing"] == "sensor-p1"
    assert result["config"] == {"url": "https://prod.example", "label": "sensor-p1-prod"}
    thing = _thing(configured, "sensor-p1")
    assert thing["attributes"] == {"serial": "p1", "color": "green", "tier": "gold"}
    assert thing["thingTypeName"] == "sensor"
    assert thing["thingGroups"] == ["prod-devices"]
    assert thing["billingGroup"] == "paying"
    cert = _certificate(configured, result["certificate_id"])
    assert cert["status"] == "ACTIVE"
    assert cert["policies"] == ["sensor-policy"]
    assert cert["things"] == ["sensor-p1"]


def test_conditions_switch_resources_and_inactive_certificate_is_refused(configured: Emulator, tmp_path: Path) -> None:
    result = register(configured, "sensor", {"SerialNumber": "d1", "Environment": "dev"}, "sensor-d1-claim")
    assert result["config"] == {"url": "https://dev.example", "label": "sensor-d1-dev"}
    thing = _thing(configured, "sensor-d1")
    assert thing["attributes"]["tier"] == "bronze"
    assert thing["thingGroups"] == ["dev-devices"]
    assert thing["billingGroup"] is None
    cert = _certificate(configured, result["certificate_id"])
    assert cert["status"] == "INACTIVE"
    assert len(cert["policies"]) == 2 and "sensor-policy" in cert["policies"]

    cert_path, key_path = write_identity(tmp_path, result["certificate_pem"], key_pem(result["key"]))
    with pytest.raises(Exception, match=r"(?i)refused|not.?authori|closed|protocol"):
        connect(configured, cert_path, key_path, "sensor-d1")


def test_registered_device_is_bound_by_its_policy(configured: Emulator, tmp_path: Path) -> None:
    result = register(configured, "sensor", {"SerialNumber": "p2"}, "sensor-p2-claim")
    cert_path, key_path = write_identity(tmp_path, result["certificate_pem"], key_pem(result["key"]))
    # The policy lets a device connect only as its own thing name.
    with pytest.raises(Exception, match=r"(?i)refused|not.?authori|closed|protocol"):
        connect(configured, cert_path, key_path, "somebody-else")
    device = connect(configured, cert_path, key_path, "sensor-p2")
    device.disconnect().result(10)


def test_second_registration_applies_override_settings(configured: Emulator) -> None:
    register(configured, "sensor", {"SerialNumber": "m1", "Tags": "a,b"}, "sensor-m1-claim")
    register(configured, "sensor", {"SerialNumber": "m1", "Tags": "x,y", "Environment": "dev"}, "sensor-m1-claim")
    thing = _thing(configured, "sensor-m1")
    # AttributePayload MERGE: new values win, ThingGroups DO_NOTHING: the first registration's group stays.
    assert thing["attributes"] == {"serial": "m1", "color": "y", "tier": "bronze"}
    assert thing["thingGroups"] == ["prod-devices"]
    assert len(thing["principals"]) == 2
    assert thing["version"] == 2


@pytest.mark.parametrize(
    ("template", "parameters", "status", "code", "message"),
    [
        ("sensor", {}, 400, "InvalidParameters", "SerialNumber"),
        ("sensor", {"SerialNumber": "e1", "Environment": "staging"}, 400, "InvalidParameters", "staging"),
        ("sensor", {"SerialNumber": "e2", "Tags": "only-one"}, 400, "InvalidParameters", "Select"),
        ("no-such-template", {"SerialNumber": "e3"}, 404, "ResourceNotFound", "no-such-template"),
        ("orphan", {}, 404, "ResourceNotFound", "no-such-group"),
        ("hooked", {"SerialNumber": "deny-1"}, 403, "AccessDenied", "denied"),
        ("hooked", {"SerialNumber": "crash-1"}, 403, "AccessDenied", "exit status 3"),
        ("hooked", {"SerialNumber": "garbage-1"}, 403, "AccessDenied", "JSON"),
    ],
)
def test_rejections(
    configured: Emulator, template: str, parameters: dict[str, str], status: int, code: str, message: str
) -> None:
    result = register(configured, template, parameters, f"reject-{code}-{len(parameters)}")
    got_status, got_code, got_message = result["rejected"]
    assert (got_status, got_code) == (status, code)
    assert message in got_message


def test_fail_and_replace_override_settings(configured: Emulator) -> None:
    first = register(configured, "strict", {"ThingName": "strict-1", "Color": "red", "Group": "prod-devices"}, "s1")
    assert first["thing"] == "strict-1"
    # Same attributes, other group: FAIL lets equal values through, REPLACE swaps the groups.
    register(configured, "strict", {"ThingName": "strict-1", "Color": "red", "Group": "dev-devices"}, "s2")
    assert _thing(configured, "strict-1")["thingGroups"] == ["dev-devices"]
    conflict = register(configured, "strict", {"ThingName": "strict-1", "Color": "blue", "Group": "dev-devices"}, "s3")
    assert conflict["rejected"][:2] == (409, "ResourceConflictsException")
    assert "AttributePayload" in conflict["rejected"][2]
    assert _thing(configured, "strict-1")["attributes"] == {"color": "red"}


def test_named_policy_that_does_not_exist(configured: Emulator) -> None:
    result = register(
        configured,
        "strict",
        {"ThingName": "strict-2", "Color": "red", "Group": "prod-devices", "PolicyName": "no-such-policy"},
        "s4",
    )
    assert result["rejected"][:2] == (404, "ResourceNotFound")
    assert "no-such-policy" in result["rejected"][2]
    assert not [t for t in configured.admin("things") if t["thingName"] == "strict-2"]


def test_hook_allows_and_overrides_parameters(configured: Emulator) -> None:
    result = register(configured, "hooked", {"SerialNumber": "ok-7"}, "hooked-ok-claim")
    assert result["thing"] == "fleetprov-hooked-7"


def test_hook_timeout_denies(configured: Emulator) -> None:
    result = register(configured, "hooked", {"SerialNumber": "slow-1"}, "hooked-slow-claim")
    assert result["rejected"][:2] == (403, "AccessDenied")
    assert "5 s" in result["rejected"][2]


@pytest.mark.parametrize(
    ("token", "message"),
    [("", "cannot be empty"), ("not-a-token", "not valid")],
)
def test_bad_ownership_token(configured: Emulator, token: str, message: str) -> None:
    connection = connect_claim(configured, f"bad-token-{len(token)}")
    try:
        client = identity_v2(connection)  # keep a reference: a collected client cancels its requests
        future = client.register_thing(
            iotidentity.RegisterThingRequest(
                template_name="sensor", certificate_ownership_token=token, parameters={"SerialNumber": "t"}
            )
        )
        error = rejection(future)
    finally:
        connection.disconnect().result(10)
    assert (error.status_code, error.error_code) == (400, "InvalidCertificateOwnershipToken")
    assert message in error.error_message


def test_garbage_csr_is_rejected(configured: Emulator) -> None:
    connection = connect_claim(configured, "garbage-csr")
    try:
        client = identity_v2(connection)
        future = client.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(
                certificate_signing_request="-----BEGIN CERTIFICATE REQUEST-----"
            )
        )
        error = rejection(future)
    finally:
        connection.disconnect().result(10)
    assert (error.status_code, error.error_code) == (400, "InvalidCertificateSigningRequest")
