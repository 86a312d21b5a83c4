"""Tests for fleetprov.emulator.templates: the AWS IoT fleet-provisioning template evaluator."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprov.emulator.templates import (
    CertificateSpec,
    PolicySpec,
    ProvisioningPlan,
    Template,
    TemplateError,
    ThingSpec,
    evaluate,
    parse_template,
)
from fleetprov.errors import EmulatorError

THING = "AWS::IoT::Thing"
CERTIFICATE = "AWS::IoT::Certificate"
POLICY = "AWS::IoT::Policy"

# Copied verbatim from the AWS IoT developer guide, "Template example for fleet provisioning"
# (/work/shared/reference/aws-iot-docs/provision-template.md).
AWS_FLEET_PROVISIONING_EXAMPLE = r"""
{
    "Parameters" : {
        "ThingName" : {
            "Type" : "String"
        },
        "SerialNumber": {
            "Type": "String"
        },
        "DeviceLocation": {
            "Type": "String"
        }
    },
    "Mappings": {
        "LocationTable": {
            "Seattle": {
                "LocationUrl": "https://example.aws"
            }
        }
    },
    "Resources" : {
        "thing" : {
            "Type" : "AWS::IoT::Thing",
            "Properties" : {
                "AttributePayload" : { 
                    "version" : "v1",
                    "serialNumber" : "serialNumber"
                },
                "ThingName" : {"Ref" : "ThingName"},
                "ThingTypeName" : {"Fn::Join":["",["ThingPrefix_",{"Ref":"SerialNumber"}]]},
                "ThingGroups" : ["v1-lightbulbs", "WA"],
                "BillingGroup": "LightBulbBillingGroup"
            },
            "OverrideSettings" : {
                "AttributePayload" : "MERGE",
                "ThingTypeName" : "REPLACE",
                "ThingGroups" : "DO_NOTHING"
            }
        },
        "certificate" : {
            "Type" : "AWS::IoT::Certificate",
            "Properties" : {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                "Status" : "Active"
            }
        },
        "policy" : {
            "Type" : "AWS::IoT::Policy",
            "Properties" : {
                "PolicyDocument" : {
                    "Version": "2012-10-17",
                    "Statement": [{
                        "Effect": "Allow",
                        "Action":["iot:Publish"],
                        "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"]
                    }]
                }
            }
        }
    },
    "DeviceConfiguration": {
        "FallbackUrl": "https://www.example.com/test-site",
        "LocationUrl": {
            "Fn::FindInMap": ["LocationTable",{"Ref": "DeviceLocation"}, "LocationUrl"]}
        }
}
"""  # noqa: W291  (verbatim from the AWS documentation)

# Copied verbatim from the same page, "Template example for just-in-time provisioning (JITP)".
AWS_JITP_EXAMPLE = r"""
{
   "Parameters":{
      "AWS::IoT::Certificate::CommonName":{
         "Type":"String"
      },
      "AWS::IoT::Certificate::SerialNumber":{
         "Type":"String"
      },
      "AWS::IoT::Certificate::Country":{
         "Type":"String"
      },
      "AWS::IoT::Certificate::Id":{
         "Type":"String"
      }
   },
   "Resources":{
      "thing":{
         "Type":"AWS::IoT::Thing",
         "Properties":{
            "ThingName":{
               "Ref":"AWS::IoT::Certificate::CommonName"
            },
            "AttributePayload":{
               "version":"v1",
               "serialNumber":{
                  "Ref":"AWS::IoT::Certificate::SerialNumber"
               }
            },
            "ThingTypeName":"lightBulb-versionA",
            "ThingGroups":[
               "v1-lightbulbs",
               {
                  "Ref":"AWS::IoT::Certificate::Country"
               }
            ]
         },
         "OverrideSettings":{
            "AttributePayload":"MERGE",
            "ThingTypeName":"REPLACE",
            "ThingGroups":"DO_NOTHING"
         }
      },
      "certificate":{
         "Type":"AWS::IoT::Certificate",
         "Properties":{
            "CertificateId":{
               "Ref":"AWS::IoT::Certificate::Id"
            },
            "Status":"ACTIVE"
         },
         "OverrideSettings":{
            "Status":"DO_NOTHING"
         }
      },
      "policy":{
         "Type":"AWS::IoT::Policy",
         "Properties":{
            "PolicyDocument":"{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\":[\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/foo/bar\"] }] }"
         }
      }
   }
}
"""  # noqa: E501  (verbatim from the AWS documentation)

# The document both AWS examples carry, rendered the way PolicySpec.policy_document promises.
EXAMPLE_POLICY_DOCUMENT = (
    '{"Statement": [{"Action": ["iot:Publish"], "Effect": "Allow", '
    '"Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"]}], "Version": "2012-10-17"}'
)

FLEET_PARAMETERS = {
    "ThingName": "lamp-0042",
    "SerialNumber": "SN42",
    "DeviceLocation": "Seattle",
    "AWS::IoT::Certificate::Id": "c0ffee",
}


# ---------------------------------------------------------------------------
# Helpers


def plan_for(template: dict[str, Any], parameters: Optional[dict[str, Any]] = None) -> ProvisioningPlan:
    return evaluate(parse_template(template), parameters or {})


def thing_template(properties: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {"Resources": {"thing": {"Type": THING, "Properties": properties}}, **sections}


def resolve(expression: Any, parameters: Optional[dict[str, Any]] = None, **sections: Any) -> str:
    """Evaluate an expression that yields a scalar, as a DeviceConfiguration value."""
    plan = plan_for({"DeviceConfiguration": {"value": expression}, **sections}, parameters)
    return plan.device_configuration["value"]


def resolve_list(expression: Any, parameters: Optional[dict[str, Any]] = None, **sections: Any) -> tuple[str, ...]:
    """Evaluate an expression that yields a list of strings, as a thing's ThingGroups."""
    plan = plan_for(thing_template({"ThingName": "t", "ThingGroups": expression}, **sections), parameters)
    assert plan.thing is not None
    return plan.thing.thing_groups


def error_of(template: Any, parameters: Optional[dict[str, Any]] = None) -> str:
    """The message of the TemplateError that parsing or evaluating raises."""
    with pytest.raises(TemplateError) as caught:
        evaluate(parse_template(template), parameters or {})
    return str(caught.value)


def parse_error_of(template: Any) -> str:
    with pytest.raises(TemplateError) as caught:
        parse_template(template)
    return str(caught.value)


def policy_template(properties: dict[str, Any], **resource_fields: Any) -> dict[str, Any]:
    return {"Resources": {"policy": {"Type": POLICY, "Properties": properties, **resource_fields}}}


def certificate_template(properties: dict[str, Any], **resource_fields: Any) -> dict[str, Any]:
    return {"Resources": {"certificate": {"Type": CERTIFICATE, "Properties": properties, **resource_fields}}}


# ---------------------------------------------------------------------------
# The AWS documentation's examples


