"""Evaluate AWS IoT Core policies the way the IoT message broker does.

The local emulator asks one question per MQTT operation: may this client
connect, publish, subscribe or receive?  The answer follows AWS: deny by
default, any matching Deny wins, otherwise any matching Allow grants.

Supported: Version "2012-10-17", Statement as one object or a list, Sid,
Effect, Action and Resource (string or list, ``*`` and ``?`` wildcards), and
the policy variables in ``_resolve``.  Condition, NotAction, NotResource and
(Not)Principal are rejected with a PolicyError rather than ignored, because
ignoring them would silently widen or narrow what a policy grants.
"""

from __future__ import annotations

import enum
import json
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from fleetprov.errors import EmulatorError

POLICY_VERSION = "2012-10-17"

# The ARN resource type AWS IoT checks for each MQTT action.  iot:RetainPublish
# is what AWS checks (in addition to iot:Publish) for a message with RETAIN set.
_RESOURCE_TYPE = {
    "iot:connect": "client",
    "iot:publish": "topic",
    "iot:retainpublish": "topic",
    "iot:receive": "topic",
    "iot:subscribe": "topicfilter",
}

_STATEMENT_KEYS = ("Sid", "Effect", "Action", "Resource")
# Valid in AWS policies but not evaluated here: refusing them is safer than
# pretending a conditional statement is unconditional.
_UNSUPPORTED_KEYS = ("Condition", "NotAction", "NotResource", "Principal", "NotPrincipal")

_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_THING_ATTRIBUTE = re.compile(r"iot:Connection\.Thing\.Attributes\[([^\]]+)\]")
# AWS CreateProvisioningTemplate: templateName matches ^[0-9A-Za-z_-]+$, 1-36 characters.
_TEMPLATE_NAME = re.compile(r"[0-9A-Za-z_-]{1,36}")
# The client ids a claim may connect with: those of fleetprov's claim connections (fleetprov.facts), never a
# thing name ("." is not in [a-zA-Z0-9:_-]), so a claim holder cannot make the broker drop a provisioned device.
CLAIM_CLIENT_IDS = "fleetprov.claim-*"


class PolicyError(EmulatorError):
    """A policy document the emulator cannot use; the message names the element at fault."""


@dataclass(frozen=True)
class Request:
    """One MQTT operation to authorise.

    ``resource`` is the topic (Publish, Receive), the topic filter (Subscribe)
    or the client id (Connect), never an ARN: the ARN depends on the context.
    """

    action: str
    resource: str

    def __post_init__(self) -> None:
        # A typo here would make every check silently deny: fail loudly instead.
        if self.action.lower() not in _RESOURCE_TYPE:
            raise ValueError(f"unsupported IoT action {self.action!r}")


@dataclass(frozen=True)
class AttachedThing:
    """A thing attached to the connecting certificate (AttachThingPrincipal), with what its variables resolve to."""

    name: str
    exclusive: bool = False  # attached with thingPrincipalType EXCLUSIVE_THING: the certificate's only thing
    thing_type: Optional[str] = None
    attributes: Mapping[str, str] = field(default_factory=dict, hash=False)  # a dict: not hashable


@dataclass(frozen=True)
class PolicyContext:
    """Who is asking: the values policy variables and ARNs are built from."""

    region: str = "us-east-1"
    account: str = "123456789012"
    client_id: str = ""
    attached_things: tuple[AttachedThing, ...] = ()  # every thing attached to the certificate
    certificate_id: str = ""

    @property
    def connection_thing(self) -> Optional[AttachedThing]:
        """The thing the iot:Connection.Thing.* variables describe, or None: then they do not resolve.

        AWS, "Associating an AWS IoT thing to an MQTT client connection" (exclusive-thing.html): "If your client
        ID matches your thing's name in the registry, after you attach an X.509 certificate to that IoT thing,
        AWS IoT Core will associate the client connection with the thing. [...] If your client ID doesn't match
        the thing's name in the registry, you can establish this association by attaching an X.509 certificate
        to your IoT thing, exclusively."  And "Thing policy variables": "If non-exclusive thing association is
        in place, when you're replacing thing names with thing policy variables, the value of clientId in the
        MQTT connect message [...] must exactly match the thing name."  So a certificate attached to thing T
        (non-exclusively) gets no thing at all when it connects as "T-telemetry".
        """
        for thing in self.attached_things:
            if thing.exclusive or thing.name == self.client_id:
                return thing
        return None


@dataclass(frozen=True)
class Statement:
    effect: str  # "Allow" or "Deny"
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    sid: Optional[str] = None


