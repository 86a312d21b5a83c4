"""Command line: parse arguments, run a sub-command, turn errors into exit codes (see README)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from fleetprov import __version__
from fleetprov.errors import EX_USAGE, FleetprovError

log = logging.getLogger("fleetprov")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetprov", description="Give this device its permanent AWS IoT identity and keep it."
    )
    parser.add_argument("--version", action="version", version=f"fleetprov {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    emulator = commands.add_parser("emulator", help="local emulator of the AWS IoT fleet-provisioning endpoint")
    from fleetprov.emulator.cli import add_emulator_commands

    add_emulator_commands(emulator)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.verbose is False:
        # amqtt logs every connection at INFO; keep our own messages readable.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("fleetprov: error: a command is required", file=sys.stderr)
        return EX_USAGE
    try:
        result: int = args.handler(args)
        return result
    except FleetprovError as exc:
        print(f"fleetprov: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
