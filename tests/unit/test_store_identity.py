"""identity.json (the device identity for local applications) and share_with_group (the published identity
readable by the state directory's group), on the real filesystem and under several umasks."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetprov.config import load_config, render_config
from fleetprov.errors import ConfigError, StorageError
from fleetprov.journal import Journal, journal_path, save_journal
from fleetprov.store import GROUP_MODES, PRIVATE_MODES, Generation, Manifest, Staging, Store
from tests.unit.test_store import (
    KEY_PEM,
    PKCS11_REFERENCE,
    certificate_pem,
    failing,
    fill,
    listing,
    make_manifest,
    mode,
    write_private_key_watched,
)

ROOT_CA = Path("/etc/fleetprov/AmazonRootCA1.pem")
PORT = 8883


@pytest.fixture(params=[0o022, 0o077, 0o000], ids=["umask022", "umask077", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Every test here runs under three umasks: the modes must not depend on it (the unit sets 0077)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def store_at(state: Path, *, share_with_group: bool = False) -> Store:
    store = Store(state, share_with_group=share_with_group)
    store.ensure()
    return store


def stage_complete(store: Store, serial: int, **overrides: Any) -> Staging:
    staging = store.stage()
    manifest = make_manifest(thing_name=f"sensor-{serial:04}", **overrides)
    fill(staging, manifest, serial)
    staging.write_identity(manifest, port=PORT, root_ca=ROOT_CA)
    return staging


def provision(store: Store, serial: int, **overrides: Any) -> Generation:
    return store.commit(stage_complete(store, serial, **overrides))


def identity(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_bytes())
    assert isinstance(document, dict)
    return document


# --- identity.json --------------------------------------------------------------------------------------


def test_identity_json_names_the_files_through_current(state: Path, umask: int) -> None:
    generation = provision(store_at(state), 1)

    current = state / "current"
    assert identity(generation.path / "identity.json") == {
        "format": 1,
        "thing_name": "sensor-0001",
        "certificate_id": "a" * 64,
        "endpoint": "abc123-ats.iot.eu-west-1.amazonaws.com",
        "port": 8883,
        "certificate": str(current / "certificate.pem"),
        "private_key": str(current / "private.key"),
        "key_reference": "file:private.key",
        "device_configuration": str(current / "device-config.json"),
        "root_ca": "/etc/fleetprov/AmazonRootCA1.pem",
        "not_after": "2036-11-20T08:00:00Z",
    }
    assert (generation.path / "identity.json").read_bytes().endswith(b"}\n")


def test_identity_json_of_a_pkcs11_key_has_no_key_file(state: Path) -> None:
    generation = provision(store_at(state), 1, key_reference=PKCS11_REFERENCE)

    document = identity(generation.path / "identity.json")
    assert document["private_key"] is None
    assert document["key_reference"] == PKCS11_REFERENCE
    assert "private.key" not in listing(generation.path)


def test_identity_json_paths_are_absolute_and_follow_a_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = store_at(Path("relative-state"))  # a relative state directory still gives absolute paths
    first = provision(store, 1)
    old = identity(first.path / "identity.json")
    assert Path(old["certificate"]) == tmp_path / "relative-state" / "current" / "certificate.pem"
    assert Path(old["certificate"]).read_bytes() == certificate_pem(1)

    provision(store, 2)  # a rotation: a new generation becomes current

    new = identity(tmp_path / "relative-state" / "current" / "identity.json")
    assert (new["certificate"], new["private_key"]) == (old["certificate"], old["private_key"])
    assert Path(new["certificate"]).read_bytes() == certificate_pem(2)  # the same path, the new certificate
    assert new["thing_name"] == "sensor-0002"


def test_identity_json_root_ca_is_made_absolute(state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    staging = store_at(state).stage()
    path = staging.write_identity(make_manifest(), port=443, root_ca=Path("ca/root.pem"))
    document = identity(path)
    assert document["root_ca"] == str(tmp_path / "ca" / "root.pem")
    assert document["port"] == 443


def test_identity_json_is_never_written_over_an_existing_file(state: Path) -> None:
    staging = store_at(state).stage()
    (staging.path / "identity.json").write_bytes(b"planted")
    with pytest.raises(StorageError) as raised:
        staging.write_identity(make_manifest(), port=PORT, root_ca=ROOT_CA)
    assert raised.value.message == f"cannot write {staging.path / 'identity.json'}: File exists"
    assert not staging.path.exists()  # a failed write abandons the staging directory


def test_identity_json_write_failure_discards_staging(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_at(state)
    first = provision(store, 1)
    staging = store.stage()
    fill(staging, make_manifest(), serial=2)
    monkeypatch.setattr(os, "write", failing(errno.ENOSPC, os.write))

    with pytest.raises(StorageError) as raised:
        staging.write_identity(make_manifest(), port=PORT, root_ca=ROOT_CA)
    monkeypatch.undo()

    assert raised.value.message == f"cannot write {staging.path / 'identity.json'}: No space left on device"
    assert not staging.path.exists()
    assert store.current() == first


# --- remove_derived and generations without identity.json --------------------------------------------------


def test_remove_derived_removes_identity_json_and_keeps_the_key(state: Path) -> None:
    staging = stage_complete(store_at(state), 1)
    (staging.path / "identity.json").write_bytes(b'{"format": 1, "thing_na')  # as a crash may leave it

    staging.remove_derived()

    assert listing(staging.path) == ["private.key"]
    assert (staging.path / "private.key").read_bytes() == KEY_PEM
    staging.remove_derived()  # nothing left to remove: still fine


def test_rewritten_after_remove_derived(state: Path) -> None:
    """What _stage_identity does on a resumed run: remove the derived files, write them again, commit."""
    store = store_at(state)
    staging = stage_complete(store, 1)
    staging.remove_derived()
    manifest = make_manifest(thing_name="sensor-0001")
    staging.write_certificate(certificate_pem(1))
    staging.write_device_config(manifest.device_configuration)
    staging.write_manifest(manifest)
    staging.write_identity(manifest, port=PORT, root_ca=ROOT_CA)

    generation = store.commit(staging)

    assert identity(generation.path / "identity.json")["thing_name"] == "sensor-0001"


def test_a_generation_without_identity_json_loads_and_commits(state: Path) -> None:
    """Generations written before identity.json existed lack it; they stay usable, and rollback works."""
    store = store_at(state)
    staging = store.stage()
    fill(staging, make_manifest(), serial=1)  # no identity.json
    old = store.commit(staging)
    assert "identity.json" not in listing(old.path)
    assert store.current() == old
    assert store.load(1) == old

    new = provision(store, 2)
    assert "identity.json" in listing(new.path)
    assert store.current() == new

    store.switch_to(old)  # a rollback to a generation without identity.json
    assert store.current() == old
    assert not (state / "current" / "identity.json").exists()


# --- modes ----------------------------------------------------------------------------------------------


def test_default_modes_whatever_the_umask(state: Path, umask: int) -> None:
    store = store_at(state)
    with store.lock():
        generation = provision(store, 1)
        save_journal(state, Journal(staging="staging-x", method="csr", key_type="ec-p256", template="T", endpoint="e"))
        assert mode(state / "lock") == 0o600
    assert mode(journal_path(state)) == 0o600
    assert mode(state) == 0o700
    assert mode(state / "generations") == 0o700
    assert mode(generation.path) == 0o700
    assert mode(generation.path / "private.key") == 0o600
    for name in ("certificate.pem", "manifest.json", "device-config.json", "identity.json"):
        assert mode(generation.path / name) == 0o644, name


def test_share_with_group_modes_whatever_the_umask(state: Path, umask: int) -> None:
    store = store_at(state, share_with_group=True)
    assert store.modes == GROUP_MODES
    with store.lock():
        staging = stage_complete(store, 1)
        assert mode(staging.path) == 0o700  # nobody else reads a generation being built
        generation = store.commit(staging)
        save_journal(state, Journal(staging="staging-x", method="csr", key_type="ec-p256", template="T", endpoint="e"))
        assert mode(state / "lock") == 0o600
    assert mode(journal_path(state)) == 0o600  # the journal holds the ownership token: never shared
    assert mode(state) == 0o750
    assert mode(state / "generations") == 0o750
    assert mode(generation.path) == 0o750
    for name in ("private.key", "certificate.pem", "manifest.json", "device-config.json", "identity.json"):
        assert mode(generation.path / name) == 0o640, name


def test_share_with_group_staging_stays_0700(state: Path, umask: int) -> None:
    staging = store_at(state, share_with_group=True).stage()
    assert mode(staging.path) == 0o700
    assert staging.modes == GROUP_MODES


def test_shared_private_key_has_no_more_than_0640_from_its_first_byte(
    state: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_CREAT|O_EXCL with mode 0640: the umask can only take bits away (0600 under the unit's 0077, made
    0640 at the commit, inside a 0700 staging directory); the key is never more open than 0640."""
    staging = store_at(state, share_with_group=True).stage()
    _, seen = write_private_key_watched(staging, monkeypatch)

    assert seen[0] == (0o640 & ~umask, 0)


