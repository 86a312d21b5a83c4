"""DESIGN.md's security rules as tests: file and directory modes, no secret in any output at any verbosity, and
TLS server verification that no configuration can turn off."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import Emulator, device_config, fleetprov

FLEETPROV = Path(__file__).parents[2] / "fleetprov"
CRASH_AFTER_ISSUED = {"FLEETPROV_CRASH_AT": "after-issued"}  # SIGKILL once the certificate is journalled
SIGKILLED = -9
WINDOW = 16  # a secret must not appear, nor any 16 characters of it


def configure(emulator: Emulator, directory: Path, *options: str, **changes: Any) -> Path:
    config = device_config(emulator, directory, *options)
    settings = yaml.safe_load(config.read_text())
    settings.update(changes)
    config.write_text(yaml.safe_dump(settings))
    return config


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """fleetprov's modes must not depend on the umask it inherits: run it under a permissive one."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- (1) modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["csr", "create-keys"])
def test_modes_in_flight_and_after_provisioning(emulator: Emulator, tmp_path: Path, method: str) -> None:
    config = configure(emulator, tmp_path, "--method", method, "--serial", f"modes-{method}")
    state = tmp_path / "state"
    with umask(0):
        crashed = fleetprov("--once", "--config", str(config), env=CRASH_AFTER_ISSUED)
    assert crashed.returncode == SIGKILLED, crashed.stderr
    # In flight: the journal holds the ownership token, the staging directory the new key.
    assert mode(state) == 0o700
    assert mode(state / "journal.json") == 0o600
    [staging] = state.glob("staging-*")
    assert mode(staging) == 0o700
    assert mode(staging / "private.key") == 0o600

    with umask(0):
        resumed = fleetprov("--once", "--config", str(config))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run (stage issued)" in resumed.stderr
    generation = (state / "current").resolve()
    assert generation.parent == state / "generations"
    assert mode(state) == mode(state / "generations") == mode(generation) == 0o700
    assert mode(generation / "private.key") == 0o600
    directories = [path for path in state.rglob("*") if path.is_dir() and not path.is_symlink()]
    assert directories and all(mode(path) == 0o700 for path in directories), {str(p): oct(mode(p)) for p in directories}
    assert not (state / "journal.json").exists()


# --- (2) no secret in any output -----------------------------------------------------------------


