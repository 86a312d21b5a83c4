"""Fault knobs, token expiry and hostile input: the emulator answers clearly, closes what it must, and keeps
serving everybody else."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from fleetprov.emulator.mqtt_limits import MAX_PAYLOAD_BYTES
from tests.support import Emulator, make_csr, provision_csr, raw_claim

CSR_TOPIC = "$aws/certificates/create-from-csr/json"
REGISTER_TOPIC = "$aws/provisioning-templates/fleetprov-demo/provision/json"


def _csr_request() -> bytes:
    return json.dumps({"certificateSigningRequest": make_csr()[0]}).encode()


def test_ownership_token_expires_and_unused_certificate_is_deleted(emulator_with: Any) -> None:
    emulator = emulator_with("--token-ttl", "1")
    client = raw_claim(emulator, "slow-device")
    try:
        _, created = client.request(CSR_TOPIC, _csr_request())
        certificate_id = created["certificateId"]
        time.sleep(1.5)
        topic, reply = client.request(
            REGISTER_TOPIC,
            json.dumps(
                {"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": "x"}}
            ).encode(),
        )
    finally:
        client.close()
    assert topic.endswith("/rejected")
    assert (reply["statusCode"], reply["errorCode"]) == (400, "InvalidCertificateOwnershipToken")
    assert "expired" in reply["errorMessage"]
    deadline = time.monotonic() + 20
    while any(c["certificateId"] == certificate_id for c in emulator.admin("certificates")):
        assert time.monotonic() < deadline, "expired PENDING_ACTIVATION certificate was not deleted"
        time.sleep(0.5)


def test_throttling_rejects_with_429(emulator_with: Any) -> None:
    emulator = emulator_with("--throttle", "2")
    client = raw_claim(emulator, "eager-device")
    try:
        for suffix in ("accepted", "rejected"):
            client.subscribe(f"{CSR_TOPIC}/{suffix}")
        for _ in range(6):
            client.publish(CSR_TOPIC, _csr_request())
        replies = [client.next_message() for _ in range(6)]
    finally:
        client.close()
    rejected = [json.loads(body) for topic, body in replies if topic.endswith("/rejected")]
    assert 1 <= len(rejected) <= 4
    assert all((r["statusCode"], r["errorCode"]) == (429, "ThrottlingException") for r in rejected)


def test_forced_rejections_then_success_with_the_same_token(emulator_with: Any) -> None:
    emulator = emulator_with("--reject", "RegisterThing:2:503:ServiceUnavailable")
    client = raw_claim(emulator, "retrying-device")
    try:
        _, created = client.request(CSR_TOPIC, _csr_request())
        request = json.dumps(
            {"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": "r1"}}
        ).encode()
        outcomes = [client.request(REGISTER_TOPIC, request) for _ in range(3)]
    finally:
        client.close()
    assert [topic.rsplit("/", 1)[1] for topic, _ in outcomes] == ["rejected", "rejected", "accepted"]
    assert outcomes[0][1]["statusCode"] == 503 and outcomes[0][1]["errorCode"] == "ServiceUnavailable"
    assert outcomes[2][1]["thingName"] == "fleetprov-r1"


def test_reply_delay(emulator_with: Any) -> None:
    emulator = emulator_with("--reply-delay", "1.5")
    client = raw_claim(emulator, "patient-device")
    try:
        started = time.monotonic()
        topic, _ = client.request(CSR_TOPIC, _csr_request())
        assert time.monotonic() - started >= 1.5
        assert topic.endswith("/accepted")
    finally:
        client.close()


def test_close_after_messages(emulator_with: Any) -> None:
    emulator = emulator_with("--close-after", "1")
    client = raw_claim(emulator, "cut-off-device")
    try:
        topic, _ = client.request(CSR_TOPIC, _csr_request())
        assert topic.endswith("/accepted")
        client.publish(CSR_TOPIC, _csr_request())
        assert client.interrupted.wait(20)
    finally:
        client.close()


def test_hostile_input_gets_clear_answers_while_others_are_served(emulator: Emulator) -> None:
    """Malformed, mistyped and oversized requests are rejected one by one; a well-behaved device provisions
    at the same time, and the emulator is still up afterwards."""
    served: dict[str, Any] = {}

    def good_device() -> None:
        reply, *_ = provision_csr(emulator, "bystander-device", {"SerialNumber": "steady"})
        served["thing"] = reply.thing_name

    bystander = threading.Thread(target=good_device)
    bystander.start()
    client = raw_claim(emulator, "hostile-device")
    cases = [
        (CSR_TOPIC, b"{not json", "InvalidPayload"),
        (CSR_TOPIC, b"\xff\xfe\x00garbage", "InvalidPayload"),
        (CSR_TOPIC, b"[1, 2, 3]", "InvalidPayload"),
        (CSR_TOPIC, json.dumps({"certificateSigningRequest": 42}).encode(), "InvalidPayload"),
        (CSR_TOPIC, json.dumps({"certificateSigningRequest": "x" * 100}).encode(), "InvalidCertificateSigningRequest"),
        # Over AWS's 128 KB, yet a packet the broker reads (a larger one closes the connection: test_emulator_abuse)
        (CSR_TOPIC, b'{"certificateSigningRequest": "' + b"A" * MAX_PAYLOAD_BYTES + b'"}', "InvalidPayload"),
        (REGISTER_TOPIC, json.dumps({"certificateOwnershipToken": 7}).encode(), "InvalidCertificateOwnershipToken"),
        (REGISTER_TOPIC, json.dumps({"certificateOwnershipToken": "t", "parameters": []}).encode(), None),
        ("$aws/certificates/create-from-csr/cbor", b"\x9f\x9f\x9f", "InvalidPayload"),
    ]
    try:
        for topic, payload, error_code in cases:
            reply_topic, reply = client.request(topic, payload)
            assert reply_topic.endswith("/rejected"), (topic, payload[:40])
            assert isinstance(reply["statusCode"], int) and reply["statusCode"] == 400
            assert isinstance(reply["errorMessage"], str) and reply["errorMessage"]
            if error_code:
                assert reply["errorCode"] == error_code, reply
        client.publish("$aws/no/such/api", b"{}")
        assert client.interrupted.wait(20)
    finally:
        client.close()
        bystander.join(60)
    assert served["thing"] == "fleetprov-steady"
    assert emulator.process.poll() is None
    reply, *_ = provision_csr(emulator, "after-the-storm", {"SerialNumber": "after"})
    assert reply.thing_name == "fleetprov-after"
