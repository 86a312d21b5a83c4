"""Tests for fleetprov.emulator.hooks: pre-provisioning hooks run as commands, JSON in and out."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetprov.emulator.hooks import HOOK_TIMEOUT_SECONDS, HookDecision, parse_hook_output, run_hook

HOOK_INPUT = {
    "claimCertificateId": "claim-id",
    "certificateId": "cert-id",
    "certificatePem": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
    "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/demo",
    "clientId": "device-1",
    "parameters": {"SerialNumber": "0001"},
}


def write_hook(tmp_path: Path, body: str, name: str = "hook.py") -> list[str]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def run(command: list[str], hook_input: Any = HOOK_INPUT, **kwargs: Any) -> HookDecision:
    return asyncio.run(run_hook(command, hook_input, **kwargs))


# --- parse_hook_output ---------------------------------------------------------------------------


@pytest.mark.parametrize("allow", [True, "true"])
def test_parse_allows_true_and_the_string_true(allow: Any) -> None:
    decision = parse_hook_output(json.dumps({"allowProvisioning": allow}).encode())
    assert decision == HookDecision(True, "", {})


def test_parse_returns_overrides() -> None:
    output = {"allowProvisioning": True, "parameterOverrides": {"DeviceLocation": "Seattle"}}
    assert parse_hook_output(json.dumps(output).encode()) == HookDecision(True, "", {"DeviceLocation": "Seattle"})


@pytest.mark.parametrize(
    "output",
    [
        {"allowProvisioning": False},
        {"allowProvisioning": "false"},
        {"allowProvisioning": "True"},
        {"allowProvisioning": 1},
        {"allowProvisioning": None},
        {"parameterOverrides": {"a": "b"}},
        {},
    ],
    ids=["false", "string-false", "string-True", "one", "null", "missing-with-overrides", "missing"],
)
def test_parse_denies_anything_but_true(output: dict[str, Any]) -> None:
    decision = parse_hook_output(json.dumps(output).encode())
    assert decision == HookDecision(False, "pre-provisioning hook denied provisioning", {})


@pytest.mark.parametrize("output", [b"[true]", b'"allowProvisioning"', b"true", b"null"])
def test_parse_denies_non_object_output(output: bytes) -> None:
    assert parse_hook_output(output) == HookDecision(False, "pre-provisioning hook output is not a JSON object")


@pytest.mark.parametrize("output", [b"", b"allow", b"{allowProvisioning: true}", b"\xff\xfe"])
def test_parse_denies_invalid_json(output: bytes) -> None:
    assert parse_hook_output(output) == HookDecision(False, "pre-provisioning hook printed no valid JSON")


@pytest.mark.parametrize(
    "overrides",
    [{"Count": 3}, {"Flag": True}, {"Nested": {"a": "b"}}, {"Null": None}, ["a", "b"], "Seattle"],
    ids=["int", "bool", "object", "null-value", "list", "string"],
)
def test_parse_denies_overrides_that_are_not_strings(overrides: Any) -> None:
    decision = parse_hook_output(json.dumps({"allowProvisioning": True, "parameterOverrides": overrides}).encode())
    assert decision == HookDecision(False, "pre-provisioning hook parameterOverrides is not an object of strings")


def test_parse_treats_null_overrides_as_none() -> None:
    decision = parse_hook_output(b'{"allowProvisioning": true, "parameterOverrides": null}')
    assert decision == HookDecision(True, "", {})


def test_timeout_default_is_the_documented_five_seconds() -> None:
    assert HOOK_TIMEOUT_SECONDS == 5.0


# --- run_hook with real processes ----------------------------------------------------------------


def test_run_hook_allows_with_overrides_built_from_its_input(tmp_path: Path) -> None:
    command = write_hook(
        tmp_path,
        """
        import json, sys
        event = json.load(sys.stdin)
        print(json.dumps({
            "allowProvisioning": True,
            "parameterOverrides": {
                "EchoSerial": event["parameters"]["SerialNumber"],
                "EchoClient": event["clientId"],
                "Keys": ",".join(sorted(event)),
            },
        }))
        """,
    )
    decision = run(command)
    assert decision == HookDecision(
        True,
        "",
        {
            "EchoSerial": "0001",
            "EchoClient": "device-1",
            "Keys": "certificateId,certificatePem,claimCertificateId,clientId,parameters,templateArn",
        },
    )


def test_run_hook_sends_the_input_as_json_on_stdin(tmp_path: Path) -> None:
    received = tmp_path / "received.json"
    command = write_hook(
        tmp_path,
        f"""
        import sys
        data = sys.stdin.buffer.read()
        open({str(received)!r}, "wb").write(data)
        print('{{"allowProvisioning": "true"}}')
        """,
    )
    assert run(command).allowed is True
    assert json.loads(received.read_bytes()) == HOOK_INPUT


def test_run_hook_deny(tmp_path: Path) -> None:
    command = write_hook(tmp_path, 'print(\'{"allowProvisioning": false, "parameterOverrides": {"a": "b"}}\')')
    assert run(command) == HookDecision(False, "pre-provisioning hook denied provisioning", {})


def test_run_hook_nonzero_exit_denies_even_with_allow_output(tmp_path: Path) -> None:
    command = write_hook(
        tmp_path,
        """
        import sys
        print('{"allowProvisioning": true}')
        sys.stderr.write("database unreachable")
        sys.exit(3)
        """,
    )
    assert run(command) == HookDecision(False, "pre-provisioning hook failed (exit status 3)")


def test_run_hook_killed_by_signal_denies(tmp_path: Path) -> None:
    command = write_hook(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert run(command) == HookDecision(False, "pre-provisioning hook failed (exit status -9)")


def test_run_hook_timeout_denies_and_kills_the_hook(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    command = write_hook(
        tmp_path,
        f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(5)
        print('{{"allowProvisioning": true}}')
        """,
    )
    decision = run(command, timeout=0.5)
    assert decision == HookDecision(False, "pre-provisioning hook did not answer within 0.5 s")
    assert "within" in decision.reason
    if pid_file.exists():  # on a very slow machine the hook may be killed before it writes its pid
        with pytest.raises(ProcessLookupError):  # killed and reaped, not left sleeping
            os.kill(int(pid_file.read_text()), 0)


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("print('hello')", "pre-provisioning hook printed no valid JSON"),
        ("print('[1, 2]')", "pre-provisioning hook output is not a JSON object"),
        ("import sys; sys.stdout.buffer.write(b'\\xff\\xfe')", "pre-provisioning hook printed no valid JSON"),
        ("pass", "pre-provisioning hook printed no valid JSON"),
        (
            'print(\'{"allowProvisioning": true, "parameterOverrides": {"n": 1}}\')',
            "pre-provisioning hook parameterOverrides is not an object of strings",
        ),
    ],
    ids=["text", "list", "binary", "silent", "ill-typed-overrides"],
)
def test_run_hook_garbage_output_denies(tmp_path: Path, output: str, reason: str) -> None:
    assert run(write_hook(tmp_path, output)) == HookDecision(False, reason)


