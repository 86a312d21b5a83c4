"""`fleetprov run` as systemd runs it, for the daemon tests: a real process with NOTIFY_SOCKET bound to a real
AF_UNIX datagram socket of the test and WATCHDOG_USEC set."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

WATCHDOG_USEC = 400_000  # WATCHDOG=1 every 0.2 s
WAIT = 60.0  # generous bound on each wait: CI machines are slow; nothing here asserts a duration


@dataclass
class Agent:
    """A running `fleetprov run` and what it told systemd."""

    process: subprocess.Popen[str]
    notify: socket.socket
    log_path: Path
    messages: list[str] = field(default_factory=list)

    def receive(self, timeout: float = 0.2) -> None:
        self.notify.settimeout(timeout)
        while True:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return

    def wait_for(self, wanted: str, *, after: int = 0) -> int:
        """The index of the first message from ``after`` on that has the line ``wanted``."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            self.receive()
            for index in range(after, len(self.messages)):
                if wanted in self.messages[index].splitlines():
                    return index
            assert self.process.poll() is None, f"fleetprov run exited {self.process.returncode}:\n{self.log()}"
        raise AssertionError(f"no {wanted!r} within {WAIT} s: {self.messages}\n{self.log()}")

    def wait_for_log(self, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + WAIT
        while self.log().count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{self.log()}"
            assert self.process.poll() is None, f"fleetprov run exited {self.process.returncode}:\n{self.log()}"
            self.receive(0.1)  # reading the notify socket meanwhile: its queue is short

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self) -> int:
        """The exit status, reading the notifications meanwhile: the socket's queue is short (10 datagrams by
        default, net.unix.max_dgram_qlen) and fleetprov drops what does not fit rather than block."""
        deadline = time.monotonic() + WAIT
        while self.process.poll() is None:
            assert time.monotonic() < deadline, f"fleetprov run did not exit:\n{self.log()}"
            self.receive(0.05)
        self.receive(0.05)
        return self.process.returncode

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait_exit()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[object]:
    started: list[Agent] = []

    def start(config: Path) -> Agent:
        address = str(tmp_path / f"notify-{len(started)}")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(address)
        log_path = tmp_path / f"agent-{len(started)}.log"
        env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        env.pop("WATCHDOG_PID", None)
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "fleetprov", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        agent = Agent(process, notify, log_path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()
        agent.notify.close()


def manifest_of(state: Path, generation: str = "") -> dict[str, Any]:
    directory = state / "generations" / generation if generation else state / "current"
    document: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return document


def first_rotation(start_agent: object, config: Path, state: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Start the daemon and wait until it has rotated to generation 2 and is ready again: the agent, and the
    current manifest when it was ready before and after the rotation."""
    agent = start_agent(config)  # type: ignore[operator]
    ready = agent.wait_for("READY=1")
    first = manifest_of(state)
    agent.wait_for_log("rotated: generation 2")
    agent.wait_for("READY=1", after=ready + 1)
    return agent, first, manifest_of(state)
