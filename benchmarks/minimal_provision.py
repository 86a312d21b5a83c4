"""The baseline of benchmarks/provision_latency.py: fleet provisioning by claim with nothing but awsiotsdk.

The same exchanges as ``fleetprov --once`` on a fresh device, from the same device config YAML (as printed by
``fleetprov emulator device-config``): connect with the claim certificate (MQTT 3.1.1, mutual TLS),
generate an EC P-256 key and CSR, CreateCertificateFromCsr, RegisterThing (same template, same static
parameters), write the certificate and key to ``<state_dir>/certificate.pem`` and ``private.key`` (plain
writes), disconnect, connect again with the new certificate (client id = thing name) and disconnect.

Deliberately minimal: no retries, no checks, no atomic writes, no logging. Not for real devices.

Run::

    .venv/bin/python benchmarks/minimal_provision.py device-config.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from awscrt import mqtt, mqtt_request_response
from awsiot import iotidentity, mqtt_connection_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TIMEOUT = 30  # seconds per operation, as fleetprov's default operation_timeout


def connect(config: dict, certificate: str, private_key: str, client_id: str) -> mqtt.Connection:
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=config["endpoint"],
        port=int(config["port"]),
        cert_filepath=certificate,
        pri_key_filepath=private_key,
        ca_filepath=config["root_ca"],
        client_id=client_id,
        clean_session=True,
        keep_alive_secs=int(config.get("keep_alive", 60)),
    )
    connection.connect().result(TIMEOUT)
    return connection


def main(config_path: str) -> int:
    config = yaml.safe_load(Path(config_path).read_text())
    provisioning = config["provisioning"]
    parameters = dict(provisioning["parameters"]["static"])
    state_dir = Path(config["state_dir"])
    client_id = f"claim-{parameters.get('SerialNumber', 'device')}"

    claim = connect(config, config["claim"]["certificate"], config["claim"]["private_key"], client_id)
    identity = iotidentity.IotIdentityClientV2(
        claim,
        mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2, max_streaming_subscriptions=1, operation_timeout_in_seconds=TIMEOUT
        ),
    )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
        .sign(key, hashes.SHA256())
    )
    created = identity.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(
            certificate_signing_request=csr.public_bytes(serialization.Encoding.PEM).decode()
        )
    ).result(TIMEOUT)
    registered = identity.register_thing(
        iotidentity.RegisterThingRequest(
            template_name=provisioning["template"],
            certificate_ownership_token=created.certificate_ownership_token,
            parameters=parameters,
        )
    ).result(TIMEOUT)

    state_dir.mkdir(parents=True, exist_ok=True)
    certificate_path = state_dir / "certificate.pem"
    key_path = state_dir / "private.key"
    certificate_path.write_text(created.certificate_pem)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    claim.disconnect().result(TIMEOUT)

    device = connect(config, str(certificate_path), str(key_path), registered.thing_name)
    device.disconnect().result(TIMEOUT)
    print(f"provisioned: thing {registered.thing_name}, certificate {created.certificate_id}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DEVICE_CONFIG_YAML")
    sys.exit(main(sys.argv[1]))
