"""The emulator's CloudFormation settings: YAML `cloudformation:` and serve's --cloudformation / --parameter."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetprov.emulator.settings import EmulatorSettings, load_settings, with_flags
from fleetprov.errors import ConfigError


def flags(settings: EmulatorSettings, **overrides: Any) -> EmulatorSettings:
    values: dict[str, Any] = {
        "host": None, "port": None, "token_ttl": None, "templates": [], "hooks": [], "reply_delay": None,
        "close_after": None, "throttle": None, "rejects": [], "thing_groups": [],
    }  # fmt: skip
    return with_flags(settings, **{**values, **overrides})


def load(tmp_path: Path, text: str) -> EmulatorSettings:
    path = tmp_path / "emulator.yaml"
    path.write_text(textwrap.dedent(text))
    return load_settings(path, tmp_path / "state")


def test_yaml_names_the_file_and_its_parameters(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        """
        cloudformation:
          file: aws/fleetprov-cloud.yaml
          parameters: {AllowedSerialPrefix: fp-, Count: 5}
        """,
    )
    assert settings.cloudformation == tmp_path / "aws" / "fleetprov-cloud.yaml"
    assert settings.cloudformation_parameters == (("AllowedSerialPrefix", "fp-"), ("Count", "5"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cloudformation: {parameters: {}}", "cloudformation.file: missing"),
        ("cloudformation: {file: x.yaml, parameters: {A: true}}", "cloudformation.parameters.A: expected a string"),
        ("cloudformation: {file: x.yaml, extra: 1}", "cloudformation.extra: unknown key"),
        ("cloudformation: {file: x.yaml}\nclaim_templates: [a]", "claim_templates: the claim's policy comes from"),
    ],
)
def test_yaml_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_flags_give_the_file_and_parameters(tmp_path: Path) -> None:
    settings = flags(
        EmulatorSettings(state_dir=tmp_path),
        cloudformation=Path("cloud.yaml"),
        parameters=["ClaimCertificateCsr=-----BEGIN==\nx==", "Empty=", "Empty=again"],
    )
    assert settings.cloudformation == Path("cloud.yaml")
    assert settings.cloudformation_parameters == (("ClaimCertificateCsr", "-----BEGIN==\nx=="), ("Empty", "again"))


def test_flag_parameters_override_the_yamls_for_the_same_file(tmp_path: Path) -> None:
    settings = load(tmp_path, "cloudformation: {file: cloud.yaml, parameters: {A: yaml, B: yaml}}")
    assert flags(settings, parameters=["B=flag"]).cloudformation_parameters == (("A", "yaml"), ("B", "flag"))
    other = flags(settings, cloudformation=tmp_path / "other.yaml", parameters=["B=flag"])
    assert other.cloudformation_parameters == (("B", "flag"),)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parameters": ["A=b"]}, "--parameter: gives a value to a parameter of --cloudformation FILE"),
        ({"cloudformation": Path("c.yaml"), "parameters": ["novalue"]}, "--parameter novalue: expected KEY=VALUE"),
        ({"cloudformation": Path("c.yaml"), "parameters": ["=x"]}, "--parameter =x: expected KEY=VALUE"),
    ],
)
def test_flag_errors(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        flags(EmulatorSettings(state_dir=tmp_path), **overrides)


def test_claim_templates_and_a_cloudformation_flag(tmp_path: Path) -> None:
    settings = load(tmp_path, "claim_templates: [demo]")
    with pytest.raises(ConfigError, match="the claim's policy comes from the file"):
        flags(settings, cloudformation=Path("c.yaml"))
