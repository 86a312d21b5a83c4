"""Test support: whether a process the code under test should have killed is gone."""

from __future__ import annotations

import time
from pathlib import Path

GONE_WAIT = 10.0  # seconds for a killed process to disappear (a bounded wait; no duration is asserted)


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its reaper counts), waiting up to GONE_WAIT seconds."""
    deadline = time.monotonic() + GONE_WAIT
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False
