"""session.crt_result: awaiting a future that awscrt completes from its own thread, given up on (a timeout, a
cancelled task), leaves the future alone; awscrt's thread completes it later without InvalidStateError, and an
error it completes it with is not logged as never retrieved."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import pytest

from fleetprov.session import crt_result

Wait = Callable[["concurrent.futures.Future[str]"], Awaitable[str]]


async def _given_up(wait: Wait, how: str, outcome: str = "result") -> list[BaseException]:
    """Await a future with ``wait``, give up (``how``), then complete it with an ``outcome`` from another
    thread, as awscrt does: what completing it raised in that thread."""
    future: concurrent.futures.Future[str] = concurrent.futures.Future()
    task = asyncio.ensure_future(wait(future))
    await asyncio.sleep(0.05)  # the task is waiting
    if how == "cancelled":
        task.cancel()
    with pytest.raises(asyncio.CancelledError if how == "cancelled" else asyncio.TimeoutError):
        await task
    raised: list[BaseException] = []

    def complete() -> None:
        try:
            if outcome == "result":
                future.set_result("CONNACK")
            else:
                future.set_exception(ConnectionResetError("AWS_IO_SOCKET_CLOSED"))
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=complete)
    thread.start()
    thread.join()
    await asyncio.sleep(0)  # the loop runs what the thread handed it
    return raised


def _timeout_for(how: str) -> Any:
    return 0.01 if how == "timeout" else None


@pytest.mark.parametrize("outcome", ["result", "exception"])
@pytest.mark.parametrize("how", ["timeout", "cancelled"])
def test_crt_result_leaves_awscrts_future_to_awscrt(how: str, outcome: str, caplog: pytest.LogCaptureFixture) -> None:
    raised = asyncio.run(_given_up(lambda future: crt_result(future, _timeout_for(how)), how, outcome))
    gc.collect()  # an asyncio future whose error nobody retrieved says so when it goes
    assert raised == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("how", ["timeout", "cancelled"])
def test_waiting_without_crt_result_breaks_awscrts_thread(how: str) -> None:
    """Why crt_result exists: what provisioning.py did before it."""
    raised = asyncio.run(
        _given_up(lambda future: asyncio.wait_for(asyncio.wrap_future(future), _timeout_for(how)), how)
    )
    assert [type(exc) for exc in raised] == [concurrent.futures.InvalidStateError]


def test_crt_result_gives_the_outcome() -> None:
    async def completed_from_a_thread() -> str:
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        threading.Timer(0.01, future.set_result, ("CONNACK",)).start()
        return await crt_result(future, 10)

    assert asyncio.run(completed_from_a_thread()) == "CONNACK"


def test_only_crt_result_awaits_awscrt_futures() -> None:
    """One way to await awscrt, everywhere: no module wraps a concurrent future for asyncio but crt_result's."""
    package = Path(__file__).resolve().parents[2] / "fleetprov"
    wrapping = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "wrap_future(" in path.read_text() and path.name != "session.py"
    )
    assert wrapping == []