def test_aws_fleet_provisioning_example_evaluates_to_the_documented_resources() -> None:
    plan = evaluate(parse_template(AWS_FLEET_PROVISIONING_EXAMPLE), FLEET_PARAMETERS)

    assert plan == ProvisioningPlan(
        thing=ThingSpec(
            logical_name="thing",
            thing_name="lamp-0042",
            attributes={"version": "v1", "serialNumber": "serialNumber"},
            thing_type_name="ThingPrefix_SN42",
            thing_groups=("v1-lightbulbs", "WA"),
            billing_group="LightBulbBillingGroup",
            overrides={"AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "DO_NOTHING"},
        ),
        certificate=CertificateSpec(
            logical_name="certificate", certificate_id="c0ffee", status="ACTIVE", status_override=None
        ),
        policies=(PolicySpec(logical_name="policy", policy_name=None, policy_document=EXAMPLE_POLICY_DOCUMENT),),
        device_configuration={
            "FallbackUrl": "https://www.example.com/test-site",
            "LocationUrl": "https://example.aws",
        },
        parameters=FLEET_PARAMETERS,
    )


def test_aws_fleet_provisioning_example_declares_its_three_parameters_as_required() -> None:
    template = parse_template(AWS_FLEET_PROVISIONING_EXAMPLE)

    assert template.parameter_names == frozenset({"ThingName", "SerialNumber", "DeviceLocation"})
    assert template.required_parameters() == frozenset({"ThingName", "SerialNumber", "DeviceLocation"})


def test_aws_fleet_provisioning_example_with_an_unmapped_location_names_the_missing_path() -> None:
    message = error_of(AWS_FLEET_PROVISIONING_EXAMPLE, {**FLEET_PARAMETERS, "DeviceLocation": "Portland"})

    assert message == "DeviceConfiguration.LocationUrl.Fn::FindInMap: Mappings.LocationTable.Portland does not exist"


def test_aws_jitp_example_with_escaped_policy_and_status_override() -> None:
    plan = evaluate(
        parse_template(AWS_JITP_EXAMPLE),
        {
            "AWS::IoT::Certificate::CommonName": "sensor-7",
            "AWS::IoT::Certificate::SerialNumber": "0A1B",
            "AWS::IoT::Certificate::Country": "NZ",
            "AWS::IoT::Certificate::Id": "beef",
        },
    )

    assert plan.thing is not None
    assert plan.thing.thing_name == "sensor-7"
    assert plan.thing.attributes == {"version": "v1", "serialNumber": "0A1B"}
    assert plan.thing.thing_groups == ("v1-lightbulbs", "NZ")
    assert plan.certificate == CertificateSpec(
        logical_name="certificate", certificate_id="beef", status="ACTIVE", status_override="DO_NOTHING"
    )
    assert plan.policies == (
        PolicySpec(logical_name="policy", policy_name=None, policy_document=EXAMPLE_POLICY_DOCUMENT),
    )
    assert plan.device_configuration == {}


# ---------------------------------------------------------------------------
# Parameters


def test_missing_required_parameter_is_named() -> None:
    parameters = {key: value for key, value in FLEET_PARAMETERS.items() if key != "SerialNumber"}

    assert error_of(AWS_FLEET_PROVISIONING_EXAMPLE, parameters) == "Missing required parameter: SerialNumber"


def test_several_missing_parameters_are_all_named_in_order() -> None:
    message = error_of(AWS_FLEET_PROVISIONING_EXAMPLE, {"AWS::IoT::Certificate::Id": "c"})

    assert message == "Missing required parameters: DeviceLocation, SerialNumber, ThingName"


def test_default_applies_when_the_parameter_is_not_supplied() -> None:
    parameters = {"Location": {"Type": "String", "Default": "WA"}}

    assert resolve({"Ref": "Location"}, Parameters=parameters) == "WA"
    assert resolve({"Ref": "Location"}, {"Location": "OR"}, Parameters=parameters) == "OR"


def test_empty_default_still_counts_as_a_default() -> None:
    parameters = {"Suffix": {"Type": "String", "Default": ""}}

    assert parse_template({"Parameters": parameters}).required_parameters() == frozenset()
    assert resolve({"Fn::Join": ["", ["a", {"Ref": "Suffix"}]]}, Parameters=parameters) == "a"


def test_plan_parameters_are_the_defaults_overlaid_with_everything_supplied() -> None:
    template = {"Parameters": {"A": {"Type": "String", "Default": "a"}, "B": {"Type": "String", "Default": "b"}}}

    plan = plan_for(template, {"B": "device-b", "HookOnly": "x"})

    assert plan.parameters == {"A": "a", "B": "device-b", "HookOnly": "x"}


def test_undeclared_supplied_parameters_are_ignored_but_can_be_referenced() -> None:
    assert resolve({"Ref": "AWS::IoT::Certificate::Id"}, {"AWS::IoT::Certificate::Id": "abc", "Extra": "1"}) == ("abc")


def test_supplied_numbers_and_booleans_are_coerced_to_strings() -> None:
    plan = plan_for({}, {"count": 3, "flag": True, "ratio": 0.5})

    assert plan.parameters == {"count": "3", "flag": "true", "ratio": "0.5"}


def test_supplied_nested_parameter_value_is_rejected() -> None:
    assert error_of({}, {"tags": ["a"]}) == "Parameter 'tags': expected a string, number or boolean, got list"


def test_number_parameter_accepts_numeric_text_and_rejects_other_text() -> None:
    parameters = {"Count": {"Type": "Number"}}

    assert resolve({"Ref": "Count"}, {"Count": "-1.5e3"}, Parameters=parameters) == "-1.5e3"
    assert error_of({"Parameters": parameters}, {"Count": "ten"}) == "Parameter 'Count': expected a number, got 'ten'"


def test_number_parameter_default_must_be_numeric() -> None:
    message = parse_error_of({"Parameters": {"Count": {"Type": "Number", "Default": "many"}}})

    assert message == "Parameters.Count.Default: expected a number, got 'many'"


def test_number_default_given_as_a_json_number_becomes_text() -> None:
    assert resolve({"Ref": "Port"}, Parameters={"Port": {"Type": "Number", "Default": 8883}}) == "8883"


@pytest.mark.parametrize("parameter_type", ["CommaDelimitedList", "string", "List<Number>"])
def test_parameter_types_other_than_string_and_number_are_rejected(parameter_type: str) -> None:
    message = parse_error_of({"Parameters": {"P": {"Type": parameter_type}}})

    assert message == f"Parameters.P.Type: must be one of String, Number, got {parameter_type!r}"


def test_parameter_without_type_is_rejected() -> None:
    assert parse_error_of({"Parameters": {"P": {"Default": "x"}}}) == "Parameters.P: Type is required"


def test_parameter_declaration_must_be_an_object() -> None:
    assert parse_error_of({"Parameters": {"P": "String"}}) == "Parameters.P: expected an object, got string"


# ---------------------------------------------------------------------------
# Ref and AWS::NoValue


def test_ref_of_an_unknown_name_is_named() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Ref": "Nope"}}}) == (
        "DeviceConfiguration.v.Ref: Ref to unknown parameter 'Nope'"
    )


def test_ref_of_a_resource_says_only_parameters_resolve() -> None:
    template = thing_template({"ThingName": "t"}, DeviceConfiguration={"v": {"Ref": "thing"}})

    assert error_of(template) == (
        "DeviceConfiguration.v.Ref: Ref to resource 'thing' is not supported; Ref resolves parameters"
    )


def test_ref_argument_must_be_a_literal_name() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Ref": ["a"]}}}) == (
        "DeviceConfiguration.v.Ref: expected a string, got list"
    )


def test_no_value_removes_a_property() -> None:
    plan = plan_for(thing_template({"ThingName": "t", "ThingTypeName": {"Ref": "AWS::NoValue"}}))

    assert plan.thing is not None
    assert plan.thing.thing_type_name is None


