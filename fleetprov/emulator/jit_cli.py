"""``fleetprov emulator register-ca | ca-certificates | attach-policy``: the admin side of JITP and JITR.

They change the registry file only, so they work whether or not the emulator runs: a running emulator trusts a
newly registered CA from its next TLS handshake on, and reads certificates and policies at each connection.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fleetprov.emulator.cli import _existing_registry, _print_json
from fleetprov.emulator.customer_ca import CaSettings, load_ca_certificate, read_template, register_ca
from fleetprov.emulator.policy import Policy, PolicyError
from fleetprov.errors import EX_OK, EmulatorError

_REGISTER_CA_DESCRIPTION = """\
Register a customer CA certificate (RegisterCACertificate), or change the settings of one already registered.
The emulator then trusts device certificates it issued. With --auto-registration, a device certificate the
registry does not know yet is registered when it first connects (the device must send TLS SNI: connect by host
name); that first connection is closed, as AWS closes it:

  JITP (with --template): the template is evaluated with the parameters AWS::IoT::Certificate::CommonName,
  Country, Organization, OrganizationalUnit, DistinguishedNameQualifier, StateName, SerialNumber (all from the
  certificate's subject; the certificate must have every one the template declares) and AWS::IoT::Certificate::Id;
  its thing, policies and certificate status are created as RegisterThing creates them. The device's next
  connection is an ordinary one.

  JITR (without --template): the certificate is registered PENDING_ACTIVATION and the event
  {certificateId, caCertificateId, timestamp, certificateStatus, awsAccountId, certificateRegistrationTimestamp}
  is published on $aws/events/certificates/registered/<caCertificateId> (again at each connection while the
  certificate is PENDING_ACTIVATION). Activating it takes two steps, as on AWS: set-certificate-status ID ACTIVE,
  and attach-policy with a policy that allows at least iot:Connect -- a JITR device certificate without a policy
  cannot connect. --activation-command runs both for you: a stand-in for the rule and Lambda function.

Prints {"caCertificateId": ...}. Exit codes: 78 for a file that is not a CA certificate, a template the emulator
cannot run, or a state directory without a registry.
"""


def add_jit_commands(commands: Any) -> None:
    """Add the sub-commands to ``fleetprov emulator``'s sub-parsers."""
    register = commands.add_parser(
        "register-ca",
        help="register a customer CA certificate for JITP / JITR",
        description=_REGISTER_CA_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register.add_argument("--state-dir", type=Path, required=True, help="the emulator's state directory")
    register.add_argument("--ca-certificate", type=Path, required=True, metavar="FILE", help="the CA certificate (PEM)")
    register.add_argument(
        "--auto-registration", action="store_true",
        help="register the device certificates it issued at their first connection (JITP / JITR)",
    )  # fmt: skip
    register.add_argument(
        "--template", type=Path, metavar="FILE",
        help='JITP template body (JSON; or AWS\'s registration config {"templateBody": "...", ...})',
    )  # fmt: skip
    register.add_argument(
        "--mode", choices=["default", "sni-only"], default="default",
        help="certificate mode: default (the device sends SNI, and the chain unless the CA is known -- a registered "
        "CA is) or sni-only (the device sends SNI); default: default",
    )  # fmt: skip
    register.add_argument(
        "--activation-command", metavar="CMD",
        help="JITR: a command (split like a shell would, no shell) run at each registration event with the event "
        "JSON on stdin and FLEETPROV_CERTIFICATE_ID, FLEETPROV_CA_CERTIFICATE_ID and FLEETPROV_STATE_DIR set; "
        "killed after 10 s; not started again for a certificate while it still runs for it. It may run "
        "set-certificate-status and attach-policy",
    )  # fmt: skip
    register.set_defaults(handler=_register_ca)

    listing = commands.add_parser("ca-certificates", help="list registered customer CA certificates as JSON")
    listing.add_argument("--state-dir", type=Path, required=True, help="the emulator's state directory")
    listing.set_defaults(handler=_ca_certificates)

    attach = commands.add_parser(
        "attach-policy",
        help="attach a policy to a certificate (e.g. to a JITR certificate being activated)",
        description="Attach policy NAME to a certificate; with --policy-document, create NAME from FILE (or replace "
        "its document) first. Exit code 78 for an unknown certificate or policy, or an invalid document.",
    )
    attach.add_argument("--state-dir", type=Path, required=True, help="the emulator's state directory")
    attach.add_argument("--certificate-id", required=True, metavar="ID")
    attach.add_argument("--policy-name", required=True, metavar="NAME")
    attach.add_argument("--policy-document", type=Path, metavar="FILE", help="IoT policy document (JSON)")
    attach.set_defaults(handler=_attach_policy)


def _register_ca(args: argparse.Namespace) -> int:
    if args.activation_command is not None and args.template is not None:
        raise EmulatorError("--activation-command is for JITR: give it without --template")
    try:
        data = args.ca_certificate.read_bytes()
    except OSError as exc:
        raise EmulatorError(f"--ca-certificate {args.ca_certificate}: {exc.strerror}") from exc
    certificate = load_ca_certificate(data, f"--ca-certificate {args.ca_certificate}")
    settings = CaSettings(
        auto_registration=args.auto_registration,
        template=read_template(args.template) if args.template is not None else None,
        mode="SNI_ONLY" if args.mode == "sni-only" else "DEFAULT",
        activation_command=args.activation_command,
    )
    registry = _existing_registry(args.state_dir)
    ca_id = register_ca(registry, certificate, settings, now=time.time())
    _print_json({"caCertificateId": ca_id})
    return EX_OK


def _ca_certificates(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.state_dir)
    _print_json(
        [
            {
                "caCertificateId": ca.ca_certificate_id,
                "status": ca.status,
                "autoRegistrationStatus": "ENABLE" if ca.auto_registration else "DISABLE",
                "certificateMode": ca.mode,
                "provisioningType": "JITP" if ca.template is not None else "JITR",
                "activationCommand": ca.activation_command,
                "createdAt": ca.created_at,
            }
            for ca in registry.ca_certificates()
        ]
    )
    return EX_OK


def _attach_policy(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.state_dir)
    if registry.certificate(args.certificate_id) is None:
        raise EmulatorError(f"no certificate with id {args.certificate_id}")
    if args.policy_document is not None:
        try:
            document = args.policy_document.read_text(encoding="utf-8")
            Policy.parse(args.policy_name, document)
        except OSError as exc:
            raise EmulatorError(f"--policy-document {args.policy_document}: {exc.strerror}") from exc
        except PolicyError as exc:
            raise EmulatorError(f"--policy-document {args.policy_document}: {exc.message}") from exc
    elif registry.policy_document(args.policy_name) is None:
        raise EmulatorError(f"no policy named {args.policy_name!r}: give --policy-document to create it")
    with registry.transaction():
        if args.policy_document is not None:
            registry.put_policy(args.policy_name, document)
        registry.attach_policy(args.policy_name, args.certificate_id)
    _print_json({"policyName": args.policy_name, "certificateId": args.certificate_id})
    return EX_OK
