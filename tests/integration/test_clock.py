"""A device that boots in 1970: fleetprov waits for time synchronisation instead of failing TLS obscurely.
Debian's libfaketime moves the process's clock; FAKETIME_TIMESTAMP_FILE lets the test "synchronise" it."""

from __future__ import annotations

import glob
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import Emulator, device_config


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is missing: install the Debian package faketime (make test does)")
    return found[0]


def _once_in_fake_time(config: Path, clock_file: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleetprov", "--once", "--config", str(config)],
        env={
            "PATH": "/usr/bin:/bin",
            "LD_PRELOAD": _libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(clock_file),
            "FAKETIME_NO_CACHE": "1",
            "PYTHONPATH": str(Path(__file__).parent.parent.parent),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_clock_in_1970_is_refused_after_the_wait(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path)
    config.write_text(config.read_text() + "clock_sync_timeout: 1\n")
    clock_file = tmp_path / "clock"
    clock_file.write_text("@1970-01-01 00:00:00\n")
    process = _once_in_fake_time(config, clock_file)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr
    assert "the system clock says 1970-01-01T00:00:" in stderr
    assert "check NTP" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "state").exists()  # nothing was attempted


def test_provisioning_continues_once_the_clock_is_synchronised(emulator: Emulator, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path, "--serial", "rtc-less")
    clock_file = tmp_path / "clock"
    clock_file.write_text("@1970-01-01 00:00:00\n")
    process = _once_in_fake_time(config, clock_file)

    def synchronise() -> None:
        time.sleep(1.5)
        clock_file.write_text("+0\n")  # NTP arrived: the real time again

    threading.Thread(target=synchronise, daemon=True).start()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "waiting up to 300 s for time synchronisation" in stderr
    assert "the system clock is synchronised" in stderr
    assert "thing fleetprov-rtc-less" in stdout