def test_no_value_removes_list_elements_and_object_entries() -> None:
    template = thing_template(
        {
            "ThingName": "t",
            "ThingGroups": ["a", {"Ref": "AWS::NoValue"}, "b"],
            "AttributePayload": {"kept": "1", "dropped": {"Ref": "AWS::NoValue"}},
        },
        DeviceConfiguration={"kept": "yes", "dropped": {"Ref": "AWS::NoValue"}},
    )

    plan = plan_for(template)

    assert plan.thing is not None
    assert plan.thing.thing_groups == ("a", "b")
    assert plan.thing.attributes == {"kept": "1"}
    assert plan.device_configuration == {"kept": "yes"}


def test_no_value_where_a_function_argument_is_required_is_a_type_error() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Join": [",", {"Ref": "AWS::NoValue"}]}}}) == (
        "DeviceConfiguration.v.Fn::Join[1]: expected a list, got AWS::NoValue"
    )


def test_no_value_removing_thing_name_leaves_the_thing_without_a_name() -> None:
    assert error_of(thing_template({"ThingName": {"Ref": "AWS::NoValue"}})) == (
        "Resources.thing.Properties: ThingName is required"
    )


# ---------------------------------------------------------------------------
# Fn::Join


def test_join_concatenates_with_the_delimiter() -> None:
    assert resolve({"Fn::Join": ["-", ["a", {"Ref": "p"}, "c"]]}, {"p": "b"}) == "a-b-c"


def test_join_with_empty_delimiter_concatenates() -> None:
    assert resolve({"Fn::Join": ["", ["ThingPrefix_", "42"]]}) == "ThingPrefix_42"


def test_join_renders_numbers_and_booleans_as_json() -> None:
    assert resolve({"Fn::Join": [":", ["port", 8883, True, 1.5]]}) == "port:8883:true:1.5"


def test_join_accepts_a_list_produced_by_another_function() -> None:
    assert resolve({"Fn::Join": ["+", {"Fn::Split": [",", "a,b,c"]}]}) == "a+b+c"


def test_join_rejects_a_non_list() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Join": ["", "abc"]}}}) == (
        "DeviceConfiguration.v.Fn::Join[1]: expected a list, got string"
    )


def test_join_rejects_a_non_string_delimiter() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Join": [1, ["a"]]}}}) == (
        "DeviceConfiguration.v.Fn::Join[0]: expected a string, got number"
    )


def test_join_rejects_nested_elements() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Join": ["", ["a", ["b"]]]}}}) == (
        "DeviceConfiguration.v.Fn::Join[1][1]: expected a string, number or boolean, got list"
    )


@pytest.mark.parametrize("argument", [[""], ["", [], "extra"], "abc"])
def test_join_rejects_a_wrong_argument_list(argument: Any) -> None:
    message = error_of({"DeviceConfiguration": {"v": {"Fn::Join": argument}}})

    assert message.startswith("DeviceConfiguration.v.Fn::Join: expected ")


# ---------------------------------------------------------------------------
# Fn::Select


def test_select_picks_by_integer_index() -> None:
    assert resolve({"Fn::Select": [1, ["a", "b", "c"]]}) == "b"


def test_select_accepts_an_index_given_as_a_string_of_digits() -> None:
    assert resolve({"Fn::Select": [{"Ref": "i"}, ["a", "b", "c"]]}, {"i": "2"}) == "c"


def test_select_out_of_range_is_an_error() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Select": [3, ["a", "b", "c"]]}}}) == (
        "DeviceConfiguration.v.Fn::Select: index 3 is out of range for a list of 3"
    )


def test_select_of_a_null_element_is_an_error() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Select": [0, [None, "b"]]}}}) == (
        "DeviceConfiguration.v.Fn::Select: element 0 is null"
    )


@pytest.mark.parametrize(
    ("index", "shown"), [(-1, "-1"), (1.5, "1.5"), (True, "true"), ("one", "'one'"), ("-1", "'-1'")]
)
def test_select_rejects_an_index_that_is_not_a_non_negative_integer(index: Any, shown: str) -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Select": [index, ["a", "b"]]}}}) == (
        f"DeviceConfiguration.v.Fn::Select[0]: expected a non-negative integer index, got {shown}"
    )


def test_select_rejects_a_non_list() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Select": [0, "abc"]}}}) == (
        "DeviceConfiguration.v.Fn::Select[1]: expected a list, got string"
    )


def test_select_can_return_a_list() -> None:
    assert resolve_list({"Fn::Select": [1, [["x"], ["y", "z"]]]}) == ("y", "z")


# ---------------------------------------------------------------------------
# Fn::Split


def test_split_gives_a_list() -> None:
    assert resolve_list({"Fn::Split": [",", {"Ref": "groups"}]}, {"groups": "a,b,,c"}) == ("a", "b", "", "c")


def test_select_of_split_picks_one_part() -> None:
    assert resolve({"Fn::Select": ["1", {"Fn::Split": ["/", "site/line/cell"]}]}) == "line"


def test_split_rejects_an_empty_delimiter() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Select": [0, {"Fn::Split": ["", "ab"]}]}}}) == (
        "DeviceConfiguration.v.Fn::Select[1].Fn::Split[0]: the delimiter must not be empty"
    )


def test_split_rejects_a_non_string_source() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Split": [",", ["a"]]}}}) == (
        "DeviceConfiguration.v.Fn::Split[1]: expected a string, got list"
    )


# ---------------------------------------------------------------------------
# Fn::FindInMap

MAPPINGS = {
    "Regions": {
        "eu": {"Endpoint": "https://eu.example", "Groups": ["eu-devices", "all"], "Port": 8883},
        "us": {"Endpoint": "https://us.example"},
    }
}


def test_find_in_map_looks_up_two_levels() -> None:
    assert resolve({"Fn::FindInMap": ["Regions", {"Ref": "r"}, "Endpoint"]}, {"r": "us"}, Mappings=MAPPINGS) == (
        "https://us.example"
    )


def test_find_in_map_returns_list_values_and_numbers_as_text() -> None:
    assert resolve_list({"Fn::FindInMap": ["Regions", "eu", "Groups"]}, Mappings=MAPPINGS) == ("eu-devices", "all")
    assert resolve({"Fn::FindInMap": ["Regions", "eu", "Port"]}, Mappings=MAPPINGS) == "8883"


@pytest.mark.parametrize(
    ("keys", "missing"),
    [
        (["Zones", "eu", "Endpoint"], "Mappings.Zones"),
        (["Regions", "ap", "Endpoint"], "Mappings.Regions.ap"),
        (["Regions", "us", "Port"], "Mappings.Regions.us.Port"),
    ],
)
def test_find_in_map_names_the_missing_path(keys: list[str], missing: str) -> None:
    template = {"Mappings": MAPPINGS, "DeviceConfiguration": {"v": {"Fn::FindInMap": keys}}}

    assert error_of(template) == f"DeviceConfiguration.v.Fn::FindInMap: {missing} does not exist"


def test_find_in_map_needs_three_arguments() -> None:
    template = {"Mappings": MAPPINGS, "DeviceConfiguration": {"v": {"Fn::FindInMap": ["Regions", "eu"]}}}

    assert error_of(template) == "DeviceConfiguration.v.Fn::FindInMap: expected 3 arguments, got 2"


def test_functions_inside_mappings_are_rejected() -> None:
    message = parse_error_of({"Mappings": {"M": {"k": {"v": {"Ref": "ThingName"}}}}})

    assert message == "Mappings.M.k.v: intrinsic functions are not allowed in Mappings"


def test_mappings_must_have_two_levels_of_objects() -> None:
    assert parse_error_of({"Mappings": {"M": {"k": "v"}}}) == "Mappings.M.k: expected an object, got string"


