"""Retries through transient failures: exponential backoff with full jitter, capped, within a budget.

Transient means the error says so (``FleetprovError.transient``): timeouts, lost or refused connections,
429 and 5xx rejections, malformed replies. Anything else stops at once. When the attempts or the budget run
out, ``RetriesExhausted`` (exit 75, "try again later") carries the last error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable
from typing import Callable, TypeVar

from tenacity import AsyncRetrying, RetryCallState, RetryError, retry_if_exception, stop_after_attempt

from fleetprov.config import RetryConfig
from fleetprov.errors import EX_TEMPFAIL, BadServiceData, FleetprovError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RetriesExhausted(FleetprovError):
    exit_code = EX_TEMPFAIL
    transient = True


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, FleetprovError) and exc.transient


async def retrying(
    policy: RetryConfig, attempt: Callable[[], Awaitable[T]], progress: Callable[[], object] = lambda: None
) -> T:
    """Run ``attempt`` until it succeeds, fails permanently, or the policy's attempts or budget run out.

    ``progress`` tells how far the attempts got (e.g. the journal's stage): when it changes, the backoff starts
    again from ``initial_delay``. A device throttled at CreateCertificateFromCsr that then gets its certificate
    should not wait the long delays it earned there before its first RegisterThing: under a throttle that is
    what leaves the service idle at the end of a herd.
    """
    started = time.monotonic()
    last_progress, since = progress(), 0  # the attempt number at which the progress last changed

    def delay(state: RetryCallState) -> float:
        nonlocal last_progress, since
        if policy.strategy == "fixed":  # what simpler agents do; kept for comparison (benchmarks/herd.py)
            return policy.initial_delay
        now = progress()
        if now != last_progress:
            last_progress, since = now, state.attempt_number - 1
        exponent = state.attempt_number - since - 1
        return random.uniform(0, min(policy.max_delay, policy.initial_delay * 2**exponent))  # noqa: S311 -- jitter

    def wait(state: RetryCallState) -> float:
        # Never sleep past the budget: the last attempt starts before it ends, not after.
        remaining = policy.budget - (time.monotonic() - started)
        return max(0.0, min(delay(state), remaining))

    def stop(state: RetryCallState) -> bool:
        out_of_time = time.monotonic() - started >= policy.budget
        return out_of_time or stop_after_attempt(policy.max_attempts)(state)

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        log.warning("attempt %d failed (%s); retrying in %.1f s", state.attempt_number, error, sleep)

    retryer = AsyncRetrying(retry=retry_if_exception(is_transient), wait=wait, stop=stop, before_sleep=before_sleep)
    try:
        return await retryer(attempt)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        elapsed = time.monotonic() - started
        exhausted = RetriesExhausted(
            f"gave up after {exc.last_attempt.attempt_number} attempts in {elapsed:.1f} s; last error: {last}",
            step=getattr(last, "step", ""),
        )
        if isinstance(last, BadServiceData):
            # The service kept sending what we cannot use: say so (65), not merely "try again later".
            exhausted.exit_code = last.exit_code
        raise exhausted from last
