"""`fleetprov run`, the daemon, as systemd runs it: a real process with NOTIFY_SOCKET bound to a real AF_UNIX
datagram socket of the test, WATCHDOG_USEC set, against the emulator over mutual TLS; stopped with SIGTERM,
reloaded with SIGHUP, its connection taken away by a second connection with the same client id (AWS IoT,
like the emulator, closes the older of two)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import yaml

from tests.support import Emulator, connect, device_config


def _thing_identity(state: Path) -> tuple[Path, Path]:
    generation = (state / "current").resolve()
    return generation / "certificate.pem", generation / "private.key"


def test_ready_only_once_connected_then_watchdog_and_clean_stop(
    emulator: Emulator, start_agent: object, tmp_path: Path
) -> None:
    config = device_config(emulator, tmp_path / "device", "--serial", "daemon-ready")
    agent = start_agent(config)  # type: ignore[operator]
    ready = agent.wait_for("READY=1")
    before = agent.messages[:ready]
    # STATUS told the steps in words before READY; READY came after the permanent identity connected.
    statuses = [line for message in before for line in message.splitlines() if line.startswith("STATUS=")]
    assert any("provisioning" in status for status in statuses), statuses
    assert any("connecting to" in status for status in statuses), statuses
    assert (tmp_path / "device" / "state" / "current").is_symlink()
    assert "client 'fleetprov-daemon-ready' connected: device certificate" in emulator.log()
    assert any(
        line.startswith("STATUS=connected as fleetprov-daemon-ready") for line in agent.messages[ready].splitlines()
    )
    # WATCHDOG=1 keeps coming while it runs (every 0.2 s; counted loosely, no timing is asserted).
    first = agent.wait_for("WATCHDOG=1", after=ready)
    agent.wait_for("WATCHDOG=1", after=first + 1)
    assert agent.stop() == 0, agent.log()
    assert "STOPPING=1" in agent.messages[-1].splitlines(), agent.messages[-3:]
    assert "Traceback" not in agent.log()


def test_reconnects_when_the_connection_is_taken_away(emulator: Emulator, start_agent: object, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path / "device", "--serial", "daemon-lost")
    settings = yaml.safe_load(config.read_text())
    settings["daemon"] = {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1}
    config.write_text(yaml.safe_dump(settings))
    agent = start_agent(config)  # type: ignore[operator]
    ready = agent.wait_for("READY=1")
    certificate, key = _thing_identity(tmp_path / "device" / "state")
    intruder = connect(emulator, certificate, key, "fleetprov-daemon-lost")  # closes the daemon's connection
    try:
        agent.wait_for_log("connection lost")
        agent.wait_for("READY=1", after=ready + 1)  # connected again (which in turn closes the intruder)
    finally:
        intruder.disconnect()
    agent.wait_for_log("connected to localhost", count=2)
    assert agent.stop() == 0, agent.log()


def test_sighup_reloads_the_configuration(emulator: Emulator, start_agent: object, tmp_path: Path) -> None:
    config = device_config(emulator, tmp_path / "device", "--serial", "daemon-reload")
    agent = start_agent(config)  # type: ignore[operator]
    ready = agent.wait_for("READY=1")
    good = config.read_text()
    config.write_text(good + "unknown_key: 1\n")  # a broken file: the running configuration stays
    agent.process.send_signal(signal.SIGHUP)
    reloading = agent.wait_for("RELOADING=1", after=ready)
    agent.wait_for_log("reload: keeping the configuration in use")
    agent.wait_for("READY=1", after=reloading)
    settings = yaml.safe_load(good)
    settings["device"] = {"client_id": "fleetprov-daemon-reload"}  # explicit now; same policy-allowed id
    settings["log_level"] = "debug"
    config.write_text(yaml.safe_dump(settings))
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for_log("reload: configuration re-read")
    agent.wait_for_log("connected to localhost", count=3)
    assert agent.stop() == 0, agent.log()
    assert "Traceback" not in agent.log()


def test_state_directory_deleted_under_the_daemon(emulator: Emulator, start_agent: object, tmp_path: Path) -> None:
    """Connected, the agent goes on with what it loaded; at the next connection it finds the identity gone and
    exits 73 naming it (systemd's restart then starts from scratch, as a first boot does). Nothing recreated."""
    config = device_config(emulator, tmp_path / "device", "--serial", "daemon-deleted")
    settings = yaml.safe_load(config.read_text())
    settings["daemon"] = {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1}
    config.write_text(yaml.safe_dump(settings))
    agent = start_agent(config)  # type: ignore[operator]
    agent.wait_for("READY=1")
    state = tmp_path / "device" / "state"
    certificate, key = _thing_identity(state)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "c.pem").write_bytes(certificate.read_bytes())
    (copy / "k.pem").write_bytes(key.read_bytes())
    shutil.rmtree(state)
    intruder = connect(emulator, copy / "c.pem", copy / "k.pem", "fleetprov-daemon-deleted")
    try:
        assert agent.wait_exit() == 73, agent.log()
    finally:
        intruder.disconnect()
    final = agent.log().strip().splitlines()[-1]
    assert final.startswith("fleetprov: connect: ") and "has gone" in final and str(state) in final, final
    assert not state.exists()
    assert any("STOPPING=1" in message.splitlines() for message in agent.messages)
