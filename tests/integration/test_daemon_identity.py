"""The daemon keeps the device's identity: it provisions anew when the permanent certificate is refused
(revoked, here with `fleetprov emulator set-certificate-status`), and rotates a certificate that is near its
not-after over the permanent connection. Real `fleetprov run` processes against the emulator over mutual TLS;
the identity is checked in the state directory and in the emulator's registry."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pkcs11 import Attribute, ObjectClass

from fleetprov.keys.pkcs11 import open_token
from tests.agentprocess import first_rotation, manifest_of
from tests.softhsm import make_token
from tests.support import Emulator, device_config, fleetprov

FAST = {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1}


def _config(emulator: Emulator, directory: Path, serial: str, *options: str, **changes: Any) -> Path:
    config = device_config(emulator, directory, "--serial", serial, *options)
    settings = yaml.safe_load(config.read_text())
    for section, values in {"daemon": FAST, **changes}.items():
        settings[section] = {**(settings.get(section) or {}), **values}
    config.write_text(yaml.safe_dump(settings))
    return config


def _statuses(emulator: Emulator) -> dict[str, str]:
    return {entry["certificateId"]: entry["status"] for entry in emulator.admin("certificates")}


def _fingerprint(certificate: Path) -> str:
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(certificate)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_a_revoked_certificate_is_replaced_through_the_claim(
    emulator: Emulator, start_agent: object, tmp_path: Path
) -> None:
    state = tmp_path / "device" / "state"
    config = _config(emulator, tmp_path / "device", "daemon-revoked")
    agent = start_agent(config)  # type: ignore[operator]
    ready = agent.wait_for("READY=1")
    first = manifest_of(state)
    emulator.admin("set-certificate-status", first["certificate_id"], "REVOKED")
    # The emulator closes the connection (as AWS IoT does); three refused reconnects; `fleetprov reprovision`.
    agent.wait_for_log("refused (1 of 3)")
    agent.wait_for_log("provisioning anew with the claim")
    agent.wait_for("READY=1", after=ready + 1)
    second = manifest_of(state)
    assert second["thing_name"] == first["thing_name"]
    assert second["certificate_id"] != first["certificate_id"]
    assert os.readlink(state / "current") == "generations/2"
    assert manifest_of(state, "1") == first  # the old generation stays, for rollback
    statuses = _statuses(emulator)
    assert statuses[first["certificate_id"]] == "REVOKED"
    assert statuses[second["certificate_id"]] == "ACTIVE"
    statuses_told = [line for message in agent.messages for line in message.splitlines() if "anew" in line]
    assert any(line.startswith("STATUS=provisioning anew with the claim") for line in statuses_told), agent.messages
    assert agent.stop() == 0, agent.log()
    assert "Traceback" not in agent.log()

    rolled = fleetprov("rollback", "--config", str(config))
    assert rolled.returncode == 0, rolled.stderr
    assert "generation 2" in rolled.stdout and "-> generation 1" in rolled.stdout, rolled.stdout
    assert os.readlink(state / "current") == "generations/1"
    again = fleetprov("rollback", "--config", str(config))
    assert again.returncode == 64 and "nothing to roll back to" in again.stderr, again.stderr


def test_refused_with_no_claim_left_exits_77(emulator: Emulator, start_agent: object, tmp_path: Path) -> None:
    """claim.remove_after_success removes the claim key after the first commit; a refused certificate then
    cannot be replaced, and the daemon stops with 77 (RestartPreventExitStatus keeps it down) saying why."""
    state = tmp_path / "device" / "state"
    claim_key = tmp_path / "claim.key"  # the device's own copy: it is going to be removed
    claim_key.write_bytes(emulator.claim_key.read_bytes())
    claim_key.chmod(0o600)
    config = _config(
        emulator, tmp_path / "device", "daemon-no-claim", daemon={**FAST, "reprovision_after": 2},
        claim={"remove_after_success": True, "private_key": str(claim_key)},
    )  # fmt: skip
    agent = start_agent(config)  # type: ignore[operator]
    agent.wait_for("READY=1")
    assert not claim_key.exists()
    emulator.admin("set-certificate-status", manifest_of(state)["certificate_id"], "INACTIVE")
    assert agent.wait_exit() == 77, agent.log()
    assert "the claim key" in agent.log() and "is gone (claim.remove_after_success)" in agent.log()
    assert os.readlink(state / "current") == "generations/1"
    assert sorted(path.name for path in (state / "generations").iterdir()) == ["1"]


def test_reprovision_command_keeps_the_old_generation(emulator: Emulator, tmp_path: Path) -> None:
    state = tmp_path / "device" / "state"
    config = _config(emulator, tmp_path / "device", "reprovision-command")
    assert fleetprov("--once", "--config", str(config)).returncode == 0
    first = manifest_of(state)
    done = fleetprov("reprovision", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "provisioned: thing fleetprov-reprovision-command" in done.stdout
    assert "stays for rollback" in done.stderr
    second = manifest_of(state)
    assert second["certificate_id"] != first["certificate_id"]
    assert _statuses(emulator)[first["certificate_id"]] == "ACTIVE"  # nothing revoked it: both work
    # A third run keeps two generations: the current one and the one before it.
    assert fleetprov("reprovision", "--config", str(config)).returncode == 0
    assert sorted(path.name for path in (state / "generations").iterdir()) == ["2", "3"]
    assert _fingerprint(state / "current" / "certificate.pem") != _fingerprint(
        state / "generations" / "2" / "certificate.pem"
    )


def _rotating_template(directory: Path) -> Path:
    """The emulator's demo template whose policy also lets the device rotate its own certificate:
    CreateCertificateFromCsr and RegisterThing with this template, over its permanent connection."""
    template = json.loads((Path(__file__).parents[2] / "fleetprov/emulator/data/demo-template.json").read_text())
    topics = ["$aws/certificates/create-from-csr/*", "$aws/provisioning-templates/rotating/provision/*"]
    statements = template["Resources"]["policy"]["Properties"]["PolicyDocument"]["Statement"]
    statements += [
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": [f"arn:aws:iot:*:*:topic/{topic}" for topic in topics]},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": [f"arn:aws:iot:*:*:topicfilter/{topic}" for topic in topics]},
    ]  # fmt: skip
    path = directory / "rotating.json"
    path.write_text(json.dumps(template))
    return path


def test_a_certificate_near_its_not_after_is_rotated(
    emulator_with: object, start_agent: object, tmp_path: Path
) -> None:
    """Certificates valid for 30 s, rotated 12 s before not-after: about 18 s after provisioning (1.2 s earlier
    at most, at random) the daemon gets a new certificate over its connection, connects with it, commits it as
    generation 2 and runs the hooks; generation 1 stays."""
    emulator = emulator_with(  # type: ignore[operator]
        "--template", f"rotating={_rotating_template(tmp_path)}", "--certificate-validity", "30"
    )
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "10-record").write_text('#!/bin/sh\necho "$FLEETPROV_GENERATION $FLEETPROV_CERTIFICATE" >> "$0.out"\n')
    (hooks / "10-record").chmod(0o755)
    state = tmp_path / "device" / "state"
    config = _config(
        emulator, tmp_path / "device", "daemon-rotates", "--template", "rotating",
        daemon={**FAST, "rotate_before": 12}, hooks={"directory": str(hooks)},
    )  # fmt: skip
    agent, first, second = first_rotation(start_agent, config, state)
    assert second["thing_name"] == first["thing_name"] == "fleetprov-daemon-rotates"
    assert second["certificate_id"] != first["certificate_id"]
    assert second["not_after"] > first["not_after"]
    assert second["template"] == "rotating"
    assert os.readlink(state / "current") == "generations/2"
    assert manifest_of(state, "1") == first
    new_key = (state / "generations" / "2" / "private.key").read_bytes()
    assert new_key != (state / "generations" / "1" / "private.key").read_bytes()  # a new key, made on the device
    certificates = {entry["certificateId"]: entry for entry in emulator.admin("certificates")}
    assert certificates[second["certificate_id"]]["status"] == "ACTIVE"
    assert certificates[second["certificate_id"]]["things"] == ["fleetprov-daemon-rotates"]
    assert any(line.startswith("STATUS=rotating the certificate") for m in agent.messages for line in m.splitlines())
    connected = [line for m in agent.messages for line in m.splitlines() if line.startswith("STATUS=connected")]
    assert connected[-1].endswith("generation 2)"), connected
    assert agent.stop() == 0, agent.log()
    ran = (hooks / "10-record.out").read_text().splitlines()
    assert [line.split()[0] for line in ran] == ["1", "2"], ran
    assert "Traceback" not in agent.log()


def test_a_thing_name_longer_than_a_common_name_is_rotated(
    emulator_with: object, start_agent: object, tmp_path: Path
) -> None:
    """A thing name of 100 characters (AWS allows 128; X.509 64 in a CSR's common name): the CSR says a
    shortened name (keys.csr_common_name) and the rotation goes through, where the daemon used to die of a
    ValueError at its first rotation."""
    emulator = emulator_with(  # type: ignore[operator]
        "--template", f"rotating={_rotating_template(tmp_path)}", "--certificate-validity", "30"
    )
    serial = "long-" + "0123456789" * 8 + "abcde"  # the thing: "fleetprov-" + this, 100 characters
    state = tmp_path / "device" / "state"
    config = _config(
        emulator, tmp_path / "device", serial, "--template", "rotating", daemon={**FAST, "rotate_before": 12}
    )
    agent, first, second = first_rotation(start_agent, config, state)
    assert second["thing_name"] == first["thing_name"] == f"fleetprov-{serial}"
    assert len(first["thing_name"]) == 100
    assert second["certificate_id"] != first["certificate_id"]
    certificates = {entry["certificateId"]: entry for entry in emulator.admin("certificates")}
    assert certificates[second["certificate_id"]]["things"] == [first["thing_name"]]
    assert agent.stop() == 0, agent.log()
    assert "Traceback" not in agent.log()


def test_rotation_with_the_key_in_a_token(
    emulator_with: object, start_agent: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new key is made in the token under a label of its own (by a child process: awscrt holds the module
    in the daemon), the old key stays for rollback, and the new identity connects through the token."""
    token = make_token(tmp_path / "hsm", monkeypatch, pin="pin-" + tmp_path.name[-12:])
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    emulator = emulator_with(  # type: ignore[operator]
        "--template", f"rotating={_rotating_template(tmp_path)}", "--certificate-validity", "30"
    )
    state = tmp_path / "device" / "state"
    config = _config(
        emulator, tmp_path / "device", "daemon-token-rotates", "--template", "rotating",
        "--key-backend", "pkcs11", "--pkcs11-library", str(token.library), "--token-label", token.label,
        "--pin-file", str(pin_file), daemon={**FAST, "rotate_before": 12},
    )  # fmt: skip
    agent, first, second = first_rotation(start_agent, config, state)
    assert "object=fleetprov-device;" in first["key_reference"] + ";", first["key_reference"]
    assert "object=fleetprov-device-g2" in second["key_reference"], second["key_reference"]
    assert not (state / "generations" / "2" / "private.key").exists()
    with open_token(token.settings(), token.pin) as session:
        labels = sorted(key.label for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    assert labels == ["fleetprov-device", "fleetprov-device-g2"]
    assert agent.stop() == 0, agent.log()
    assert token.pin not in agent.log()
    assert "Traceback" not in agent.log()


def test_a_rotation_the_policy_forbids_keeps_the_old_identity(
    emulator_with: object, start_agent: object, tmp_path: Path
) -> None:
    """The demo template's policy does not allow the provisioning topics to the device certificate: the
    broker closes the connection at the rotation's first request. Generation 1 stays current and connected.
    rotate_before is longer than half the certificate's life: the rotation waits for half-life."""
    emulator = emulator_with("--certificate-validity", "40")  # type: ignore[operator]
    state = tmp_path / "device" / "state"
    config = _config(emulator, tmp_path / "device", "daemon-no-rotation", daemon={**FAST, "rotate_before": 35})
    agent = start_agent(config)  # type: ignore[operator]
    ready = agent.wait_for("READY=1")
    agent.wait_for_log("rotating it at half-life")  # 35 s of a 40 s life: not at once, and not again and again
    agent.wait_for_log("rotation failed, generation 1 stays current")
    agent.wait_for("READY=1", after=ready + 1)  # connected again with the old identity
    assert os.readlink(state / "current") == "generations/1"
    assert sorted(path.name for path in (state / "generations").iterdir()) == ["1"]
    assert not [path for path in state.iterdir() if path.name.startswith("staging-")]
    assert agent.stop() == 0, agent.log()
    assert "Traceback" not in agent.log()
