"""Read the CloudFormation template that AWS deploys (configs/aws/fleetprov-cloud.yaml) into what the emulator
serves: provisioning templates, their pre-provisioning hooks (inline Python Lambda functions), IoT policies,
the claim certificate with the policies attached to it, and thing groups, thing types and billing groups.

Pure apart from reading the file: stack_setup.py puts the result into the state directory and the registry.
Resource types and properties are checked against cfn_types.py first; every one the emulator cannot imitate
is listed in one error, and every one that matters only in AWS becomes a "not emulated" note for the log.

The claim certificate's id is known only once the emulator has issued it, so Ref and Fn::GetAtt of an
AWS::IoT::Certificate give a placeholder here. It may appear only where the emulator can resolve it: a
PolicyPrincipalAttachment's Principal (which certificate gets the policy) and the Outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fleetprov.emulator.ca import CsrRejected, validate_csr
from fleetprov.emulator.cfn_functions import (
    CloudFormationError,
    Evaluator,
    MissingParameterValue,
    Scope,
    brief,
    fail,
    scalar_text,
)
from fleetprov.emulator.cfn_parameters import parameter_values
from fleetprov.emulator.cfn_types import (
    BILLING_GROUP,
    CERTIFICATE,
    FUNCTION,
    LIFECYCLE_ATTRIBUTES,
    PERMISSION,
    POLICY,
    POLICY_ATTACHMENT,
    PROVISIONING_TEMPLATE,
    THING_GROUP,
    THING_TYPE,
    TYPES,
)
from fleetprov.emulator.cfn_yaml import load_cloudformation
from fleetprov.emulator.intrinsics import NO_VALUE, Json
from fleetprov.emulator.policy import Policy, PolicyError
from fleetprov.emulator.templates import TemplateError, parse_template
from fleetprov.errors import ConfigError

PAYLOAD_VERSION = "2020-04-01"  # the only pre-provisioning hook payload version AWS documents
DEFAULT_LAMBDA_TIMEOUT = 3.0  # seconds, Lambda's default
_SECTIONS = ("AWSTemplateFormatVersion", "Description", "Metadata", "Parameters", "Mappings", "Conditions",
             "Resources", "Outputs")  # fmt: skip
_RESOURCE_KEYS = ("Type", "Properties", "Condition", *LIFECYCLE_ATTRIBUTES)
_TEMPLATE_NAME = re.compile(r"[0-9A-Za-z_-]{1,36}")
_RUNTIME = re.compile(r"python3\.[0-9]+")
_HANDLER = re.compile(r"index\.([A-Za-z_][A-Za-z0-9_]*)")  # inline code is saved as index.py
_PLACEHOLDER = re.compile("\x00([^\x00]*)\x00")
_CLAIM_STATUSES = ("ACTIVE", "INACTIVE", "REVOKED")


def _placeholder(logical_id: str) -> str:
    return f"\x00{logical_id}\x00"


@dataclass(frozen=True)
class StackFunction:
    """An inline Python Lambda function, run as a pre-provisioning hook."""

    logical_id: str
    name: str
    arn: str
    code: str  # Code.ZipFile: AWS saves it as index.py
    handler: str  # the function in index.py
    runtime: str
    timeout: float  # seconds
    memory_mb: int
    environment: Mapping[str, str]


@dataclass(frozen=True)
class StackTemplate:
    logical_id: str
    name: str
    body: str  # the TemplateBody, accepted by templates.parse_template
    enabled: bool
    hook: Optional[StackFunction]


@dataclass(frozen=True)
class StackPolicy:
    logical_id: str
    name: str
    document: str  # canonical JSON


@dataclass(frozen=True)
class StackClaim:
    """The AWS::IoT::Certificate: the fleet's claim certificate."""

    logical_id: str
    csr: Optional[str]  # None: its CSR parameter has no value, so the emulator makes the claim key itself
    status: str
    policies: tuple[str, ...]  # names of the policies PolicyPrincipalAttachments give it


