"""What a connection may do: claim policy, certificate status, per-connection replies, client ids, payload
formats, and the original (V1) awsiotsdk identity client."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest
from awscrt import mqtt
from awsiot import iotidentity
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import (
    Emulator,
    assert_claim_cannot_take_client_id,
    connect,
    key_pem,
    make_csr,
    provision_csr,
    raw_claim,
    write_identity,
)

CSR_TOPIC = "$aws/certificates/create-from-csr/json"
REFUSED = r"(?i)refused|not.?authori|closed|protocol|tls|handshake|negotiation"


def _csr_request() -> bytes:
    return json.dumps({"certificateSigningRequest": make_csr()[0]}).encode()


def test_reply_goes_only_to_the_requesting_connection(emulator: Emulator) -> None:
    asker, bystander = raw_claim(emulator, "isolation-asker"), raw_claim(emulator, "isolation-bystander")
    try:
        bystander.subscribe(f"{CSR_TOPIC}/accepted")
        bystander.subscribe("$aws/certificates/create-from-csr/+/accepted")
        topic, reply = asker.request(CSR_TOPIC, _csr_request())
        assert topic == f"{CSR_TOPIC}/accepted"
        assert set(reply) == {"certificateOwnershipToken", "certificateId", "certificatePem"}
        assert bystander.no_message(wait=1.5)
    finally:
        asker.close()
        bystander.close()


def test_no_reply_without_subscription(emulator: Emulator) -> None:
    client = raw_claim(emulator, "unsubscribed")
    try:
        client.publish(CSR_TOPIC, _csr_request()).result(10)
        assert client.no_message(wait=1.5)
        topic, _ = client.request(CSR_TOPIC, _csr_request())
        assert topic.endswith("/accepted")
    finally:
        client.close()


def test_cbor_payload_format(emulator: Emulator) -> None:
    client = raw_claim(emulator, "cbor-device")
    try:
        csr, _ = make_csr()
        topic, created = client.request(
            "$aws/certificates/create-from-csr/cbor", cbor2.dumps({"certificateSigningRequest": csr})
        )
        assert topic == "$aws/certificates/create-from-csr/cbor/accepted"
        topic, registered = client.request(
            "$aws/provisioning-templates/fleetprov-demo/provision/cbor",
            cbor2.dumps(
                {
                    "certificateOwnershipToken": created["certificateOwnershipToken"],
                    "parameters": {"SerialNumber": "cbor-1"},
                }
            ),
        )
        assert topic == "$aws/provisioning-templates/fleetprov-demo/provision/cbor/accepted"
        assert registered["thingName"] == "fleetprov-cbor-1"
        topic, keys = client.request("$aws/certificates/create/cbor", b"")
        assert topic.endswith("/accepted") and "privateKey" in keys
    finally:
        client.close()


@pytest.mark.parametrize(
    ("action", "topic"),
    [
        ("publish", "devices/anything/telemetry"),
        ("publish", "$aws/things/claim/shadow/update"),
        ("publish", f"{CSR_TOPIC}/accepted"),  # a client must not forge replies
        ("subscribe", "devices/#"),
        ("subscribe", "$aws/things/claim/shadow/update/accepted"),
    ],
)
def test_claim_policy_closes_the_connection(emulator: Emulator, action: str, topic: str) -> None:
    client = raw_claim(emulator, f"claim-policy-{action}-{abs(hash(topic))}")
    try:
        if action == "publish":
            client.publish(topic, b"{}")
        else:
            client.connection.subscribe(topic, mqtt.QoS.AT_LEAST_ONCE)
        assert client.interrupted.wait(20), f"connection stayed open after {action} on {topic}"
    finally:
        client.close()


def test_claim_restricted_to_listed_templates(emulator_with: Any, tmp_path: Path) -> None:
    config = tmp_path / "emulator.yaml"
    config.write_text("claim_templates: [fleetprov-demo]\n")
    emulator = emulator_with("--config", str(config))
    client = raw_claim(emulator, "restricted")
    try:
        topic, _ = client.request(CSR_TOPIC, _csr_request())
        assert topic.endswith("/accepted")
        client.publish("$aws/provisioning-templates/other/provision/json", b"{}")
        assert client.interrupted.wait(20)
    finally:
        client.close()


def test_certificate_status_controls_connections(emulator: Emulator, tmp_path: Path) -> None:
    reply, pem, key, certificate_id = provision_csr(emulator, "status-claim", {"SerialNumber": "status-1"})
    cert, key_path = write_identity(tmp_path, pem, key_pem(key))
    for status in ("INACTIVE", "REVOKED"):
        emulator.admin("set-certificate-status", certificate_id, status)
        with pytest.raises(Exception, match=REFUSED):
            connect(emulator, cert, key_path, reply.thing_name)
    emulator.admin("set-certificate-status", certificate_id, "ACTIVE")
    connect(emulator, cert, key_path, reply.thing_name).disconnect().result(10)


def test_unregistered_certificate_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    """A certificate the emulator's CA never issued fails the TLS handshake."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = dt.datetime.now(dt.timezone.utc)
    self_signed = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert, key_path = write_identity(
        tmp_path, self_signed.public_bytes(serialization.Encoding.PEM).decode(), key_pem(key)
    )
    with pytest.raises(Exception, match=REFUSED):
        connect(emulator, cert, key_path, "intruder")


