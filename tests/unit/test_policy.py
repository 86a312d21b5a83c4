"""Tests for the emulator's AWS IoT policy evaluator."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprov.emulator.policy import (
    AttachedThing,
    Policy,
    PolicyContext,
    PolicyError,
    Request,
    Statement,
    claim_policy_document,
    is_allowed,
)
from fleetprov.errors import EmulatorError

CTX = PolicyContext(client_id="dev-1", certificate_id="abc123")
ARN = "arn:aws:iot:us-east-1:123456789012"


def policy(*statements: dict[str, Any], name: str = "p") -> Policy:
    return Policy.parse(name, {"Version": "2012-10-17", "Statement": list(statements)})


def allow(action: Any, resource: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource}


def deny(action: Any, resource: Any) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": resource}


def check(policies: list[Policy], action: str, resource: str, context: PolicyContext = CTX) -> bool:
    return is_allowed(policies, Request(action, resource), context)


# --- effects -------------------------------------------------------------------


def test_no_policy_denies() -> None:
    assert not check([], "iot:Connect", "dev-1")


def test_statements_that_do_not_match_deny() -> None:
    p = policy(allow("iot:Subscribe", "*"), allow("iot:Publish", f"{ARN}:topic/other"))
    assert not check([p], "iot:Publish", "mine")


def test_matching_allow_grants() -> None:
    assert check([policy(allow("iot:Publish", f"{ARN}:topic/mine"))], "iot:Publish", "mine")


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_beats_allow_in_any_order_and_policy(deny_first: bool) -> None:
    allowing = policy(allow("iot:*", "*"), name="allow")
    denying = policy(deny("iot:Publish", f"{ARN}:topic/secret"), name="deny")
    policies = [denying, allowing] if deny_first else [allowing, denying]
    assert not check(policies, "iot:Publish", "secret")
    # The Deny applies only where it matches.
    assert check(policies, "iot:Publish", "public")
    assert check(policies, "iot:Subscribe", "secret")


# --- action and resource matching ------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "action", "expected"),
    [
        ("iot:*", "iot:Publish", True),
        ("*", "iot:Connect", True),
        ("iot:Pub*", "iot:Publish", True),
        ("iot:Pub*", "iot:Subscribe", False),
        ("iot:?ublish", "iot:Publish", True),
        ("IOT:PUBLISH", "iot:Publish", True),
        ("iot:publish", "iot:Publish", True),
        ("iot:Publish", "iot:publish", True),
        ("iot:Publish", "iot:Receive", False),
        (["iot:Receive", "iot:Subscribe"], "iot:Subscribe", True),
        (["iot:Receive", "iot:Subscribe"], "iot:Publish", False),
    ],
)
def test_action_matching(pattern: Any, action: str, expected: bool) -> None:
    assert check([policy(allow(pattern, "*"))], action, "t") is expected


@pytest.mark.parametrize(
    ("resource", "topic", "expected"),
    [
        (f"{ARN}:topic/a/*", "a/b/c", True),  # * crosses "/"
        (f"{ARN}:topic/a/*", "b/a/c", False),
        (f"{ARN}:topic/a/*/c", "a/x/y/c", True),
        (f"{ARN}:topic/a/?", "a/b", True),
        (f"{ARN}:topic/a/?", "a/bc", False),
        (f"{ARN}:topic/a/?", "a/", False),
        (f"{ARN}:topic/a/b", "a/b/c", False),  # whole-string match, not prefix
        (f"{ARN}:topic/a/b", "A/B", False),  # topics are case-sensitive
        (f"{ARN}:topic/s/+/t", "s/x/t", False),  # + and # are literal in policies
        (f"{ARN}:topic/s/+/t", "s/+/t", True),
        (f"{ARN}:topic/s/#", "s/x", False),
        (f"{ARN}:topic/s/#", "s/#", True),
        ("arn:aws:iot:*:*:topic/x", "x", True),
        ("arn:aws:iot:us-east-1:123456789012:topic/x", "x", True),
        ("arn:aws:iot:eu-west-1:123456789012:topic/x", "x", False),
        ("arn:aws:iot:us-east-1:999999999999:topic/x", "x", False),
        ("arn:aws:iot:aws-region:aws-account-id:topic/x", "x", False),  # doc placeholders are literal
        ([f"{ARN}:topic/one", f"{ARN}:topic/two"], "two", True),
        ("*", "anything/at/all", True),
    ],
)
def test_resource_matching(resource: Any, topic: str, expected: bool) -> None:
    assert check([policy(allow("iot:Publish", resource))], "iot:Publish", topic) is expected


@pytest.mark.parametrize(
    ("action", "resource_type", "expected"),
    [
        ("iot:Publish", "topic", True),
        ("iot:Receive", "topic", True),
        ("iot:Subscribe", "topic", False),
        ("iot:Subscribe", "topicfilter", True),
        ("iot:Publish", "topicfilter", False),
        ("iot:Receive", "topicfilter", False),
        ("iot:Connect", "client", True),
        ("iot:Connect", "topic", False),
    ],
)
def test_each_action_checks_its_own_arn_type(action: str, resource_type: str, expected: bool) -> None:
    p = policy(allow("iot:*", f"arn:aws:iot:*:*:{resource_type}/x"))
    assert check([p], action, "x") is expected


def test_subscribe_filter_wildcards_are_matched_literally() -> None:
    p = policy(allow("iot:Subscribe", f"{ARN}:topicfilter/s/+/t"))
    assert check([p], "iot:Subscribe", "s/+/t")
    assert not check([p], "iot:Subscribe", "s/#")
    assert not check([p], "iot:Subscribe", "s/x/t")


def test_request_rejects_unknown_action() -> None:
    with pytest.raises(ValueError, match="iot:Pubish"):
        Request("iot:Pubish", "t")


# --- policy variables ------------------------------------------------------------


def test_client_id_variable() -> None:
    p = policy(
        allow("iot:Connect", f"{ARN}:client/${{iot:ClientId}}"),
        allow("iot:Publish", f"{ARN}:topic/devices/${{iot:ClientId}}/*"),
    )
    assert check([p], "iot:Connect", "dev-1")
    assert not check([p], "iot:Connect", "dev-2")
    assert check([p], "iot:Publish", "devices/dev-1/telemetry")
    assert not check([p], "iot:Publish", "devices/dev-2/telemetry")


def as_client(client_id: str, *things: AttachedThing) -> PolicyContext:
    """A connection of a certificate attached to ``things``, made with ``client_id``."""
    return PolicyContext(client_id=client_id, attached_things=things, certificate_id="abc123")


THING = AttachedThing("thing-1", thing_type="lamp", attributes={"room": "hall"})
EXCLUSIVE = replace(THING, exclusive=True)
# The device policy of the demo template and of configs/aws/fleetprov-cloud.yaml.
DEVICE_POLICY = policy(
    allow("iot:Connect", f"{ARN}:client/${{iot:Connection.Thing.ThingName}}"),
    allow("iot:Publish", f"{ARN}:topic/devices/${{iot:Connection.Thing.ThingName}}/*"),
)


def test_thing_name_variable_resolves_when_the_client_id_is_the_thing_name() -> None:
    context = as_client("thing-1", THING)
    assert check([DEVICE_POLICY], "iot:Connect", "thing-1", context)
    assert check([DEVICE_POLICY], "iot:Publish", "devices/thing-1/telemetry", context)
    assert not check([DEVICE_POLICY], "iot:Publish", "devices/thing-2/telemetry", context)


def test_thing_name_variable_does_not_resolve_for_another_client_id() -> None:
    """AWS: with a non-exclusive attachment the client id must be the thing name; the first attached thing is not
    used in its place."""
    context = as_client("thing-1-telemetry", THING)
    assert not check([DEVICE_POLICY], "iot:Connect", "thing-1-telemetry", context)
    assert not check([DEVICE_POLICY], "iot:Publish", "devices/thing-1/telemetry", context)
    suffixed = policy(allow("iot:Connect", f"{ARN}:client/${{iot:Connection.Thing.ThingName}}-*"))
    assert not check([suffixed], "iot:Connect", "thing-1-telemetry", context)


def test_the_client_id_picks_the_thing_among_several_attached() -> None:
    things = (AttachedThing("thing-a"), AttachedThing("thing-b"))
    assert check([DEVICE_POLICY], "iot:Publish", "devices/thing-b/x", as_client("thing-b", *things))
    assert not check([DEVICE_POLICY], "iot:Publish", "devices/thing-a/x", as_client("thing-b", *things))
    # A thing of that name that is not attached to this certificate does not count.
    assert not check([DEVICE_POLICY], "iot:Connect", "thing-c", as_client("thing-c", *things))


def test_an_exclusive_attachment_resolves_for_any_client_id() -> None:
    context = as_client("thing-1-telemetry", EXCLUSIVE)
    assert check([DEVICE_POLICY], "iot:Publish", "devices/thing-1/telemetry", context)
    # The variable is the thing's name, not the client id: client/${ThingName} still names only "thing-1".
    assert not check([DEVICE_POLICY], "iot:Connect", "thing-1-telemetry", context)
    suffixed = policy(allow("iot:Connect", f"{ARN}:client/${{iot:Connection.Thing.ThingName}}-*"))
    assert check([suffixed], "iot:Connect", "thing-1-telemetry", context)


def test_unresolved_thing_name_never_matches() -> None:
    no_thing = PolicyContext(client_id="dev-1")
    allowing = policy(allow("iot:Publish", f"{ARN}:topic/t/${{iot:Connection.Thing.ThingName}}*"))
    assert not check([allowing], "iot:Publish", "t/", no_thing)
    assert not check([allowing], "iot:Publish", "t/anything", no_thing)
    # As in AWS, an unresolvable Deny does not apply either.
    denying = policy(allow("iot:Publish", "*"), deny("iot:Publish", f"{ARN}:topic/${{iot:Connection.Thing.ThingName}}"))
    assert check([denying], "iot:Publish", "x", no_thing)
    # Only the entry with the unresolved variable is skipped, not its siblings.
    mixed = policy(allow("iot:Publish", [f"{ARN}:topic/${{iot:Connection.Thing.ThingName}}", f"{ARN}:topic/x"]))
    assert check([mixed], "iot:Publish", "x", no_thing)


@pytest.mark.parametrize(
    ("context", "attached"),
    [
        (as_client("thing-1", THING), "true"),
        (as_client("thing-1-telemetry", THING), "false"),
        (as_client("thing-1-telemetry", EXCLUSIVE), "true"),
        (as_client("thing-1"), "false"),
    ],
)
def test_is_attached_variable(context: PolicyContext, attached: str) -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/attached/${{iot:Connection.Thing.IsAttached}}"))
    assert check([p], "iot:Publish", f"attached/{attached}", context)
    other = "false" if attached == "true" else "true"
    assert not check([p], "iot:Publish", f"attached/{other}", context)


@pytest.mark.parametrize(
    ("variable", "topic"),
    [("iot:Connection.Thing.ThingTypeName", "lamp"), ("iot:Connection.Thing.Attributes[room]", "hall")],
)
def test_thing_type_and_attribute_variables(variable: str, topic: str) -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/${{{variable}}}"))
    assert check([p], "iot:Publish", topic, as_client("thing-1", THING))
    assert check([p], "iot:Publish", topic, as_client("thing-1-telemetry", EXCLUSIVE))
    assert not check([p], "iot:Publish", topic, as_client("thing-1-telemetry", THING))
    # A thing without a type or without that attribute leaves the variable unresolved.
    assert not check([p], "iot:Publish", "", as_client("bare", AttachedThing("bare")))
    assert not check([p], "iot:Publish", topic, as_client("bare", AttachedThing("bare")))


def test_certificate_id_variable() -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/${{iot:CertificateId}}"))
    assert check([p], "iot:Publish", "abc123")
    assert not check([p], "iot:Publish", "abc123", PolicyContext(client_id="dev-1"))


def test_unknown_variable_never_matches() -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/${{iot:NoSuchThing}}*"))
    assert not check([p], "iot:Publish", "x")


def test_substituted_values_are_literal_not_wildcards() -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/c/${{iot:ClientId}}"))
    star = PolicyContext(client_id="*")
    assert check([p], "iot:Publish", "c/*", star)
    assert not check([p], "iot:Publish", "c/anything", star)


def test_special_character_variables_are_literal() -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/a${{*}}b${{?}}${{$}}"))
    assert check([p], "iot:Publish", "a*b?$")
    assert not check([p], "iot:Publish", "axxbc$")


# --- claim policy ----------------------------------------------------------------

CLAIM_CTX = PolicyContext(region="eu-west-1", account="111122223333", client_id="fleetprov.claim-42")


def provisioning_topics(template: str) -> list[str]:
    """Every request topic the fleet-provisioning MQTT API uses, in both payload formats."""
    return [
        f"{prefix}/{fmt}"
        for prefix in (
            "$aws/certificates/create",
            "$aws/certificates/create-from-csr",
            f"$aws/provisioning-templates/{template}/provision",
        )
        for fmt in ("json", "cbor")
    ]


def reply_topics(template: str) -> list[str]:
    return [f"{topic}/{result}" for topic in provisioning_topics(template) for result in ("accepted", "rejected")]


def claim(templates: Optional[list[str]] = None) -> list[Policy]:
    return [Policy.parse("claim", json.dumps(claim_policy_document(templates)))]


@pytest.mark.parametrize("templates", [None, ["FactoryTemplate"]])
def test_claim_policy_allows_the_fleet_provisioning_topics(templates: Optional[list[str]]) -> None:
    policies = claim(templates)
    assert check(policies, "iot:Connect", "fleetprov.claim-42", CLAIM_CTX)
    for topic in provisioning_topics("FactoryTemplate"):
        assert check(policies, "iot:Publish", topic, CLAIM_CTX), topic
    for topic in reply_topics("FactoryTemplate"):
        assert check(policies, "iot:Subscribe", topic, CLAIM_CTX), topic
        assert check(policies, "iot:Receive", topic, CLAIM_CTX), topic


@pytest.mark.parametrize(
    "topic",
    [
        "foo/bar",
        "$aws/things/x/shadow/update",
        "$aws/things/claim-42/jobs/get",
        "$aws/certificates/register/json",
        "$aws/certificates/createX/json",
        "$aws/provisioning-templates/FactoryTemplate/other/json",
        "$aws/certificates/create",
    ],
)
@pytest.mark.parametrize("action", ["iot:Publish", "iot:Subscribe", "iot:Receive"])
def test_claim_policy_denies_other_topics(topic: str, action: str) -> None:
    assert not check(claim(), action, topic, CLAIM_CTX)


@pytest.mark.parametrize("client_id", ["claim-42", "fleetprov-0001", "thing:gw_7", "fleetprov.claim", "*"])
def test_claim_policy_denies_client_ids_without_the_claim_prefix(client_id: str) -> None:
    """The claim is on every device: with any client id it could take a device's (its thing name) and make the
    broker drop that device."""
    assert not check(claim(), "iot:Connect", client_id, replace(CLAIM_CTX, client_id=client_id))


def test_claim_policy_restricted_to_named_templates() -> None:
    policies = claim(["FactoryTemplate", "Spare_2"])
    assert check(policies, "iot:Publish", "$aws/provisioning-templates/Spare_2/provision/json", CLAIM_CTX)
    for action, topic in [
        ("iot:Publish", "$aws/provisioning-templates/OtherTemplate/provision/json"),
        ("iot:Subscribe", "$aws/provisioning-templates/OtherTemplate/provision/json/accepted"),
        ("iot:Receive", "$aws/provisioning-templates/FactoryTemplateX/provision/cbor/accepted"),
    ]:
        assert not check(policies, action, topic, CLAIM_CTX), topic
    # With no template at all, only the certificate APIs remain.
    bare = claim([])
    assert check(bare, "iot:Publish", "$aws/certificates/create/json", CLAIM_CTX)
    assert not check(bare, "iot:Publish", "$aws/provisioning-templates/FactoryTemplate/provision/json", CLAIM_CTX)


def test_claim_policy_matches_the_aws_document_shape() -> None:
    document = claim_policy_document(["T"])
    assert document["Version"] == "2012-10-17"
    assert [s["Action"] for s in document["Statement"]] == [
        ["iot:Connect"],
        ["iot:Publish", "iot:Receive"],
        ["iot:Subscribe"],
    ]
    assert document["Statement"][0]["Resource"] == "arn:aws:iot:*:*:client/fleetprov.claim-*"
    assert document["Statement"][2]["Resource"] == [
        "arn:aws:iot:*:*:topicfilter/$aws/certificates/create/*",
        "arn:aws:iot:*:*:topicfilter/$aws/certificates/create-from-csr/*",
        "arn:aws:iot:*:*:topicfilter/$aws/provisioning-templates/T/provision/*",
    ]


@pytest.mark.parametrize("name", ["", "a/b", "*", "t?", "${iot:ClientId}", "x" * 37])
def test_claim_policy_rejects_unsafe_template_names(name: str) -> None:
    with pytest.raises(PolicyError, match="template name"):
        claim_policy_document([name])


def test_claim_policy_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        claim_policy_document("FactoryTemplate")


# --- parsing -----------------------------------------------------------------------


def test_parse_accepts_text_and_a_single_statement_object() -> None:
    text = (
        '{"Version": "2012-10-17", "Id": "x",'
        ' "Statement": {"Sid": "s", "Effect": "Deny", "Action": "iot:*", "Resource": "*"}}'
    )
    parsed = Policy.parse("one", text)
    assert parsed == Policy("one", (Statement("Deny", ("iot:*",), ("*",), "s"),))


STATEMENT = {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ({"Statement": [STATEMENT]}, "Version: missing"),
        ({"Version": "2008-10-17", "Statement": [STATEMENT]}, "Version: expected '2012-10-17'"),
        ({"Version": "2012-10-17"}, "Statement: missing"),
        ({"Version": "2012-10-17", "Statement": []}, "Statement: expected"),
        ({"Version": "2012-10-17", "Statement": [STATEMENT], "Extra": 1}, "Extra: unknown element"),
        ({"Version": "2012-10-17", "Statement": [STATEMENT, "x"]}, "Statement[1]: expected an object"),
        (
            {"Version": "2012-10-17", "Statement": [{"Action": "iot:*", "Resource": "*"}]},
            "Statement[0].Effect: missing",
        ),
        (
            {"Version": "2012-10-17", "Statement": {"Action": "iot:*", "Resource": "*"}},
            "Statement.Effect: missing",
        ),
        (
            {"Version": "2012-10-17", "Statement": [STATEMENT, {**STATEMENT, "Effect": "allow"}]},
            "Statement[1].Effect: expected Allow or Deny",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "Action": 3}]},
            "Statement[0].Action: expected",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "Action": []}]},
            "Statement[0].Action: expected",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "Action": ["iot:Connect", None]}]},
            "Statement[0].Action[1]: expected a string",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*"}]},
            "Statement[0].Resource: missing",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "Resource": {"a": 1}}]},
            "Statement[0].Resource: expected",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "Sid": 1}]},
            "Statement[0].Sid: expected a string",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "Resorce": "*"}]},
            "Statement[0].Resorce: unknown element",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "Condition": {}}]},
            "Statement[0].Condition: not supported by the emulator",
        ),
        (
            {"Version": "2012-10-17", "Statement": [{**STATEMENT, "NotResource": "x"}]},
            "Statement[0].NotResource: not supported by the emulator",
        ),
    ],
)
def test_malformed_documents_name_the_location(document: Any, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.parse("bad", document)
    assert message in str(caught.value)
    assert str(caught.value).startswith("policy 'bad': ")
    assert isinstance(caught.value, EmulatorError)


# --- properties ----------------------------------------------------------------------

ANY_TEXT = st.text(max_size=80)
POLICIES = [
    *claim(),
    policy(
        allow("iot:*", f"{ARN}:topic/${{iot:ClientId}}/*"),
        allow("iot:Subscribe", "arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.ThingName}/?*"),
        deny("iot:Receive", "*secret*"),
        allow("iot:Connect", f"{ARN}:client/${{iot:ClientId}}"),
    ),
]
ACTIONS = st.sampled_from(["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive", "iot:RetainPublish"])


@given(
    action=ACTIONS,
    resource=ANY_TEXT,
    client_id=ANY_TEXT,
    thing=st.none() | ANY_TEXT,
    exclusive=st.booleans(),
    region=ANY_TEXT,
)
def test_is_allowed_never_raises(
    action: str, resource: str, client_id: str, thing: Optional[str], exclusive: bool, region: str
) -> None:
    things = () if thing is None else (AttachedThing(thing, exclusive=exclusive),)
    context = PolicyContext(region=region, client_id=client_id, attached_things=things)
    assert isinstance(is_allowed(POLICIES, Request(action, resource), context), bool)


@given(topic=ANY_TEXT.filter(lambda t: not any(c in t for c in "*?$")), other=ANY_TEXT)
def test_literal_resource_matches_exactly_its_topic(topic: str, other: str) -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/{topic}"))
    assert check([p], "iot:Publish", topic)
    assert check([p], "iot:Publish", other) is (other == topic)


@given(prefix=ANY_TEXT.filter(lambda t: "*" not in t and "?" not in t and "$" not in t), rest=ANY_TEXT)
def test_trailing_star_matches_any_suffix(prefix: str, rest: str) -> None:
    p = policy(allow("iot:Publish", f"{ARN}:topic/{prefix}*"))
    assert check([p], "iot:Publish", prefix + rest)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(["Version", "Statement", "Id", "Sid", "Effect", "Action", "Resource", "Condition", "x"])
VALUES = JSON | st.sampled_from(["2012-10-17", "Allow", "Deny", "iot:*", "*"])
# Mostly-well-formed documents reach the deeper validation that random JSON rarely does.
NEAR_POLICY = st.fixed_dictionaries(
    {"Version": st.sampled_from(["2012-10-17", "2008-10-17"])},
    optional={
        "Statement": st.dictionaries(KEYS, VALUES, max_size=5)
        | st.lists(st.dictionaries(KEYS, VALUES, max_size=5), max_size=3),
        "Id": VALUES,
    },
)


@settings(max_examples=300)
@given(document=JSON | NEAR_POLICY | st.text(max_size=60))
def test_parse_returns_or_raises_policy_error(document: Any) -> None:
    for form in (document, json.dumps(document)) if not isinstance(document, str) else (document,):
        try:
            parsed = Policy.parse("random", form)
        except PolicyError:
            continue
        assert isinstance(parsed, Policy)
        assert all(s.effect in ("Allow", "Deny") for s in parsed.statements)