@dataclass(frozen=True)
class CloudStack:
    path: Path
    templates: tuple[StackTemplate, ...]
    policies: tuple[StackPolicy, ...]
    claim: Optional[StackClaim]
    thing_groups: tuple[str, ...]
    thing_types: tuple[str, ...]
    billing_groups: tuple[str, ...]
    not_emulated: tuple[str, ...]  # "<place>: <why it does not matter offline>"
    warnings: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]  # may hold the claim certificate's placeholder: see outputs_for

    def outputs_for(self, certificate_ids: Mapping[str, str]) -> dict[str, str]:
        """The Outputs with the ids of the certificates (logical id -> certificate id) filled in."""
        return {
            name: _PLACEHOLDER.sub(lambda match: certificate_ids.get(match.group(1), "?"), value)
            for name, value in self.outputs
        }


def read_stack(path: Path, parameters: Mapping[str, str], *, region: str, account: str) -> CloudStack:
    """The stack ``path`` describes, with ``parameters`` given; ConfigError naming the file and the place."""
    document = load_cloudformation(path)
    try:
        return _Reader(path, document, parameters, region, account).read()
    except CloudFormationError as exc:
        raise ConfigError(f"{path}: {exc.message}", step="config") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: nested too deeply to evaluate", step="config") from exc


