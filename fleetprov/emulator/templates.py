"""Evaluate AWS IoT fleet-provisioning templates for the local emulator's RegisterThing.

Pure: no I/O. parse_template() checks a template's structure once, as
CreateProvisioningTemplate would; evaluate() applies one device's parameters and
returns what RegisterThing must create as a ProvisioningPlan. Every failure is a
TemplateError whose message names the place in the template and the cause.

The language is the CloudFormation subset AWS IoT documents: Parameters,
Mappings, Conditions, Resources and DeviceConfiguration, with Ref, Fn::Join,
Fn::Select, Fn::Split, Fn::FindInMap, Fn::Sub, Fn::If and, inside Conditions,
Fn::Equals, Fn::Not, Fn::And, Fn::Or and {"Condition": name}.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from fleetprov.emulator.intrinsics import NO_VALUE, NO_VALUE_NAME, SUB_VARIABLE, IntrinsicEvaluator, Json, function_name
from fleetprov.errors import EmulatorError

THING = "AWS::IoT::Thing"
CERTIFICATE = "AWS::IoT::Certificate"
POLICY = "AWS::IoT::Policy"

# OverrideSettings actions.
DO_NOTHING = "DO_NOTHING"
REPLACE = "REPLACE"
FAIL = "FAIL"
MERGE = "MERGE"

ACTIVE = "ACTIVE"
INACTIVE = "INACTIVE"

_TOP_LEVEL_SECTIONS = ("Parameters", "Mappings", "Conditions", "Resources", "DeviceConfiguration")
_PARAMETER_TYPES = ("String", "Number")
_RESOURCE_KEYS = frozenset({"Type", "Properties", "OverrideSettings", "Condition"})
_PROPERTIES_BY_TYPE: Mapping[str, frozenset[str]] = {
    THING: frozenset({"ThingName", "AttributePayload", "ThingTypeName", "ThingGroups", "BillingGroup"}),
    CERTIFICATE: frozenset({"CertificateId", "Status"}),
    POLICY: frozenset({"PolicyName", "PolicyDocument"}),
}
# Valid in bulk-registration templates, but RegisterThing acts on a certificate the device already owns.
_NON_FLEET_CERTIFICATE_PROPERTIES = frozenset({"CertificateSigningRequest", "CertificatePem", "CACertificatePem"})
# The documentation spells the thing's override keys both ways; ThingSpec.overrides uses property names.
_OVERRIDABLE_PROPERTIES: Mapping[str, Mapping[str, str]] = {
    THING: {
        "AttributePayload": "AttributePayload",
        "ATTRIBUTE_PAYLOAD": "AttributePayload",
        "ThingTypeName": "ThingTypeName",
        "THING_TYPE_NAME": "ThingTypeName",
        "ThingGroups": "ThingGroups",
        "THING_GROUPS": "ThingGroups",
    },
    CERTIFICATE: {"Status": "Status"},
    POLICY: {},
}
_OVERRIDE_ACTIONS = (DO_NOTHING, REPLACE, FAIL, MERGE)
_MERGEABLE_PROPERTIES = frozenset({"AttributePayload", "ThingGroups"})
_CERTIFICATE_STATUSES = (ACTIVE, INACTIVE)

_MAX_CONDITION_OPERANDS = 10
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Nine digits index any real list and keep int() far from Python's digit limit.
_INDEX = re.compile(r"[0-9]{1,9}")
_BRIEF_LENGTH = 40


class TemplateError(EmulatorError):
    """Evaluation failed.

    .error_code is the AWS errorCode to reply with, .status_code the HTTP-like status.
    """

    def __init__(self, message: str, *, error_code: str = "InvalidParameters", status_code: int = 400) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.status_code = status_code


@dataclass(frozen=True)
class ThingSpec:
    logical_name: str
    thing_name: str
    attributes: Mapping[str, str]
    thing_type_name: Optional[str]
    thing_groups: tuple[str, ...]
    billing_group: Optional[str]
    # Keyed "AttributePayload", "ThingTypeName", "ThingGroups"; values DO_NOTHING, REPLACE, FAIL or MERGE.
    overrides: Mapping[str, str]


@dataclass(frozen=True)
class CertificateSpec:
    logical_name: str
    certificate_id: str
    status: str  # ACTIVE or INACTIVE
    status_override: Optional[str]


@dataclass(frozen=True)
class PolicySpec:
    """Exactly one of policy_name and policy_document is set; the caller names a bare document by its hash."""

    logical_name: str
    policy_name: Optional[str]
    policy_document: Optional[str]  # canonical JSON: json.dumps(document, sort_keys=True)


@dataclass(frozen=True)
class ProvisioningPlan:
    thing: Optional[ThingSpec]
    certificate: Optional[CertificateSpec]
    policies: tuple[PolicySpec, ...]
    device_configuration: Mapping[str, str]
    parameters: Mapping[str, str]  # the device's parameters over the declared defaults


@dataclass(frozen=True)
class ParameterDeclaration:
    name: str
    type: str  # "String" or "Number"
    default: Optional[str]


@dataclass(frozen=True)
class ResourceDeclaration:
    logical_name: str
    type: str  # THING, CERTIFICATE or POLICY
    properties: Mapping[str, Json]  # unevaluated; keys already checked against the type
    override_settings: Mapping[str, str]  # normalised and checked
    condition: Optional[str]  # a name declared in Conditions


@dataclass(frozen=True)
class Template:
    """A structurally valid template; its sections are JSON copies that nothing mutates."""

    parameters: Mapping[str, ParameterDeclaration]
    mappings: Mapping[str, Mapping[str, Mapping[str, Union[str, list[str]]]]]
    conditions: Mapping[str, Json]
    resources: tuple[ResourceDeclaration, ...]
    device_configuration: Mapping[str, Json]

    @property
    def parameter_names(self) -> frozenset[str]:
        return frozenset(self.parameters)

    def required_parameters(self) -> frozenset[str]:
        """The declared parameters without a Default: the device must supply them."""
        return frozenset(name for name, declared in self.parameters.items() if declared.default is None)


# ---------------------------------------------------------------------------
# Error and type-checking helpers


def _fail(where: str, problem: str) -> TemplateError:
    return TemplateError(f"{where}: {problem}")


def _shorten(text: str) -> str:
    """Cut text short so that an error message never carries a data blob."""
    return text if len(text) <= _BRIEF_LENGTH else text[: _BRIEF_LENGTH - 3] + "..."


def _brief(text: str) -> str:
    return repr(_shorten(text))


def _type_name(value: object) -> str:
    if value is NO_VALUE:
        return NO_VALUE_NAME
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _describe(value: object) -> str:
    """A scalar as itself (shortened), anything else by its type."""
    if isinstance(value, str):
        return _brief(value)
    if isinstance(value, (bool, int, float)):
        return _shorten(json.dumps(value))
    return _type_name(value)


def _expected(where: str, wanted: str, got: object) -> TemplateError:
    return _fail(where, f"expected {wanted}, got {_type_name(got)}")


def _object(value: Json, where: str) -> dict[str, Json]:
    if not isinstance(value, dict):
        raise _expected(where, "an object", value)
    return value


def _list(value: Json, where: str) -> list[Json]:
    if not isinstance(value, list):
        raise _expected(where, "a list", value)
    return value


def _string(value: Json, where: str) -> str:
    if not isinstance(value, str):
        raise _expected(where, "a string", value)
    return value


def _boolean(value: Json, where: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(where, "a condition (true or false)", value)
    return value


def _scalar_text(value: Json, where: str) -> str:
    """A string as is, a number or boolean as JSON renders it ("true", "1.5")."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise _expected(where, "a string, number or boolean", value)


