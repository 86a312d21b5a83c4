"""Run one inline Python Lambda function once, as Lambda would: ``python -I lambda_runner.py FUNCTION_DIR``.

FUNCTION_DIR holds ``index.py`` (the template's Code.ZipFile, saved under the name AWS gives it) and
``function.json`` (handler, timeout, environment ...), written by stack_setup.py. The event comes as JSON on
stdin; the handler's return value goes as JSON to stdout, which is what the emulator's command hooks speak
(hooks.py), so a Lambda pre-provisioning hook runs like any other hook, under the same 5 s limit.

As in Lambda: the working directory is the function's directory, the environment holds only the function's
variables and Lambda's own (no AWS credentials, no variables of the emulator's environment: the emulator starts
this process with ``environment_for(command)``, so the function cannot read the emulator's variables back from
/proc/self/environ, which keeps a process's initial environment whatever it does to os.environ), what the handler
prints goes to the log (stderr here) rather than into the answer, the context object has the usual fields,
and the function's Timeout stops it ("Task timed out"). An exception, a timeout or an answer that is not JSON
ends with a non-zero status, which the emulator reports as a failed hook (403 AccessDenied).

Standard library only, and kept out of the fleetprov package's imports: this runs as a fresh process for
every RegisterThing.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Optional

FUNCTION_FILE = "function.json"
CODE_FILE = "index.py"


class LambdaContext:
    """The handler's ``context`` argument, with the attributes Lambda's Python runtime provides."""

    def __init__(self, function: dict[str, Any]) -> None:
        self.function_name: str = function["name"]
        self.function_version = "$LATEST"
        self.invoked_function_arn: str = function["arn"]
        self.memory_limit_in_mb: int = function["memory_mb"]
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex
        self._deadline = time.monotonic() + float(function["timeout"])

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def lambda_environment(function: dict[str, Any], directory: Path) -> dict[str, str]:
    region = str(function["region"])
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "LAMBDA_TASK_ROOT": str(directory),
        "_HANDLER": f"index.{function['handler']}",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{function['runtime']}",
        "AWS_LAMBDA_FUNCTION_NAME": str(function["name"]),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function["memory_mb"]),
        **{str(key): str(value) for key, value in function["environment"].items()},
    }


def environment_for(command: Sequence[str]) -> Optional[dict[str, str]]:
    """The environment to start ``command`` with if it runs this script on a function's directory (the hook command
    stack_setup.hook_command makes), built from the function's description; None for any other command.
    OSError, ValueError or KeyError when the description cannot be read or lacks a field."""
    if len(command) < 2 or command[-2] != str(Path(__file__).resolve()):
        return None
    directory = Path(command[-1])
    function = json.loads((directory / FUNCTION_FILE).read_text(encoding="utf-8"))
    return lambda_environment(function, directory)


def main(argv: list[str]) -> int:
    directory = Path(argv[1]).resolve()
    function = json.loads((directory / FUNCTION_FILE).read_text(encoding="utf-8"))
    event = json.loads(sys.stdin.read())
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # the handler's prints (even os.write(1, ...)) go to the log, as in Lambda
    sys.stdout = sys.stderr
    os.chdir(directory)
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # this script's directory (before Python 3.11's -I leaves it out): not the handler's
    sys.path.insert(0, str(directory))  # the handler imports index, and whatever lies beside it, as in Lambda

    def timed_out(signum: int, frame: Optional[FrameType]) -> None:
        sys.stderr.write(f"Task timed out after {float(function['timeout']):.2f} seconds\n")
        sys.stderr.flush()
        os._exit(1)

    signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, float(function["timeout"]))
    try:
        handler = getattr(importlib.import_module("index"), function["handler"])
        result = handler(event, LambdaContext(function))
        answer = json.dumps(result)
    except Exception:  # the user's handler failed: Lambda logs it and the invocation fails
        traceback.print_exc()
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    with os.fdopen(answer_fd, "w", encoding="utf-8") as out:
        out.write(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
