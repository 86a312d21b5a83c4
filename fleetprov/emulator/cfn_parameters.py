"""A CloudFormation template's Parameters section, with the values given on the command line.

Each parameter gets the given value, else its Default, else no value (None): CloudFormation would refuse
to deploy, and the emulator refuses only where a missing value is used (cloudformation.py lets the claim
certificate's CSR be missing: the emulator then makes the claim key itself). The constraints
CloudFormation checks before it creates anything are checked here too: AllowedValues, AllowedPattern,
MinLength, MaxLength, MinValue and MaxValue, with the ConstraintDescription in the message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

from fleetprov.emulator.cfn_functions import brief, fail, scalar_text

ParameterValue = Union[str, tuple[str, ...], None]

_TYPES = ("String", "Number", "CommaDelimitedList", "List<Number>")
_KEYS = frozenset(
    {
        "Type", "Default", "Description", "AllowedValues", "AllowedPattern", "MinLength", "MaxLength", "MinValue",
        "MaxValue", "NoEcho", "ConstraintDescription",
    }
)  # fmt: skip


def parameter_values(section: Any, given: Mapping[str, str]) -> dict[str, ParameterValue]:
    """Every declared parameter's value: given, else Default, else None."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise fail("Parameters", f"expected a mapping, got {brief(section)}")
    for name in given:
        if name not in section:
            declared = ", ".join(str(key) for key in section) or "none"
            raise fail("--parameter", f"the template declares no parameter {name} (it declares: {declared})")
    return {str(name): _value(str(name), declaration, given.get(str(name))) for name, declaration in section.items()}


def _value(name: str, declaration: Any, given: Optional[str]) -> ParameterValue:
    where = f"Parameters.{name}"
    if not isinstance(declaration, dict):
        raise fail(where, f"expected a mapping with Type, got {brief(declaration)}")
    unknown = sorted(str(key) for key in declaration if key not in _KEYS)
    if unknown:
        raise fail(where, f"unknown key {unknown[0]} (known: {', '.join(sorted(_KEYS))})")
    kind = declaration.get("Type")
    if kind not in _TYPES:
        raise fail(f"{where}.Type", f"the emulator supports the parameter types {', '.join(_TYPES)}, got {brief(kind)}")
    if given is not None:
        text, origin = given, f"--parameter {name}"
    elif "Default" in declaration:
        text, origin = _default_text(declaration["Default"], f"{where}.Default"), f"{where}.Default"
    else:
        return None
    secret = declaration.get("NoEcho") in (True, "true", "True")
    items = tuple(item.strip() for item in text.split(",")) if "List" in kind else (text,)
    for item in items:
        _check(declaration, kind, item, origin=origin, where=where, secret=secret)
    return items if "List" in kind else text


def _default_text(value: Any, where: str) -> str:
    if isinstance(value, list):  # a list Default is written as a YAML list now and then
        return ",".join(scalar_text(item, where) for item in value)
    return scalar_text(value, where)


def _check(declaration: Mapping[str, Any], kind: str, value: str, *, origin: str, where: str, secret: bool) -> None:
    """``origin`` is where the value came from, ``where`` the declaration."""
    shown = "the value" if secret else f"value {brief(value)}"
    explanation = declaration.get("ConstraintDescription")
    hint = f" ({explanation})" if isinstance(explanation, str) else ""

    def broken(rule: str) -> Exception:
        return fail(origin, f"{shown} {rule}{hint}")

    if kind in ("Number", "List<Number>"):
        number = _number(value)
        if number is None:
            raise broken("is not a number")
        low, high = _bound(declaration, "MinValue", where), _bound(declaration, "MaxValue", where)
        if low is not None and number < low:
            raise broken(f"is below MinValue {declaration['MinValue']}")
        if high is not None and number > high:
            raise broken(f"is above MaxValue {declaration['MaxValue']}")
    allowed = declaration.get("AllowedValues")
    if isinstance(allowed, list) and value not in [scalar_text(item, origin) for item in allowed]:
        raise broken(f"is not one of AllowedValues {', '.join(scalar_text(item, origin) for item in allowed)}")
    pattern = declaration.get("AllowedPattern")
    if isinstance(pattern, str):
        try:
            matches = re.fullmatch(pattern, value) is not None
        except re.error as exc:
            raise fail(f"{where}.AllowedPattern", f"not a regular expression the emulator can use: {exc}") from exc
        if not matches:
            raise broken(f"does not match AllowedPattern {pattern}")
    shortest, longest = _bound(declaration, "MinLength", where), _bound(declaration, "MaxLength", where)
    if shortest is not None and len(value) < shortest:
        raise broken(f"is shorter than MinLength {declaration['MinLength']}")
    if longest is not None and len(value) > longest:
        raise broken(f"is longer than MaxLength {declaration['MaxLength']}")


def _bound(declaration: Mapping[str, Any], key: str, where: str) -> Optional[float]:
    if key not in declaration:
        return None
    number = _number(scalar_text(declaration[key], f"{where}.{key}"))
    if number is None:
        raise fail(f"{where}.{key}", f"expected a number, got {brief(declaration[key])}")
    return number


def _number(text: str) -> Optional[float]:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