@dataclass(frozen=True)
class Policy:
    name: str
    statements: tuple[Statement, ...]

    @classmethod
    def parse(cls, name: str, document: Union[str, Mapping[str, Any]]) -> Policy:
        """Validate a policy document (JSON text or already decoded) into a Policy."""

        def fail(message: str) -> PolicyError:
            return PolicyError(f"policy {name!r}: {message}")

        if isinstance(document, str):
            try:
                document = json.loads(document)
            # ValueError covers JSONDecodeError and over-long integers; RecursionError
            # deeply nested arrays.  Either way the text is not a usable policy.
            except (ValueError, RecursionError) as exc:
                raise fail(f"not valid JSON: {exc}") from None
        if not isinstance(document, Mapping):
            raise fail("expected a JSON object with Version and Statement")

        for key in document:
            if key not in ("Version", "Id", "Statement"):
                raise fail(f"{key}: unknown element; expected Version, Statement or Id")
        if "Version" not in document:
            raise fail(f"Version: missing; expected {POLICY_VERSION!r}")
        if document["Version"] != POLICY_VERSION:
            raise fail(f"Version: expected {POLICY_VERSION!r}, got {_show(document['Version'])}")

        raw = document.get("Statement")
        if isinstance(raw, Mapping):
            located = [("Statement", raw)]
        elif isinstance(raw, list) and raw:
            located = [(f"Statement[{i}]", item) for i, item in enumerate(raw)]
        elif raw is None:
            raise fail("Statement: missing")
        else:
            raise fail("Statement: expected an object or a non-empty list of objects")
        try:
            statements = tuple(_parse_statement(where, item) for where, item in located)
        except PolicyError as exc:
            raise fail(exc.message) from None
        return cls(name=name, statements=statements)


def is_allowed(policies: Sequence[Policy], request: Request, context: PolicyContext) -> bool:
    """AWS semantics: default deny; any matching Deny wins; otherwise any matching Allow grants."""
    kind = _RESOURCE_TYPE[request.action.lower()]
    arn = f"arn:aws:iot:{context.region}:{context.account}:{kind}/{request.resource}"
    allowed = False
    for policy in policies:
        for statement in policy.statements:
            if _statement_matches(statement, request.action, arn, context):
                if statement.effect == "Deny":
                    return False  # an explicit Deny overrides every Allow, in any policy
                allowed = True
    return allowed


