"""Tests for the fault knob ``reply_overrides_file``: a JSON file, read again at every request, that changes the
fields (or the whole payload) of an operation's accepted replies. Driven through ProvisioningService.handle()."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from fleetprov.emulator.ca import CaMaterial, ensure_ca_material
from fleetprov.emulator.cli import add_emulator_commands
from fleetprov.emulator.faults import FaultConfig, Faults, ReplyOverride, load_reply_overrides
from fleetprov.emulator.service import Reply, parse_request_topic
from fleetprov.emulator.settings import load_settings, with_flags
from fleetprov.errors import ConfigError
from tests.unit.serve_flags import flags
from tests.unit.test_service import (
    CREATE_CSR_FIELDS,
    CREATE_KEYS_FIELDS,
    CSR_TOPIC,
    KEYS_TOPIC,
    REGISTER_FIELDS,
    Env,
    encode,
    make_csr,
    make_env,
    rejection,
)

LOGGER = "fleetprov.emulator.faults"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaMaterial:
    return ensure_ca_material(tmp_path_factory.mktemp("state"))


@pytest.fixture
def overrides(tmp_path: Path) -> Path:
    return tmp_path / "overrides.json"


@pytest.fixture
def env(tmp_path: Path, ca: CaMaterial, overrides: Path) -> Iterator[Env]:
    environment = make_env(tmp_path, ca.issuing, Faults(FaultConfig(reply_overrides_file=overrides)))
    yield environment
    environment.registry.close()


def write(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document))


def raw_reply(env: Env, topic: str = CSR_TOPIC) -> Reply:
    """The reply to a good CreateCertificateFromCsr request, payload undecoded."""
    request = parse_request_topic(topic)
    assert request is not None
    payload = encode({"certificateSigningRequest": make_csr()}, request.payload_format)
    return asyncio.run(env.service.handle(request, payload, env.caller))


def csr_fields(env: Env) -> dict[str, Any]:
    reply = raw_reply(env)
    assert reply.accepted
    body: dict[str, Any] = json.loads(reply.payload)
    return body


# --- fields --------------------------------------------------------------------------------------


def test_fields_are_replaced_removed_and_added(env: Env, overrides: Path) -> None:
    write(overrides, {"CreateCertificateFromCsr": {"certificateId": 42, "certificatePem": None, "extra": [1, {}]}})
    reply, body = env.send(CSR_TOPIC, {"certificateSigningRequest": make_csr()})
    assert reply.accepted and reply.topic == f"{CSR_TOPIC}/accepted"
    assert body["certificateId"] == 42
    assert "certificatePem" not in body
    assert body["extra"] == [1, {}]
    assert isinstance(body["certificateOwnershipToken"], str)  # untouched
    # The service did its work: the certificate exists, only the reply is wrong about it.
    assert len(env.registry.certificates()) == 1


def test_only_the_named_operation_changes(env: Env, overrides: Path) -> None:
    write(overrides, {"RegisterThing": {"thingName": 7}})
    created = env.create_from_csr()
    assert set(created) == CREATE_CSR_FIELDS
    reply, body = env.register("demo", created["certificateOwnershipToken"], {"SerialNumber": "0001"})
    assert reply.accepted, body
    assert set(body) == REGISTER_FIELDS and body["thingName"] == 7
    assert [thing.name for thing in env.registry.things()] == ["fleetprov-0001"]


def test_create_keys_and_certificate(env: Env, overrides: Path) -> None:
    write(overrides, {"CreateKeysAndCertificate": {"privateKey": "not a key"}})
    reply, body = env.send(KEYS_TOPIC, b"")
    assert reply.accepted, body
    assert set(body) == CREATE_KEYS_FIELDS and body["privateKey"] == "not a key"


def test_cbor_replies_carry_the_override(env: Env, overrides: Path) -> None:
    write(overrides, {"CreateCertificateFromCsr": {"certificateId": {"nested": True}}})
    reply = raw_reply(env, "$aws/certificates/create-from-csr/cbor")
    assert reply.accepted
    assert cbor2.loads(reply.payload)["certificateId"] == {"nested": True}


def test_rejections_are_not_overridden(env: Env, overrides: Path) -> None:
    write(overrides, {"RegisterThing": {"thingName": "x", "$raw": base64.b64encode(b"raw").decode()}})
    reply, body = env.register("demo", "no-such-token", {"SerialNumber": "0001"})
    assert rejection(reply, body)[:2] == (400, "InvalidCertificateOwnershipToken")


# --- $raw ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"\xff\xfe not UTF-8", b"<html>not json</html>", b"", b"[1, 2]"])
def test_raw_replaces_the_whole_payload(env: Env, overrides: Path, payload: bytes) -> None:
    # "$raw" wins over the fields beside it.
    write(overrides, {"CreateCertificateFromCsr": {"$raw": base64.b64encode(payload).decode(), "ignored": 1}})
    reply = raw_reply(env)
    assert reply.accepted and reply.topic == f"{CSR_TOPIC}/accepted"
    assert reply.payload == payload


# --- read at every request -----------------------------------------------------------------------


def test_the_file_is_read_again_at_every_request(env: Env, overrides: Path) -> None:
    assert set(csr_fields(env)) == CREATE_CSR_FIELDS  # no file yet
    write(overrides, {"CreateCertificateFromCsr": {"certificateId": "first"}})
    assert csr_fields(env)["certificateId"] == "first"
    write(overrides, {"CreateCertificateFromCsr": {"certificateId": "second"}})
    assert csr_fields(env)["certificateId"] == "second"
    write(overrides, {})
    assert len(csr_fields(env)["certificateId"]) == 64
    overrides.unlink()
    assert len(csr_fields(env)["certificateId"]) == 64


def test_missing_file_changes_nothing_and_is_logged_once(
    env: Env, overrides: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(3):
        assert set(csr_fields(env)) == CREATE_CSR_FIELDS
    notes = [record for record in caplog.records if "does not exist" in record.getMessage()]
    assert len(notes) == 1 and str(overrides) in notes[0].getMessage()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "Expecting property name"),
        (b"\xff\xfe", "codec can't decode"),
        (b"[]", "expected a JSON object of operations, got list"),
        (b'{"DeleteThing": {}}', "'DeleteThing' is not one of"),
        (b'{"RegisterThing": []}', "RegisterThing: expected an object of reply fields, got list"),
        (b'{"RegisterThing": {"$raw": 5}}', "RegisterThing.$raw: expected a base64 string"),
        (b'{"RegisterThing": {"$raw": "not base64!"}}', "RegisterThing.$raw: not base64"),
    ],
)
def test_unusable_file_changes_nothing_and_is_logged_once(
    env: Env, overrides: Path, caplog: pytest.LogCaptureFixture, content: bytes, problem: str
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    overrides.write_bytes(content)
    for _ in range(2):
        assert set(csr_fields(env)) == CREATE_CSR_FIELDS
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert problem in warnings[0].getMessage() and "replies are unchanged" in warnings[0].getMessage()

    # Repaired, the file applies again; broken again, it is reported again.
    write(overrides, {"CreateCertificateFromCsr": {"certificateId": "repaired"}})
    assert csr_fields(env)["certificateId"] == "repaired"
    overrides.write_bytes(content)
    csr_fields(env)
    assert len([record for record in caplog.records if record.levelno == logging.WARNING]) == 2


def test_load_reply_overrides(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    write(path, {"RegisterThing": {"thingName": None, "$raw": "AAE="}, "CreateKeysAndCertificate": {}})
    assert load_reply_overrides(path) == {
        "RegisterThing": ReplyOverride({"thingName": None}, b"\x00\x01"),
        "CreateKeysAndCertificate": ReplyOverride({}),
    }
    assert ReplyOverride({"a": None, "b": 2}).applied_to({"a": 1, "c": 3}) == {"b": 2, "c": 3}


# --- settings and flags --------------------------------------------------------------------------


def test_yaml_path_is_relative_to_the_yaml_file(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "emulator.yaml"
    config.parent.mkdir()
    config.write_text("faults:\n  reply_overrides_file: fuzz/overrides.json\n")
    settings = load_settings(config, tmp_path / "state")
    assert settings.faults.reply_overrides_file == tmp_path / "conf" / "fuzz" / "overrides.json"


def test_yaml_wrong_type_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "emulator.yaml"
    config.write_text("faults:\n  reply_overrides_file: [a]\n")
    with pytest.raises(ConfigError, match=r"faults\.reply_overrides_file: expected"):
        load_settings(config, tmp_path / "state")


def test_flag_wins_over_yaml(tmp_path: Path) -> None:
    config = tmp_path / "emulator.yaml"
    config.write_text("faults:\n  reply_overrides_file: from-yaml.json\n")
    base = load_settings(config, tmp_path / "state")
    assert with_flags(base, **flags()).faults.reply_overrides_file == tmp_path / "from-yaml.json"
    flagged = with_flags(base, **flags(reply_overrides=Path("/x/flag.json")))
    assert flagged.faults.reply_overrides_file == Path("/x/flag.json")


def test_serve_flag() -> None:
    parser = argparse.ArgumentParser()
    add_emulator_commands(parser)
    args = parser.parse_args(["serve", "--state-dir", "s", "--reply-overrides", "o.json"])
    assert args.reply_overrides == Path("o.json")
    assert parser.parse_args(["serve", "--state-dir", "s"]).reply_overrides is None
