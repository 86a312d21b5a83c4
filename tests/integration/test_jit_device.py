"""fleetprov with jit: (JITP and JITR) end to end: a device certificate signed by the customer's CA, registered by
the emulator at the first connection (`fleetprov emulator register-ca`), waited for, committed, and held by the
daemon. Real `fleetprov` processes against the emulator over mutual TLS."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetprov import factory
from tests.agentprocess import manifest_of
from tests.softhsm import make_token
from tests.support import Emulator, device_config, fleetprov

FAST = {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1}
RETRY = {"initial_delay": 0.2, "max_delay": 1}

JITP_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "configs" / "aws" / "jitp-template.json"

DEVICE_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}


def _customer_ca(directory: Path) -> tuple[Path, Path]:
    """A customer CA made with openssl, as seed 002 does."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "rootCA.key", directory / "rootCA.pem"
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-x509", "-new", "-nodes", "-key", str(key), "-sha256", "-days", "30", "-out", str(cert),
             "-subj", "/CN=customer root CA", "-addext", "basicConstraints=critical,CA:TRUE")  # fmt: skip
    return cert, key


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _device_credentials(directory: Path, ca: tuple[Path, Path], name: str, **subject: str) -> tuple[Path, Path]:
    key, csr, cert = directory / "device.key", directory / "device.csr", directory / "device.crt"
    factory.keygen(key, "ec-p256")
    factory.csr(key, csr, factory.Subject(common_name=name, **subject))
    factory.sign(csr, ca[0], ca[1], cert, "30")
    return cert, key


def _register_ca(emulator: Emulator, ca: Path, *options: str) -> str:
    done = fleetprov("emulator", "register-ca", "--state-dir", str(emulator.state_dir), "--ca-certificate", str(ca),
                     "--auto-registration", *options)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ca_id: str = json.loads(done.stdout)["caCertificateId"]
    return ca_id


def _jit_config(emulator: Emulator, directory: Path, cert: Path, key: Path, ca: Path, **jit: Any) -> Path:
    """The emulator's device config for a JIT device (jit: instead of claim: and provisioning:)."""
    config = device_config(
        emulator, directory, "--jit-certificate", str(cert), "--jit-key", str(key), "--jit-ca", str(ca)
    )
    settings = yaml.safe_load(config.read_text())
    assert "claim" not in settings and "provisioning" not in settings
    assert settings["jit"] == {"certificate": str(cert), "private_key": str(key), "ca_certificate": str(ca)}
    settings["jit"].update(jit)
    settings["daemon"] = {**(settings.get("daemon") or {}), **FAST}
    settings["retry"] = {**(settings.get("retry") or {}), **RETRY}
    config.write_text(yaml.safe_dump(settings))
    return config


def _certificate(emulator: Emulator, certificate_id: str) -> dict[str, Any]:
    [entry] = [entry for entry in emulator.admin("certificates") if entry["certificateId"] == certificate_id]
    return entry


def test_jitp_device_waits_out_the_first_closed_connection_and_commits(
    emulator_with: Any, start_agent: object, tmp_path: Path
) -> None:
    emulator = emulator_with()
    ca = _customer_ca(tmp_path / "ca")
    _register_ca(emulator, ca[0], "--template", str(JITP_TEMPLATE_FILE))
    cert, key = _device_credentials(tmp_path, ca, "lamp-0001", serial_number="SN-1")
    config = _jit_config(emulator, tmp_path / "device", cert, key, ca[0])

    done = fleetprov("--once", "--config", str(config))

    assert done.returncode == 0, done.stderr
    assert "waiting for activation" in done.stderr  # the first connection was closed while it was registered
    state = tmp_path / "device" / "state"
    manifest = manifest_of(state)
    assert manifest["thing_name"] == "lamp-0001" and manifest["template"] == ""
    assert _certificate(emulator, manifest["certificate_id"])["status"] == "ACTIVE"
    [thing] = [thing for thing in emulator.admin("things") if thing["thingName"] == "lamp-0001"]
    assert thing["attributes"] == {"serialNumber": "SN-1"}
    staged = (state / "current" / "certificate.pem").read_text()
    assert staged.count("BEGIN CERTIFICATE") == 2  # the device certificate and the CA: the chain
    assert stat.S_IMODE((state / "current" / "private.key").stat().st_mode) == 0o600
    assert not (state / "activation.json").exists()

    again = fleetprov("--once", "--config", str(config))  # an existing identity: verified, nothing new
    assert again.returncode == 0, again.stderr
    assert os.readlink(state / "current") == "generations/1"

    agent = start_agent(config)  # type: ignore[operator]
    agent.wait_for("READY=1")  # the daemon holds the JIT identity like any other
    assert any("STATUS=connected as lamp-0001" in message for message in agent.messages), agent.messages
    assert agent.stop() == 0, agent.log()
    assert "Traceback" not in agent.log()


