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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, Union

from fleetprov.emulator.intrinsics import NO_VALUE, SUB_VARIABLE, IntrinsicEvaluator, Json
from fleetprov.errors import EmulatorError, printable

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


class Evaluator(IntrinsicEvaluator):
    """Evaluates nodes of one template: the provisioning-template functions, and Fn::GetAtt and Fn::Base64."""

    def __init__(self, scope: Scope, resources: ResourceNames) -> None:
        super().__init__(scope.conditions)
        self._scope = scope
        self._resources = resources
        self._functions.update({"Fn::GetAtt": self._get_att, "Fn::Base64": self._base64})

    # -- errors and checks ----------------------------------------------------------------------

    def _error(self, where: str, problem: str) -> CloudFormationError:
        return fail(where, problem)

    def _quote(self, name: str) -> str:
        return brief(name)

    def _misplaced(self, function: str, where: str) -> CloudFormationError:
        return fail(f"{where}.{function}", "allowed only in the Conditions section")

    def _unknown(self, function: str, where: str) -> CloudFormationError:
        reason = _NOT_EVALUATED.get(function, "it is not an intrinsic function the emulator knows")
        return fail(f"{where}.{function}", f"the emulator cannot evaluate {function}: {reason}")

    def _condition_result(self, value: Json, where: str) -> bool:
        if not isinstance(value, bool):
            raise fail(where, f"expected a condition function, got {brief(value)}")
        return value

    def _argument_list(self, argument: Json, where: str, count: int) -> list[Json]:
        if not isinstance(argument, list) or len(argument) != count:
            raise fail(where, f"expected a list of {count} arguments, got {brief(argument)}")
        return argument

    def _operand_list(self, argument: Json, where: str) -> list[Json]:
        if not isinstance(argument, list) or not 2 <= len(argument) <= 10:
            raise fail(where, "expected a list of 2 to 10 conditions")
        return argument

    def _if_arguments(self, argument: Json, where: str) -> tuple[str, Json, Json]:
        if not isinstance(argument, list) or len(argument) != 3 or not isinstance(argument[0], str):
            raise fail(where, "expected [condition name, value if true, value if false]")
        return argument[0], argument[1], argument[2]

    def _condition_name(self, argument: Json, where: str) -> str:
        if not isinstance(argument, str):
            raise fail(where, f"expected a condition name, got {brief(argument)}")
        return argument

    def _text(self, value: Json, where: str) -> str:
        return scalar_text(value, where)

    def _string(self, value: Json, where: str) -> str:
        return scalar_text(value, where)

    def _list(self, value: Json, where: str) -> list[Json]:
        if not isinstance(value, list):
            raise fail(where, f"expected a list, got {brief(value)}")
        return value

    def _boolean(self, value: Json, where: str) -> bool:
        if not isinstance(value, bool):
            raise fail(where, f"expected a condition, got {brief(value)}")
        return value

    def _map_key(self, key: str) -> str:
        return key

    def _mappings(self) -> Mapping[str, Json]:
        return self._scope.mappings

    # -- the functions CloudFormation evaluates its own way ----------------------------------------

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

        return SUB_VARIABLE.sub(substitute, template)

    def _select(self, argument: Json, where: str) -> Json:
        index, items = self._arguments(argument, where, 2)
        text = scalar_text(index, f"{where}[0]")
        if not text.isdigit() or not isinstance(items, list):
            raise fail(where, "expected [index, list]")
        if int(text) >= len(items):
            raise fail(where, f"index {text} is out of range for a list of {len(items)}")
        return items[int(text)]

    def _base64(self, argument: Json, where: str) -> str:
        return base64.b64encode(self.text(argument, where).encode()).decode()
