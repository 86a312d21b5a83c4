"""The CloudFormation resource types the emulator knows, property by property.

Each property of a known type is one of three kinds:

* emulated: the emulator acts on it (a provisioning template's TemplateBody, a policy's document ...);
* not emulated: it matters only in AWS (IAM roles, tags, a Lambda's memory or VPC); the emulator says so in its
  log and goes on;
* refused: it would change what the emulator does in a way it cannot imitate (a Lambda layer, a claim
  certificate from a PEM rather than a CSR); the emulator stops with an error listing every such property.

A property that is none of them is refused as unknown, and so is a type that is not in TYPES. What Ref and
Fn::GetAtt of each type give follows the CloudFormation resource reference; where AWS would generate a name
(no TemplateName, PolicyName ...), the emulator uses the logical id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

PROVISIONING_TEMPLATE = "AWS::IoT::ProvisioningTemplate"
CERTIFICATE = "AWS::IoT::Certificate"
POLICY = "AWS::IoT::Policy"
POLICY_ATTACHMENT = "AWS::IoT::PolicyPrincipalAttachment"
THING_GROUP = "AWS::IoT::ThingGroup"
THING_TYPE = "AWS::IoT::ThingType"
BILLING_GROUP = "AWS::IoT::BillingGroup"
FUNCTION = "AWS::Lambda::Function"
PERMISSION = "AWS::Lambda::Permission"
ROLE = "AWS::IAM::Role"

# Resource attributes other than Type, Properties and Condition: deployment order and stack lifecycle.
LIFECYCLE_ATTRIBUTES = ("DependsOn", "Metadata", "DeletionPolicy", "UpdateReplacePolicy", "CreationPolicy",
                        "UpdatePolicy")  # fmt: skip

_TAGS = "tags are not emulated"


@dataclass(frozen=True)
class ResourceType:
    emulated: frozenset[str] = frozenset()
    not_emulated: Mapping[str, str] = field(default_factory=dict)  # property -> why it does not matter offline
    refused: Mapping[str, str] = field(default_factory=dict)  # property -> why the emulator cannot imitate it
    whole_type_not_emulated: Optional[str] = None  # every property is "not emulated", for this reason
    name_property: Optional[str] = None  # Ref gives its value, or the logical id
    # Fn::GetAtt attribute -> format; {name} is what Ref gives, {partition} {region} {account} the pseudo parameters
    attributes: Mapping[str, str] = field(default_factory=dict)

    def kind_of(self, prop: str) -> tuple[str, str]:
        """("emulated" | "not emulated" | "refused", why) for one property of this type."""
        if self.whole_type_not_emulated is not None:
            return "not emulated", self.whole_type_not_emulated
        if prop in self.emulated:
            return "emulated", ""
        if prop in self.not_emulated:
            return "not emulated", self.not_emulated[prop]
        if prop in self.refused:
            return "refused", self.refused[prop]
        return "refused", "not a property the emulator knows for this type"


def _iot_arn(kind: str) -> str:
    return f"arn:{{partition}}:iot:{{region}}:{{account}}:{kind}/{{name}}"


TYPES: Mapping[str, ResourceType] = {
    PROVISIONING_TEMPLATE: ResourceType(
        emulated=frozenset({"TemplateName", "TemplateBody", "Enabled", "PreProvisioningHook", "TemplateType"}),
        not_emulated={
            "ProvisioningRoleArn": "the emulator creates things, certificates and policies without assuming a role",
            "Description": "a description only",
            "Tags": _TAGS,
        },
        name_property="TemplateName",
        attributes={"TemplateArn": _iot_arn("provisioningtemplate")},
    ),
    CERTIFICATE: ResourceType(
        emulated=frozenset({"CertificateSigningRequest", "Status"}),
        refused={
            "CertificatePem": "the emulator's CA issues the claim certificate: give CertificateSigningRequest",
            "CACertificatePem": "the emulator's CA issues the claim certificate: give CertificateSigningRequest",
            "CertificateMode": "the emulator's CA issues the claim certificate: give CertificateSigningRequest",
        },
        attributes={"Arn": _iot_arn("cert"), "Id": "{name}"},
    ),
    POLICY: ResourceType(
        emulated=frozenset({"PolicyName", "PolicyDocument"}),
        not_emulated={"Tags": _TAGS},
        name_property="PolicyName",
        attributes={"Arn": _iot_arn("policy"), "Id": "{name}"},
    ),
    POLICY_ATTACHMENT: ResourceType(emulated=frozenset({"PolicyName", "Principal"})),
    THING_GROUP: ResourceType(
        emulated=frozenset({"ThingGroupName"}),
        not_emulated={
            "ThingGroupProperties": "group attributes and descriptions are not emulated",
            "ParentGroupName": "group hierarchies are not emulated",
            "QueryString": "dynamic groups are not emulated",
            "Tags": _TAGS,
        },
        name_property="ThingGroupName",
        attributes={"Arn": _iot_arn("thinggroup"), "Id": "{name}"},
    ),
    THING_TYPE: ResourceType(
        emulated=frozenset({"ThingTypeName"}),
        not_emulated={
            "ThingTypeProperties": "searchable attributes and descriptions are not emulated",
            "DeprecateThingType": "deprecation is not emulated",
            "Tags": _TAGS,
        },
        name_property="ThingTypeName",
        attributes={"Arn": _iot_arn("thingtype"), "Id": "{name}"},
    ),
    BILLING_GROUP: ResourceType(
        emulated=frozenset({"BillingGroupName"}),
        not_emulated={"BillingGroupProperties": "a description only", "Tags": _TAGS},
        name_property="BillingGroupName",
        attributes={"Arn": _iot_arn("billinggroup"), "Id": "{name}"},
    ),
    FUNCTION: ResourceType(
        emulated=frozenset(
            {"Code", "Handler", "Runtime", "Timeout", "Environment", "FunctionName", "MemorySize", "PackageType"}
        ),
        not_emulated={
            "Role": "the emulator checks no IAM permissions; the handler runs without AWS credentials",
            "Description": "a description only",
            "Tags": _TAGS,
            "Architectures": "the handler runs on this machine's CPU",
            "LoggingConfig": "what the handler prints goes to the emulator's log when it fails",
            "TracingConfig": "X-Ray is not emulated",
            "ReservedConcurrentExecutions": "concurrency limits are not emulated",
            "VpcConfig": "the handler runs on this machine's network",
            "KmsKeyArn": "environment variables are not encrypted offline",
            "DeadLetterConfig": "the emulator invokes synchronously, as IoT does",
            "EphemeralStorage": "the handler uses this machine's disk",
            "RecursiveLoop": "recursion detection is not emulated",
            "RuntimeManagementConfig": "the handler runs with the emulator's Python",
            "SnapStart": "SnapStart is not emulated",
            "CodeSigningConfigArn": "code signing is not emulated",
        },
        refused={
            "Layers": "a layer would change what the handler can import",
            "ImageConfig": "the emulator runs only inline Python code (Code.ZipFile)",
            "FileSystemConfigs": "EFS mounts are not emulated",
        },
        name_property="FunctionName",
        attributes={"Arn": "arn:{partition}:lambda:{region}:{account}:function:{name}"},
    ),
    PERMISSION: ResourceType(
        whole_type_not_emulated="IoT may always invoke the emulator's functions; AWS checks this permission",
    ),
    ROLE: ResourceType(
        whole_type_not_emulated="the emulator checks no IAM permissions; roles matter only in AWS",
        name_property="RoleName",
        attributes={"Arn": "arn:{partition}:iam::{account}:role/{name}", "RoleId": "{name}"},
    ),
}
