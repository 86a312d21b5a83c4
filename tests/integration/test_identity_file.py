"""identity.json after `fleetprov --once` against the emulator: what a local application reads to find and
use the device identity, and the modes that share_with_group gives the published identity."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from awsiot import mqtt_connection_builder

from tests.softhsm import SoftToken, make_token
from tests.support import CONNECT_TIMEOUT, Emulator, device_config, fleetprov

FILES = ("certificate.pem", "device-config.json", "identity.json", "manifest.json")


def _openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], check=True, capture_output=True, text=True).stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def unit_umask() -> Iterator[None]:
    """fleetprov.service has UMask=0077; fleetprov runs under it (a child inherits the umask)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _provision(emulator: Emulator, directory: Path, *options: str, share_with_group: bool | None = None) -> Path:
    config = device_config(emulator, directory, *options)
    if share_with_group is not None:
        settings = yaml.safe_load(config.read_text())
        settings["share_with_group"] = share_with_group
        config.write_text(yaml.safe_dump(settings))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return directory / "state"


def _check_identity(emulator: Emulator, state: Path) -> dict[str, Any]:
    """identity.json says what the committed generation holds, through `current`."""
    current = state / "current"
    generation = current.resolve()
    assert generation.parent == (state / "generations").resolve()
    document: dict[str, Any] = json.loads((generation / "identity.json").read_text())
    manifest = json.loads((generation / "manifest.json").read_text())

    assert document["format"] == 1
    assert "generation" not in document
    assert document["thing_name"] == manifest["thing_name"]
    assert document["certificate_id"] == manifest["certificate_id"]
    assert document["not_after"] == manifest["not_after"]
    assert document["key_reference"] == manifest["key_reference"]
    settings = yaml.safe_load((state.parent / "config.yaml").read_text())  # written by device_config
    assert (document["endpoint"], document["port"]) == (settings["endpoint"], emulator.port)
    assert document["root_ca"] == str(emulator.root_ca.absolute()) == settings["root_ca"]
    assert document["certificate"] == str(current / "certificate.pem")
    assert document["device_configuration"] == str(current / "device-config.json")
    assert json.loads(Path(document["device_configuration"]).read_text()) == manifest["device_configuration"]

    # The certificate it names is the committed one, the one the service issued.
    fingerprint = _openssl("x509", "-in", document["certificate"], "-noout", "-fingerprint", "-sha256")
    assert fingerprint == _openssl("x509", "-in", str(generation / "certificate.pem"), "-noout", "-fingerprint",
                                   "-sha256")  # fmt: skip
    assert fingerprint.partition("=")[2].strip().replace(":", "").lower() == document["certificate_id"]
    [issued] = [c for c in emulator.admin("certificates") if c["certificateId"] == document["certificate_id"]]
    assert issued["status"] == "ACTIVE"
    return document


def test_identity_json_by_default(emulator: Emulator, tmp_path: Path) -> None:
    state = _provision(emulator, tmp_path, "--serial", "identity-default")
    document = _check_identity(emulator, state)

    assert document["thing_name"] == "fleetprov-identity-default"
    assert document["key_reference"] == "file:private.key"
    assert document["private_key"] == str(state / "current" / "private.key")
    public_key = _openssl("x509", "-in", document["certificate"], "-noout", "-pubkey")
    assert public_key == _openssl("pkey", "-in", document["private_key"], "-pubout")

    generation = (state / "current").resolve()
    assert (_mode(state), _mode(state / "generations"), _mode(generation)) == (0o700, 0o700, 0o700)
    assert _mode(generation / "private.key") == 0o600
    for name in FILES:
        assert _mode(generation / name) == 0o644, name

    # A local application needs nothing but identity.json to connect (docs/device-agent.md).
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=document["endpoint"],
        port=document["port"],
        cert_filepath=document["certificate"],
        pri_key_filepath=document["private_key"],
        ca_filepath=document["root_ca"],
        client_id=document["thing_name"],  # the demo policy allows only this one; fleetprov is not running
        clean_session=True,
    )
    connection.connect().result(CONNECT_TIMEOUT)
    connection.disconnect().result(CONNECT_TIMEOUT)


@pytest.mark.usefixtures("unit_umask")
def test_identity_json_shared_with_the_group(emulator: Emulator, tmp_path: Path) -> None:
    state = _provision(emulator, tmp_path, "--serial", "identity-shared", share_with_group=True)
    document = _check_identity(emulator, state)

    assert document["private_key"] == str(state / "current" / "private.key")
    public_key = _openssl("x509", "-in", document["certificate"], "-noout", "-pubkey")
    assert public_key == _openssl("pkey", "-in", document["private_key"], "-pubout")

    generation = (state / "current").resolve()
    assert (_mode(state), _mode(state / "generations"), _mode(generation)) == (0o750, 0o750, 0o750)
    for name in (*FILES, "private.key"):
        assert _mode(generation / name) == 0o640, name
    assert _mode(state / "lock") == 0o600  # only the published identity is shared
    assert not [entry.name for entry in state.iterdir() if entry.name.startswith(("staging-", "journal"))]

    # Switched off again: the next run closes generations/ to the group; the generation itself is left as it was.
    config = tmp_path / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["share_with_group"] = False
    config.write_text(yaml.safe_dump(settings))
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert _mode(state / "generations") == 0o700
    assert _mode(generation) == 0o750


@pytest.mark.usefixtures("unit_umask")
def test_identity_json_of_a_token_key(emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token: SoftToken = make_token(tmp_path / "hsm", monkeypatch, pin="pin-identity-file")
    pin_file = tmp_path / "pkcs11-pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    state = _provision(
        emulator, tmp_path / "device",
        "--key-backend", "pkcs11", "--pkcs11-library", str(token.library), "--token-label", token.label,
        "--pin-file", str(pin_file),
        share_with_group=True,
    )  # fmt: skip
    document = _check_identity(emulator, state)

    assert document["private_key"] is None
    assert document["key_reference"].startswith("pkcs11:")
    assert "pin" not in document["key_reference"].lower()
    assert token.pin not in (state / "current" / "identity.json").read_text()
    generation = (state / "current").resolve()
    assert not (generation / "private.key").exists()
    assert _mode(generation) == 0o750
    for name in FILES:
        assert _mode(generation / name) == 0o640, name
