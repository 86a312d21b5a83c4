"""`fleetprov emulator create-provisioning-claim` (AWS CreateProvisioningClaim, fleet provisioning by trusted
user): the temporary claim it issues provisions through its one template, and nothing else; once expired, the
TLS handshake refuses it."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from fleetprov.emulator.settings import DEFAULT_TEMPLATE_PATH
from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX
from tests.support import Emulator, RawClient, fleetprov, make_csr, start_emulator

CSR_TOPIC = "$aws/certificates/create-from-csr/json"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


@pytest.fixture(scope="module")
def two_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """An emulator serving fleetprov-demo and other (the same template under two names)."""
    state = tmp_path_factory.mktemp("temporary-claim") / "state"
    running = start_emulator(
        state, "--template", f"fleetprov-demo={DEFAULT_TEMPLATE_PATH}", "--template", f"other={DEFAULT_TEMPLATE_PATH}"
    )
    yield running
    assert running.stop() == 0, running.log()


def create_claim(emulator: Emulator, out: Path, *options: str) -> Any:
    result = fleetprov(
        "emulator", "create-provisioning-claim", "--state-dir", str(emulator.state_dir), "--out", str(out), *options
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mqtt_connect(emulator: Emulator, cert: Path, key: Path, client_id: str) -> bytes:
    """Python's ssl with the emulator's root CA, then an MQTT 3.1.1 CONNECT: the first bytes the broker answers.

    Fails fast where awscrt would take seconds to report a refused handshake. With TLS 1.3 the server checks
    the client certificate after the client's handshake is done, so a refusal shows when reading."""
    context = ssl.create_default_context(cafile=str(emulator.root_ca))
    context.load_cert_chain(str(cert), str(key))
    identifier = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(identifier).to_bytes(2, "big") + identifier
    packet = b"\x10" + bytes([len(variable)]) + variable
    address = ("127.0.0.1", emulator.port)
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(packet)
        return tls.recv(4)


def test_a_temporary_claim_provisions_through_its_template_only(two_templates: Emulator, tmp_path: Path) -> None:
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    claim = create_claim(two_templates, tmp_path / "claim", "--template", "fleetprov-demo")
    after = dt.datetime.now(dt.timezone.utc)

    cert_path, key_path = Path(claim["certificatePath"]), Path(claim["keyPath"])
    assert (cert_path, key_path) == (tmp_path / "claim" / "claim.pem", tmp_path / "claim" / "claim.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    # 5 minutes from issue, backdated by 5 seconds only.
    assert before + dt.timedelta(minutes=5) <= certificate.not_valid_after_utc <= after + dt.timedelta(minutes=5)
    assert before - dt.timedelta(seconds=5) <= certificate.not_valid_before_utc <= after - dt.timedelta(seconds=5)
    assert claim["expiration"] == certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    listed = {cert["certificateId"]: cert for cert in two_templates.admin("certificates")}
    record = listed[claim["certificateId"]]
    assert record["kind"] == "claim" and record["status"] == "ACTIVE"
    assert record["policies"] == [f"fleetprov-temporary-claim-{claim['certificateId'][:16]}"]

    client = RawClient(two_templates, cert_path, key_path, CLAIM_CLIENT_ID_PREFIX + "temporary-device")
    try:
        topic, created = client.request(CSR_TOPIC, json.dumps({"certificateSigningRequest": make_csr()[0]}).encode())
        assert topic.endswith("/accepted")
        request = {"certificateOwnershipToken": created["certificateOwnershipToken"],
                   "parameters": {"SerialNumber": "trusted-user-1"}}  # fmt: skip
        topic, registered = client.request(
            "$aws/provisioning-templates/fleetprov-demo/provision/json", json.dumps(request).encode()
        )
        assert topic.endswith("/accepted"), registered
        assert registered["thingName"] == "fleetprov-trusted-user-1"
        # The other template exists and the built-in claim may use it; this claim may not.
        client.publish("$aws/provisioning-templates/other/provision/json", b"{}")
        assert client.interrupted.wait(20), "the connection stayed open after a publish for another template"
    finally:
        client.close()


def test_an_expired_temporary_claim_cannot_connect(two_templates: Emulator, tmp_path: Path) -> None:
    valid = create_claim(two_templates, tmp_path / "valid", "--template", "fleetprov-demo")
    short = create_claim(two_templates, tmp_path / "short", "--template", "fleetprov-demo", "--validity", "2")
    expiration = dt.datetime.strptime(short["expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert expiration - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(seconds=2)
    # The control: the same connection with a claim that is still valid gets its CONNACK.
    reply = mqtt_connect(
        two_templates, Path(valid["certificatePath"]), Path(valid["keyPath"]), CLAIM_CLIENT_ID_PREFIX + "valid"
    )
    assert reply == CONNACK_ACCEPTED

    while dt.datetime.now(dt.timezone.utc) <= expiration + dt.timedelta(seconds=1):
        time.sleep(0.2)
    try:
        reply = mqtt_connect(
            two_templates, Path(short["certificatePath"]), Path(short["keyPath"]), CLAIM_CLIENT_ID_PREFIX + "expired"
        )
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass  # asyncio closes a failed TLS handshake without sending the alert: mostly a bare EOF
    else:
        assert reply == b"", f"an expired temporary claim connected: {reply!r}"
    # Turned away before MQTT: the broker never saw the client, not even to refuse it (it logs the valid one).
    assert f"client '{CLAIM_CLIENT_ID_PREFIX}valid' connected" in two_templates.log()
    assert f"{CLAIM_CLIENT_ID_PREFIX}expired" not in two_templates.log()
    # Still registered ACTIVE: it is the handshake, not the registry, that turns it away.
    listed = {cert["certificateId"]: cert["status"] for cert in two_templates.admin("certificates")}
    assert listed[short["certificateId"]] == "ACTIVE"


def test_errors_write_nothing(two_templates: Emulator, tmp_path: Path) -> None:
    state = str(two_templates.state_dir)
    out = tmp_path / "out"
    count = len(two_templates.admin("certificates"))
    cases = [
        (["--template", "nope"], 78, "no provisioning template 'nope' (it has: fleetprov-demo, other)"),
        (["--template", "fleetprov-demo", "--validity", "0"], 64, "--validity: must be a positive number"),
        (["--template", "fleetprov-demo", "--validity", "nan"], 64, "--validity: must be a positive number"),
        (["--template", "fleetprov-demo", "--validity", "1e300"], 64, "--validity: 1e+300 seconds is too long"),
    ]
    for options, code, message in cases:
        result = fleetprov("emulator", "create-provisioning-claim", "--state-dir", state, "--out", str(out), *options)
        assert result.returncode == code, (options, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not out.exists()

    no_state = fleetprov("emulator", "create-provisioning-claim", "--state-dir", str(tmp_path / "none"),
                         "--out", str(out), "--template", "fleetprov-demo")  # fmt: skip
    assert no_state.returncode == 78 and "holds no emulator registry" in no_state.stderr
    assert not out.exists()

    for existing in ("claim.pem", "claim.key"):
        out.mkdir(exist_ok=True)
        (out / existing).write_text("keep me")
        result = fleetprov("emulator", "create-provisioning-claim", "--state-dir", state, "--out", str(out),
                           "--template", "fleetprov-demo")  # fmt: skip
        assert result.returncode == 73, result.stderr
        assert f"{out / existing} exists already; not overwriting it" in result.stderr
        assert sorted(path.name for path in out.iterdir()) == [existing]
        assert (out / existing).read_text() == "keep me"
        (out / existing).unlink()
    assert len(two_templates.admin("certificates")) == count
