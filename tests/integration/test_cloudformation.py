"""The cloud side as code: configs/aws/fleetprov-cloud.yaml passes cfn-lint, and `fleetprov emulator serve
--cloudformation` runs that same file: a device provisions with `fleetprov --once`, the registry holds what the
template describes, the file's claim policy is the one enforced, its inline hook allows and denies, and a
changed TemplateBody changes what the emulator creates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetprov.emulator.launch import launch
from fleetprov.emulator.registry import Registry
from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX
from tests.agentprocess import first_rotation
from tests.support import (
    Emulator,
    RawClient,
    assert_claim_cannot_take_client_id,
    device_config,
    fleetprov,
    make_csr,
    start_emulator,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "aws" / "fleetprov-cloud.yaml"
REGION, ACCOUNT = "us-east-1", "123456789012"
ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}"


def test_cfn_lint_passes() -> None:
    # cfn-lint (the `test` extra) ships its resource specs and downloads nothing unless asked to --update-specs.
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from cfnlint.runner import main; sys.exit(main())", str(TEMPLATE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode & 2 == 0, f"cfn-lint errors:\n{result.stdout}{result.stderr}"  # 2: an error
    assert result.returncode == 0, f"cfn-lint warnings:\n{result.stdout}{result.stderr}"


def _factory_claim(directory: Path) -> tuple[Path, str]:
    """A claim key and its CSR as the factory makes them, with openssl (docs/emulator.md "Going to AWS")."""
    directory.mkdir(parents=True)
    key, csr = directory / "claim.key", directory / "claim.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
         str(key), "-subj", "/CN=fleetprov claim", "-out", str(csr)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    return key, csr.read_text()


@pytest.fixture(scope="module")
def stack_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """The repository's template with a claim CSR from the factory and a serial-number prefix for the hook."""
    base = tmp_path_factory.mktemp("cloudformation")
    claim_key, csr = _factory_claim(base / "factory")
    state = base / "state"
    running = launch(
        state, "--cloudformation", str(TEMPLATE), "--parameter", "AllowedSerialPrefix=fp-",
        "--parameter", f"ClaimCertificateCsr={csr}", log_path=base / "emulator.log",
    )  # fmt: skip
    info = running.endpoint
    assert info["claim_private_key"] is None  # the key stayed at the factory
    yield Emulator(
        state_dir=state, process=running.process, host=info["host"], port=info["port"],
        root_ca=Path(info["root_ca"]), claim_cert=Path(info["claim_certificate"]), claim_key=claim_key,
        claim_certificate_id=info["claim_certificate_id"], templates=info["templates"], log_path=base / "emulator.log",
        running=running,
    )  # fmt: skip
    assert running.stop() == 0, (base / "emulator.log").read_text()


def _provision(emulator: Emulator, directory: Path, serial: str) -> subprocess.CompletedProcess[str]:
    config = device_config(emulator, directory, "--serial", serial, "--claim-key", str(emulator.claim_key))
    return fleetprov("--once", "--config", str(config))


def _registry(emulator: Emulator) -> Registry:
    return Registry(emulator.state_dir / "registry.sqlite")


