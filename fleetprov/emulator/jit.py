"""Just-in-time provisioning (JITP) and registration (JITR): a device certificate that the emulator does not know
yet, issued by a registered customer CA with auto-registration, is registered when it first connects.

* JITP (the CA has a template): the certificate is registered PENDING_ACTIVATION, the template is evaluated with
  parameters from the certificate's subject, its resources are created as RegisterThing creates them, and the
  certificate takes the template's status (ACTIVE). The first connection is closed, as AWS drops it while it
  registers the device; the next one is an ordinary connection.
* JITR (no template): the certificate is registered PENDING_ACTIVATION, the connection is closed, and the event
  of auto-register-device-cert.md is published on ``$aws/events/certificates/registered/<caCertificateId>``; each
  later connection of a certificate still PENDING_ACTIVATION publishes it again. The CA's activation command
  (the emulator's stand-in for the rule and Lambda function that activate it on AWS) runs at each event.

Both need the device to send TLS SNI, as AWS requires. Transport-free: the broker hands over the peer certificate
and the server name, and acts on the outcome (close, publish the event, run the activation command).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleetprov.emulator.access import ConnectionRefused
from fleetprov.emulator.customer_ca import issuing_ca
from fleetprov.emulator.registry import CaCertificateRecord, Registry
from fleetprov.emulator.resources import ApiRejection, apply_plan
from fleetprov.emulator.templates import TemplateError, evaluate, parse_template
from fleetprov.errors import printable

log = logging.getLogger(__name__)

ACTIVATION_TIMEOUT_SECONDS = 10.0
# What the activation command gets of the emulator's environment (it stands in for a Lambda function, which sees
# nothing of the account's machines): enough to find programs and speak the locale, no credentials or tokens.
ACTIVATION_INHERITS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
CERTIFICATE_ID_PARAMETER = "AWS::IoT::Certificate::Id"
EVENT_TOPIC_PREFIX = "$aws/events/certificates/registered/"

# Template parameter -> the subject attribute it is read from, and the attribute's short name for messages.
# SerialNumber is the subject's serialNumber attribute (OID 2.5.4.5), not the certificate's serial number.
SUBJECT_PARAMETERS: Mapping[str, tuple[x509.ObjectIdentifier, str]] = {
    "AWS::IoT::Certificate::CommonName": (NameOID.COMMON_NAME, "CN"),
    "AWS::IoT::Certificate::Country": (NameOID.COUNTRY_NAME, "C"),
    "AWS::IoT::Certificate::Organization": (NameOID.ORGANIZATION_NAME, "O"),
    "AWS::IoT::Certificate::OrganizationalUnit": (NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"),
    "AWS::IoT::Certificate::DistinguishedNameQualifier": (NameOID.DN_QUALIFIER, "dnQualifier"),
    "AWS::IoT::Certificate::StateName": (NameOID.STATE_OR_PROVINCE_NAME, "ST"),
    "AWS::IoT::Certificate::SerialNumber": (NameOID.SERIAL_NUMBER, "serialNumber"),
}


def subject_parameters(certificate: x509.Certificate) -> dict[str, str]:
    """The JITP template parameters the certificate's subject supplies (the first value of each attribute)."""
    found: dict[str, str] = {}
    for parameter, (oid, _) in SUBJECT_PARAMETERS.items():
        values = certificate.subject.get_attributes_for_oid(oid)
        if values:
            value = values[0].value
            found[parameter] = value if isinstance(value, str) else value.decode(errors="replace")
    return found


def missing_subject_fields(declared: frozenset[str], supplied: Mapping[str, str]) -> list[str]:
    """The declared certificate parameters the subject lacks, each named with its subject field."""
    return [
        f"{parameter} (subject field {SUBJECT_PARAMETERS[parameter][1]})"
        for parameter in sorted(declared & SUBJECT_PARAMETERS.keys())
        if parameter not in supplied
    ]


def server_name_problem(server_name: Optional[str]) -> Optional[str]:
    """Why the client's SNI does not count as SNI, or None if it does. Some clients (OpenSSL's own, hence
    mosquitto) send an IP literal, which RFC 6066 does not allow in SNI: treated as no SNI at all."""
    if not server_name:
        return "the client sent none"
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        return None
    return f"the client sent the IP address {server_name}, which RFC 6066 does not allow"


@dataclass(frozen=True)
class RegistrationEvent:
    topic: str
    payload: bytes  # the JSON document of auto-register-device-cert.md


@dataclass(frozen=True)
class Activation:
    """The CA's activation command for one registration event."""

    argv: tuple[str, ...]
    certificate_id: str
    ca_certificate_id: str
    event: bytes


@dataclass(frozen=True)
class JitOutcome:
    """What to do with a connection that just-in-time registration handled: close it, and say why."""

    reason: str
    event: Optional[RegistrationEvent] = None
    activation: Optional[Activation] = None


