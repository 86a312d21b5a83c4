from __future__ import annotations

import asyncio

import pytest

from fleetprov import clock
from fleetprov.clock import EARLIEST_PLAUSIBLE, ClockNotSynchronised, clock_is_plausible, wait_for_plausible_clock


def test_plausibility_boundary() -> None:
    assert not clock_is_plausible(0)
    assert not clock_is_plausible(EARLIEST_PLAUSIBLE.timestamp() - 1)
    assert clock_is_plausible(EARLIEST_PLAUSIBLE.timestamp())


def test_this_machine_has_a_plausible_clock() -> None:
    asyncio.run(wait_for_plausible_clock(0))


def test_implausible_clock_times_out_with_exit_75(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock.time, "time", lambda: 5.0)
    monkeypatch.setattr(clock, "POLL_SECONDS", 0.01)
    with pytest.raises(ClockNotSynchronised, match=r"1970-01-01T00:00:05Z.*not synchronised within 0.05 s") as raised:
        asyncio.run(wait_for_plausible_clock(0.05))
    assert raised.value.exit_code == 75 and raised.value.step == "clock"


def test_waits_until_the_clock_is_synchronised(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([5.0, 5.0, 6.0, EARLIEST_PLAUSIBLE.timestamp() + 10])
    monkeypatch.setattr(clock.time, "time", lambda: next(readings))
    monkeypatch.setattr(clock, "POLL_SECONDS", 0.01)
    asyncio.run(wait_for_plausible_clock(5))
