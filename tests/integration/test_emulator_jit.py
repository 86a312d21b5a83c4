"""JITP and JITR against the emulator, over real TLS, with the openssl commands and the mosquitto_pub call of the
JITP walkthrough (seed 002) and of auto-register-device-cert.md (JITR).

One emulator serves the module; every test makes its own customer CA, so their registrations never meet.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import Emulator, RawClient, connect, fleetprov, provision_csr, start_emulator

ACCOUNT_ARN = "arn:aws:iot:us-east-1:123456789012"
EVENT_TOPIC = "$aws/events/certificates/registered/"
SUBJECT = "/CN=lightbulb-0001/C=US/O=Example Corp/OU=Lighting/ST=WA/serialNumber=SN-0001/dnQualifier=factory-7"

# The example template of jit-provisioning.md, with a policy that lets the device connect as anyclientID and
# publish on foo/bar (the documentation's allows iot:Publish only, which cannot even connect).
DEVICE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": [f"{ACCOUNT_ARN}:client/anyclientID"]},
        {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": [f"{ACCOUNT_ARN}:topic/foo/bar"]},
    ],
}
JITP_TEMPLATE = {
    "Parameters": {
        "AWS::IoT::Certificate::CommonName": {"Type": "String"},
        "AWS::IoT::Certificate::SerialNumber": {"Type": "String"},
        "AWS::IoT::Certificate::Country": {"Type": "String"},
        "AWS::IoT::Certificate::Id": {"Type": "String"},
    },
    "Resources": {
        "thing": {
            "Type": "AWS::IoT::Thing",
            "Properties": {
                "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
                "AttributePayload": {"version": "v1", "serialNumber": {"Ref": "AWS::IoT::Certificate::SerialNumber"}},
                "ThingTypeName": "lightBulb-versionA",
                "ThingGroups": ["v1-lightbulbs", {"Ref": "AWS::IoT::Certificate::Country"}],
            },
            "OverrideSettings": {"AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "DO_NOTHING"},
        },
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"},
            "OverrideSettings": {"Status": "DO_NOTHING"},
        },
        "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": json.dumps(DEVICE_POLICY)}},
    },
}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    base = tmp_path_factory.mktemp("jit")
    config = base / "emulator.yaml"
    config.write_text("thing_types: [lightBulb-versionA]\nthing_groups: [v1-lightbulbs, US]\n")
    running = start_emulator(base / "state", "--config", str(config))
    yield running
    assert running.stop() == 0, running.log()
    log = running.log()
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 1500) :][:4000]


# -- the openssl steps of the walkthrough ------------------------------------------------------------------------


def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Device:
    key: Path
    cert: Path
    chain: Path  # deviceCertAndCACert.crt

    @property
    def certificate_id(self) -> str:
        der = x509.load_pem_x509_certificate(self.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest()


def make_ca(directory: Path, subject: Optional[str] = None) -> Path:
    """A customer root CA, named after the test by default: OpenSSL looks a trusted issuer up by name, so two
    registered CAs of one name would hide each other (and the impostor test needs one name twice)."""
    directory.mkdir(parents=True, exist_ok=True)
    subject = subject or f"/CN=Example Root CA {directory.parent.name}/O=Example Corp"
    openssl(directory, "genrsa", "-out", "rootCA.key", "2048")
    openssl(directory, "req", "-x509", "-new", "-nodes", "-key", "rootCA.key", "-sha256", "-days", "1024",
            "-out", "rootCA.pem", "-subj", subject)  # fmt: skip
    return directory / "rootCA.pem"


def make_device(directory: Path, ca_dir: Path, subject: str = SUBJECT) -> Device:
    directory.mkdir(parents=True, exist_ok=True)
    openssl(directory, "genrsa", "-out", "deviceCert.key", "2048")
    openssl(directory, "req", "-new", "-key", "deviceCert.key", "-out", "deviceCert.csr", "-subj", subject)
    openssl(directory, "x509", "-req", "-in", "deviceCert.csr", "-CA", str(ca_dir / "rootCA.pem"),
            "-CAkey", str(ca_dir / "rootCA.key"), "-CAcreateserial", "-out", "deviceCert.crt", "-days", "365",
            "-sha256")  # fmt: skip
    chain = directory / "deviceCertAndCACert.crt"
    with chain.open("wb") as out:  # cat deviceCert.crt rootCA.pem > deviceCertAndCACert.crt
        subprocess.run(["cat", "deviceCert.crt", str(ca_dir / "rootCA.pem")], cwd=directory, stdout=out, check=True)
    return Device(directory / "deviceCert.key", directory / "deviceCert.crt", chain)


def register_ca(emulator: Emulator, ca: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return fleetprov("emulator", "register-ca", "--state-dir", str(emulator.state_dir), "--ca-certificate", str(ca),
                     *options, timeout=30)  # fmt: skip


def registered_ca(emulator: Emulator, ca: Path, *options: str) -> str:
    result = register_ca(emulator, ca, *options)
    assert result.returncode == 0, result.stderr
    ca_id: str = json.loads(result.stdout)["caCertificateId"]
    return ca_id


def template_file(directory: Path, template: dict[str, Any]) -> Path:
    path = directory / "template.json"
    path.write_text(json.dumps(template))
    return path


def mosquitto_pub(emulator: Emulator, device: Device, host: str = "localhost",
                  cert: Optional[Path] = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Seed 002's command: -h names the emulator's server certificate (localhost), so SNI is sent."""
    return subprocess.run(
        ["mosquitto_pub", "--cafile", str(emulator.root_ca), "--cert", str(cert or device.chain),
         "--key", str(device.key), "-h", host, "-p", str(emulator.port), "-q", "1", "-t", "foo/bar",
         "-i", "anyclientID", "--tls-version", "tlsv1.2", "-m", "Hello", "-d"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def published(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "sending PUBLISH" in result.stdout + result.stderr


def publish_eventually(emulator: Emulator, device: Device, attempts: int = 20) -> subprocess.CompletedProcess[str]:
    """A device's retry loop: try again after a short pause until the connection is accepted."""
    for _ in range(attempts):
        result = mosquitto_pub(emulator, device)
        if published(result):
            return result
        time.sleep(0.3)
    raise AssertionError(f"never connected: {result.stdout}{result.stderr}\n{emulator.log()[-3000:]}")


def certificate(emulator: Emulator, certificate_id: str) -> Optional[dict[str, Any]]:
    return next((c for c in emulator.admin("certificates") if c["certificateId"] == certificate_id), None)


def thing(emulator: Emulator, name: str) -> Optional[dict[str, Any]]:
    return next((t for t in emulator.admin("things") if t["thingName"] == name), None)


# -- JITP ---------------------------------------------------------------------------------------------------------


def test_jitp_seed_recipe_provisions_at_first_connection(emulator: Emulator, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca")
    # Registered while the emulator runs: the next TLS handshake trusts it.
    ca_id = registered_ca(
        emulator, ca, "--auto-registration", "--template", str(template_file(tmp_path, JITP_TEMPLATE))
    )
    listed = {entry["caCertificateId"]: entry for entry in emulator.admin("ca-certificates")}
    assert listed[ca_id]["provisioningType"] == "JITP"
    assert listed[ca_id]["autoRegistrationStatus"] == "ENABLE"

    first = mosquitto_pub(emulator, device)
    assert first.returncode != 0, "AWS drops the first connection while it provisions"
    publish_eventually(emulator, device)

    cert = certificate(emulator, device.certificate_id)
    assert cert is not None
    assert cert["status"] == "ACTIVE"
    assert cert["things"] == ["lightbulb-0001"]
    assert len(cert["policies"]) == 1  # the inline document, named after its hash
    provisioned = thing(emulator, "lightbulb-0001")
    assert provisioned is not None
    assert provisioned["attributes"] == {"version": "v1", "serialNumber": "SN-0001"}
    assert provisioned["thingTypeName"] == "lightBulb-versionA"
    assert provisioned["thingGroups"] == ["US", "v1-lightbulbs"]
    assert provisioned["principals"] == [device.certificate_id]
    assert "JITP of certificate" in emulator.log()


def test_ca_registered_while_the_emulator_is_stopped_is_trusted_at_start(tmp_path: Path) -> None:
    """register-ca needs only the registry: the emulator loads the CA when it starts."""
    state = tmp_path / "state"
    start_emulator(state).stop()
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca")
    template = {
        **JITP_TEMPLATE,
        "Resources": {
            **JITP_TEMPLATE["Resources"],
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {"ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}},
            },
        },
    }
    done = fleetprov("emulator", "register-ca", "--state-dir", str(state), "--ca-certificate", str(ca),
                     "--auto-registration", "--template", str(template_file(tmp_path, template)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    restarted = start_emulator(state)
    try:
        assert mosquitto_pub(restarted, device).returncode != 0
        publish_eventually(restarted, device)
        assert thing(restarted, "lightbulb-0001") is not None
    finally:
        assert restarted.stop() == 0, restarted.log()


def test_jitp_device_without_the_chain_is_provisioned_too(emulator: Emulator, tmp_path: Path) -> None:
    """The CA is registered, hence known: presenting the chain is optional (jit-provisioning.md's note)."""
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca", SUBJECT.replace("lightbulb-0001", "lightbulb-0002"))
    registered_ca(emulator, ca, "--auto-registration", "--mode", "sni-only",
                  "--template", str(template_file(tmp_path, JITP_TEMPLATE)))  # fmt: skip
    assert mosquitto_pub(emulator, device, cert=device.cert).returncode != 0
    for _ in range(20):
        if published(mosquitto_pub(emulator, device, cert=device.cert)):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(emulator.log()[-2000:])
    assert thing(emulator, "lightbulb-0002") is not None


def test_jitp_certificate_without_a_declared_subject_field_is_not_provisioned(
    emulator: Emulator, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca", "/CN=no-country/O=Example Corp/serialNumber=SN-9")
    registered_ca(emulator, ca, "--auto-registration", "--template", str(template_file(tmp_path, JITP_TEMPLATE)))
    things_before = emulator.admin("things")
    for _ in range(2):
        assert mosquitto_pub(emulator, device).returncode != 0
    assert certificate(emulator, device.certificate_id) is None
    assert emulator.admin("things") == things_before
    assert "AWS::IoT::Certificate::Country (subject field C)" in emulator.log()


def test_unknown_certificate_without_sni_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca", SUBJECT.replace("lightbulb-0001", "no-sni"))
    registered_ca(emulator, ca, "--auto-registration", "--template", str(template_file(tmp_path, JITP_TEMPLATE)))
    # An IP literal: mosquitto sends no SNI (the server certificate names 127.0.0.1, so TLS itself succeeds).
    for _ in range(2):
        assert mosquitto_pub(emulator, device, host="127.0.0.1").returncode != 0
    assert certificate(emulator, device.certificate_id) is None
    assert thing(emulator, "no-sni") is None
    assert "just-in-time registration needs TLS SNI" in emulator.log()


def mqtt_connect_without_sni(emulator: Emulator, device: Device, client_id: str) -> bytes:
    """A hand-made MQTT 3.1.1 CONNECT over a TLS connection that sends no SNI at all; returns the reply."""
    context = ssl.create_default_context(cafile=str(emulator.root_ca))
    context.check_hostname = False  # the server certificate is still verified against the emulator's root
    context.load_cert_chain(str(device.chain), str(device.key))
    variable_header = b"\x00\x04MQTT\x04\x02\x00\x3c"  # protocol name, level 4, clean session, keep-alive 60
    payload = len(client_id).to_bytes(2, "big") + client_id.encode()
    remaining = variable_header + payload
    with (
        socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=None) as tls,
    ):
        tls.sendall(bytes([0x10, len(remaining)]) + remaining)
        return tls.recv(4)


def test_unknown_certificate_over_tls_without_any_sni_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca", SUBJECT.replace("lightbulb-0001", "no-sni-raw"))
    registered_ca(emulator, ca, "--auto-registration", "--template", str(template_file(tmp_path, JITP_TEMPLATE)))
    assert mqtt_connect_without_sni(emulator, device, "no-sni-raw") == b"\x20\x02\x00\x05"  # not authorized
    assert certificate(emulator, device.certificate_id) is None
    assert "needs TLS SNI: the client sent none" in emulator.log()


def test_ca_without_auto_registration_refuses_unknown_certificates(emulator: Emulator, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca")
    registered_ca(emulator, ca)
    assert mosquitto_pub(emulator, device).returncode != 0
    assert certificate(emulator, device.certificate_id) is None
    assert "does not allow auto-registration" in emulator.log()


# -- TLS: what never reaches the registry -------------------------------------------------------------------------


def test_device_of_an_unregistered_ca_is_refused_at_tls(emulator: Emulator, tmp_path: Path) -> None:
    make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca")
    before = emulator.admin("certificates")
    result = mosquitto_pub(emulator, device)
    assert result.returncode != 0
    assert emulator.admin("certificates") == before


def test_tampered_signature_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca", SUBJECT.replace("lightbulb-0001", "tampered"))
    registered_ca(emulator, ca, "--auto-registration", "--template", str(template_file(tmp_path, JITP_TEMPLATE)))
    der = bytearray(x509.load_pem_x509_certificate(device.cert.read_bytes()).public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature
    forged = x509.load_der_x509_certificate(bytes(der))
    forged_path = tmp_path / "forged.pem"
    forged_path.write_bytes(forged.public_bytes(serialization.Encoding.PEM) + ca.read_bytes())
    before = emulator.admin("certificates")
    assert mosquitto_pub(emulator, device, cert=forged_path).returncode != 0
    assert emulator.admin("certificates") == before
    assert thing(emulator, "tampered") is None


def test_ca_named_like_a_registered_one_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    """An impostor CA with the registered CA's name but its own key: its device certificates do not verify."""
    subject = "/CN=Lookalike Root CA/O=Example Corp"
    registered_ca(emulator, make_ca(tmp_path / "real", subject), "--auto-registration",
                  "--template", str(template_file(tmp_path, JITP_TEMPLATE)))  # fmt: skip
    make_ca(tmp_path / "impostor", subject)
    device = make_device(tmp_path / "device", tmp_path / "impostor", SUBJECT.replace("lightbulb-0001", "impostor"))
    before = emulator.admin("certificates")
    assert mosquitto_pub(emulator, device).returncode != 0
    assert emulator.admin("certificates") == before
    assert thing(emulator, "impostor") is None


# -- register-ca: bad input ---------------------------------------------------------------------------------------


def test_register_ca_refuses_a_leaf_certificate_and_garbage(emulator: Emulator, tmp_path: Path) -> None:
    make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca")
    before = emulator.admin("ca-certificates")
    leaf = register_ca(emulator, device.cert, "--auto-registration")
    assert leaf.returncode == 78
    assert "not a CA certificate" in leaf.stderr
    assert "Traceback" not in leaf.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    bad = register_ca(emulator, garbage)
    assert bad.returncode == 78
    assert f"--ca-certificate {garbage}: not a PEM certificate" in bad.stderr
    broken_template = tmp_path / "broken.json"
    broken_template.write_text('{"Resources": {"thing": {"Type": "AWS::IoT::Thingy"}}}')
    wrong = register_ca(emulator, tmp_path / "ca" / "rootCA.pem", "--auto-registration", "--template",
                        str(broken_template))  # fmt: skip
    assert wrong.returncode == 78
    assert f"--template {broken_template}:" in wrong.stderr
    assert emulator.admin("ca-certificates") == before


# -- JITR ---------------------------------------------------------------------------------------------------------


def event_subscriber(emulator: Emulator, tmp_path: Path, client_id: str) -> RawClient:
    """An ordinary device whose policy lets it subscribe to and receive the registration events."""
    _, cert_pem, key, certificate_id = provision_csr(emulator, client_id, {"SerialNumber": client_id})
    policy = tmp_path / "events-policy.json"
    policy.write_text(json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{ACCOUNT_ARN}:client/{client_id}"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": f"{ACCOUNT_ARN}:topicfilter/$aws/events/certificates/registered/*"},
            {"Effect": "Allow", "Action": "iot:Receive",
             "Resource": f"{ACCOUNT_ARN}:topic/$aws/events/certificates/registered/*"},
        ],
    }))  # fmt: skip
    emulator.admin("attach-policy", "--certificate-id", certificate_id, "--policy-name", "events-reader",
                   "--policy-document", str(policy))  # fmt: skip
    cert_path, key_path = tmp_path / "subscriber.pem", tmp_path / "subscriber.key"
    cert_path.write_text(cert_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return RawClient(emulator, cert_path, key_path, client_id)


def device_policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "device-policy.json"
    path.write_text(json.dumps(DEVICE_POLICY))
    return path


def test_jitr_registers_pending_publishes_the_event_and_connects_once_activated(
    emulator: Emulator, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca")
    ca_id = registered_ca(emulator, ca, "--auto-registration")
    subscriber = event_subscriber(emulator, tmp_path, "jitr-events")
    try:
        assert subscriber.subscribe(EVENT_TOPIC + "#") == 1
        assert mosquitto_pub(emulator, device).returncode != 0
        topic, payload = subscriber.next_message(10)
        assert topic == EVENT_TOPIC + ca_id
        event = json.loads(payload)
        assert set(event) == {"certificateId", "caCertificateId", "timestamp", "certificateStatus", "awsAccountId",
                              "certificateRegistrationTimestamp"}  # fmt: skip
        assert event["certificateId"] == device.certificate_id
        assert event["caCertificateId"] == ca_id
        assert event["certificateStatus"] == "PENDING_ACTIVATION"
        assert event["awsAccountId"] == "123456789012"
        assert isinstance(event["timestamp"], int)
        assert abs(event["timestamp"] / 1000 - time.time()) < 60
        cert = certificate(emulator, device.certificate_id)
        assert cert is not None
        assert cert["status"] == "PENDING_ACTIVATION"

        # Still PENDING_ACTIVATION: refused again (an awscrt device this time), and AWS publishes the event again.
        with pytest.raises(Exception, match="AWS_ERROR_MQTT_UNEXPECTED_HANGUP"):
            connect(emulator, device.chain, device.key, "anyclientID")
        again = json.loads(subscriber.next_message(10)[1])
        assert again["certificateId"] == device.certificate_id
        assert again["certificateRegistrationTimestamp"] == event["certificateRegistrationTimestamp"]
    finally:
        subscriber.close()

    emulator.admin("set-certificate-status", device.certificate_id, "ACTIVE")
    emulator.admin("attach-policy", "--certificate-id", device.certificate_id, "--policy-name", "jitr-device",
                   "--policy-document", str(device_policy_file(tmp_path)))  # fmt: skip
    assert published(mosquitto_pub(emulator, device))


def test_jitr_activation_command_activates_without_manual_steps(emulator: Emulator, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    device = make_device(tmp_path / "device", tmp_path / "ca")
    policy = device_policy_file(tmp_path)
    script = tmp_path / "activate.py"
    script.write_text(
        "import json, os, subprocess, sys\n"
        "event = json.load(sys.stdin)\n"
        "assert event['certificateId'] == os.environ['FLEETPROV_CERTIFICATE_ID']\n"
        "admin = [sys.executable, '-m', 'fleetprov', 'emulator']\n"
        "state = ['--state-dir', os.environ['FLEETPROV_STATE_DIR']]\n"
        "subprocess.run(admin + ['attach-policy', *state, '--certificate-id', event['certificateId'],\n"
        "               '--policy-name', 'jitr-activated', '--policy-document', sys.argv[1]], check=True)\n"
        "subprocess.run(admin + ['set-certificate-status', *state, event['certificateId'], 'ACTIVE'], check=True)\n"
        "print('activated', event['certificateId'][:12])\n"
    )
    command = shlex.join([sys.executable, str(script), str(policy)])
    registered_ca(emulator, ca, "--auto-registration", "--activation-command", command)
    assert mosquitto_pub(emulator, device).returncode != 0
    publish_eventually(emulator, device, attempts=40)
    cert = certificate(emulator, device.certificate_id)
    assert cert is not None
    assert cert["status"] == "ACTIVE"
    assert cert["policies"] == ["jitr-activated"]
    assert "activation command" in emulator.log()


def test_attach_policy_refuses_unknown_certificates_policies_and_bad_documents(
    emulator: Emulator, tmp_path: Path
) -> None:
    def attach(*options: str) -> subprocess.CompletedProcess[str]:
        return fleetprov("emulator", "attach-policy", "--state-dir", str(emulator.state_dir), *options)

    unknown = attach("--certificate-id", "0" * 64, "--policy-name", "p")
    assert (unknown.returncode, unknown.stderr.strip()) == (78, f"fleetprov: no certificate with id {'0' * 64}")
    claim = emulator.claim_certificate_id
    missing = attach("--certificate-id", claim, "--policy-name", "no-such-policy")
    assert missing.returncode == 78
    assert "no policy named 'no-such-policy'" in missing.stderr
    bad = tmp_path / "bad-policy.json"
    bad.write_text('{"Version": "2012-10-17", "Statement": [{"Effect": "Maybe"}]}')
    invalid = attach("--certificate-id", claim, "--policy-name", "bad", "--policy-document", str(bad))
    assert invalid.returncode == 78
    assert f"--policy-document {bad}:" in invalid.stderr
    assert "Traceback" not in unknown.stderr + missing.stderr + invalid.stderr
    assert "bad" not in {policy for c in emulator.admin("certificates") for policy in c["policies"]}
