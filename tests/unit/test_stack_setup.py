"""Installing a CloudFormation stack into the emulator's state (server.prepare_state with --cloudformation):
templates and hooks in the registry, and the claim certificate with exactly the file's policies, kept while it
fits the file and replaced when it does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetprov.emulator.registry import Registry
from fleetprov.emulator.server import CLAIM_POLICY_NAME, PreparedState, prepare_state
from fleetprov.emulator.settings import EmulatorSettings
from fleetprov.errors import ConfigError
from tests.support import make_csr

REPO_TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "aws" / "fleetprov-cloud.yaml"


def prepared(state_dir: Path, template: Path = REPO_TEMPLATE, **parameters: str) -> PreparedState:
    settings = EmulatorSettings(
        state_dir=state_dir, cloudformation=template, cloudformation_parameters=tuple(parameters.items())
    )
    state = prepare_state(settings)
    state.registry.close()
    return state


def claim_policies(state_dir: Path, certificate_id: str) -> dict[str, str]:
    registry = Registry(state_dir / "registry.sqlite")
    try:
        return dict(registry.policies_for_certificate(certificate_id))
    finally:
        registry.close()


def status(state_dir: Path, certificate_id: str) -> str:
    registry = Registry(state_dir / "registry.sqlite")
    try:
        record = registry.certificate(certificate_id)
        assert record is not None
        return record.status
    finally:
        registry.close()


def public_der(pem: bytes) -> bytes:
    key = x509.load_pem_x509_certificate(pem).public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_the_file_alone_gives_an_own_key_claim_with_the_files_policy(tmp_path: Path) -> None:
    state = prepared(tmp_path / "state")
    assert state.templates == ["fleetprov-fleet"]  # not the demo template
    assert state.claim.private_key == tmp_path / "state" / "claim" / "claim.key"
    policies = claim_policies(tmp_path / "state", state.claim.certificate_id)
    assert list(policies) == ["fleetprov-fleet-claim"]
    document = json.loads(policies["fleetprov-fleet-claim"])
    assert document["Statement"][1]["Resource"][2] == (
        "arn:aws:iot:us-east-1:123456789012:topic/$aws/provisioning-templates/fleetprov-fleet/provision/*"
    )
    registry = Registry(tmp_path / "state" / "registry.sqlite")
    record = registry.template("fleetprov-fleet")
    assert registry.template_names() == ["fleetprov-fleet"]
    assert registry.policy_document(CLAIM_POLICY_NAME) is None
    registry.close()
    assert record is not None and record.hook is not None and record.hook[-1].endswith("lambda/PreProvisioningHook")
    assert (tmp_path / "state" / "lambda" / "PreProvisioningHook" / "index.py").read_text().startswith("import os")
    # A second start keeps the claim.
    assert prepared(tmp_path / "state").claim == state.claim


def test_a_csr_parameter_makes_the_claim_for_that_key(tmp_path: Path) -> None:
    own = prepared(tmp_path / "state")
    csr, key = make_csr()
    from_csr = prepared(tmp_path / "state", ClaimCertificateCsr=csr)
    assert from_csr.claim.private_key is None
    assert not (tmp_path / "state" / "claim" / "claim.key").exists()
    assert public_der(from_csr.claim.certificate.read_bytes()) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert list(claim_policies(tmp_path / "state", from_csr.claim.certificate_id)) == ["fleetprov-fleet-claim"]
    assert status(tmp_path / "state", own.claim.certificate_id) == "INACTIVE"
    assert status(tmp_path / "state", from_csr.claim.certificate_id) == "ACTIVE"
    # Same CSR, same claim; without it the emulator makes its own key again.
    assert prepared(tmp_path / "state", ClaimCertificateCsr=csr).claim == from_csr.claim
    again = prepared(tmp_path / "state")
    assert again.claim.private_key is not None and again.claim.certificate_id != from_csr.claim.certificate_id


def test_other_policies_replace_the_claim(tmp_path: Path) -> None:
    first = prepared(tmp_path / "state")
    renamed = prepared(tmp_path / "state", TemplateName="widgets")
    assert renamed.claim.certificate_id != first.claim.certificate_id
    assert list(claim_policies(tmp_path / "state", renamed.claim.certificate_id)) == ["widgets-claim"]
    assert renamed.templates[0] == "widgets"


def test_a_claim_from_the_built_in_policy_is_not_reused(tmp_path: Path) -> None:
    builtin = prepare_state(EmulatorSettings(state_dir=tmp_path / "state"))
    builtin.registry.close()
    stacked = prepared(tmp_path / "state")
    assert stacked.claim.certificate_id != builtin.claim.certificate_id
    assert list(claim_policies(tmp_path / "state", stacked.claim.certificate_id)) == ["fleetprov-fleet-claim"]
    assert stacked.templates[0] == "fleetprov-fleet"  # then what an earlier start served (fleetprov-demo)


def test_a_bad_csr_names_the_property_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Resources\.ClaimCertificate\.Properties\.CertificateSigningRequest: "):
        prepared(tmp_path / "state", ClaimCertificateCsr="not a CSR")
    assert list((tmp_path / "state").iterdir()) == []


def test_a_file_the_emulator_cannot_run_changes_nothing(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("Resources:\n  Bucket:\n    Type: AWS::S3::Bucket\n")
    with pytest.raises(ConfigError, match="type AWS::S3::Bucket is not emulated"):
        prepared(tmp_path / "state", broken)
    assert list((tmp_path / "state").iterdir()) == []


def test_a_template_disabled_after_it_was_served(tmp_path: Path) -> None:
    prepared(tmp_path / "state")
    disabled = tmp_path / "disabled.yaml"
    shutil.copy(REPO_TEMPLATE, disabled)
    disabled.write_text(disabled.read_text().replace("      Enabled: true\n", "      Enabled: false\n"))
    with pytest.raises(ConfigError, match="template fleetprov-fleet is not Enabled, but this state directory serves"):
        prepared(tmp_path / "state", disabled)
    assert prepared(tmp_path / "fresh", disabled).templates == []
