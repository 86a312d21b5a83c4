"""fleetprov.hardening in real processes: not dumpable and no core file, from the first thing an entry point
does. (The `fleetprov` command's hardening is what tests/integration/test_hooks.py's hook runs into.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

WAIT = 30.0  # seconds for the child to get that far (bounded wait, no duration asserted)
PR_GET_DUMPABLE = 3
UNPRIVILEGED = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def test_harden_process() -> None:
    script = (
        "import ctypes, resource\n"
        "from fleetprov.hardening import harden_process\n"
        f"before = ctypes.CDLL(None).prctl({PR_GET_DUMPABLE}, 0, 0, 0, 0)\n"
        "harden_process()\n"
        f"print(before, ctypes.CDLL(None).prctl({PR_GET_DUMPABLE}, 0, 0, 0, 0), "
        "resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split(" ", 2) == ["1", "0", "(0, 0)\n"]


def test_the_key_process_is_not_dumpable_before_it_reads_the_pin() -> None:
    """Run as another user, as fleetprov's would be: the kernel hands /proc/<pid>/environ of a process that
    is not dumpable to root. The child is waiting for its request (the PIN) on stdin meanwhile."""
    child = subprocess.Popen(
        [*UNPRIVILEGED, sys.executable, "-m", "fleetprov.keys.token_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=Path(__file__).parents[2],
    )
    try:
        deadline = time.monotonic() + WAIT
        while not _hardened(child.pid) and time.monotonic() < deadline:
            assert child.poll() is None, "the key process ended before its request"
            time.sleep(0.05)
        assert _hardened(child.pid), "still dumpable while waiting for the PIN"
        [uids] = [line for line in Path(f"/proc/{child.pid}/status").read_text().splitlines() if line[:4] == "Uid:"]
        assert uids.split()[1:] == ["65534"] * 4  # root owns its /proc files because it is not dumpable
    finally:
        child.kill()
        child.wait()


def _hardened(pid: int) -> bool:
    """Whether ``pid`` runs Python (setpriv has exec'd it: a new program starts dumpable) and its /proc files
    belong to root although it runs as 65534: the kernel's sign of a process that is not dumpable."""
    return "setpriv" not in os.readlink(f"/proc/{pid}/exe") and Path(f"/proc/{pid}/environ").stat().st_uid == 0
