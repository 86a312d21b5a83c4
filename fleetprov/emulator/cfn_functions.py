"""Evaluate CloudFormation intrinsic functions, as far as the emulator needs them.

Supported: Ref (parameters, pseudo parameters, resources), Fn::Sub (both forms, ``${!Literal}``, ``${Res.Attr}``),
Fn::GetAtt, Fn::Join, Fn::Select, Fn::Split, Fn::FindInMap, Fn::Base64, Fn::If with AWS::NoValue, and in the
Conditions section Fn::Equals, Fn::Not, Fn::And, Fn::Or and Condition. Anything else (Fn::ImportValue,
Fn::GetAZs, Fn::Cidr, Fn::Transform, Fn::ToJsonString ...) is an error naming the place: what the emulator
cannot evaluate it says, rather than guessing.

What a Ref or Fn::GetAtt of a *resource* gives is up to the caller (cloudformation.py), through
ResourceNames. Every error is a CloudFormationError whose message starts with the path of the node in the
template, e.g. ``Resources.Hook.Properties.Environment.Variables.PREFIX.Ref``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Union

from fleetprov.errors import EmulatorError, printable

Json = Any  # what YAML gives: dict, list, str, int, float, bool, None; mid-evaluation also NO_VALUE

_SUB_VARIABLE = re.compile(r"\$\{(!?)([^}]*)\}")
_CONDITION_FUNCTIONS = frozenset({"Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Condition"})
_NOT_EVALUATED = {
    "Fn::ImportValue": "it reads another stack's exports",
    "Fn::GetAZs": "it lists a region's availability zones",
    "Fn::Cidr": "it computes VPC address blocks",
    "Fn::Transform": "it runs a CloudFormation macro",
    "Fn::ToJsonString": "it needs the AWS::LanguageExtensions transform",
    "Fn::Length": "it needs the AWS::LanguageExtensions transform",
    "Fn::ForEach": "it needs the AWS::LanguageExtensions transform",
    "Fn::GetParam": "it belongs to CodePipeline",
}


class CloudFormationError(EmulatorError):
    """A template the emulator cannot use; the message names the place and the cause."""


class MissingParameterValue(CloudFormationError):
    """A Ref to a parameter that has neither a value (``--parameter``) nor a Default."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"{where}: parameter {name} has no value and no Default: give --parameter {name}=VALUE")
        self.name = name


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()  # {"Ref": "AWS::NoValue"}: the enclosing mapping or list drops the entry


class ResourceNames(Protocol):
    """What Ref and Fn::GetAtt of a resource evaluate to; CloudFormationError if they cannot."""

    def ref(self, logical_id: str, where: str) -> str: ...

    def attribute(self, logical_id: str, attribute: str, where: str) -> str: ...


@dataclass(frozen=True)
class Scope:
    """Everything an expression can refer to besides resources."""

    parameters: Mapping[str, Union[str, tuple[str, ...], None]]  # None: declared, but no value and no Default
    pseudo_parameters: Mapping[str, str]
    mappings: Mapping[str, Json]
    conditions: Mapping[str, Json]


def fail(where: str, problem: str) -> CloudFormationError:
    return CloudFormationError(f"{where}: {problem}")


def brief(value: object) -> str:
    """A value for an error message: a scalar quoted and cut short, anything else by its type."""
    if isinstance(value, str):
        return repr(printable(value, 60))
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    return type(value).__name__


