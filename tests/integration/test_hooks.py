"""Post-provision hooks (fleetprov/hooks.py) run by a real `fleetprov --once` against the emulator: the
environment they get, the order, what is skipped, that a failing or hanging hook changes nothing, that a hook
reaches no secret of fleetprov's, that it leaves no process behind, and which hook files are refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.transports import TinyProxy, tinyproxy  # noqa: F401 -- a fixture
from tests.processes import gone
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


# --- what a hook can reach of fleetprov ------------------------------------------------------------------

SERVICE_UID = 65534  # stands in for the fleetprov user: root could read any process's /proc files anyway
AS_SERVICE_USER = ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups"]

# Runs as the service user, as fleetprov does; /usr/bin/python3 because that user may not reach the test's
# interpreter (a virtual environment under /root). It looks for the markers in its own environment, in
# fleetprov's /proc/<pid>/environ and in fleetprov's memory (every writable mapping of /proc/<pid>/maps, read
# through /proc/<pid>/mem), and proves the memory reader works on its own memory first.
PRYING_HOOK = """#!/usr/bin/python3
import json, os, secrets

MARKERS = {markers!r}
CANARY = ("hook-canary-" + secrets.token_hex(8)).encode()


def scan(pid):
    wanted = [marker.encode() for marker in MARKERS] + [CANARY]
    found, total = set(), 0
    with open(f"/proc/{{pid}}/maps") as maps, open(f"/proc/{{pid}}/mem", "rb", 0) as memory:
        for line in maps:
            addresses, permissions = line.split()[:2]
            if not permissions.startswith("rw"):
                continue
            start, end = (int(address, 16) for address in addresses.split("-"))
            tail = b""
            while start < end:
                try:
                    memory.seek(start)
                    chunk = memory.read(min(1 << 20, end - start))
                except OSError:
                    break
                if not chunk:
                    break
                found.update(item.decode() for item in wanted if item in tail + chunk)
                tail, start, total = chunk[-128:], start + len(chunk), total + len(chunk)
    return {{"read": total, "found": sorted(found)}}


def attempt(read):
    try:
        return read()
    except OSError as exc:
        return {{"refused": exc.strerror}}


def environ_of(pid):
    data = open(f"/proc/{{pid}}/environ", "rb").read()
    return {{"read": len(data), "found": [marker for marker in MARKERS if marker.encode() in data]}}


parent = os.getppid()
report = {{
    "uid": os.getuid(),
    "own_environment": [marker for marker in MARKERS if marker in json.dumps(dict(os.environ))],
    "own_memory": CANARY.decode() in scan(os.getpid())["found"],
    "parent_environ": attempt(lambda: environ_of(parent)),
    "parent_memory": attempt(lambda: scan(parent)),
}}
with open({out!r}, "w") as out:
    json.dump(report, out)
"""


@pytest.fixture
def service_home() -> Iterator[Path]:
    """A directory of the service user's; tmp_path is root's 0700, out of its reach."""
    home = Path(tempfile.mkdtemp(prefix="fleetprov-service-"))
    os.chown(home, SERVICE_UID, SERVICE_UID)
    yield home
    shutil.rmtree(home)


def _owned_copy(source: Path, target: Path, mode: int = 0o644) -> str:
    target.write_bytes(source.read_bytes())
    os.chown(target, SERVICE_UID, SERVICE_UID)
    target.chmod(mode)
    return str(target)


def test_a_hook_reaches_no_secret_of_fleetprov(
    emulator: Emulator,
    tinyproxy: TinyProxy,  # noqa: F811
    service_home: Path,
    tmp_path: Path,
) -> None:
    """fleetprov runs as the service user with the PIN's variable, the proxy password and the credentials
    directory in its environment; its hook, the same user, finds none of them: not in its own environment,
    not in fleetprov's /proc/<pid>/environ, not in fleetprov's memory (fleetprov is not dumpable)."""
    pin, password, credentials = (f"marker-{name}-{secrets.token_hex(8)}" for name in ("pin", "proxy", "creds"))
    hooks, report = service_home / "hooks.d", service_home / "report.json"
    hooks.mkdir()
    os.chown(hooks, SERVICE_UID, SERVICE_UID)
    hook = _hook(hooks, "10-pry", PRYING_HOOK.format(markers=[pin, password, credentials], out=str(report)))
    os.chown(hook, SERVICE_UID, SERVICE_UID)

    settings = yaml.safe_load(device_config(emulator, tmp_path, "--serial", "pried").read_text())
    settings["root_ca"] = _owned_copy(emulator.root_ca, service_home / "root-ca.pem")
    settings["claim"] = {
        "certificate": _owned_copy(emulator.claim_cert, service_home / "claim.pem"),
        "private_key": _owned_copy(emulator.claim_key, service_home / "claim.key", 0o600),
    }
    settings["state_dir"] = str(service_home / "state")
    settings["proxy"] = {"host": "127.0.0.1", "port": tinyproxy.port, "username": "device"}
    settings["keys"] = {  # the device key stays in a file; the token section names the PIN's variable
        "backend": "file",
        "pkcs11": {"library": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "pin_env": "TEST_PKCS11_PIN"},
    }
    settings["hooks"] = {"directory": str(hooks), "timeout": 60}
    config = service_home / "config.yaml"
    config.write_text(yaml.safe_dump(settings))

    secrets_in_environment = {
        "TEST_PKCS11_PIN": pin,
        "FLEETPROV_PROXY__PASSWORD": password,
        "CREDENTIALS_DIRECTORY": credentials,
    }
    result = subprocess.run(
        [*AS_SERVICE_USER, sys.executable, "-m", "fleetprov", "--once", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=service_home,
        env={**os.environ, **secrets_in_environment},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + tinyproxy.logs()
    assert f"hook {hook}: ok" in result.stderr, result.stderr
    assert "CONNECT localhost" in tinyproxy.log()  # the proxy, with its password, was used
    found = json.loads(report.read_text())
    assert found["uid"] == SERVICE_UID
    assert found["own_memory"] is True, found  # the memory reader works
    assert found["own_environment"] == [], found
    assert found["parent_environ"] == {"refused": "Permission denied"}, found
    assert found["parent_memory"] == {"refused": "Permission denied"}, found
    for marker in (pin, password, credentials):
        assert marker not in result.stdout + result.stderr


# --- process groups ----------------------------------------------------------------------------------------


def test_a_background_process_neither_holds_fleetprov_nor_outlives_its_hook(emulator: Emulator, tmp_path: Path) -> None:
    """The hook leaves `sleep` behind with its stdout and stderr: fleetprov does not wait for those pipes (it
    would until the timeout) and kills the sleep with the hook's process group."""
    hooks, pid = tmp_path / "hooks.d", tmp_path / "sleep.pid"
    hooks.mkdir()
    hook = _hook(hooks, "10-background", f"#!/bin/sh\nsleep 60 &\necho $! > {pid}\necho started\n")
    config = _config(emulator, tmp_path / "device", hooks, "background", timeout=5)
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"hook {hook}: ok" in result.stderr, result.stderr
    assert gone(int(pid.read_text()))


