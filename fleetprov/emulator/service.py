"""The fleet-provisioning MQTT API: CreateKeysAndCertificate, CreateCertificateFromCsr, RegisterThing.

Transport-free: the broker hands over a request topic, its payload and who sent it, and gets back the one
reply to publish to that connection. Topics, payload fields and error replies follow
``fleet-provision-api.md``; the error codes the emulator uses are listed in the README.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fleetprov.emulator.ca import CertificateAuthority, CsrRejected
from fleetprov.emulator.codec import PayloadError, decode_payload, encode_payload
from fleetprov.emulator.faults import Faults
from fleetprov.emulator.hooks import run_hook
from fleetprov.emulator.registry import Registry
from fleetprov.emulator.resources import ApiRejection, apply_plan
from fleetprov.emulator.templates import TemplateError, evaluate, parse_template

log = logging.getLogger(__name__)

CREATE_KEYS = "CreateKeysAndCertificate"
CREATE_FROM_CSR = "CreateCertificateFromCsr"
REGISTER_THING = "RegisterThing"

DEFAULT_TOKEN_TTL = 3600.0
MAX_PAYLOAD_BYTES = 128 * 1024  # AWS IoT Core's message size limit

_TOPIC = re.compile(
    r"^\$aws/(?:certificates/(?P<create>create|create-from-csr)"
    r"|provisioning-templates/(?P<template>[^/+#]+)/provision)/(?P<format>json|cbor)\Z"
)


@dataclass(frozen=True)
class ApiRequest:
    operation: str
    payload_format: str
    topic: str
    template_name: Optional[str] = None


def parse_request_topic(topic: str) -> Optional[ApiRequest]:
    """The API request a topic names, or None when it is not a fleet-provisioning request topic."""
    match = _TOPIC.fullmatch(topic)
    if match is None:
        return None
    if match["template"] is not None:
        return ApiRequest(REGISTER_THING, match["format"], topic, match["template"])
    operation = CREATE_KEYS if match["create"] == "create" else CREATE_FROM_CSR
    return ApiRequest(operation, match["format"], topic)


@dataclass(frozen=True)
class Caller:
    client_id: str
    certificate_id: str


@dataclass(frozen=True)
class Reply:
    topic: str
    payload: bytes
    accepted: bool


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ProvisioningService:
    def __init__(
        self,
        registry: Registry,
        issuer: CertificateAuthority,
        faults: Faults,
        *,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        region: str = "us-east-1",
        account: str = "123456789012",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.issuer = issuer
        self.faults = faults
        self.token_ttl = token_ttl
        self.region = region
        self.account = account
        self._clock = clock

    async def handle(self, request: ApiRequest, payload: bytes, caller: Caller) -> Reply:
        try:
            if self.faults.throttled():
                raise ApiRejection(429, "ThrottlingException", "Rate exceeded")
            forced = self.faults.forced_rejection(request.operation)
            if forced is not None:
                raise ApiRejection(forced.status_code, forced.error_code, forced.error_message)
            body = self._decode(request, payload)
            result = await self._dispatch(request, body, caller)
            if request.operation in self.faults.config.tamper:
                result = self._tampered(request.operation, result)
            override = self.faults.reply_override(request.operation)
            if override is not None:
                result = override.applied_to(result)
            reply = self._reply(request, result, accepted=True)
            if override is not None and override.raw is not None:
                reply = Reply(reply.topic, override.raw, accepted=True)
        except ApiRejection as rejection:
            log.info(
                "%s from %s rejected: %s %s %s",
                request.operation,
                caller.client_id,
                rejection.status_code,
                rejection.error_code,
                rejection.error_message,
            )
            error = {
                "statusCode": rejection.status_code,
                "errorCode": rejection.error_code,
                "errorMessage": rejection.error_message,
            }
            reply = self._reply(request, error, accepted=False)
        except Exception:  # a bug must cost one request a 500, never the emulator
            log.exception("%s from %s failed", request.operation, caller.client_id)
            error = {"statusCode": 500, "errorCode": "InternalFailure", "errorMessage": "internal error"}
            reply = self._reply(request, error, accepted=False)
        if self.faults.config.reply_delay > 0:
            await asyncio.sleep(self.faults.config.reply_delay)
        return reply

    def _tampered(self, operation: str, result: Mapping[str, Any]) -> Mapping[str, Any]:
        """The fault knob `tamper`: a well-formed reply that a careful device must refuse."""
        if operation == REGISTER_THING:
            return {key: value for key, value in result.items() if key != "thingName"}
        stranger, stranger_key = self.issuer.create_keys_and_certificate()
        if operation == CREATE_FROM_CSR:
            return {**result, "certificatePem": stranger.certificate_pem}
        return {**result, "privateKey": stranger_key}

    def _reply(self, request: ApiRequest, body: Mapping[str, Any], *, accepted: bool) -> Reply:
        suffix = "accepted" if accepted else "rejected"
        return Reply(f"{request.topic}/{suffix}", encode_payload(body, request.payload_format), accepted)

    def _decode(self, request: ApiRequest, payload: bytes) -> Mapping[str, Any]:
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ApiRejection(
                400,
                "InvalidPayload",
                f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES} byte limit",
            )
        if request.operation == CREATE_KEYS and not payload.strip():
            return {}  # the documented request is an empty message
        try:
            return decode_payload(payload, request.payload_format)
        except PayloadError as exc:
            raise ApiRejection(400, "InvalidPayload", str(exc)) from exc

    async def _dispatch(self, request: ApiRequest, body: Mapping[str, Any], caller: Caller) -> Mapping[str, Any]:
        if request.operation == CREATE_KEYS:
            return await self._create_keys_and_certificate(caller)
        if request.operation == CREATE_FROM_CSR:
            return self._create_certificate_from_csr(body, caller)
        return await self._register_thing(request.template_name or "", body, caller)

    # -- certificates ---------------------------------------------------------------------------

    def _new_token(self, certificate_id: str, pem: str, caller: Caller) -> str:
        token = secrets.token_urlsafe(96)
        now = self._clock()
        self.registry.add_certificate(
            certificate_id,
            pem,
            status="PENDING_ACTIVATION",
            kind="device",
            created_at=now,
            token_hash=token_hash(token),
            token_expires_at=now + self.token_ttl,
            claim_certificate_id=caller.certificate_id,
        )
        return token

    async def _create_keys_and_certificate(self, caller: Caller) -> Mapping[str, Any]:
        # RSA key generation takes tens of milliseconds: keep it off the event loop.
        issued, private_key = await asyncio.to_thread(self.issuer.create_keys_and_certificate)
        token = self._new_token(issued.certificate_id, issued.certificate_pem, caller)
        log.info("CreateKeysAndCertificate for %s: certificate %s", caller.client_id, issued.certificate_id)
        return {
            "certificateId": issued.certificate_id,
            "certificatePem": issued.certificate_pem,
            "privateKey": private_key,
            "certificateOwnershipToken": token,
        }

    def _create_certificate_from_csr(self, body: Mapping[str, Any], caller: Caller) -> Mapping[str, Any]:
        csr = body.get("certificateSigningRequest")
        if not isinstance(csr, str):
            raise ApiRejection(400, "InvalidPayload", "certificateSigningRequest must be a string holding a PEM CSR")
        try:
            issued = self.issuer.sign_csr(csr)
        except CsrRejected as exc:
            raise ApiRejection(400, "InvalidCertificateSigningRequest", exc.message) from exc
        token = self._new_token(issued.certificate_id, issued.certificate_pem, caller)
        log.info("CreateCertificateFromCsr for %s: certificate %s", caller.client_id, issued.certificate_id)
        return {
            "certificateOwnershipToken": token,
            "certificateId": issued.certificate_id,
            "certificatePem": issued.certificate_pem,
        }

    # -- RegisterThing --------------------------------------------------------------------------

    async def _register_thing(self, template_name: str, body: Mapping[str, Any], caller: Caller) -> Mapping[str, Any]:
        record = self.registry.template(template_name)
        if record is None:
            raise ApiRejection(404, "ResourceNotFound", f"Template {template_name} does not exist")
        certificate_id, certificate_pem = self._redeem_token(body.get("certificateOwnershipToken"))
        parameters = _string_parameters(body.get("parameters"))
        try:
            template = parse_template(record.body)
        except TemplateError as exc:
            raise ApiRejection(exc.status_code, exc.error_code, f"template {template_name}: {exc.message}") from exc
        if record.hook:
            decision = await run_hook(
                record.hook,
                {
                    "claimCertificateId": caller.certificate_id,
                    "certificateId": certificate_id,
                    "certificatePem": certificate_pem,
                    "templateArn": f"arn:aws:iot:{self.region}:{self.account}:provisioningtemplate/{template_name}",
                    "clientId": caller.client_id,
                    "parameters": dict(parameters),
                },
                cwd=record.hook_cwd,
            )
            if not decision.allowed:
                raise ApiRejection(403, "AccessDenied", decision.reason)
            parameters.update(decision.parameter_overrides)
        # AWS supplies the certificate id to the template, not to the hook.
        parameters["AWS::IoT::Certificate::Id"] = certificate_id
        try:
            plan = evaluate(template, parameters)
        except TemplateError as exc:
            raise ApiRejection(exc.status_code, exc.error_code, exc.message) from exc
        with self.registry.transaction():
            if self.registry.certificate(certificate_id) is None:  # its token expired while the hook ran
                raise ApiRejection(400, "InvalidCertificateOwnershipToken", "Certificate ownership token has expired.")
            apply_plan(self.registry, plan, certificate_id, now=self._clock())
        log.info(
            "RegisterThing %s for %s: thing %s, certificate %s",
            template_name,
            caller.client_id,
            plan.thing.thing_name if plan.thing else "-",
            certificate_id,
        )
        reply: dict[str, Any] = {"deviceConfiguration": dict(plan.device_configuration)}
        if plan.thing is not None:
            reply["thingName"] = plan.thing.thing_name
        return reply

    def _redeem_token(self, token: object) -> tuple[str, str]:
        if not isinstance(token, str) or not token:
            raise ApiRejection(400, "InvalidCertificateOwnershipToken", "Certificate ownership token cannot be empty.")
        hashed = token_hash(token)
        record = self.registry.certificate_by_token(hashed)
        if record is None:
            deleted = self.registry.expired_token_certificate(hashed)
            if deleted is not None:
                raise ApiRejection(
                    400,
                    "InvalidCertificateOwnershipToken",
                    f"Certificate ownership token has expired; certificate {deleted} was deleted.",
                )
            raise ApiRejection(400, "InvalidCertificateOwnershipToken", "Certificate ownership token is not valid.")
        if record.token_expires_at is None or record.token_expires_at < self._clock():
            raise ApiRejection(400, "InvalidCertificateOwnershipToken", "Certificate ownership token has expired.")
        return record.certificate_id, record.pem


def _string_parameters(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiRejection(400, "InvalidPayload", "parameters must be an object of string values")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ApiRejection(400, "InvalidPayload", f"parameters: key {key!r} is not a string")
        if not isinstance(item, str):
            raise ApiRejection(400, "InvalidPayload", f"parameters.{key}: expected a string, got {type(item).__name__}")
    return dict(value)
