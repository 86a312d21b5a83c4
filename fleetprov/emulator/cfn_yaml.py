"""Read a CloudFormation template file (YAML or JSON) into plain data, with the short-form tags spelled out.

``!Ref X`` becomes ``{"Ref": "X"}``, ``!Condition X`` becomes ``{"Condition": "X"}``, any other ``!Name arg``
becomes ``{"Fn::Name": arg}`` (``!GetAtt A.B`` becomes ``{"Fn::GetAtt": ["A", "B"]}``), as CloudFormation
reads them. Whether the emulator can evaluate a function is the evaluator's business (cfn_functions.py), so an
unknown tag is kept rather than refused here. As in CloudFormation, a timestamp-looking scalar stays a
string (``AWSTemplateFormatVersion: 2010-09-09``) and a key given twice in one mapping is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fleetprov.errors import ConfigError
from fleetprov.yamlread import describe_yaml_error, read_text_file


class _CloudFormationLoader(yaml.SafeLoader):
    """SafeLoader plus CloudFormation's short-form intrinsic function tags."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    argument: Any
    if isinstance(node, yaml.ScalarNode):
        argument = loader.construct_scalar(node)
        if suffix == "GetAtt":  # "Resource.Attribute"; the attribute itself may hold dots
            resource, _, attribute = str(argument).partition(".")
            argument = [resource, attribute]
    elif isinstance(node, yaml.SequenceNode):
        argument = loader.construct_sequence(node, deep=True)
    else:
        argument = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    key = suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}"
    return {key: argument}


def _timestamp_as_text(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_CloudFormationLoader.add_multi_constructor("!", _intrinsic)
_CloudFormationLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


def parse_cloudformation(text: str) -> Any:
    """The document in ``text``; yaml.YAMLError if it is not YAML (JSON is YAML too)."""
    try:
        return yaml.load(text, Loader=_CloudFormationLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError:
        raise
    except Exception as exc:  # PyYAML lets other errors through for values such as "!!int abc"
        raise yaml.YAMLError(f"a value YAML cannot build ({type(exc).__name__})") from exc


def load_cloudformation(path: Path) -> dict[str, Any]:
    """The template in ``path`` as a mapping; ConfigError naming the file if it cannot be one."""
    text = read_text_file(path)
    try:
        document = parse_cloudformation(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not a valid YAML or JSON template: {describe_yaml_error(exc)}", step="config"
        ) from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a CloudFormation template (a mapping with Resources)", step="config")
    return document