def test_run_hook_output_too_large_denies(tmp_path: Path) -> None:
    # A valid object padded beyond the 64 KiB read limit is cut short, so it no longer parses.
    command = write_hook(tmp_path, "print('{\"allowProvisioning\": true, \"pad\": \"' + 'x' * 70000 + '\"}')")
    assert run(command) == HookDecision(False, "pre-provisioning hook printed no valid JSON")


def test_run_hook_that_ignores_stdin_still_works(tmp_path: Path) -> None:
    command = write_hook(tmp_path, "print('{\"allowProvisioning\": true}')")
    big_input = {**HOOK_INPUT, "parameters": {f"k{i}": "v" * 100 for i in range(2000)}}
    assert run(command, big_input) == HookDecision(True, "", {})


def test_run_hook_runs_in_cwd(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "allow.py").write_text(
        "import json, os\nprint(json.dumps({'allowProvisioning': True, 'parameterOverrides': {'Cwd': os.getcwd()}}))\n"
    )
    # A relative script path resolves in cwd, not in the emulator's working directory.
    decision = run([sys.executable, "hooks/allow.py"], cwd=str(tmp_path))
    assert decision == HookDecision(True, "", {"Cwd": str(tmp_path)})


def test_run_hook_in_a_missing_cwd_denies(tmp_path: Path) -> None:
    decision = run([sys.executable, "-c", "print('{}')"], cwd=str(tmp_path / "gone"))
    assert decision == HookDecision(False, "pre-provisioning hook could not start: No such file or directory")


def test_run_hook_command_that_does_not_exist(tmp_path: Path) -> None:
    decision = run([str(tmp_path / "no-such-hook")])
    assert decision == HookDecision(False, "pre-provisioning hook could not start: No such file or directory")


def test_run_hook_command_that_is_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\necho '{\"allowProvisioning\": true}'\n")
    script.chmod(0o644)
    decision = run([str(script)])
    assert decision == HookDecision(False, "pre-provisioning hook could not start: Permission denied")
