"""The fleet-provisioning MQTT API, as fleetprov sees it: three async calls returning fleetprov's own types.

This is the only module that imports ``awsiot.iotidentity``. Rejections become ``ServiceRejected`` carrying
the step and AWS's statusCode, errorCode and errorMessage; 429 and 5xx rejections are transient, the rest
are final (exit 77). A reply that lacks what the API documents, or holds more than it could, is
``BadServiceData`` (exit 65): every field is checked here, before anything logs or stores it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from awscrt import mqtt_request_response
from awsiot import V2ServiceException, iotidentity

from fleetprov.errors import EX_NOPERM, EX_TEMPFAIL, BadServiceData, FleetprovError, printable
from fleetprov.session import ProtocolClient, crt_result

CREATE_CERTIFICATE = "create-certificate"
REGISTER_THING = "register-thing"
MAX_THING_NAME = 128
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")  # AWS IoT's ThingName pattern
CERTIFICATE_ID_LENGTH = 64
CERTIFICATE_ID = re.compile(r"[0-9a-fA-F]{64}")  # AWS IoT's certificate ids: the SHA-256 of the DER, in hex

# Caps on reply fields, in characters: far above anything AWS IoT sends, far below its 128 KB messages, so that
# a hostile or broken service cannot make the device journal, store or parse megabytes.
MAX_CERTIFICATE_PEM = 65536  # AWS IoT's CertificatePem: at most 65536 characters
MAX_PRIVATE_KEY_PEM = 16384  # AWS sends RSA-2048 keys (about 1.7 KB); an RSA-8192 key's PEM is under 7 KB
MAX_OWNERSHIP_TOKEN = 16384  # AWS's tokens are a few hundred characters
MAX_DEVICE_CONFIGURATION = 65536  # keys and values together; a whole provisioning template is at most 10 KB


class ServiceRejected(FleetprovError):
    """The service answered on the ``/rejected`` topic."""

    def __init__(self, step: str, status_code: int, error_code: str, error_message: str) -> None:
        super().__init__(f"rejected: {status_code} {printable(error_code)}: {printable(error_message, 400)}", step=step)
        self.status_code = status_code
        self.error_code = error_code
        self.error_message = error_message
        self.transient = status_code == 429 or status_code >= 500
        self.exit_code = EX_TEMPFAIL if self.transient else EX_NOPERM


class NoReply(FleetprovError):
    """The request got no usable answer in time, or the connection went away meanwhile."""

    exit_code = EX_TEMPFAIL
    transient = True


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_id: str
    certificate_pem: str
    ownership_token: str = field(repr=False)  # a secret: log at most a hash of it
    private_key_pem: Optional[str] = field(default=None, repr=False)  # CreateKeysAndCertificate only


@dataclass(frozen=True)
class Registration:
    thing_name: str
    device_configuration: Mapping[str, str]


class ProvisioningClient:
    def __init__(self, protocol_client: ProtocolClient, timeout: float) -> None:
        options = mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2,
            max_streaming_subscriptions=1,
            operation_timeout_in_seconds=max(1, round(timeout)),
        )
        self._client = iotidentity.IotIdentityClientV2(protocol_client, options)
        self._timeout = timeout

    async def create_certificate_from_csr(self, csr_pem: str) -> IssuedCertificate:
        request = iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem)
        reply = await self._call(self._client.create_certificate_from_csr(request), CREATE_CERTIFICATE)
        return _issued(reply)

    async def create_keys_and_certificate(self) -> IssuedCertificate:
        request = iotidentity.CreateKeysAndCertificateRequest()
        reply = await self._call(self._client.create_keys_and_certificate(request), CREATE_CERTIFICATE)
        issued = _issued(reply)
        private_key_pem = _text(reply.private_key, "privateKey", CREATE_CERTIFICATE, MAX_PRIVATE_KEY_PEM)
        return replace(issued, private_key_pem=private_key_pem)

    async def register_thing(self, template: str, ownership_token: str, parameters: Mapping[str, str]) -> Registration:
        request = iotidentity.RegisterThingRequest(
            template_name=template, certificate_ownership_token=ownership_token, parameters=dict(parameters)
        )
        reply = await self._call(self._client.register_thing(request), REGISTER_THING)
        configuration = {} if reply.device_configuration is None else reply.device_configuration
        if not isinstance(configuration, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in configuration.items()
        ):
            raise BadServiceData("deviceConfiguration is not an object of strings", step=REGISTER_THING)
        size = sum(len(key) + len(value) for key, value in configuration.items())
        if size > MAX_DEVICE_CONFIGURATION:
            raise BadServiceData(
                f"deviceConfiguration holds {size} characters; at most {MAX_DEVICE_CONFIGURATION} are accepted",
                step=REGISTER_THING,
            )
        thing_name = _text(reply.thing_name, "thingName", REGISTER_THING, MAX_THING_NAME)
        if not THING_NAME.fullmatch(thing_name):
            raise BadServiceData(
                f"the thingName in the reply is not a valid thing name ({printable(thing_name, 40)}): AWS IoT "
                "thing names are 1 to 128 of a-z, A-Z, 0-9, ':', '_' and '-'",
                step=REGISTER_THING,
            )
        return Registration(thing_name=thing_name, device_configuration=dict(configuration))

    async def _call(self, future: concurrent.futures.Future[Any], step: str) -> Any:
        try:
            # awscrt enforces operation_timeout itself; the extra second only guards against a lost callback.
            return await crt_result(future, self._timeout + 1)
        except V2ServiceException as exc:
            error = exc.modeled_error
            if isinstance(error, iotidentity.V2ErrorResponse):
                raise ServiceRejected(
                    step,
                    int(error.status_code or 0),
                    str(error.error_code or ""),
                    str(error.error_message or ""),
                ) from exc
            raise _unmodeled(step, exc.inner_error) from exc
        except asyncio.TimeoutError:
            raise NoReply(f"no reply within {self._timeout:g} s", step=step) from None


def _unmodeled(step: str, inner: Optional[BaseException]) -> FleetprovError:
    name = getattr(inner, "name", "") or type(inner).__name__
    # A lost connection surfaces as a failed (re)subscription of the request-response client.
    if "TIMEOUT" in name or "SHUT_DOWN" in name or "CONNECTION" in name or "SUBSCRIBE" in name:
        return NoReply(f"no reply: {name}", step=step)
    return BadServiceData(f"unusable reply: {name}: {printable(str(inner))}", step=step)


def _issued(reply: Any) -> IssuedCertificate:
    """The fields both create-certificate replies share, checked (the certificate itself: certcheck)."""
    certificate_id = _text(reply.certificate_id, "certificateId", CREATE_CERTIFICATE, CERTIFICATE_ID_LENGTH)
    if not CERTIFICATE_ID.fullmatch(certificate_id):
        raise BadServiceData(
            f"the certificateId in the reply is not a certificate id (64 hex digits): {printable(certificate_id, 70)}",
            step=CREATE_CERTIFICATE,
        )
    return IssuedCertificate(
        certificate_id=certificate_id.lower(),
        certificate_pem=_text(reply.certificate_pem, "certificatePem", CREATE_CERTIFICATE, MAX_CERTIFICATE_PEM),
        ownership_token=_text(
            reply.certificate_ownership_token, "certificateOwnershipToken", CREATE_CERTIFICATE, MAX_OWNERSHIP_TOKEN
        ),
    )


def _text(value: object, field_name: str, step: str, limit: int) -> str:
    """A non-empty string of at most ``limit`` characters; never quoted (a token or a key is a secret)."""
    if not isinstance(value, str) or not value:
        raise BadServiceData(f"the reply has no {field_name}", step=step)
    if len(value) > limit:
        raise BadServiceData(
            f"the {field_name} in the reply is {len(value)} characters long; at most {limit} are accepted", step=step
        )
    return value
