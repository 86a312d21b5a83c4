"""configs/emulator.example.yaml is documentation users copy: it must load and do what its comments say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import register

EXAMPLE = Path(__file__).parent.parent.parent / "configs" / "emulator.example.yaml"


def test_example_config_provisions_a_widget(emulator_with: Any) -> None:
    emulator = emulator_with("--config", str(EXAMPLE))
    assert sorted(emulator.templates) == ["fleetprov-demo", "widget"]

    result = register(emulator, "widget", {"SerialNumber": "W42-EU"}, "widget-claim")
    assert result["thing"] == "widget-W42-EU"
    assert result["config"] == {
        "endpoint": "https://eu.example.invalid",
        "telemetryTopic": "widgets/widget-W42-EU/telemetry",
    }
    [thing] = emulator.admin("things")
    assert thing["thingGroups"] == ["widgets-eu"]
    assert thing["attributes"] == {"serialNumber": "W42-EU", "gdpr": "yes"}
    assert thing["billingGroup"] == "widget-billing"

    denied = register(emulator, "widget", {"SerialNumber": "X1"}, "widget-claim-2")
    assert denied["rejected"][:2] == (403, "AccessDenied")
