"""Typed reading of YAML configuration files, shared by the agent's config and the emulator's settings.

Every error is a ConfigError that names the file (or the override a value came from) and the dotted
key path, e.g. ``/etc/fleetprov/config.yaml: provisioning.key_type: ...``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, overload

import yaml

from fleetprov.errors import ConfigError, printable


def read_text_file(path: Path) -> str:
    """The UTF-8 text of a configuration file; ConfigError naming the file if it cannot be read or decoded."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}", step="config") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})", step="config") from exc


def load_yaml_mapping(path: Path) -> dict[Any, Any]:
    """The top-level mapping of a YAML file; an empty file is an empty mapping.

    Keys are whatever YAML made of them (``123:`` is an int); YamlReader names any unknown one.
    """
    text = read_text_file(path)
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {describe_yaml_error(exc)}", step="config") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level", step="config")
    return data


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that fails only with yaml.YAMLError.

    PyYAML's constructors let other exceptions through for values such as ``2001-13-45`` or ``!!int abc``.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise
    except Exception as exc:  # anything else is still the text's fault
        # Not the exception's message: it may quote the value, and the value may be a secret.
        raise yaml.YAMLError(f"a value YAML cannot build, such as an impossible date ({type(exc).__name__})") from exc


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's explanation with line and column, without the excerpt of the offending line.

    The excerpt could show a secret (a proxy password on the line with the syntax error).
    """
    if isinstance(exc, yaml.reader.ReaderError):
        return _describe_reader_error(exc)
    if not isinstance(exc, yaml.MarkedYAMLError):
        return printable(" ".join(str(exc).split()), 200)
    parts = []
    for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        if text:
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            parts.append(f"{text}{where}")
    return ": ".join(parts) or "syntax error"


def _describe_reader_error(exc: yaml.reader.ReaderError) -> str:
    """A character YAML does not allow, or bytes that are not text, on one line (PyYAML's own text spans two)."""
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    if exc.encoding and exc.encoding != "unicode":  # bytes that do not decode
        what = f"byte #x{code:02x} is not valid {exc.encoding}"
    else:
        what = f"unacceptable character #x{code:04x}"
    return f"{what}: {printable(str(exc.reason))} (character {exc.position + 1})"


class YamlReader:
    """Typed access to one mapping of a YAML document; every error names the key path and the file.

    ``origins`` maps dotted key paths to where their values came from when they were merged in from
    somewhere other than ``where`` (an environment variable, a command-line flag); errors about a key,
    or about anything inside a section, set that way name that origin instead of the file.
    """

    def __init__(
        self, data: Mapping[Any, Any], where: str, prefix: str = "", origins: Optional[Mapping[str, str]] = None
    ) -> None:
        self.data = data
        self.where = where
        self.prefix = prefix
        self.origins: Mapping[str, str] = origins or {}

    def origin(self, key: str) -> Optional[str]:
        """The override that set ``key`` or a section holding it; None when it comes from ``where``."""
        path = f"{self.prefix}{key}"
        while path:
            if path in self.origins:
                return self.origins[path]
            path = path.rpartition(".")[0]
        return None

    def error(self, key: str, problem: str) -> ConfigError:
        where = self.origin(key) or self.where
        return ConfigError(f"{where}: {printable((self.prefix + key).rstrip('.'))}: {problem}", step="config")

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(str(key), f"unknown key (known: {', '.join(allowed)})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.data.get(key, default)
        if value is None:
            return default
        # bool is an int in Python; a port of `true` is still a mistake.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.error(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    @overload
    def number(self, key: str, default: float) -> float: ...
    @overload
    def number(self, key: str, default: None = None) -> Optional[float]: ...
    def number(self, key: str, default: Optional[float] = None) -> Optional[float]:
        """An integer or a number as a float; a huge integer becomes infinity for the caller's range check."""
        value = self.get(key, (int, float), default)
        if value is None:
            return None
        try:
            return float(value)
        except OverflowError:
            return math.inf

    def strings(self, key: str) -> Optional[tuple[str, ...]]:
        value = self.get(key, list)
        if value is None:
            return None
        if not all(isinstance(item, str) and item for item in value):
            raise self.error(key, "expected a list of non-empty strings")
        return tuple(value)

    def child(self, key: str) -> Optional[YamlReader]:
        value = self.get(key, dict)
        return None if value is None else YamlReader(value, self.where, f"{self.prefix}{key}.", self.origins)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping", bool: "true or false",
    }  # fmt: skip
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