def claim_policy_document(templates: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The fleet-provisioning claim-certificate policy of the AWS documentation.

    It lets a claim certificate connect with a claim client id (CLAIM_CLIENT_IDS) and
    use only the CreateKeysAndCertificate, CreateCertificateFromCsr and RegisterThing
    topics, for the given templates or, when ``templates`` is None, for every
    template.  Region and account are ``*`` so the document works in any PolicyContext.
    """
    if isinstance(templates, str):
        # A bare string is a Sequence[str] too; iterating it would allow one-letter templates.
        raise TypeError("templates must be a sequence of template names, not a string")
    if templates is None:
        names = ["*"]
    else:
        names = list(templates)
        for template in names:
            # The name lands inside an ARN pattern: "*", "?" or "${" would widen the grant.
            if not _TEMPLATE_NAME.fullmatch(template):
                raise PolicyError(f"template name {template!r}: expected 1-36 characters of A-Z a-z 0-9 _ -")
    topics = [
        "$aws/certificates/create/*",
        "$aws/certificates/create-from-csr/*",
        *(f"$aws/provisioning-templates/{template}/provision/*" for template in names),
    ]
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": f"arn:aws:iot:*:*:client/{CLAIM_CLIENT_IDS}"},
            {
                "Effect": "Allow",
                "Action": ["iot:Publish", "iot:Receive"],
                "Resource": [f"arn:aws:iot:*:*:topic/{topic}" for topic in topics],
            },
            {
                "Effect": "Allow",
                "Action": ["iot:Subscribe"],
                "Resource": [f"arn:aws:iot:*:*:topicfilter/{topic}" for topic in topics],
            },
        ],
    }


# --- parsing -----------------------------------------------------------------


def _show(value: object) -> str:
    # Error messages quote the offending value, but a random document may be huge.
    return reprlib.repr(value)


def _parse_statement(where: str, raw: object) -> Statement:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected an object, got {_show(raw)}")
    for key in raw:
        if key in _UNSUPPORTED_KEYS:
            raise PolicyError(f"{where}.{key}: not supported by the emulator")
        if key not in _STATEMENT_KEYS:
            raise PolicyError(f"{where}.{key}: unknown element; expected Sid, Effect, Action or Resource")
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise PolicyError(f"{where}.Sid: expected a string, got {_show(sid)}")
    if "Effect" not in raw:
        raise PolicyError(f"{where}.Effect: missing; expected Allow or Deny")
    effect = raw["Effect"]
    if effect not in ("Allow", "Deny"):  # AWS is case-sensitive here
        raise PolicyError(f"{where}.Effect: expected Allow or Deny, got {_show(effect)}")
    return Statement(
        effect=effect,
        actions=_strings(where, raw, "Action"),
        resources=_strings(where, raw, "Resource"),
        sid=sid,
    )


def _strings(statement: str, raw: Mapping[Any, Any], key: str) -> tuple[str, ...]:
    """Action and Resource: one string or a non-empty list of strings."""
    where = f"{statement}.{key}"
    if key not in raw:
        raise PolicyError(f"{where}: missing")
    value = raw[key]
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        raise PolicyError(f"{where}: expected a string or a non-empty list of strings, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise PolicyError(f"{where}[{i}]: expected a string, got {_show(item)}")
    return tuple(value)


# --- matching ----------------------------------------------------------------


class _Wild(enum.Enum):
    ANY = "*"  # any run of characters, "/" included
    ONE = "?"  # exactly one character


# A compiled pattern: literal characters and wildcards.  Keeping them apart (rather
# than building a regex) lets substituted variable values stay literal.
_Pattern = tuple[Union[str, _Wild], ...]
_WILDCARDS = {"*": _Wild.ANY, "?": _Wild.ONE}


def _compile(text: str) -> list[Union[str, _Wild]]:
    return [_WILDCARDS.get(char, char) for char in text]


def _resolve(variable: str, context: PolicyContext) -> Optional[str]:
    """The value of ``${variable}``, or None when AWS could not resolve it either."""
    if variable in ("*", "?", "$"):
        return variable  # IAM's escapes for a literal *, ? and $
    thing = context.connection_thing
    attribute = _THING_ATTRIBUTE.fullmatch(variable)
    if attribute:
        # No associated thing, or no such attribute on it: unresolved, as in AWS.
        return thing.attributes.get(attribute.group(1)) if thing else None
    values = {
        "iot:ClientId": context.client_id or None,
        "iot:CertificateId": context.certificate_id or None,
        "iot:Connection.Thing.ThingName": thing.name if thing else None,
        "iot:Connection.Thing.ThingTypeName": thing.thing_type if thing else None,
        # "true" only for a thing associated with the connection (see PolicyContext.connection_thing): AWS,
        # "indicating that the connecting thing is attached to the certificate [...] Thing name is taken as
        # client Id."
        "iot:Connection.Thing.IsAttached": "true" if thing else "false",
    }
    return values.get(variable)


def _expand(resource: str, context: PolicyContext) -> Optional[_Pattern]:
    """Substitute policy variables; None if one cannot be resolved (the resource then matches nothing)."""
    pattern: list[Union[str, _Wild]] = []
    end = 0
    for variable in _VARIABLE.finditer(resource):
        value = _resolve(variable.group(1), context)
        if value is None:
            return None
        pattern += _compile(resource[end : variable.start()])
        # Substituted values are literal: a client id "*" must not become a wildcard.
        pattern += list(value)
        end = variable.end()
    pattern += _compile(resource[end:])
    return tuple(pattern)


def _glob_match(pattern: _Pattern, text: str) -> bool:
    """Whole-string wildcard match.

    Greedy with backtracking to the last ``*`` only, so O(len(pattern) * len(text))
    at worst: a client-chosen topic cannot make a regex backtrack exponentially.
    """
    p = t = 0
    star_p, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] is _Wild.ONE or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] is _Wild.ANY:
            star_p, star_t = p, t
            p += 1
        elif star_p >= 0:
            # Let the last * swallow one more character and retry from there.
            star_t += 1
            p, t = star_p + 1, star_t
        else:
            return False
    return all(item is _Wild.ANY for item in pattern[p:])


def _statement_matches(statement: Statement, action: str, arn: str, context: PolicyContext) -> bool:
    # Action names are case-insensitive in AWS; resources (topics, client ids) are not.
    action = action.lower()
    if not any(_glob_match(tuple(_compile(pattern.lower())), action) for pattern in statement.actions):
        return False
    for resource in statement.resources:
        pattern = _expand(resource, context)
        if pattern is not None and _glob_match(pattern, arn):
            return True
    return False