def scalar_text(value: Json, where: str) -> str:
    """A string as is; a number or boolean as CloudFormation turns it into a string ("5", "true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise fail(where, f"expected a string, got {brief(value)}")


def function_name(node: Json) -> str | None:
    """The intrinsic function a node calls: a mapping whose single key is Fn::*, Ref or Condition."""
    if isinstance(node, dict) and len(node) == 1:
        (key,) = node
        if isinstance(key, str) and (key.startswith("Fn::") or key in ("Ref", "Condition")):
            return key
    return None


class Evaluator:
    """Evaluates nodes of one template; conditions are evaluated once and remembered."""

    def __init__(self, scope: Scope, resources: ResourceNames) -> None:
        self._scope = scope
        self._resources = resources
        self._condition_values: dict[str, bool] = {}
        self._resolving: list[str] = []
        self._in_conditions = False
        self._functions: Mapping[str, Callable[[Json, str], Json]] = {
            "Ref": self._ref,
            "Fn::Sub": self._sub,
            "Fn::GetAtt": self._get_att,
            "Fn::Join": self._join,
            "Fn::Select": self._select,
            "Fn::Split": self._split,
            "Fn::FindInMap": self._find_in_map,
            "Fn::Base64": self._base64,
            "Fn::If": self._if,
            "Fn::Equals": self._equals,
            "Fn::Not": self._not,
            "Fn::And": self._and,
            "Fn::Or": self._or,
            "Condition": self._condition_reference,
        }

    # -- conditions -----------------------------------------------------------------------------

    def condition(self, name: str, where: str) -> bool:
        if name in self._condition_values:
            return self._condition_values[name]
        if name not in self._scope.conditions:
            raise fail(where, f"unknown condition {brief(name)}")
        if name in self._resolving:
            cycle = [*self._resolving[self._resolving.index(name) :], name]
            raise fail(f"Conditions.{name}", f"circular reference: {' -> '.join(cycle)}")
        self._resolving.append(name)
        outer, self._in_conditions = self._in_conditions, True
        try:
            value = self.value(self._scope.conditions[name], f"Conditions.{name}")
        finally:
            self._in_conditions = outer
            self._resolving.pop()
        if not isinstance(value, bool):
            raise fail(f"Conditions.{name}", f"expected a condition function, got {brief(value)}")
        self._condition_values[name] = value
        return value

    # -- values ---------------------------------------------------------------------------------

    def value(self, node: Json, where: str) -> Json:
        """The evaluated node; NO_VALUE only at the top (an enclosing mapping or list drops it)."""
        function = function_name(node)
        if function is not None:
            return self._call(function, node[function], where)
        if isinstance(node, dict):
            evaluated = {key: self.value(item, f"{where}.{key}") for key, item in node.items()}
            return {key: item for key, item in evaluated.items() if item is not NO_VALUE}
        if isinstance(node, list):
            items = [self.value(item, f"{where}[{index}]") for index, item in enumerate(node)]
            return [item for item in items if item is not NO_VALUE]
        return node

    def text(self, node: Json, where: str) -> str:
        return scalar_text(self.value(node, where), where)

    def _call(self, function: str, argument: Json, where: str) -> Json:
        path = f"{where}.{function}"
        if function in _CONDITION_FUNCTIONS and not self._in_conditions:
            raise fail(path, "allowed only in the Conditions section")
        implementation = self._functions.get(function)
        if implementation is None:
            reason = _NOT_EVALUATED.get(function, "it is not an intrinsic function the emulator knows")
            raise fail(path, f"the emulator cannot evaluate {function}: {reason}")
        return implementation(argument, path)

    def _arguments(self, argument: Json, where: str, count: int) -> list[Json]:
        if not isinstance(argument, list) or len(argument) != count:
            raise fail(where, f"expected a list of {count} arguments, got {brief(argument)}")
        return [self.value(item, f"{where}[{index}]") for index, item in enumerate(argument)]

    def _ref(self, argument: Json, where: str) -> Json:
        if not isinstance(argument, str):
            raise fail(where, f"expected a name, got {brief(argument)}")
        if argument == "AWS::NoValue":
            return NO_VALUE
        if argument in self._scope.pseudo_parameters:
            return self._scope.pseudo_parameters[argument]
        if argument in self._scope.parameters:
            value = self._scope.parameters[argument]
            if value is None:
                raise MissingParameterValue(argument, where)
            return list(value) if isinstance(value, tuple) else value
        if argument.startswith("AWS::"):
            raise fail(where, f"the emulator does not know the pseudo parameter {argument}")
        return self._resources.ref(argument, where)

    def _get_att(self, argument: Json, where: str) -> str:
        if isinstance(argument, str):  # the long form also accepts "Resource.Attribute"
            argument = argument.split(".", 1)
        if not (isinstance(argument, list) and len(argument) == 2):
            raise fail(where, f"expected [resource, attribute], got {brief(argument)}")
        logical_id = self.value(argument[0], f"{where}[0]")
        attribute = self.value(argument[1], f"{where}[1]")
        if not (isinstance(logical_id, str) and isinstance(attribute, str)):
            raise fail(where, "expected a resource name and an attribute name")
        return self._resources.attribute(logical_id, attribute, where)

    def _sub(self, argument: Json, where: str) -> str:
        variables: dict[str, str] = {}
        if isinstance(argument, list):
            if len(argument) != 2 or not isinstance(argument[1], dict):
                raise fail(where, "expected a string, or [string, {variable: value}]")
            template = argument[0]
            for name, node in argument[1].items():
                variables[str(name)] = self.text(node, f"{where}[1].{name}")
        else:
            template = argument
        if not isinstance(template, str):
            raise fail(where, f"expected a string, got {brief(template)}")

        def substitute(match: re.Match[str]) -> str:
            literal, name = match.groups()
            if literal:  # "${!Name}" is how a template writes a literal "${Name}"
                return f"${{{name}}}"
            if name in variables:
                return variables[name]
            if "." in name and not name.startswith("AWS::"):
                resource, attribute = name.split(".", 1)
                return self._resources.attribute(resource, attribute, f"{where} ${{{name}}}")
            return scalar_text(self._ref(name, f"{where} ${{{name}}}"), f"{where} ${{{name}}}")

        return _SUB_VARIABLE.sub(substitute, template)

    def _join(self, argument: Json, where: str) -> str:
        delimiter, items = self._arguments(argument, where, 2)
        if not isinstance(items, list):
            raise fail(f"{where}[1]", f"expected a list, got {brief(items)}")
        texts = [scalar_text(item, f"{where}[1][{index}]") for index, item in enumerate(items)]
        return scalar_text(delimiter, f"{where}[0]").join(texts)

    def _select(self, argument: Json, where: str) -> Json:
        index, items = self._arguments(argument, where, 2)
        text = scalar_text(index, f"{where}[0]")
        if not text.isdigit() or not isinstance(items, list):
            raise fail(where, "expected [index, list]")
        if int(text) >= len(items):
            raise fail(where, f"index {text} is out of range for a list of {len(items)}")
        return items[int(text)]

    def _split(self, argument: Json, where: str) -> list[str]:
        delimiter, source = self._arguments(argument, where, 2)
        separator = scalar_text(delimiter, f"{where}[0]")
        if not separator:
            raise fail(f"{where}[0]", "the delimiter must not be empty")
        return scalar_text(source, f"{where}[1]").split(separator)

    def _find_in_map(self, argument: Json, where: str) -> Json:
        keys = [scalar_text(key, f"{where}[{index}]") for index, key in enumerate(self._arguments(argument, where, 3))]
        found: Json = self._scope.mappings
        path = "Mappings"
        for key in keys:
            path = f"{path}.{key}"
            if not isinstance(found, dict) or key not in found:
                raise fail(where, f"{path} does not exist")
            found = found[key]
        return found

    def _base64(self, argument: Json, where: str) -> str:
        return base64.b64encode(self.text(argument, where).encode()).decode()

    def _if(self, argument: Json, where: str) -> Json:
        if not isinstance(argument, list) or len(argument) != 3 or not isinstance(argument[0], str):
            raise fail(where, "expected [condition name, value if true, value if false]")
        # Only the chosen branch is evaluated, as in CloudFormation: the other may name a resource left out.
        if self.condition(argument[0], f"{where}[0]"):
            return self.value(argument[1], f"{where}[1]")
        return self.value(argument[2], f"{where}[2]")

    def _equals(self, argument: Json, where: str) -> bool:
        left, right = self._arguments(argument, where, 2)
        return scalar_text(left, f"{where}[0]") == scalar_text(right, f"{where}[1]")

    def _not(self, argument: Json, where: str) -> bool:
        (operand,) = self._arguments(argument, where, 1)
        return not self._boolean(operand, f"{where}[0]")

    def _and(self, argument: Json, where: str) -> bool:
        return all(self._operands(argument, where))

    def _or(self, argument: Json, where: str) -> bool:
        return any(self._operands(argument, where))

    def _operands(self, argument: Json, where: str) -> list[bool]:
        if not isinstance(argument, list) or not 2 <= len(argument) <= 10:
            raise fail(where, "expected a list of 2 to 10 conditions")
        return [self._boolean(self.value(item, f"{where}[{i}]"), f"{where}[{i}]") for i, item in enumerate(argument)]

    def _boolean(self, value: Json, where: str) -> bool:
        if not isinstance(value, bool):
            raise fail(where, f"expected a condition, got {brief(value)}")
        return value

    def _condition_reference(self, argument: Json, where: str) -> bool:
        if not isinstance(argument, str):
            raise fail(where, f"expected a condition name, got {brief(argument)}")
        return self.condition(argument, where)
