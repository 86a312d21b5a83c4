"""``fleetprov emulator ...``: serve, and the admin commands that read or change the registry."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from fleetprov.emulator.registry import THING_PRINCIPAL_TYPES
from fleetprov.errors import EX_OK, EmulatorError, UsageError


def add_emulator_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="emulator_command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the emulator until SIGTERM/SIGINT")
    _state_dir(serve)
    serve.add_argument("--config", type=Path, help="emulator YAML (see configs/emulator.example.yaml)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port; 0 picks a free one (default 0)")
    serve.add_argument("--template", action="append", default=[], metavar="NAME=PATH", help="provisioning template")
    serve.add_argument("--hook", action="append", default=[], metavar="NAME=COMMAND", help="pre-provisioning hook")
    serve.add_argument("--thing-group", action="append", default=[], metavar="NAME", help="create a thing group")
    serve.add_argument("--token-ttl", type=float, metavar="SECONDS", help="ownership token lifetime (default 3600)")
    serve.add_argument(
        "--certificate-validity", metavar="SECONDS",
        help="lifetime of the device certificates it issues (CreateCertificateFromCsr, CreateKeysAndCertificate): "
        "not-after is issue time + SECONDS, not-before 5 minutes before issue; not the CAs' or the claim "
        "certificate's (default 315360000, 3650 days)",
    )  # fmt: skip
    serve.add_argument(
        "--cloudformation", type=Path, metavar="FILE",
        help="run the cloud side a CloudFormation template describes (configs/aws/fleetprov-cloud.yaml): its "
        "provisioning templates, claim certificate and policy, and inline Lambda pre-provisioning hooks",
    )  # fmt: skip
    serve.add_argument(
        "--parameter", action="append", default=[], metavar="KEY=VALUE",
        help="a parameter value for --cloudformation, e.g. ClaimCertificateCsr=\"$(cat claim.csr)\"",
    )  # fmt: skip
    serve.add_argument("--reply-delay", type=float, metavar="SECONDS", help="fault: delay every reply")
    serve.add_argument("--close-after", type=int, metavar="N", help="fault: close a connection at its N+1th publish")
    serve.add_argument("--throttle", type=float, metavar="R", help="fault: over R requests/s reply 429")
    serve.add_argument(
        "--reject", action="append", default=[], metavar="OP:COUNT:STATUS:CODE",
        help="fault: reject the next COUNT requests of OP, e.g. RegisterThing:2:500:InternalFailure",
    )  # fmt: skip
    serve.add_argument(
        "--tamper", action="append", default=[], metavar="OP",
        help="fault: make OP's accepted replies inconsistent (certificate for another key, wrong private key, "
        "no thingName)",
    )  # fmt: skip
    serve.add_argument(
        "--reply-overrides", type=Path, metavar="FILE",
        help="fault: a JSON file, read at every request, whose {OP: {field: value}} replace fields of OP's "
        'accepted replies (null removes one; "$raw": base64 replaces the whole payload)',
    )  # fmt: skip
    serve.set_defaults(handler=_serve)

    things = commands.add_parser("things", help="list things as JSON")
    _state_dir(things)
    things.set_defaults(handler=_things)

    certificates = commands.add_parser("certificates", help="list certificates as JSON")
    _state_dir(certificates)
    certificates.set_defaults(handler=_certificates)

    status = commands.add_parser("set-certificate-status", help="change a certificate's status")
    _state_dir(status)
    status.add_argument("certificate_id")
    status.add_argument("status", choices=["ACTIVE", "INACTIVE", "REVOKED"])
    status.set_defaults(handler=_set_status)

    attach = commands.add_parser(
        "attach-thing-principal",
        help="attach a certificate to a thing, as AWS's AttachThingPrincipal (RegisterThing attaches non-exclusively)",
    )
    _state_dir(attach)
    attach.add_argument("thing_name")
    attach.add_argument("certificate_id")
    attach.add_argument(
        "--thing-principal-type", choices=THING_PRINCIPAL_TYPES, default="NON_EXCLUSIVE_THING",
        help="EXCLUSIVE_THING: the certificate's only thing; its connections then resolve the thing policy "
        "variables whatever their client id",
    )  # fmt: skip
    attach.set_defaults(handler=_attach_thing_principal)

    device = commands.add_parser(
        "device-config", help="print a complete fleetprov configuration for a device of this running emulator"
    )
    _state_dir(device)
    device.add_argument("--method", choices=["csr", "create-keys"], default="csr")
    device.add_argument("--key-type", choices=["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"], default="ec-p256")
    device.add_argument("--template", help="provisioning template (default: the first the emulator serves)")
    device.add_argument("--protocol", type=int, choices=[3, 5], default=3, help="MQTT 3.1.1 or 5")
    device.add_argument("--state-dir-for-device", type=Path, help="the device's state directory")
    device.add_argument("--serial", help="SerialNumber template parameter (default: a new random one)")
    device.add_argument("--key-backend", choices=["file", "pkcs11"], default="file", help="where the device key lives")
    device.add_argument("--pkcs11-library", type=Path, help="PKCS#11 module (with --key-backend pkcs11)")
    device.add_argument("--token-label", help="label of the token (with --key-backend pkcs11)")
    device.add_argument("--pin-file", type=Path, help="file holding the token's user PIN, mode 0600")
    device.add_argument("--key-label", help="label of the device key in the token (default fleetprov-device)")
    device.add_argument(
        "--claim-key", type=Path,
        help="the claim's private key, when the emulator issued the claim certificate from a CSR made elsewhere",
    )  # fmt: skip
    device.add_argument(
        "--inbox", type=Path,
        help="trusted user: claim.inbox instead of the claim (temporary claims from create-provisioning-claim, "
        "handed over with `fleetprov claim install`)",
    )  # fmt: skip
    device.add_argument(
        "--jit-certificate", type=Path, metavar="CERT",
        help="JITP/JITR: jit: with this device certificate (from a CA given to register-ca) instead of a claim",
    )  # fmt: skip
    device.add_argument(
        "--jit-key", type=Path, metavar="KEY", help="the device certificate's key (with --jit-certificate)"
    )
    device.add_argument("--jit-ca", type=Path, metavar="CA", help="the CA certificate, sent as the chain (optional)")
    device.set_defaults(handler=_device_config)

    claim = commands.add_parser("claim", help="issue another claim certificate and key into --out")
    _state_dir(claim)
    claim.add_argument("--out", type=Path, required=True, help="directory for claim.pem and claim.key")
    claim.set_defaults(handler=_claim)

    from fleetprov.emulator.jit_cli import add_jit_commands  # here: jit_cli uses this module's helpers

    add_jit_commands(commands)

    temporary = commands.add_parser(
        "create-provisioning-claim",
        help="CreateProvisioningClaim: a temporary claim certificate and key for one template into --out",
        description="Issue a temporary claim (fleet provisioning by trusted user) into OUT/claim.pem and "
        "OUT/claim.key (0600), registered ACTIVE with a policy of its own that allows provisioning through "
        "--template only. Valid from 5 seconds before now for --validity seconds. Existing files are never "
        "overwritten. Exit codes: 64 bad --validity, 73 files exist or cannot be written, 78 unknown template "
        "or no emulator state.",
    )  # fmt: skip
    _state_dir(temporary)
    temporary.add_argument("--template", required=True, help="the one provisioning template the claim may use")
    temporary.add_argument("--out", type=Path, required=True, help="directory for claim.pem and claim.key")
    temporary.add_argument(
        "--validity", type=float, default=300, metavar="SECONDS",
        help="lifetime of the claim certificate (default 300: 5 minutes, as AWS)",
    )  # fmt: skip
    temporary.set_defaults(handler=_create_provisioning_claim)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, required=True, help="the emulator's state directory")


def _serve(args: argparse.Namespace) -> int:
    from fleetprov.emulator.server import serve
    from fleetprov.emulator.settings import load_settings, with_flags

    settings = with_flags(
        load_settings(args.config, args.state_dir),
        host=args.host,
        port=args.port,
        token_ttl=args.token_ttl,
        certificate_validity=args.certificate_validity,
        templates=args.template,
        hooks=args.hook,
        reply_delay=args.reply_delay,
        close_after=args.close_after,
        throttle=args.throttle,
        rejects=args.reject,
        thing_groups=args.thing_group,
        tamper=args.tamper,
        reply_overrides=args.reply_overrides,
        cloudformation=args.cloudformation,
        parameters=args.parameter,
    )
    asyncio.run(serve(settings))
    return EX_OK


def _existing_registry(state_dir: Path) -> Any:
    from fleetprov.emulator.registry import Registry

    path = state_dir / "registry.sqlite"
    if not path.exists():
        raise EmulatorError(f"{state_dir} holds no emulator registry (run 'fleetprov emulator serve' first)")
    return Registry(path)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _things(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.state_dir)
    _print_json(
        [
            {
                "thingName": thing.name,
                "thingTypeName": thing.thing_type,
                "attributes": dict(thing.attributes),
                "thingGroups": list(thing.groups),
                "billingGroup": thing.billing_group,
                "version": thing.version,
                "principals": registry.principals_of_thing(thing.name),
            }
            for thing in registry.things()
        ]
    )
    return EX_OK


def _certificates(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.state_dir)
    _print_json(
        [
            {
                "certificateId": cert.certificate_id,
                "status": cert.status,
                "kind": cert.kind,
                "createdAt": cert.created_at,
                "things": registry.things_for_certificate(cert.certificate_id),
                "policies": [name for name, _ in registry.policies_for_certificate(cert.certificate_id)],
            }
            for cert in registry.certificates()
        ]
    )
    return EX_OK


def _set_status(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.state_dir)
    registry.set_certificate_status(args.certificate_id, args.status)
    return EX_OK


def _attach_thing_principal(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.state_dir)
    # AWS answers ResourceNotFoundException for either.
    if registry.thing(args.thing_name) is None:
        raise EmulatorError(f"no thing named {args.thing_name!r}")
    if registry.certificate(args.certificate_id) is None:
        raise EmulatorError(f"no certificate with id {args.certificate_id}")
    registry.attach_thing_principal(args.thing_name, args.certificate_id, args.thing_principal_type)
    return EX_OK


def _device_config(args: argparse.Namespace) -> int:
    import secrets

    import yaml

    endpoint_path = args.state_dir / "endpoint.json"
    try:
        endpoint = json.loads(endpoint_path.read_text())
    except (OSError, ValueError) as exc:
        raise EmulatorError(f"{endpoint_path} is missing or unreadable: is the emulator running?") from exc
    templates = endpoint.get("templates") or []
    template = args.template or (templates[0] if templates else None)
    if template not in templates:
        raise EmulatorError(f"the emulator serves no template {template!r} (it serves: {', '.join(templates)})")
    claim_key = str(args.claim_key.resolve()) if args.claim_key else endpoint.get("claim_private_key")
    if claim_key is None:
        raise EmulatorError(
            "the emulator issued its claim certificate from a CSR, so it does not have the key: give --claim-key "
            "with the key the CSR was made from"
        )
    host = "localhost" if endpoint["host"] in ("127.0.0.1", "::1", "localhost") else endpoint["host"]
    device_state = args.state_dir_for_device or Path.cwd() / "fleetprov-state"
    way_in: dict[str, Any] = {
        "claim": {"certificate": endpoint["claim_certificate"], "private_key": claim_key},
        "provisioning": {
            "template": template,
            "method": args.method,
            "key_type": args.key_type,
            "parameters": {"static": {"SerialNumber": args.serial or f"emu-{secrets.token_hex(4)}"}},
        },
    }
    if args.inbox is not None:
        way_in["claim"] = {"inbox": str(args.inbox.resolve())}
    if args.jit_certificate is not None:
        way_in = {"jit": _jit_section(args)}
    config = {
        "endpoint": host,
        "port": endpoint["port"],
        "root_ca": endpoint["root_ca"],
        "mqtt_version": args.protocol,
        **way_in,
        "state_dir": str(device_state.resolve()),
        # Short retries: against a local emulator, waiting minutes for a transient failure helps nobody.
        "retry": {"initial_delay": 0.2, "max_delay": 2, "budget": 20, "max_attempts": 5},
    }
    if args.key_backend == "pkcs11":
        config["keys"] = {"backend": "pkcs11", "pkcs11": _pkcs11_section(args)}
    sys.stdout.write(f"# fleetprov configuration for the emulator in {args.state_dir}\n")
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return EX_OK


def _jit_section(args: argparse.Namespace) -> dict[str, str]:
    """jit: for a device that holds a certificate from a CA registered with `register-ca`."""
    if args.jit_key is None:
        raise UsageError("--jit-certificate needs --jit-key (the device certificate's private key)")
    section = {"certificate": str(args.jit_certificate.resolve()), "private_key": str(args.jit_key.resolve())}
    if args.jit_ca is not None:
        section["ca_certificate"] = str(args.jit_ca.resolve())
    return section


def _pkcs11_section(args: argparse.Namespace) -> dict[str, str]:
    missing = [flag for flag, value in (("--pkcs11-library", args.pkcs11_library), ("--token-label", args.token_label),
               ("--pin-file", args.pin_file)) if value is None]  # fmt: skip
    if missing:
        raise EmulatorError(f"--key-backend pkcs11 needs {', '.join(missing)}")
    section = {
        "library": str(args.pkcs11_library.resolve()),
        "token_label": args.token_label,
        "pin_file": str(args.pin_file.resolve()),
    }
    if args.key_label:
        section["key_label"] = args.key_label
    return section


def _claim(args: argparse.Namespace) -> int:
    from fleetprov.emulator.ca import ensure_ca_material
    from fleetprov.emulator.server import create_claim

    registry = _existing_registry(args.state_dir)
    claim = create_claim(registry, ensure_ca_material(args.state_dir), args.out, None)
    _print_json(
        {
            "certificateId": claim.certificate_id,
            "certificate": str(claim.certificate),
            "privateKey": str(claim.private_key),
        }
    )
    return EX_OK


def _create_provisioning_claim(args: argparse.Namespace) -> int:
    import datetime as dt

    from fleetprov.emulator.ca import ensure_ca_material
    from fleetprov.emulator.claims import issue_temporary_claim

    registry = _existing_registry(args.state_dir)
    claim = issue_temporary_claim(registry, ensure_ca_material(args.state_dir), args.out, args.template, args.validity)
    _print_json(
        {
            "certificateId": claim.files.certificate_id,
            "certificatePath": str(claim.files.certificate),
            "keyPath": str(claim.files.private_key),
            "expiration": claim.not_after.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    return EX_OK
