"""Reading a CloudFormation template for the emulator: short-form tags, intrinsic functions, what is emulated,
what is reported as not emulated, and what is refused (cfn_yaml, cfn_functions, cfn_parameters, cloudformation)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

from fleetprov.emulator.cfn_yaml import parse_cloudformation
from fleetprov.emulator.cloudformation import CloudStack, read_stack
from fleetprov.errors import EX_CONFIG, ConfigError
from tests.support import make_csr

REPO_TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "aws" / "fleetprov-cloud.yaml"
ACCOUNT = "123456789012"

BODY = '{"Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}}}}'  # noqa: E501
CSR = make_csr()[0]
HOOK_CODE = "def handler(event, context):\n    return {'allowProvisioning': True}\n"


def stack(tmp_path: Path, document: Union[str, dict[str, Any]], **parameters: str) -> CloudStack:
    """The stack of a template given as YAML text, or as data (written as JSON, which is YAML too)."""
    path = tmp_path / "stack.yaml"
    path.write_text(textwrap.dedent(document) if isinstance(document, str) else json.dumps(document))
    return read_stack(path, parameters, region="eu-west-1", account=ACCOUNT)


def refused(tmp_path: Path, document: Union[str, dict[str, Any]], **parameters: str) -> str:
    with pytest.raises(ConfigError) as caught:
        stack(tmp_path, document, **parameters)
    assert caught.value.exit_code == EX_CONFIG
    assert str(tmp_path / "stack.yaml") in caught.value.message
    return caught.value.message


def template_resource(name: str = "demo", body: str = BODY, **properties: Any) -> dict[str, Any]:
    return {
        "Type": "AWS::IoT::ProvisioningTemplate",
        "Properties": {
            "TemplateName": name,
            "Enabled": True,
            "ProvisioningRoleArn": f"arn:aws:iam::{ACCOUNT}:role/x",
            "TemplateBody": body,
            **properties,
        },
    }


def hook_function(**attributes: Any) -> dict[str, Any]:
    return {
        "Type": "AWS::Lambda::Function",
        **attributes,
        "Properties": {
            "Runtime": "python3.12",
            "Handler": "index.handler",
            "Role": f"arn:aws:iam::{ACCOUNT}:role/lambda",
            "Code": {"ZipFile": HOOK_CODE},
        },
    }


# -- the YAML reader ----------------------------------------------------------------------------


def test_short_form_tags_become_the_long_form() -> None:
    document = parse_cloudformation(
        textwrap.dedent(
            """\
            AWSTemplateFormatVersion: 2010-09-09
            a: !Ref Name
            b: !GetAtt Resource.Attribute.With.Dots
            c: !GetAtt [Resource, Arn]
            d: !Sub "x-${Name}"
            e: !If [Cond, !Join ["", [a, !Select [0, !Split [",", "p,q"]]]], !Ref AWS::NoValue]
            f: !Equals [!Ref Name, "true"]
            g: !Condition Cond
            h: !ImportValue other-stack-export
            i: !Base64 {"Fn::Sub": "x"}
            """
        )
    )
    assert document == {
        "AWSTemplateFormatVersion": "2010-09-09",
        "a": {"Ref": "Name"},
        "b": {"Fn::GetAtt": ["Resource", "Attribute.With.Dots"]},
        "c": {"Fn::GetAtt": ["Resource", "Arn"]},
        "d": {"Fn::Sub": "x-${Name}"},
        "e": {
            "Fn::If": [
                "Cond",
                {"Fn::Join": ["", ["a", {"Fn::Select": [0, {"Fn::Split": [",", "p,q"]}]}]]},
                {"Ref": "AWS::NoValue"},
            ]
        },
        "f": {"Fn::Equals": [{"Ref": "Name"}, "true"]},
        "g": {"Condition": "Cond"},
        "h": {"Fn::ImportValue": "other-stack-export"},
        "i": {"Fn::Base64": {"Fn::Sub": "x"}},
    }


def test_a_key_given_twice_is_an_error() -> None:
    with pytest.raises(yaml.YAMLError, match="duplicate key 'Type'"):
        parse_cloudformation("Resources:\n  A:\n    Type: X\n    Type: Y\n")


def test_unreadable_yaml_names_the_file_and_the_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "Resources: [unclosed\n")
    assert "not a valid YAML or JSON template" in message and "line" in message


# -- the template in the repository ---------------------------------------------------------------


def test_the_repository_template_with_its_defaults() -> None:
    read = read_stack(REPO_TEMPLATE, {}, region="eu-west-1", account=ACCOUNT)
    [template] = read.templates
    assert template.name == "fleetprov-fleet" and template.enabled
    body = json.loads(template.body)
    assert body["Resources"]["thing"]["Properties"]["ThingName"] == {
        "Fn::Join": ["", ["fleetprov-", {"Ref": "SerialNumber"}]]
    }
    assert body["Resources"]["policy"]["Properties"] == {"PolicyName": "fleetprov-fleet-device"}
    assert template.hook is not None
    assert template.hook.arn == f"arn:aws:lambda:eu-west-1:{ACCOUNT}:function:PreProvisioningHook"
    assert template.hook.handler == "handler" and template.hook.timeout == 5
    assert template.hook.environment == {"ALLOWED_SERIAL_PREFIX": ""}
    policies = {policy.name: json.loads(policy.document) for policy in read.policies}
    claim_resources = policies["fleetprov-fleet-claim"]["Statement"][1]["Resource"]
    assert f"arn:aws:iot:eu-west-1:{ACCOUNT}:topic/$aws/provisioning-templates/fleetprov-fleet/provision/*" in (
        claim_resources
    )
    device_connect = policies["fleetprov-fleet-device"]["Statement"][0]["Resource"]
    assert device_connect == f"arn:aws:iot:eu-west-1:{ACCOUNT}:client/${{iot:Connection.Thing.ThingName}}"
    assert read.claim is not None
    assert read.claim.csr is None and read.claim.status == "ACTIVE"
    assert read.claim.policies == ("fleetprov-fleet-claim",)
    assert any("ProvisioningRole (AWS::IAM::Role)" in line for line in read.not_emulated)
    assert any(
        "CertificateSigningRequest: parameter ClaimCertificateCsr has no value" in line for line in read.not_emulated
    )
    assert not read.warnings
    assert read.outputs_for({"ClaimCertificate": "c0ffee"}) == {
        "TemplateName": "fleetprov-fleet",
        "TemplateArn": f"arn:aws:iot:eu-west-1:{ACCOUNT}:provisioningtemplate/fleetprov-fleet",
        "ClaimCertificateId": "c0ffee",
        "ClaimCertificateArn": f"arn:aws:iot:eu-west-1:{ACCOUNT}:cert/c0ffee",
    }


def test_the_repository_template_with_parameters() -> None:
    read = read_stack(
        REPO_TEMPLATE,
        {
            "TemplateName": "widgets",
            "ThingNamePrefix": "w-",
            "CreatePreProvisioningHook": "false",
            "ClaimCertificateCsr": CSR,
        },
        region="eu-west-1",
        account=ACCOUNT,
    )
    [template] = read.templates
    assert template.name == "widgets" and template.hook is None
    assert '["w-", {"Ref": "SerialNumber"}]' in template.body
    assert read.claim is not None and read.claim.csr == CSR
    assert {policy.name for policy in read.policies} == {"widgets-claim", "widgets-device"}
    assert not any("PreProvisioningHook" in line for line in read.not_emulated)


# -- intrinsic functions ------------------------------------------------------------------------


def test_ref_sub_getatt_and_pseudo_parameters(tmp_path: Path) -> None:
    read = stack(
        tmp_path,
        """
        Parameters:
          Prefix: {Type: String, Default: dev}
          Sizes: {Type: CommaDelimitedList, Default: "a, b"}
        Resources:
          Group:
            Type: AWS::IoT::ThingGroup
            Properties:
              ThingGroupName: !Sub "${Prefix}-${AWS::Region}-${!Literal}"
          Type:
            Type: AWS::IoT::ThingType
            Properties:
              ThingTypeName: !Join
                - "-"
                - [!Ref Group, !Select [1, !Ref Sizes], !Select [1, !Split ["/", !GetAtt Group.Arn]]]
          Billing:
            Type: AWS::IoT::BillingGroup
            Properties:
              BillingGroupName: !Sub
                - "${Name}-${Type}-${AWS::AccountId}-${AWS::Partition}"
                - Name: !FindInMap [Names, !Ref Prefix, billing]
        Mappings:
          Names:
            lab: {billing: money}
        """,
        Prefix="lab",
    )
    group = "lab-eu-west-1-${Literal}"
    assert read.thing_groups == (group,)
    assert read.thing_types == (f"{group}-b-{group}",)
    assert read.billing_groups == (f"money-{group}-b-{group}-{ACCOUNT}-aws",)


def test_find_in_map_names_the_missing_key(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        """
        Mappings:
          Names:
            dev: {billing: money}
        Resources:
          Billing:
            Type: AWS::IoT::BillingGroup
            Properties:
              BillingGroupName: !FindInMap [Names, lab, billing]
        """,
    )
    assert "Resources.Billing.Properties.BillingGroupName.Fn::FindInMap: Mappings.Names.lab does not exist" in message


def test_conditions_if_and_no_value(tmp_path: Path) -> None:
    document = {
        "Parameters": {
            "Hook": {"Type": "String", "AllowedValues": ["yes", "no"], "Default": "yes"},
            "Env": {"Type": "String", "Default": "prod"},
        },
        "Conditions": {
            "WantHook": {"Fn::Equals": [{"Ref": "Hook"}, "yes"]},
            "Production": {"Fn::Equals": [{"Ref": "Env"}, "prod"]},
            "HookInProduction": {"Fn::And": [{"Condition": "WantHook"}, {"Condition": "Production"}]},
            "Either": {"Fn::Or": [{"Fn::Not": [{"Condition": "WantHook"}]}, {"Condition": "Production"}]},
        },
        "Resources": {
            "Template": template_resource(
                PreProvisioningHook={
                    "Fn::If": [
                        "HookInProduction",
                        {"TargetArn": {"Fn::GetAtt": ["Hook", "Arn"]}},
                        {"Ref": "AWS::NoValue"},
                    ]
                }
            ),
            "Hook": hook_function(Condition="WantHook"),
            "Group": {
                "Type": "AWS::IoT::ThingGroup",
                "Condition": "Either",
                "Properties": {"ThingGroupName": {"Fn::If": ["Production", "prod-group", "other-group"]}},
            },
        },
    }
    with_hook = stack(tmp_path, document)
    assert with_hook.templates[0].hook is not None and with_hook.thing_groups == ("prod-group",)
    staging = stack(tmp_path, document, Env="staging")
    assert staging.templates[0].hook is None and staging.thing_groups == ()
    without = stack(tmp_path, document, Hook="no")
    assert without.templates[0].hook is None and without.thing_groups == ("prod-group",)


def test_ref_to_a_resource_left_out_by_its_condition(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        """
        Conditions:
          Never: !Equals [a, b]
        Resources:
          Group:
            Type: AWS::IoT::ThingGroup
            Condition: Never
          Type:
            Type: AWS::IoT::ThingType
            Properties:
              ThingTypeName: !Ref Group
        """,
    )
    assert "Resources.Type.Properties.ThingTypeName.Ref: resource Group is left out by its Condition" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("!GetAtt Group.Nope", "Fn::GetAtt Group.Nope: the emulator knows these of AWS::IoT::ThingGroup: Arn, Id"),
        ("!ImportValue shared", "the emulator cannot evaluate Fn::ImportValue: it reads another stack's exports"),
        ("!Ref Nothing", "no parameter or resource named 'Nothing'"),
        ("!Ref AWS::NotificationARNs", "the emulator does not know the pseudo parameter AWS::NotificationARNs"),
        ("!Equals [a, a]", "Fn::Equals: allowed only in the Conditions section"),
        ("!Sub ${Undeclared}", "no parameter or resource named 'Undeclared'"),
    ],
)
def test_what_cannot_be_evaluated_is_named(tmp_path: Path, value: str, expected: str) -> None:
    message = refused(
        tmp_path,
        f"""
        Resources:
          Group:
            Type: AWS::IoT::ThingGroup
          Type:
            Type: AWS::IoT::ThingType
            Properties:
              ThingTypeName: {value}
        """,
    )
    assert "Resources.Type.Properties.ThingTypeName" in message and expected in message


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"Other": "x"}, "--parameter: the template declares no parameter Other (it declares: Name)"),
        ({"Name": "UPPER"}, "--parameter Name: value 'UPPER' does not match AllowedPattern [a-z]+ (lower case)"),
        ({"Name": "abcdefghijk"}, "--parameter Name: value 'abcdefghijk' is longer than MaxLength 10"),
        ({}, "Resources.Group.Properties.ThingGroupName.Ref: parameter Name has no value and no Default"),
    ],
)
def test_parameter_values_are_checked(tmp_path: Path, parameters: dict[str, str], expected: str) -> None:
    message = refused(
        tmp_path,
        """
        Parameters:
          Name:
            Type: String
            AllowedPattern: "[a-z]+"
            MaxLength: 10
            ConstraintDescription: lower case
        Resources:
          Group:
            Type: AWS::IoT::ThingGroup
            Properties:
              ThingGroupName: !Ref Name
        """,
        **parameters,
    )
    assert expected in message


def test_a_secret_parameter_value_is_not_shown(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        """
        Parameters:
          Token: {Type: String, NoEcho: true, AllowedValues: [a]}
        Resources:
          Group: {Type: AWS::IoT::ThingGroup}
        """,
        Token="s3cret",
    )
    assert "the value is not one of AllowedValues" in message and "s3cret" not in message


# -- what the emulator refuses, and what it reports as not emulated -------------------------------


def test_unsupported_types_and_properties_are_all_listed(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        f"""
        Transform: AWS::Serverless-2016-10-31
        Resources:
          Bucket:
            Type: AWS::S3::Bucket
          Claim:
            Type: AWS::IoT::Certificate
            Properties:
              CertificatePem: PEM
              Status: ACTIVE
          Hook:
            Type: AWS::Lambda::Function
            Properties:
              Layers: [arn:aws:lambda:eu-west-1:{ACCOUNT}:layer:x:1]
              Runtime: python3.12
              Handler: index.handler
              Typo: 1
              Role: r
              Code: {{ZipFile: x}}
            Dependson: Bucket
        """,
    )
    for expected in (
        "Transform: the emulator runs no transforms",
        "Resources.Bucket: type AWS::S3::Bucket is not emulated",
        "Resources.Claim.Properties.CertificatePem: the emulator's CA issues the claim certificate",
        "Resources.Hook.Properties.Layers: a layer would change what the handler can import",
        "Resources.Hook.Properties.Typo: not a property the emulator knows for this type",
        "Resources.Hook.Dependson: not a resource attribute",
    ):
        assert expected in message, message


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ("Runtime: nodejs20.x\n      Handler: index.handler", "Runtime: the emulator runs only Python (python3.x)"),
        ("Runtime: python3.12\n      Handler: app.main", "Handler: inline code is saved as index.py"),
        ("Runtime: python3.12\n      Handler: index.handler\n      Code: {S3Bucket: b, S3Key: k}", "Code"),
    ],
)
def test_functions_must_be_inline_python(tmp_path: Path, properties: str, expected: str) -> None:
    code = "" if "Code" in properties else "\n      Code: {ZipFile: x}"
    text = f"""
