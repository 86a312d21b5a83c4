"""The thing policy variables resolve as on AWS, over real connections: only when the client id is the thing
name, unless the certificate is attached to its thing exclusively (``emulator attach-thing-principal``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import Emulator, RawClient, connect, fleetprov, key_pem, provision_csr, write_identity

REFUSED = r"(?i)refused|not.?authori|closed|protocol"
THING = "${iot:Connection.Thing.ThingName}"


def _device(emulator: Emulator, directory: Path, serial: str, template: str) -> tuple[str, Path, Path, str]:
    """Provision a device with ``template``; returns its thing name, certificate and key files, certificate id."""
    reply, pem, key, certificate_id = provision_csr(emulator, f"vars-{serial}", {"SerialNumber": serial}, template)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_path = write_identity(directory, pem, key_pem(key))
    return reply.thing_name, cert, key_path, certificate_id


def _round_trip(client: RawClient, topic: str) -> None:
    """Subscribe, publish and receive on ``topic``: Subscribe, Publish and Receive all allowed."""
    assert client.subscribe(topic) == 1
    client.publish(topic, b"{}").result(20)
    assert client.next_message() == (topic, b"{}")


def test_the_client_id_names_the_thing_under_the_demo_policy(emulator: Emulator, tmp_path: Path) -> None:
    """The demo template's policy allows iot:Connect on client/${iot:Connection.Thing.ThingName}. On AWS the
    variable is the attached thing the client id names, not any attached thing, and nothing for another client id."""
    own, cert, key, certificate_id = _device(emulator, tmp_path / "own", "vars-own", "fleetprov-demo")
    other, *_ = _device(emulator, tmp_path / "other", "vars-another", "fleetprov-demo")
    assert other < own  # the thing listed first for the certificate is not its own
    emulator.admin("attach-thing-principal", other, certificate_id)
    for thing in (own, other):
        device = RawClient(emulator, cert, key, thing)
        try:
            _round_trip(device, f"devices/{thing}/telemetry")
        finally:
            device.close()
    with pytest.raises(Exception, match=REFUSED):
        connect(emulator, cert, key, f"{own}-telemetry").disconnect().result(10)


@pytest.fixture
def apps_template(tmp_path: Path) -> Path:
    """The demo template with a policy that lets the device's applications connect as <thing>-<anything>."""
    template: dict[str, Any] = json.loads(
        (Path(__file__).parents[2] / "fleetprov/emulator/data/demo-template.json").read_text()
    )
    template["Resources"]["policy"]["Properties"]["PolicyDocument"]["Statement"] = [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"arn:aws:iot:*:*:client/{THING}-*"},
        {"Effect": "Allow", "Action": "iot:*", "Resource": f"arn:aws:iot:*:*:topic/devices/{THING}/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"arn:aws:iot:*:*:topicfilter/devices/{THING}/*"},
    ]
    path = tmp_path / "apps-template.json"
    path.write_text(json.dumps(template))
    return path


def test_an_exclusive_attachment_resolves_the_thing_for_any_client_id(
    emulator_with: Any, apps_template: Path, tmp_path: Path
) -> None:
    emulator = emulator_with("--template", f"apps={apps_template}")
    thing, cert, key, certificate_id = _device(emulator, tmp_path, "vars-apps", "apps")
    application = f"{thing}-telemetry"
    # RegisterThing attaches non-exclusively: client/${ThingName}-* matches nothing for this client id.
    with pytest.raises(Exception, match=REFUSED):
        connect(emulator, cert, key, application).disconnect().result(10)

    emulator.admin("attach-thing-principal", thing, certificate_id, "--thing-principal-type", "EXCLUSIVE_THING")
    client = RawClient(emulator, cert, key, application)
    try:
        _round_trip(client, f"devices/{thing}/telemetry")
        # The variable is the thing's name, not the client id: a topic of the client id is not allowed.
        client.publish(f"devices/{application}/telemetry", b"{}")
        assert client.interrupted.wait(20), "an unauthorised publish left the connection open"
    finally:
        client.close()


def test_attach_thing_principal_errors(emulator: Emulator, tmp_path: Path) -> None:
    thing, _, _, certificate_id = _device(emulator, tmp_path / "own", "vars-errors", "fleetprov-demo")
    other, *_ = _device(emulator, tmp_path / "other", "vars-errors-other", "fleetprov-demo")
    state = ("--state-dir", str(emulator.state_dir))
    exclusive = ("--thing-principal-type", "EXCLUSIVE_THING")
    for args, message in [
        (("no-such-thing", certificate_id), "no thing named 'no-such-thing'"),
        ((thing, "0" * 64), f"no certificate with id {'0' * 64}"),
        ((other, certificate_id, *exclusive), f"certificate {certificate_id} is attached to {thing}: an EXCLUSIVE"),
    ]:
        result = fleetprov("emulator", "attach-thing-principal", *state, *args)
        assert result.returncode == 78
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    (record,) = [c for c in emulator.admin("certificates") if c["certificateId"] == certificate_id]
    assert record["things"] == [thing]
