"""Tests for fleetprov.emulator.service: the fleet-provisioning MQTT API, driven through handle() without a broker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fleetprov.emulator.ca import CaMaterial, CertificateAuthority, IssuedCertificate, ensure_ca_material
from fleetprov.emulator.faults import FaultConfig, Faults, ForcedRejection
from fleetprov.emulator.registry import Registry
from fleetprov.emulator.service import (
    CREATE_FROM_CSR,
    CREATE_KEYS,
    MAX_PAYLOAD_BYTES,
    REGISTER_THING,
    ApiRequest,
    Caller,
    ProvisioningService,
    Reply,
    parse_request_topic,
    token_hash,
)

DEMO_TEMPLATE = (Path(__file__).parents[2] / "fleetprov" / "emulator" / "data" / "demo-template.json").read_text()
CALLER = Caller(client_id="device-0001", certificate_id="c1a1m" * 12 + "c1a1")
START = 1_700_000_000.0
TTL = 3600.0

CSR_TOPIC = "$aws/certificates/create-from-csr/json"
KEYS_TOPIC = "$aws/certificates/create/json"

CREATE_CSR_FIELDS = {"certificateOwnershipToken", "certificateId", "certificatePem"}
CREATE_KEYS_FIELDS = CREATE_CSR_FIELDS | {"privateKey"}
REGISTER_FIELDS = {"deviceConfiguration", "thingName"}
REJECTED_FIELDS = {"statusCode", "errorCode", "errorMessage"}

Body = Mapping[str, Any]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def register_topic(template: str, payload_format: str = "json") -> str:
    return f"$aws/provisioning-templates/{template}/provision/{payload_format}"


def encode(body: Body, payload_format: str) -> bytes:
    return cbor2.dumps(dict(body)) if payload_format == "cbor" else json.dumps(body).encode()


def decode(payload: bytes, payload_format: str) -> Any:
    return cbor2.loads(payload) if payload_format == "cbor" else json.loads(payload)


def make_csr(key: Optional[ec.EllipticCurvePrivateKey] = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def small_template(
    *,
    thing: Optional[dict[str, Any]] = None,
    thing_overrides: Optional[dict[str, str]] = None,
    status: str = "ACTIVE",
    certificate_id: Any = None,
    status_override: Optional[str] = None,
    extra_resources: Optional[dict[str, Any]] = None,
    with_certificate: bool = True,
) -> str:
    """A template with a thing named by the ThingName parameter and an attribute from Color (default "red")."""
    resources: dict[str, Any] = {}
    thing_properties = {"ThingName": {"Ref": "ThingName"}, "AttributePayload": {"color": {"Ref": "Color"}}}
    thing_properties.update(thing or {})
    resources["thing"] = {"Type": "AWS::IoT::Thing", "Properties": thing_properties}
    if thing_overrides:
        resources["thing"]["OverrideSettings"] = thing_overrides
    if with_certificate:
        resources["certificate"] = {
            "Type": "AWS::IoT::Certificate",
            "Properties": {
                "CertificateId": certificate_id or {"Ref": "AWS::IoT::Certificate::Id"},
                "Status": status,
            },
        }
        if status_override:
            resources["certificate"]["OverrideSettings"] = {"Status": status_override}
    resources.update(extra_resources or {})
    return json.dumps(
        {
            "Parameters": {"ThingName": {"Type": "String"}, "Color": {"Type": "String", "Default": "red"}},
            "Resources": resources,
            "DeviceConfiguration": {"thing": {"Ref": "ThingName"}},
        }
    )


@dataclass
class Env:
    registry: Registry
    service: ProvisioningService
    clock: FakeClock
    tmp_path: Path
    caller: Caller = CALLER

    def send(self, topic: str, payload: Union[bytes, Body]) -> tuple[Reply, Any]:
        request = parse_request_topic(topic)
        assert request is not None, topic
        raw = payload if isinstance(payload, bytes) else encode(payload, request.payload_format)
        reply = asyncio.run(self.service.handle(request, raw, self.caller))
        return reply, decode(reply.payload, request.payload_format)

    def create_from_csr(self, payload_format: str = "json", csr: Optional[str] = None) -> dict[str, Any]:
        topic = f"$aws/certificates/create-from-csr/{payload_format}"
        reply, body = self.send(topic, {"certificateSigningRequest": csr or make_csr()})
        assert reply.accepted, body
        assert reply.topic == f"{topic}/accepted"
        return dict(body)

    def token(self) -> str:
        return str(self.create_from_csr()["certificateOwnershipToken"])

    def register(
        self,
        template: str,
        token: Optional[str],
        parameters: Optional[Any] = None,
        payload_format: str = "json",
    ) -> tuple[Reply, Any]:
        body: dict[str, Any] = {}
        if token is not None:
            body["certificateOwnershipToken"] = token
        if parameters is not None:
            body["parameters"] = parameters
        return self.send(register_topic(template, payload_format), body)

    def put_template(self, name: str, body: str, hook: Optional[list[str]] = None) -> None:
        self.registry.put_template(name, body, hook)

    def write_hook(self, source: str) -> list[str]:
        script = self.tmp_path / "hook.py"
        script.write_text(textwrap.dedent(source))
        return [sys.executable, str(script)]


def accepted(reply: Reply, body: Any, topic: str) -> Any:
    assert reply.accepted, body
    assert reply.topic == f"{topic}/accepted"
    return body


def rejection(reply: Reply, body: Any) -> tuple[int, str, str]:
    assert not reply.accepted, body
    assert reply.topic.endswith("/rejected")
    assert set(body) == REJECTED_FIELDS
    return body["statusCode"], body["errorCode"], body["errorMessage"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaMaterial:
    return ensure_ca_material(tmp_path_factory.mktemp("state"))


def make_env(
    tmp_path: Path,
    issuer: CertificateAuthority,
    faults: Optional[Faults] = None,
    **service_options: Any,
) -> Env:
    clock = FakeClock(START)
    registry = Registry(tmp_path / "registry.sqlite3")
    registry.put_template("demo", DEMO_TEMPLATE, None)
    service = ProvisioningService(
        registry, issuer, faults or Faults(FaultConfig()), token_ttl=TTL, clock=clock, **service_options
    )
    return Env(registry, service, clock, tmp_path)


@pytest.fixture
def env(tmp_path: Path, ca: CaMaterial) -> Iterator[Env]:
    environment = make_env(tmp_path, ca.issuing)
    yield environment
    environment.registry.close()


# --- topics --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("$aws/certificates/create/json", ApiRequest(CREATE_KEYS, "json", "$aws/certificates/create/json")),
        ("$aws/certificates/create/cbor", ApiRequest(CREATE_KEYS, "cbor", "$aws/certificates/create/cbor")),
        (
            "$aws/certificates/create-from-csr/json",
            ApiRequest(CREATE_FROM_CSR, "json", "$aws/certificates/create-from-csr/json"),
        ),
        (
            "$aws/certificates/create-from-csr/cbor",
            ApiRequest(CREATE_FROM_CSR, "cbor", "$aws/certificates/create-from-csr/cbor"),
        ),
        (
            "$aws/provisioning-templates/my-Template_1/provision/json",
            ApiRequest(
                REGISTER_THING, "json", "$aws/provisioning-templates/my-Template_1/provision/json", "my-Template_1"
            ),
        ),
        (
            "$aws/provisioning-templates/demo/provision/cbor",
            ApiRequest(REGISTER_THING, "cbor", "$aws/provisioning-templates/demo/provision/cbor", "demo"),
        ),
    ],
)
def test_parse_request_topic(topic: str, expected: ApiRequest) -> None:
    assert parse_request_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "$aws/certificates/create/json/accepted",
        "$aws/certificates/create/cbor/rejected",
        "$aws/certificates/create-from-csr/json/accepted",
        "$aws/certificates/create-from-csr/cbor/rejected",
        "$aws/provisioning-templates/demo/provision/json/accepted",
        "$aws/provisioning-templates/demo/provision/cbor/rejected",
        "$aws/certificates/create/xml",
        "$aws/certificates/create/JSON",
        "$aws/certificates/create",
        "$aws/certificates/create/",
        "$aws/certificates/create-from-csr",
        "$aws/provisioning-templates/demo/provision",
        "$aws/provisioning-templates//provision/json",
        "$aws/provisioning-templates/a/b/provision/json",
        "$aws/provisioning-templates/demo/provision/json/",
        "$aws/certificates/create/+",
        "$aws/certificates/#",
        "$aws/certificates/+/json",
        "$aws/provisioning-templates/+/provision/json",
        "$aws/provisioning-templates/de+mo/provision/json",
        "$aws/provisioning-templates/#",
        "$aws/things/thing-1/shadow/update",
        "$aws/events/certificates/registered/abc",
        "$aws/certificates/register/json",
        "aws/certificates/create/json",
        "/$aws/certificates/create/json",
        "prefix/$aws/certificates/create/json",
        "",
    ],
)
def test_parse_request_topic_ignores_other_topics(topic: str) -> None:
    assert parse_request_topic(topic) is None


@pytest.mark.parametrize(
    "topic", ["$aws/certificates/create/json\n", "$aws/provisioning-templates/demo/provision/cbor\n"]
)
def test_topic_with_trailing_newline_is_not_a_request(topic: str) -> None:
    assert parse_request_topic(topic) is None


# --- CreateCertificateFromCsr + RegisterThing ----------------------------------------------------


def test_csr_then_register_thing(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    reply, created = env.send(CSR_TOPIC, {"certificateSigningRequest": make_csr(key)})

    accepted(reply, created, CSR_TOPIC)
    assert set(created) == CREATE_CSR_FIELDS
    cert = x509.load_pem_x509_certificate(created["certificatePem"].encode())
    assert cert.public_key() == key.public_key()
    assert created["certificateId"] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    token = created["certificateOwnershipToken"]
    assert isinstance(token, str)
    assert len(token) >= 64
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert (record.status, record.kind, record.pem) == ("PENDING_ACTIVATION", "device", created["certificatePem"])
    assert record.claim_certificate_id == CALLER.certificate_id
    assert record.token_expires_at == START + TTL
    # Only the token's hash is stored.
    assert env.registry.certificate_by_token(token) is None
    assert env.registry.certificate_by_token(token_hash(token)) == record

    reply, registered = env.register("demo", token, {"SerialNumber": "0001"})

    accepted(reply, registered, register_topic("demo"))
    assert list(registered) == ["deviceConfiguration", "thingName"]
    assert registered == {
        "deviceConfiguration": {"telemetryTopic": "devices/fleetprov-0001/telemetry", "site": "bench"},
        "thingName": "fleetprov-0001",
    }
    thing = env.registry.thing("fleetprov-0001")
    assert thing is not None
    assert thing.attributes == {"serialNumber": "0001", "location": "lab"}
    assert thing.version == 1
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == "ACTIVE"
    assert env.registry.principals_of_thing("fleetprov-0001") == [created["certificateId"]]
    policies = env.registry.policies_for_certificate(created["certificateId"])
    assert len(policies) == 1
    name, document = policies[0]
    assert name == hashlib.sha256(document.encode()).hexdigest()  # an inline policy is named by its hash
    assert json.loads(document)["Statement"][0]["Action"] == "iot:Connect"


def test_csr_reply_field_order_is_documented_order(env: Env) -> None:
    reply, created = env.send(CSR_TOPIC, {"certificateSigningRequest": make_csr()})
    assert reply.accepted
    assert list(created) == ["certificateOwnershipToken", "certificateId", "certificatePem"]


def test_parameters_change_the_outcome(env: Env) -> None:
    reply, body = env.register("demo", env.token(), {"SerialNumber": "0002", "DeviceLocation": "field"})
    assert accepted(reply, body, register_topic("demo")) == {
        "deviceConfiguration": {"telemetryTopic": "devices/fleetprov-0002/telemetry", "site": "remote"},
        "thingName": "fleetprov-0002",
    }


def test_each_certificate_has_its_own_token(env: Env) -> None:
    first, second = env.create_from_csr(), env.create_from_csr()
    assert first["certificateOwnershipToken"] != second["certificateOwnershipToken"]
    assert first["certificateId"] != second["certificateId"]


def test_register_thing_with_no_thing_resource_has_no_thing_name(env: Env) -> None:
    body = json.loads(small_template())
    del body["Resources"]["thing"]
    body["DeviceConfiguration"] = {"mode": "bare"}
    env.put_template("bare", json.dumps(body))
    reply, registered = env.register("bare", env.token(), {"ThingName": "unused"})
    assert accepted(reply, registered, register_topic("bare")) == {"deviceConfiguration": {"mode": "bare"}}
    assert env.registry.things() == []


# --- CreateKeysAndCertificate --------------------------------------------------------------------


def test_create_keys_and_certificate_then_register(env: Env) -> None:
    reply, created = env.send(KEYS_TOPIC, b"")

    accepted(reply, created, KEYS_TOPIC)
    assert set(created) == CREATE_KEYS_FIELDS
    key = serialization.load_pem_private_key(created["privateKey"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate(created["certificatePem"].encode())
    assert cert.public_key() == key.public_key()
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"

    reply, registered = env.register("demo", created["certificateOwnershipToken"], {"SerialNumber": "k1"})
    assert accepted(reply, registered, register_topic("demo"))["thingName"] == "fleetprov-k1"


def test_create_keys_with_malformed_payload_is_rejected(env: Env) -> None:
    reply, body = env.send(KEYS_TOPIC, b"{not json")
    status, code, message = rejection(reply, body)
    assert (status, code) == (400, "InvalidPayload")
    assert message.startswith("payload is not valid JSON")
    assert reply.topic == f"{KEYS_TOPIC}/rejected"
    assert env.registry.certificates() == []


# --- CBOR ----------------------------------------------------------------------------------------


def test_cbor_requests_get_cbor_replies(env: Env) -> None:
    created = env.create_from_csr("cbor")
    assert set(created) == CREATE_CSR_FIELDS
    reply, registered = env.register("demo", created["certificateOwnershipToken"], {"SerialNumber": "c1"}, "cbor")
    assert accepted(reply, registered, register_topic("demo", "cbor"))["thingName"] == "fleetprov-c1"
    assert cbor2.loads(reply.payload) == registered
    with pytest.raises(ValueError):
        json.loads(reply.payload)


def test_cbor_rejection_is_cbor(env: Env) -> None:
    reply, body = env.register("demo", "", None, "cbor")
    assert rejection(reply, body)[:2] == (400, "InvalidCertificateOwnershipToken")
    assert reply.topic == f"{register_topic('demo', 'cbor')}/rejected"
    assert cbor2.loads(reply.payload) == body


def test_cbor_create_keys(env: Env) -> None:
    reply, created = env.send("$aws/certificates/create/cbor", b"")
    accepted(reply, created, "$aws/certificates/create/cbor")
    assert set(created) == CREATE_KEYS_FIELDS


def test_json_payload_on_cbor_topic_is_rejected(env: Env) -> None:
    reply, body = env.send("$aws/certificates/create-from-csr/cbor", json.dumps({"x": 1}).encode())
    status, code, _ = rejection(reply, body)
    assert (status, code) == (400, "InvalidPayload")


# --- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "Certificate ownership token cannot be empty."),
        (None, "Certificate ownership token cannot be empty."),
        (12345, "Certificate ownership token cannot be empty."),
        ("not-a-token", "Certificate ownership token is not valid."),
    ],
    ids=["empty", "missing", "not-a-string", "unknown"],
)
def test_bad_token(env: Env, token: Any, message: str) -> None:
    reply, body = env.register("demo", token, {"SerialNumber": "0001"})
    assert rejection(reply, body) == (400, "InvalidCertificateOwnershipToken", message)
    assert reply.topic == f"{register_topic('demo')}/rejected"
    assert env.registry.things() == []


def test_expired_token(env: Env) -> None:
    created = env.create_from_csr()
    env.clock.advance(TTL + 1)
    reply, body = env.register("demo", created["certificateOwnershipToken"], {"SerialNumber": "0001"})
    assert rejection(reply, body) == (
        400,
        "InvalidCertificateOwnershipToken",
        "Certificate ownership token has expired.",
    )
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"


def test_token_of_a_deleted_certificate_says_expired(env: Env) -> None:
    created = env.create_from_csr()
    env.clock.advance(TTL + 1)
    assert env.registry.delete_expired_pending(env.clock()) == [created["certificateId"]]
    reply, body = env.register("demo", created["certificateOwnershipToken"], {"SerialNumber": "0001"})
    assert rejection(reply, body) == (
        400,
        "InvalidCertificateOwnershipToken",
        f"Certificate ownership token has expired; certificate {created['certificateId']} was deleted.",
    )
    assert env.registry.certificate(created["certificateId"]) is None


def test_token_just_before_expiry_is_accepted(env: Env) -> None:
    token = env.token()
    env.clock.advance(TTL - 1)
    reply, body = env.register("demo", token, {"SerialNumber": "0001"})
    assert reply.accepted, body


def test_token_ttl_comes_from_the_service(tmp_path: Path, ca: CaMaterial) -> None:
    environment = make_env(tmp_path, ca.issuing)
    environment.service.token_ttl = 60.0
    created = environment.create_from_csr()
    record = environment.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.token_expires_at == START + 60.0
    environment.clock.advance(61)
    reply, body = environment.register("demo", created["certificateOwnershipToken"], {"SerialNumber": "1"})
    assert rejection(reply, body)[2] == "Certificate ownership token has expired."
    environment.registry.close()


def test_unknown_template(env: Env) -> None:
    reply, body = env.register("nope", env.token(), {"SerialNumber": "0001"})
    assert rejection(reply, body) == (404, "ResourceNotFound", "Template nope does not exist")
    assert reply.topic == f"{register_topic('nope')}/rejected"


def test_missing_parameter(env: Env) -> None:
    created = env.create_from_csr()
    reply, body = env.register("demo", created["certificateOwnershipToken"], {"DeviceLocation": "lab"})
    assert rejection(reply, body) == (400, "InvalidParameters", "Missing required parameter: SerialNumber")
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (["SerialNumber", "0001"], "parameters must be an object of string values"),
        ("SerialNumber=0001", "parameters must be an object of string values"),
        ({"SerialNumber": 1}, "parameters.SerialNumber: expected a string, got int"),
        ({"SerialNumber": None}, "parameters.SerialNumber: expected a string, got NoneType"),
        ({"SerialNumber": ["0001"]}, "parameters.SerialNumber: expected a string, got list"),
        ({"SerialNumber": "0001", "Flag": True}, "parameters.Flag: expected a string, got bool"),
    ],
)
def test_bad_parameters(env: Env, parameters: Any, message: str) -> None:
    reply, body = env.register("demo", env.token(), parameters)
    assert rejection(reply, body) == (400, "InvalidPayload", message)


@pytest.mark.parametrize("topic", [CSR_TOPIC, register_topic("demo")])
@pytest.mark.parametrize("payload", [b"{", b"[]", b"null", b"\xff\xfe", b""])
def test_malformed_json(env: Env, topic: str, payload: bytes) -> None:
    reply, body = env.send(topic, payload)
    status, code, message = rejection(reply, body)
    assert (status, code) == (400, "InvalidPayload")
    assert message.startswith("payload ")
    assert reply.topic == f"{topic}/rejected"


def test_payload_over_128_kib(env: Env) -> None:
    payload = json.dumps({"certificateSigningRequest": make_csr()}).encode()
    payload += b" " * (MAX_PAYLOAD_BYTES + 1 - len(payload))
    assert len(payload) == 128 * 1024 + 1
    reply, body = env.send(CSR_TOPIC, payload)
    assert rejection(reply, body) == (
        400,
        "InvalidPayload",
        "payload of 131073 bytes exceeds the 131072 byte limit",
    )
    assert env.registry.certificates() == []


def test_payload_of_exactly_128_kib_is_accepted(env: Env) -> None:
    payload = json.dumps({"certificateSigningRequest": make_csr()}).encode()
    payload += b" " * (MAX_PAYLOAD_BYTES - len(payload))
    reply, body = env.send(CSR_TOPIC, payload)
    assert reply.accepted, body


@pytest.mark.parametrize(
    ("request_body", "code", "message"),
    [
        ({"certificateSigningRequest": "garbage"}, "InvalidCertificateSigningRequest", "is not a PEM encoded"),
        ({"certificateSigningRequest": ""}, "InvalidCertificateSigningRequest", "certificateSigningRequest is empty"),
        ({"certificateSigningRequest": 42}, "InvalidPayload", "must be a string holding a PEM CSR"),
        ({}, "InvalidPayload", "must be a string holding a PEM CSR"),
    ],
    ids=["garbage", "empty", "number", "missing"],
)
def test_bad_csr(env: Env, request_body: Body, code: str, message: str) -> None:
    reply, body = env.send(CSR_TOPIC, request_body)
    status, error_code, error_message = rejection(reply, body)
    assert (status, error_code) == (400, code)
    assert message in error_message
    assert env.registry.certificates() == []


def test_csr_with_weak_key_names_the_problem(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    reply, body = env.send(CSR_TOPIC, {"certificateSigningRequest": make_csr(key)})
    assert rejection(reply, body) == (
        400,
        "InvalidCertificateSigningRequest",
        "elliptic curve secp521r1 is not supported (use P-256 or P-384)",
    )


def test_thing_group_must_exist(env: Env) -> None:
    env.put_template("grouped", small_template(thing={"ThingGroups": ["lab"]}))
    created = env.create_from_csr()
    token = created["certificateOwnershipToken"]

    reply, body = env.register("grouped", token, {"ThingName": "t1"})
    assert rejection(reply, body) == (404, "ResourceNotFound", "thing group lab does not exist")
    assert env.registry.thing("t1") is None
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"
    assert env.registry.principals_of_thing("t1") == []

    env.registry.add_named("thing_groups", ["lab"])
    reply, body = env.register("grouped", token, {"ThingName": "t1"})
    assert reply.accepted, body
    thing = env.registry.thing("t1")
    assert thing is not None
    assert thing.groups == ("lab",)


@pytest.mark.parametrize(
    ("properties", "kind", "message"),
    [
        ({"ThingTypeName": "sensor"}, "thing_types", "thing type sensor does not exist"),
        ({"BillingGroup": "bills"}, "billing_groups", "billing group bills does not exist"),
    ],
)
def test_thing_type_and_billing_group_must_exist(env: Env, properties: dict[str, str], kind: str, message: str) -> None:
    env.put_template("typed", small_template(thing=properties))
    token = env.token()
    reply, body = env.register("typed", token, {"ThingName": "t1"})
    assert rejection(reply, body) == (404, "ResourceNotFound", message)

    env.registry.add_named(kind, list(properties.values()))
    reply, body = env.register("typed", token, {"ThingName": "t1"})
    assert reply.accepted, body
    thing = env.registry.thing("t1")
    assert thing is not None
    assert (thing.thing_type or thing.billing_group) == next(iter(properties.values()))


def test_named_policy_must_exist(env: Env) -> None:
    policy = {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "DevicePolicy"}}
    env.put_template("named", small_template(extra_resources={"policy": policy}))
    created = env.create_from_csr()
    token = created["certificateOwnershipToken"]

    reply, body = env.register("named", token, {"ThingName": "t1"})
    assert rejection(reply, body) == (404, "ResourceNotFound", "policy DevicePolicy does not exist")
    assert env.registry.thing("t1") is None

    env.registry.put_policy("DevicePolicy", '{"Version": "2012-10-17", "Statement": []}')
    reply, body = env.register("named", token, {"ThingName": "t1"})
    assert reply.accepted, body
    assert env.registry.policies_for_certificate(created["certificateId"]) == [
        ("DevicePolicy", '{"Version": "2012-10-17", "Statement": []}')
    ]


def test_invalid_inline_policy_is_rejected(env: Env) -> None:
    policy = {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": {"Version": "2012-10-17"}}}
    env.put_template("badpolicy", small_template(extra_resources={"policy": policy}))
    reply, body = env.register("badpolicy", env.token(), {"ThingName": "t1"})
    status, code, message = rejection(reply, body)
    assert (status, code) == (400, "InvalidParameters")
    assert message.startswith("PolicyDocument: ")


def test_override_fail_with_a_different_attribute(env: Env) -> None:
    env.put_template("strict", small_template(thing_overrides={"AttributePayload": "FAIL"}))
    reply, body = env.register("strict", env.token(), {"ThingName": "t1", "Color": "red"})
    assert reply.accepted, body

    second = env.create_from_csr()
    reply, body = env.register("strict", second["certificateOwnershipToken"], {"ThingName": "t1", "Color": "blue"})
    assert rejection(reply, body) == (
        409,
        "ResourceConflictsException",
        "thing t1 exists with a different AttributePayload",
    )
    thing = env.registry.thing("t1")
    assert thing is not None
    assert (thing.attributes, thing.version) == ({"color": "red"}, 1)
    record = env.registry.certificate(second["certificateId"])
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"

    reply, body = env.register("strict", second["certificateOwnershipToken"], {"ThingName": "t1", "Color": "red"})
    assert reply.accepted, body


@pytest.mark.parametrize(
    ("setting", "attributes", "groups"),
    [
        ("MERGE", {"color": "blue", "size": "L"}, ("g1", "g2")),
        ("REPLACE", {"color": "blue"}, ("g2",)),
        ("DO_NOTHING", {"color": "red", "size": "L"}, ("g1",)),
        (None, {"color": "red", "size": "L"}, ("g1",)),  # no OverrideSettings: DO_NOTHING
    ],
)
def test_override_settings_on_a_second_registration(
    env: Env, setting: Optional[str], attributes: dict[str, str], groups: tuple[str, ...]
) -> None:
    env.registry.add_named("thing_groups", ["g1", "g2"])
    overrides = {"AttributePayload": setting, "ThingGroups": setting} if setting else None
    first = small_template(
        thing={"AttributePayload": {"color": {"Ref": "Color"}, "size": "L"}, "ThingGroups": ["g1"]},
        thing_overrides=overrides,
    )
    second = small_template(thing={"ThingGroups": ["g2"]}, thing_overrides=overrides)
    env.put_template("first", first)
    env.put_template("second", second)
    first_cert, second_cert = env.create_from_csr(), env.create_from_csr()

    reply, body = env.register("first", first_cert["certificateOwnershipToken"], {"ThingName": "t1"})
    assert reply.accepted, body
    reply, body = env.register("second", second_cert["certificateOwnershipToken"], {"ThingName": "t1", "Color": "blue"})
    assert reply.accepted, body
    assert body["thingName"] == "t1"

    thing = env.registry.thing("t1")
    assert thing is not None
    assert dict(thing.attributes) == attributes
    assert thing.groups == groups
    assert thing.version == 2
    # Either way the second certificate is now a principal of the thing too.
    assert env.registry.principals_of_thing("t1") == sorted([first_cert["certificateId"], second_cert["certificateId"]])


def test_override_thing_type_replace(env: Env) -> None:
    env.registry.add_named("thing_types", ["old", "new"])
    env.put_template("a", small_template(thing={"ThingTypeName": "old"}))
    env.put_template("b", small_template(thing={"ThingTypeName": "new"}, thing_overrides={"ThingTypeName": "REPLACE"}))
    assert env.register("a", env.token(), {"ThingName": "t"})[0].accepted
    assert env.register("b", env.token(), {"ThingName": "t"})[0].accepted
    thing = env.registry.thing("t")
    assert thing is not None
    assert thing.thing_type == "new"


def test_inactive_status_from_template(env: Env) -> None:
    env.put_template("inactive", small_template(status="INACTIVE"))
    created = env.create_from_csr()
    reply, body = env.register("inactive", created["certificateOwnershipToken"], {"ThingName": "t1"})
    assert reply.accepted, body
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == "INACTIVE"


@pytest.mark.parametrize(("status_override", "expected"), [("DO_NOTHING", "REVOKED"), ("REPLACE", "ACTIVE")])
def test_certificate_status_override_on_reregistration(env: Env, status_override: str, expected: str) -> None:
    env.put_template("t", small_template(status_override=status_override))
    created = env.create_from_csr()
    token = created["certificateOwnershipToken"]
    assert env.register("t", token, {"ThingName": "t1"})[0].accepted
    env.registry.set_certificate_status(created["certificateId"], "REVOKED")

    reply, body = env.register("t", token, {"ThingName": "t1"})
    assert reply.accepted, body
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == expected


def test_template_with_literal_other_certificate_id(env: Env) -> None:
    env.put_template("literal", small_template(certificate_id="0" * 64))
    created = env.create_from_csr()
    reply, body = env.register("literal", created["certificateOwnershipToken"], {"ThingName": "t1"})
    assert rejection(reply, body) == (
        400,
        "InvalidParameters",
        "the template's CertificateId is not the certificate of the ownership token",
    )
    assert env.registry.thing("t1") is None


def test_template_with_literal_own_certificate_id(env: Env) -> None:
    created = env.create_from_csr()
    env.put_template("literal", small_template(certificate_id=created["certificateId"]))
    reply, body = env.register("literal", created["certificateOwnershipToken"], {"ThingName": "t1"})
    assert reply.accepted, body


def test_template_without_certificate_resource(env: Env) -> None:
    env.put_template("nocert", small_template(with_certificate=False))
    reply, body = env.register("nocert", env.token(), {"ThingName": "t1"})
    assert rejection(reply, body) == (
        400,
        "InvalidParameters",
        "template declares no AWS::IoT::Certificate resource",
    )
    assert env.registry.thing("t1") is None


def test_broken_template_in_registry(env: Env) -> None:
    env.put_template("broken", '{"Resources": {"thing": {"Type": "AWS::IoT::Nope", "Properties": {}}}}')
    reply, body = env.register("broken", env.token(), {})
    status, code, message = rejection(reply, body)
    assert (status, code) == (400, "InvalidParameters")
    assert message.startswith("template broken: Resources.thing.Type: must be one of ")


def test_same_token_twice_within_ttl_is_idempotent(env: Env) -> None:
    created = env.create_from_csr()
    token = created["certificateOwnershipToken"]
    first = env.register("demo", token, {"SerialNumber": "0001"})
    env.clock.advance(600)
    second = env.register("demo", token, {"SerialNumber": "0001"})

    assert first[0].accepted and second[0].accepted
    assert first[0].payload == second[0].payload
    assert env.registry.principals_of_thing("fleetprov-0001") == [created["certificateId"]]
    assert len(env.registry.policies_for_certificate(created["certificateId"])) == 1
    thing = env.registry.thing("fleetprov-0001")
    assert thing is not None
    assert thing.attributes == {"serialNumber": "0001", "location": "lab"}
    assert [record.certificate_id for record in env.registry.certificates()] == [created["certificateId"]]


def test_override_fail_thing_groups_in_template_order(env: Env) -> None:
    env.registry.add_named("thing_groups", ["a-group", "b-group"])
    env.put_template(
        "groups", small_template(thing={"ThingGroups": ["b-group", "a-group"]}, thing_overrides={"ThingGroups": "FAIL"})
    )
    token = env.token()
    assert env.register("groups", token, {"ThingName": "t1"})[0].accepted
    reply, body = env.register("groups", token, {"ThingName": "t1"})
    assert reply.accepted, body


def test_duplicate_thing_group_is_not_an_internal_failure(env: Env) -> None:
    env.registry.add_named("thing_groups", ["lab"])
    env.put_template("dup", small_template(thing={"ThingGroups": ["lab", "lab"]}))
    reply, body = env.register("dup", env.token(), {"ThingName": "t1"})
    assert reply.accepted or body["statusCode"] == 400, body


@pytest.mark.parametrize(
    "payload",
    [
        '{"certificateOwnershipToken": "\\ud800"}',
        '{"certificateOwnershipToken": "TOKEN", "parameters": {"SerialNumber": "\\ud800"}}',
    ],
    ids=["token", "parameter"],
)
def test_lone_surrogate_is_a_client_error(env: Env, payload: str) -> None:
    raw = payload.replace("TOKEN", env.token()).encode()
    reply, body = env.send(register_topic("demo"), raw)
    assert rejection(reply, body)[0] == 400, body


# --- pre-provisioning hooks ----------------------------------------------------------------------


def test_hook_overrides_change_the_thing_name(env: Env) -> None:
    hook = env.write_hook(
        """
        import json, sys
        event = json.load(sys.stdin)
        serial = event["parameters"]["SerialNumber"]
        print(json.dumps({"allowProvisioning": True, "parameterOverrides": {"SerialNumber": "hooked-" + serial}}))
        """
    )
    env.put_template("hooked", DEMO_TEMPLATE, hook)
    reply, body = env.register("hooked", env.token(), {"SerialNumber": "0001"})
    assert accepted(reply, body, register_topic("hooked")) == {
        "deviceConfiguration": {"telemetryTopic": "devices/fleetprov-hooked-0001/telemetry", "site": "bench"},
        "thingName": "fleetprov-hooked-0001",
    }
    assert env.registry.thing("fleetprov-0001") is None


def test_hook_may_supply_a_missing_parameter(env: Env) -> None:
    hook = env.write_hook('print(\'{"allowProvisioning": true, "parameterOverrides": {"SerialNumber": "fromhook"}}\')')
    env.put_template("hooked", DEMO_TEMPLATE, hook)
    reply, body = env.register("hooked", env.token())
    assert accepted(reply, body, register_topic("hooked"))["thingName"] == "fleetprov-fromhook"


def test_hook_runs_in_its_template_directory(env: Env) -> None:
    config_dir = env.tmp_path / "config"
    (config_dir / "hooks").mkdir(parents=True)
    (config_dir / "hooks" / "allow.py").write_text(
        "import json\nprint(json.dumps({'allowProvisioning': True, 'parameterOverrides': {'SerialNumber': 'cwd'}}))\n"
    )
    env.registry.put_template("hooked", DEMO_TEMPLATE, [sys.executable, "hooks/allow.py"], str(config_dir))
    reply, body = env.register("hooked", env.token(), {"SerialNumber": "0001"})
    assert accepted(reply, body, register_topic("hooked"))["thingName"] == "fleetprov-cwd"


def test_hook_denies(env: Env) -> None:
    hook = env.write_hook("print('{\"allowProvisioning\": false}')")
    env.put_template("hooked", DEMO_TEMPLATE, hook)
    created = env.create_from_csr()
    reply, body = env.register("hooked", created["certificateOwnershipToken"], {"SerialNumber": "0001"})
    assert rejection(reply, body) == (403, "AccessDenied", "pre-provisioning hook denied provisioning")
    assert env.registry.things() == []
    record = env.registry.certificate(created["certificateId"])
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"


def test_failing_hook_denies(env: Env) -> None:
    hook = env.write_hook("import sys\nsys.exit(1)\n")
    env.put_template("hooked", DEMO_TEMPLATE, hook)
    reply, body = env.register("hooked", env.token(), {"SerialNumber": "0001"})
    assert rejection(reply, body) == (403, "AccessDenied", "pre-provisioning hook failed (exit status 1)")


def test_hook_is_not_run_for_an_invalid_token(env: Env) -> None:
    ran = env.tmp_path / "ran"
    hook = env.write_hook(f"open({str(ran)!r}, 'w').write('x')\nprint('{{\"allowProvisioning\": true}}')\n")
    env.put_template("hooked", DEMO_TEMPLATE, hook)
    reply, body = env.register("hooked", "bogus", {"SerialNumber": "0001"})
    assert rejection(reply, body)[1] == "InvalidCertificateOwnershipToken"
    assert not ran.exists()


def hook_input_env(tmp_path: Path, ca: CaMaterial) -> tuple[Env, Path]:
    environment = make_env(tmp_path, ca.issuing, region="eu-central-1", account="111122223333")
    received = tmp_path / "hook-input.json"
    hook = environment.write_hook(
        f"""
        import sys
        open({str(received)!r}, "wb").write(sys.stdin.buffer.read())
        print('{{"allowProvisioning": true}}')
        """
    )
    environment.put_template("hooked", DEMO_TEMPLATE, hook)
    return environment, received


def test_hook_input(tmp_path: Path, ca: CaMaterial) -> None:
    environment, received = hook_input_env(tmp_path, ca)
    created = environment.create_from_csr()
    parameters = {"SerialNumber": "0001", "Extra": "for the hook"}
    reply, body = environment.register("hooked", created["certificateOwnershipToken"], parameters)
    assert reply.accepted, body

    hook_input = json.loads(received.read_text())
    assert set(hook_input) == {
        "claimCertificateId",
        "certificateId",
        "certificatePem",
        "templateArn",
        "clientId",
        "parameters",
    }
    assert hook_input["claimCertificateId"] == CALLER.certificate_id
    assert hook_input["certificateId"] == created["certificateId"]
    assert hook_input["certificatePem"] == created["certificatePem"]
    assert hook_input["templateArn"] == "arn:aws:iot:eu-central-1:111122223333:provisioningtemplate/hooked"
    assert hook_input["clientId"] == CALLER.client_id
    assert hook_input["parameters"]["SerialNumber"] == "0001"
    assert hook_input["parameters"]["Extra"] == "for the hook"
    environment.registry.close()


def test_hook_input_parameters_are_the_request_parameters(tmp_path: Path, ca: CaMaterial) -> None:
    environment, received = hook_input_env(tmp_path, ca)
    parameters = {"SerialNumber": "0001"}
    reply, body = environment.register("hooked", environment.token(), parameters)
    environment.registry.close()
    assert reply.accepted, body
    assert json.loads(received.read_text())["parameters"] == parameters


# --- faults --------------------------------------------------------------------------------------


def test_throttle(tmp_path: Path, ca: CaMaterial) -> None:
    monotonic = FakeClock(50.0)
    environment = make_env(tmp_path, ca.issuing, Faults(FaultConfig(throttle_per_second=2), clock=monotonic))
    csr = {"certificateSigningRequest": make_csr()}

    assert environment.send(CSR_TOPIC, csr)[0].accepted
    monotonic.advance(0.5)
    assert environment.send(CSR_TOPIC, csr)[0].accepted
    reply, body = environment.send(CSR_TOPIC, csr)
    assert rejection(reply, body) == (429, "ThrottlingException", "Rate exceeded")
    reply, body = environment.register("demo", "anything", {})  # every operation counts against one limit
    assert rejection(reply, body)[:2] == (429, "ThrottlingException")

    monotonic.advance(0.5)  # the first request left the one-second window
    assert environment.send(CSR_TOPIC, csr)[0].accepted
    reply, body = environment.send(CSR_TOPIC, csr)
    assert rejection(reply, body)[0] == 429
    monotonic.advance(1.0)
    assert environment.send(CSR_TOPIC, csr)[0].accepted
    assert len(environment.registry.certificates()) == 4
    environment.registry.close()


def test_forced_rejection_then_normal(tmp_path: Path, ca: CaMaterial) -> None:
    forced = ForcedRejection("RegisterThing", 2, 503, "ServiceUnavailable", "try again")
    environment = make_env(tmp_path, ca.issuing, Faults(FaultConfig(reject=(forced,))))
    token = environment.token()  # CreateCertificateFromCsr is not affected

    for _ in range(2):
        reply, body = environment.register("demo", token, {"SerialNumber": "0001"})
        assert rejection(reply, body) == (503, "ServiceUnavailable", "try again")
        assert reply.topic == f"{register_topic('demo')}/rejected"
    assert environment.registry.things() == []

    reply, body = environment.register("demo", token, {"SerialNumber": "0001"})
    assert reply.accepted, body
    reply, body = environment.register("demo", token, {"SerialNumber": "0001"})
    assert reply.accepted, body
    environment.registry.close()


def test_forced_rejection_comes_before_payload_checks(tmp_path: Path, ca: CaMaterial) -> None:
    forced = ForcedRejection("CreateCertificateFromCsr", 1, 500, "InternalFailure", "knob")
    environment = make_env(tmp_path, ca.issuing, Faults(FaultConfig(reject=(forced,))))
    reply, body = environment.send(CSR_TOPIC, b"not json")
    assert rejection(reply, body) == (500, "InternalFailure", "knob")
    reply, body = environment.send(CSR_TOPIC, b"not json")
    assert rejection(reply, body)[:2] == (400, "InvalidPayload")
    environment.registry.close()


# --- never raises --------------------------------------------------------------------------------


class FastKeysIssuer(CertificateAuthority):
    """Reuses one RSA key for CreateKeysAndCertificate: generating one per example would take seconds.
    The certificate is still freshly signed, so ids and tokens stay unique."""

    def __init__(self, issuer: CertificateAuthority) -> None:
        super().__init__(issuer.cert, issuer.key)
        self.device_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def create_keys_and_certificate(self) -> tuple[IssuedCertificate, str]:
        issued = self.sign_client(self.device_key.public_key(), "AWS IoT Certificate")
        pem = self.device_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return issued, pem.decode()


@dataclass
class FuzzTarget:
    env: Env
    token: str
    csr: str


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, ca: CaMaterial) -> Iterator[FuzzTarget]:
    environment = make_env(tmp_path_factory.mktemp("fuzz"), FastKeysIssuer(ca.issuing))
    environment.put_template("small", small_template())
    yield FuzzTarget(environment, environment.token(), make_csr())
    environment.registry.close()


REQUEST_TOPICS = [
    f"$aws/certificates/{operation}/{payload_format}"
    for operation in ("create", "create-from-csr")
    for payload_format in ("json", "cbor")
] + [
    register_topic(name, payload_format) for name in ("demo", "small", "missing") for payload_format in ("json", "cbor")
]

VALID_TOKEN = "<the fixture's valid token>"
PARAMETER_NAMES = ("SerialNumber", "DeviceLocation", "ThingName", "Color", "AWS::IoT::Certificate::Id")

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
# Mostly well-formed requests, so that the fuzzing reaches template evaluation and the registry, not only the
# payload checks; the rest is anything JSON can say.
tokens = st.just(VALID_TOKEN) | st.sampled_from(["", "bogus"]) | json_scalars
plausible_parameters = st.fixed_dictionaries({}, optional={name: st.text(max_size=12) for name in PARAMETER_NAMES})
parameters = plausible_parameters | st.dictionaries(st.text(max_size=6), json_scalars, max_size=3) | json_values
csrs = st.just("<the fixture's CSR>") | st.sampled_from(["", "-----BEGIN CERTIFICATE REQUEST-----"]) | json_scalars
request_objects = st.fixed_dictionaries(
    {},
    optional={"certificateOwnershipToken": tokens, "parameters": parameters, "certificateSigningRequest": csrs},
)
extra_fields = st.dictionaries(st.text(max_size=8), json_values, max_size=2)


def check_reply(request: ApiRequest, reply: Reply) -> None:
    body = decode(reply.payload, request.payload_format)
    assert isinstance(body, dict)
    event(f"{request.operation}: {'accepted' if reply.accepted else body.get('errorCode')}")
    if reply.accepted:
        assert reply.topic == f"{request.topic}/accepted"
        expected = {
            CREATE_KEYS: CREATE_KEYS_FIELDS,
            CREATE_FROM_CSR: CREATE_CSR_FIELDS,
            REGISTER_THING: REGISTER_FIELDS,
        }[request.operation]
        assert set(body) == expected
        assert all(isinstance(value, str) for key, value in body.items() if key != "deviceConfiguration")
    else:
        assert reply.topic == f"{request.topic}/rejected"
        assert set(body) == REJECTED_FIELDS
        assert type(body["statusCode"]) is int
        assert isinstance(body["errorCode"], str)
        assert isinstance(body["errorMessage"], str)
        # A 500 means an exception escaped a handler: a bug, not an answer.
        assert body["statusCode"] != 500, body


def handle(target: FuzzTarget, topic: str, payload: bytes) -> tuple[ApiRequest, Reply]:
    request = parse_request_topic(topic)
    assert request is not None
    reply = asyncio.run(target.env.service.handle(request, payload, CALLER))
    return request, reply


@settings(max_examples=200, deadline=None)
@given(topic=st.sampled_from(REQUEST_TOPICS), payload=st.binary(max_size=200))
def test_random_bytes_never_raise(fuzz: FuzzTarget, topic: str, payload: bytes) -> None:
    check_reply(*handle(fuzz, topic, payload))


@settings(max_examples=200, deadline=None)
@given(topic=st.sampled_from(REQUEST_TOPICS), fields=request_objects, extra=extra_fields)
def test_random_json_objects_never_raise(
    fuzz: FuzzTarget, topic: str, fields: dict[str, Any], extra: dict[str, Any]
) -> None:
    body = {**extra, **fields}
    if body.get("certificateOwnershipToken") == VALID_TOKEN:
        body["certificateOwnershipToken"] = fuzz.token
    if body.get("certificateSigningRequest") == "<the fixture's CSR>":
        body["certificateSigningRequest"] = fuzz.csr
    request = parse_request_topic(topic)
    assert request is not None
    check_reply(*handle(fuzz, topic, encode(body, request.payload_format)))


@settings(max_examples=150, deadline=None)
@given(
    topic=st.sampled_from([register_topic(name, fmt) for name in ("demo", "small") for fmt in ("json", "cbor")]),
    parameters=plausible_parameters | parameters,
)
def test_random_register_thing_parameters_never_raise(fuzz: FuzzTarget, topic: str, parameters: Any) -> None:
    request = parse_request_topic(topic)
    assert request is not None
    body = {"certificateOwnershipToken": fuzz.token, "parameters": parameters}
    check_reply(*handle(fuzz, topic, encode(body, request.payload_format)))
