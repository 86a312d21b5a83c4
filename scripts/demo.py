"""`make demo`: start the local emulator, provision one simulated device through it end to end, reconnect with
the new identity, stop the emulator. Offline; everything lives in a temporary directory unless --keep DIR.

Until `fleetprov --once` exists (see the issues), the device side here is the unmodified awsiotsdk clients.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from awscrt import mqtt, mqtt_request_response
from awsiot import iotidentity, mqtt_connection_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TIMEOUT = 30


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def start_emulator(state_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetprov", "emulator", "serve", "--state-dir", str(state_dir), "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = state_dir / "endpoint.json"
    deadline = time.monotonic() + 60
    while not endpoint.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"emulator did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return process, json.loads(endpoint.read_text())


def connect(port: int, root_ca: str, cert: str, key: str, client_id: str) -> mqtt.Connection:
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost",
        port=port,
        cert_filepath=cert,
        pri_key_filepath=key,
        ca_filepath=root_ca,
        client_id=client_id,
        clean_session=True,
        keep_alive_secs=30,
    )
    connection.connect().result(TIMEOUT)
    return connection


def provision(endpoint: dict[str, Any], device_dir: Path, serial: str) -> tuple[str, str]:
    port = int(endpoint["port"])
    root_ca = str(endpoint["root_ca"])
    step(f"connect with the claim certificate to localhost:{port} (mutual TLS, MQTT 3.1.1)")
    claim = connect(
        port, root_ca, str(endpoint["claim_certificate"]), str(endpoint["claim_private_key"]), f"claim-{serial}"
    )
    client = iotidentity.IotIdentityClientV2(
        claim, mqtt_request_response.ClientOptions(2, 2, operation_timeout_in_seconds=TIMEOUT)
    )
    step("generate an EC P-256 key on the device and call CreateCertificateFromCsr")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
        .sign(key, hashes.SHA256())
    )
    created = client.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(
            certificate_signing_request=csr.public_bytes(serialization.Encoding.PEM).decode()
        )
    ).result(TIMEOUT)
    print(f"    certificate id {created.certificate_id}")
    template = str(endpoint["templates"][0])
    step(f"call RegisterThing with template {template}")
    registered = client.register_thing(
        iotidentity.RegisterThingRequest(
            template_name=template,
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"SerialNumber": serial},
        )
    ).result(TIMEOUT)
    claim.disconnect().result(TIMEOUT)
    print(f"    thing {registered.thing_name}, device configuration {registered.device_configuration}")

    device_dir.mkdir(mode=0o700, parents=True)
    key_path = device_dir / "private.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    (device_dir / "certificate.pem").write_text(created.certificate_pem)
    step(f"stored the permanent identity in {device_dir}")

    step("reconnect with the new certificate and publish one telemetry message")
    device = connect(port, root_ca, str(device_dir / "certificate.pem"), str(key_path), registered.thing_name)
    topic = registered.device_configuration["telemetryTopic"]
    publish, _ = device.publish(topic, b'{"hello": "fleetprov"}', mqtt.QoS.AT_LEAST_ONCE)
    publish.result(TIMEOUT)
    device.disconnect().result(TIMEOUT)
    return registered.thing_name, created.certificate_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="keep the emulator state and device files in this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetprov-demo-") as tmp:
        work = args.keep or Path(tmp)
        state_dir = work / "emulator"
        step(f"start the local AWS IoT emulator (state in {state_dir})")
        process, endpoint = start_emulator(state_dir, work / "emulator.log")
        try:
            thing, certificate_id = provision(endpoint, work / f"device-{int(time.time())}", serial="demo-0001")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(TIMEOUT)
        step("stopped the emulator")
        print(f"\nProvisioned thing {thing} with certificate {certificate_id}.")
        print(f"Files: {work}{'' if args.keep else ' (temporary; pass --keep DIR to keep them)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
