"""Tests for fleetprov.emulator.registry: the emulator's SQLite registry of certificates, things and templates."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprov.emulator.registry import (
    SCHEMA_VERSION,
    CertificateRecord,
    Registry,
    TemplateRecord,
    ThingAttachment,
    ThingRecord,
)
from fleetprov.errors import EmulatorError

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(tmp_path / "registry.sqlite3")
    yield registry
    registry.close()


def add_pending(registry: Registry, certificate_id: str, *, expires_at: float, token: str = "") -> None:
    registry.add_certificate(
        certificate_id,
        PEM,
        status="PENDING_ACTIVATION",
        kind="device",
        created_at=expires_at - 3600,
        token_hash=token or f"hash-of-{certificate_id}",
        token_expires_at=expires_at,
        claim_certificate_id="claim",
    )


# --- certificates --------------------------------------------------------------------------------


def test_add_and_get_certificate(registry: Registry) -> None:
    registry.add_certificate(
        "abc",
        PEM,
        status="PENDING_ACTIVATION",
        kind="device",
        created_at=100.0,
        token_hash="h1",
        token_expires_at=3700.0,
        claim_certificate_id="claim-1",
    )
    expected = CertificateRecord("abc", PEM, "PENDING_ACTIVATION", "device", 100.0, 3700.0, "claim-1")
    assert registry.certificate("abc") == expected
    assert registry.certificate_by_token("h1") == expected
    assert registry.certificate("nope") is None
    assert registry.certificate_by_token("h2") is None


def test_claim_certificate_has_no_token(registry: Registry) -> None:
    registry.add_certificate("claim", PEM, status="ACTIVE", kind="claim", created_at=1.0)
    assert registry.certificate("claim") == CertificateRecord("claim", PEM, "ACTIVE", "claim", 1.0, None, None)


def test_certificates_are_listed_oldest_first(registry: Registry) -> None:
    for certificate_id, created_at in (("b", 2.0), ("c", 3.0), ("a", 1.0)):
        registry.add_certificate(certificate_id, PEM, status="ACTIVE", kind="device", created_at=created_at)
    assert [record.certificate_id for record in registry.certificates()] == ["a", "b", "c"]


@pytest.mark.parametrize("status", ["ACTIVE", "INACTIVE", "REVOKED", "PENDING_ACTIVATION"])
def test_set_certificate_status(registry: Registry, status: str) -> None:
    add_pending(registry, "abc", expires_at=10.0)
    registry.set_certificate_status("abc", status)
    record = registry.certificate("abc")
    assert record is not None
    assert record.status == status


def test_set_certificate_status_rejects_unknown_status(registry: Registry) -> None:
    add_pending(registry, "abc", expires_at=10.0)
    with pytest.raises(EmulatorError, match=r"^unknown certificate status 'active' \(one of ACTIVE, INACTIVE, "):
        registry.set_certificate_status("abc", "active")
    record = registry.certificate("abc")
    assert record is not None
    assert record.status == "PENDING_ACTIVATION"


def test_set_certificate_status_rejects_unknown_id(registry: Registry) -> None:
    with pytest.raises(EmulatorError, match=r"^no certificate with id missing$"):
        registry.set_certificate_status("missing", "ACTIVE")


def test_delete_expired_pending(registry: Registry) -> None:
    now = 1000.0
    add_pending(registry, "expired", expires_at=now - 1)
    add_pending(registry, "expired-too", expires_at=now - 0.001)
    add_pending(registry, "expires-now", expires_at=now)
    add_pending(registry, "valid", expires_at=now + 60)
    add_pending(registry, "activated", expires_at=now - 1)
    registry.set_certificate_status("activated", "ACTIVE")
    add_pending(registry, "inactive", expires_at=now - 1)
    registry.set_certificate_status("inactive", "INACTIVE")
    registry.add_certificate("claim", PEM, status="PENDING_ACTIVATION", kind="claim", created_at=0.0)
    registry.put_policy("p", "{}")
    for certificate_id in ("expired", "valid", "activated"):
        registry.attach_policy("p", certificate_id)
        registry.attach_thing_principal("thing", certificate_id)

    deleted = registry.delete_expired_pending(now)

    assert sorted(deleted) == ["expired", "expired-too"]
    assert registry.certificate("expired") is None
    assert registry.certificate("expired-too") is None
    remaining = {record.certificate_id for record in registry.certificates()}
    assert remaining == {"expires-now", "valid", "activated", "inactive", "claim"}
    assert registry.principals_of_thing("thing") == ["activated", "valid"]
    assert registry.policies_for_certificate("expired") == []
    assert registry.policies_for_certificate("valid") == [("p", "{}")]
    assert registry.things_for_certificate("expired") == []
    assert registry.delete_expired_pending(now) == []
    # A late RegisterThing can still learn that its token expired (and which certificate went with it).
    assert registry.expired_token_certificate("hash-of-expired") == "expired"
    assert registry.expired_token_certificate("hash-of-expired-too") == "expired-too"
    assert registry.expired_token_certificate("hash-of-valid") is None
    assert registry.expired_token_certificate("hash-of-activated") is None


def test_expired_token_certificate_is_none_for_unknown_tokens(registry: Registry) -> None:
    assert registry.expired_token_certificate("never-issued") is None


# --- things and groups ---------------------------------------------------------------------------


def test_put_and_get_thing(registry: Registry) -> None:
    registry.add_named("thing_groups", ["b-group", "a-group"])
    registry.put_thing(
        "thing-1",
        thing_type="sensor",
        attributes={"serial": "0001", "site": "lab"},
        billing_group="billing",
        groups=["b-group", "a-group"],
        now=5.0,
    )
    assert registry.thing("thing-1") == ThingRecord(
        name="thing-1",
        thing_type="sensor",
        attributes={"serial": "0001", "site": "lab"},
        billing_group="billing",
        groups=("a-group", "b-group"),
        version=1,
    )
    assert registry.thing("thing-2") is None


def test_put_thing_again_increments_version_and_replaces_groups(registry: Registry) -> None:
    registry.put_thing("t", thing_type=None, attributes={"a": "1"}, billing_group=None, groups=["g1", "g2"], now=1.0)
    registry.put_thing("t", thing_type="x", attributes={"b": "2"}, billing_group=None, groups=["g3"], now=2.0)
    registry.put_thing("t", thing_type="x", attributes={"b": "2"}, billing_group=None, groups=[], now=3.0)

    thing = registry.thing("t")
    assert thing == ThingRecord("t", "x", {"b": "2"}, None, (), 3)


def test_things_are_listed_by_name(registry: Registry) -> None:
    for name in ("zeta", "alpha", "mid"):
        registry.put_thing(name, thing_type=None, attributes={}, billing_group=None, groups=[], now=1.0)
    assert [thing.name for thing in registry.things()] == ["alpha", "mid", "zeta"]


def test_thing_principals(registry: Registry) -> None:
    registry.attach_thing_principal("t1", "c2")
    registry.attach_thing_principal("t1", "c1")
    registry.attach_thing_principal("t1", "c1")  # attaching twice is not an error
    registry.attach_thing_principal("t0", "c1")
    assert registry.principals_of_thing("t1") == ["c1", "c2"]
    assert registry.things_for_certificate("c1") == ["t0", "t1"]
    assert registry.things_for_certificate("c3") == []
    assert registry.thing_attachments("c1") == [ThingAttachment("t0", False), ThingAttachment("t1", False)]


def test_an_exclusive_attachment_is_the_certificates_only_thing(registry: Registry) -> None:
    registry.attach_thing_principal("t1", "c1", "EXCLUSIVE_THING")
    assert registry.thing_attachments("c1") == [ThingAttachment("t1", True)]
    with pytest.raises(EmulatorError, match=r"^certificate c1 is attached to t1: an EXCLUSIVE_THING attachment "):
        registry.attach_thing_principal("t2", "c1")
    registry.attach_thing_principal("t1", "c2")  # the thing may have other certificates
    with pytest.raises(EmulatorError, match=r"^certificate c2 is attached to t1: "):
        registry.attach_thing_principal("t2", "c2", "EXCLUSIVE_THING")
    # Attaching the same thing again sets the type: non-exclusive, the certificate may take another thing.
    registry.attach_thing_principal("t1", "c1", "NON_EXCLUSIVE_THING")
    registry.attach_thing_principal("t2", "c1")
    assert registry.thing_attachments("c1") == [ThingAttachment("t1", False), ThingAttachment("t2", False)]
    assert registry.thing_attachments("c2") == [ThingAttachment("t1", False)]


def test_an_exclusive_attachment_inside_a_transaction_is_checked_too(registry: Registry) -> None:
    registry.attach_thing_principal("t1", "c1")
    with pytest.raises(EmulatorError, match="EXCLUSIVE_THING"), registry.transaction():
        registry.attach_thing_principal("t0", "c9")
        registry.attach_thing_principal("t2", "c1", "EXCLUSIVE_THING")
    assert registry.thing_attachments("c9") == []  # rolled back with the transaction


def test_an_unknown_thing_principal_type_is_refused(registry: Registry) -> None:
    with pytest.raises(EmulatorError, match=r"^unknown thingPrincipalType 'EXCLUSIVE' \(one of NON_EXCLUSIVE_THING, "):
        registry.attach_thing_principal("t1", "c1", "EXCLUSIVE")
    assert registry.thing_attachments("c1") == []


@pytest.mark.parametrize("kind", ["thing_groups", "thing_types", "billing_groups"])
def test_named_kinds(registry: Registry, kind: str) -> None:
    assert not registry.named_exists(kind, "one")
    registry.add_named(kind, ["one", "two"])
    registry.add_named(kind, ["one"])  # idempotent
    assert registry.named_exists(kind, "one")
    assert registry.named_exists(kind, "two")
    assert not registry.named_exists(kind, "three")


def test_named_kinds_are_separate(registry: Registry) -> None:
    registry.add_named("thing_groups", ["shared-name"])
    assert registry.named_exists("thing_groups", "shared-name")
    assert not registry.named_exists("thing_types", "shared-name")
    assert not registry.named_exists("billing_groups", "shared-name")


@pytest.mark.parametrize("kind", ["things", "policies", "thing_groups; DROP TABLE things"])
def test_named_kinds_refuse_other_tables(registry: Registry, kind: str) -> None:
    with pytest.raises(ValueError, match="^" + kind.replace("(", r"\(") + "$"):
        registry.add_named(kind, ["x"])
    with pytest.raises(ValueError):
        registry.named_exists(kind, "x")


# --- policies ------------------------------------------------------------------------------------


def test_policies(registry: Registry) -> None:
    assert registry.policy_document("p1") is None
    registry.put_policy("p2", '{"Version": "2"}')
    registry.put_policy("p1", '{"Version": "1"}')
    registry.attach_policy("p2", "cert")
    registry.attach_policy("p1", "cert")
    registry.attach_policy("p1", "cert")
    registry.attach_policy("p1", "other")

    assert registry.policy_document("p1") == '{"Version": "1"}'
    assert registry.policies_for_certificate("cert") == [("p1", '{"Version": "1"}'), ("p2", '{"Version": "2"}')]
    assert registry.policies_for_certificate("other") == [("p1", '{"Version": "1"}')]
    assert registry.policies_for_certificate("nobody") == []

    registry.put_policy("p1", '{"Version": "1b"}')
    assert registry.policies_for_certificate("other") == [("p1", '{"Version": "1b"}')]


def test_attachment_to_a_missing_policy_is_not_listed(registry: Registry) -> None:
    registry.attach_policy("ghost", "cert")
    assert registry.policies_for_certificate("cert") == []


# --- templates -----------------------------------------------------------------------------------


def test_templates(registry: Registry) -> None:
    registry.put_template("zeta", '{"Resources": {}}', None)
    registry.put_template("alpha", "{}", ["/usr/bin/python3", "hook.py", "--flag with space"])

    assert registry.template("zeta") == TemplateRecord("zeta", '{"Resources": {}}', None)
    assert registry.template("alpha") == TemplateRecord(
        "alpha", "{}", ("/usr/bin/python3", "hook.py", "--flag with space")
    )
    assert registry.template("missing") is None
    assert registry.template_names() == ["alpha", "zeta"]


def test_empty_hook_is_no_hook(registry: Registry) -> None:
    registry.put_template("t", "{}", [])
    template = registry.template("t")
    assert template is not None
    assert template.hook is None


def test_put_template_replaces(registry: Registry) -> None:
    registry.put_template("t", "{}", ["old"])
    registry.put_template("t", '{"Parameters": {}}', None)
    assert registry.template("t") == TemplateRecord("t", '{"Parameters": {}}', None)
    assert registry.template_names() == ["t"]


def test_set_template_hook(registry: Registry) -> None:
    registry.put_template("t", "{}", None)
    registry.set_template_hook("t", ["./allow.sh", "-v"])
    assert registry.template("t") == TemplateRecord("t", "{}", ("./allow.sh", "-v"))


def test_hook_cwd(registry: Registry) -> None:
    registry.put_template("t", "{}", ["./allow.sh"], "/etc/fleetprov")
    assert registry.template("t") == TemplateRecord("t", "{}", ("./allow.sh",), "/etc/fleetprov")
    registry.set_template_hook("t", ["./deny.sh"], "/srv")
    assert registry.template("t") == TemplateRecord("t", "{}", ("./deny.sh",), "/srv")
    registry.set_template_hook("t", ["/abs/hook"])
    assert registry.template("t") == TemplateRecord("t", "{}", ("/abs/hook",), None)


def test_set_template_hook_on_unknown_template(registry: Registry) -> None:
    with pytest.raises(EmulatorError, match=r"^--hook ghost=\.\.\.: no template named 'ghost'$"):
        registry.set_template_hook("ghost", ["x"])


# --- transactions and sharing --------------------------------------------------------------------


def test_transaction_commits(registry: Registry) -> None:
    with registry.transaction():
        registry.put_policy("p", "{}")
        registry.attach_policy("p", "c")
    assert registry.policies_for_certificate("c") == [("p", "{}")]


def test_transaction_that_raises_rolls_back(registry: Registry) -> None:
    registry.put_policy("before", "{}")
    with pytest.raises(RuntimeError, match="boom"), registry.transaction():
        registry.put_policy("inside", "{}")
        registry.put_thing("t", thing_type=None, attributes={}, billing_group=None, groups=["g"], now=1.0)
        registry.add_certificate("c", PEM, status="ACTIVE", kind="device", created_at=1.0)
        raise RuntimeError("boom")

    assert registry.policy_document("before") == "{}"
    assert registry.policy_document("inside") is None
    assert registry.thing("t") is None
    assert registry.certificate("c") is None
    # The connection is usable again afterwards.
    with registry.transaction():
        registry.put_policy("after", "{}")
    assert registry.policy_document("after") == "{}"


def test_two_registries_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    first, second = Registry(path), Registry(path)
    try:
        first.put_template("t", "{}", ["hook"])
        add_pending(first, "abc", expires_at=50.0)
        assert second.template("t") == TemplateRecord("t", "{}", ("hook",))

        second.set_certificate_status("abc", "REVOKED")
        record = first.certificate("abc")
        assert record is not None
        assert record.status == "REVOKED"

        with first.transaction():
            first.put_policy("p", "{}")
            # Not committed yet: the other connection does not see it.
            assert second.policy_document("p") is None
        assert second.policy_document("p") == "{}"
    finally:
        first.close()
        second.close()


def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    registry = Registry(path)
    registry.put_thing("t", thing_type=None, attributes={"k": "v"}, billing_group=None, groups=[], now=1.0)
    registry.close()

    reopened = Registry(path)
    try:
        assert reopened.thing("t") == ThingRecord("t", None, {"k": "v"}, None, (), 1)
    finally:
        reopened.close()


def test_registry_uses_wal(registry: Registry) -> None:
    with sqlite3.connect(registry.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_attributes_are_stored_as_json(registry: Registry) -> None:
    registry.put_thing("t", thing_type=None, attributes={"b": "2", "a": "1"}, billing_group=None, groups=[], now=1.0)
    with sqlite3.connect(registry.path) as db:
        (stored,) = db.execute("SELECT attributes FROM things WHERE name = 't'").fetchone()
    assert json.loads(stored) == {"a": "1", "b": "2"}


def test_new_registry_records_its_schema_version(registry: Registry) -> None:
    with sqlite3.connect(registry.path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_a_registry_of_schema_version_2_keeps_its_attachments_as_non_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE thing_principals (thing TEXT NOT NULL, certificate_id TEXT NOT NULL, "
            "PRIMARY KEY (thing, certificate_id))"
        )
        db.execute("INSERT INTO thing_principals VALUES ('t1', 'c1')")
        db.execute("PRAGMA user_version = 2")
    upgraded = Registry(path)
    try:
        assert upgraded.thing_attachments("c1") == [ThingAttachment("t1", False)]
        upgraded.attach_thing_principal("t2", "c2", "EXCLUSIVE_THING")
        assert upgraded.thing_attachments("c2") == [ThingAttachment("t2", True)]
    finally:
        upgraded.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    Registry(path).close()  # an upgraded registry opens again


def test_registry_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    Registry(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(
        EmulatorError,
        match=rf"^registry {path} has schema version {SCHEMA_VERSION + 1}, this emulator needs {SCHEMA_VERSION}: ",
    ):
        Registry(path)


def test_registry_from_before_schema_versions_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE templates (name TEXT PRIMARY KEY, body TEXT NOT NULL, hook TEXT)")
    with pytest.raises(EmulatorError, match="has schema version 0, this emulator needs"):
        Registry(path)


def test_unopenable_registry_raises_emulator_error(tmp_path: Path) -> None:
    with pytest.raises(EmulatorError, match=rf"^cannot open registry {tmp_path}: "):
        Registry(tmp_path)  # a directory, not a database file
