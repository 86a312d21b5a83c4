"""`fleetprov claim install`: hand this device a temporary claim (fleet provisioning by trusted user), as an
installer app does with what AWS CreateProvisioningClaim returned. fleetprov.claim_inbox does the work."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from fleetprov.errors import EX_OK, EX_USAGE, ConfigError


def add_claim_commands(commands: Any, config_option: argparse.ArgumentParser) -> None:
    """`fleetprov claim install`; ``config_option`` lets --config follow the command."""
    claim = commands.add_parser(
        "claim",
        help="trusted user: install a temporary claim certificate and key for fleetprov to provision with",
        description="Fleet provisioning by trusted user: give this device the temporary claim (certificate and "
        "private key) that AWS IoT CreateProvisioningClaim returned. Exit codes: 64 bad arguments, 65 files "
        "that are not a matching, currently valid certificate and unencrypted key, 73 the claim inbox cannot "
        "be written, 78 configuration error.",
    )  # fmt: skip
    claim.set_defaults(handler=_claim_usage, claim_parser=claim)
    steps = claim.add_subparsers(dest="claim_command", metavar="STEP")

    install = steps.add_parser(
        "install", parents=[config_option],
        help="make a certificate and its key the pending temporary claim (replacing any other)",
        description="Check that CERT and KEY are a PEM certificate and its unencrypted EC or RSA private key, "
        "valid now, and make them the one pending claim in the claim inbox (claim.inbox of the "
        "configuration) in one atomic step; a claim already pending is replaced. A running fleetprov "
        "provisions with it; it is removed after use and when it expires.",
    )  # fmt: skip
    install.add_argument("--certificate", type=Path, required=True, metavar="CERT", help="the claim certificate")
    install.add_argument("--key", type=Path, required=True, metavar="KEY", help="the claim's private key")
    install.set_defaults(handler=_claim_install)


def _claim_usage(args: argparse.Namespace) -> int:
    args.claim_parser.print_help(sys.stderr)
    return EX_USAGE


def _claim_install(args: argparse.Namespace) -> int:
    from fleetprov.claim_inbox import install_claim
    from fleetprov.cli import config_path
    from fleetprov.config import load_config

    path = config_path(args)
    config = load_config(path)
    inbox = config.claim.inbox if config.claim is not None else None
    if inbox is None:
        raise ConfigError(
            f"{path}: claim.inbox is not set: this device does not take temporary claims (see claim.inbox in "
            "configs/config.example.yaml)",
            step="config",
        )
    claim = install_claim(inbox, args.certificate, args.key, now=dt.datetime.now(dt.timezone.utc))
    print(
        f"installed temporary claim {claim.certificate_id[:12]} in {inbox}, valid until "
        f"{claim.not_after:%Y-%m-%dT%H:%M:%SZ}: a running fleetprov picks it up"
    )
    return EX_OK
