"""Named points where the tests kill fleetprov with SIGKILL, or hold it up, deterministically. Test-only.

``FLEETPROV_CRASH_AT=<point>`` makes the process send itself SIGKILL when it reaches ``<point>`` -- the same
signal `kill -9` sends, at an exact step boundary instead of a racy moment. Unset (always, outside the test
suite) it costs one dictionary lookup. ``mid-write:<file name>`` points stop a write halfway through the
file, after the half is on disk.

``FLEETPROV_DELAY_AT=<point>=<seconds>`` makes the process sleep that long at ``<point>``: a slow token or
child, on demand (tests/integration/test_daemon_watchdog.py). Children get an allow-listed environment
(fleetprov/children.py): the PKCS#11 key process (point ``token-process``) is handed this variable, and only
this one of the knobs, on purpose (``delay_knob``); the daemon's `fleetprov reprovision` (point
``reprovision``) gets it with the other FLEETPROV_* variables, as fleetprov itself. It says nothing secret.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping

ENV = "FLEETPROV_CRASH_AT"
DELAY_ENV = "FLEETPROV_DELAY_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def crash_mid_write(file_name: str) -> bool:
    """True if the test asks for a crash in the middle of writing ``file_name``."""
    return os.environ.get(ENV) == f"mid-write:{file_name}"


def delay_point(name: str) -> None:
    """Sleep as long as FLEETPROV_DELAY_AT says for ``name`` (a test's slow token); nothing when unset."""
    point, _, seconds = os.environ.get(DELAY_ENV, "").partition("=")
    if point == name:
        time.sleep(float(seconds))


def delay_knob(environ: Mapping[str, str]) -> dict[str, str]:
    """FLEETPROV_DELAY_AT of ``environ``, for a child that has a delay point; empty when unset (always,
    outside the test suite)."""
    return {DELAY_ENV: environ[DELAY_ENV]} if DELAY_ENV in environ else {}
