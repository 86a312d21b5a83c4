"""Power loss, not only kill -9: real fleetprov processes run under strace(1) against the emulator, and their
file-system calls are checked against the design's order (tests/fstrace.py): each file fsync'd before it is
renamed or linked into place, each changed directory fsync'd before the next network call, the next program
started (a hook) and the end of the run. For provisioning with `--once`, for an already provisioned device
that cleans up after an interrupted run, for a rotation by the daemon (with the prune of an old generation)
and for `fleetprov claim install`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.agentprocess import WAIT, WATCHDOG_USEC, Agent
from tests.fstrace import Report, check, strace_command
from tests.integration.test_claim_cli import config_file, write_claim
from tests.integration.test_daemon_identity import FAST, _config, _rotating_template
from tests.support import Emulator, device_config, fleetprov

NOT_STATE = ("lock",)  # the store's lock file: flock(2) is the lock, the pid in it only helps a message
HOOK = '#!/bin/sh\ntouch "{out}/$(basename "$0").ran"\n'


def _traced(log: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        strace_command(log, [sys.executable, "-m", "fleetprov", *args]),
        capture_output=True, text=True, timeout=WAIT, cwd=log.parent,
    )  # fmt: skip


def _report(log: Path, root: Path) -> Report:
    return check(log.read_text(errors="replace"), root, log.parent, not_state=NOT_STATE)


def _hooks(directory: Path) -> dict[str, str]:
    """A hooks directory whose one hook leaves a file in ``directory``/out: its start is a step that relies on
    what was stored."""
    hooks, out = directory / "hooks.d", directory / "out"
    hooks.mkdir(parents=True)
    out.mkdir()
    hook = hooks / "10-mark"
    hook.write_text(HOOK.format(out=out))
    hook.chmod(0o755)
    return {"directory": str(hooks)}


def _assert_durable(report: Report, expected: Sequence[str]) -> None:
    # What was traced is the run that was meant: a checker that saw nothing would find nothing.
    missing = [name for name in expected if not report.calls[name]]
    assert not missing, f"the trace has no {missing}: {dict(report.calls)}"
    assert report.violations == [], "\n".join(report.violations)


def test_provisioning_with_once_is_durable_before_each_network_call(emulator: Emulator, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", "durable-once", hooks=_hooks(tmp_path))
    state = tmp_path / "device" / "state"
    log = tmp_path / "once.strace"
    done = _traced(log, "--once", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "10-mark.ran").exists()
    _assert_durable(_report(log, state), ["mkdir", "rename", "symlink", "unlink", "fsync", "connect", "execve"])


def test_cleaning_up_an_interrupted_run_is_durable_before_verifying(emulator: Emulator, tmp_path: Path) -> None:
    """An already provisioned device goes straight from recovery to connecting: what recovery removed must
    stay removed."""
    config = device_config(emulator, tmp_path / "device", "--serial", "durable-recover")
    state = tmp_path / "device" / "state"
    assert fleetprov("--once", "--config", str(config)).returncode == 0
    (state / "staging-interrupted").mkdir(mode=0o700)
    (state / "staging-interrupted" / "private.key").write_bytes(b"half a key")
    (state / "removing-7-0000").mkdir(mode=0o700)
    (state / "current.tmp-1").symlink_to("generations/1")
    (state / ".last-run.json.tmp-1").write_bytes(b"{")
    log = tmp_path / "recover.strace"
    done = _traced(log, "--once", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "already provisioned" in done.stdout
    leftovers = ("staging-", "removing-", "current.tmp-", ".")
    assert [path.name for path in state.iterdir() if path.name.startswith(leftovers)] == []
    _assert_durable(_report(log, state), ["rmdir", "unlink", "connect"])


def _child_of(process: subprocess.Popen[str]) -> int:
    """The pid of the one program strace started (strace stays the parent while it traces)."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_rotation_and_prune_are_durable(emulator_with: object, tmp_path: Path) -> None:
    """The daemon rotates generation 2 (valid 30 s, rotated 12 s before its end) to 3 and prunes generation 1."""
    emulator: Emulator = emulator_with(  # type: ignore[operator]
        "--template", f"rotating={_rotating_template(tmp_path)}", "--certificate-validity", "30"
    )
    state = tmp_path / "device" / "state"
    config = _config(
        emulator, tmp_path / "device", "durable-rotation", "--template", "rotating",
        daemon={**FAST, "rotate_before": 12}, hooks=_hooks(tmp_path),
    )  # fmt: skip
    assert fleetprov("--once", "--config", str(config)).returncode == 0
    again = fleetprov("reprovision", "--config", str(config))
    assert again.returncode == 0, again.stderr
    (tmp_path / "out" / "10-mark.ran").unlink()

    log = tmp_path / "rotation.strace"
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    with (tmp_path / "daemon.log").open("w") as output:
        process = subprocess.Popen(
            strace_command(log, [sys.executable, "-m", "fleetprov", "run", "--config", str(config)]),
            stdout=output, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        )  # fmt: skip
    agent = Agent(process, notify, tmp_path / "daemon.log")
    try:
        agent.wait_for_log("rotated: generation 3")
        agent.wait_for_log("removed old generations 1")
        ready = agent.wait_for("READY=1")
        agent.wait_for("READY=1", after=ready + 1)  # connected again, with generation 3
        os.kill(_child_of(process), signal.SIGTERM)
        assert agent.wait_exit() == 0, agent.log()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
    assert os.readlink(state / "current") == "generations/3"
    assert sorted(path.name for path in (state / "generations").iterdir()) == ["2", "3"]
    assert (tmp_path / "out" / "10-mark.ran").exists()  # the hook ran after the rotation's commit and prune
    _assert_durable(_report(log, state), ["mkdir", "rename", "symlink", "rmdir", "fsync", "connect", "execve"])


def test_claim_install_is_durable(tmp_path: Path) -> None:
    cert, key, _ = write_claim(tmp_path / "app")
    config = config_file(tmp_path / "device")
    inbox = tmp_path / "device" / "inbox"
    for run in range(2):  # the second install replaces the first claim
        log = tmp_path / f"install-{run}.strace"
        done = _traced(log, "claim", "install", "--config", str(config), "--certificate", str(cert),
                       "--key", str(key))  # fmt: skip
        assert done.returncode == 0, done.stderr
        _assert_durable(_report(log, inbox), ["mkdir", "rename", "symlink", "fsync"])
