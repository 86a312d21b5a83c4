"""`fleetprov factory keygen|csr|sign`: the command line of fleetprov/factory.py (what the openssl steps of a
JITP/JITR factory line do). fleetprov.factory is imported only when a step runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleetprov.errors import EX_OK, EX_USAGE


def add_factory_commands(commands: Any) -> None:
    """`fleetprov factory keygen|csr|sign`: what the openssl steps of a JITP factory line do (fleetprov.factory)."""
    factory = commands.add_parser(
        "factory",
        help="factory-line helpers: a device key, a CSR with JITP subject fields, a certificate from a lab CA",
        description="Factory-line helpers that replace the openssl steps of a JITP/JITR setup. "
        "Exit codes: 64 bad arguments, 65 unreadable CSR or bad CSR signature, 73 output exists or cannot be "
        "written, 78 unusable key, CA key or CA certificate.",
    )
    factory.set_defaults(handler=_factory_usage, factory_parser=factory)
    steps = factory.add_subparsers(dest="factory_command", metavar="STEP")

    keygen = steps.add_parser(
        "keygen", help="write a new private key (PEM, mode 0600)", description="Write a new private key, "
        "PKCS#8 PEM, mode 0600 from its first byte. An existing file is never overwritten (exit 73).",
    )  # fmt: skip
    keygen.add_argument("--out", type=Path, required=True, metavar="KEY", help="the key file to create")
    keygen.add_argument(
        "--key-type", default="ec-p256", metavar="TYPE",
        help="ec-p256 (default), ec-p384, rsa-2048 or rsa-3072",
    )  # fmt: skip
    keygen.set_defaults(handler=_factory_keygen)

    csr = steps.add_parser(
        "csr", help="write a CSR signed by a key, with the subject fields JITP templates read",
        description="Write a PEM certificate signing request (SHA-256) signed by KEY. The subject fields are "
        "those AWS IoT JITP templates read as AWS::IoT::Certificate::<field>. Exit 64 for a bad value, 78 if "
        "KEY is unusable, 73 if OUT exists.",
    )  # fmt: skip
    csr.add_argument("--key", type=Path, required=True, metavar="KEY", help="the private key (PEM or DER)")
    csr.add_argument("--out", type=Path, required=True, metavar="CSR", help="the CSR file to create")
    csr.add_argument("--cn", required=True, metavar="NAME", help="CommonName")
    csr.add_argument("--country", metavar="C", help="Country: exactly 2 letters (ISO 3166)")
    csr.add_argument("--organization", metavar="O", help="Organization")
    csr.add_argument("--organizational-unit", metavar="OU", help="OrganizationalUnit")
    csr.add_argument("--state", metavar="ST", help="StateName (stateOrProvinceName)")
    csr.add_argument("--serial-number", metavar="SN", help="SerialNumber (the subject attribute)")
    csr.add_argument("--dn-qualifier", metavar="Q", help="DistinguishedNameQualifier")
    csr.set_defaults(handler=_factory_csr)

    sign = steps.add_parser(
        "sign", help="lab use: sign a CSR with a CA into a device certificate",
        description="For lab use: a device certificate for CSR, signed by the CA (SHA-256, random serial, "
        "CA:FALSE, digitalSignature (+keyEncipherment for RSA), clientAuth, subject/authority key identifiers). "
        "Exit 65 if the CSR's signature does not verify, 78 if the CA certificate is not a CA or does not match "
        "the CA key, 73 if OUT exists.",
    )  # fmt: skip
    sign.add_argument("--csr", type=Path, required=True, metavar="CSR", help="the certificate signing request")
    sign.add_argument("--ca-cert", type=Path, required=True, metavar="CA", help="the CA certificate (PEM or DER)")
    sign.add_argument("--ca-key", type=Path, required=True, metavar="CAKEY", help="the CA's private key")
    sign.add_argument("--out", type=Path, required=True, metavar="CERT", help="the certificate file to create")
    sign.add_argument("--days", default="365", metavar="N", help="days the certificate is valid (default: 365)")
    sign.set_defaults(handler=_factory_sign)


def _factory_usage(args: argparse.Namespace) -> int:
    args.factory_parser.print_help(sys.stderr)
    return EX_USAGE


def _factory_keygen(args: argparse.Namespace) -> int:
    from fleetprov import factory

    factory.keygen(args.out, args.key_type)
    print(f"key: {args.out} ({args.key_type})")
    return EX_OK


def _factory_csr(args: argparse.Namespace) -> int:
    from fleetprov import factory

    subject = factory.Subject(
        common_name=args.cn,
        country=args.country,
        organization=args.organization,
        organizational_unit=args.organizational_unit,
        state=args.state,
        serial_number=args.serial_number,
        dn_qualifier=args.dn_qualifier,
    )
    request = factory.csr(args.key, args.out, subject)
    print(f"csr: {args.out}")
    print(f"subject: {factory.subject_text(request.subject)}")
    return EX_OK


def _factory_sign(args: argparse.Namespace) -> int:
    from fleetprov import factory

    certificate = factory.sign(args.csr, args.ca_cert, args.ca_key, args.out, args.days)
    print(f"certificate: {args.out}")
    for line in factory.describe(certificate):
        print(line)
    return EX_OK