# ---------------------------------------------------------------------------
# Fn::Sub


def test_sub_substitutes_parameters() -> None:
    assert resolve({"Fn::Sub": "things/${ThingName}/shadow"}, {"ThingName": "t1"}) == "things/t1/shadow"


def test_sub_substitutes_pseudo_parameter_names_with_colons() -> None:
    assert resolve({"Fn::Sub": "cert-${AWS::IoT::Certificate::Id}"}, {"AWS::IoT::Certificate::Id": "abc"}) == (
        "cert-abc"
    )


def test_sub_bang_escape_yields_a_literal_placeholder() -> None:
    assert resolve({"Fn::Sub": "${!iot:Connection.Thing.ThingName}/${p}"}, {"p": "x"}) == (
        "${iot:Connection.Thing.ThingName}/x"
    )


def test_sub_with_a_variable_map_prefers_the_map_over_parameters() -> None:
    expression = {"Fn::Sub": ["${Site}-${Line}", {"Site": "akl", "Line": {"Ref": "line"}}]}

    assert resolve(expression, {"Site": "ignored", "line": "L3"}) == "akl-L3"


def test_sub_names_an_unknown_variable() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Sub": "${Missing}"}}}) == (
        "DeviceConfiguration.v.Fn::Sub: unknown variable 'Missing'"
    )


def test_sub_rejects_a_non_string_template() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Sub": [["x"], {}]}}}) == (
        "DeviceConfiguration.v.Fn::Sub[0]: expected a string, got list"
    )


def test_sub_rejects_a_variable_map_that_is_not_an_object() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::Sub": ["${a}", ["a"]]}}}) == (
        "DeviceConfiguration.v.Fn::Sub[1]: expected an object, got list"
    )


def test_sub_leaves_text_without_placeholders_alone() -> None:
    assert resolve({"Fn::Sub": "costs $5 {not a var}"}) == "costs $5 {not a var}"


# ---------------------------------------------------------------------------
# Conditions, Fn::If and the condition functions

STAGE_PARAMETERS = {"Stage": {"Type": "String", "Default": "dev"}}
STAGE_CONDITIONS = {"IsProd": {"Fn::Equals": [{"Ref": "Stage"}, "prod"]}}


def conditional_template() -> dict[str, Any]:
    return {
        "Parameters": STAGE_PARAMETERS,
        "Conditions": {**STAGE_CONDITIONS, "IsDev": {"Fn::Not": [{"Condition": "IsProd"}]}},
        "Resources": {
            "thing": {
                "Type": THING,
                "Properties": {
                    "ThingName": "t",
                    "ThingTypeName": {"Fn::If": ["IsProd", "hardened", {"Ref": "AWS::NoValue"}]},
                },
            },
            "prodPolicy": {"Type": POLICY, "Condition": "IsProd", "Properties": {"PolicyName": "Prod"}},
            "devPolicy": {"Type": POLICY, "Condition": "IsDev", "Properties": {"PolicyName": "Dev"}},
        },
    }


def test_resource_condition_includes_the_resource_when_true() -> None:
    plan = plan_for(conditional_template(), {"Stage": "prod"})

    assert [policy.policy_name for policy in plan.policies] == ["Prod"]
    assert plan.thing is not None
    assert plan.thing.thing_type_name == "hardened"


def test_resource_condition_excludes_the_resource_when_false() -> None:
    plan = plan_for(conditional_template())

    assert [policy.policy_name for policy in plan.policies] == ["Dev"]
    assert plan.thing is not None
    assert plan.thing.thing_type_name is None


def test_excluded_resource_is_not_evaluated() -> None:
    template = conditional_template()
    template["Resources"]["prodPolicy"]["Properties"] = {"PolicyName": {"Ref": "Undefined"}}

    assert plan_for(template).policies == (
        PolicySpec(logical_name="devPolicy", policy_name="Dev", policy_document=None),
    )


def test_excluded_thing_leaves_the_plan_without_a_thing() -> None:
    template = conditional_template()
    template["Resources"]["thing"]["Condition"] = "IsProd"

    assert plan_for(template).thing is None


def test_if_chooses_the_branch_by_condition() -> None:
    expression = {"Fn::If": ["IsProd", "prod-url", "dev-url"]}

    assert resolve(expression, Parameters=STAGE_PARAMETERS, Conditions=STAGE_CONDITIONS) == "dev-url"
    assert resolve(expression, {"Stage": "prod"}, Parameters=STAGE_PARAMETERS, Conditions=STAGE_CONDITIONS) == (
        "prod-url"
    )


def test_if_evaluates_only_the_chosen_branch() -> None:
    expression = {"Fn::If": ["IsProd", {"Fn::Select": [9, []]}, "safe"]}

    assert resolve(expression, Parameters=STAGE_PARAMETERS, Conditions=STAGE_CONDITIONS) == "safe"


def test_if_names_an_unknown_condition() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::If": ["Nope", "a", "b"]}}}) == (
        "DeviceConfiguration.v.Fn::If[0]: unknown condition 'Nope'"
    )


def test_if_needs_three_arguments() -> None:
    template = {"Conditions": {"C": {"Fn::Equals": ["a", "a"]}}, "DeviceConfiguration": {"v": {"Fn::If": ["C", "a"]}}}

    assert error_of(template) == "DeviceConfiguration.v.Fn::If: expected 3 arguments, got 2"


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"Fn::Equals": ["a", "a"]}, "yes"),
        ({"Fn::Equals": ["a", "b"]}, "no"),
        ({"Fn::Equals": ["8883", 8883]}, "yes"),
        ({"Fn::Not": [{"Fn::Equals": ["a", "b"]}]}, "yes"),
        ({"Fn::Not": [{"Condition": "True"}]}, "no"),
        ({"Fn::And": [{"Condition": "True"}, {"Fn::Equals": ["x", "x"]}]}, "yes"),
        ({"Fn::And": [{"Condition": "True"}, {"Condition": "False"}]}, "no"),
        ({"Fn::Or": [{"Condition": "False"}, {"Condition": "True"}]}, "yes"),
        ({"Fn::Or": [{"Condition": "False"}, {"Fn::Equals": ["x", "y"]}]}, "no"),
        ({"Condition": "True"}, "yes"),
    ],
)
def test_condition_functions(condition: Any, expected: str) -> None:
    conditions = {
        "True": {"Fn::Equals": ["1", "1"]},
        "False": {"Fn::Equals": ["1", "2"]},
        "Tested": condition,
    }

    assert resolve({"Fn::If": ["Tested", "yes", "no"]}, Conditions=conditions) == expected


@pytest.mark.parametrize(("function", "count"), [("Fn::And", 1), ("Fn::Or", 11)])
def test_and_or_take_two_to_ten_conditions(function: str, count: int) -> None:
    template = {"Conditions": {"C": {function: [{"Fn::Equals": ["a", "a"]}] * count}}}

    assert error_of(template) == f"Conditions.C.{function}: expected 2 to 10 arguments, got {count}"


def test_and_with_ten_conditions_is_allowed() -> None:
    conditions = {"C": {"Fn::And": [{"Fn::Equals": ["a", "a"]}] * 10}}

    assert resolve({"Fn::If": ["C", "yes", "no"]}, Conditions=conditions) == "yes"


def test_not_takes_exactly_one_condition() -> None:
    template = {"Conditions": {"C": {"Fn::Not": [{"Fn::Equals": ["a", "a"]}, {"Fn::Equals": ["a", "a"]}]}}}

    assert error_of(template) == "Conditions.C.Fn::Not: expected 1 argument, got 2"