def _one_of(value: Json, allowed: tuple[str, ...], where: str) -> str:
    # The isinstance test comes first: a list or object is unhashable and would break the membership test.
    if not isinstance(value, str) or value not in allowed:
        raise _fail(where, f"must be one of {', '.join(allowed)}, got {_describe(value)}")
    return value


def _required(declaration: Mapping[str, Json], key: str, where: str) -> Json:
    if key not in declaration:
        raise _fail(where, f"{key} is required")
    return declaration[key]


def _check_number(text: str, where: str) -> None:
    if not _NUMBER.fullmatch(text):
        raise _fail(where, f"expected a number, got {_brief(text)}")


def _reject_json_constant(name: str) -> Json:
    raise ValueError(f"{name} is not a JSON number")


def _load_json(text: str, where: str) -> Json:
    try:
        return json.loads(text, parse_constant=_reject_json_constant)
    except ValueError as error:  # JSONDecodeError, NaN/Infinity, integers beyond Python's digit limit
        raise _fail(where, f"not valid JSON ({_shorten(str(error))})") from error


# ---------------------------------------------------------------------------
# Parsing


def parse_template(body: str | Mapping[str, Any]) -> Template:
    """Check a template's structure (JSON text or an already-parsed mapping) and freeze it for evaluate()."""
    try:
        document = _load_json(body, "template") if isinstance(body, str) else body
        return _parse_document(document)
    except RecursionError as error:
        raise TemplateError("The template is nested too deeply") from error