class JustInTime:
    def __init__(self, registry: Registry, *, account: str, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.account = account
        self._clock = clock

    def admit(self, peer_der: bytes, server_name: Optional[str]) -> Optional[JitOutcome]:
        """Register the certificate if this connection is a JITP/JITR first (or JITR pending) connection.

        None: not a just-in-time matter (a registered certificate, or one no auto-registering CA issued);
        ``access.identify`` decides. ConnectionRefused: a just-in-time registration that must not happen.
        """
        certificate_id = hashlib.sha256(peer_der).hexdigest()
        record = self.registry.certificate(certificate_id)
        if record is not None and record.status != "PENDING_ACTIVATION":
            return None
        try:
            leaf = x509.load_der_x509_certificate(peer_der)
        except ValueError:  # OpenSSL accepted it, cryptography is stricter: then it is no customer CA's
            return None
        ca = issuing_ca(leaf, self.registry.ca_certificates())
        if ca is None:
            return None
        short, ca_short = certificate_id[:12], ca.ca_certificate_id[:12]
        if not ca.auto_registration:
            if record is None:
                raise ConnectionRefused(
                    f"certificate {short} is not registered and its CA {ca_short} does not allow auto-registration"
                )
            return None
        # AWS needs SNI for both CA modes; in DEFAULT mode it also needs the CA chain or a CA it already knows,
        # and a registered CA is known, so the chain is optional here as it is on AWS.
        problem = server_name_problem(server_name)
        if problem is not None:
            raise ConnectionRefused(
                f"certificate {short} of CA {ca_short} is not registered, and just-in-time registration needs TLS "
                f"SNI: {problem} (connect by host name, not by IP address)"
            )
        if ca.template is not None:
            return self._provision(leaf, certificate_id, ca, ca.template)
        return self._register(leaf, certificate_id, ca, first=record is None)

    def _provision(self, leaf: x509.Certificate, certificate_id: str, ca: CaCertificateRecord, body: str) -> JitOutcome:
        where = f"JITP of certificate {certificate_id[:12]} (CA {ca.ca_certificate_id[:12]})"
        parameters = subject_parameters(leaf)
        try:
            template = parse_template(body)
        except TemplateError as exc:  # validated at register-ca; only a registry edited by hand gets here
            raise ConnectionRefused(f"{where}: the CA's template is invalid: {exc.message}") from exc
        missing = missing_subject_fields(template.parameter_names, parameters)
        if missing:
            raise ConnectionRefused(f"{where} failed: the certificate has no {', '.join(missing)}")
        parameters[CERTIFICATE_ID_PARAMETER] = certificate_id
        now = self._clock()
        try:
            plan = evaluate(template, parameters)
            with self.registry.transaction():
                self._add_pending(leaf, certificate_id, now)
                apply_plan(self.registry, plan, certificate_id, now=now)
        except TemplateError as exc:
            raise ConnectionRefused(f"{where} failed: {exc.message}") from exc
        except ApiRejection as exc:
            raise ConnectionRefused(f"{where} failed: {exc.error_code}: {exc.error_message}") from exc
        status = self.registry.certificate(certificate_id)
        thing = plan.thing.thing_name if plan.thing is not None else "-"
        return JitOutcome(
            f"{where}: thing {thing}, certificate {status.status if status else '?'}; the first connection is "
            "closed, as AWS does"
        )

    def _register(
        self, leaf: x509.Certificate, certificate_id: str, ca: CaCertificateRecord, *, first: bool
    ) -> JitOutcome:
        now = self._clock()
        if first:
            self._add_pending(leaf, certificate_id, now)
        record = self.registry.certificate(certificate_id)
        registered_at = record.created_at if record is not None else now
        event = json.dumps(
            {
                "certificateId": certificate_id,
                "caCertificateId": ca.ca_certificate_id,
                "timestamp": int(now * 1000),
                "certificateStatus": "PENDING_ACTIVATION",
                "awsAccountId": self.account,
                "certificateRegistrationTimestamp": str(int(registered_at * 1000)),
            }
        ).encode()
        activation = None
        if ca.activation_command:
            argv = tuple(shlex.split(ca.activation_command))
            activation = Activation(argv, certificate_id, ca.ca_certificate_id, event)
        what = "registered" if first else "is still"
        return JitOutcome(
            f"JITR: certificate {certificate_id[:12]} of CA {ca.ca_certificate_id[:12]} {what} PENDING_ACTIVATION",
            RegistrationEvent(EVENT_TOPIC_PREFIX + ca.ca_certificate_id, event),
            activation,
        )

    def _add_pending(self, leaf: x509.Certificate, certificate_id: str, now: float) -> None:
        pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        self.registry.add_certificate(certificate_id, pem, status="PENDING_ACTIVATION", kind="device", created_at=now)


async def run_activation(activation: Activation, state_dir: Path, timeout: float = ACTIVATION_TIMEOUT_SECONDS) -> None:
    """Run a CA's activation command with the event on stdin; log how it ended. Never raises for its failures:
    an activation step that fails leaves the certificate PENDING_ACTIVATION, as a failed Lambda does."""
    name = activation.argv[0]
    environment = {
        **{variable: os.environ[variable] for variable in ACTIVATION_INHERITS if variable in os.environ},
        "FLEETPROV_CERTIFICATE_ID": activation.certificate_id,
        "FLEETPROV_CA_CERTIFICATE_ID": activation.ca_certificate_id,
        "FLEETPROV_STATE_DIR": str(state_dir),
    }
    try:
        process = await asyncio.create_subprocess_exec(
            *activation.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=environment,
        )
    except OSError as exc:
        log.warning("activation command %s could not start: %s", name, exc.strerror or exc)
        return
    try:
        output, _ = await asyncio.wait_for(process.communicate(activation.event), timeout=timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        log.warning("activation command %s did not finish within %g s: killed", name, timeout)
        return
    text = printable(output.decode(errors="replace").strip(), 300)  # one log line, whatever it printed
    if process.returncode != 0:
        log.warning("activation command %s for certificate %s exited %s: %s", name, activation.certificate_id[:12],
                    process.returncode, text)  # fmt: skip
    else:
        log.info("activation command %s for certificate %s done%s", name, activation.certificate_id[:12],
                 f": {text}" if text else "")  # fmt: skip
