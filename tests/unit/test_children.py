"""fleetprov.children: the environment a child gets (built from the allow-list, never the parent's minus a few
names) and run_child with real processes: its own process group, killed whole at the deadline and when the
child exits, no waiting on pipes a background process holds, output capped and shown escaped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from fleetprov.children import (
    OUTPUT_LIMIT,
    Finished,
    child_environment,
    reprovision_environment,
    run_child,
    shown,
    token_module_environment,
)
from fleetprov.config import Config, KeysConfig, ParametersConfig, ProvisioningConfig
from fleetprov.facts import DeviceFacts, template_parameters
from fleetprov.keys.pkcs11_settings import Pkcs11Settings
from tests.processes import gone

PARENT = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/var/lib/fleetprov",
    "LANG": "C.UTF-8",
    "LC_TIME": "en_GB.UTF-8",
    "TZ": "UTC",
    "TEST_PKCS11_PIN": "1234",
    "CREDENTIALS_DIRECTORY": "/run/credentials/fleetprov.service",
    "FLEETPROV_PROXY__PASSWORD": "hunter2",
    "FLEETPROV_LOG_LEVEL": "debug",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "60000000",
    "WATCHDOG_PID": "1",
    "STATE_DIRECTORY": "/var/lib/fleetprov",
    "JOURNAL_STREAM": "8:1234",
    "LD_PRELOAD": "/tmp/evil.so",
    "PYTHONPATH": "/tmp",
    "SITE": "lab-3",
    "SOFTHSM2_CONF": "/etc/softhsm/softhsm2.conf",
    "TPM2_PKCS11_TCTI": "device:/dev/tpmrm0",
}


def test_a_child_gets_the_allow_list_and_what_it_is_given() -> None:
    environment = child_environment(PARENT, {"FLEETPROV_THING_NAME": "thing-1"})
    assert environment == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/var/lib/fleetprov",
        "LANG": "C.UTF-8",
        "LC_TIME": "en_GB.UTF-8",
        "TZ": "UTC",
        "FLEETPROV_THING_NAME": "thing-1",
    }


def test_the_key_process_also_gets_what_token_modules_read() -> None:
    environment = token_module_environment(PARENT)
    assert environment == {
        **child_environment(PARENT),
        "SOFTHSM2_CONF": "/etc/softhsm/softhsm2.conf",
        "TPM2_PKCS11_TCTI": "device:/dev/tpmrm0",
    }


def _config(pin_env: Optional[str] = None, pin_credential: Optional[str] = None) -> Config:
    library = Path("/usr/lib/softhsm/libsofthsm2.so")
    token = Pkcs11Settings(library, "t", key_label="k", pin_env=pin_env, pin_credential=pin_credential)
    return Config(
        source=None,
        endpoint="localhost",
        root_ca=Path("ca.pem"),
        claim=None,
        provisioning=ProvisioningConfig(template="t", parameters=ParametersConfig(from_env={"Site": "SITE"})),
        keys=KeysConfig(backend="pkcs11", pkcs11=token),
    )


def test_reprovision_gets_what_reading_the_configuration_again_takes() -> None:
    environment = reprovision_environment(PARENT, _config(pin_env="TEST_PKCS11_PIN"))
    assert environment == {
        **token_module_environment(PARENT),
        "TEST_PKCS11_PIN": "1234",  # its PIN source: it is fleetprov itself
        "FLEETPROV_PROXY__PASSWORD": "hunter2",  # its settings, as the daemon read them
        "FLEETPROV_LOG_LEVEL": "debug",
        "STATE_DIRECTORY": "/var/lib/fleetprov",
        "JOURNAL_STREAM": "8:1234",
        "SITE": "lab-3",  # provisioning.parameters.from_env
    }
    with_credential = reprovision_environment(PARENT, _config(pin_credential="pin"))
    assert with_credential["CREDENTIALS_DIRECTORY"] == "/run/credentials/fleetprov.service"
    assert "TEST_PKCS11_PIN" not in with_credential


def test_the_parameter_command_sees_the_allow_list_only() -> None:
    script = "import json, os; print(json.dumps({'Environment': json.dumps(dict(os.environ))}))"
    facts = DeviceFacts(serial=None, machine_id=None, mac=None, hostname="device")
    command = [sys.executable, "-c", script]
    parameters = asyncio.run(template_parameters({}, {}, {}, command, 10, environ=PARENT, facts=facts))
    assert json.loads(parameters["Environment"]) == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/var/lib/fleetprov",
        "LANG": "C.UTF-8",
        "LC_TIME": "en_GB.UTF-8",
        "TZ": "UTC",
    }


# --- run_child with real processes ------------------------------------------------------------------------


def _sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def run(argv: list[str], environment: dict[str, str], timeout: float, stdin: bytes = b"") -> Finished:
    return asyncio.run(run_child(argv, environment, timeout, stdin=stdin))


@pytest.fixture
def pid_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pid"
    yield path
    if path.exists() and not gone(int(path.read_text())):  # never leave a test's sleep behind
        os.kill(int(path.read_text()), signal.SIGKILL)


def test_a_background_process_does_not_hold_the_run_and_is_killed(pid_file: Path) -> None:
    # The sleep inherits stdout and stderr: waiting for the pipes to close would wait 60 s.
    done = run(_sh(f"sleep 60 & echo $! > {pid_file}; echo started"), {}, timeout=60)
    assert (done.status, done.timed_out, done.stdout) == (0, False, b"started\n")
    assert gone(int(pid_file.read_text()))


def test_at_the_deadline_the_whole_group_is_killed(pid_file: Path) -> None:
    done = run(_sh(f"sleep 60 & echo $! > {pid_file}; echo waiting; wait"), {}, timeout=0.5)
    assert (done.status, done.timed_out) == (-signal.SIGKILL, True)
    assert done.stdout == b"waiting\n"  # what it printed before is kept
    assert gone(int(pid_file.read_text()))


def test_a_process_that_left_the_group_does_not_hold_the_run(pid_file: Path) -> None:
    """A process in a session of its own escapes the group (documented); still, its pipes are not waited for."""
    done = run(_sh(f"setsid sleep 60 & echo $! > {pid_file}; echo started"), {}, timeout=60)
    assert (done.status, done.timed_out, done.stdout) == (0, False, b"started\n")
    os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_exactly_the_given_environment() -> None:
    done = run(["/usr/bin/env"], {"ONLY": "this"}, timeout=10)
    assert done.stdout == b"ONLY=this\n"


def test_stdin_is_written_while_the_output_is_read() -> None:
    data = os.urandom(256 * 1024)  # more than a pipe holds: written and read at the same time
    done = run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])"],
                     {}, timeout=30, stdin=data)  # fmt: skip
    assert done.status == 0
    assert done.stdout == data[::-1][:OUTPUT_LIMIT]


def test_a_child_that_does_not_read_its_stdin() -> None:
    done = run(["/bin/true"], {}, timeout=10, stdin=os.urandom(256 * 1024))
    assert (done.status, done.timed_out) == (0, False)


def test_output_beyond_the_limit_is_dropped_and_never_blocks_the_child() -> None:
    script = "import sys; sys.stdout.write('o' * 1000000); sys.stderr.write('e' * 1000000); print('end')"
    done = run([sys.executable, "-c", script], {}, timeout=30)
    assert (done.status, done.timed_out) == (0, False)
    assert (done.stdout, done.stderr) == (b"o" * OUTPUT_LIMIT, b"e" * OUTPUT_LIMIT)


def test_a_program_that_cannot_start() -> None:
    with pytest.raises(FileNotFoundError):
        run(["/nonexistent/program"], {}, timeout=10)


def test_the_event_loop_goes_on_while_a_child_runs() -> None:
    """The daemon's watchdog pings are a task like this one: it keeps its pace while the child sleeps."""

    async def ticks_during_child() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticking = asyncio.create_task(tick())
        await run_child(["/bin/sleep", "1"], {}, timeout=10)
        ticking.cancel()
        return ticks

    assert asyncio.run(ticks_during_child()) >= 5  # 20 at the pace asked; 0 had the child blocked the loop