def test_jitr_device_is_activated_by_the_cas_activation_command(
    emulator_with: Any, start_agent: object, tmp_path: Path
) -> None:
    emulator = emulator_with()
    ca = _customer_ca(tmp_path / "ca")
    policy = tmp_path / "device-policy.json"
    policy.write_text(json.dumps(DEVICE_POLICY))
    activate = tmp_path / "activate.py"
    activate.write_text(
        "import os, subprocess, sys\n"
        f"admin = [{sys.executable!r}, '-m', 'fleetprov', 'emulator']\n"
        f"state = ['--state-dir', {str(emulator.state_dir)!r}]\n"
        "certificate = os.environ['FLEETPROV_CERTIFICATE_ID']\n"
        "subprocess.run(admin + ['attach-policy', *state, '--certificate-id', certificate,\n"
        f"                '--policy-name', 'jitr-device', '--policy-document', {str(policy)!r}], check=True)\n"
        "subprocess.run(admin + ['set-certificate-status', *state, certificate, 'ACTIVE'], check=True)\n"
    )
    _register_ca(emulator, ca[0], "--activation-command", f"{sys.executable} {activate}")
    cert, key = _device_credentials(tmp_path, ca, "meter-0002")
    config = _jit_config(emulator, tmp_path / "device", cert, key, ca[0])

    agent = start_agent(config)  # type: ignore[operator]
    agent.wait_for("READY=1")

    state = tmp_path / "device" / "state"
    assert manifest_of(state)["thing_name"] == "meter-0002"
    assert _certificate(emulator, manifest_of(state)["certificate_id"])["status"] == "ACTIVE"
    told = [line for message in agent.messages for line in message.splitlines()]
    assert any(line.startswith("STATUS=waiting for activation of certificate") for line in told), told
    assert agent.stop() == 0, agent.log()
    assert "Traceback" not in agent.log()


