"""`fleetprov claim install` run as an installer would: exit codes, one-line messages, nothing written on
errors, no key material in any output, and a kill mid-install that leaves the pending claim as it was."""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
from pathlib import Path
from typing import Any, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import fleetprov, key_pem


def write_claim(directory: Path, not_after: Optional[dt.datetime] = None) -> tuple[Path, Path, str]:
    """claim.pem and claim.key as CreateProvisioningClaim's reply would give them (valid 5 minutes from now, as
    a temporary claim, unless ``not_after`` says otherwise); and the key's PEM body."""
    now = dt.datetime.now(dt.timezone.utc)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AWS IoT Certificate")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(not_after or now + dt.timedelta(minutes=5))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "claim.pem", directory / "claim.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path, "".join(key_pem(key).decode().splitlines()[1:-1])


def config_file(directory: Path, inbox: bool = True) -> Path:
    """A trusted-user device configuration (claim.inbox), or one with a claim certificate and no inbox."""
    directory.mkdir(parents=True, exist_ok=True)
    claim = f"{{inbox: {directory / 'inbox'}}}" if inbox else "{certificate: /claim.crt, private_key: /claim.key}"
    path = directory / "config.yaml"
    path.write_text(
        f"endpoint: localhost\nroot_ca: /ca.pem\nclaim: {claim}\nprovisioning: {{template: T}}\n"
        f"state_dir: {directory / 'state'}\n"
    )
    return path


def install(config: Path, certificate: Path, key: Path, **env: str) -> Any:
    return fleetprov("claim", "install", "--config", str(config), "--certificate", str(certificate),
                     "--key", str(key), env=env or None)  # fmt: skip


def tree(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        return {}
    return {
        str(path): os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
        for path in sorted(directory.rglob("*"))
    }


def test_install_says_what_it_installed(tmp_path: Path) -> None:
    cert, key, key_body = write_claim(tmp_path / "app")
    config = config_file(tmp_path / "device")
    result = install(config, cert, key)
    assert result.returncode == 0, result.stderr
    inbox = tmp_path / "device" / "inbox"
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    certificate_id = certificate.fingerprint(hashes.SHA256()).hex()
    assert result.stdout == (
        f"installed temporary claim {certificate_id[:12]} in {inbox}, valid until "
        f"{certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}: a running fleetprov picks it up\n"
    )
    assert key_body[:20] not in result.stdout + result.stderr
    entry = inbox / os.readlink(inbox / "pending")
    assert (entry / "certificate.pem").read_bytes() == cert.read_bytes()
    assert stat.S_IMODE((entry / "private.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(inbox.stat().st_mode) == 0o700


def test_without_claim_inbox_the_device_takes_no_temporary_claims(tmp_path: Path) -> None:
    cert, key, _ = write_claim(tmp_path / "app")
    config = config_file(tmp_path / "device", inbox=False)
    # --config before the command works too
    result = fleetprov("--config", str(config), "claim", "install", "--certificate", str(cert), "--key", str(key))
    assert result.returncode == 78, result.stderr
    assert "claim.inbox is not set" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "device" / "state").exists()


def test_a_second_install_replaces_the_first(tmp_path: Path) -> None:
    config = config_file(tmp_path / "device")
    first, second = write_claim(tmp_path / "first"), write_claim(tmp_path / "second")
    assert install(config, first[0], first[1]).returncode == 0
    assert install(config, second[0], second[1]).returncode == 0
    inbox = tmp_path / "device" / "inbox"
    assert len(list(inbox.iterdir())) == 2  # pending and the one claim it points at
    assert (inbox / "pending" / "certificate.pem").read_bytes() == second[0].read_bytes()


@pytest.mark.parametrize("earlier", [False, True], ids=["empty inbox", "claim pending"])
def test_errors_exit_codes_and_nothing_written(tmp_path: Path, earlier: bool) -> None:
    config = config_file(tmp_path / "device")
    inbox = tmp_path / "device" / "inbox"
    if earlier:
        previous = write_claim(tmp_path / "earlier")
        assert install(config, previous[0], previous[1]).returncode == 0
    before = tree(inbox)
    cert, key, key_body = write_claim(tmp_path / "app")
    _, other_key, other_body = write_claim(tmp_path / "other")
    a_second_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    expired_cert, expired_key, _ = write_claim(tmp_path / "expired", not_after=a_second_ago)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\xff not PEM at all")
    cases = [
        (cert, other_key, 65, f"claim: the private key {other_key} is not the key of the certificate"),
        (expired_cert, expired_key, 65, f"claim: the certificate {expired_cert} expired at "),
        (garbage, key, 65, f"claim: the certificate {garbage} is not a PEM certificate"),
        (cert, garbage, 65, f"claim: the private key {garbage} is not a PEM private key"),
        (key, cert, 65, f"claim: the certificate {key} is not a PEM certificate (it holds: PRIVATE KEY)"),
        (cert, tmp_path / "nope.key", 65, f"claim: cannot read the private key {tmp_path / 'nope.key'}: No such"),
    ]
    for certificate, private_key, code, message in cases:
        result = install(config, certificate, private_key)
        assert result.returncode == code, (message, result.stderr)
        assert result.stderr.startswith(f"fleetprov: {message}"), result.stderr
        assert result.stderr.count("\n") == 1 and result.stdout == ""
        for body in (key_body, other_body):
            assert body[:20] not in result.stderr
        assert tree(inbox) == before


def test_usage_config_and_storage_errors(tmp_path: Path) -> None:
    cert, key, _ = write_claim(tmp_path / "app")
    usage = fleetprov("claim")
    assert usage.returncode == 64 and "install" in usage.stderr

    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("endpoint: [\n")
    result = install(bad_config, cert, key)
    assert result.returncode == 78, result.stderr

    device = tmp_path / "device"
    config = config_file(device)
    device.mkdir(exist_ok=True)
    (device / "inbox").write_text("a file where the inbox belongs")
    result = install(config, cert, key)
    assert result.returncode == 73, result.stderr
    assert f"cannot lock {device / 'inbox'}: Not a directory" in result.stderr


@pytest.mark.parametrize("file_name", ["certificate.pem", "private.key"])
def test_killed_mid_install_the_pending_claim_stays(tmp_path: Path, file_name: str) -> None:
    config = config_file(tmp_path / "device")
    inbox = tmp_path / "device" / "inbox"
    previous = write_claim(tmp_path / "earlier")
    assert install(config, previous[0], previous[1]).returncode == 0
    cert, key, _ = write_claim(tmp_path / "app")

    killed = install(config, cert, key, FLEETPROV_CRASH_AT=f"mid-write:{file_name}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (inbox / "pending" / "certificate.pem").read_bytes() == previous[0].read_bytes()
    assert any(path.name.startswith(".incoming-") for path in inbox.iterdir())  # the half-built one

    assert install(config, cert, key).returncode == 0
    assert (inbox / "pending" / "certificate.pem").read_bytes() == cert.read_bytes()
    assert len(list(inbox.iterdir())) == 2  # the leftovers are gone
