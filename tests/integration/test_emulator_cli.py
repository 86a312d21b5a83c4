"""`fleetprov emulator ...` as a user runs it: state reuse, shutdown, admin commands and clear failures."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

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
    client = RawClient(emulator, cert, key, "second-claim")
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