def test_ensure_with_share_with_group_opens_existing_directories(state: Path, umask: int) -> None:
    store_at(state)
    assert (mode(state), mode(state / "generations")) == (0o700, 0o700)  # as systemd's StateDirectoryMode=0700

    store_at(state, share_with_group=True)

    assert (mode(state), mode(state / "generations")) == (0o750, 0o750)


def test_switching_share_with_group_on_leaves_older_generations_alone(state: Path) -> None:
    old = provision(store_at(state), 1)

    new = provision(store_at(state, share_with_group=True), 2)

    assert mode(old.path) == 0o700
    assert (mode(old.path / "private.key"), mode(old.path / "identity.json")) == (0o600, 0o644)
    assert mode(new.path) == 0o750
    assert (mode(new.path / "private.key"), mode(new.path / "identity.json")) == (0o640, 0o640)


def test_switching_share_with_group_off_closes_generations(state: Path) -> None:
    shared = provision(store_at(state, share_with_group=True), 1)

    store = store_at(state)

    assert mode(state / "generations") == 0o700  # the group can no longer reach any generation
    assert mode(state) == 0o750  # an existing state directory keeps its mode without share_with_group
    assert mode(shared.path) == 0o750  # the generation itself is left as it was
    private = provision(store, 2)
    assert mode(private.path) == 0o700
    assert (mode(private.path / "private.key"), mode(private.path / "identity.json")) == (0o600, 0o644)