def test_condition_operands_must_be_conditions() -> None:
    assert error_of({"Conditions": {"C": {"Fn::Or": ["yes", {"Fn::Equals": ["a", "a"]}]}}}) == (
        "Conditions.C.Fn::Or[0]: expected a condition (true or false), got string"
    )


def test_a_condition_must_evaluate_to_a_boolean() -> None:
    assert error_of({"Conditions": {"C": {"Fn::Join": ["", ["a"]]}}}) == (
        "Conditions.C: expected a condition (true or false), got string"
    )


def test_equals_rejects_non_scalar_operands() -> None:
    assert error_of({"Conditions": {"C": {"Fn::Equals": [["a"], "a"]}}}) == (
        "Conditions.C.Fn::Equals[0]: expected a string, number or boolean, got list"
    )


def test_conditions_are_evaluated_even_when_unused() -> None:
    assert error_of({"Conditions": {"Unused": {"Fn::Equals": [{"Ref": "Nope"}, "a"]}}}) == (
        "Conditions.Unused.Fn::Equals[0].Ref: Ref to unknown parameter 'Nope'"
    )


def test_condition_reference_to_an_unknown_condition_is_named() -> None:
    assert error_of({"Conditions": {"C": {"Fn::Not": [{"Condition": "Ghost"}]}}}) == (
        "Conditions.C.Fn::Not[0].Condition: unknown condition 'Ghost'"
    )


def test_circular_conditions_are_reported() -> None:
    conditions = {"A": {"Fn::Not": [{"Condition": "B"}]}, "B": {"Fn::Not": [{"Condition": "A"}]}}

    assert error_of({"Conditions": conditions}) == "Conditions.A: circular reference: A -> B -> A"


def test_circular_reference_names_only_the_conditions_in_the_cycle() -> None:
    conditions = {
        "Entry": {"Fn::Not": [{"Condition": "Loop"}]},
        "Loop": {"Fn::Not": [{"Condition": "Loop"}]},
    }

    assert error_of({"Conditions": conditions}) == "Conditions.Loop: circular reference: Loop -> Loop"


def test_very_long_condition_chain_is_a_template_error() -> None:
    conditions: dict[str, Any] = {"C0": {"Fn::Equals": ["a", "a"]}}
    for index in range(1, 5000):
        conditions[f"C{index}"] = {"Fn::Not": [{"Condition": f"C{index - 1}"}]}
    template = {"Conditions": dict(reversed(conditions.items()))}

    assert error_of(template) == "The template is nested too deeply to evaluate"


@pytest.mark.parametrize("function", ["Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Condition"])
def test_condition_functions_are_only_allowed_in_conditions(function: str) -> None:
    assert error_of({"DeviceConfiguration": {"v": {function: ["a", "a"]}}}) == (
        f"DeviceConfiguration.v: {function} is only allowed in the Conditions section"
    )


def test_resource_condition_must_name_a_declared_condition() -> None:
    template = {"Resources": {"p": {"Type": POLICY, "Condition": "Ghost", "Properties": {"PolicyName": "P"}}}}

    assert parse_error_of(template) == "Resources.p.Condition: unknown condition 'Ghost'"


# ---------------------------------------------------------------------------
# Function syntax


def test_unknown_function_is_named() -> None:
    assert error_of({"DeviceConfiguration": {"v": {"Fn::GetAtt": ["thing", "Arn"]}}}) == (
        "DeviceConfiguration.v: unknown intrinsic function 'Fn::GetAtt'"
    )


def test_object_with_several_keys_is_data_not_a_function_call() -> None:
    plan = plan_for(policy_template({"PolicyDocument": {"Ref": "x", "Fn::Join": "y"}}))

    assert plan.policies[0].policy_document == '{"Fn::Join": "y", "Ref": "x"}'


def test_functions_are_evaluated_inside_policy_documents() -> None:
    document = {"Statement": [{"Resource": {"Fn::Sub": "arn:aws:iot:r:1:client/${ThingName}"}}]}

    plan = plan_for(policy_template({"PolicyDocument": document}), {"ThingName": "t9"})

    assert plan.policies[0].policy_document == '{"Statement": [{"Resource": "arn:aws:iot:r:1:client/t9"}]}'


def test_long_names_are_shortened_in_messages() -> None:
    message = error_of({"DeviceConfiguration": {"v": {"Ref": "x" * 5000}}})

    assert message == f"DeviceConfiguration.v.Ref: Ref to unknown parameter '{'x' * 37}...'"


# ---------------------------------------------------------------------------
# Thing resources


def test_thing_without_thing_name_is_rejected() -> None:
    assert error_of(thing_template({"ThingTypeName": "lamp"})) == "Resources.thing.Properties: ThingName is required"


def test_thing_name_must_resolve_to_a_string() -> None:
    assert error_of(thing_template({"ThingName": {"Fn::Split": [",", "a,b"]}})) == (
        "Resources.thing.Properties.ThingName: expected a string, got list"
    )


def test_empty_thing_name_is_rejected() -> None:
    assert error_of(thing_template({"ThingName": {"Ref": "n"}}), {"n": ""}) == (
        "Resources.thing.Properties.ThingName: must not be empty"
    )


def test_thing_groups_must_be_a_list() -> None:
    assert error_of(thing_template({"ThingName": "t", "ThingGroups": "group"})) == (
        "Resources.thing.Properties.ThingGroups: expected a list, got string"
    )


def test_thing_group_names_must_be_strings() -> None:
    assert error_of(thing_template({"ThingName": "t", "ThingGroups": ["a", 7]})) == (
        "Resources.thing.Properties.ThingGroups[1]: expected a string, got number"
    )


def test_attribute_payload_values_are_coerced_to_strings() -> None:
    plan = plan_for(thing_template({"ThingName": "t", "AttributePayload": {"n": 42, "f": 2.5, "b": False}}))

    assert plan.thing is not None
    assert plan.thing.attributes == {"n": "42", "f": "2.5", "b": "false"}


def test_nested_attribute_payload_value_is_rejected() -> None:
    assert error_of(thing_template({"ThingName": "t", "AttributePayload": {"a": {"b": "c"}}})) == (
        "Resources.thing.Properties.AttributePayload.a: expected a string, number or boolean, got object"
    )


def test_thing_optional_properties_default_to_empty() -> None:
    plan = plan_for(thing_template({"ThingName": "t"}))

    assert plan.thing == ThingSpec(
        logical_name="thing",
        thing_name="t",
        attributes={},
        thing_type_name=None,
        thing_groups=(),
        billing_group=None,
        overrides={},
    )
    assert plan.certificate is None
    assert plan.policies == ()


def test_unknown_thing_property_is_rejected() -> None:
    assert parse_error_of(thing_template({"ThingName": "t", "Thingname": "u"})) == (
        "Resources.thing.Properties: unknown property 'Thingname' for AWS::IoT::Thing"
    )


# ---------------------------------------------------------------------------
# OverrideSettings


def thing_with_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    return {"Resources": {"thing": {"Type": THING, "Properties": {"ThingName": "t"}, "OverrideSettings": overrides}}}


def test_upper_case_override_keys_are_normalised_to_property_names() -> None:
    plan = plan_for(
        thing_with_overrides({"ATTRIBUTE_PAYLOAD": "MERGE", "THING_TYPE_NAME": "FAIL", "THING_GROUPS": "MERGE"})
    )

    assert plan.thing is not None
    assert plan.thing.overrides == {"AttributePayload": "MERGE", "ThingTypeName": "FAIL", "ThingGroups": "MERGE"}


