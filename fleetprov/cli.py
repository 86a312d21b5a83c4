"""Command line: parse arguments, run a sub-command, turn errors into exit codes (see README.md "Exit codes").

fleetprov [run] [--config PATH]         the daemon: provision if needed, then stay connected (fleetprov.service)
fleetprov --once [--config PATH]        provision if needed, verify by connecting, exit
fleetprov reprovision                   provision anew with the claim; the old identity stays for rollback
fleetprov rollback                      make the previous generation current again
fleetprov status [--json]               what this device's identity is, and how the last run ended
fleetprov check-config                  the effective configuration, secrets redacted
fleetprov emulator ...                  the local AWS IoT emulator
fleetprov factory keygen|csr|sign ...   factory-line helpers: device key, CSR, lab-CA-signed certificate
fleetprov claim install ...             trusted user: hand this device a temporary claim
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from fleetprov import __version__
from fleetprov.claim_cli import add_claim_commands
from fleetprov.errors import EX_OK, EX_USAGE, ConfigError, FleetprovError
from fleetprov.factory_cli import add_factory_commands
from fleetprov.hardening import harden_process
from fleetprov.selfexec import python_command

log = logging.getLogger("fleetprov")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetprov", description="Give this device its permanent AWS IoT identity and keep it."
    )
    parser.add_argument("--version", action="version", version=f"fleetprov {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--config", type=Path, help="configuration file (default: $FLEETPROV_CONFIG or /etc/fleetprov/config.yaml)"
    )
    parser.add_argument("--once", action="store_true", help="provision if needed, verify by connecting, exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    # `--config` is accepted after the command too ("fleetprov status --config X"); SUPPRESS keeps a value
    # given before the command.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="configuration file")

    run = commands.add_parser(
        "run",
        parents=[config_option],
        help="the daemon: provision if needed, then stay connected; SIGHUP reloads, SIGTERM stops (the default)",
    )
    run.set_defaults(handler=_run)

    reprovision = commands.add_parser(
        "reprovision",
        parents=[config_option],
        help="provision anew with the claim although there is an identity (the old one stays for rollback)",
    )
    reprovision.set_defaults(handler=_reprovision)

    rollback = commands.add_parser(
        "rollback",
        parents=[config_option],
        help="make the generation before the current one current again (restart fleetprov.service afterwards)",
    )
    rollback.set_defaults(handler=_rollback)

    status = commands.add_parser(
        "status", parents=[config_option], help="show this device's identity and the last run's outcome"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    check = commands.add_parser(
        "check-config", parents=[config_option], help="print the effective configuration, secrets redacted"
    )
    check.set_defaults(handler=_check_config)

    # The emulator's own parser is built only when it runs: `--once` on a device should not pay for it.
    emulator = commands.add_parser(
        "emulator", add_help=False, help="local emulator of the AWS IoT fleet-provisioning endpoint"
    )
    emulator.set_defaults(handler=_emulator)
    add_factory_commands(commands)
    add_claim_commands(commands, config_option)
    return parser


def _emulator(args: argparse.Namespace) -> int:
    try:
        from fleetprov.emulator.cli import add_emulator_commands
    except ImportError as exc:  # the device package has no emulator
        raise ConfigError(
            f"the emulator is not installed here ({exc.name} is missing): pip install 'fleetprov[emulator]'",
            step="emulator",
        ) from None

    parser = argparse.ArgumentParser(
        prog="fleetprov emulator", description="Local emulator of the AWS IoT fleet-provisioning endpoint."
    )
    add_emulator_commands(parser)
    emulator_args = parser.parse_args(args.rest)
    result: int = emulator_args.handler(emulator_args)
    return result


def _setup_logging(verbose: bool) -> None:
    if sys.stderr.isatty():
        fmt = "%(message)s"  # a person is watching: progress lines, no timestamps
    elif os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(message)s"  # journald stamps each line itself
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    if not verbose:
        # amqtt and transitions log every connection at INFO; keep fleetprov's own lines readable.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)


def config_path(args: argparse.Namespace) -> Path:
    from fleetprov.config import DEFAULT_CONFIG_PATH

    if args.config is not None:
        return Path(args.config)
    return Path(os.environ.get("FLEETPROV_CONFIG") or DEFAULT_CONFIG_PATH)


def _load_config(args: argparse.Namespace) -> Any:
    from fleetprov.config import load_config

    config = load_config(config_path(args))
    if not args.verbose:
        logging.getLogger().setLevel(config.log_level.upper())
    return config


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from fleetprov.daemon import run

    _load_config(args)  # a bad configuration fails at once, before anything starts
    verbose = ["--verbose"] if args.verbose else []
    reprovision = python_command(
        "-m", "fleetprov", *verbose, "--config", str(config_path(args).absolute()), "reprovision"
    )
    result: int = asyncio.run(run(lambda: _load_config(args), os.environ, reprovision))
    return result


def _once(args: argparse.Namespace) -> int:
    from fleetprov.agent import once

    return _provision(args, once)


def _reprovision(args: argparse.Namespace) -> int:
    from fleetprov.agent import reprovision

    return _provision(args, reprovision)


def _provision(args: argparse.Namespace, how: Callable[[Any], Coroutine[Any, Any, Any]]) -> int:
    import asyncio

    from fleetprov.agent import record_last_run

    config = _load_config(args)
    try:
        outcome = asyncio.run(how(config))
    except FleetprovError as exc:
        record_last_run(config.state_dir, exc.exit_code, exc)
        raise
    record_last_run(config.state_dir, EX_OK, None, outcome.abandoned)
    generation = outcome.generation
    for certificate_id in outcome.abandoned:
        print(f"abandoned: certificate {certificate_id} was issued to this device but not used")
    verb = "provisioned" if outcome.provisioned else "already provisioned; verified"
    print(f"{verb}: thing {generation.manifest.thing_name}, certificate {generation.manifest.certificate_id}")
    print(f"credentials: {config.state_dir / 'current'} -> {generation.path}")
    return EX_OK


def _rollback(args: argparse.Namespace) -> int:
    from fleetprov.agent import rollback

    was, now = rollback(_load_config(args))
    print(f"rolled back: generation {was.number} (certificate {was.manifest.certificate_id}) -> generation "
          f"{now.number} (thing {now.manifest.thing_name}, certificate {now.manifest.certificate_id})")  # fmt: skip
    print("restart fleetprov.service to connect with it")
    return EX_OK


def _status(args: argparse.Namespace) -> int:
    from fleetprov.agent import read_last_run, read_token_keys
    from fleetprov.jit import read_activation
    from fleetprov.store import Store

    config = _load_config(args)
    store = Store(config.state_dir)
    current = store.current() if config.state_dir.is_dir() else None
    status: dict[str, Any] = {"provisioned": current is not None, "state_dir": str(config.state_dir)}
    if current is not None:
        manifest = current.manifest
        status.update(
            thing_name=manifest.thing_name,
            certificate_id=manifest.certificate_id,
            not_after=manifest.not_after,
            endpoint=manifest.endpoint,
            key_backend=manifest.key_reference.split(":", 1)[0],
            key_reference=manifest.key_reference,
            generation=current.number,
            provisioned_at=manifest.provisioned_at,
        )
    status["way_in"] = "jit" if config.jit else "trusted-user" if config.required_claim().inbox else "claim"
    status["waiting_for_activation"] = read_activation(config.state_dir)  # JITP/JITR, until ACTIVE
    status["last_run"] = read_last_run(config.state_dir)
    status["pruned_token_keys"] = read_token_keys(config.state_dir)  # of removed generations: deleted or not
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        for key, value in status.items():
            shown = value
            if key in ("last_run", "waiting_for_activation", "pruned_token_keys") and isinstance(value, dict):
                shown = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
            print(f"{key.replace('_', ' ')}: {shown if shown is not None else '-'}")
    return EX_OK


def _check_config(args: argparse.Namespace) -> int:
    from fleetprov.config import render_config

    sys.stdout.write(render_config(_load_config(args)))
    return EX_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    harden_process()  # first: before anything reads the PIN, the proxy password or a key
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "emulator" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    _setup_logging(args.verbose)
    if args.once and args.command is not None:
        parser.print_usage(sys.stderr)
        print("fleetprov: error: --once runs on its own, without a command", file=sys.stderr)
        return EX_USAGE
    if args.once:
        handler = _once
    elif args.command is not None:
        handler = args.handler
    else:
        handler = _run
    try:
        result: int = handler(args)
        return result
    except FleetprovError as exc:
        print(f"fleetprov: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