Resources:
  Hook:
    Type: AWS::Lambda::Function
    Properties:
      Role: r
      {properties}{code}
"""
    message = refused(tmp_path, text)
    assert f"Resources.Hook.Properties.{expected}" in message


def test_what_matters_only_in_aws_is_noted(tmp_path: Path) -> None:
    read = stack(
        tmp_path,
        {
            "Resources": {
                "Role": {"Type": "AWS::IAM::Role", "Properties": {"AssumeRolePolicyDocument": {}}},
                "Template": template_resource(Tags=[{"Key": "team", "Value": "fleet"}]),
                "Permission": {
                    "Type": "AWS::Lambda::Permission",
                    "DependsOn": "Role",
                    "Properties": {
                        "Action": "lambda:InvokeFunction",
                        "FunctionName": "f",
                        "Principal": "iot.amazonaws.com",
                    },
                },
            }
        },
    )
    assert read.not_emulated == (
        "Resources.Role (AWS::IAM::Role): the emulator checks no IAM permissions; roles matter only in AWS",
        "Resources.Template.Properties.ProvisioningRoleArn: the emulator creates things, certificates and policies "
        "without assuming a role",
        "Resources.Template.Properties.Tags: tags are not emulated",
        "Resources.Permission (AWS::Lambda::Permission): IoT may always invoke the emulator's functions; AWS checks "
        "this permission",
        "Resources.Permission: DependsOn: the emulator creates everything at start",
    )
    [warning] = read.warnings
    assert "Resources.Permission: no SourceArn or SourceAccount" in warning and "confused deputy" in warning


def test_a_template_body_must_be_a_provisioning_template(tmp_path: Path) -> None:
    message = refused(tmp_path, {"Resources": {"Template": template_resource(body='{"Resources": {}, "Outputs": {}}')}})
    assert "Resources.Template.Properties.TemplateBody: not a provisioning template: Unknown top-level key" in message


def test_the_certificate_id_is_only_known_where_the_emulator_can_fill_it_in(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        """
        Parameters:
          Csr: {Type: String}
        Resources:
          Claim:
            Type: AWS::IoT::Certificate
            Properties: {CertificateSigningRequest: !Ref Csr, Status: ACTIVE}
          Group:
            Type: AWS::IoT::ThingGroup
            Properties:
              ThingGroupName: !Sub "group-${Claim}"
        """,
        Csr=CSR,
    )
    assert "ThingGroupName: uses the id of certificate Claim, which the emulator knows only once it has issued it" in (
        message
    )


def test_policies_attach_only_to_the_templates_certificate(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        """
        Resources:
          Claim:
            Type: AWS::IoT::Certificate
            Properties: {CertificateSigningRequest: CSR, Status: ACTIVE}
          Policy:
            Type: AWS::IoT::Policy
            Properties:
              PolicyDocument: {Version: "2012-10-17", Statement: {Effect: Allow, Action: "iot:*", Resource: "*"}}
          Attachment:
            Type: AWS::IoT::PolicyPrincipalAttachment
            Properties:
              PolicyName: !Ref Policy
              Principal: arn:aws:iot:eu-west-1:123456789012:cert/0123
        """,
    )
    assert (
        "Resources.Attachment.Properties.Principal: the emulator attaches policies only to the certificate" in message
    )


def test_a_hook_must_be_a_function_of_the_template(tmp_path: Path) -> None:
    elsewhere = {"TargetArn": f"arn:aws:lambda:eu-west-1:{ACCOUNT}:function:elsewhere", "PayloadVersion": "2020-04-01"}
    message = refused(tmp_path, {"Resources": {"Template": template_resource(PreProvisioningHook=elsewhere)}})
    assert "PreProvisioningHook.TargetArn: 'arn:aws:lambda:eu-west-1:123456789012:function:elsewhere' is not" in message


def test_policy_elements_the_emulator_cannot_evaluate_are_refused(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        """
        Resources:
          Policy:
            Type: AWS::IoT::Policy
            Properties:
              PolicyName: p
              PolicyDocument:
                Version: "2012-10-17"
                Statement:
                  - {Effect: Allow, Action: "iot:Connect", Resource: "*", Condition: {Bool: {"iot:x": true}}}
        """,
    )
    assert "Resources.Policy.Properties.PolicyDocument: policy 'p': Statement[0].Condition: not supported" in message


def test_a_disabled_template_is_read_as_disabled(tmp_path: Path) -> None:
    read = stack(tmp_path, {"Resources": {"Template": template_resource(Enabled=False)}})
    assert [template.enabled for template in read.templates] == [False]


def test_a_number_of_things_with_one_name(tmp_path: Path) -> None:
    message = refused(tmp_path, {"Resources": {"Template": template_resource(), "Again": template_resource()}})
    assert "two resources make the provisioning template demo" in message


def test_the_claim_csr_is_checked(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        """
        Resources:
          Claim:
            Type: AWS::IoT::Certificate
            Properties: {CertificateSigningRequest: not a CSR, Status: ACTIVE}
        """,
    )
    assert "Resources.Claim.Properties.CertificateSigningRequest: certificateSigningRequest is not a PEM" in message
