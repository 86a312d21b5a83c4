"""`fleetprov emulator ...` as a user runs it: state reuse, shutdown, admin commands and clear failures."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX
from tests.support import Emulator, RawClient, fleetprov, make_csr, provision_csr, start_emulator


def test_restart_reuses_state_and_shutdown_removes_endpoint(tmp_path: Path) -> None:
    first = start_emulator(tmp_path / "state")
    root_ca, claim_id = first.root_ca.read_bytes(), first.claim_certificate_id
    provision_csr(first, "restart-claim", {"SerialNumber": "persist"})
    assert first.stop() == 0
    assert not (tmp_path / "state" / "endpoint.json").exists()

    second = start_emulator(tmp_path / "state")
    try:
        assert second.root_ca.read_bytes() == root_ca
        assert second.claim_certificate_id == claim_id
        assert [t["thingName"] for t in second.admin("things")] == ["fleetprov-persist"]
        reply, *_ = provision_csr(second, "restart-claim", {"SerialNumber": "again"})
        assert reply.thing_name == "fleetprov-again"
    finally:
        assert second.stop() == 0


def test_another_claim_certificate(emulator: Emulator, tmp_path: Path) -> None:
    created = emulator.admin("claim", "--out", str(tmp_path / "claim2"))
    cert, key = Path(created["certificate"]), Path(created["privateKey"])
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    [record] = [c for c in emulator.admin("certificates") if c["certificateId"] == created["certificateId"]]
    assert (record["kind"], record["status"], record["policies"]) == ("claim", "ACTIVE", ["fleetprov-claim-policy"])
    client = RawClient(emulator, cert, key, CLAIM_CLIENT_ID_PREFIX + "second-claim")
    try:
        request = json.dumps({"certificateSigningRequest": make_csr()[0]}).encode()
        topic, _ = client.request("$aws/certificates/create-from-csr/json", request)
        assert topic.endswith("/accepted")
    finally:
        client.close()


def test_set_certificate_status_errors(emulator: Emulator) -> None:
    result = fleetprov("emulator", "set-certificate-status", "--state-dir", str(emulator.state_dir), "0" * 64, "ACTIVE")
    assert result.returncode == 78
    assert "no certificate with id" in result.stderr
    assert "Traceback" not in result.stderr


def test_admin_on_a_directory_without_registry(tmp_path: Path) -> None:
    result = fleetprov("emulator", "things", "--state-dir", str(tmp_path))
    assert result.returncode == 78
    assert "holds no emulator registry" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 78, "/etc/fleetprov/config.yaml"),  # no command: the daemon, with the default configuration
        (["emulator"], 2, "required"),
        (["emulator", "serve", "--state-dir", "{tmp}/s", "--template", "x=/nonexistent.json"], 78, "cannot read"),
        (["emulator", "serve", "--state-dir", "{tmp}/s", "--template", "broken"], 78, "expected NAME=VALUE"),
        (["emulator", "serve", "--state-dir", "{tmp}/s", "--config", "{tmp}/missing.yaml"], 78, "cannot read"),
        (["emulator", "serve", "--state-dir", "{tmp}/s", "--reject", "Foo:1:500:X"], 78, "is not one of"),
        (["emulator", "serve", "--state-dir", "{tmp}/s", "--token-ttl", "0"], 78, "--token-ttl"),
        (["emulator", "serve", "--state-dir", "{tmp}/s", "--hook", "nope=true"], 78, "no template named"),
    ],
)
def test_usage_and_configuration_errors(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = fleetprov(*[arg.replace("{tmp}", str(tmp_path)) for arg in args])
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_template_file_is_a_configuration_error(tmp_path: Path) -> None:
    template = tmp_path / "bad.json"
    template.write_text('{"Resources": {"x": {"Type": "AWS::S3::Bucket", "Properties": {}}}}')
    result = fleetprov("emulator", "serve", "--state-dir", str(tmp_path / "s"), "--template", f"bad={template}")
    assert result.returncode == 78
    assert "template bad" in result.stderr and "AWS::S3::Bucket" in result.stderr


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fleetprov("emulator", "serve", "--state-dir", str(tmp_path / "s"), "--port", str(port))
    assert result.returncode == 78
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = fleetprov("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("fleetprov 0.")


def test_certificate_validity_makes_short_lived_device_certificates(tmp_path: Path) -> None:
    """`serve --certificate-validity 120`: the device certificate's not-after is its issue time + 120 s."""
    import datetime as dt
    import subprocess
    import time

    from tests.support import device_config

    emulator = start_emulator(tmp_path / "emulator", "--certificate-validity", "120")
    try:
        config = device_config(emulator, tmp_path / "device", "--serial", "short-lived")
        before = time.time()
        result = fleetprov("--once", "--config", str(config))
        after = time.time()
        assert result.returncode == 0, result.stderr
        assert "device certificates are valid for 120 seconds" in emulator.log()

        current = tmp_path / "device" / "state" / "current"
        manifest = json.loads((current / "manifest.json").read_text())
        [record] = [c for c in emulator.admin("certificates") if c["certificateId"] == manifest["certificate_id"]]
        claim = [c for c in emulator.admin("certificates") if c["kind"] == "claim"]
    finally:
        assert emulator.stop() == 0, emulator.log()

    def openssl_date(option: str, cert: Path) -> float:
        out = subprocess.run(
            ["openssl", "x509", option, "-noout", "-in", str(cert)], check=True, capture_output=True, text=True
        ).stdout.strip()  # notAfter=Nov 23 16:38:17 2026 GMT
        moment = dt.datetime.strptime(out.split("=", 1)[1], "%b %d %H:%M:%S %Y GMT")
        return moment.replace(tzinfo=dt.timezone.utc).timestamp()

    not_after = openssl_date("-enddate", current / "certificate.pem")
    not_before = openssl_date("-startdate", current / "certificate.pem")
    # The issue time, from the registry (recorded right after signing) and from the clock around the run.
    # not-before is backdated a little, so it is not the issue time; X.509 keeps whole seconds.
    issued_at = record["createdAt"]
    assert before - 1 <= issued_at <= after
    assert 118 <= not_after - issued_at <= 120.5
    assert before + 119 <= not_after <= after + 120
    assert not_before <= issued_at
    assert manifest["not_after"] == dt.datetime.fromtimestamp(not_after, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Device certificates only: the claim keeps its years.
    assert len(claim) == 1
    claim_end = openssl_date("-enddate", emulator.claim_cert)
    assert claim_end - before > 3000 * 86400


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--certificate-validity", "0"], "--certificate-validity 0: must be a positive number of seconds"),
        (["--certificate-validity", "-5"], "--certificate-validity -5: must be a positive number of seconds"),
        (["--certificate-validity", "soon"], "--certificate-validity soon: not a number of seconds"),
        (["--certificate-validity", "1e20"], "--certificate-validity 1e20: 1e+20 seconds is too long"),
        (["--config", "{tmp}/e.yaml"], "e.yaml: certificate_validity: must be a positive number of seconds"),
    ],
)
def test_bad_certificate_validity(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "e.yaml").write_text("certificate_validity: -1\n")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = fleetprov("emulator", "serve", "--state-dir", str(tmp_path / "s"), *argv)
    assert result.returncode == 78, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


def test_serve_help_documents_certificate_validity() -> None:
    result = fleetprov("emulator", "serve", "--help")
    assert result.returncode == 0
    assert "--certificate-validity SECONDS" in result.stdout
    assert "device certificates" in " ".join(result.stdout.split())
