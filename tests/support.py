"""Test support: run `fleetprov emulator serve` as a real process and talk to it with the unmodified
awsiotsdk clients over real mutual TLS on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import cbor2
from awscrt import mqtt, mqtt_request_response
from awscrt.exceptions import AwsCrtError
from awsiot import V2ServiceException, iotidentity, mqtt_connection_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetprov.emulator.launch import RunningEmulator, launch
from fleetprov.errors import EmulatorError
from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX

ENDPOINT_WAIT_SECONDS = 60
CONNECT_TIMEOUT = 30


@dataclass
class Emulator:
    state_dir: Path
    process: subprocess.Popen[bytes]
    host: str
    port: int
    root_ca: Path
    claim_cert: Path
    claim_key: Path
    claim_certificate_id: str
    templates: list[str]
    log_path: Path
    running: RunningEmulator

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "fleetprov", "emulator", *args, "--state-dir", str(self.state_dir)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out) if out.strip() else None

    def stop(self) -> int:
        return self.running.stop()


def start_emulator(state_dir: Path, *extra: str) -> Emulator:
    log_path = state_dir.parent / f"{state_dir.name}.log"
    try:
        running = launch(state_dir, *extra, log_path=log_path, wait=ENDPOINT_WAIT_SECONDS)
    except EmulatorError as exc:
        raise AssertionError(f"{exc}:\n{log_path.read_text()}") from exc
    info = running.endpoint
    return Emulator(
        state_dir=state_dir,
        process=running.process,
        host=info["host"],
        port=info["port"],
        root_ca=Path(info["root_ca"]),
        claim_cert=Path(info["claim_certificate"]),
        claim_key=Path(info["claim_private_key"]),
        claim_certificate_id=info["claim_certificate_id"],
        templates=info["templates"],
        log_path=log_path,
        running=running,
    )


def connect(
    emulator: Emulator,
    cert: Path,
    key: Path,
    client_id: str,
    on_interrupted: Optional[Any] = None,
) -> mqtt.Connection:
    """An MQTT 3.1.1 connection with the awsiotsdk builder, as a device would make it."""
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost",
        port=emulator.port,
        cert_filepath=str(cert),
        pri_key_filepath=str(key),
        ca_filepath=str(emulator.root_ca),
        client_id=client_id,
        clean_session=True,
        keep_alive_secs=30,
        on_connection_interrupted=on_interrupted,
    )
    connection.connect().result(CONNECT_TIMEOUT)
    return connection


def assert_claim_cannot_take_client_id(emulator: Emulator, device_cert: Path, device_key: Path, thing: str) -> None:
    """A provisioned device is connected as its thing name; the fleet's claim (its key is on every device) connects
    with the same client id. The shipped claim policies refuse that connection, so the broker keeps the device
    (AWS drops the older of two connections with one client id)."""
    lost = threading.Event()
    device = connect(emulator, device_cert, device_key, thing, on_interrupted=lambda *_, **__: lost.set())
    try:
        try:
            intruder = connect(emulator, emulator.claim_cert, emulator.claim_key, thing)
        except AwsCrtError:
            pass  # refused: what the policy must do
        else:
            intruder.disconnect().result(10)
            raise AssertionError(f"the claim certificate connected as {thing!r}, a provisioned device's client id")
        assert f"refusing connection {thing!r}: certificate {emulator.claim_certificate_id[:12]}" in emulator.log()
        # Still connected: a QoS 1 publish on the device's own topic gets its PUBACK.
        published, _ = device.publish(f"devices/{thing}/telemetry", b"{}", mqtt.QoS.AT_LEAST_ONCE)
        published.result(CONNECT_TIMEOUT)
        assert not lost.is_set(), "the device lost its connection to the claim's attempt"
    finally:
        device.disconnect().result(10)


def connect_claim(emulator: Emulator, client_id: str) -> mqtt.Connection:
    """A claim connection as fleetprov makes one: its client id has the claim prefix the claim policy allows."""
    return connect(emulator, emulator.claim_cert, emulator.claim_key, CLAIM_CLIENT_ID_PREFIX + client_id)


def identity_v2(connection: mqtt.Connection, timeout: int = 20) -> iotidentity.IotIdentityClientV2:
    options = mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2,
        max_streaming_subscriptions=2,
        operation_timeout_in_seconds=timeout,
    )
    return iotidentity.IotIdentityClientV2(connection, options)


def make_csr(key: Optional[Any] = None) -> tuple[str, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_identity(directory: Path, certificate_pem: str, private_key_pem: bytes) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "certificate.pem", directory / "private.key"
    cert.write_text(certificate_pem)
    key.write_bytes(private_key_pem)
    os.chmod(key, 0o600)
    return cert, key


def rejection(future: Future[Any], timeout: float = 20) -> iotidentity.V2ErrorResponse:
    """The modeled error of a V2 operation that must fail with a /rejected reply."""
    try:
        result = future.result(timeout)
    except V2ServiceException as exc:
        assert exc.modeled_error is not None, f"failed without a rejected reply: {exc.message} {exc.inner_error}"
        return exc.modeled_error
    raise AssertionError(f"expected a rejection, got {result}")


def register(emulator: Emulator, template: str, parameters: dict[str, str], client_id: str) -> dict[str, Any]:
    """Create a certificate from a CSR and register it; returns what happened, accepted or rejected."""
    connection = connect_claim(emulator, client_id)
    try:
        client = identity_v2(connection)
        csr, key = make_csr()
        created = client.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)
        ).result(20)
        future = client.register_thing(
            iotidentity.RegisterThingRequest(
                template_name=template,
                certificate_ownership_token=created.certificate_ownership_token,
                parameters=parameters,
            )
        )
        try:
            reply = future.result(30)
        except V2ServiceException as exc:
            error = exc.modeled_error
            assert error is not None, f"no rejected reply: {exc.message} {exc.inner_error}"
            return {"rejected": (error.status_code, error.error_code, error.error_message)}
        return {
            "thing": reply.thing_name,
            "config": reply.device_configuration,
            "certificate_id": created.certificate_id,
            "certificate_pem": created.certificate_pem,
            "key": key,
        }
    finally:
        connection.disconnect().result(10)


@dataclass(frozen=True)
class Registered:
    thing_name: str
    device_configuration: dict[str, str]


def provision_csr(
    emulator: Emulator,
    client_id: str,
    parameters: dict[str, str],
    template: str = "fleetprov-demo",
) -> tuple[Registered, str, Any, str]:
    """Claim connection, CreateCertificateFromCsr, RegisterThing that must be accepted.

    Returns (registration, certificate PEM, private key, certificate id)."""
    result = register(emulator, template, parameters, client_id)
    assert "rejected" not in result, result["rejected"]
    registered = Registered(result["thing"], result["config"])
    return registered, result["certificate_pem"], result["key"], result["certificate_id"]


class RawClient:
    """A device connection used at the MQTT level: publish any bytes, watch every message and the link."""

    def __init__(self, emulator: Emulator, cert: Path, key: Path, client_id: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.interrupted = threading.Event()
        self.connection = connect(emulator, cert, key, client_id, on_interrupted=self._on_interrupted)

    def _on_interrupted(self, connection: mqtt.Connection, error: Exception, **kwargs: Any) -> None:
        self.interrupted.set()

    def _on_message(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        self.messages.put((topic, payload))

    def subscribe(self, topic: str) -> int:
        future, _ = self.connection.subscribe(topic, mqtt.QoS.AT_LEAST_ONCE, callback=self._on_message)
        result: dict[str, Any] = future.result(CONNECT_TIMEOUT)
        return int(result["qos"] if result["qos"] is not None else 128)

    def publish(self, topic: str, payload: bytes) -> Future[Any]:
        future, _ = self.connection.publish(topic, payload, mqtt.QoS.AT_LEAST_ONCE)
        return future

    def next_message(self, timeout: float = 20) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def no_message(self, wait: float = 1.0) -> bool:
        try:
            self.messages.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def request(self, topic: str, payload: bytes, timeout: float = 20) -> tuple[str, dict[str, Any]]:
        """Publish one API request and return (reply topic, decoded reply); subscribes to both replies first."""
        payload_format = topic.rsplit("/", 1)[1]
        for suffix in ("accepted", "rejected"):
            self.subscribe(f"{topic}/{suffix}")
        self.publish(topic, payload).result(timeout)
        reply_topic, body = self.next_message(timeout)
        decoded = cbor2.loads(body) if payload_format == "cbor" else json.loads(body)
        return reply_topic, decoded

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone: closing is best effort
            self.connection.disconnect().result(10)


def raw_claim(emulator: Emulator, client_id: str) -> RawClient:
    return RawClient(emulator, emulator.claim_cert, emulator.claim_key, CLAIM_CLIENT_ID_PREFIX + client_id)


def fleetprov(
    *args: str, timeout: float = 120, env: Optional[dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    """Run the fleetprov command as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "fleetprov", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def device_config(emulator: Emulator, directory: Path, *options: str) -> Path:
    """A device configuration for this emulator, from `fleetprov emulator device-config`."""
    directory.mkdir(parents=True, exist_ok=True)
    result = fleetprov(
        "emulator", "device-config", "--state-dir", str(emulator.state_dir),
        "--state-dir-for-device", str(directory / "state"), *options,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = directory / "config.yaml"
    path.write_text(result.stdout)
    return path


def remaining_length(length: int) -> bytes:
    """MQTT's Remaining Length field for ``length`` (a fixed header's second part), for raw-packet tests."""
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(encoded)