def _parse_document(document: object) -> Template:
    if not isinstance(document, Mapping):
        raise TemplateError(f"A template must be a JSON object, got {_type_name(document)}")
    for key in document:
        if key not in _TOP_LEVEL_SECTIONS:
            raise TemplateError(
                f"Unknown top-level key {_brief(str(key))}: a template may only contain "
                + ", ".join(_TOP_LEVEL_SECTIONS)
            )
    sections = {name: _object(_json_copy(document.get(name, {}), name), name) for name in _TOP_LEVEL_SECTIONS}
    conditions = sections["Conditions"]
    return Template(
        parameters=_parse_parameters(sections["Parameters"]),
        mappings=_parse_mappings(sections["Mappings"]),
        conditions=conditions,
        resources=_parse_resources(sections["Resources"], frozenset(conditions)),
        device_configuration=sections["DeviceConfiguration"],
    )


def _json_copy(value: object, where: str) -> Json:
    """Deep-copy caller data, rejecting what JSON cannot express, so evaluation can trust every node."""
    if isinstance(value, Mapping):
        copied: dict[str, Json] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(where, f"object keys must be strings, got {type(key).__name__}")
            copied[key] = _json_copy(item, f"{where}.{key}")
        return copied
    if isinstance(value, (list, tuple)):
        return [_json_copy(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, "numbers must be finite")
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise _fail(where, f"a {type(value).__name__} is not a JSON value")


def _parse_parameters(section: Mapping[str, Json]) -> dict[str, ParameterDeclaration]:
    return {name: _parse_parameter(name, declaration) for name, declaration in section.items()}


def _parse_parameter(name: str, declaration: Json) -> ParameterDeclaration:
    where = f"Parameters.{name}"
    fields = _object(declaration, where)
    parameter_type = _one_of(_required(fields, "Type", where), _PARAMETER_TYPES, f"{where}.Type")
    default = None
    if "Default" in fields:
        default = _scalar_text(fields["Default"], f"{where}.Default")
        if parameter_type == "Number":
            _check_number(default, f"{where}.Default")
    return ParameterDeclaration(name=name, type=parameter_type, default=default)


def _parse_mappings(section: Mapping[str, Json]) -> dict[str, dict[str, dict[str, Union[str, list[str]]]]]:
    return {
        map_name: {
            top_key: _parse_mapping_values(values, f"Mappings.{map_name}.{top_key}")
            for top_key, values in _object(table, f"Mappings.{map_name}").items()
        }
        for map_name, table in section.items()
    }


def _parse_mapping_values(values: Json, where: str) -> dict[str, Union[str, list[str]]]:
    return {key: _parse_mapping_value(value, f"{where}.{key}") for key, value in _object(values, where).items()}


def _parse_mapping_value(value: Json, where: str) -> Union[str, list[str]]:
    # Mappings are data: AWS evaluates nothing in them, so a function there is an authoring mistake.
    if function_name(value) is not None:
        raise _fail(where, "intrinsic functions are not allowed in Mappings")
    if isinstance(value, list):
        return [_scalar_text(item, f"{where}[{index}]") for index, item in enumerate(value)]
    return _scalar_text(value, where)


def _parse_resources(section: Mapping[str, Json], condition_names: frozenset[str]) -> tuple[ResourceDeclaration, ...]:
    resources = tuple(
        _parse_resource(logical_name, declaration, condition_names) for logical_name, declaration in section.items()
    )
    for single_type in (THING, CERTIFICATE):
        names = [resource.logical_name for resource in resources if resource.type == single_type]
        if len(names) > 1:
            raise TemplateError(f"Resources: at most one {single_type} is allowed, got {', '.join(names)}")
    return resources


def _parse_resource(logical_name: str, declaration: Json, condition_names: frozenset[str]) -> ResourceDeclaration:
    where = f"Resources.{logical_name}"
    fields = _object(declaration, where)
    for key in fields:
        if key not in _RESOURCE_KEYS:
            raise _fail(where, f"unknown key {_brief(key)}; allowed: {', '.join(sorted(_RESOURCE_KEYS))}")
    resource_type = _one_of(_required(fields, "Type", where), tuple(_PROPERTIES_BY_TYPE), f"{where}.Type")
    properties = _object(_required(fields, "Properties", where), f"{where}.Properties")
    _check_property_names(resource_type, properties, f"{where}.Properties")
    return ResourceDeclaration(
        logical_name=logical_name,
        type=resource_type,
        properties=properties,
        override_settings=_parse_override_settings(resource_type, fields, where),
        condition=_parse_resource_condition(fields, condition_names, where),
    )


def _check_property_names(resource_type: str, properties: Mapping[str, Json], where: str) -> None:
    for name in properties:
        if resource_type == CERTIFICATE and name in _NON_FLEET_CERTIFICATE_PROPERTIES:
            raise _fail(where, f"{name} is not supported: fleet provisioning templates must use CertificateId")
        if name not in _PROPERTIES_BY_TYPE[resource_type]:
            raise _fail(where, f"unknown property {_brief(name)} for {resource_type}")


def _parse_override_settings(resource_type: str, fields: Mapping[str, Json], where: str) -> dict[str, str]:
    if "OverrideSettings" not in fields:
        return {}
    where = f"{where}.OverrideSettings"
    spellings = _OVERRIDABLE_PROPERTIES[resource_type]
    if not spellings:
        raise _fail(where, "OverrideSettings are not available for policy resources")
    overrides: dict[str, str] = {}
    for key, action in _object(fields["OverrideSettings"], where).items():
        if key not in spellings:
            raise _fail(where, f"cannot override {_brief(key)}; allowed: {', '.join(spellings)}")
        property_name = spellings[key]
        if property_name in overrides:
            raise _fail(where, f"{property_name} is given twice")
        overrides[property_name] = _parse_override_action(property_name, action, f"{where}.{key}")
    return overrides


def _parse_override_action(property_name: str, action: Json, where: str) -> str:
    checked = _one_of(action, _OVERRIDE_ACTIONS, where)
    if checked == MERGE and property_name not in _MERGEABLE_PROPERTIES:
        raise _fail(where, "MERGE is only valid for AttributePayload and ThingGroups")
    return checked


def _parse_resource_condition(fields: Mapping[str, Json], condition_names: frozenset[str], where: str) -> Optional[str]:
    if "Condition" not in fields:
        return None
    name = _string(fields["Condition"], f"{where}.Condition")
    if name not in condition_names:
        raise _fail(f"{where}.Condition", f"unknown condition {_brief(name)}")
    return name


# ---------------------------------------------------------------------------
# Evaluation


def evaluate(template: Template, parameters: Mapping[str, str]) -> ProvisioningPlan:
    """Apply one device's parameters to a parsed template."""
    try:
        return _evaluate(template, parameters)
    except RecursionError as error:  # conditions referring to conditions, many levels deep
        raise TemplateError("The template is nested too deeply to evaluate") from error


def _evaluate(template: Template, supplied: Mapping[str, str]) -> ProvisioningPlan:
    parameters = _effective_parameters(template, supplied)
    evaluator = _Evaluator(template, parameters)
    evaluator.resolve_conditions()
    specs = [
        _SPEC_BUILDERS[resource.type](resource, evaluator)
        for resource in template.resources
        if resource.condition is None or evaluator.condition(resource.condition, "Resources")
    ]
    return ProvisioningPlan(
        thing=next((spec for spec in specs if isinstance(spec, ThingSpec)), None),
        certificate=next((spec for spec in specs if isinstance(spec, CertificateSpec)), None),
        policies=tuple(spec for spec in specs if isinstance(spec, PolicySpec)),
        device_configuration=_device_configuration(template, evaluator),
        parameters=parameters,
    )


def _effective_parameters(template: Template, supplied: Mapping[str, str]) -> dict[str, str]:
    """Defaults overlaid with everything the device sent.

    Undeclared parameters are kept rather than rejected: AWS passes extra ones (for the
    pre-provisioning hook), and fleet templates Ref pseudo-parameters such as
    AWS::IoT::Certificate::Id without declaring them.
    """
    effective = {
        name: declared.default for name, declared in template.parameters.items() if declared.default is not None
    }
    for name, value in supplied.items():
        # The payload comes off the wire as JSON or CBOR, so its types are only what the device made them.
        if not isinstance(name, str):
            raise TemplateError(f"Parameter names must be strings, got {type(name).__name__}")
        effective[name] = _scalar_text(value, f"Parameter {_brief(name)}")
    missing = sorted(template.required_parameters() - effective.keys())
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise TemplateError(f"Missing required parameter{plural}: {', '.join(missing)}")
    for name, declared in template.parameters.items():
        if declared.type == "Number":
            _check_number(effective[name], f"Parameter {_brief(name)}")
    return effective


class _Evaluator(IntrinsicEvaluator):
    """Resolves intrinsic functions against one device's parameters.

    Every method takes `where`, the path of the node in the template, for error messages.
    """

    def __init__(self, template: Template, parameters: Mapping[str, str]) -> None:
        super().__init__(template.conditions)
        self._parameters = parameters
        self._template_mappings = template.mappings
        self._resource_names = frozenset(resource.logical_name for resource in template.resources)

    def resolve_conditions(self) -> None:
        """Evaluate every condition once, up front, so a broken condition fails even where unused."""
        for name in self._condition_definitions:
            self.condition(name, "Conditions")

    # -- errors and checks ----------------------------------------------------------------------

    def _error(self, where: str, problem: str) -> TemplateError:
        return _fail(where, problem)

    def _quote(self, name: str) -> str:
        return _brief(name)

    def _misplaced(self, function: str, where: str) -> TemplateError:
        return _fail(where, f"{function} is only allowed in the Conditions section")

    def _unknown(self, function: str, where: str) -> TemplateError:
        return _fail(where, f"unknown intrinsic function {_brief(function)}")

    def _condition_result(self, value: Json, where: str) -> bool:
        return _boolean(value, where)

    def _argument_list(self, argument: Json, where: str, count: int) -> list[Json]:
        return _argument_list(argument, where, count, count)

    def _operand_list(self, argument: Json, where: str) -> list[Json]:
        return _argument_list(argument, where, 2, _MAX_CONDITION_OPERANDS)

    def _if_arguments(self, argument: Json, where: str) -> tuple[str, Json, Json]:
        name, if_true, if_false = _argument_list(argument, where, 3, 3)
        return _string(name, f"{where}[0]"), if_true, if_false

    def _condition_name(self, argument: Json, where: str) -> str:
        return _string(argument, where)

    def _text(self, value: Json, where: str) -> str:
        return _scalar_text(value, where)

    def _string(self, value: Json, where: str) -> str:
        return _string(value, where)

    def _list(self, value: Json, where: str) -> list[Json]:
        return _list(value, where)

    def _boolean(self, value: Json, where: str) -> bool:
        return _boolean(value, where)

    def _map_key(self, key: str) -> str:
        return _shorten(key)

    def _mappings(self) -> Mapping[str, Json]:
        return self._template_mappings

    # -- the functions a provisioning template evaluates its own way -----------------------------

    def _ref(self, argument: Json, where: str) -> Json:
        name = _string(argument, where)
        if name == NO_VALUE_NAME:
            return NO_VALUE
        if name in self._parameters:
            return self._parameters[name]
        if name in self._resource_names:
            raise _fail(where, f"Ref to resource {_brief(name)} is not supported; Ref resolves parameters")
        raise _fail(where, f"Ref to unknown parameter {_brief(name)}")

    def _select(self, argument: Json, where: str) -> Json:
        index, values = self._arguments(argument, where, 2)
        position = _list_index(index, f"{where}[0]")
        items = _list(values, f"{where}[1]")
        if position >= len(items):
            raise _fail(where, f"index {position} is out of range for a list of {len(items)}")
        if items[position] is None:
            raise _fail(where, f"element {position} is null")
        return items[position]

    def _sub(self, argument: Json, where: str) -> str:
        if isinstance(argument, list):
            text, variables = self._arguments(argument, where, 2)
            text_where = f"{where}[0]"
            values = {
                name: _scalar_text(value, f"{where}[1].{name}")
                for name, value in _object(variables, f"{where}[1]").items()
            }
        else:
            text, text_where, values = self.value(argument, where), where, {}
        lookup = {**self._parameters, **values}

        def substitute(match: re.Match[str]) -> str:
            escaped, name = match.groups()
            if escaped:  # "${!Name}" is how a template writes a literal "${Name}"
                return f"${{{name}}}"
            if name not in lookup:
                raise _fail(where, f"unknown variable {_brief(name)}")
            return lookup[name]

        return SUB_VARIABLE.sub(substitute, _string(text, text_where))


def _argument_list(argument: Json, where: str, minimum: int, maximum: int) -> list[Json]:
    """A function's argument list, checked for length but not evaluated."""
    if not isinstance(argument, list):
        raise _expected(where, "a list of arguments", argument)
    if not minimum <= len(argument) <= maximum:
        if minimum != maximum:
            wanted = f"{minimum} to {maximum} arguments"
        else:
            wanted = "1 argument" if minimum == 1 else f"{minimum} arguments"
        raise _fail(where, f"expected {wanted}, got {len(argument)}")
    return argument


def _list_index(value: Json, where: str) -> int:
    """A Select index: a non-negative integer, or a string of digits as a Ref yields."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _INDEX.fullmatch(value):
        return int(value)
    raise _fail(where, f"expected a non-negative integer index, got {_describe(value)}")


# ---------------------------------------------------------------------------
# Building the plan from evaluated resources


def _evaluated_properties(resource: ResourceDeclaration, evaluator: _Evaluator) -> dict[str, Json]:
    return evaluator.object_value(resource.properties, _properties_path(resource))


def _properties_path(resource: ResourceDeclaration) -> str:
    return f"Resources.{resource.logical_name}.Properties"


def _required_name(properties: Mapping[str, Json], key: str, where: str) -> str:
    name = _string(_required(properties, key, where), f"{where}.{key}")
    if not name:
        raise _fail(f"{where}.{key}", "must not be empty")
    return name


def _optional_string(properties: Mapping[str, Json], key: str, where: str) -> Optional[str]:
    return _string(properties[key], f"{where}.{key}") if key in properties else None


def _thing_spec(resource: ResourceDeclaration, evaluator: _Evaluator) -> ThingSpec:
    where = _properties_path(resource)
    properties = _evaluated_properties(resource, evaluator)
    attributes = _object(properties.get("AttributePayload", {}), f"{where}.AttributePayload")
    groups = _list(properties.get("ThingGroups", []), f"{where}.ThingGroups")
    return ThingSpec(
        logical_name=resource.logical_name,
        thing_name=_required_name(properties, "ThingName", where),
        attributes={
            name: _scalar_text(value, f"{where}.AttributePayload.{name}") for name, value in attributes.items()
        },
        thing_type_name=_optional_string(properties, "ThingTypeName", where),
        thing_groups=tuple(_string(group, f"{where}.ThingGroups[{index}]") for index, group in enumerate(groups)),
        billing_group=_optional_string(properties, "BillingGroup", where),
        overrides=resource.override_settings,
    )


def _certificate_spec(resource: ResourceDeclaration, evaluator: _Evaluator) -> CertificateSpec:
    where = _properties_path(resource)
    properties = _evaluated_properties(resource, evaluator)
    return CertificateSpec(
        logical_name=resource.logical_name,
        certificate_id=_required_name(properties, "CertificateId", where),
        status=_certificate_status(properties.get("Status", ACTIVE), f"{where}.Status"),
        status_override=resource.override_settings.get("Status"),
    )


def _certificate_status(value: Json, where: str) -> str:
    # AWS's own fleet provisioning example writes "Active".
    status = _string(value, where).upper()
    if status not in _CERTIFICATE_STATUSES:
        raise _fail(where, f"must be ACTIVE or INACTIVE, got {_brief(value)}")
    return status


def _policy_spec(resource: ResourceDeclaration, evaluator: _Evaluator) -> PolicySpec:
    where = _properties_path(resource)
    properties = _evaluated_properties(resource, evaluator)
    has_name, has_document = "PolicyName" in properties, "PolicyDocument" in properties
    if has_name and has_document:
        raise _fail(where, "give PolicyName or PolicyDocument, not both")
    if not has_name and not has_document:
        raise _fail(where, "PolicyName or PolicyDocument is required")
    return PolicySpec(
        logical_name=resource.logical_name,
        policy_name=_optional_string(properties, "PolicyName", where),
        policy_document=(
            _canonical_policy_document(properties["PolicyDocument"], f"{where}.PolicyDocument")
            if has_document
            else None
        ),
    )


def _canonical_policy_document(value: Json, where: str) -> str:
    # The documentation writes PolicyDocument as an escaped string, its fleet example as an object.
    document = _load_json(value, where) if isinstance(value, str) else value
    return json.dumps(_object(document, where), sort_keys=True)


_SPEC_BUILDERS: Mapping[
    str, Callable[[ResourceDeclaration, _Evaluator], Union[ThingSpec, CertificateSpec, PolicySpec]]
] = {THING: _thing_spec, CERTIFICATE: _certificate_spec, POLICY: _policy_spec}


def _device_configuration(template: Template, evaluator: _Evaluator) -> dict[str, str]:
    configuration = _object(
        evaluator.value(template.device_configuration, "DeviceConfiguration"), "DeviceConfiguration"
    )
    return {
        key: _device_configuration_value(value, f"DeviceConfiguration.{key}") for key, value in configuration.items()
    }


def _device_configuration_value(value: Json, where: str) -> str:
    if isinstance(value, (dict, list)):
        raise _fail(where, "DeviceConfiguration does not support nested objects or lists")
    return _scalar_text(value, where)