def test_commit_gives_a_resumed_staging_the_modes_of_its_store(state: Path) -> None:
    """A run interrupted before share_with_group was switched on resumes with a key written 0600."""
    name = stage_complete(store_at(state), 1).path.name

    shared = store_at(state, share_with_group=True)
    staging = shared.reopen(name)
    assert staging is not None and staging.modes == GROUP_MODES
    assert mode(staging.path / "private.key") == 0o600
    generation = shared.commit(staging)

    assert mode(generation.path) == 0o750
    assert listing(generation.path) == [
        "certificate.pem", "device-config.json", "identity.json", "manifest.json", "private.key",
    ]  # fmt: skip
    for name in listing(generation.path):
        assert mode(generation.path / name) == 0o640, name


def test_default_store_uses_private_modes(state: Path) -> None:
    assert Store(state).modes == PRIVATE_MODES
    assert Store(state).share_with_group is False


def test_manifest_is_unchanged_by_identity_json(state: Path) -> None:
    generation = provision(store_at(state), 1)
    assert Manifest.from_json((generation.path / "manifest.json").read_bytes(), generation.path) == make_manifest(
        thing_name="sensor-0001"
    )


# --- the configuration key (tests/unit/test_config.py checks that config.example.yaml documents it) ---------

MINIMAL_YAML = """\
endpoint: localhost
root_ca: /ca.pem
claim: {certificate: /claim.crt, private_key: /claim.key}
provisioning: {template: T}
"""


def test_share_with_group_config_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL_YAML)
    assert load_config(path, {}).share_with_group is False
    assert load_config(path, {"FLEETPROV_SHARE_WITH_GROUP": "true"}).share_with_group is True

    path.write_text(MINIMAL_YAML + "share_with_group: true\n")
    config = load_config(path, {})
    assert config.share_with_group is True
    assert "share_with_group: true\n" in render_config(config)

    path.write_text(MINIMAL_YAML + "share_with_group: 1\n")
    with pytest.raises(ConfigError, match=r"share_with_group: expected .+, got int"):
        load_config(path, {})
