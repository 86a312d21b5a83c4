"""Named points where the crash tests kill fleetprov with SIGKILL, deterministically.

``FLEETPROV_CRASH_AT=<point>`` makes the process send itself SIGKILL when it reaches ``<point>`` -- the same
signal `kill -9` sends, at an exact step boundary instead of a racy moment. Unset (always, outside the test
suite) it costs one dictionary lookup. ``mid-write:<file name>`` points stop a write halfway through the
file, after the half is on disk.
"""

from __future__ import annotations

import os
import signal

ENV = "FLEETPROV_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def crash_mid_write(file_name: str) -> bool:
    """True if the test asks for a crash in the middle of writing ``file_name``."""
    return os.environ.get(ENV) == f"mid-write:{file_name}"