def test_bad_override_value_is_rejected() -> None:
    assert parse_error_of(thing_with_overrides({"ThingGroups": "OVERWRITE"})) == (
        "Resources.thing.OverrideSettings.ThingGroups: must be one of DO_NOTHING, REPLACE, FAIL, MERGE, got 'OVERWRITE'"
    )


def test_merge_on_thing_type_name_is_rejected() -> None:
    assert parse_error_of(thing_with_overrides({"ThingTypeName": "MERGE"})) == (
        "Resources.thing.OverrideSettings.ThingTypeName: MERGE is only valid for AttributePayload and ThingGroups"
    )


def test_merge_on_certificate_status_is_rejected() -> None:
    template = certificate_template({"CertificateId": "c"}, OverrideSettings={"Status": "MERGE"})

    assert parse_error_of(template) == (
        "Resources.certificate.OverrideSettings.Status: MERGE is only valid for AttributePayload and ThingGroups"
    )


def test_override_of_an_unsupported_property_is_rejected() -> None:
    assert parse_error_of(thing_with_overrides({"BillingGroup": "REPLACE"})) == (
        "Resources.thing.OverrideSettings: cannot override 'BillingGroup'; allowed: AttributePayload, "
        "ATTRIBUTE_PAYLOAD, ThingTypeName, THING_TYPE_NAME, ThingGroups, THING_GROUPS"
    )


def test_override_given_in_both_spellings_is_rejected() -> None:
    assert parse_error_of(thing_with_overrides({"ThingGroups": "MERGE", "THING_GROUPS": "FAIL"})) == (
        "Resources.thing.OverrideSettings: ThingGroups is given twice"
    )


def test_policy_override_settings_are_rejected() -> None:
    assert parse_error_of(policy_template({"PolicyName": "P"}, OverrideSettings={"PolicyName": "REPLACE"})) == (
        "Resources.policy.OverrideSettings: OverrideSettings are not available for policy resources"
    )


def test_unhashable_override_value_is_a_template_error() -> None:
    assert parse_error_of(thing_with_overrides({"ThingGroups": ["MERGE"]})) == (
        "Resources.thing.OverrideSettings.ThingGroups: must be one of DO_NOTHING, REPLACE, FAIL, MERGE, got list"
    )


# ---------------------------------------------------------------------------
# Certificate resources


@pytest.mark.parametrize(("given", "status"), [("Active", "ACTIVE"), ("inactive", "INACTIVE"), ("ACTIVE", "ACTIVE")])
def test_certificate_status_is_case_insensitive(given: str, status: str) -> None:
    plan = plan_for(certificate_template({"CertificateId": "c", "Status": given}))

    assert plan.certificate == CertificateSpec(
        logical_name="certificate", certificate_id="c", status=status, status_override=None
    )


def test_certificate_status_defaults_to_active() -> None:
    plan = plan_for(certificate_template({"CertificateId": "c"}))

    assert plan.certificate is not None
    assert plan.certificate.status == "ACTIVE"


def test_unknown_certificate_status_is_rejected() -> None:
    assert error_of(certificate_template({"CertificateId": "c", "Status": "REVOKED"})) == (
        "Resources.certificate.Properties.Status: must be ACTIVE or INACTIVE, got 'REVOKED'"
    )


@pytest.mark.parametrize("property_name", ["CertificateSigningRequest", "CertificatePem", "CACertificatePem"])
def test_certificate_must_use_certificate_id(property_name: str) -> None:
    template = certificate_template({property_name: {"Ref": "CSR"}, "Status": "ACTIVE"})

    assert parse_error_of(template) == (
        f"Resources.certificate.Properties: {property_name} is not supported: "
        "fleet provisioning templates must use CertificateId"
    )


def test_certificate_without_certificate_id_is_rejected() -> None:
    assert error_of(certificate_template({"Status": "ACTIVE"})) == (
        "Resources.certificate.Properties: CertificateId is required"
    )


# ---------------------------------------------------------------------------
# Policy resources


def test_policy_by_name() -> None:
    assert plan_for(policy_template({"PolicyName": "Existing"})).policies == (
        PolicySpec(logical_name="policy", policy_name="Existing", policy_document=None),
    )


def test_escaped_string_and_object_policy_documents_give_the_same_canonical_string() -> None:
    document = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"}]}
    escaped = json.dumps(document, indent=3)

    from_object = plan_for(policy_template({"PolicyDocument": document})).policies[0]
    from_string = plan_for(policy_template({"PolicyDocument": escaped})).policies[0]

    assert from_object.policy_document == from_string.policy_document == json.dumps(document, sort_keys=True)


def test_both_policy_name_and_document_are_rejected() -> None:
    assert error_of(policy_template({"PolicyName": "P", "PolicyDocument": {"Version": "2012-10-17"}})) == (
        "Resources.policy.Properties: give PolicyName or PolicyDocument, not both"
    )


def test_neither_policy_name_nor_document_is_rejected() -> None:
    assert error_of(policy_template({})) == "Resources.policy.Properties: PolicyName or PolicyDocument is required"


def test_policy_document_string_must_be_json() -> None:
    message = error_of(policy_template({"PolicyDocument": "{not json"}))

    assert message.startswith("Resources.policy.Properties.PolicyDocument: not valid JSON (")


def test_policy_document_string_must_hold_an_object() -> None:
    assert error_of(policy_template({"PolicyDocument": "[1, 2]"})) == (
        "Resources.policy.Properties.PolicyDocument: expected an object, got list"
    )


def test_several_policies_keep_their_declaration_order() -> None:
    template = {
        "Resources": {
            "second": {"Type": POLICY, "Properties": {"PolicyName": "B"}},
            "first": {"Type": POLICY, "Properties": {"PolicyName": "A"}},
        }
    }

    assert [policy.logical_name for policy in plan_for(template).policies] == ["second", "first"]


# ---------------------------------------------------------------------------
# DeviceConfiguration


def test_device_configuration_values_are_coerced_to_strings() -> None:
    plan = plan_for({"DeviceConfiguration": {"s": "x", "n": 5, "t": True, "f": 0.25}})

    assert plan.device_configuration == {"s": "x", "n": "5", "t": "true", "f": "0.25"}


@pytest.mark.parametrize("nested", [{"a": "b"}, ["a"]])
def test_nested_device_configuration_is_rejected(nested: Any) -> None:
    assert error_of({"DeviceConfiguration": {"Foo": nested}}) == (
        "DeviceConfiguration.Foo: DeviceConfiguration does not support nested objects or lists"
    )


def test_device_configuration_null_is_rejected() -> None:
    assert error_of({"DeviceConfiguration": {"Foo": None}}) == (
        "DeviceConfiguration.Foo: expected a string, number or boolean, got null"
    )


def test_device_configuration_may_be_chosen_by_a_condition() -> None:
    template = {
        "Conditions": {"Yes": {"Fn::Equals": ["a", "a"]}},
        "DeviceConfiguration": {"Fn::If": ["Yes", {"Mode": "on"}, {"Mode": "off"}]},
    }

    assert plan_for(template).device_configuration == {"Mode": "on"}


# ---------------------------------------------------------------------------
# Structure checks in parse_template


def test_unknown_top_level_key_is_named() -> None:
    assert parse_error_of({"Resources": {}, "Outputs": {}}) == (
        "Unknown top-level key 'Outputs': a template may only contain "
        "Parameters, Mappings, Conditions, Resources, DeviceConfiguration"
    )


