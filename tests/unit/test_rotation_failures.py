"""A rotation that fails with an unexpected exception (a bug) raises RotationBug, a FleetprovError the daemon
logs and tries again later, instead of the exception ending the daemon: one line at error level, its
traceback at debug level only, what was staged discarded, `current` untouched."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import cast

import pytest

from fleetprov.agent import store_of
from fleetprov.errors import FleetprovError
from fleetprov.rotation import RotationBug, rotate
from fleetprov.session import Session
from fleetprov.store import Generation, Manifest
from tests.unit.test_config import MINIMAL_YAML, load, write


def test_an_unexpected_exception_is_reported_as_a_bug_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A key type that config.py would refuse: the key step raises ValueError, as no FleetprovError does.
    config = load(write(tmp_path, MINIMAL_YAML + f"state_dir: {tmp_path / 'state'}\n"))
    config = dataclasses.replace(
        config, provisioning=dataclasses.replace(config.required_provisioning(), key_type="dsa-1024")
    )
    store = store_of(config)
    store.ensure()
    manifest = Manifest(
        thing_name="bar-" + "c" * 64,
        certificate_id="c" * 64,
        endpoint="localhost",
        not_after="2030-01-01T00:00:00Z",
        key_reference="file:private.key",
        template="T",
        device_configuration={},
        provisioned_at="2029-01-01T00:00:00Z",
    )
    generation = Generation(1, tmp_path / "g1", manifest, tmp_path / "g1/certificate.pem", tmp_path / "g1/key")
    session = cast(Session, None)  # never reached: the key step comes first
    caplog.set_level(logging.DEBUG, logger="fleetprov")

    with pytest.raises(RotationBug) as raised:
        asyncio.run(rotate(config, store, generation, session, {}))

    assert isinstance(raised.value, FleetprovError)
    assert not raised.value.transient  # tried again an hour later, not in a tight loop
    assert raised.value.step == "rotation"
    assert "ValueError: unknown key type 'dsa-1024'" in str(raised.value)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == [
        "rotation: unexpected ValueError: unknown key type 'dsa-1024': a bug in fleetprov, please report it "
        "(log_level debug shows its traceback)"
    ]
    assert not any(record.exc_info for record in errors)
    assert [record.levelno for record in caplog.records if record.exc_info] == [logging.DEBUG]
    assert not [path for path in (tmp_path / "state").iterdir() if path.name.startswith("staging")]
    assert store.generations() == []