def test_cancelled_the_whole_group_is_killed_and_reaped(tmp_path: Path) -> None:
    """SIGTERM to the daemon cancels the step that runs a child: the child and what it started are gone
    before CancelledError goes on, long before the child's own 60 s or the timeout."""
    pids = tmp_path / "pids"

    async def cancelled_mid_child() -> float:
        child = asyncio.create_task(run_child(_sh(f"sleep 60 & echo $$ $! > {pids}; wait"), {}, timeout=60))
        while not pids.exists() or not pids.read_text().endswith("\n"):
            await asyncio.sleep(0.02)
        started = time.monotonic()
        child.cancel()
        with pytest.raises(asyncio.CancelledError):
            await child
        return time.monotonic() - started

    took = asyncio.run(cancelled_mid_child())
    assert took < 2.0  # the bound for SIGTERM; here it is one poll (0.05 s)
    shell, sleep = (int(pid) for pid in pids.read_text().split())
    for pid in (shell, sleep):
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already (the shell), or not ours (the sleep)
        assert gone(pid)


def test_output_not_captured_goes_where_ours_goes(capfd: pytest.CaptureFixture[str]) -> None:
    done = asyncio.run(run_child(_sh("echo out; echo err >&2"), {}, timeout=10, capture=False))
    assert (done.status, done.stdout, done.stderr) == (0, b"", b"")
    assert capfd.readouterr() == ("out\n", "err\n")


def test_shown_output_is_one_escaped_line_ending_in_its_last_characters() -> None:
    assert shown(b"  first\nsecond\x1b[2J\xff  \n") == "first\\nsecond\\x1b[2J\ufffd"
    assert shown(b"x" * 500 + b"the error", limit=20) == "..." + "x" * 11 + "the error"