class _Reader:
    """One pass over one template. Implements cfn_functions.ResourceNames for its Evaluator."""

    def __init__(self, path: Path, document: dict[str, Any], given: Mapping[str, str], region: str,
                 account: str) -> None:  # fmt: skip
        self._path = path
        self._document = document
        resources = document.get("Resources")
        if not isinstance(resources, dict) or not resources:
            raise fail("Resources", "expected a mapping of at least one resource")
        self._resources: dict[str, Any] = {str(key): value for key, value in resources.items()}
        stack_name = re.sub(r"[^A-Za-z0-9-]", "-", path.stem) or "fleetprov"
        self._pseudo = {
            "AWS::Region": region,
            "AWS::AccountId": account,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": stack_name,
            "AWS::StackId": f"arn:aws:cloudformation:{region}:{account}:stack/{stack_name}/emulated",
        }
        scope = Scope(
            parameters=parameter_values(document.get("Parameters"), given),
            pseudo_parameters=self._pseudo,
            mappings=_mapping_section(document, "Mappings"),
            conditions=_mapping_section(document, "Conditions"),
        )
        self._evaluator = Evaluator(scope, self)
        self._names: dict[str, str] = {}
        self._naming: list[str] = []
        self._not_emulated: list[str] = []
        self._warnings: list[str] = []

    # -- the pass -------------------------------------------------------------------------------

    def read(self) -> CloudStack:
        self._check_sections_and_types()
        for name in _mapping_section(self._document, "Conditions"):
            self._evaluator.condition(str(name), "Conditions")
        present = [logical_id for logical_id in self._resources if self._condition_holds(logical_id)]
        for logical_id in present:
            self._note_not_emulated(logical_id)
        functions = {function.arn: function for function in map(self._function, self._of_type(present, FUNCTION))}
        policies = tuple(self._policy(logical_id) for logical_id in self._of_type(present, POLICY))
        templates = tuple(
            self._template(logical_id, functions) for logical_id in self._of_type(present, PROVISIONING_TEMPLATE)
        )
        _no_duplicates("provisioning template", [template.name for template in templates])
        _no_duplicates("policy", [policy.name for policy in policies])
        return CloudStack(
            path=self._path,
            templates=templates,
            policies=policies,
            claim=self._claim(present, {policy.name for policy in policies}),
            thing_groups=tuple(self._name(i, "Resources") for i in self._of_type(present, THING_GROUP)),
            thing_types=tuple(self._name(i, "Resources") for i in self._of_type(present, THING_TYPE)),
            billing_groups=tuple(self._name(i, "Resources") for i in self._of_type(present, BILLING_GROUP)),
            not_emulated=tuple(self._not_emulated),
            warnings=tuple(self._warnings),
            outputs=self._outputs(),
        )

    def _check_sections_and_types(self) -> None:
        """Every section, resource type, resource attribute and property the emulator cannot imitate, at once."""
        problems = []
        for section in self._document:
            if section == "Rules":
                self._not_emulated.append("Rules: CloudFormation checks them before it deploys")
            elif section == "Transform":
                problems.append("Transform: the emulator runs no transforms (SAM, AWS::LanguageExtensions, macros)")
            elif section not in _SECTIONS:
                problems.append(f"{brief(section)}: not a CloudFormation template section")
        for logical_id, declaration in self._resources.items():
            where = f"Resources.{logical_id}"
            if not isinstance(declaration, dict) or not isinstance(declaration.get("Type"), str):
                problems.append(f"{where}: expected a mapping with Type")
                continue
            resource_type = TYPES.get(declaration["Type"])
            if resource_type is None:
                problems.append(f"{where}: type {declaration['Type']} is not emulated")
                continue
            problems += [f"{where}.{key}: not a resource attribute" for key in declaration if key not in _RESOURCE_KEYS]
            properties = declaration.get("Properties") or {}
            if not isinstance(properties, dict):
                problems.append(f"{where}.Properties: expected a mapping")
                continue
            for prop in properties:
                kind, why = resource_type.kind_of(str(prop))
                if kind == "refused":
                    problems.append(f"{where}.Properties.{prop}: {why}")
        if problems:
            listed = "\n  ".join(problems)
            raise CloudFormationError(f"the emulator cannot run this template:\n  {listed}")

    def _condition_holds(self, logical_id: str) -> bool:
        name = self._resources[logical_id].get("Condition")
        if name is None:
            return True
        if not isinstance(name, str):
            raise fail(f"Resources.{logical_id}.Condition", f"expected a condition name, got {brief(name)}")
        return self._evaluator.condition(name, f"Resources.{logical_id}.Condition")

    def _note_not_emulated(self, logical_id: str) -> None:
        declaration = self._resources[logical_id]
        where = f"Resources.{logical_id}"
        resource_type = TYPES[declaration["Type"]]
        if resource_type.whole_type_not_emulated is not None:
            self._not_emulated.append(f"{where} ({declaration['Type']}): {resource_type.whole_type_not_emulated}")
        else:
            for prop in declaration.get("Properties") or {}:
                kind, why = resource_type.kind_of(str(prop))
                if kind == "not emulated":
                    self._not_emulated.append(f"{where}.Properties.{prop}: {why}")
        lifecycle = [key for key in declaration if key in LIFECYCLE_ATTRIBUTES]
        if lifecycle:
            self._not_emulated.append(f"{where}: {', '.join(lifecycle)}: the emulator creates everything at start")
        if declaration["Type"] == PERMISSION:
            properties = declaration.get("Properties") or {}
            if "SourceArn" not in properties and "SourceAccount" not in properties:
                self._warnings.append(
                    f"{where}: no SourceArn or SourceAccount: in AWS, IoT acting for another account could invoke "
                    "the function (confused deputy; see the pre-provisioning hook documentation)"
                )

    def _of_type(self, logical_ids: list[str], resource_type: str) -> list[str]:
        return [logical_id for logical_id in logical_ids if self._resources[logical_id]["Type"] == resource_type]

    # -- ResourceNames --------------------------------------------------------------------------

    def ref(self, logical_id: str, where: str) -> str:
        if self._resource_type(logical_id, where) == CERTIFICATE:
            return _placeholder(logical_id)
        return self._name(logical_id, where)

    def attribute(self, logical_id: str, attribute: str, where: str) -> str:
        type_name = self._resource_type(logical_id, where)
        formats = TYPES[type_name].attributes
        if attribute not in formats:
            known = ", ".join(formats) or "none"
            raise fail(where, f"Fn::GetAtt {logical_id}.{attribute}: the emulator knows these of {type_name}: {known}")
        name = _placeholder(logical_id) if type_name == CERTIFICATE else self._name(logical_id, where)
        return formats[attribute].format(
            name=name,
            partition=self._pseudo["AWS::Partition"],
            region=self._pseudo["AWS::Region"],
            account=self._pseudo["AWS::AccountId"],
        )

    def _resource_type(self, logical_id: str, where: str) -> str:
        if logical_id not in self._resources:
            raise fail(where, f"no parameter or resource named {brief(logical_id)}")
        if not self._condition_holds(logical_id):
            raise fail(where, f"resource {logical_id} is left out by its Condition")
        type_name: str = self._resources[logical_id]["Type"]
        return type_name

    def _name(self, logical_id: str, where: str) -> str:
        """What Ref gives: the resource's name property, or its logical id where AWS would generate a name."""
        if logical_id in self._names:
            return self._names[logical_id]
        if logical_id in self._naming:
            cycle = " -> ".join([*self._naming[self._naming.index(logical_id) :], logical_id])
            raise fail(where, f"circular reference: {cycle}")
        self._naming.append(logical_id)
        try:
            name_property = TYPES[self._resources[logical_id]["Type"]].name_property
            value = self._property(logical_id, name_property) if name_property else None
            name = (
                logical_id if value is None else self._text(value, f"Resources.{logical_id}.Properties.{name_property}")
            )
        finally:
            self._naming.pop()
        self._names[logical_id] = name
        return name

    # -- properties -----------------------------------------------------------------------------

    def _property(self, logical_id: str, prop: str) -> Json:
        """The evaluated property; None if it is absent or AWS::NoValue."""
        properties = self._resources[logical_id].get("Properties") or {}
        if prop not in properties:
            return None
        value = self._evaluator.value(properties[prop], f"Resources.{logical_id}.Properties.{prop}")
        return None if value is NO_VALUE else value

    def _text(self, value: Json, where: str) -> str:
        text = scalar_text(value, where)
        match = _PLACEHOLDER.search(text)
        if match:
            raise fail(
                where,
                f"uses the id of certificate {match.group(1)}, which the emulator knows only once it has issued it "
                "(only a PolicyPrincipalAttachment's Principal and the Outputs may)",
            )
        return text

    def _required_text(self, logical_id: str, prop: str) -> str:
        value = self._property(logical_id, prop)
        where = f"Resources.{logical_id}.Properties.{prop}"
        if value is None:
            raise fail(where, "missing")
        return self._text(value, where)

    def _function(self, logical_id: str) -> StackFunction:
        where = f"Resources.{logical_id}.Properties"
        package = self._property(logical_id, "PackageType")
        if package is not None and package != "Zip":
            raise fail(f"{where}.PackageType", "the emulator runs only inline Python code (Zip, Code.ZipFile)")
        runtime = self._required_text(logical_id, "Runtime")
        if not _RUNTIME.fullmatch(runtime):
            raise fail(f"{where}.Runtime", f"the emulator runs only Python (python3.x) handlers, got {brief(runtime)}")
        handler = _HANDLER.fullmatch(self._required_text(logical_id, "Handler"))
        if handler is None:
            raise fail(f"{where}.Handler", "inline code is saved as index.py: expected index.<function>")
        code = self._property(logical_id, "Code")
        if not isinstance(code, dict) or "ZipFile" not in code:
            raise fail(f"{where}.Code", "the emulator runs only inline code: expected Code.ZipFile")
        for key in code:
            if key != "ZipFile":
                raise fail(f"{where}.Code.{key}", "the emulator runs only inline code (Code.ZipFile)")
        return StackFunction(
            logical_id=logical_id,
            name=self._name(logical_id, where),
            arn=self.attribute(logical_id, "Arn", where),
            code=self._text(code["ZipFile"], f"{where}.Code.ZipFile"),
            handler=handler.group(1),
            runtime=runtime,
            timeout=self._number(logical_id, "Timeout", DEFAULT_LAMBDA_TIMEOUT, 1, 900),
            memory_mb=int(self._number(logical_id, "MemorySize", 128, 128, 10240)),
            environment=self._environment(logical_id),
        )

    def _number(self, logical_id: str, prop: str, default: float, low: float, high: float) -> float:
        value = self._property(logical_id, prop)
        if value is None:
            return default
        where = f"Resources.{logical_id}.Properties.{prop}"
        try:
            number = float(self._text(value, where))
        except ValueError:
            raise fail(where, f"expected a number, got {brief(value)}") from None
        if not low <= number <= high:
            raise fail(where, f"expected {low:g} to {high:g}, got {number:g}")
        return number

    def _environment(self, logical_id: str) -> dict[str, str]:
        where = f"Resources.{logical_id}.Properties.Environment"
        environment = self._property(logical_id, "Environment")
        if environment is None:
            return {}
        if not isinstance(environment, dict) or set(environment) - {"Variables"}:
            raise fail(where, "expected a mapping with Variables only")
        variables = environment.get("Variables", {})
        if not isinstance(variables, dict):
            raise fail(f"{where}.Variables", f"expected a mapping, got {brief(variables)}")
        return {str(key): self._text(value, f"{where}.Variables.{key}") for key, value in variables.items()}

    def _policy(self, logical_id: str) -> StackPolicy:
        where = f"Resources.{logical_id}.Properties.PolicyDocument"
        name = self._name(logical_id, where)
        document = self._property(logical_id, "PolicyDocument")
        if isinstance(document, str):
            try:
                document = json.loads(self._text(document, where))
            except ValueError as exc:
                raise fail(where, f"not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise fail(where, f"expected a policy document, got {brief(document)}")
        self._text(json.dumps(document), where)  # no certificate placeholder inside
        try:
            Policy.parse(name, document)
        except PolicyError as exc:
            raise fail(where, exc.message) from exc
        return StackPolicy(logical_id, name, json.dumps(document, sort_keys=True))

    def _template(self, logical_id: str, functions: Mapping[str, StackFunction]) -> StackTemplate:
        where = f"Resources.{logical_id}.Properties"
        name = self._name(logical_id, where)
        if not _TEMPLATE_NAME.fullmatch(name):
            raise fail(f"{where}.TemplateName", f"{brief(name)} is not 1-36 characters of A-Z a-z 0-9 _ -")
        template_type = self._property(logical_id, "TemplateType")
        if template_type not in (None, "FLEET_PROVISIONING"):
            wanted = "the emulator serves FLEET_PROVISIONING templates"
            raise fail(f"{where}.TemplateType", f"{wanted}, got {brief(template_type)}")
        body = self._property(logical_id, "TemplateBody")
        if not isinstance(body, str):
            raise fail(f"{where}.TemplateBody", "expected the template as a JSON string (build it with !Sub)")
        body = self._text(body, f"{where}.TemplateBody")
        try:
            parse_template(body)
        except TemplateError as exc:
            raise fail(f"{where}.TemplateBody", f"not a provisioning template: {exc.message}") from exc
        enabled = self._property(logical_id, "Enabled")
        if enabled not in (None, True, False, "true", "false"):
            raise fail(f"{where}.Enabled", f"expected true or false, got {brief(enabled)}")
        return StackTemplate(logical_id, name, body, enabled in (True, "true"), self._hook(logical_id, functions))

    def _hook(self, logical_id: str, functions: Mapping[str, StackFunction]) -> Optional[StackFunction]:
        where = f"Resources.{logical_id}.Properties.PreProvisioningHook"
        hook = self._property(logical_id, "PreProvisioningHook")
        if hook is None:
            return None
        if not isinstance(hook, dict) or set(hook) - {"TargetArn", "PayloadVersion"}:
            raise fail(where, "expected a mapping with TargetArn and PayloadVersion")
        version = self._text(hook.get("PayloadVersion", PAYLOAD_VERSION), f"{where}.PayloadVersion")
        if version != PAYLOAD_VERSION:
            wanted = f"the emulator speaks payload version {PAYLOAD_VERSION}"
            raise fail(f"{where}.PayloadVersion", f"{wanted}, got {brief(version)}")
        target = self._text(hook.get("TargetArn"), f"{where}.TargetArn")
        if target not in functions:
            raise fail(
                f"{where}.TargetArn",
                f"{brief(target)} is not the Arn of an AWS::Lambda::Function of this template (use !GetAtt "
                "<function>.Arn): the emulator runs only functions it can read",
            )
        return functions[target]

    def _claim(self, present: list[str], policy_names: set[str]) -> Optional[StackClaim]:
        certificates = self._of_type(present, CERTIFICATE)
        if len(certificates) > 1:
            raise fail("Resources", f"the emulator serves one claim certificate, got {', '.join(certificates)}")
        attached: dict[str, list[str]] = {logical_id: [] for logical_id in certificates}
        for attachment in self._of_type(present, POLICY_ATTACHMENT):
            where = f"Resources.{attachment}.Properties"
            policy = self._required_text(attachment, "PolicyName")
            if policy not in policy_names:
                raise fail(f"{where}.PolicyName", f"{brief(policy)} is not an AWS::IoT::Policy of this template")
            principal = scalar_text(self._property(attachment, "Principal"), f"{where}.Principal")
            owners = [cert for cert in certificates if principal == self.attribute(cert, "Arn", where)]
            if not owners:
                raise fail(
                    f"{where}.Principal",
                    "the emulator attaches policies only to the certificate of this template: expected !GetAtt "
                    "<certificate>.Arn",
                )
            attached[owners[0]].append(policy)
        if not certificates:
            return None
        (logical_id,) = certificates
        where = f"Resources.{logical_id}.Properties"
        status = self._required_text(logical_id, "Status")
        if status not in _CLAIM_STATUSES:
            wanted = f"the emulator's claim certificate is {', '.join(_CLAIM_STATUSES)}"
            raise fail(f"{where}.Status", f"{wanted}, got {brief(status)}")
        try:
            csr: Optional[str] = self._required_text(logical_id, "CertificateSigningRequest")
            validate_csr(csr or "")
        except CsrRejected as exc:
            raise fail(f"{where}.CertificateSigningRequest", exc.message) from exc
        except MissingParameterValue as missing:
            csr = None
            self._not_emulated.append(
                f"{where}.CertificateSigningRequest: parameter {missing.name} has no value: the emulator makes the "
                "claim key and certificate itself"
            )
        return StackClaim(logical_id, csr, status, tuple(attached[logical_id]))

    def _outputs(self) -> tuple[tuple[str, str], ...]:
        outputs = []
        for name, declaration in _mapping_section(self._document, "Outputs").items():
            where = f"Outputs.{name}"
            if not isinstance(declaration, dict) or "Value" not in declaration:
                raise fail(where, "expected a mapping with Value")
            condition = declaration.get("Condition")
            if isinstance(condition, str) and not self._evaluator.condition(condition, f"{where}.Condition"):
                continue
            if "Export" in declaration:
                self._not_emulated.append(f"{where}.Export: there are no other stacks to import it")
            outputs.append((str(name), self._evaluator.text(declaration["Value"], f"{where}.Value")))
        return tuple(outputs)


def _mapping_section(document: Mapping[str, Any], section: str) -> dict[str, Any]:
    value = document.get(section) or {}
    if not isinstance(value, dict):
        raise fail(section, f"expected a mapping, got {brief(value)}")
    return value


def _no_duplicates(kind: str, names: list[str]) -> None:
    for name in names:
        if names.count(name) > 1:
            raise fail("Resources", f"two resources make the {kind} {name}")