def test_bad_resource_type_is_named() -> None:
    assert parse_error_of({"Resources": {"r": {"Type": "AWS::S3::Bucket", "Properties": {}}}}) == (
        "Resources.r.Type: must be one of AWS::IoT::Thing, AWS::IoT::Certificate, AWS::IoT::Policy, "
        "got 'AWS::S3::Bucket'"
    )


def test_resource_without_type_is_rejected() -> None:
    assert parse_error_of({"Resources": {"r": {"Properties": {}}}}) == "Resources.r: Type is required"


def test_resource_without_properties_is_rejected() -> None:
    assert parse_error_of({"Resources": {"r": {"Type": POLICY}}}) == "Resources.r: Properties is required"


def test_resource_properties_must_be_an_object() -> None:
    assert parse_error_of({"Resources": {"r": {"Type": POLICY, "Properties": []}}}) == (
        "Resources.r.Properties: expected an object, got list"
    )


def test_unknown_resource_key_is_rejected() -> None:
    template = {"Resources": {"r": {"Type": POLICY, "Properties": {}, "DependsOn": "x"}}}

    assert parse_error_of(template) == (
        "Resources.r: unknown key 'DependsOn'; allowed: Condition, OverrideSettings, Properties, Type"
    )


def test_at_most_one_thing_is_allowed() -> None:
    template = {
        "Resources": {
            "a": {"Type": THING, "Properties": {"ThingName": "a"}},
            "b": {"Type": THING, "Properties": {"ThingName": "b"}},
        }
    }

    assert parse_error_of(template) == "Resources: at most one AWS::IoT::Thing is allowed, got a, b"


def test_at_most_one_certificate_is_allowed() -> None:
    template = {
        "Resources": {
            "a": {"Type": CERTIFICATE, "Properties": {"CertificateId": "a"}},
            "b": {"Type": CERTIFICATE, "Properties": {"CertificateId": "b"}},
        }
    }

    assert parse_error_of(template) == "Resources: at most one AWS::IoT::Certificate is allowed, got a, b"


def test_section_must_be_an_object() -> None:
    assert parse_error_of({"Resources": []}) == "Resources: expected an object, got list"


def test_template_must_be_an_object() -> None:
    assert parse_error_of("[]") == "A template must be a JSON object, got list"


def test_template_text_must_be_json() -> None:
    assert parse_error_of('{"Resources": ').startswith("template: not valid JSON (Expecting value: line 1")


def test_nan_is_not_json() -> None:
    assert parse_error_of('{"DeviceConfiguration": {"x": NaN}}') == (
        "template: not valid JSON (NaN is not a JSON number)"
    )


def test_non_json_values_in_a_mapping_are_rejected() -> None:
    assert parse_error_of({"DeviceConfiguration": {"x": {1, 2}}}) == (
        "DeviceConfiguration.x: a set is not a JSON value"
    )


def test_deeply_nested_template_is_a_template_error() -> None:
    assert parse_error_of("[" * 100_000 + "]" * 100_000) == "The template is nested too deeply"


def test_parsed_template_does_not_share_the_callers_data() -> None:
    source = thing_template({"ThingName": "original"})
    template = parse_template(source)
    source["Resources"]["thing"]["Properties"]["ThingName"] = "changed"

    plan = evaluate(template, {})

    assert plan.thing is not None
    assert plan.thing.thing_name == "original"


def test_json_text_and_mapping_parse_to_the_same_template() -> None:
    assert parse_template(AWS_FLEET_PROVISIONING_EXAMPLE) == parse_template(json.loads(AWS_FLEET_PROVISIONING_EXAMPLE))


def test_empty_template_gives_an_empty_plan() -> None:
    assert plan_for({}) == ProvisioningPlan(
        thing=None, certificate=None, policies=(), device_configuration={}, parameters={}
    )


def test_template_is_a_frozen_dataclass() -> None:
    template = parse_template({})

    assert isinstance(template, Template)
    with pytest.raises(AttributeError):
        template.resources = ()  # type: ignore[misc]


# ---------------------------------------------------------------------------
# TemplateError


def test_template_error_defaults_to_invalid_parameters_400() -> None:
    with pytest.raises(TemplateError) as caught:
        evaluate(parse_template(AWS_FLEET_PROVISIONING_EXAMPLE), {})

    assert isinstance(caught.value, EmulatorError)
    assert (caught.value.error_code, caught.value.status_code) == ("InvalidParameters", 400)


def test_template_error_carries_a_chosen_code() -> None:
    error = TemplateError("nope", error_code="ResourceConflictsException", status_code=409)

    assert (str(error), error.error_code, error.status_code) == ("nope", "ResourceConflictsException", 409)


# ---------------------------------------------------------------------------
# Property tests: evaluate() returns a plan or raises TemplateError, nothing else

NAMES = st.sampled_from(
    ["a", "b", "ThingName", "AWS::NoValue", "C", "D", "M", "k", "v", "0", "1", "x,y", "${a}", "${!a}"]
)
FUNCTION_KEYS = st.sampled_from(
    [
        "Ref",
        "Condition",
        "Fn::Join",
        "Fn::Select",
        "Fn::Split",
        "Fn::FindInMap",
        "Fn::Sub",
        "Fn::If",
        "Fn::Equals",
        "Fn::Not",
        "Fn::And",
        "Fn::Or",
        "Fn::Bogus",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=5),
    st.floats(allow_nan=True, allow_infinity=True),
    NAMES,
    st.text(max_size=6),
)
EXPRESSIONS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(NAMES, children, max_size=3),
        st.builds(lambda key, argument: {key: argument}, FUNCTION_KEYS, children),
        st.builds(lambda key, arguments: {key: arguments}, FUNCTION_KEYS, st.lists(children, min_size=1, max_size=4)),
    ),
    max_leaves=12,
)


# Mostly well-formed expressions, so that examples get past the first check and exercise evaluation.
def string_expressions(condition_names: list[str]) -> st.SearchStrategy[Any]:
    """Expressions meant to yield strings; Fn::If only where conditions may be named (not inside Conditions)."""

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        branches = [
            st.builds(lambda parts: {"Fn::Join": ["-", parts]}, st.lists(children, max_size=3)),
            st.builds(lambda text: {"Fn::Sub": text}, st.sampled_from(["${a}", "x-${b}", "${!a}", "plain"])),
            st.builds(
                lambda index, text: {"Fn::Select": [index, {"Fn::Split": [",", text]}]}, st.integers(0, 2), children
            ),
            st.just({"Fn::FindInMap": ["M", "k", "v"]}),
        ]
        if condition_names:
            branches.append(
                st.builds(
                    lambda name, yes, no: {"Fn::If": [name, yes, no]},
                    st.sampled_from(condition_names),
                    children,
                    children,
                )
            )
        return st.one_of(branches)

    return st.recursive(st.one_of(NAMES, st.builds(lambda name: {"Ref": name}, NAMES)), extend, max_leaves=6)


STRING_EXPRESSIONS = string_expressions(["C", "D", "E"])


def condition_expressions(referable: list[str]) -> st.SearchStrategy[Any]:
    """Condition expressions; {"Condition": name} only names `referable`, so that the nesting is acyclic."""
    references = [st.builds(lambda name: {"Condition": name}, st.sampled_from(referable))] if referable else []
    return st.recursive(
        st.builds(lambda left, right: {"Fn::Equals": [left, right]}, string_expressions([]), string_expressions([])),
        lambda children: st.one_of(
            st.builds(lambda operand: {"Fn::Not": [operand]}, children),
            st.builds(lambda operands: {"Fn::And": operands}, st.lists(children, min_size=2, max_size=3)),
            st.builds(lambda operands: {"Fn::Or": operands}, st.lists(children, min_size=2, max_size=3)),
            *references,
        ),
        max_leaves=4,
    )