def test_a_hook_that_times_out_is_killed_with_its_group(emulator: Emulator, tmp_path: Path) -> None:
    hooks, pid = tmp_path / "hooks.d", tmp_path / "sleep.pid"
    hooks.mkdir()
    hook = _hook(hooks, "10-waits", f"#!/bin/sh\nsleep 60 &\necho $! > {pid}\nwait\n")
    config = _config(emulator, tmp_path / "device", hooks, "group-killed", timeout=1)
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"hook {hook}: killed after 1 s" in result.stderr, result.stderr
    assert gone(int(pid.read_text()))


# --- who may change a hook ---------------------------------------------------------------------------------


def test_only_hooks_that_only_root_or_the_service_user_can_change_run(emulator: Emulator, tmp_path: Path) -> None:
    """fleetprov runs as root here: a hook another user owns, or that group or others may write, or that is
    a symlink into a directory others may write, is not run; the safe one is."""
    hooks, out, open_to_all = tmp_path / "hooks.d", tmp_path / "out", tmp_path / "open"
    for directory in (hooks, out, open_to_all):
        directory.mkdir()
    open_to_all.chmod(0o777)  # without the sticky bit: anyone may replace what is in it
    _hook(hooks, "10-group-writable", RECORDING_HOOK.format(out=out), mode=0o775)
    _hook(hooks, "20-world-writable", RECORDING_HOOK.format(out=out), mode=0o757)
    os.chown(_hook(hooks, "30-other-owner", RECORDING_HOOK.format(out=out)), SERVICE_UID, SERVICE_UID)
    (hooks / "40-link").symlink_to(_hook(open_to_all, "40-link", RECORDING_HOOK.format(out=out)))
    _hook(hooks, "50-safe", RECORDING_HOOK.format(out=out))
    config = _config(emulator, tmp_path / "device", hooks, "unsafe-hooks")

    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert [path.name for path in out.iterdir()] == ["50-safe.env"], result.stderr
    for line in (
        f"hook {hooks / '10-group-writable'}: not run: {hooks / '10-group-writable'} is writable by its group or "
        "others (mode 0775)",
        f"hook {hooks / '20-world-writable'}: not run: {hooks / '20-world-writable'} is writable by its group or "
        "others (mode 0757)",
        f"hook {hooks / '30-other-owner'}: not run: {hooks / '30-other-owner'} belongs to uid {SERVICE_UID}, "
        "neither root nor fleetprov's user (uid 0)",
        f"hook {hooks / '40-link'}: not run: {open_to_all} is writable by its group or others (mode 0777)",
    ):
        assert line in result.stderr, result.stderr


def test_a_hooks_directory_others_may_write_runs_nothing(emulator: Emulator, tmp_path: Path) -> None:
    hooks, out = tmp_path / "hooks.d", tmp_path / "out"
    hooks.mkdir()
    out.mkdir()
    _hook(hooks, "10-record", RECORDING_HOOK.format(out=out))
    hooks.chmod(0o775)  # someone of the group could add a hook
    config = _config(emulator, tmp_path / "device", hooks, "unsafe-hooks-directory")
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert list(out.iterdir()) == []
    assert f"hooks: none of {hooks} runs: {hooks} is writable by its group or others (mode 0775)" in result.stderr
