"""The emulator's settings: the YAML file given with ``--config``, then ``serve``'s flags on top.

Every key is documented in ``configs/emulator.example.yaml``. Unknown keys, wrong types and unreadable
files are errors that name the key and the file.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from fleetprov.emulator.ca import DEVICE_VALIDITY, device_validity_problem
from fleetprov.emulator.faults import OPERATIONS, FaultConfig, ForcedRejection
from fleetprov.errors import ConfigError, printable
from fleetprov.yamlread import YamlReader, load_yaml_mapping

DEFAULT_TEMPLATE_NAME = "fleetprov-demo"
DEFAULT_TEMPLATE_PATH = Path(__file__).parent / "data" / "demo-template.json"
DEFAULT_CERTIFICATE_VALIDITY = DEVICE_VALIDITY.total_seconds()  # 3650 days


@dataclass(frozen=True)
class TemplateSource:
    name: str
    path: Optional[Path] = None
    hook: Optional[tuple[str, ...]] = None
    hook_cwd: Optional[Path] = None  # the hook runs here: the YAML file's directory, or where serve started


@dataclass(frozen=True)
class EmulatorSettings:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    token_ttl: float = 3600.0
    certificate_validity: float = DEFAULT_CERTIFICATE_VALIDITY  # seconds; device certificates only
    region: str = "us-east-1"
    account: str = "123456789012"
    templates: tuple[TemplateSource, ...] = ()
    thing_groups: tuple[str, ...] = ()
    thing_types: tuple[str, ...] = ()
    billing_groups: tuple[str, ...] = ()
    policies: tuple[tuple[str, Path], ...] = ()  # (name, JSON file) of IoT policies templates refer to by name
    claim_templates: Optional[tuple[str, ...]] = None  # None: the claim may use every template
    faults: FaultConfig = field(default_factory=FaultConfig)
    cloudformation: Optional[Path] = None  # a CloudFormation template the emulator runs (cloudformation.py)
    cloudformation_parameters: tuple[tuple[str, str], ...] = ()  # its parameter values (name, value)


def load_settings(path: Optional[Path], state_dir: Path) -> EmulatorSettings:
    if path is None:
        return EmulatorSettings(state_dir=state_dir)
    return _parse(YamlReader(load_yaml_mapping(path), str(path)), state_dir, path.parent)


def _parse(top: YamlReader, state_dir: Path, base: Path) -> EmulatorSettings:
    top.check_keys(
        [
            "host", "port", "token_ttl", "certificate_validity", "region", "account", "templates", "thing_groups",
            "thing_types", "billing_groups", "claim_templates", "faults", "policies", "cloudformation",
        ]
    )  # fmt: skip
    port = top.get("port", int, 0)
    if not 0 <= port <= 65535:
        raise top.error("port", f"{port} is not a TCP port")
    token_ttl = top.number("token_ttl", 3600.0)
    if not (math.isfinite(token_ttl) and token_ttl > 0):
        raise top.error("token_ttl", "must be a positive number of seconds")
    certificate_validity = top.number("certificate_validity", DEFAULT_CERTIFICATE_VALIDITY)
    problem = device_validity_problem(certificate_validity)
    if problem is not None:
        raise top.error("certificate_validity", problem)
    cloudformation, parameters = _cloudformation(top, base)
    if cloudformation is not None and top.data.get("claim_templates") is not None:
        raise top.error("claim_templates", "the claim's policy comes from the cloudformation file: leave this out")
    return EmulatorSettings(
        state_dir=state_dir,
        host=top.get("host", str, "127.0.0.1"),
        port=port,
        token_ttl=token_ttl,
        certificate_validity=certificate_validity,
        region=top.get("region", str, "us-east-1"),
        account=_account(top),
        templates=_templates(top, base),
        thing_groups=top.strings("thing_groups") or (),
        thing_types=top.strings("thing_types") or (),
        billing_groups=top.strings("billing_groups") or (),
        policies=_policies(top, base),
        claim_templates=top.strings("claim_templates"),
        faults=_faults(top.child("faults"), base),
        cloudformation=cloudformation,
        cloudformation_parameters=parameters,
    )


def _cloudformation(top: YamlReader, base: Path) -> tuple[Optional[Path], tuple[tuple[str, str], ...]]:
    section = top.child("cloudformation")
    if section is None:
        return None, ()
    section.check_keys(["file", "parameters"])
    path_text = section.get("file", str)
    if path_text is None:
        raise section.error("file", "missing: the CloudFormation template to run")
    parameters = section.child("parameters")
    if parameters is None:
        return base / path_text, ()
    values = []
    for key, value in parameters.data.items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise parameters.error(str(key), "expected a string or a number (quote true and false)")
        values.append((str(key), str(value)))
    return base / path_text, tuple(values)


def _account(top: YamlReader) -> str:
    # YAML reads an unquoted 012345678901 as an octal number: only a quoted string keeps the id intact.
    if isinstance(top.data.get("account"), int):
        raise top.error("account", "expected a string, got int: quote the account id in YAML")
    account: str = top.get("account", str, "123456789012")
    if not (len(account) == 12 and account.isdigit()):
        raise top.error("account", f"{account!r} is not a 12-digit AWS account id (quote it in YAML)")
    return account


def _templates(top: YamlReader, base: Path) -> tuple[TemplateSource, ...]:
    section = top.child("templates")
    if section is None:
        return ()
    sources = []
    for key, value in section.data.items():
        name = str(key)
        if isinstance(value, str):
            sources.append(TemplateSource(name, base / value))
            continue
        if not isinstance(value, dict):
            raise section.error(name, "expected the template's JSON file, or a mapping with path and hook")
        entry = YamlReader(value, section.where, f"{section.prefix}{name}.")
        entry.check_keys(["path", "hook"])
        path_text = entry.get("path", str)
        if path_text is None:
            raise entry.error("path", "missing: the template's JSON file")
        hook = entry.get("hook", str)
        sources.append(
            TemplateSource(str(name), base / path_text, tuple(shlex.split(hook)) if hook else None, base.resolve())
        )
    return tuple(sources)


def _policies(top: YamlReader, base: Path) -> tuple[tuple[str, Path], ...]:
    section = top.child("policies")
    if section is None:
        return ()
    policies = []
    for key, value in section.data.items():
        if not isinstance(value, str):
            raise section.error(str(key), "expected the policy document's JSON file")
        policies.append((str(key), base / value))
    return tuple(policies)


def _faults(section: Optional[YamlReader], base: Path) -> FaultConfig:
    if section is None:
        return FaultConfig()
    section.check_keys(
        ["reply_delay", "close_after_messages", "throttle_per_second", "reject", "tamper", "reply_overrides_file"]
    )
    rejections = []
    for index, item in enumerate(section.get("reject", list, [])):
        if not isinstance(item, dict):
            raise section.error(f"reject[{index}]", "expected a mapping")
        entry = YamlReader(item, section.where, f"{section.prefix}reject[{index}].")
        entry.check_keys(["operation", "count", "status_code", "error_code", "error_message"])
        rejections.append(
            forced_rejection(
                entry.get("operation", str, ""),
                entry.get("count", int, 1),
                entry.get("status_code", int, 500),
                entry.get("error_code", str, "InternalFailure"),
                entry.get("error_message", str, "rejected by an emulator fault knob"),
                where=entry,
            )
        )
    faults = FaultConfig(
        reply_delay=section.number("reply_delay", 0.0),
        close_after_messages=section.get("close_after_messages", int),
        throttle_per_second=section.get("throttle_per_second", (int, float)),
        reject=tuple(rejections),
        tamper=section.strings("tamper") or (),
        reply_overrides_file=_optional_path(section.get("reply_overrides_file", str), base),
    )
    return checked_faults(faults, section.where)


def _optional_path(text: Optional[str], base: Path) -> Optional[Path]:
    return None if text is None else base / text


def checked_faults(faults: FaultConfig, where: str) -> FaultConfig:
    """Fault values in range; ``where`` names the file or the flags they came from."""
    reader = YamlReader({}, where, "faults.")
    if not (math.isfinite(faults.reply_delay) and faults.reply_delay >= 0):
        raise reader.error("reply_delay", "must be zero or a positive number of seconds")
    if faults.close_after_messages is not None and faults.close_after_messages < 0:
        raise reader.error("close_after_messages", "must be zero or more")
    if faults.throttle_per_second is not None and not faults.throttle_per_second > 0:
        raise reader.error("throttle_per_second", "must be a positive rate")
    for operation in faults.tamper:
        if operation not in OPERATIONS:
            raise reader.error("tamper", f"{operation!r} is not one of {', '.join(OPERATIONS)}")
    return faults


def forced_rejection(
    operation: str, count: int, status_code: int, error_code: str, error_message: str, *, where: YamlReader
) -> ForcedRejection:
    if operation not in OPERATIONS:
        raise where.error("operation", f"{operation!r} is not one of {', '.join(OPERATIONS)}")
    if count < 1:
        raise where.error("count", f"{count} is not a positive number of requests")
    if not 100 <= status_code <= 599:
        raise where.error("status_code", f"{status_code} is not an HTTP status code")
    return ForcedRejection(operation, count, status_code, error_code, error_message)


def parse_reject_flag(text: str) -> ForcedRejection:
    """``--reject OPERATION:COUNT:STATUS:ERROR_CODE``, e.g. ``RegisterThing:2:500:InternalFailure``."""
    parts = text.split(":")
    flag = YamlReader({}, "--reject", "")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        raise flag.error(text, "expected OPERATION:COUNT:STATUS:ERROR_CODE, e.g. RegisterThing:2:500:InternalFailure")
    return forced_rejection(parts[0], int(parts[1]), int(parts[2]), parts[3], "rejected by an emulator fault knob",
                            where=flag)  # fmt: skip


def with_flags(
    settings: EmulatorSettings,
    *,
    host: Optional[str],
    port: Optional[int],
    token_ttl: Optional[float],
    templates: Sequence[str],
    hooks: Sequence[str],
    reply_delay: Optional[float],
    close_after: Optional[int],
    throttle: Optional[float],
    rejects: Sequence[str],
    thing_groups: Sequence[str],
    tamper: Sequence[str] = (),
    reply_overrides: Optional[Path] = None,
    certificate_validity: Union[str, float, None] = None,
    cloudformation: Optional[Path] = None,
    parameters: Sequence[str] = (),
) -> EmulatorSettings:
    """Command-line flags win over the YAML file."""
    sources = {source.name: source for source in settings.templates}
    for text in templates:
        name, path = _name_value("--template", text)
        previous = sources.get(name, TemplateSource(name))
        sources[name] = replace(previous, path=Path(path))
    for text in hooks:
        name, command = _name_value("--hook", text)
        existing = sources.get(name, TemplateSource(name))
        sources[name] = replace(existing, hook=tuple(shlex.split(command)), hook_cwd=Path.cwd())
    faults = settings.faults
    faults = replace(
        faults,
        reply_delay=faults.reply_delay if reply_delay is None else reply_delay,
        close_after_messages=faults.close_after_messages if close_after is None else close_after,
        throttle_per_second=faults.throttle_per_second if throttle is None else throttle,
        reject=faults.reject + tuple(parse_reject_flag(text) for text in rejects),
        tamper=faults.tamper + tuple(tamper),
        reply_overrides_file=faults.reply_overrides_file if reply_overrides is None else reply_overrides,
    )
    faults = checked_faults(faults, "command line")
    if token_ttl is not None and not (math.isfinite(token_ttl) and token_ttl > 0):
        raise ConfigError(f"--token-ttl {token_ttl}: must be a positive number of seconds", step="config")
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: not a TCP port", step="config")
    validity = settings.certificate_validity if certificate_validity is None else _validity_flag(certificate_validity)
    stack_file = cloudformation or settings.cloudformation
    if parameters and stack_file is None:
        raise ConfigError("--parameter: gives a value to a parameter of --cloudformation FILE, and there is none",
                          step="config")  # fmt: skip
    if cloudformation is not None and settings.claim_templates is not None:
        raise ConfigError("--cloudformation: the claim's policy comes from the file, so claim_templates cannot be set",
                          step="config")  # fmt: skip
    # The YAML's parameters are for the YAML's file; another file on the command line starts without them.
    same_file = cloudformation is None or cloudformation == settings.cloudformation
    stack_parameters = dict(settings.cloudformation_parameters if same_file else ())
    stack_parameters.update(_parameter_flag(text) for text in parameters)
    return replace(
        settings,
        host=host or settings.host,
        port=settings.port if port is None else port,
        token_ttl=settings.token_ttl if token_ttl is None else token_ttl,
        certificate_validity=validity,
        templates=tuple(sources.values()),
        thing_groups=settings.thing_groups + tuple(thing_groups),
        faults=faults,
        cloudformation=stack_file,
        cloudformation_parameters=tuple(stack_parameters.items()),
    )


def _parameter_flag(text: str) -> tuple[str, str]:
    """``--parameter KEY=VALUE``; the value may be empty and may hold "=" (a PEM CSR does)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--parameter {printable(text, 40)}: expected KEY=VALUE", step="config")
    return name, value


def _validity_flag(value: Union[str, float]) -> float:
    """``--certificate-validity SECONDS``: argparse hands over the text, so that "abc" is a configuration
    error (exit 78) like any other bad value rather than a usage error."""
    shown = printable(str(value))
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"--certificate-validity {shown}: not a number of seconds", step="config") from None
    problem = device_validity_problem(seconds)
    if problem is not None:
        raise ConfigError(f"--certificate-validity {shown}: {problem}", step="config")
    return seconds


def _name_value(flag: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ConfigError(f"{flag} {text!r}: expected NAME=VALUE", step="config")
    return name, value
