"""A device without a real-time clock may boot believing it is 1970. TLS then fails in confusing ways (every
certificate looks "not yet valid"), so fleetprov checks the clock first and waits for time synchronisation
with a clear message instead."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from fleetprov.errors import EX_TEMPFAIL, FleetprovError

log = logging.getLogger(__name__)

# No real clock can be earlier than the day this version was released.
EARLIEST_PLAUSIBLE = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
POLL_SECONDS = 1.0


class ClockNotSynchronised(FleetprovError):
    exit_code = EX_TEMPFAIL
    transient = True


def clock_is_plausible(now: float) -> bool:
    return now >= EARLIEST_PLAUSIBLE.timestamp()


async def wait_for_plausible_clock(timeout: float) -> None:
    """Return once the system clock is plausible; ClockNotSynchronised (exit 75) after ``timeout`` seconds."""
    if clock_is_plausible(time.time()):
        return
    shown = dt.datetime.fromtimestamp(time.time(), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    log.warning(
        "the system clock says %s, before this fleetprov was released (%s): waiting up to %g s for time "
        "synchronisation (NTP, systemd-timesyncd)",
        shown,
        EARLIEST_PLAUSIBLE.date(),
        timeout,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        if clock_is_plausible(time.time()):
            log.info("the system clock is synchronised")
            return
    raise ClockNotSynchronised(
        f"the system clock says {shown}, before {EARLIEST_PLAUSIBLE.date()}, and was not synchronised within "
        f"{timeout:g} s: TLS cannot work with it; check NTP",
        step="clock",
    )
