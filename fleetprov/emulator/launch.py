"""Start `fleetprov emulator serve` as a child process and wait for its endpoint.json: for the demo, the
tests and anyone scripting the emulator."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetprov.errors import EmulatorError


@dataclass
class RunningEmulator:
    state_dir: Path
    process: subprocess.Popen[bytes]
    endpoint: dict[str, Any]
    log_path: Path

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL if it does not stop in time; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def launch(state_dir: Path, *serve_args: str, log_path: Path, wait: float = 60) -> RunningEmulator:
    """Start the emulator on a free port (unless serve_args say otherwise) and return once it listens."""
    state_dir.mkdir(parents=True, exist_ok=True)
    endpoint = state_dir / "endpoint.json"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetprov", "emulator", "serve", "--state-dir", str(state_dir), "--port", "0",
             *serve_args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + wait
    while not endpoint.exists():
        if process.poll() is not None:
            raise EmulatorError(f"the emulator exited with status {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise EmulatorError(f"the emulator wrote no {endpoint} within {wait:g} s; see {log_path}")
        time.sleep(0.05)
    return RunningEmulator(state_dir, process, json.loads(endpoint.read_text()), log_path)
