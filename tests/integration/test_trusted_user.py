"""Fleet provisioning by trusted user end to end: the emulator issues a temporary claim
(`fleetprov emulator create-provisioning-claim`, as CreateProvisioningClaim), the installer hands it to the device
(`fleetprov claim install`), and the waiting daemon provisions with it at once. An expired claim is reported,
removed, and the daemon waits for the next one. Real processes over mutual TLS."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import yaml

from tests.agentprocess import manifest_of
from tests.support import Emulator, device_config, fleetprov

FAST = {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1}
SHORT = 5  # seconds a "late" claim is valid: long enough to install it on a loaded machine, short to wait out


def _trusted_user_config(emulator: Emulator, directory: Path) -> Path:
    config = device_config(emulator, directory, "--inbox", str(directory / "inbox"))
    settings = yaml.safe_load(config.read_text())
    assert settings["claim"] == {"inbox": str(directory / "inbox")}
    settings["daemon"] = FAST
    config.write_text(yaml.safe_dump(settings))
    return config


def _temporary_claim(emulator: Emulator, out: Path, validity: float = 300) -> dict[str, Any]:
    issued: dict[str, Any] = emulator.admin(
        "create-provisioning-claim", "--template", emulator.templates[0], "--out", str(out),
        "--validity", str(validity),
    )  # fmt: skip
    return issued


def _sleep_past(issued: dict[str, Any]) -> None:
    """Until the claim has expired (its expiration has whole seconds: one more to be sure)."""
    expiration = dt.datetime.fromisoformat(issued["expiration"].replace("Z", "+00:00"))
    time.sleep(max(0.0, (expiration - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1)


def _install(config: Path, claim: Path) -> None:
    done = fleetprov("claim", "install", "--config", str(config),
                     "--certificate", str(claim / "claim.pem"), "--key", str(claim / "claim.key"))  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_waiting_daemon_provisions_with_an_installed_claim(
    emulator: Emulator, start_agent: object, tmp_path: Path
) -> None:
    config = _trusted_user_config(emulator, tmp_path / "device")
    alone = fleetprov("--once", "--config", str(config))
    assert alone.returncode == 75, alone.stderr  # no claim yet: try again later
    assert "no temporary claim in" in alone.stderr and "fleetprov claim install" in alone.stderr

    agent = start_agent(config)  # type: ignore[operator]
    agent.wait_for(f"STATUS=waiting for a temporary claim in {tmp_path / 'device' / 'inbox'} (fleetprov claim install)")
    issued = _temporary_claim(emulator, tmp_path / "installer")
    _install(config, tmp_path / "installer")
    agent.wait_for("READY=1")

    manifest = manifest_of(tmp_path / "device" / "state")
    things = {thing["thingName"] for thing in emulator.admin("things")}
    assert manifest["thing_name"] in things
    assert issued["certificateId"][:12] in agent.log()  # "provisioning with the temporary claim <id>"
    assert not (tmp_path / "device" / "inbox" / "pending").exists()  # used once, then removed
    assert agent.stop() == 0, agent.log()
    assert "Traceback" not in agent.log()


def test_an_expired_claim_is_reported_and_the_daemon_waits_for_the_next(
    emulator: Emulator, start_agent: object, tmp_path: Path
) -> None:
    config = _trusted_user_config(emulator, tmp_path / "device")
    late = _temporary_claim(emulator, tmp_path / "late", validity=SHORT)
    _install(config, tmp_path / "late")
    _sleep_past(late)  # the installer was too slow: the claim's five minutes (here a few seconds) are over

    once = fleetprov("--once", "--config", str(config))
    assert once.returncode == 75, once.stderr
    assert "expired" in once.stderr and "Traceback" not in once.stderr
    assert not (tmp_path / "device" / "inbox" / "pending").exists()
    assert not (tmp_path / "device" / "state" / "current").exists()

    late_again = _temporary_claim(emulator, tmp_path / "late-again", validity=SHORT)
    _install(config, tmp_path / "late-again")
    _sleep_past(late_again)
    agent = start_agent(config)  # type: ignore[operator]
    agent.wait_for_log("expired")
    agent.wait_for(f"STATUS=waiting for a temporary claim in {tmp_path / 'device' / 'inbox'} (fleetprov claim install)")
    _temporary_claim(emulator, tmp_path / "on-time")
    _install(config, tmp_path / "on-time")
    agent.wait_for("READY=1")
    assert manifest_of(tmp_path / "device" / "state")["thing_name"]
    assert agent.stop() == 0, agent.log()
