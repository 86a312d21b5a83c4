"""Device facts read from fake Raspberry Pi / PC / container roots, the claim client id, and the merge of
template parameters (including a real parameter command run with this interpreter)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetprov.errors import EX_CONFIG, ConfigError
from fleetprov.facts import (
    DeviceFacts,
    FactUnavailable,
    ParameterCommandError,
    default_claim_client_id,
    read_facts,
    template_parameters,
)

MACHINE_ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\t\t\n"
# wlan0 default (metric 600), eth0 default (metric 100), eth0 local subnet 192.168.1.0/24.
ROUTES_TWO_DEFAULTS = (
    ROUTE_HEADER
    + "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\t\t\n"
    + "eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\t\t\n"
    + "eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\t\t\n"
)
ROUTES_NO_DEFAULT = ROUTE_HEADER + "eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\t\t\n"

PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41

Hardware\t: BCM2835
Revision\t: c03111
Serial\t\t: 10000000c0ffee42
Model\t\t: Raspberry Pi 4 Model B Rev 1.1
"""


def write(root: Path, relative: str, content: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def facts(
    serial: str | None = None, machine_id: str | None = None, mac: str | None = None, hostname: str = "gw-1"
) -> DeviceFacts:
    return DeviceFacts(serial=serial, machine_id=machine_id, mac=mac, hostname=hostname)


# --- read_facts on fake roots ------------------------------------------------------------------------


def test_raspberry_pi_with_device_tree(tmp_path: Path) -> None:
    write(tmp_path, "sys/firmware/devicetree/base/serial-number", b"10000000c0ffee42\x00")
    write(tmp_path, "proc/device-tree/serial-number", b"ignored\x00")
    write(tmp_path, "proc/cpuinfo", PI_CPUINFO.replace("10000000c0ffee42", "20000000aaaaaaaa"))
    write(tmp_path, "etc/machine-id", MACHINE_ID + "\n")
    write(tmp_path, "etc/hostname", "raspberrypi\n")
    write(tmp_path, "proc/net/route", ROUTES_TWO_DEFAULTS)
    write(tmp_path, "sys/class/net/eth0/address", "DC:A6:32:01:02:03\n")
    write(tmp_path, "sys/class/net/wlan0/address", "dc:a6:32:0a:0b:0c\n")

    assert read_facts(tmp_path) == DeviceFacts(
        serial="10000000c0ffee42", machine_id=MACHINE_ID, mac="dc:a6:32:01:02:03", hostname="raspberrypi"
    )


def test_serial_from_proc_device_tree_when_sysfs_missing(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/serial-number", b" 00000000deadbeef\x00\n")
    assert read_facts(tmp_path).serial == "00000000deadbeef"


def test_raspberry_pi_with_only_cpuinfo_serial(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", PI_CPUINFO)
    assert read_facts(tmp_path).serial == "10000000c0ffee42"


def test_all_zero_cpuinfo_serial_is_no_serial(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", PI_CPUINFO.replace("10000000c0ffee42", "0000000000000000"))
    assert read_facts(tmp_path).serial is None


def test_pc_without_serial(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core\n")
    assert read_facts(tmp_path).serial is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (MACHINE_ID + "\n", MACHINE_ID),
        ("uninitialized\n", None),  # systemd first boot
        (MACHINE_ID[:31] + "\n", None),
        (MACHINE_ID.upper() + "\n", None),
        ("", None),
    ],
)
def test_machine_id(tmp_path: Path, content: str, expected: str | None) -> None:
    write(tmp_path, "etc/machine-id", content)
    assert read_facts(tmp_path).machine_id == expected


def test_missing_machine_id(tmp_path: Path) -> None:
    assert read_facts(tmp_path).machine_id is None


def test_mac_of_lowest_metric_default_route(tmp_path: Path) -> None:
    write(tmp_path, "proc/net/route", ROUTES_TWO_DEFAULTS)
    write(tmp_path, "sys/class/net/eth0/address", "dc:a6:32:01:02:03\n")
    write(tmp_path, "sys/class/net/wlan0/address", "dc:a6:32:0a:0b:0c\n")
    assert read_facts(tmp_path).mac == "dc:a6:32:01:02:03"


def test_no_default_route_means_no_mac(tmp_path: Path) -> None:
    write(tmp_path, "proc/net/route", ROUTES_NO_DEFAULT)
    write(tmp_path, "sys/class/net/eth0/address", "dc:a6:32:01:02:03\n")
    assert read_facts(tmp_path).mac is None


def test_default_route_without_usable_address(tmp_path: Path) -> None:
    # A tunnel as default route (WireGuard, PPP) has no Ethernet address.
    write(tmp_path, "proc/net/route", ROUTE_HEADER + "wg0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert read_facts(tmp_path).mac is None
    write(tmp_path, "sys/class/net/wg0/address", "00:00:00:00:00:00\n")
    assert read_facts(tmp_path).mac is None


def test_empty_container_root(tmp_path: Path) -> None:
    write(tmp_path, "etc/hostname", "  3f2a9c1b7d0e \n")
    assert read_facts(tmp_path) == DeviceFacts(serial=None, machine_id=None, mac=None, hostname="3f2a9c1b7d0e")


def test_real_facts_of_this_machine() -> None:
    real = read_facts()
    assert real.hostname != ""
    assert real.hostname == real.hostname.strip()
    assert real.get("hostname") == real.hostname
    assert default_claim_client_id(real).startswith("fleetprov.claim-")


# --- DeviceFacts.get ---------------------------------------------------------------------------------


def test_get_returns_available_fact() -> None:
    assert facts(serial="10000000c0ffee42").get("serial") == "10000000c0ffee42"


@pytest.mark.parametrize(
    ("name", "looked_at"),
    [("serial", "/proc/cpuinfo"), ("machine_id", "/etc/machine-id"), ("mac", "/proc/net/route")],
)
def test_get_missing_fact_names_fact_and_files(name: str, looked_at: str) -> None:
    with pytest.raises(FactUnavailable) as caught:
        facts().get(name)
    assert f"'{name}'" in str(caught.value)
    assert looked_at in str(caught.value)
    assert caught.value.exit_code == EX_CONFIG
    assert caught.value.step == "parameters"


def test_get_unknown_fact_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown device fact 'uuid'; known facts: serial, machine_id, mac"):
        facts().get("uuid")


# --- default_claim_client_id -------------------------------------------------------------------------


def expected_id(value: str) -> str:
    return "fleetprov.claim-" + hashlib.sha256(f"fleetprov-claim:{value}".encode()).hexdigest()[:20]


def test_claim_client_id_is_stable_and_hides_machine_id() -> None:
    device = facts(serial="10000000c0ffee42", machine_id=MACHINE_ID, mac="dc:a6:32:01:02:03")
    client_id = default_claim_client_id(device)
    assert client_id == expected_id(MACHINE_ID)
    assert client_id == default_claim_client_id(facts(machine_id=MACHINE_ID, hostname="renamed"))
    assert MACHINE_ID not in client_id
    assert MACHINE_ID[:20] not in client_id
    assert len(client_id) == 36 < 64


def test_claim_client_id_differs_between_devices() -> None:
    first = default_claim_client_id(facts(machine_id=MACHINE_ID))
    second = default_claim_client_id(facts(machine_id="0123456789abcdef0123456789abcdef"))
    assert first != second


def test_claim_client_id_falls_back_through_the_chain() -> None:
    assert default_claim_client_id(facts(serial="1000", mac="dc:a6:32:01:02:03")) == expected_id("1000")
    assert default_claim_client_id(facts(mac="dc:a6:32:01:02:03")) == expected_id("dc:a6:32:01:02:03")
    assert default_claim_client_id(facts(hostname="gw-7")) == expected_id("gw-7")


def test_claim_client_id_without_any_fact() -> None:
    with pytest.raises(FactUnavailable, match="set the claim client id in the configuration"):
        default_claim_client_id(facts(hostname=""))


# --- template_parameters -----------------------------------------------------------------------------


def parameters_of(*arguments: Any, **keywords: Any) -> dict[str, str]:
    return asyncio.run(template_parameters(*arguments, **keywords))


DEVICE = facts(serial="10000000c0ffee42", machine_id=MACHINE_ID, mac="dc:a6:32:01:02:03")


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "params.py"
    path.write_text("import sys, time\n" + body + "\n")
    return [sys.executable, str(path)]


def test_precedence_static_env_facts_command(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    command = script(tmp_path, 'print(\'{"Site": "from-command", "Batch": "b-7"}\')')
    with caplog.at_level(logging.INFO, logger="fleetprov.facts"):
        result = parameters_of(
            {"Site": "static", "Model": "static", "SerialNumber": "static", "Owner": "static"},
            {"Site": "SITE", "Model": "MODEL"},
            {"SerialNumber": "serial", "Model": "mac"},
            command,
            10,
            environ={"SITE": "from-env", "MODEL": ""},
            facts=DEVICE,
        )
    assert result == {
        "Site": "from-command",
        "Model": "dc:a6:32:01:02:03",
        "SerialNumber": "10000000c0ffee42",
        "Owner": "static",
        "Batch": "b-7",
    }
    assert "Batch, Model, Owner, SerialNumber, Site" in caplog.text
    for value in ("from-command", "10000000c0ffee42", "dc:a6:32:01:02:03", "b-7"):
        assert value not in caplog.text


def test_empty_environment_variable_counts_as_set() -> None:
    result = parameters_of({}, {"Site": "SITE"}, {}, None, 1, environ={"SITE": ""}, facts=DEVICE)
    assert result == {"Site": ""}


def test_missing_environment_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        parameters_of({}, {"Site": "FLEET_SITE"}, {}, None, 1, environ={}, facts=DEVICE)
    assert str(caught.value) == (
        "parameters: template parameter 'Site' comes from environment variable 'FLEET_SITE', which is not set"
    )
    assert caught.value.exit_code == EX_CONFIG


def test_unavailable_fact_names_parameter_and_fact() -> None:
    with pytest.raises(FactUnavailable) as caught:
        parameters_of({}, {}, {"Id": "machine_id"}, None, 1, environ={}, facts=facts())
    assert str(caught.value) == (
        "parameters: template parameter 'Id': device fact 'machine_id' is not available on this device "
        "(looked at /etc/machine-id)"
    )
    assert caught.value.exit_code == EX_CONFIG


def test_command_runs_with_stdin_closed(tmp_path: Path) -> None:
    command = script(tmp_path, 'import json; print(json.dumps({"Stdin": repr(sys.stdin.read())}))')
    result = parameters_of({}, {}, {}, command, 10, environ={}, facts=DEVICE)
    assert result == {"Stdin": "''"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            'sys.stderr.write("x" * 400 + "no badge reader found\\n"); sys.exit(3)',
            "exited with status 3: ..." + "x" * 279 + "no badge reader found",
        ),
        (  # escaped: the message is logged and kept in last-run.json
            'sys.stderr.write("no reader\\n\\x1b[2Jcommit: ok\\n"); sys.exit(2)',
            "exited with status 2: no reader\\n\\x1b[2Jcommit: ok",
        ),
        ("sys.exit(1)", "exited with status 1"),
        ('print("Site=lab")', "did not print JSON: Expecting value: line 1 column 1 (char 0)"),
        ('print("[1, 2]")', "printed an array, expected a JSON object of strings"),
        ('print(\'{"Site": "lab", "Floor": 3}\')', "printed a number for 'Floor', expected a string"),
        ("print('\"lab\"')", "printed a string, expected a JSON object of strings"),
        ("print('{\"Site\": null}')", "printed null for 'Site', expected a string"),
        ("time.sleep(30)", "did not finish within 0.5 s"),
    ],
)
def test_command_failures(tmp_path: Path, body: str, message: str) -> None:
    command = script(tmp_path, body)
    with pytest.raises(ParameterCommandError) as caught:
        parameters_of({"Site": "static"}, {}, {}, command, 0.5, environ={}, facts=DEVICE)
    assert str(caught.value) == f"parameters: parameter command {sys.executable!r} {message}"
    assert caught.value.exit_code == EX_CONFIG == 78


def test_command_output_is_never_quoted_in_errors(tmp_path: Path) -> None:
    command = script(tmp_path, 'print("secret-token-123")')
    with pytest.raises(ParameterCommandError) as caught:
        parameters_of({}, {}, {}, command, 10, environ={}, facts=DEVICE)
    assert "secret-token-123" not in str(caught.value)


def test_missing_executable(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-command")
    with pytest.raises(ParameterCommandError) as caught:
        parameters_of({}, {}, {}, [missing], 1, environ={}, facts=DEVICE)
    assert (
        str(caught.value) == f"parameters: parameter command {missing!r} cannot be started: No such file or directory"
    )
    assert caught.value.exit_code == 78