def test_the_claim_cannot_take_a_devices_client_id(emulator: Emulator, tmp_path: Path) -> None:
    reply, pem, key, _ = provision_csr(emulator, "takeover", {"SerialNumber": "takeover-1"})
    cert, key_path = write_identity(tmp_path, pem, key_pem(key))
    assert_claim_cannot_take_client_id(emulator, cert, key_path, reply.thing_name)


def test_same_client_id_closes_the_older_connection(emulator: Emulator) -> None:
    first = raw_claim(emulator, "twin")
    second = raw_claim(emulator, "twin")
    try:
        assert first.interrupted.wait(20)
        topic, _ = second.request(CSR_TOPIC, _csr_request())
        assert topic.endswith("/accepted")
    finally:
        first.close()
        second.close()


def test_v1_identity_client(emulator: Emulator) -> None:
    """The original callback-based IotIdentityClient works against the emulator too."""
    client = raw_claim(emulator, "v1-client")
    identity = iotidentity.IotIdentityClient(client.connection)
    done = threading.Event()
    results: dict[str, Any] = {}

    def on_created(response: iotidentity.CreateCertificateFromCsrResponse) -> None:
        results["created"] = response
        done.set()

    def on_registered(response: iotidentity.RegisterThingResponse) -> None:
        results["registered"] = response
        done.set()

    try:
        qos = mqtt.QoS.AT_LEAST_ONCE
        request = iotidentity.CreateCertificateFromCsrSubscriptionRequest()
        identity.subscribe_to_create_certificate_from_csr_accepted(request, qos, on_created)[0].result(10)
        identity.subscribe_to_create_certificate_from_csr_rejected(request, qos, print)[0].result(10)
        identity.publish_create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=make_csr()[0]), qos
        ).result(10)
        assert done.wait(20)
        done.clear()
        register = iotidentity.RegisterThingSubscriptionRequest(template_name="fleetprov-demo")
        identity.subscribe_to_register_thing_accepted(register, qos, on_registered)[0].result(10)
        identity.subscribe_to_register_thing_rejected(register, qos, print)[0].result(10)
        identity.publish_register_thing(
            iotidentity.RegisterThingRequest(
                template_name="fleetprov-demo",
                certificate_ownership_token=results["created"].certificate_ownership_token,
                parameters={"SerialNumber": "v1"},
            ),
            qos,
        ).result(10)
        assert done.wait(20)
    finally:
        client.close()
    assert results["registered"].thing_name == "fleetprov-v1"
    assert results["registered"].device_configuration["telemetryTopic"] == "devices/fleetprov-v1/telemetry"


def test_issued_certificate_verifies_with_openssl_and_works_with_mosquitto(emulator: Emulator, tmp_path: Path) -> None:
    reply, pem, key, _ = provision_csr(emulator, "openssl-claim", {"SerialNumber": "mosq-1"})
    cert, key_path = write_identity(tmp_path, pem, key_pem(key))
    issuing = emulator.root_ca.parent / "issuing-ca.pem"
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(emulator.root_ca), "-untrusted", str(issuing), str(cert)],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stdout + verified.stderr

    # Debian's mosquitto_pub publishes at QoS 1 with the issued identity: exit 0 means CONNACK accepted and
    # PUBACK received (a publish the policy denies closes the connection instead). Under another client id
    # the device policy refuses the connection.
    topic = reply.device_configuration["telemetryTopic"]
    published = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(emulator.port), "--cafile", str(emulator.root_ca),
         "--cert", str(cert), "--key", str(key_path), "-i", reply.thing_name, "-q", "1", "-t", topic,
         "-m", "hello from mosquitto"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    refused = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(emulator.port), "--cafile", str(emulator.root_ca),
         "--cert", str(cert), "--key", str(key_path), "-i", "not-the-thing", "-q", "1", "-t", topic, "-m", "x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0
