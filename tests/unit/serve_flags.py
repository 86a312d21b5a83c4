"""serve's flags as fleetprov.emulator.settings.with_flags takes them, for the unit tests of the emulator's settings."""

from __future__ import annotations

from typing import Any


def flags(**overrides: Any) -> dict[str, Any]:
    """Every flag unset (None, or no repetitions), but for ``overrides``."""
    values: dict[str, Any] = {
        "host": None,
        "port": None,
        "token_ttl": None,
        "templates": [],
        "hooks": [],
        "reply_delay": None,
        "close_after": None,
        "throttle": None,
        "rejects": [],
        "thing_groups": [],
    }
    values.update(overrides)
    return values
