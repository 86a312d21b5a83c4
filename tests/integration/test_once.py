"""`fleetprov --once` against the emulator, as a device runs it: provision, store, verify, and refuse clearly."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import Emulator, device_config, fleetprov


def _certificate_count(emulator: Emulator) -> int:
    return len(emulator.admin("certificates"))


def _openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], check=True, capture_output=True, text=True).stdout


def _check_stored_identity(emulator: Emulator, state: Path) -> dict[str, Any]:
    current = state / "current"
    assert current.is_symlink() and os.readlink(current).startswith("generations/")
    generation = current.resolve()
    key = generation / "private.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    cert = generation / "certificate.pem"
    # The certificate is for the stored key, and chains to the emulator's root.
    assert _openssl("x509", "-in", str(cert), "-noout", "-pubkey") == _openssl("pkey", "-in", str(key), "-pubout")
    issuing = emulator.root_ca.parent / "issuing-ca.pem"
    assert ": OK" in _openssl("verify", "-CAfile", str(emulator.root_ca), "-untrusted", str(issuing), str(cert))
    manifest = json.loads((generation / "manifest.json").read_text())
    assert json.loads((generation / "device-config.json").read_text()) == manifest["device_configuration"]
    return manifest


@pytest.mark.parametrize(
    ("method", "key_type", "openssl_key"),
    [
        ("csr", "ec-p256", "prime256v1"),
        ("csr", "ec-p384", "secp384r1"),
        ("csr", "rsa-2048", "2048 bit"),
        ("csr", "rsa-3072", "3072 bit"),
        ("create-keys", "ec-p256", "2048 bit"),  # AWS makes an RSA 2048 key whatever key_type says
    ],
)
def test_once_provisions_stores_and_verifies(
    emulator: Emulator, tmp_path: Path, method: str, key_type: str, openssl_key: str
) -> None:
    serial = f"once-{method}-{key_type}"
    config = device_config(emulator, tmp_path, "--method", method, "--key-type", key_type, "--serial", serial)
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"thing fleetprov-{serial}" in result.stdout
    for step in (
        "parameters",
        "connect",
        "create-certificate",
        "check-certificate",
        "register-thing",
        "store",
        "verify",
    ):
        assert f"{step}: ok" in result.stderr, result.stderr

    manifest = _check_stored_identity(emulator, tmp_path / "state")
    assert manifest["thing_name"] == f"fleetprov-{serial}"
    assert manifest["template"] == "fleetprov-demo"
    assert manifest["key_reference"] == "file:private.key"
    assert manifest["device_configuration"]["telemetryTopic"] == f"devices/fleetprov-{serial}/telemetry"
    key_text = _openssl("pkey", "-in", str(tmp_path / "state/current/private.key"), "-noout", "-text")
    assert openssl_key in key_text
    [cert] = [c for c in emulator.admin("certificates") if c["certificateId"] == manifest["certificate_id"]]
    assert cert["status"] == "ACTIVE" and cert["things"] == [f"fleetprov-{serial}"]


def test_second_run_verifies_without_the_claim(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path, "--serial", "twice")
    assert fleetprov("--once", "--config", str(config)).returncode == 0
    before = _certificate_count(emulator)
    # Remove the claim: a provisioned device must not need it any more.
    settings = yaml.safe_load(config.read_text())
    settings["claim"] = {"certificate": str(tmp_path / "gone.pem"), "private_key": str(tmp_path / "gone.key")}
    config.write_text(yaml.safe_dump(settings))
    again = fleetprov("--once", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "already provisioned" in again.stdout
    assert _certificate_count(emulator) == before

    status = fleetprov("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["provisioned"] is True
    assert report["thing_name"] == "fleetprov-twice"
    assert report["key_backend"] == "file"
    assert report["last_run"]["exit_code"] == 0


def test_mosquitto_connects_with_the_stored_identity(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path, "--serial", "mosq-once")
    assert fleetprov("--once", "--config", str(config)).returncode == 0
    current = tmp_path / "state" / "current"
    published = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(emulator.port), "--cafile", str(emulator.root_ca),
         "--cert", str(current / "certificate.pem"), "--key", str(current / "private.key"),
         "-i", "fleetprov-mosq-once", "-q", "1", "-t", "devices/fleetprov-mosq-once/telemetry", "-m", "hi"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr


def _edit(config: Path, change: Any) -> None:
    settings = yaml.safe_load(config.read_text())
    change(settings)
    config.write_text(yaml.safe_dump(settings))


def _assert_nothing_stored(state: Path) -> None:
    assert not (state / "current").exists()
    assert not list(state.glob("generations/*"))
    assert not list(state.glob("staging-*"))


def test_claim_key_readable_by_others_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    key = tmp_path / "claim.key"
    key.write_bytes(emulator.claim_key.read_bytes())
    key.chmod(0o644)
    config = device_config(emulator, tmp_path)
    _edit(config, lambda s: s["claim"].update(private_key=str(key)))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 78
    assert f"chmod 600 {key}" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_claim_certificate(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path)
    _edit(config, lambda s: s["claim"].update(certificate=str(tmp_path / "nope.pem")))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 78
    assert "claim certificate" in result.stderr and "nope.pem" in result.stderr


def test_unknown_template_exits_77_with_aws_error(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path)
    _edit(config, lambda s: s["provisioning"].update(template="no-such-template"))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 77, result.stderr
    assert "register-thing" in result.stderr and "404 ResourceNotFound" in result.stderr
    _assert_nothing_stored(tmp_path / "state")


def test_certificate_for_another_key_exits_65_and_stores_nothing(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with("--tamper", "CreateCertificateFromCsr")
    config = device_config(emulator, tmp_path)
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 65, result.stderr
    assert "not for this device's key" in result.stderr
    _assert_nothing_stored(tmp_path / "state")


def test_endpoint_that_does_not_answer_exits_75_after_the_retry_budget(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path)
    _edit(config, lambda s: s.update(port=1, retry={"initial_delay": 0.1, "max_delay": 0.3, "budget": 2}))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 75, result.stderr
    assert "gave up after" in result.stderr and "connect" in result.stderr
    assert result.stderr.count("retrying in") >= 2
    state = tmp_path / "state"
    assert not (state / "current").exists() and not list(state.glob("generations/*"))
    # "Try again later": the journal keeps the run's key so that the next run resumes with it.
    journal = json.loads((state / "journal.json").read_text())
    assert journal["stage"] == "key-ready"
    assert stat.S_IMODE((state / "journal.json").stat().st_mode) == 0o600
    key = (state / journal["staging"] / "private.key").read_bytes()

    _edit(config, lambda s: s.update(port=emulator.port))
    again = fleetprov("--once", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "resuming the interrupted run (stage key-ready)" in again.stderr
    assert (state / "current" / "private.key").read_bytes() == key
    assert not (state / "journal.json").exists() and not list(state.glob("staging-*"))


def test_transient_rejections_are_retried_with_the_same_certificate(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with(
        "--reject", "CreateCertificateFromCsr:1:429:ThrottlingException",
        "--reject", "RegisterThing:2:503:ServiceUnavailable",
    )  # fmt: skip
    config = device_config(emulator, tmp_path, "--serial", "persistent")
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("retrying in") == 3
    # One certificate for the device: RegisterThing was retried with the same ownership token.
    device_certificates = [c for c in emulator.admin("certificates") if c["kind"] == "device"]
    assert len(device_certificates) == 1 and device_certificates[0]["things"] == ["fleetprov-persistent"]


def test_denied_hook_exits_77_at_once(emulator_with: Any, tmp_path: Path) -> None:
    hook = tmp_path / "deny.py"
    hook.write_text('import json, sys\njson.load(sys.stdin)\nprint(json.dumps({"allowProvisioning": False}))\n')
    emulator = emulator_with("--hook", f"fleetprov-demo={sys.executable} {hook}")
    config = device_config(emulator, tmp_path / "device")
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 77, result.stderr
    assert "403 AccessDenied" in result.stderr
    assert "retrying in" not in result.stderr
    _assert_nothing_stored(tmp_path / "device" / "state")


def test_reply_without_thing_name_exits_65(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with("--tamper", "RegisterThing")
    config = device_config(emulator, tmp_path)
    _edit(config, lambda s: s.update(retry={"initial_delay": 0.1, "max_delay": 0.2, "max_attempts": 2}))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 65, result.stderr
    assert "thingName" in result.stderr
    _assert_nothing_stored(tmp_path / "state")


def test_logs_carry_no_secrets(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path, "--method", "create-keys", "--serial", "quiet")
    result = fleetprov("-v", "--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "PRIVATE KEY" not in output
    assert "ownership token" in output  # only its fingerprint
    key_body = (tmp_path / "state" / "current" / "private.key").read_text().splitlines()[1]
    assert key_body not in output


def test_configuration_error_exits_78(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path)
    _edit(config, lambda s: s.update(port="eighty"))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 78
    assert str(config) in result.stderr and "port" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_redacts_secrets_and_shows_overrides(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path)
    _edit(
        config, lambda s: s.update(proxy={"host": "proxy.example", "port": 3128, "username": "u", "password": "s3cret"})
    )
    result = fleetprov("check-config", "--config", str(config), env={"FLEETPROV_PORT": "443"})
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["proxy"]["password"] == "<redacted>"
    assert "s3cret" not in result.stdout + result.stderr
    assert effective["port"] == 443
    assert effective["provisioning"]["template"] == "fleetprov-demo"

    broken = fleetprov("check-config", "--config", str(config), env={"FLEETPROV_PROXY__PORT": "many"})
    assert broken.returncode == 78
    assert "FLEETPROV_PROXY__PORT" in broken.stderr and "s3cret" not in broken.stderr