# Unrestricted references: these also produce cycles and wrong operand counts.
CONDITION_EXPRESSIONS = st.one_of(
    condition_expressions(["C", "D", "E"]),
    st.builds(lambda operand: {"Fn::And": [operand]}, condition_expressions([])),
)
VALUES = st.one_of(STRING_EXPRESSIONS, EXPRESSIONS)
PARAMETER_DECLARATIONS = st.one_of(
    st.just({"Type": "String"}),
    st.builds(lambda default: {"Type": "String", "Default": default}, NAMES),
    st.just({"Type": "Number", "Default": "1"}),
    EXPRESSIONS,
)
OVERRIDE_ACTIONS = st.sampled_from(["DO_NOTHING", "REPLACE", "FAIL", "MERGE", "merge"])


def resources_of(
    resource_type: str, properties: dict[str, st.SearchStrategy[Any]], override_keys: list[str]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"Type": st.just(resource_type), "Properties": st.fixed_dictionaries({}, optional=properties)},
        optional={
            "Condition": st.sampled_from(["C", "D", "E"]),
            "OverrideSettings": st.dictionaries(
                st.sampled_from([*override_keys, "Bogus"]), OVERRIDE_ACTIONS, max_size=2
            ),
        },
    )


THING_RESOURCES = resources_of(
    THING,
    {
        "ThingName": VALUES,
        "AttributePayload": st.one_of(st.dictionaries(NAMES, VALUES, max_size=3), EXPRESSIONS),
        "ThingTypeName": VALUES,
        "ThingGroups": st.one_of(st.lists(VALUES, max_size=3), EXPRESSIONS),
        "BillingGroup": VALUES,
    },
    ["AttributePayload", "THING_GROUPS", "ThingTypeName"],
)
CERTIFICATE_RESOURCES = resources_of(
    CERTIFICATE,
    {"CertificateId": VALUES, "Status": st.one_of(st.sampled_from(["Active", "INACTIVE"]), VALUES)},
    ["Status"],
)
POLICY_RESOURCES = resources_of(
    POLICY,
    {
        "PolicyName": VALUES,
        "PolicyDocument": st.one_of(
            st.just('{"Version": "2012-10-17"}'), st.dictionaries(NAMES, VALUES, max_size=3), EXPRESSIONS
        ),
    },
    [],
)
NOISY_TEMPLATES = st.fixed_dictionaries(
    {},
    optional={
        "Parameters": st.dictionaries(NAMES, PARAMETER_DECLARATIONS, max_size=3),
        "Mappings": st.one_of(st.just({"M": {"k": {"v": "found", "a": ["x", "y"]}}}), EXPRESSIONS),
        "Conditions": st.dictionaries(st.sampled_from(["C", "D", "E"]), st.one_of(CONDITION_EXPRESSIONS, EXPRESSIONS)),
        "Resources": st.fixed_dictionaries(
            {}, optional={"thing": THING_RESOURCES, "certificate": CERTIFICATE_RESOURCES, "policy": POLICY_RESOURCES}
        ),
        "DeviceConfiguration": st.one_of(st.dictionaries(NAMES, VALUES, max_size=3), EXPRESSIONS),
    },
)
# Valid structure throughout; only the expressions vary, so evaluation itself gets exercised.
WELL_FORMED_TEMPLATES = st.fixed_dictionaries(
    {
        "Parameters": st.just({"a": {"Type": "String", "Default": "x,y"}, "b": {"Type": "Number", "Default": "1"}}),
        "Mappings": st.just({"M": {"k": {"v": "found", "a": ["x", "y"]}}}),
        "Conditions": st.fixed_dictionaries(
            {
                "C": condition_expressions([]),
                "D": condition_expressions(["C"]),
                "E": condition_expressions(["C", "D"]),
            }
        ),
        "Resources": st.fixed_dictionaries(
            {
                "thing": st.fixed_dictionaries(
                    {
                        "Type": st.just(THING),
                        "Properties": st.fixed_dictionaries(
                            {"ThingName": STRING_EXPRESSIONS},
                            optional={
                                "AttributePayload": st.dictionaries(NAMES, STRING_EXPRESSIONS, max_size=3),
                                "ThingGroups": st.lists(STRING_EXPRESSIONS, max_size=3),
                                "ThingTypeName": STRING_EXPRESSIONS,
                            },
                        ),
                    },
                    optional={"OverrideSettings": st.just({"ThingGroups": "MERGE"})},
                ),
                "certificate": st.just({"Type": CERTIFICATE, "Properties": {"CertificateId": {"Ref": "a"}}}),
                "policy": st.fixed_dictionaries(
                    {
                        "Type": st.just(POLICY),
                        "Properties": st.one_of(
                            st.fixed_dictionaries({"PolicyName": STRING_EXPRESSIONS}),
                            st.fixed_dictionaries(
                                {"PolicyDocument": st.dictionaries(NAMES, STRING_EXPRESSIONS, max_size=3)}
                            ),
                        ),
                    },
                    optional={"Condition": st.sampled_from(["C", "D", "E"])},
                ),
            }
        ),
        "DeviceConfiguration": st.dictionaries(NAMES, STRING_EXPRESSIONS, max_size=3),
    }
)
TEMPLATES = st.one_of(NOISY_TEMPLATES, WELL_FORMED_TEMPLATES)
PARAMETERS = st.dictionaries(NAMES, st.one_of(NAMES, st.text(max_size=6), st.integers()), max_size=4)
ANY_PARAMETERS = st.dictionaries(NAMES, st.one_of(NAMES, EXPRESSIONS), max_size=4)


def assert_well_formed(plan: ProvisioningPlan) -> None:
    assert all(isinstance(value, str) for value in plan.device_configuration.values())
    assert all(isinstance(value, str) for value in plan.parameters.values())
    if plan.thing is not None:
        assert plan.thing.thing_name
        assert all(isinstance(value, str) for value in plan.thing.attributes.values())
        assert all(isinstance(group, str) for group in plan.thing.thing_groups)
    if plan.certificate is not None:
        assert plan.certificate.status in ("ACTIVE", "INACTIVE")
    for policy in plan.policies:
        assert (policy.policy_name is None) != (policy.policy_document is None)


@settings(max_examples=400, deadline=None)
@given(TEMPLATES, PARAMETERS)
def test_evaluate_returns_a_plan_or_raises_template_error(template: dict[str, Any], parameters: Any) -> None:
    try:
        plan = evaluate(parse_template(template), parameters)
    except TemplateError as error:
        assert str(error)
    else:
        assert_well_formed(plan)


@settings(max_examples=200, deadline=None)
@given(st.one_of(EXPRESSIONS, st.dictionaries(st.text(max_size=12), EXPRESSIONS, max_size=4)), ANY_PARAMETERS)
def test_any_json_value_either_parses_and_evaluates_or_raises_template_error(document: Any, parameters: Any) -> None:
    try:
        plan = evaluate(parse_template(document if isinstance(document, dict) else json.dumps(document)), parameters)
    except TemplateError as error:
        assert str(error)
    else:
        assert_well_formed(plan)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_either_parses_or_raises_template_error(text: str) -> None:
    try:
        template = parse_template(text)
    except TemplateError as error:
        assert str(error)
    else:
        assert isinstance(template, Template)