def pem_body(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def assert_not_shown(secret: str, what: str, output: str) -> None:
    assert len(secret) >= WINDOW, what
    for start in range(len(secret) - WINDOW + 1):
        assert secret[start : start + WINDOW] not in output, f"{what} shows up in the output"


@pytest.mark.parametrize("verbose", [True, False], ids=["debug", "default"])
@pytest.mark.parametrize("method", ["csr", "create-keys"])
def test_no_key_or_token_in_any_output(emulator: Emulator, tmp_path: Path, method: str, verbose: bool) -> None:
    """Interrupted after CreateCertificate*, then resumed: the resumed RegisterThing sends the journalled token,
    and neither run (nor `status`, nor the record of the last run) shows it, the new key or the claim key."""
    flags = ["-v"] if verbose else []
    config = configure(emulator, tmp_path, "--method", method, "--serial", f"secret-{method}-{verbose}")
    state = tmp_path / "state"
    crashed = fleetprov(*flags, "--once", "--config", str(config), env=CRASH_AFTER_ISSUED)
    assert crashed.returncode == SIGKILLED, crashed.stderr
    token = json.loads((state / "journal.json").read_text())["ownership_token"]
    resumed = fleetprov(*flags, "--once", "--config", str(config))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run (stage issued)" in resumed.stderr
    status = fleetprov(*flags, "status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    if verbose:
        assert " DEBUG " in crashed.stderr + resumed.stderr  # debug logging was on

    outputs = "\n".join(
        [
            crashed.stdout, crashed.stderr, resumed.stdout, resumed.stderr, status.stdout, status.stderr,
            (state / "last-run.json").read_text(),
        ]
    )  # fmt: skip
    assert "PRIVATE KEY" not in outputs
    assert "ownership token" in resumed.stderr or "ownership token" in crashed.stderr  # only its fingerprint
    assert_not_shown(token, "the ownership token", outputs)
    for line in pem_body((state / "current" / "private.key").read_text()):
        assert_not_shown(line, "the device's private key", outputs)
    for line in pem_body(emulator.claim_key.read_text()):
        assert_not_shown(line, "the claim's private key", outputs)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_proxy_password_is_never_shown(emulator: Emulator, tmp_path: Path) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    proxy = {"host": "127.0.0.1", "port": closed_port(), "username": "device", "password": password}
    retry = {"initial_delay": 0.05, "max_delay": 0.1, "max_attempts": 2, "budget": 2}
    config = configure(emulator, tmp_path, proxy=proxy, retry=retry, operation_timeout=3)
    runs = {
        "check-config": fleetprov("check-config", "--config", str(config)),
        "check-config -v": fleetprov("-v", "check-config", "--config", str(config)),
        "--once -v through a proxy that is not there": fleetprov("-v", "--once", "--config", str(config)),
        "status": fleetprov("status", "--config", str(config)),
        "a bad value next to the password": fleetprov(
            "-v", "check-config", "--config", str(config), env={"FLEETPROV_PROXY__PORT": "many"}
        ),
    }
    broken = tmp_path / "broken.yaml"  # a YAML error on the password's own line
    broken.write_text(config.read_text().replace(f"password: {password}", f"password: @{password}: x"))
    assert password in config.read_text() and f"@{password}" in broken.read_text()
    runs["invalid YAML on the password's line"] = fleetprov("check-config", "--config", str(broken))

    expected = {"check-config": 0, "check-config -v": 0, "status": 0, "a bad value next to the password": 78}
    expected["invalid YAML on the password's line"] = 78
    for name, result in runs.items():
        assert result.returncode == expected.get(name, result.returncode), (name, result.stderr)
        assert password not in result.stdout + result.stderr, name
        assert "Traceback" not in result.stderr, name
    assert runs["--once -v through a proxy that is not there"].returncode in (69, 75)
    assert "<redacted>" in runs["check-config"].stdout
    assert password not in (tmp_path / "state" / "last-run.json").read_text()


def test_proxy_url_with_credentials_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    config = configure(emulator, tmp_path, proxy={"host": f"http://device:{password}@proxy.lan:3128", "port": 3128})
    result = fleetprov("check-config", "--config", str(config))
    assert password not in result.stdout + result.stderr
    assert result.returncode == 78


# --- (3) TLS verification cannot be disabled -----------------------------------------------------

# What turning verification off looks like in awscrt, ssl, requests-style APIs and configuration.
DISABLING = re.compile(
    r"verify_peer|CERT_NONE|set_verify_peer|insecure|check_hostname\s*=\s*False|_create_unverified_context"
    r"|verify\s*=\s*False|verify_mode|skip_verif",
    re.IGNORECASE,
)
SERVER_SIDE = {FLEETPROV / "emulator" / "broker.py"}  # the emulator's broker verifies *clients*: CERT_REQUIRED


def test_no_code_can_disable_tls_verification() -> None:
    sources = [path for path in FLEETPROV.rglob("*.py") if path not in SERVER_SIDE]
    assert len(sources) > 20
    hits = [
        f"{path.relative_to(FLEETPROV.parent)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if DISABLING.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_no_configuration_key_is_about_verification(emulator: Emulator, tmp_path: Path) -> None:
    """Every key the configuration has, as check-config prints them: none could switch verification off."""
    result = fleetprov("check-config", "--config", str(device_config(emulator, tmp_path)))
    assert result.returncode == 0, result.stderr

    def keys(value: Any, prefix: str = "") -> Iterator[str]:
        if isinstance(value, dict):
            for key, child in value.items():
                yield f"{prefix}{key}"
                yield from keys(child, f"{prefix}{key}.")

    names = list(keys(yaml.safe_load(result.stdout)))
    assert "root_ca" in names and "proxy" in names
    assert not [name for name in names if re.search(r"verif|insecure|tls|ssl|skip|trust", name, re.IGNORECASE)]


@pytest.mark.parametrize(
    "extra",
    [
        {"verify": False},
        {"insecure": True},
        {"tls": {"verify": False}},
        {"ssl_verify": False},
        {"claim": {"verify": False}},
        {"proxy": {"host": "p", "port": 3128, "insecure": True}},
    ],
    ids=["verify", "insecure", "tls.verify", "ssl_verify", "claim.verify", "proxy.insecure"],
)
def test_keys_that_would_disable_verification_are_refused(
    emulator: Emulator, tmp_path: Path, extra: dict[str, Any]
) -> None:
    config = device_config(emulator, tmp_path)
    settings = yaml.safe_load(config.read_text())
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    config.write_text(yaml.safe_dump(settings))
    for command in (["check-config"], ["--once"]):
        result = fleetprov(*command, "--config", str(config))
        assert result.returncode == 78, result.stderr
        assert "unknown key" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def impostor_ca(path: Path) -> Path:
    """A root CA that did not sign the emulator's server certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Impostor Root CA")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.timeout(300)
def test_a_server_the_root_ca_did_not_sign_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    """The emulator's server certificate does not chain to root_ca: the claim never gets to say anything.

    awscrt's TLS (s2n) delays a failed handshake by 10-30 s on purpose, hence the long operation timeout: with a
    short one the failure would read "no answer" instead of naming TLS. Variables that look like switches for
    verification change nothing: fleetprov has none."""
    certificates_before = len(emulator.admin("certificates"))
    config = configure(
        emulator,
        tmp_path,
        root_ca=str(impostor_ca(tmp_path / "impostor-ca.pem")),
        operation_timeout=60,
        retry={"initial_delay": 0.1, "max_delay": 0.1, "max_attempts": 1, "budget": 1},
    )
    switches = {"FLEETPROV_INSECURE": "1", "FLEETPROV_VERIFY": "false", "FLEETPROV_TLS__VERIFY": "false"}
    result = fleetprov("--once", "--config", str(config), env=switches, timeout=240)
    assert result.returncode in (69, 75), result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("fleetprov: connect: ") and "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE" in last, last
    state = tmp_path / "state"
    assert not os.path.lexists(state / "current") and not list((state / "generations").iterdir())
    assert len(emulator.admin("certificates")) == certificates_before  # not even CreateCertificate was sent
