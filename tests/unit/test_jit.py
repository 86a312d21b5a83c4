"""JITP / JITR logic without a broker: subject parameters, finding the issuing CA, register-ca's checks, and
JustInTime.admit against a real registry file."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetprov.emulator.access import ConnectionRefused
from fleetprov.emulator.customer_ca import (
    CaSettings,
    issuing_ca,
    load_ca_certificate,
    read_template,
    register_ca,
)
from fleetprov.emulator.jit import (
    EVENT_TOPIC_PREFIX,
    Activation,
    JustInTime,
    missing_subject_fields,
    run_activation,
    server_name_problem,
    subject_parameters,
)
from fleetprov.emulator.registry import SCHEMA_VERSION, CaCertificateRecord, Registry
from fleetprov.errors import EmulatorError

NOW = 1_700_000_000.0
FULL_SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "WA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Lighting"),
        x509.NameAttribute(NameOID.COMMON_NAME, "lightbulb-0001"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0001"),
        x509.NameAttribute(NameOID.DN_QUALIFIER, "factory-7"),
    ]
)
POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}
)
TEMPLATE: dict[str, Any] = {
    "Parameters": {
        "AWS::IoT::Certificate::CommonName": {"Type": "String"},
        "AWS::IoT::Certificate::Country": {"Type": "String"},
        "AWS::IoT::Certificate::Id": {"Type": "String"},
    },
    "Resources": {
        "thing": {
            "Type": "AWS::IoT::Thing",
            "Properties": {
                "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
                "AttributePayload": {"country": {"Ref": "AWS::IoT::Certificate::Country"}},
            },
        },
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"},
        },
        "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": POLICY}},
    },
}


# -- certificates made here ---------------------------------------------------------------------------------------


class Ca:
    def __init__(self, name: str = "Customer Root CA", *, is_ca: bool = True) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(self.name, self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, subject: x509.Name = FULL_SUBJECT) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        return _builder(subject, self.name, key.public_key()).sign(self.key, hashes.SHA256())


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(123456789)  # not the subject's serialNumber
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _record(ca: Ca, status: str = "ACTIVE") -> CaCertificateRecord:
    return CaCertificateRecord(
        ca_certificate_id=hashlib.sha256(_der(ca.cert)).hexdigest(),
        pem=ca.pem.decode(),
        status=status,
        auto_registration=True,
        template=None,
        mode="DEFAULT",
        activation_command=None,
        created_at=NOW,
    )


# -- subject -> parameters ----------------------------------------------------------------------------------------


def test_subject_parameters_take_every_documented_field() -> None:
    assert subject_parameters(Ca().issue()) == {
        "AWS::IoT::Certificate::CommonName": "lightbulb-0001",
        "AWS::IoT::Certificate::Country": "US",
        "AWS::IoT::Certificate::Organization": "Example Corp",
        "AWS::IoT::Certificate::OrganizationalUnit": "Lighting",
        "AWS::IoT::Certificate::DistinguishedNameQualifier": "factory-7",
        "AWS::IoT::Certificate::StateName": "WA",
        # The subject's serialNumber attribute, not the certificate's serial number (123456789).
        "AWS::IoT::Certificate::SerialNumber": "SN-0001",
    }


def test_subject_parameters_leave_out_absent_fields() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "only-a-name")])
    assert subject_parameters(Ca().issue(subject)) == {"AWS::IoT::Certificate::CommonName": "only-a-name"}


def test_missing_subject_fields_name_the_parameter_and_the_field() -> None:
    declared = frozenset({"AWS::IoT::Certificate::Country", "AWS::IoT::Certificate::Id",
                          "AWS::IoT::Certificate::CommonName", "AWS::IoT::Certificate::SerialNumber"})  # fmt: skip
    supplied = {"AWS::IoT::Certificate::CommonName": "x"}
    assert missing_subject_fields(declared, supplied) == [
        "AWS::IoT::Certificate::Country (subject field C)",
        "AWS::IoT::Certificate::SerialNumber (subject field serialNumber)",
    ]


@pytest.mark.parametrize(
    ("server_name", "counts"),
    [(None, False), ("", False), ("127.0.0.1", False), ("::1", False), ("localhost", True), ("iot.example", True)],
)
def test_only_a_host_name_counts_as_sni(server_name: Optional[str], counts: bool) -> None:
    assert (server_name_problem(server_name) is None) is counts


# -- which CA issued a certificate --------------------------------------------------------------------------------


def test_issuing_ca_is_found_by_signature() -> None:
    issuer, other = Ca("Issuer"), Ca("Other")
    found = issuing_ca(issuer.issue(), [_record(other), _record(issuer)])
    assert found is not None
    assert found.ca_certificate_id == _record(issuer).ca_certificate_id


def test_a_ca_with_the_issuer_name_but_another_key_is_not_the_issuer() -> None:
    real, impostor = Ca("Same Name"), Ca("Same Name")
    assert issuing_ca(impostor.issue(), [_record(real)]) is None


def test_an_inactive_ca_issues_nothing() -> None:
    issuer = Ca()
    assert issuing_ca(issuer.issue(), [_record(issuer, status="INACTIVE")]) is None


# -- register-ca's checks -----------------------------------------------------------------------------------------


def test_load_ca_certificate_accepts_a_ca() -> None:
    ca = Ca()
    assert load_ca_certificate(ca.pem, "ca.pem") == ca.cert


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"garbage\n", "ca.pem: not a PEM certificate"),
        (Ca(is_ca=False).pem, "ca.pem: not a CA certificate (basicConstraints CA:FALSE)"),
        (Ca().issue().public_bytes(serialization.Encoding.PEM), "ca.pem: not a CA certificate (no basicConstraints"),
        (Ca().pem + Ca().pem, "ca.pem: holds 2 certificates"),
    ],
)
def test_load_ca_certificate_refuses(data: bytes, message: str) -> None:
    with pytest.raises(EmulatorError) as caught:
        load_ca_certificate(data, "ca.pem")
    assert caught.value.message.startswith(message)


def test_read_template_accepts_a_body_or_aws_registration_config(tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps(TEMPLATE))
    assert json.loads(read_template(body)) == TEMPLATE
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"templateBody": json.dumps(TEMPLATE), "roleArn": "arn:aws:iam::1:role/JITP"}))
    assert json.loads(read_template(config)) == TEMPLATE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not JSON"),
        ('{"Resources": {"x": {"Type": "AWS::IoT::Thingy"}}}', "Resources"),
        (json.dumps({**TEMPLATE, "Parameters": {"SerialNumber": {"Type": "String"}}}), "not SerialNumber"),
    ],
)
def test_read_template_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "template.json"
    path.write_text(content)
    with pytest.raises(EmulatorError) as caught:
        read_template(path)
    assert caught.value.message.startswith(f"--template {path}: ")
    assert message in caught.value.message


# -- the registry -------------------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    opened = Registry(tmp_path / "registry.sqlite")
    yield opened
    opened.close()


def test_registering_a_ca_again_changes_its_settings(registry: Registry) -> None:
    ca = Ca()
    first = register_ca(registry, ca.cert, CaSettings(False, None, "DEFAULT", None), now=NOW)
    again = register_ca(registry, ca.cert, CaSettings(True, json.dumps(TEMPLATE), "SNI_ONLY", None), now=NOW + 5)
    assert first == again
    (record,) = registry.ca_certificates()
    assert (record.auto_registration, record.mode, record.created_at) == (True, "SNI_ONLY", NOW)
    assert record.template is not None


def test_a_registry_of_schema_version_1_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE certificates (id TEXT PRIMARY KEY)")
        db.execute("PRAGMA user_version = 1")
    upgraded = Registry(path)
    try:
        assert upgraded.ca_certificates() == []
    finally:
        upgraded.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# -- JustInTime.admit ---------------------------------------------------------------------------------------------


def _jit(registry: Registry, ca: Ca, *, auto: bool = True, template: Optional[dict[str, Any]] = None) -> JustInTime:
    register_ca(registry, ca.cert, CaSettings(auto, json.dumps(template) if template else None, "DEFAULT", None),
                now=NOW)  # fmt: skip
    return JustInTime(registry, account="123456789012", clock=lambda: NOW)


def test_jitp_provisions_the_certificate_and_closes_the_connection(registry: Registry) -> None:
    ca = Ca()
    device = _der(ca.issue())
    outcome = _jit(registry, ca, template=TEMPLATE).admit(device, "localhost")
    assert outcome is not None
    assert outcome.event is None
    certificate_id = hashlib.sha256(device).hexdigest()
    record = registry.certificate(certificate_id)
    assert record is not None
    assert (record.status, record.kind) == ("ACTIVE", "device")
    thing = registry.thing("lightbulb-0001")
    assert thing is not None
    assert thing.attributes == {"country": "US"}
    assert registry.things_for_certificate(certificate_id) == ["lightbulb-0001"]
    assert len(registry.policies_for_certificate(certificate_id)) == 1
    # Now an ordinary certificate: the next connection is access.identify's.
    assert JustInTime(registry, account="123456789012").admit(device, "localhost") is None


def test_jitp_without_a_declared_field_registers_nothing(registry: Registry) -> None:
    ca = Ca()
    device = _der(ca.issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-country")])))
    with pytest.raises(ConnectionRefused, match=r"has no AWS::IoT::Certificate::Country \(subject field C\)"):
        _jit(registry, ca, template=TEMPLATE).admit(device, "localhost")
    assert registry.certificates() == []
    assert registry.things() == []


def test_jitp_that_fails_half_way_leaves_nothing(registry: Registry) -> None:
    template = json.loads(json.dumps(TEMPLATE))
    template["Resources"]["thing"]["Properties"]["ThingGroups"] = ["no-such-group"]
    ca = Ca()
    with pytest.raises(ConnectionRefused, match="ResourceNotFound: thing group no-such-group does not exist"):
        _jit(registry, ca, template=template).admit(_der(ca.issue()), "localhost")
    assert registry.certificates() == []
    assert registry.things() == []


@pytest.mark.parametrize("server_name", [None, "127.0.0.1"])
def test_unknown_certificate_without_sni_is_refused(registry: Registry, server_name: Optional[str]) -> None:
    ca = Ca()
    with pytest.raises(ConnectionRefused, match="needs TLS SNI"):
        _jit(registry, ca, template=TEMPLATE).admit(_der(ca.issue()), server_name)
    assert registry.certificates() == []


def test_ca_without_auto_registration_refuses_unknown_certificates(registry: Registry) -> None:
    ca = Ca()
    with pytest.raises(ConnectionRefused, match="does not allow auto-registration"):
        _jit(registry, ca, auto=False).admit(_der(ca.issue()), "localhost")
    assert registry.certificates() == []


def test_certificate_of_no_registered_ca_is_left_to_identify(registry: Registry) -> None:
    _jit(registry, Ca("Registered"), template=TEMPLATE)
    assert JustInTime(registry, account="1").admit(_der(Ca("Stranger").issue()), "localhost") is None


def test_jitr_registers_pending_and_publishes_the_event_at_each_connection(registry: Registry) -> None:
    ca = Ca()
    device = _der(ca.issue())
    jit = _jit(registry, ca)
    ca_id = registry.ca_certificates()[0].ca_certificate_id
    certificate_id = hashlib.sha256(device).hexdigest()
    first = jit.admit(device, "localhost")
    assert first is not None
    assert first.event is not None
    assert first.event.topic == EVENT_TOPIC_PREFIX + ca_id
    assert json.loads(first.event.payload) == {
        "certificateId": certificate_id,
        "caCertificateId": ca_id,
        "timestamp": int(NOW * 1000),
        "certificateStatus": "PENDING_ACTIVATION",
        "awsAccountId": "123456789012",
        "certificateRegistrationTimestamp": str(int(NOW * 1000)),
    }
    record = registry.certificate(certificate_id)
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"
    again = jit.admit(device, "localhost")
    assert again is not None
    assert again.event == first.event
    assert "still PENDING_ACTIVATION" in again.reason
    registry.set_certificate_status(certificate_id, "ACTIVE")
    assert jit.admit(device, "localhost") is None


def test_jitr_activation_command_gets_the_event(registry: Registry) -> None:
    ca = Ca()
    register_ca(registry, ca.cert, CaSettings(True, None, "DEFAULT", "activate --now 'with space'"), now=NOW)
    outcome = JustInTime(registry, account="1", clock=lambda: NOW).admit(_der(ca.issue()), "localhost")
    assert outcome is not None
    assert outcome.activation is not None
    assert outcome.event is not None
    assert outcome.activation.argv == ("activate", "--now", "with space")
    assert outcome.activation.event == outcome.event.payload


def test_register_ca_refuses_an_activation_command_it_cannot_split(registry: Registry) -> None:
    with pytest.raises(EmulatorError, match="--activation-command"):
        register_ca(registry, Ca().cert, CaSettings(True, None, "DEFAULT", "unbalanced 'quote"), now=NOW)
    assert registry.ca_certificates() == []


def test_the_activation_command_gets_an_allow_listed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It stands in for a Lambda function: none of the emulator's variables (a token, a password) are in the
    environment it starts with (/proc/self/environ), only PATH, locale and its three FLEETPROV_ variables."""
    monkeypatch.setenv("EMULATOR_ONLY_SECRET", "leaked")
    seen = tmp_path / "environ"
    script = f"import shutil; shutil.copyfile('/proc/self/environ', {str(seen)!r})"
    activation = Activation((sys.executable, "-c", script), "c" * 64, "a" * 64, b"{}")
    asyncio.run(run_activation(activation, tmp_path / "state"))
    names = {entry.split(b"=", 1)[0].decode() for entry in seen.read_bytes().split(b"\0") if entry}
    assert "EMULATOR_ONLY_SECRET" not in names
    assert {"PATH", "FLEETPROV_CERTIFICATE_ID", "FLEETPROV_CA_CERTIFICATE_ID", "FLEETPROV_STATE_DIR"} <= names
