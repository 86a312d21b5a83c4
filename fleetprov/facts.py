"""Device facts for template parameters, and the claim session's default client id.

Facts are read from plain files under a root directory (``/`` on a device, a fake tree in tests), so
reading them needs no privileges and no extra packages. A fact that cannot be read is ``None`` here and
becomes an error only when the configuration asks for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .children import child_environment, run_child, shown
from .errors import EX_CONFIG, ConfigError, FleetprovError

log = logging.getLogger(__name__)

STEP = "parameters"

# Where each fact comes from, as named in error messages (paths as they are on the device).
FACT_SOURCES = {
    "serial": "/sys/firmware/devicetree/base/serial-number, /proc/device-tree/serial-number, "
    "the Serial line of /proc/cpuinfo",
    "machine_id": "/etc/machine-id",
    "mac": "/proc/net/route (default route) and /sys/class/net/<interface>/address",
    "hostname": "/etc/hostname or gethostname()",
}
FACT_NAMES = tuple(FACT_SOURCES)

# Every claim connection's MQTT client id starts with this, and the shipped claim policies allow iot:Connect on
# client/fleetprov.claim-* only: the claim key is on every device, so a claim allowed any client id could take a
# provisioned device's (its thing name) and make AWS drop that device. The "." is in no thing name (AWS IoT
# allows [a-zA-Z0-9:_-]), so no permanent client id that is a thing name can match the claim's pattern.
CLAIM_CLIENT_ID_PREFIX = "fleetprov.claim-"

_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_NO_MAC = "00:00:00:00:00:00"
# How errors name what json.loads returned, in JSON's own words.
_JSON_TYPE_NAMES = {
    list: "an array",
    dict: "an object",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class FactUnavailable(ConfigError):
    """A fact the configuration asks for cannot be read on this device; says which fact and what was tried."""


class ParameterCommandError(FleetprovError):
    """The parameter command could not run, failed, timed out or printed something other than a JSON object
    of strings."""

    exit_code = EX_CONFIG


@dataclass(frozen=True)
class DeviceFacts:
    serial: Optional[str]
    machine_id: Optional[str]
    mac: Optional[str]
    hostname: str

    def get(self, name: str) -> str:
        if name not in FACT_SOURCES:
            raise ConfigError(f"unknown device fact {name!r}; known facts: {', '.join(FACT_NAMES)}", step=STEP)
        value: Optional[str] = getattr(self, name)
        if not value:
            raise FactUnavailable(
                f"device fact {name!r} is not available on this device (looked at {FACT_SOURCES[name]})", step=STEP
            )
        return value


def read_facts(root: Path = Path("/")) -> DeviceFacts:
    return DeviceFacts(
        serial=_read_serial(root),
        machine_id=_read_machine_id(root),
        mac=_read_default_route_mac(root),
        # Tests point root at a fake tree; on a device the kernel's hostname is the truth, /etc/hostname may lag.
        hostname=(_read(root / "etc/hostname") or "").strip() if root != Path("/") else socket.gethostname().strip(),
    )


def default_claim_client_id(facts: DeviceFacts) -> str:
    # AWS drops the older of two connections with the same client id, so a fleet-wide constant would make
    # devices provisioning at the same time knock each other off. machine-id is confidential (machine-id(5)),
    # so only a hash of it leaves the device; the salt keeps this hash unlinkable to other uses of the id.
    for value in (facts.machine_id, facts.serial, facts.mac, facts.hostname):
        if value:
            return CLAIM_CLIENT_ID_PREFIX + hashlib.sha256(f"fleetprov-claim:{value}".encode()).hexdigest()[:20]
    raise FactUnavailable(
        "no device fact to derive the claim client id from (machine_id, serial, mac and hostname are all "
        "unavailable); set the claim client id in the configuration",
        step=STEP,
    )


async def template_parameters(
    static: Mapping[str, str],
    from_env: Mapping[str, str],
    facts_wanted: Mapping[str, str],
    command: Optional[Sequence[str]],
    command_timeout: float,
    *,
    environ: Mapping[str, str],
    facts: DeviceFacts,
) -> dict[str, str]:
    """Merge the template parameters; later sources win: static, environment, facts, command output."""
    parameters = dict(static)
    for parameter, variable in from_env.items():
        if variable not in environ:
            raise ConfigError(
                f"template parameter {parameter!r} comes from environment variable {variable!r}, which is not set",
                step=STEP,
            )
        parameters[parameter] = environ[variable]
    for parameter, fact in facts_wanted.items():
        try:
            parameters[parameter] = facts.get(fact)
        except FactUnavailable as exc:
            raise FactUnavailable(f"template parameter {parameter!r}: {exc.message}", step=STEP) from None
    if command:
        parameters.update(await _run_parameter_command(command, command_timeout, environ))
    # Names only: values may be secrets (serials, tokens) and logs leave the device.
    log.info("template parameters: %s", ", ".join(sorted(parameters)) or "(none)")
    return parameters


async def _run_parameter_command(command: Sequence[str], timeout: float, environ: Mapping[str, str]) -> dict[str, str]:
    """The command's JSON object; it runs with the allow-listed environment of fleetprov/children.py only (not
    the PIN's variable, not $CREDENTIALS_DIRECTORY, not fleetprov's own settings), in a process group of its
    own that is killed when it exits or at ``timeout``."""
    what = f"parameter command {command[0]!r}"
    try:
        result = await run_child(command, child_environment(environ), timeout)
    except OSError as exc:
        raise ParameterCommandError(f"{what} cannot be started: {exc.strerror or exc}", step=STEP) from None
    if result.timed_out:
        raise ParameterCommandError(f"{what} did not finish within {timeout:g} s", step=STEP)
    if result.status != 0:
        # Escaped and shortened: the message is logged and kept in last-run.json.
        stderr = shown(result.stderr)
        raise ParameterCommandError(
            f"{what} exited with status {result.status}" + (f": {stderr}" if stderr else ""), step=STEP
        )
    # The output is never quoted in errors: it may hold secrets.
    try:
        output = json.loads(result.stdout)
    except ValueError as exc:
        raise ParameterCommandError(f"{what} did not print JSON: {exc}", step=STEP) from None
    if not isinstance(output, dict):
        raise ParameterCommandError(
            f"{what} printed {_JSON_TYPE_NAMES[type(output)]}, expected a JSON object of strings", step=STEP
        )
    for key, value in output.items():
        if not isinstance(value, str):
            raise ParameterCommandError(
                f"{what} printed {_JSON_TYPE_NAMES[type(value)]} for {key!r}, expected a string", step=STEP
            )
    return output


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return None


def _usable_serial(text: Optional[str]) -> Optional[str]:
    # An all-zero serial is what boards without one report; sharing it would make devices look alike.
    serial = (text or "").replace("\0", "").strip()
    return serial if serial.strip("0") else None


def _read_serial(root: Path) -> Optional[str]:
    for path in ("sys/firmware/devicetree/base/serial-number", "proc/device-tree/serial-number"):
        serial = _usable_serial(_read(root / path))
        if serial:
            return serial
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Serial":
            return _usable_serial(value)
    return None


def _read_machine_id(root: Path) -> Optional[str]:
    # Anything else (e.g. "uninitialized" during first boot) is not an identity.
    machine_id = (_read(root / "etc/machine-id") or "").strip()
    return machine_id if _MACHINE_ID.fullmatch(machine_id) else None


def _read_default_route_mac(root: Path) -> Optional[str]:
    # /proc/net/route: a header line, then Iface Destination Gateway Flags RefCnt Use Metric Mask ... per route,
    # addresses in hex, metric in decimal. The default route has destination 0.0.0.0.
    default_routes = []
    for line in (_read(root / "proc/net/route") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 7 and fields[1] == "00000000" and fields[6].isdigit():
            default_routes.append((int(fields[6]), fields[0]))
    if not default_routes:
        return None
    _, interface = min(default_routes, key=lambda route: route[0])
    mac = (_read(root / "sys/class/net" / interface / "address") or "").strip().lower()
    return mac if _MAC.fullmatch(mac) and mac != _NO_MAC else None