def test_jitr_device_waits_for_an_admin_and_says_so_in_status(
    emulator_with: Any, start_agent: object, tmp_path: Path
) -> None:
    emulator = emulator_with()
    ca = _customer_ca(tmp_path / "ca")
    _register_ca(emulator, ca[0])
    cert, key = _device_credentials(tmp_path, ca, "meter-0003")
    config = _jit_config(emulator, tmp_path / "device", cert, key, ca[0])
    agent = start_agent(config)  # type: ignore[operator]
    agent.wait_for_log("waiting for activation", count=2)

    status = fleetprov("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["provisioned"] is False and shown["way_in"] == "jit"
    waiting = shown["waiting_for_activation"]
    assert waiting["thing_name"] == "meter-0003" and waiting["attempts"] >= 1
    certificate_id = waiting["certificate_id"]
    assert _certificate(emulator, certificate_id)["status"] == "PENDING_ACTIVATION"

    policy = tmp_path / "device-policy.json"
    policy.write_text(json.dumps(DEVICE_POLICY))
    emulator.admin("attach-policy", "--certificate-id", certificate_id, "--policy-name", "jitr-device",
                   "--policy-document", str(policy))  # fmt: skip
    emulator.admin("set-certificate-status", certificate_id, "ACTIVE")
    agent.wait_for("READY=1")
    assert manifest_of(tmp_path / "device" / "state")["certificate_id"] == certificate_id
    after = json.loads(fleetprov("status", "--json", "--config", str(config)).stdout)
    assert after["provisioned"] is True and after["waiting_for_activation"] is None
    assert agent.stop() == 0, agent.log()


def test_bad_device_credentials_are_named_and_nothing_is_written(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with()
    ca = _customer_ca(tmp_path / "ca")
    other_ca = _customer_ca(tmp_path / "other")
    cert, key = _device_credentials(tmp_path, ca, "lamp-0004")
    other_key = tmp_path / "other.key"
    factory.keygen(other_key, "ec-p256")
    cases = {
        "not issued by that CA": _jit_config(emulator, tmp_path / "chain", cert, key, other_ca[0]),
        "is not the key of the certificate": _jit_config(emulator, tmp_path / "key", cert, other_key, ca[0]),
    }
    for problem, config in cases.items():
        done = fleetprov("--once", "--config", str(config))
        assert done.returncode == 78, (problem, done.stderr)
        assert problem in done.stderr and "Traceback" not in done.stderr
        state = config.parent / "state"
        assert not (state / "current").exists() and not list((state / "generations").glob("*")), problem
    assert _id_of(cert) not in {entry["certificateId"] for entry in emulator.admin("certificates")}


def test_a_device_of_an_unregistered_ca_gives_up_after_jit_wait(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with()
    ca = _customer_ca(tmp_path / "ca")  # never registered
    cert, key = _device_credentials(tmp_path, ca, "lamp-0005")
    config = _jit_config(emulator, tmp_path / "device", cert, key, ca[0], wait=2)

    done = fleetprov("--once", "--config", str(config), timeout=180)

    assert done.returncode == 75, done.stderr
    assert "certificate not ACTIVE after" in done.stderr and "Traceback" not in done.stderr
    state = tmp_path / "device" / "state"
    assert not (state / "current").exists() and not list((state / "generations").glob("*"))
    assert not list(state.glob("staging*")) and not (state / "activation.json").exists()
    assert _id_of(cert) not in {entry["certificateId"] for entry in emulator.admin("certificates")}


def _id_of(certificate: Path) -> str:
    der = x509.load_pem_x509_certificate(certificate.read_bytes()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def test_jitp_with_the_device_key_in_a_token(
    emulator_with: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The factory makes the key in the token and has the token sign the CSR (`fleetprov factory`); the device
    connects through the token, and the generation names the key instead of holding it."""
    token = make_token(tmp_path / "hsm", monkeypatch, pin="pin-" + tmp_path.name[-12:])
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    uri = f"pkcs11:token={token.label};object=lamp-key;type=private"
    options = ["--key", uri, "--pkcs11-library", str(token.library), "--pin-file", str(pin_file)]
    emulator = emulator_with()
    ca = _customer_ca(tmp_path / "ca")
    _register_ca(emulator, ca[0], "--template", str(JITP_TEMPLATE_FILE))
    for step in (["keygen", *options], ["csr", *options, "--out", str(tmp_path / "device.csr"),
                                        "--cn", "lamp-0006", "--serial-number", "SN-6"]):  # fmt: skip
        done = fleetprov("factory", *step)
        assert done.returncode == 0, done.stderr
    factory.sign(tmp_path / "device.csr", ca[0], ca[1], tmp_path / "device.crt", "30")
    config = _jit_config(emulator, tmp_path / "device", tmp_path / "device.crt", tmp_path / "unused.key", ca[0])
    settings = yaml.safe_load(config.read_text())
    settings["jit"]["private_key"] = uri
    settings["keys"] = {"pkcs11": {"library": str(token.library), "token_label": token.label,
                                   "pin_file": str(pin_file)}}  # fmt: skip
    config.write_text(yaml.safe_dump(settings))

    done = fleetprov("--once", "--config", str(config))

    assert done.returncode == 0, done.stderr
    state = tmp_path / "device" / "state"
    manifest = manifest_of(state)
    assert manifest["thing_name"] == "lamp-0006" and manifest["key_reference"].startswith("pkcs11:")
    assert "object=lamp-key" in manifest["key_reference"]
    assert not (state / "current" / "private.key").exists()
    assert _certificate(emulator, manifest["certificate_id"])["status"] == "ACTIVE"
    assert token.pin not in done.stdout + done.stderr
