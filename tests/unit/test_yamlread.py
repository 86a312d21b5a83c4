"""Tests for fleetprov.yamlread: the typed YAML reading shared by the agent's config and the emulator's settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from fleetprov.errors import ConfigError
from fleetprov.yamlread import YamlReader, describe_yaml_error, load_yaml_mapping, parse_yaml


def test_errors_name_where_and_the_dotted_key() -> None:
    top = YamlReader({"a": {"b": {"c": "x"}}}, "/etc/f.yaml")
    inner = top.child("a")
    assert inner is not None
    deeper = inner.child("b")
    assert deeper is not None
    with pytest.raises(ConfigError, match=r"^config: /etc/f\.yaml: a\.b\.c: expected an integer, got str$"):
        deeper.get("c", int)


def test_origins_name_the_override_of_a_key_or_of_a_section_holding_it() -> None:
    origins = {"proxy": "environment variable FLEETPROV_PROXY", "claim.certificate": "command line"}
    top = YamlReader({"proxy": {"host": 1}, "claim": {}}, "f.yaml", origins=origins)
    proxy = top.child("proxy")
    claim = top.child("claim")
    assert proxy is not None
    assert claim is not None
    assert proxy.origin("host") == "environment variable FLEETPROV_PROXY"
    assert str(proxy.error("host", "bad")) == "config: environment variable FLEETPROV_PROXY: proxy.host: bad"
    assert claim.origin("certificate") == "command line"
    assert claim.origin("private_key") is None
    assert str(claim.error("private_key", "missing")) == "config: f.yaml: claim.private_key: missing"
    assert top.origin("port") is None


def test_check_keys_and_booleans() -> None:
    reader = YamlReader({"port": True, 3: "x"}, "f.yaml")
    with pytest.raises(ConfigError, match=r"f\.yaml: port: expected an integer, got a boolean$"):
        reader.get("port", int)
    with pytest.raises(ConfigError, match=r"f\.yaml: 3: unknown key \(known: port\)$"):
        reader.check_keys(["port"])


def test_number() -> None:
    reader = YamlReader({"a": 2, "b": 10**400, "c": 0.5, "d": None}, "f.yaml")
    assert reader.number("a") == 2.0
    assert isinstance(reader.number("a"), float)
    assert reader.number("b") == math.inf  # the caller's range check rejects it
    assert reader.number("c") == 0.5
    assert reader.number("d", 7.0) == 7.0
    assert reader.number("missing") is None


def test_strings() -> None:
    reader = YamlReader({"ok": ["a", "b"], "bad": ["a", ""], "none": None}, "f.yaml")
    assert reader.strings("ok") == ("a", "b")
    assert reader.strings("none") is None
    with pytest.raises(ConfigError, match=r"bad: expected a list of non-empty strings$"):
        reader.strings("bad")


def test_yaml_errors_keep_line_and_column_but_not_the_line_itself() -> None:
    with pytest.raises(yaml.YAMLError) as caught:
        parse_yaml('user: u\npassword: "hunter2\n')
    text = describe_yaml_error(caught.value)
    assert (
        text == "while scanning a quoted scalar (line 2, column 11): found unexpected end of stream (line 3, column 1)"
    )
    assert "hunter2" not in text


@pytest.mark.parametrize("text", ["when: 2001-02-30", "n: !!int hunter2", "b: !!bool hunter2"])
def test_parse_yaml_turns_constructor_crashes_into_yaml_errors(text: str) -> None:
    with pytest.raises(yaml.YAMLError, match=r"^a value YAML cannot build") as caught:
        parse_yaml(text)
    assert "hunter2" not in describe_yaml_error(caught.value)


def test_load_yaml_mapping(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("")
    assert load_yaml_mapping(path) == {}
    path.write_text("a: {b: 1}\n")
    assert load_yaml_mapping(path) == {"a": {"b": 1}}
    path.write_text("[a]\n")
    with pytest.raises(ConfigError, match=r"expected a mapping at the top level$"):
        load_yaml_mapping(path)