def test_a_device_gets_what_the_template_describes(stack_emulator: Emulator, tmp_path: Path) -> None:
    assert stack_emulator.templates == ["fleetprov-fleet"]  # device-config's default template: the file's
    result = _provision(stack_emulator, tmp_path, "fp-1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "state" / "current" / "manifest.json").read_text())
    assert manifest["template"] == "fleetprov-fleet"
    assert manifest["device_configuration"] == {"telemetryTopic": "devices/fleetprov-fp-1/telemetry"}

    [thing] = [thing for thing in stack_emulator.admin("things") if thing["thingName"] == "fleetprov-fp-1"]
    assert thing["attributes"] == {"serialNumber": "fp-1"}
    assert thing["principals"] == [manifest["certificate_id"]]
    certificates = {cert["certificateId"]: cert for cert in stack_emulator.admin("certificates")}
    device = certificates[manifest["certificate_id"]]
    assert device["status"] == "ACTIVE" and device["policies"] == ["fleetprov-fleet-device"]
    registry = _registry(stack_emulator)
    try:
        document = json.loads(registry.policy_document("fleetprov-fleet-device") or "{}")
    finally:
        registry.close()
    variable = "${iot:Connection.Thing.ThingName}"
    assert [statement["Resource"] for statement in document["Statement"]] == [
        f"{ARN}:client/{variable}",
        f"{ARN}:topic/devices/{variable}/*",
        f"{ARN}:topicfilter/devices/{variable}/*",
        [f"{ARN}:topic/{topic}" for topic in ROTATION_TOPICS],
        [f"{ARN}:topicfilter/{topic}" for topic in ROTATION_TOPICS],
    ]


ROTATION_TOPICS = ("$aws/certificates/create-from-csr/*", "$aws/provisioning-templates/fleetprov-fleet/provision/*")


def test_the_claim_is_the_factorys_with_the_files_policy(stack_emulator: Emulator) -> None:
    claim = {cert["certificateId"]: cert for cert in stack_emulator.admin("certificates")}[
        stack_emulator.claim_certificate_id
    ]
    assert claim["kind"] == "claim" and claim["status"] == "ACTIVE"
    assert claim["policies"] == ["fleetprov-fleet-claim"]
    issued = x509.load_pem_x509_certificate(stack_emulator.claim_cert.read_bytes()).public_key()
    factory = serialization.load_pem_private_key(stack_emulator.claim_key.read_bytes(), None).public_key()
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert issued.public_bytes(*spki) == factory.public_bytes(*spki)
    registry = _registry(stack_emulator)
    try:
        document = json.loads(registry.policy_document("fleetprov-fleet-claim") or "{}")
    finally:
        registry.close()
    # device-config cannot name a key the emulator never had.
    without_key = fleetprov("emulator", "device-config", "--state-dir", str(stack_emulator.state_dir))
    assert without_key.returncode == 78 and "give --claim-key" in without_key.stderr
    assert document["Statement"][1]["Resource"] == [
        f"{ARN}:topic/$aws/certificates/create/*",
        f"{ARN}:topic/$aws/certificates/create-from-csr/*",
        f"{ARN}:topic/$aws/provisioning-templates/fleetprov-fleet/provision/*",
    ]


def test_the_files_claim_policy_keeps_a_device_connected(stack_emulator: Emulator, tmp_path: Path) -> None:
    result = _provision(stack_emulator, tmp_path, "fp-takeover")
    assert result.returncode == 0, result.stderr
    current = tmp_path / "state" / "current"
    thing = "fleetprov-fp-takeover"
    assert_claim_cannot_take_client_id(stack_emulator, current / "certificate.pem", current / "private.key", thing)


def test_a_publish_outside_the_files_claim_policy_closes_the_connection(stack_emulator: Emulator) -> None:
    client = RawClient(
        stack_emulator, stack_emulator.claim_cert, stack_emulator.claim_key, CLAIM_CLIENT_ID_PREFIX + "outside-policy"
    )
    try:
        csr_request = json.dumps({"certificateSigningRequest": make_csr()[0]}).encode()
        topic, _ = client.request("$aws/certificates/create-from-csr/json", csr_request)
        assert topic.endswith("/accepted")  # inside the policy
        # Another template's topic: the emulator's built-in claim policy allows it, the file's does not.
        client.publish("$aws/provisioning-templates/fleetprov-demo/provision/json", b"{}")
        assert client.interrupted.wait(20), "the connection stayed open after a publish outside the claim policy"
    finally:
        client.close()


def test_the_inline_hook_allows_and_denies(stack_emulator: Emulator, tmp_path: Path) -> None:
    allowed = _provision(stack_emulator, tmp_path / "allowed", "fp-hooked")
    assert allowed.returncode == 0, allowed.stderr
    denied = _provision(stack_emulator, tmp_path / "denied", "xx-hooked")
    assert denied.returncode == 77, denied.stderr
    assert "403 AccessDenied" in denied.stderr and "pre-provisioning hook denied provisioning" in denied.stderr
    names = [thing["thingName"] for thing in stack_emulator.admin("things")]
    assert "fleetprov-fp-hooked" in names and "fleetprov-xx-hooked" not in names
    log = stack_emulator.log()
    assert "SerialNumber 'fp-hooked'" in log and "allowed" in log
    assert "SerialNumber 'xx-hooked'" in log and "denied" in log


def test_what_is_not_emulated_is_logged(stack_emulator: Emulator) -> None:
    log = stack_emulator.log()
    assert "not emulated: Resources.ProvisioningRole (AWS::IAM::Role)" in log
    assert "not emulated: Resources.PreProvisioningHookPermission (AWS::Lambda::Permission)" in log
    assert f"output ClaimCertificateId: {stack_emulator.claim_certificate_id}" in log


def test_the_file_alone_and_a_changed_template_body(tmp_path: Path) -> None:
    copy = tmp_path / "cloud.yaml"
    shutil.copy(TEMPLATE, copy)
    first = start_emulator(tmp_path / "state", "--cloudformation", str(copy))
    try:
        assert first.claim_key.exists()  # no CSR given: the emulator made the claim key
        result = fleetprov("--once", "--config", str(device_config(first, tmp_path / "a", "--serial", "a-1")))
        assert result.returncode == 0, result.stderr
    finally:
        assert first.stop() == 0

    # Only the TemplateBody in the copy changes: another thing name and one more attribute.
    text = copy.read_text()
    old = '"ThingName": {"Fn::Join": ["", ["${ThingNamePrefix}", {"Ref": "SerialNumber"}]]},'
    new = '"ThingName": {"Fn::Join": ["", ["widget-", {"Ref": "SerialNumber"}]]},'
    assert old in text
    text = text.replace(old, new).replace(
        '"AttributePayload": {"serialNumber": {"Ref": "SerialNumber"}}',
        '"AttributePayload": {"serialNumber": {"Ref": "SerialNumber"}, "model": "w2"}',
    )
    copy.write_text(text)
    second = start_emulator(tmp_path / "state", "--cloudformation", str(copy))
    try:
        assert second.claim_certificate_id == first.claim_certificate_id  # the same claim: it still fits
        result = fleetprov("--once", "--config", str(device_config(second, tmp_path / "b", "--serial", "b-1")))
        assert result.returncode == 0, result.stderr
        things = {thing["thingName"]: thing for thing in second.admin("things")}
    finally:
        assert second.stop() == 0
    assert set(things) == {"fleetprov-a-1", "widget-b-1"}
    assert things["widget-b-1"]["attributes"] == {"serialNumber": "b-1", "model": "w2"}


def test_what_the_emulator_cannot_run_is_a_configuration_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump(
            {
                "Resources": {
                    "Archive": {"Type": "AWS::S3::Bucket"},
                    "Hook": {
                        "Type": "AWS::Lambda::Function",
                        "Properties": {"Runtime": "python3.12", "Handler": "index.handler", "Role": "r",
                                       "Code": {"ZipFile": "x"}, "Layers": ["arn:aws:lambda:::layer:x:1"]},
                    },
                }
            }
        )
    )  # fmt: skip
    result = fleetprov("emulator", "serve", "--state-dir", str(tmp_path / "state"), "--cloudformation", str(broken))
    assert result.returncode == 78, result.stderr
    assert str(broken) in result.stderr
    assert "Resources.Archive: type AWS::S3::Bucket is not emulated" in result.stderr
    assert "Resources.Hook.Properties.Layers: a layer would change what the handler can import" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "endpoint.json").exists()

    missing = fleetprov("emulator", "serve", "--state-dir", str(tmp_path / "s2"), "--parameter", "A=b")
    assert missing.returncode == 78 and "--cloudformation FILE" in missing.stderr


def test_the_files_device_policy_lets_the_daemon_rotate(
    emulator_with: object, start_agent: object, tmp_path: Path
) -> None:
    """The stack as shipped supports rotation: certificates valid for 30 s, rotate_before 12 s; the daemon
    rotates over its connection with the same template (and its hook), and the same thing keeps its name."""
    emulator = emulator_with("--cloudformation", str(TEMPLATE), "--certificate-validity", "30")  # type: ignore[operator]
    config = device_config(emulator, tmp_path / "device", "--serial", "fp-rotates")
    settings = yaml.safe_load(config.read_text())
    settings["daemon"] = {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1, "rotate_before": 12}
    config.write_text(yaml.safe_dump(settings))
    state = tmp_path / "device" / "state"
    agent, first, second = first_rotation(start_agent, config, state)
    assert first["thing_name"] == second["thing_name"] == "fleetprov-fp-rotates"
    assert second["certificate_id"] != first["certificate_id"]
    certificates = {cert["certificateId"]: cert for cert in emulator.admin("certificates")}
    assert certificates[second["certificate_id"]]["policies"] == ["fleetprov-fleet-device"]
    assert agent.stop() == 0, agent.log()
