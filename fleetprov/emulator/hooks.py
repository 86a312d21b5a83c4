"""Pre-provisioning hooks: the emulator's stand-in for the Lambda function AWS calls before RegisterThing.

A hook is a command. It reads the documented input object as JSON on stdin and prints the documented
output object (``allowProvisioning``, optional ``parameterOverrides``) as JSON on stdout, within 5 s.
Anything else -- a non-zero exit, a timeout, unparseable or ill-typed output, or a refusal -- denies
provisioning, which RegisterThing reports as 403 AccessDenied, as AWS does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetprov.emulator import lambda_runner

log = logging.getLogger(__name__)

HOOK_TIMEOUT_SECONDS = 5.0
MAX_OUTPUT_BYTES = 64 * 1024


@dataclass(frozen=True)
class HookDecision:
    allowed: bool
    reason: str = ""
    parameter_overrides: Mapping[str, str] = field(default_factory=dict)


async def run_hook(
    command: Sequence[str],
    hook_input: Mapping[str, Any],
    timeout: float = HOOK_TIMEOUT_SECONDS,
    cwd: Optional[str] = None,
) -> HookDecision:
    """Run the hook in ``cwd`` (relative paths in its command resolve there) and return its decision.

    A CloudFormation Lambda function gets its own environment, made here: the emulator's variables never reach
    its process. Any other hook is the emulator user's own command and inherits the emulator's environment."""
    try:
        environment = lambda_runner.environment_for(command)
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            env=environment,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return HookDecision(False, f"pre-provisioning hook could not start: {exc.strerror or exc}")
    except (ValueError, LookupError) as exc:  # a function description edited by hand: the function cannot run
        return HookDecision(False, f"pre-provisioning hook could not start: bad function description: {exc!r}")
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(hook_input).encode()), timeout=timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return HookDecision(False, f"pre-provisioning hook did not answer within {timeout:g} s")
    if process.returncode != 0:
        log.warning("pre-provisioning hook exited %s: %s", process.returncode, stderr[-500:].decode(errors="replace"))
        return HookDecision(False, f"pre-provisioning hook failed (exit status {process.returncode})")
    if stderr.strip():  # what a hook logs (a Lambda's prints), as CloudWatch Logs would keep it
        log.info("pre-provisioning hook log: %s", stderr[-500:].decode(errors="replace").strip())
    return parse_hook_output(stdout[:MAX_OUTPUT_BYTES])


def parse_hook_output(stdout: bytes) -> HookDecision:
    try:
        output = json.loads(stdout)
    except ValueError:
        return HookDecision(False, "pre-provisioning hook printed no valid JSON")
    if not isinstance(output, dict):
        return HookDecision(False, "pre-provisioning hook output is not a JSON object")
    allow = output.get("allowProvisioning")
    # AWS's documentation shows both true and "true"; accept both, nothing else.
    if allow is not True and allow != "true":
        return HookDecision(False, "pre-provisioning hook denied provisioning")
    overrides = output.get("parameterOverrides", {})
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in overrides.items()
    ):
        return HookDecision(False, "pre-provisioning hook parameterOverrides is not an object of strings")
    return HookDecision(True, "", dict(overrides))
