"""Fleet provisioning by claim, end to end, with the unmodified awsiotsdk clients over real mutual TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

from awsiot import iotidentity

from tests.support import (
    Emulator,
    connect,
    connect_claim,
    identity_v2,
    key_pem,
    provision_csr,
    write_identity,
)


def test_csr_flow_registers_thing_and_new_certificate_connects(emulator: Emulator, tmp_path: Path) -> None:
    reply, certificate_pem, key, certificate_id = provision_csr(
        emulator, "factory-device-0001", {"SerialNumber": "0001", "DeviceLocation": "field"}
    )

    assert reply.thing_name == "fleetprov-0001"
    assert reply.device_configuration == {
        "telemetryTopic": "devices/fleetprov-0001/telemetry",
        "site": "remote",
    }
    [thing] = [t for t in emulator.admin("things") if t["thingName"] == "fleetprov-0001"]
    assert thing["attributes"] == {"serialNumber": "0001", "location": "field"}
    assert thing["principals"] == [certificate_id]
    [cert] = [c for c in emulator.admin("certificates") if c["certificateId"] == certificate_id]
    assert cert["status"] == "ACTIVE"

    cert_path, key_path = write_identity(tmp_path / "device", certificate_pem, key_pem(key))
    connection = connect(emulator, cert_path, key_path, "fleetprov-0001")
    connection.disconnect().result(10)


def test_create_keys_and_certificate_flow(emulator: Emulator, tmp_path: Path) -> None:
    connection = connect_claim(emulator, "factory-device-0002")
    try:
        client = identity_v2(connection)
        created = client.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()).result(20)
        assert "BEGIN PRIVATE KEY" in created.private_key or "BEGIN RSA PRIVATE KEY" in created.private_key
        registered = client.register_thing(
            iotidentity.RegisterThingRequest(
                template_name="fleetprov-demo",
                certificate_ownership_token=created.certificate_ownership_token,
                parameters={"SerialNumber": "0002"},
            )
        ).result(20)
    finally:
        connection.disconnect().result(10)
    assert registered.thing_name == "fleetprov-0002"
    cert_path, key_path = write_identity(tmp_path / "device", created.certificate_pem, created.private_key.encode())
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert_path), "-noout", "-text"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "rsaEncryption" in text and "2048 bit" in text
    device = connect(emulator, cert_path, key_path, "fleetprov-0002")
    device.disconnect().result(10)
