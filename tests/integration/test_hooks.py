"""Post-provision hooks (fleetprov/hooks.py) run by a real `fleetprov --once` against the emulator: the
environment they get, the order, what is skipped, and that a failing or hanging hook changes nothing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from tests.support import Emulator, device_config, fleetprov

RECORDING_HOOK = f"""#!{sys.executable}
import json, os, sys
with open(os.path.join("{{out}}", os.path.basename(sys.argv[0]) + ".env"), "w") as record:
    json.dump(dict(os.environ), record)
"""
# What fleetprov passes on of its own environment to every child (fleetprov/children.py, README).
ALLOW_LIST = ("PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "LANG", "LANGUAGE")


def allowed(environment: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if name in ALLOW_LIST or name.startswith("LC_")}


def _hook(directory: Path, name: str, text: str, mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


def _config(emulator: Emulator, directory: Path, hooks: Path, serial: str, timeout: float = 5) -> Path:
    config = device_config(emulator, directory, "--serial", serial)
    settings = yaml.safe_load(config.read_text())
    settings["hooks"] = {"directory": str(hooks), "timeout": timeout}
    config.write_text(yaml.safe_dump(settings))
    return config


def _env(path: Path) -> dict[str, str]:
    recorded: dict[str, str] = json.loads(path.read_text())
    return recorded


def test_hooks_get_the_identity_and_failures_change_nothing(emulator: Emulator, tmp_path: Path) -> None:
    hooks, out = tmp_path / "hooks.d", tmp_path / "out"
    hooks.mkdir()
    out.mkdir()
    _hook(hooks, "10-record", RECORDING_HOOK.format(out=out))
    _hook(hooks, "20-fails", "#!/bin/sh\necho 'something broke' >&2\nexit 3\n")
    _hook(hooks, "30-hangs", "#!/bin/sh\nexec sleep 60\n")
    _hook(hooks, "40-record", RECORDING_HOOK.format(out=out))
    _hook(hooks, "50-not-executable", RECORDING_HOOK.format(out=out), mode=0o644)
    _hook(hooks, "60-record.dpkg-old", RECORDING_HOOK.format(out=out))
    _hook(hooks, ".hidden", RECORDING_HOOK.format(out=out))
    config = _config(emulator, tmp_path / "device", hooks, "hooked", timeout=1)

    result = fleetprov("--once", "--config", str(config), env={"TEST_PKCS11_PIN": "not-for-hooks"})
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["10-record.env", "40-record.env"], result.stderr
    assert f"hook {hooks / '20-fails'}: exit status 3 (the identity stays committed): something broke" in result.stderr
    assert f"hook {hooks / '30-hangs'}: killed after 1 s" in result.stderr
    assert f"hook {hooks / '10-record'}: ok" in result.stderr

    state = tmp_path / "device" / "state"
    generation = (state / "current").resolve()
    manifest = json.loads((generation / "manifest.json").read_text())
    env = _env(out / "10-record.env")
    assert env == {
        "FLEETPROV_THING_NAME": "fleetprov-hooked",
        "FLEETPROV_CERTIFICATE": str(state / "generations" / "1" / "certificate.pem"),
        "FLEETPROV_PRIVATE_KEY": str(state / "generations" / "1" / "private.key"),
        "FLEETPROV_ENDPOINT": f"localhost:{emulator.port}",
        "FLEETPROV_DEVICE_CONFIG": str(state / "generations" / "1" / "device-config.json"),
        "FLEETPROV_GENERATION": "1",
        "FLEETPROV_STATE_DIR": str(state),
        **allowed(dict(os.environ)),  # and nothing else: not TEST_PKCS11_PIN, although it is no PIN source here
    }
    assert manifest["thing_name"] == "fleetprov-hooked"
    assert json.loads(Path(env["FLEETPROV_DEVICE_CONFIG"]).read_text()) == manifest["device_configuration"]

    # An identity that is only verified is not a commit: no hook runs.
    for path in out.iterdir():
        path.unlink()
    again = fleetprov("--once", "--config", str(config))
    assert again.returncode == 0 and "already provisioned; verified" in again.stdout
    assert list(out.iterdir()) == []


def test_the_pin_variable_is_withheld(emulator: Emulator, tmp_path: Path) -> None:
    """With the PIN in an environment variable (keys.pkcs11.pin_env), hooks do not see that variable. The
    device key stays in a file here; the token section only names the PIN's source."""
    hooks, out = tmp_path / "hooks.d", tmp_path / "out"
    hooks.mkdir()
    out.mkdir()
    _hook(hooks, "10-record", RECORDING_HOOK.format(out=out))
    config = _config(emulator, tmp_path / "device", hooks, "hooked-pin")
    settings = yaml.safe_load(config.read_text())
    settings["keys"] = {
        "backend": "file",
        "pkcs11": {"library": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "pin_env": "TEST_PKCS11_PIN"},
    }
    config.write_text(yaml.safe_dump(settings))
    result = fleetprov(
        "--once", "--config", str(config), env={"TEST_PKCS11_PIN": "secret-pin", "CREDENTIALS_DIRECTORY": "/x"}
    )
    assert result.returncode == 0, result.stderr
    env = _env(out / "10-record.env")
    assert "TEST_PKCS11_PIN" not in env and "CREDENTIALS_DIRECTORY" not in env
    assert env["FLEETPROV_THING_NAME"] == "fleetprov-hooked-pin"
    assert "secret-pin" not in result.stdout + result.stderr
    assert os.environ.get("TEST_PKCS11_PIN") != "secret-pin"
