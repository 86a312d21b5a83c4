"""`fleetprov --once` over the transports a device may need: MQTT 5 (through Debian's mosquitto), an HTTP
CONNECT proxy (Debian's tinyproxy), and port 443 with ALPN x-amzn-mqtt-ca. Each test proves that the
transport was really used, from the other side's log."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.integration.test_once import _check_stored_identity
from tests.integration.transports import (
    Mqtt5Broker,
    TinyProxy,
    edit_config,
    free_port,
    mqtt5_broker,  # noqa: F401 -- fixture
    openssl_alpn,
    require_free_port_443,
    tinyproxy,  # noqa: F401 -- fixture
)
from tests.support import Emulator, device_config, fleetprov

STEPS = ("connect", "create-certificate", "check-certificate", "register-thing", "store", "verify")


def _assert_provisioned(result: Any, thing: str, context: str = "") -> None:
    details = f"exit {result.returncode}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}\n{context}"
    assert result.returncode == 0, details
    assert f"thing {thing}" in result.stdout, details
    for step in STEPS:
        assert f"{step}: ok" in result.stderr, details


def test_mqtt5_through_mosquitto(mqtt5_broker: Mqtt5Broker, tmp_path: Path) -> None:  # noqa: F811
    emulator = mqtt5_broker.emulator
    config = device_config(emulator, tmp_path / "device", "--protocol", "5", "--serial", "mqtt5")
    settings = edit_config(config, port=mqtt5_broker.port)
    assert settings["mqtt_version"] == 5

    result = fleetprov("--once", "--config", str(config))
    _assert_provisioned(result, "fleetprov-mqtt5", mqtt5_broker.logs())

    manifest = _check_stored_identity(emulator, tmp_path / "device" / "state")
    assert manifest["thing_name"] == "fleetprov-mqtt5"
    # The responder answered from the emulator's registry: the thing and its ACTIVE certificate are there.
    [cert] = [c for c in emulator.admin("certificates") if c["certificateId"] == manifest["certificate_id"]]
    assert cert["status"] == "ACTIVE" and cert["things"] == ["fleetprov-mqtt5"], cert
    responder = mqtt5_broker.responder.log()
    assert "CreateCertificateFromCsr on $aws/certificates/create-from-csr/json -> " in responder, responder
    assert "RegisterThing on $aws/provisioning-templates/fleetprov-demo/provision/json -> " in responder, responder

    # mosquitto saw the device speak MQTT 5 (protocol level p5) twice: the claim session, then the verifying
    # reconnect with the new certificate and the thing name as client id. The responder speaks MQTT 3.1.1 (p2).
    log = mqtt5_broker.mosquitto.log()
    device_connects = [
        line for line in log.splitlines() if "New client connected" in line and "fleetprov-test-responder" not in line
    ]
    assert len(device_connects) == 2, log
    assert all("(p5, c1, " in line for line in device_connects), log
    assert " as fleetprov-mqtt5 (p5, c1, " in device_connects[1], log
    # ... and never the emulator's own broker.
    assert "connected:" not in emulator.log(), emulator.log()


def test_once_through_http_proxy(emulator: Emulator, tinyproxy: TinyProxy, tmp_path: Path) -> None:  # noqa: F811
    config = device_config(emulator, tmp_path, "--serial", "proxied")
    edit_config(config, proxy={"host": "127.0.0.1", "port": tinyproxy.port})

    result = fleetprov("--once", "--config", str(config))
    _assert_provisioned(result, "fleetprov-proxied", tinyproxy.logs())
    manifest = _check_stored_identity(emulator, tmp_path / "state")
    assert manifest["thing_name"] == "fleetprov-proxied"

    # Both connections (claim, then the verifying one) were tunnelled: tinyproxy logged a CONNECT each time.
    log = tinyproxy.log()
    connects = re.findall(rf"Request \(file descriptor \d+\): CONNECT localhost:{emulator.port} HTTP/1\.[01]", log)
    assert len(connects) == 2, tinyproxy.logs()


def test_proxy_that_is_down(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path, "--serial", "no-proxy")
    port = free_port()
    edit_config(config, proxy={"host": "127.0.0.1", "port": port}, retry={"initial_delay": 0.1, "budget": 1})

    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 75, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert f"connect: cannot connect to localhost:{emulator.port} via HTTP proxy 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    state = tmp_path / "state"
    assert not (state / "current").exists() and not list(state.glob("generations/*"))


def test_port_443_with_alpn(emulator_with: Any, tmp_path: Path) -> None:
    require_free_port_443()
    emulator = emulator_with("--port", "443")
    assert emulator.port == 443, emulator.log()

    # The emulator answers ALPN x-amzn-mqtt-ca, as AWS IoT Core does on 443.
    handshake = openssl_alpn(emulator, emulator.claim_cert, emulator.claim_key, "x-amzn-mqtt-ca")
    assert "ALPN protocol: x-amzn-mqtt-ca" in handshake.stdout, handshake.stdout + handshake.stderr
    assert "Verify return code: 0 (ok)" in handshake.stdout, handshake.stdout

    config = device_config(emulator, tmp_path, "--serial", "alpn")
    settings = edit_config(config, port=443)
    assert settings["endpoint"] == "localhost"
    result = fleetprov("--once", "--config", str(config))
    _assert_provisioned(result, "fleetprov-alpn", f"--- emulator log:\n{emulator.log()}")
    manifest = _check_stored_identity(emulator, tmp_path / "state")
    assert manifest["thing_name"] == "fleetprov-alpn"

    # On 443 the emulator refuses MQTT without ALPN x-amzn-mqtt-ca; it logs what each connection negotiated.
    connected = [line for line in emulator.log().splitlines() if " connected: " in line]
    assert len(connected) == 2, emulator.log()
    assert all(line.endswith("TLS ALPN x-amzn-mqtt-ca") for line in connected), emulator.log()
    assert "client 'fleetprov-alpn' connected: device certificate" in connected[1], emulator.log()
