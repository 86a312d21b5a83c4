"""When the daemon rotates: rotate_before ahead of not-after, up to a tenth (at most a day) earlier at random,
never before half the certificate's life, and never with rotate_before 0."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from fleetprov.config import Config, DaemonConfig
from fleetprov.rotation import rotation_due, rotation_template
from fleetprov.store import Generation, Manifest, iso_utc
from tests.unit.test_config import MINIMAL_YAML, load, write

DAY = 86400.0
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def _config(tmp_path: Path, **daemon: object) -> Config:
    config = load(write(tmp_path, MINIMAL_YAML))
    return dataclasses.replace(config, daemon=dataclasses.replace(DaemonConfig(), **daemon))


def _generation(lifetime_days: float) -> Generation:
    manifest = Manifest(
        thing_name="t",
        certificate_id="c" * 64,
        endpoint="e",
        not_after=iso_utc(T0 + dt.timedelta(days=lifetime_days)),
        key_reference="file:private.key",
        template="T",
        device_configuration={},
        provisioned_at=iso_utc(T0),
    )
    return Generation(1, Path("/g/1"), manifest, Path("/g/1/certificate.pem"), Path("/g/1/private.key"))


def test_off(tmp_path: Path) -> None:
    assert rotation_due(_config(tmp_path, rotate_before=0), _generation(365)) is None


@pytest.mark.parametrize(("before_days", "spread_days"), [(30, 1), (5, 0.5)])
def test_ahead_of_not_after_with_a_bounded_spread(tmp_path: Path, before_days: float, spread_days: float) -> None:
    config = _config(tmp_path, rotate_before=before_days * DAY)
    not_after = (T0 + dt.timedelta(days=365)).timestamp()
    dues = [rotation_due(config, _generation(365)) for _ in range(200)]
    latest, earliest = not_after - before_days * DAY, not_after - (before_days + spread_days) * DAY
    assert all(due is not None and earliest <= due <= latest for due in dues)
    assert len(set(dues)) > 1  # spread, not one moment for the whole fleet


def test_never_before_half_life(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    due = rotation_due(_config(tmp_path, rotate_before=30 * DAY), _generation(20))
    assert due == (T0 + dt.timedelta(days=10)).timestamp()
    assert "rotating it at half-life" in caplog.text


def test_template_defaults_to_the_provisioning_template(tmp_path: Path) -> None:
    assert rotation_template(_config(tmp_path)) == "T"
    assert rotation_template(_config(tmp_path, rotation_template="R")) == "R"
