"""An inline Python Lambda run as a pre-provisioning hook (stack_setup.install_function + lambda_runner), through
the emulator's own hook runner: the answer, the log, the environment, the context, failures and the timeout."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetprov.emulator.cloudformation import StackFunction
from fleetprov.emulator.hooks import HookDecision, run_hook
from fleetprov.emulator.stack_setup import hook_command, install_function

EVENT = {
    "claimCertificateId": "claim-id",
    "certificateId": "cert-id",
    "certificatePem": "PEM",
    "templateArn": "arn:aws:iot:eu-west-1:123456789012:provisioningtemplate/demo",
    "clientId": "client-1",
    "parameters": {"SerialNumber": "fp-1"},
}


def install(tmp_path: Path, code: str, *, timeout: float = 3, environment: Any = None) -> Path:
    function = StackFunction(
        logical_id="Hook",
        name="hook-function",
        arn="arn:aws:lambda:eu-west-1:123456789012:function:hook-function",
        code=textwrap.dedent(code),
        handler="handler",
        runtime="python3.12",
        timeout=timeout,
        memory_mb=256,
        environment=environment or {},
    )
    return install_function(function, tmp_path / "lambda", "eu-west-1")


def run_installed(directory: Path) -> HookDecision:
    return asyncio.run(run_hook(hook_command(directory), EVENT, cwd=str(directory)))


def run(tmp_path: Path, code: str, *, timeout: float = 3, environment: Any = None) -> HookDecision:
    return run_installed(install(tmp_path, code, timeout=timeout, environment=environment))


def test_the_handler_decides_by_the_event(tmp_path: Path) -> None:
    code = """
        def handler(event, context):
            serial = event["parameters"]["SerialNumber"]
            return {"allowProvisioning": serial.startswith("fp-"), "parameterOverrides": {"Seen": event["clientId"]}}
    """
    assert run(tmp_path, code) == HookDecision(True, "", {"Seen": "client-1"})
    denying = code.replace('startswith("fp-")', 'startswith("other-")')
    assert not run(tmp_path, denying).allowed


def test_prints_go_to_the_log_not_into_the_answer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = """
        import os

        def handler(event, context):
            print("checking", event["parameters"])
            os.write(1, b"raw write\\n")
            return {"allowProvisioning": True}
    """
    with caplog.at_level("INFO", logger="fleetprov.emulator.hooks"):
        assert run(tmp_path, code).allowed
    assert "checking {'SerialNumber': 'fp-1'}" in caplog.text and "raw write" in caplog.text


def test_environment_context_and_working_directory_are_lambdas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMULATOR_ONLY_VARIABLE", "leaked")
    code = """
        import os

        def handler(event, context):
            seen = {
                "variables": ",".join(sorted(os.environ)),
                "prefix": os.environ["ALLOWED_SERIAL_PREFIX"],
                "region": os.environ["AWS_REGION"],
                "name": context.function_name,
                "arn": context.invoked_function_arn,
                "memory": str(context.memory_limit_in_mb),
                "remaining": str(0 < context.get_remaining_time_in_millis() <= 2000),
                "cwd": os.getcwd(),
            }
            return {"allowProvisioning": True, "parameterOverrides": seen}
    """
    decision = run(tmp_path, code, timeout=2, environment={"ALLOWED_SERIAL_PREFIX": "fp-"})
    seen = decision.parameter_overrides
    assert "EMULATOR_ONLY_VARIABLE" not in seen["variables"].split(",")
    assert "AWS_ACCESS_KEY_ID" not in seen["variables"].split(",")
    assert seen["prefix"] == "fp-" and seen["region"] == "eu-west-1"
    assert seen["name"] == "hook-function" and seen["arn"].endswith(":function:hook-function")
    assert seen["memory"] == "256" and seen["remaining"] == "True"
    assert Path(seen["cwd"]) == (tmp_path / "lambda" / "Hook").resolve()
    assert not (tmp_path / "lambda" / "Hook" / "__pycache__").exists()


def test_the_function_never_had_the_emulators_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/self/environ is the environment the process started with, whatever it did to os.environ since: the
    emulator's variables must not be there, not merely be removed after the function's process started."""
    monkeypatch.setenv("EMULATOR_ONLY_VARIABLE", "leaked")
    code = """
        def handler(event, context):
            with open("/proc/self/environ", "rb") as initial:
                names = [entry.split(b"=", 1)[0].decode() for entry in initial.read().split(b"\\0") if entry]
            return {"allowProvisioning": True, "parameterOverrides": {"initial": ",".join(sorted(names))}}
    """
    decision = run(tmp_path, code, environment={"ALLOWED_SERIAL_PREFIX": "fp-"})
    initial = decision.parameter_overrides["initial"].split(",")
    assert "EMULATOR_ONLY_VARIABLE" not in initial
    assert "ALLOWED_SERIAL_PREFIX" in initial and "AWS_LAMBDA_FUNCTION_NAME" in initial


def test_a_function_whose_description_was_damaged_is_denied(tmp_path: Path) -> None:
    directory = install(tmp_path, "def handler(event, context):\n    return {'allowProvisioning': True}\n")
    (directory / "function.json").write_text("{not json")
    decision = run_installed(directory)
    assert not decision.allowed and "could not start: bad function description" in decision.reason


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("def handler(event, context):\n    raise ValueError('no')\n", "failed (exit status 1)"),
        ("def other(event, context):\n    return {}\n", "failed (exit status 1)"),
        ("def handler(event, context):\n    return None\n", "output is not a JSON object"),
        ("def handler(event, context):\n    return {'allowProvisioning': object()}\n", "failed (exit status 1)"),
        ("def handler(event, context):\n    return {'allowProvisioning': False}\n", "denied provisioning"),
        ("syntax error here\n", "failed (exit status 1)"),
    ],
)
def test_failures_deny(tmp_path: Path, code: str, reason: str) -> None:
    decision = run(tmp_path, code)
    assert not decision.allowed and reason in decision.reason


def test_the_functions_timeout_stops_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = "import time\n\ndef handler(event, context):\n    time.sleep(30)\n"
    decision = run(tmp_path, code, timeout=1)
    # Stopped by the function's own 1 s (the runner says so), not by the hooks' 5 s limit.
    assert not decision.allowed and "failed (exit status 1)" in decision.reason
    assert "Task timed out after 1.00 seconds" in caplog.text
