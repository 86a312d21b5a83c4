"""`fleetprov factory keygen|csr|sign`: the command line of fleetprov/factory.py (what the openssl steps of a
JITP/JITR factory line do), for key files and for keys in a PKCS#11 token (``--key pkcs11:...``).
fleetprov.factory is imported only when a step runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleetprov.errors import EX_OK, EX_USAGE, UsageError

_KEY_URI = "pkcs11:token=LABEL;object=KEYLABEL;type=private"


def add_factory_commands(commands: Any) -> None:
    """`fleetprov factory keygen|csr|sign`: what the openssl steps of a JITP factory line do (fleetprov.factory)."""
    factory = commands.add_parser(
        "factory",
        help="factory-line helpers: a device key (file or PKCS#11 token), a CSR with JITP subject fields, "
        "a certificate from a lab CA",
        description="Factory-line helpers that replace the openssl steps of a JITP/JITR setup. A device key "
        f"is a file or a key in a PKCS#11 token, named by an RFC 7512 URI ({_KEY_URI}) with --pkcs11-library "
        "and the PIN from --pin-file (mode 0600) or --pin-env; the PIN is never an argument and never shown. "
        "Exit codes: 64 bad arguments, 65 unreadable CSR or bad CSR signature, 73 output (or token key label) "
        "exists or cannot be written, 78 unusable key, CA key or CA certificate, or a token problem (module, "
        "token, PIN, missing key). Nothing is written on any error.",
    )
    factory.set_defaults(handler=_factory_usage, factory_parser=factory)
    steps = factory.add_subparsers(dest="factory_command", metavar="STEP")

    keygen = steps.add_parser(
        "keygen", help="write a new private key (PEM, mode 0600), or make one in a PKCS#11 token",
        description="Write a new private key, PKCS#8 PEM, mode 0600 from its first byte (--out), or make a key "
        "pair inside a PKCS#11 token (--key pkcs11:...), the private key SENSITIVE and not EXTRACTABLE: it never "
        "leaves the token. An existing file, or a token key with the same label, is never overwritten (exit 73).",
    )  # fmt: skip
    keygen.add_argument("--out", type=Path, metavar="KEY", help="the key file to create (or --key)")
    keygen.add_argument(
        "--key", metavar="URI", help=f"the token key to create instead of a file: {_KEY_URI} (id=%%01 optional)"
    )
    keygen.add_argument(
        "--key-type", default="ec-p256", metavar="TYPE",
        help="ec-p256 (default), ec-p384, rsa-2048 or rsa-3072",
    )  # fmt: skip
    _add_token_options(keygen)
    keygen.set_defaults(handler=_factory_keygen)

    csr = steps.add_parser(
        "csr", help="write a CSR signed by a key file or a PKCS#11 token key, with the subject fields JITP "
        "templates read",
        description="Write a PEM certificate signing request (SHA-256) signed by KEY, a key file or a key in a "
        "PKCS#11 token (which signs inside the token). The subject fields are those AWS IoT JITP templates read "
        "as AWS::IoT::Certificate::<field>, encoded alike for both kinds of key. Exit 64 for a bad value or a "
        "token key without --pkcs11-library or a PIN source, 78 if KEY is unusable (or the token, its PIN or "
        "the key label is wrong), 73 if OUT exists.",
    )  # fmt: skip
    csr.add_argument(
        "--key", required=True, metavar="KEY",
        help=f"the private key: a file (PEM or DER) or a key in a PKCS#11 token, {_KEY_URI}",
    )  # fmt: skip
    csr.add_argument("--out", type=Path, required=True, metavar="CSR", help="the CSR file to create")
    csr.add_argument("--cn", required=True, metavar="NAME", help="CommonName")
    csr.add_argument("--country", metavar="C", help="Country: exactly 2 letters (ISO 3166)")
    csr.add_argument("--organization", metavar="O", help="Organization")
    csr.add_argument("--organizational-unit", metavar="OU", help="OrganizationalUnit")
    csr.add_argument("--state", metavar="ST", help="StateName (stateOrProvinceName)")
    csr.add_argument("--serial-number", metavar="SN", help="SerialNumber (the subject attribute)")
    csr.add_argument("--dn-qualifier", metavar="Q", help="DistinguishedNameQualifier")
    _add_token_options(csr)
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


def _add_token_options(parser: argparse.ArgumentParser) -> None:
    token = parser.add_argument_group("key in a PKCS#11 token (with --key pkcs11:...)")
    token.add_argument(
        "--pkcs11-library", type=Path, metavar="LIB",
        help="the token's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so",
    )  # fmt: skip
    token.add_argument(
        "--pin-file", type=Path, metavar="FILE",
        help="a file (mode 0600, one line) holding the token's user PIN",
    )  # fmt: skip
    token.add_argument(
        "--pin-env", metavar="VAR",
        help="an environment variable holding the user PIN (instead of --pin-file)",
    )  # fmt: skip


def _factory_usage(args: argparse.Namespace) -> int:
    args.factory_parser.print_help(sys.stderr)
    return EX_USAGE


def _factory_keygen(args: argparse.Namespace) -> int:
    from fleetprov import factory

    if args.key is None:
        if args.out is None:
            raise UsageError("give --out KEY (a key file) or --key pkcs11:... (a key in a token)", step=factory.STEP)
        factory.no_token_options(args.pkcs11_library, args.pin_file, args.pin_env)
        factory.keygen(args.out, args.key_type)
        print(f"key: {args.out} ({args.key_type})")
        return EX_OK
    if args.out is not None:
        raise UsageError("give --out (a key file) or --key (a key in a token), not both", step=factory.STEP)
    if not factory.is_token_key(args.key):
        raise UsageError("keygen --key names a key in a PKCS#11 token (pkcs11:...); use --out for a key file",
                         step=factory.STEP)  # fmt: skip
    key = factory.token_key(args.key, args.pkcs11_library, args.pin_file, args.pin_env)
    reference = factory.token_keygen(key, args.key_type)
    print(f"key: {reference} ({args.key_type}, made in the token, not extractable)")
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
    if factory.is_token_key(args.key):
        factory.subject_name(subject)  # bad subject values first, as for a key file
        key = factory.token_key(args.key, args.pkcs11_library, args.pin_file, args.pin_env)
        request = factory.token_csr(key, args.out, subject)
        print(f"key: {key.uri}")
    else:
        factory.no_token_options(args.pkcs11_library, args.pin_file, args.pin_env)
        request = factory.csr(Path(args.key), args.out, subject)
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
