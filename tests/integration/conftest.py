from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentprocess import start_agent  # noqa: F401 -- a fixture for the daemon tests
from tests.support import Emulator, start_emulator


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One emulator shared by the tests that do not change its settings."""
    running = start_emulator(tmp_path_factory.mktemp("shared") / "state")
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def emulator_with(tmp_path: Path) -> Iterator[object]:
    """Start an emulator of one's own with extra `serve` arguments: emulator_with('--throttle', '2')."""
    started: list[Emulator] = []

    def start(*args: str) -> Emulator:
        running = start_emulator(tmp_path / f"state{len(started)}", *args)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
