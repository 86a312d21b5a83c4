"""The daemon's event loop never waits for a child: a real `fleetprov run` under WATCHDOG_USEC=2000000 (a ping
asked every second) rotates its certificate while a hook, or the PKCS#11 key process, takes 20 s, or provisions
anew through a `fleetprov reprovision` that takes 20 s. The pings keep coming (no gap over 1.5 s), and SIGTERM
in the middle is answered within 2 s, exit 0, with the child killed (its pid gone). None waits for the 20 s:
the test stops the daemon a few seconds into the child."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest

from fleetprov.crashpoints import DELAY_ENV
from tests.agentprocess import WAIT, Agent, manifest_of
from tests.integration.test_daemon_identity import FAST, _config, _rotating_template
from tests.processes import gone
from tests.softhsm import make_token
from tests.support import Emulator, fleetprov

WATCHDOG_USEC = 2_000_000  # a WATCHDOG=1 asked every second (half of WatchdogSec, sd_watchdog_enabled(3))
LONGEST_GAP = 1.5  # seconds between two pings, at most (the bound)
STOP_WITHIN = 2.0  # seconds from SIGTERM to the daemon's exit (the bound)
CHILD_SECONDS = 20  # how long the hook and the key process take
WATCHED = 4.0  # seconds the pings are watched while the child runs, before SIGTERM
# Certificates valid for 30 s, rotated 12 s before not-after: the rotation starts about 18 s in.
ROTATING = {"daemon": {**FAST, "rotate_before": 12}}


@pytest.fixture
def watchdog_agent(start_agent: object, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Agent]:
    monkeypatch.setattr("tests.agentprocess.WATCHDOG_USEC", WATCHDOG_USEC)
    return start_agent  # type: ignore[return-value]


def _rotating_emulator(emulator_with: object, tmp_path: Path) -> Emulator:
    return emulator_with(  # type: ignore[operator,no-any-return]
        "--template", f"rotating={_rotating_template(tmp_path)}", "--certificate-validity", "30"
    )


def _pings_until(agent: Agent, child: Callable[[], Optional[int]]) -> tuple[int, list[float]]:
    """Read the notifications until ``child()`` names a pid, then WATCHED seconds more: that pid, and the
    arrival times of the WATCHDOG=1 pings, the end of the watch last (a loop blocked by the child would send
    none from the child's start to the end)."""
    pings: list[float] = []
    deadline = time.monotonic() + WAIT
    pid, until = None, None
    agent.notify.settimeout(0.05)
    while until is None or time.monotonic() < until:
        assert time.monotonic() < deadline, f"no child within {WAIT} s:\n{agent.log()}"
        assert agent.process.poll() is None, f"fleetprov run exited {agent.process.returncode}:\n{agent.log()}"
        try:
            message = agent.notify.recv(4096).decode()
        except (socket.timeout, BlockingIOError):
            message = ""
        agent.messages.append(message)
        if "WATCHDOG=1" in message.splitlines():
            pings.append(time.monotonic())
        if pid is None:
            pid = child()
            until = None if pid is None else time.monotonic() + WATCHED
    return pid, [*pings, time.monotonic()]


def _stopped_within_bound(agent: Agent) -> float:
    """Seconds from SIGTERM to the daemon's exit (status 0)."""
    stopping = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    assert agent.wait_exit() == 0, agent.log()
    return time.monotonic() - stopping


def _check(agent: Agent, pid: int, pings: list[float]) -> None:
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert len(gaps) > WATCHED, pings  # the watch covered the child's run
    assert max(gaps) <= LONGEST_GAP, f"watchdog gaps {[round(gap, 2) for gap in gaps]}\n{agent.log()}"
    took = _stopped_within_bound(agent)
    assert took <= STOP_WITHIN, f"stopped {took:.2f} s after SIGTERM:\n{agent.log()}"
    assert gone(pid), f"child {pid} outlived the daemon"
    assert "Traceback" not in agent.log()


def _pid_in(path: Path) -> Optional[int]:
    text = path.read_text() if path.exists() else ""
    return int(text) if text.endswith("\n") else None


def _child_running(parent: int, module: str) -> Optional[int]:
    """The pid of ``parent``'s child running ``python -m module``, if there is one now."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent and module.encode() in command:
            return int(entry.name)
    return None


def test_a_slow_hook_holds_up_neither_the_watchdog_nor_sigterm(
    emulator_with: object, watchdog_agent: Callable[[Path], Agent], tmp_path: Path
) -> None:
    emulator = _rotating_emulator(emulator_with, tmp_path)
    hooks, pid_file = tmp_path / "hooks", tmp_path / "hook.pid"
    hooks.mkdir()
    hook = hooks / "10-slow"
    # Slow after the rotation only (generation 2); its pid is its sleep's (exec).
    hook.write_text(
        f'#!/bin/sh\n[ "$FLEETPROV_GENERATION" = 2 ] || exit 0\necho $$ > {pid_file}\nexec sleep {CHILD_SECONDS}\n'
    )
    hook.chmod(0o755)
    settings: dict[str, Any] = {**ROTATING, "hooks": {"directory": str(hooks)}}
    config = _config(emulator, tmp_path / "device", "watchdog-hook", "--template", "rotating", **settings)
    agent = watchdog_agent(config)
    agent.wait_for("READY=1")
    pid, pings = _pings_until(agent, lambda: _pid_in(pid_file))
    _check(agent, pid, pings)
    assert os.readlink(tmp_path / "device" / "state" / "current") == "generations/2"  # committed before hooks


def test_a_slow_token_key_process_holds_up_neither_the_watchdog_nor_sigterm(
    emulator_with: object,
    watchdog_agent: Callable[[Path], Agent],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = make_token(tmp_path / "hsm", monkeypatch, pin="pin-" + tmp_path.name[-12:])
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    emulator = _rotating_emulator(emulator_with, tmp_path)
    config = _config(
        emulator, tmp_path / "device", "watchdog-token", "--template", "rotating",
        "--key-backend", "pkcs11", "--pkcs11-library", str(token.library), "--token-label", token.label,
        "--pin-file", str(pin_file), **ROTATING,
    )  # fmt: skip
    # Provisioned at normal speed; only the daemon's key process (the rotation's new key) is slowed.
    provisioned = fleetprov("--once", "--config", str(config))
    assert provisioned.returncode == 0, provisioned.stderr
    monkeypatch.setenv(DELAY_ENV, f"token-process={CHILD_SECONDS}")
    agent = watchdog_agent(config)
    agent.wait_for("READY=1")
    pid, pings = _pings_until(agent, lambda: _child_running(agent.process.pid, "fleetprov.keys.token_process"))
    _check(agent, pid, pings)
    assert os.readlink(tmp_path / "device" / "state" / "current") == "generations/1"  # the rotation did not happen
    assert token.pin not in agent.log()


def test_a_slow_reprovision_child_holds_up_neither_the_watchdog_nor_sigterm(
    emulator: Emulator,
    watchdog_agent: Callable[[Path], Agent],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The certificate is revoked: after its refusals the daemon runs `fleetprov reprovision`, slowed to 20 s;
    SIGTERM kills it with its group (an interrupted run resumes from its journal at the next start)."""
    state = tmp_path / "device" / "state"
    config = _config(emulator, tmp_path / "device", "watchdog-reprovision")
    monkeypatch.setenv(DELAY_ENV, f"reprovision={CHILD_SECONDS}")  # only `fleetprov reprovision` has this point
    agent = watchdog_agent(config)
    agent.wait_for("READY=1")
    emulator.admin("set-certificate-status", manifest_of(state)["certificate_id"], "REVOKED")
    pid, pings = _pings_until(agent, lambda: _child_running(agent.process.pid, "reprovision"))
    _check(agent, pid, pings)
    assert os.readlink(state / "current") == "generations/1"  # nothing was provisioned anew
