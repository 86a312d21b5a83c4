from __future__ import annotations

import asyncio

import pytest

import fleetprov.retry
from fleetprov.config import RetryConfig
from fleetprov.errors import BadServiceData, EndpointUnavailable, Refused
from fleetprov.retry import RetriesExhausted, retrying

FAST = RetryConfig(initial_delay=0.01, max_delay=0.02, budget=5, max_attempts=4)


def run(policy: RetryConfig, outcomes: list[BaseException | str], stages: list[str] | None = None) -> tuple[str, int]:
    """``outcomes[i]`` is what attempt i does; ``stages[i]`` the progress once i attempts were made."""
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        outcome = outcomes[calls]
        calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def progress() -> object:
        return None if stages is None else stages[calls]

    return asyncio.run(retrying(policy, attempt, progress=progress)), calls


def test_transient_failures_are_retried() -> None:
    assert run(FAST, [EndpointUnavailable("down"), EndpointUnavailable("down"), "ok"]) == ("ok", 3)


def test_permanent_failure_stops_at_once() -> None:
    with pytest.raises(Refused):
        run(FAST, [Refused("no"), "never"])


def test_attempts_run_out_with_exit_75() -> None:
    with pytest.raises(RetriesExhausted, match=r"gave up after 4 attempts .* last error: connect: down") as raised:
        run(FAST, [EndpointUnavailable("down", step="connect")] * 4)
    assert raised.value.exit_code == 75 and raised.value.step == "connect"


def test_unusable_replies_to_the_end_exit_65() -> None:
    with pytest.raises(RetriesExhausted) as raised:
        run(FAST, [BadServiceData("garbage")] * 4)
    assert raised.value.exit_code == 65


def test_budget_bounds_the_attempts() -> None:
    # 0.2 s apart within a 0.5 s budget: attempts at 0, 0.2 and 0.4 s, and one more the capped wait allows.
    policy = RetryConfig(initial_delay=0.2, max_delay=0.2, budget=0.5, max_attempts=100, strategy="fixed")
    with pytest.raises(RetriesExhausted) as raised:
        run(policy, [EndpointUnavailable("down")] * 100)
    attempts = int(raised.value.message.split()[3])
    assert 3 <= attempts <= 4


def test_fixed_strategy_waits_the_same_delay(caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryConfig(initial_delay=0.1, max_delay=0.1, budget=5, max_attempts=3, strategy="fixed")
    caplog.set_level("WARNING")
    with pytest.raises(RetriesExhausted):
        run(policy, [EndpointUnavailable("down")] * 3)
    assert [r.getMessage().rsplit(" ", 2)[-2] for r in caplog.records if "retrying in" in r.getMessage()] == [
        "0.1",
        "0.1",
    ]


def test_progress_restarts_the_backoff(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Throttled at the first request five times, then it succeeds (the progress changes) and the second request
    is throttled: its delays start again from initial_delay instead of doubling on."""
    monkeypatch.setattr(fleetprov.retry.random, "uniform", lambda low, high: high)  # each delay = its window's cap
    policy = RetryConfig(initial_delay=0.01, max_delay=10, budget=30, max_attempts=10)
    caplog.set_level("WARNING")
    down = EndpointUnavailable("throttled")
    outcomes: list[BaseException | str] = [down] * 6 + ["ok"]
    assert run(policy, outcomes, stages=["key-ready"] * 5 + ["issued"] * 3) == ("ok", 7)
    delays = [line.split("retrying in ")[1].split()[0] for line in caplog.messages if "retrying in" in line]
    # 0.01, 0.02, 0.04, 0.08 (logged with one decimal); the 5th attempt made progress: 0.01, 0.02 again, where
    # without the restart they would be 0.16 and 0.32.
    assert delays == ["0.0", "0.0", "0.0", "0.1", "0.0", "0.0"]
