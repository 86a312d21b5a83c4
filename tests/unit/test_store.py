"""Tests for fleetprov.store on the real filesystem: generations, the atomic `current`, the lock, recovery,
file modes, disk failures (injected at os.rename / os.replace / os.fsync / os.write, since tests run as root
where chmod does not stop writes) and hostile manifest.json content."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from fleetprov.atomicio import write_atomic
from fleetprov.errors import EX_CANTCREAT, EX_TEMPFAIL, StorageError
from fleetprov.store import (
    KEY_FILE_REFERENCE,
    MAX_GENERATION,
    CorruptState,
    Generation,
    Manifest,
    Staging,
    Store,
    StoreLocked,
    generation_name,
    generation_number,
    iso_utc,
    parse_iso_utc,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Not a real key; a marker that must never show up in an error message.
# A real key, made at test time: no key material lives in the repository.
KEY_PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
PKCS11_REFERENCE = "pkcs11:token=fleetprov;object=device-key;type=private"
WHERE = Path("/var/lib/fleetprov/generations/1/manifest.json")


def make_manifest(**overrides: Any) -> Manifest:
    values: dict[str, Any] = {
        "thing_name": "sensor-0001",
        "certificate_id": "a" * 64,
        "endpoint": "abc123-ats.iot.eu-west-1.amazonaws.com",
        "not_after": "2036-11-20T08:00:00Z",
        "key_reference": KEY_FILE_REFERENCE,
        "template": "FleetTemplate",
        "device_configuration": {"Fallback": "none", "Region": "eu"},
        "provisioned_at": "2026-01-02T03:04:05Z",
    }
    values.update(overrides)
    return Manifest(**values)


def certificate_pem(serial: int) -> bytes:
    return f"-----BEGIN CERTIFICATE-----\nserial {serial}\n-----END CERTIFICATE-----\n".encode()


def fill(staging: Staging, manifest: Manifest, serial: int) -> None:
    if manifest.key_reference == KEY_FILE_REFERENCE:
        staging.write_private_key(KEY_PEM)
    staging.write_certificate(certificate_pem(serial))
    staging.write_device_config(manifest.device_configuration)
    staging.write_manifest(manifest)


def provision(store: Store, serial: int, **overrides: Any) -> Generation:
    staging = store.stage()
    fill(staging, make_manifest(thing_name=f"sensor-{serial:04}", **overrides), serial)
    return store.commit(staging)


def write_private_key_watched(staging: Staging, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[tuple[int, int]]]:
    """Write KEY_PEM as the staging's private key: its path, and the file's (mode, size) at every os.write."""
    seen: list[tuple[int, int]] = []
    real_write = os.write

    def spying_write(fd: int, data: Any) -> int:
        status = os.fstat(fd)
        seen.append((stat.S_IMODE(status.st_mode), status.st_size))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    path = staging.write_private_key(KEY_PEM)
    monkeypatch.undo()
    return path, seen


def listing(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path) -> Store:
    store = Store(state)
    store.ensure()
    return store


# --- the full cycle ---------------------------------------------------------------------------------------


def test_stage_commit_publishes_generation_1_as_current(store: Store, state: Path) -> None:
    assert store.current() is None
    staging = store.stage()
    assert staging.path.parent == state
    assert staging.path.name.startswith("staging-")
    assert store.current() is None  # a staging directory is never visible as current
    manifest = make_manifest()
    fill(staging, manifest, serial=1)

    generation = store.commit(staging)

    generation_dir = state / "generations" / "1"
    assert generation == Generation(
        number=1,
        path=generation_dir,
        manifest=manifest,
        certificate=generation_dir / "certificate.pem",
        private_key=generation_dir / "private.key",
    )
    assert store.current() == generation
    assert os.readlink(state / "current") == "generations/1"
    assert listing(state) == ["current", "generations"]
    assert listing(generation_dir) == ["certificate.pem", "device-config.json", "manifest.json", "private.key"]
    assert (generation_dir / "private.key").read_bytes() == KEY_PEM
    assert (generation_dir / "certificate.pem").read_bytes() == certificate_pem(1)
    assert json.loads((generation_dir / "device-config.json").read_bytes()) == {"Fallback": "none", "Region": "eu"}
    assert json.loads((generation_dir / "manifest.json").read_bytes()) == {
        "format": 1,
        "thing_name": "sensor-0001",
        "certificate_id": "a" * 64,
        "endpoint": "abc123-ats.iot.eu-west-1.amazonaws.com",
        "not_after": "2036-11-20T08:00:00Z",
        "key_reference": "file:private.key",
        "template": "FleetTemplate",
        "device_configuration": {"Fallback": "none", "Region": "eu"},
        "provisioned_at": "2026-01-02T03:04:05Z",
    }
    assert store.generations() == [1]


def test_modes_of_directories_and_files(store: Store, state: Path) -> None:
    with store.lock():
        generation = provision(store, 1)
        assert mode(state / "lock") == 0o600
    assert mode(state) == 0o700
    assert mode(state / "generations") == 0o700
    assert mode(generation.path) == 0o700
    assert mode(generation.path / "private.key") == 0o600
    assert mode(generation.path / "certificate.pem") == 0o644
    assert mode(generation.path / "manifest.json") == 0o644
    assert mode(generation.path / "device-config.json") == 0o644


def test_staging_directory_is_0700(store: Store) -> None:
    staging = store.stage()
    assert mode(staging.path) == 0o700
    assert listing(staging.path) == []


def test_private_key_is_0600_before_its_first_byte(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = store.stage()
    path, seen = write_private_key_watched(staging, monkeypatch)

    assert seen[0] == (0o600, 0)  # the file had its final mode while still empty
    assert path == staging.path / "private.key"
    assert path.read_bytes() == KEY_PEM
    assert mode(path) == 0o600


def test_private_key_is_never_written_over_an_existing_file(store: Store) -> None:
    staging = store.stage()
    (staging.path / "private.key").write_bytes(b"planted by someone else")

    with pytest.raises(StorageError) as raised:
        staging.write_private_key(KEY_PEM)

    assert raised.value.exit_code == EX_CANTCREAT
    assert str(raised.value) == f"store: cannot write {staging.path / 'private.key'}: File exists"
    assert not staging.path.exists()  # the abandoned staging directory is gone


def test_second_commit_makes_generation_2_current(store: Store, state: Path) -> None:
    first = provision(store, 1)
    second = provision(store, 2)

    assert (first.number, second.number) == (1, 2)
    assert second.path == state / "generations" / "2"
    assert store.current() == second
    assert os.readlink(state / "current") == "generations/2"
    assert store.generations() == [1, 2]
    assert first.certificate.read_bytes() == certificate_pem(1)  # the previous generation is untouched
    assert second.certificate.read_bytes() == certificate_pem(2)


def test_commit_without_publishing_leaves_current_alone(store: Store, state: Path) -> None:
    first = provision(store, 1)
    staging = store.stage()
    fill(staging, make_manifest(thing_name="sensor-0002"), 2)
    second = store.commit(staging, publish=False)

    assert second.number == 2 and second.certificate.read_bytes() == certificate_pem(2)
    assert store.current() == first
    store.switch_to(second)
    assert os.readlink(state / "current") == "generations/2"


def test_switch_to_rolls_back_to_an_older_generation(store: Store, state: Path) -> None:
    first = provision(store, 1)
    provision(store, 2)

    store.switch_to(first)

    assert os.readlink(state / "current") == "generations/1"
    current = store.current()
    assert current is not None
    assert current.manifest.thing_name == "sensor-0001"
    assert store.generations() == [1, 2]
    assert listing(state) == ["current", "generations"]


def test_switch_to_refuses_a_broken_generation(store: Store, state: Path) -> None:
    first = provision(store, 1)
    provision(store, 2)
    first.certificate.unlink()

    with pytest.raises(CorruptState) as raised:
        store.switch_to(first)

    assert raised.value.message == f"{first.certificate} is missing"
    assert os.readlink(state / "current") == "generations/2"


def test_pkcs11_generation_has_no_private_key_file(store: Store) -> None:
    generation = provision(store, 1, key_reference=PKCS11_REFERENCE)

    assert generation.private_key is None
    assert generation.manifest.key_reference == PKCS11_REFERENCE
    assert listing(generation.path) == ["certificate.pem", "device-config.json", "manifest.json"]
    assert store.current() == generation


# --- prune ------------------------------------------------------------------------------------------------


def test_prune_keeps_current_and_the_one_before(store: Store, state: Path) -> None:
    for serial in (1, 2, 3, 4):
        provision(store, serial)

    assert store.prune() == [1, 2]

    assert store.generations() == [3, 4]
    assert os.readlink(state / "current") == "generations/4"
    assert listing(state) == ["current", "generations"]  # no removing-* left


def test_prune_after_rollback_keeps_current_and_drops_the_newer_generation(store: Store) -> None:
    generations = [provision(store, serial) for serial in (1, 2, 3)]
    store.switch_to(generations[1])

    assert store.prune(keep=2) == [3]
    assert store.generations() == [1, 2]
    assert store.prune(keep=1) == [1]
    assert store.generations() == [2]
    current = store.current()
    assert current is not None
    assert current.number == 2


def test_prune_keeps_everything_when_fewer_than_keep(store: Store) -> None:
    provision(store, 1)
    provision(store, 2)
    assert store.prune(keep=5) == []
    assert store.generations() == [1, 2]


def test_prune_without_current_deletes_nothing(store: Store, state: Path) -> None:
    provision(store, 1)
    (state / "current").unlink()
    assert store.prune() == []
    assert store.generations() == [1]


def test_prune_deletes_a_generation_only_once_its_rename_is_on_disk(
    store: Store, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut must not bring back a half-deleted generations/<n>: when generations/ cannot be synced after
    the rename, the renamed generation stays whole for recover() to finish."""
    for serial in (1, 2, 3):
        provision(store, serial)
    generations_inode = (state / "generations").stat().st_ino
    monkeypatch.setattr(os, "fsync", failing(errno.EIO, os.fsync, lambda fd: os.fstat(fd).st_ino == generations_inode))

    with pytest.raises(StorageError) as raised:
        store.prune()
    monkeypatch.undo()

    assert raised.value.message == f"cannot remove {state / 'generations' / '1'}: Input/output error"
    assert store.generations() == [2, 3]
    [removing] = [path for path in state.iterdir() if path.name.startswith("removing-1-")]
    assert listing(removing) == ["certificate.pem", "device-config.json", "manifest.json", "private.key"]
    assert store.recover() == [f"removed {removing}: an old generation that was being deleted when fleetprov stopped"]
    assert listing(state) == ["current", "generations"]


def test_prune_refuses_keep_below_one(store: Store) -> None:
    with pytest.raises(ValueError, match="keep must be at least 1"):
        store.prune(keep=0)


# --- recover ----------------------------------------------------------------------------------------------


def test_recover_removes_staging_leftovers_and_stray_links(store: Store, state: Path) -> None:
    provision(store, 1)
    leftover = store.stage()
    leftover.write_private_key(KEY_PEM)
    stray = state / f"current.tmp-{os.getpid() + 1}"
    stray.symlink_to("generations/2")
    half_pruned = state / "removing-7-0a1b2c3d"
    half_pruned.mkdir()
    (half_pruned / "certificate.pem").write_bytes(certificate_pem(7))

    notes = store.recover()

    assert notes == [
        f"removed {stray}: a switch of current that was interrupted",
        f"removed {half_pruned}: an old generation that was being deleted when fleetprov stopped",
        f"removed {leftover.path}: a generation that was being built when fleetprov stopped",
    ]
    assert listing(state) == ["current", "generations"]
    current = store.current()
    assert current is not None
    assert current.number == 1
    assert store.recover() == []


def test_crash_simulation_leftovers_written_by_hand(store: Store, state: Path) -> None:
    """What kill -9 leaves in the middle of a commit: a half-filled staging directory and a fresh symlink
    that never got renamed over `current`. Neither is visible; recover() removes both; the next commit
    proceeds as if nothing happened."""
    provision(store, 1)
    staging = state / "staging-k1ll3d"
    staging.mkdir(mode=0o700)
    (staging / "private.key").write_bytes(KEY_PEM[:20])  # torn write
    (staging / "certificate.pem").write_bytes(b"")
    (state / "current.tmp-4242").symlink_to("generations/2")

    current = store.current()
    assert current is not None
    assert current.number == 1  # what a reader sees right after the crash

    assert store.recover() == [
        f"removed {state / 'current.tmp-4242'}: a switch of current that was interrupted",
        f"removed {staging}: a generation that was being built when fleetprov stopped",
    ]
    assert listing(state) == ["current", "generations"]
    generation = provision(store, 2)
    assert generation.number == 2
    assert store.current() == generation


def test_recover_reports_what_it_cannot_remove(store: Store, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leftover = store.stage()

    def read_only(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("fleetprov.store.shutil.rmtree", read_only)
    assert store.recover() == [f"could not remove {leftover.path}: Read-only file system"]


def test_recover_syncs_what_it_removed(store: Store, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What recovery removed stays removed after a power cut: the state directory is fsync'd, and a failing
    sync is told (the device then connects with `current` all the same)."""
    leftover = store.stage()
    state_inode = state.stat().st_ino
    monkeypatch.setattr(os, "fsync", failing(errno.EIO, os.fsync, lambda fd: os.fstat(fd).st_ino == state_inode))
    assert store.recover() == [
        f"removed {leftover.path}: a generation that was being built when fleetprov stopped",
        f"could not sync {state}: Input/output error",
    ]


def test_recover_on_a_missing_state_directory_notes_nothing(tmp_path: Path) -> None:
    assert Store(tmp_path / "absent").recover() == []


def test_a_stale_tmp_link_with_our_own_pid_does_not_block_a_switch(store: Store, state: Path) -> None:
    """pids repeat across reboots: a crashed run may have left exactly the name we are about to use."""
    provision(store, 1)
    (state / f"current.tmp-{os.getpid()}").symlink_to("generations/99")

    generation = provision(store, 2)

    assert os.readlink(state / "current") == "generations/2"
    assert generation.number == 2
    assert listing(state) == ["current", "generations"]


# --- lock -------------------------------------------------------------------------------------------------


def test_second_lock_in_the_same_process_is_refused(store: Store, state: Path) -> None:
    with store.lock():
        assert (state / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(StoreLocked) as raised, Store(state).lock():
            pytest.fail("a second lock was granted")
        assert raised.value.exit_code == EX_TEMPFAIL
        assert raised.value.step == "lock"
        assert (
            str(raised.value)
            == f"lock: another fleetprov (pid {os.getpid()}) holds {state / 'lock'}; wait for it to finish"
        )
        with pytest.raises(StoreLocked), store.lock():  # the same Store object opens the file again
            pytest.fail("a second lock was granted")
    assert (state / "lock").read_text() == ""
    with store.lock():  # released
        assert (state / "lock").read_text() == f"{os.getpid()}\n"


LOCK_HOLDER = """
import sys
from pathlib import Path
from fleetprov.store import Store
with Store(Path(sys.argv[1])).lock():
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def lock_holder(state: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "locked\n"
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def test_lock_held_by_another_process(store: Store, state: Path, lock_holder: subprocess.Popen[str]) -> None:
    with pytest.raises(StoreLocked) as raised, store.lock():
        pytest.fail("a second lock was granted")
    assert (
        raised.value.message
        == f"another fleetprov (pid {lock_holder.pid}) holds {state / 'lock'}; wait for it to finish"
    )

    assert lock_holder.stdin is not None
    lock_holder.stdin.write("\n")
    lock_holder.stdin.close()
    assert lock_holder.wait(timeout=30) == 0
    with store.lock():
        assert (state / "lock").read_text() == f"{os.getpid()}\n"


def test_lock_of_a_killed_process_is_released(store: Store, state: Path, lock_holder: subprocess.Popen[str]) -> None:
    lock_holder.kill()
    assert lock_holder.wait(timeout=30) == -9
    assert (state / "lock").read_text() == f"{lock_holder.pid}\n"  # its pid stays behind, its lock does not
    with store.lock():
        assert (state / "lock").read_text() == f"{os.getpid()}\n"


def test_lock_without_state_directory_is_a_storage_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "absent")
    with pytest.raises(StorageError) as raised, store.lock():
        pytest.fail("locked a file in a missing directory")
    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == f"cannot open {tmp_path / 'absent' / 'lock'}: No such file or directory"


# --- ensure -----------------------------------------------------------------------------------------------


def test_ensure_creates_nested_directories_0700_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "fleetprov"
    old_umask = os.umask(0o277)
    try:
        Store(state).ensure()
    finally:
        os.umask(old_umask)
    assert mode(state) == 0o700
    assert mode(state / "generations") == 0o700
    assert listing(state) == ["generations"]
    Store(state).ensure()  # idempotent
    assert listing(state) == ["generations"]


def test_ensure_leaves_an_existing_directory_mode_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    state.chmod(0o750)
    Store(state).ensure()
    assert mode(state) == 0o750
    assert mode(state / "generations") == 0o700


def test_ensure_refuses_a_symlink_in_place_of_generations(tmp_path: Path) -> None:
    """chmod by path would follow it and change the mode of whatever it points to."""
    state, victim = tmp_path / "state", tmp_path / "victim"
    state.mkdir(mode=0o700)
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    (state / "generations").symlink_to(victim)
    with pytest.raises(StorageError) as raised:
        Store(state).ensure()
    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == (f"cannot set the mode of {state / 'generations'}: it is a symlink, not a directory")
    assert mode(victim) == 0o755


def test_ensure_on_a_file_names_the_path(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_bytes(b"not a directory")
    with pytest.raises(StorageError) as raised:
        Store(state).ensure()
    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == f"cannot create {state}: File exists"


def test_generations_ignores_names_that_are_not_numbers(store: Store, state: Path) -> None:
    provision(store, 1)
    for junk in ("0", "007", "x", ".3", "2.bak"):
        (state / "generations" / junk).mkdir()
    assert store.generations() == [1]
    assert provision(store, 2).number == 2


def test_generation_numbers_have_one_rule_for_reading_and_writing() -> None:
    for number in (1, 9, 10, 4711, MAX_GENERATION):
        assert generation_number(generation_name(number)) == number
    for number in (0, -1, MAX_GENERATION + 1):
        with pytest.raises(ValueError, match=f"not {number}$"):
            generation_name(number)
    for name in (str(MAX_GENERATION + 1), "0", "01", "+1", "1 ", "\u0661"):
        assert generation_number(name) is None


def test_a_commit_past_the_highest_generation_number_changes_nothing(store: Store, state: Path) -> None:
    """Writing generations/<MAX_GENERATION + 1> would publish a generation that no reader accepts."""
    first = provision(store, 1)
    highest = state / "generations" / str(MAX_GENERATION)
    highest.mkdir()
    (state / "generations" / str(MAX_GENERATION + 1)).mkdir()  # out of range: not a generation, ignored
    assert store.generations() == [1, MAX_GENERATION]
    staging = store.stage()
    fill(staging, make_manifest(thing_name="sensor-0002"), serial=2)

    with pytest.raises(StorageError) as raised:
        store.commit(staging)

    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == (
        f"cannot commit a new generation: {highest} has the highest number a generation can have; "
        f"move the generations in {state / 'generations'} to lower numbers"
    )
    assert store.current() == first
    assert listing(state) == ["current", "generations"]
    assert listing(state / "generations") == sorted(["1", str(MAX_GENERATION), str(MAX_GENERATION + 1)])


def test_loading_a_number_no_generation_can_have_is_corrupt_state(store: Store, state: Path) -> None:
    provision(store, 1)
    for number in (0, MAX_GENERATION + 1):
        with pytest.raises(CorruptState, match=f"there is no generation {number} in"):
            store.load(number)


# --- corrupt state ----------------------------------------------------------------------------------------


def test_corrupt_manifest_is_named(store: Store, state: Path) -> None:
    generation = provision(store, 1)
    manifest = generation.path / "manifest.json"
    manifest.write_bytes(b'{"format": 1, "thing_name": ')

    with pytest.raises(CorruptState) as raised:
        store.current()

    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == f"{manifest} is not valid JSON: Expecting value: line 1 column 29 (char 28)"


def test_dangling_current_is_named(store: Store, state: Path) -> None:
    (state / "current").symlink_to("generations/3")
    with pytest.raises(CorruptState) as raised:
        store.current()
    assert raised.value.message == f"{state / 'current'} points to {state / 'generations' / '3'}, which does not exist"


@pytest.mark.parametrize("target", ["/etc", "../generations/1", "generations/01", "generations/1/..", "staging-x"])
def test_current_pointing_elsewhere_is_corrupt(store: Store, state: Path, target: str) -> None:
    provision(store, 1)
    (state / "current").unlink()
    (state / "current").symlink_to(target)
    with pytest.raises(CorruptState) as raised:
        store.current()
    assert raised.value.message == f"{state / 'current'} points to {target!r}, not to generations/<n>"


def test_current_that_is_not_a_symlink_is_corrupt(store: Store, state: Path) -> None:
    (state / "current").mkdir()
    with pytest.raises(CorruptState) as raised:
        store.current()
    assert raised.value.message == f"{state / 'current'} is not a symlink"


@pytest.mark.parametrize("missing", ["manifest.json", "certificate.pem", "private.key"])
def test_generation_missing_a_file_is_corrupt(store: Store, missing: str) -> None:
    generation = provision(store, 1)
    (generation.path / missing).unlink()
    with pytest.raises(CorruptState) as raised:
        store.current()
    assert raised.value.message == f"{generation.path / missing} is missing"


def test_manifest_with_a_wrong_field_is_named(store: Store) -> None:
    generation = provision(store, 1)
    manifest = generation.path / "manifest.json"
    document = json.loads(manifest.read_bytes())
    document["not_after"] = "next year"
    write_atomic(manifest, json.dumps(document).encode())
    with pytest.raises(CorruptState) as raised:
        store.current()
    assert raised.value.message == (
        f"{manifest}: not_after: 'next year' is not an ISO 8601 UTC time like 2036-11-20T08:00:00Z"
    )


# --- disk failures during stage and commit ----------------------------------------------------------------


def failing(error: int, real: Callable[..., Any], only: Optional[Callable[..., bool]] = None) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        if only is None or only(*args):
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    return fail


@pytest.mark.parametrize(
    ("function", "error", "named"),
    [
        ("rename", errno.EROFS, "cannot rename {staging} to {state}/generations/2: Read-only file system"),
        ("replace", errno.EIO, "cannot switch {state}/current: Input/output error"),
        ("fsync", errno.ENOSPC, "cannot sync {staging}/certificate.pem: No space left on device"),
    ],
)
def test_commit_failure_leaves_current_untouched(
    store: Store, state: Path, monkeypatch: pytest.MonkeyPatch, function: str, error: int, named: str
) -> None:
    first = provision(store, 1)
    staging = store.stage()
    fill(staging, make_manifest(thing_name="sensor-0002"), serial=2)
    monkeypatch.setattr(os, function, failing(error, getattr(os, function)))

    with pytest.raises(StorageError) as raised:
        store.commit(staging)
    monkeypatch.undo()

    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == named.format(staging=staging.path, state=state)
    assert KEY_PEM.decode() not in str(raised.value)
    assert store.current() == first
    assert os.readlink(state / "current") == "generations/1"
    assert store.generations() == [1]
    assert listing(state) == ["current", "generations"]  # no staging, no current.tmp-*, no removing-*


def syncing_the_switch_to(state: Path, number: int) -> Callable[[int], bool]:
    """True for an fsync of the state directory once `current` names generation ``number``."""
    state_inode = state.stat().st_ino

    def switched(fd: int) -> bool:
        current = state / "current"
        return (
            os.fstat(fd).st_ino == state_inode
            and current.is_symlink()
            and os.readlink(current) == f"generations/{number}"
        )

    return switched


def test_commit_syncs_both_directories_of_its_rename_before_the_switch(
    store: Store, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """staging-* -> generations/<n> changes the state directory too: if it cannot be synced, `current` is never
    switched, and the new generation is set aside whole (not deleted: that rename is not on disk either)."""
    first = provision(store, 1)
    staging = store.stage()
    fill(staging, make_manifest(thing_name="sensor-0002"), serial=2)
    state_inode = state.stat().st_ino
    switches: list[str] = []
    monkeypatch.setattr(os, "fsync", failing(errno.EIO, os.fsync, lambda fd: os.fstat(fd).st_ino == state_inode))
    monkeypatch.setattr(os, "replace", lambda source, *args, **kwargs: switches.append(str(source)))

    with pytest.raises(StorageError) as raised:
        store.commit(staging)
    monkeypatch.undo()

    assert raised.value.message == f"cannot sync {state}: Input/output error"
    assert switches == []
    assert store.current() == first
    assert store.generations() == [1]
    [removing] = [path for path in state.iterdir() if path.name.startswith("removing-2-")]
    assert "removed" in store.recover()[0]
    assert listing(state) == ["current", "generations"]
    assert not removing.exists()


def test_commit_failing_after_the_switch_puts_current_back(
    store: Store, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename over `current` happened but the state directory's fsync failed: the switch is not
    durable, so the commit reports failure and restores the previous link."""
    first = provision(store, 1)
    staging = store.stage()
    fill(staging, make_manifest(thing_name="sensor-0002"), serial=2)
    monkeypatch.setattr(os, "fsync", failing(errno.EIO, os.fsync, syncing_the_switch_to(state, 2)))

    with pytest.raises(StorageError) as raised:
        store.commit(staging)
    monkeypatch.undo()

    assert raised.value.message == f"cannot switch {state / 'current'}: Input/output error"
    assert os.readlink(state / "current") == "generations/1"
    assert store.current() == first
    assert store.generations() == [1]
    assert listing(state) == ["current", "generations"]


def test_first_commit_failing_after_the_switch_leaves_no_current(
    store: Store, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = store.stage()
    fill(staging, make_manifest(), serial=1)
    monkeypatch.setattr(os, "fsync", failing(errno.ENOSPC, os.fsync, syncing_the_switch_to(state, 1)))

    with pytest.raises(StorageError) as raised:
        store.commit(staging)
    monkeypatch.undo()

    assert raised.value.exit_code == EX_CANTCREAT
    assert store.current() is None
    assert store.generations() == []
    assert listing(state) == ["generations"]


@pytest.mark.parametrize(
    ("write", "name"),
    [
        (lambda staging: staging.write_private_key(KEY_PEM), "private.key"),
        (lambda staging: staging.write_certificate(certificate_pem(2)), "certificate.pem"),
        (lambda staging: staging.write_device_config({"a": "b"}), "device-config.json"),
        (lambda staging: staging.write_manifest(make_manifest()), "manifest.json"),
    ],
)
def test_staging_write_failure_discards_staging(
    store: Store, state: Path, monkeypatch: pytest.MonkeyPatch, write: Callable[[Staging], Path], name: str
) -> None:
    first = provision(store, 1)
    staging = store.stage()
    monkeypatch.setattr(os, "write", failing(errno.ENOSPC, os.write))

    with pytest.raises(StorageError) as raised:
        write(staging)
    monkeypatch.undo()

    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == f"cannot write {staging.path / name}: No space left on device"
    assert "S3CR3T" not in str(raised.value)
    assert not staging.path.exists()
    assert store.current() == first
    assert listing(state) == ["current", "generations"]


def test_stage_failure_is_a_storage_error(store: Store, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", failing(errno.EIO, os.fsync))
    with pytest.raises(StorageError) as raised:
        store.stage()
    monkeypatch.undo()
    assert raised.value.message == f"cannot sync {state}: Input/output error"
    assert listing(state) == ["generations"]


@pytest.mark.parametrize(
    ("missing", "key_reference", "why"),
    [
        ("manifest.json", KEY_FILE_REFERENCE, "manifest.json is missing"),
        ("certificate.pem", KEY_FILE_REFERENCE, "certificate.pem is missing"),
        ("private.key", KEY_FILE_REFERENCE, "private.key is missing"),
    ],
)
def test_commit_refuses_an_incomplete_staging(
    store: Store, state: Path, missing: str, key_reference: str, why: str
) -> None:
    staging = store.stage()
    fill(staging, make_manifest(key_reference=key_reference), serial=1)
    (staging.path / missing).unlink()

    with pytest.raises(StorageError) as raised:
        store.commit(staging)

    assert raised.value.message == f"cannot commit {staging.path}: {why}"
    assert store.current() is None
    assert listing(state) == ["generations"]


def test_commit_refuses_a_key_file_next_to_a_pkcs11_reference(store: Store, state: Path) -> None:
    staging = store.stage()
    fill(staging, make_manifest(key_reference=PKCS11_REFERENCE), serial=1)
    staging.write_private_key(KEY_PEM)

    with pytest.raises(StorageError) as raised:
        store.commit(staging)

    assert raised.value.message == f"cannot commit {staging.path}: it holds private.key for a PKCS#11 key"
    assert listing(state) == ["generations"]


def test_commit_refuses_a_symlink_in_place_of_a_staged_file(store: Store, state: Path, tmp_path: Path) -> None:
    """Whoever can write the state directory swaps a staged file for a symlink to another file: commit does not
    change that file's mode (chmod by path would), refuses, and leaves `current` alone."""
    first = provision(store, 1)
    victim = tmp_path / "shadow"
    victim.write_bytes(b"root:secret\n")
    victim.chmod(0o600)
    staging = store.stage()
    fill(staging, make_manifest(thing_name="sensor-0002"), serial=2)
    (staging.path / "certificate.pem").unlink()
    (staging.path / "certificate.pem").symlink_to(victim)

    with pytest.raises(StorageError) as raised:
        store.commit(staging)

    assert raised.value.exit_code == EX_CANTCREAT
    assert raised.value.message == (
        f"cannot set the mode of {staging.path / 'certificate.pem'}: it is a symlink, not a regular file"
    )
    assert mode(victim) == 0o600
    assert store.current() == first
    assert listing(state) == ["current", "generations"]


def test_commit_refuses_a_symlink_in_place_of_the_staging_directory(store: Store, state: Path, tmp_path: Path) -> None:
    staging = store.stage()
    fill(staging, make_manifest(), serial=1)
    elsewhere = tmp_path / "elsewhere"
    staging.path.rename(elsewhere)
    elsewhere.chmod(0o755)
    staging.path.symlink_to(elsewhere)
    modes_before = {path.name: mode(path) for path in elsewhere.iterdir()}

    with pytest.raises(StorageError) as raised:
        store.commit(staging)

    assert raised.value.message == f"cannot commit {staging.path}: it is a symlink or not a directory"
    assert mode(elsewhere) == 0o755
    assert {path.name: mode(path) for path in elsewhere.iterdir()} == modes_before
    assert store.current() is None


def test_discard_never_raises(store: Store) -> None:
    staging = store.stage()
    staging.discard()
    staging.discard()
    assert not staging.path.exists()


# --- Manifest ---------------------------------------------------------------------------------------------


def test_manifest_round_trip() -> None:
    manifest = make_manifest(key_reference=PKCS11_REFERENCE, template="")
    assert Manifest.from_json(manifest.to_json(), WHERE) == manifest
    assert manifest.to_json().endswith(b"}\n")


def test_manifest_device_configuration_is_a_read_only_copy() -> None:
    config = {"Region": "eu"}
    manifest = make_manifest(device_configuration=config)
    config["Region"] = "us"
    assert manifest.device_configuration == {"Region": "eu"}
    with pytest.raises(TypeError):
        manifest.device_configuration["Region"] = "us"  # type: ignore[index]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"thing_name": ""}, "thing_name is empty"),
        ({"endpoint": 443}, "endpoint must be a string"),
        ({"not_after": "2036-11-20 08:00:00"}, "not_after: '2036-11-20 08:00:00' is not an ISO 8601 UTC time"),
        ({"provisioned_at": "2026-02-30T00:00:00Z"}, "provisioned_at: day is out of range for month"),
        ({"key_reference": "file:/etc/shadow"}, "key_reference must be 'file:private.key' or a pkcs11: URI"),
        ({"key_reference": "pkcs11:"}, "key_reference must be 'file:private.key' or a pkcs11: URI"),
        ({"device_configuration": {"a": 1}}, "device_configuration must map strings to strings"),
    ],
)
def test_manifest_validation(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        make_manifest(**override)


def test_manifest_never_echoes_a_pin() -> None:
    with pytest.raises(ValueError) as raised:
        make_manifest(key_reference="pkcs11:token=t;object=k?pin-value=123456")
    assert str(raised.value) == "key_reference must not contain a pin-value: the PIN comes from a file"
    with pytest.raises(CorruptState) as corrupt:
        document = json.loads(make_manifest().to_json())
        document["key_reference"] = "pkcs11:object=k?pin-value=123456"
        Manifest.from_json(json.dumps(document).encode(), WHERE)
    assert "123456" not in str(corrupt.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe\xfd", "is not valid JSON"),
        (b"[]", "is not a JSON object"),
        (b'{"format": 2}', "has manifest format '2'; this fleetprov reads format 1"),
        (b'{"format": true}', "has manifest format 'True'; this fleetprov reads format 1"),
        (b'{"format": 1, "thing_name": "x"}', "lacks certificate_id, endpoint, not_after, key_reference, template"),
    ],
)
def test_manifest_from_bad_json(data: bytes, message: str) -> None:
    with pytest.raises(CorruptState) as raised:
        Manifest.from_json(data, WHERE)
    assert raised.value.message.startswith(f"{WHERE} ")
    assert message in raised.value.message


def test_iso_utc_round_trip() -> None:
    moment = datetime(2036, 11, 20, 9, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert iso_utc(moment) == "2036-11-20T08:00:00Z"
    assert parse_iso_utc("2036-11-20T08:00:00Z") == datetime(2036, 11, 20, 8, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="needs a timezone"):
        iso_utc(datetime(2036, 11, 20))


@given(st.binary(max_size=4096))
def test_manifest_from_arbitrary_bytes(data: bytes) -> None:
    try:
        manifest = Manifest.from_json(data, WHERE)
    except CorruptState as exc:
        assert str(exc).startswith(f"store: {WHERE} ")
    else:
        assert Manifest.from_json(manifest.to_json(), WHERE) == manifest


def json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    json_containers,
    max_leaves=8,
)
TIMESTAMPS = st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.just(timezone.utc)).map(iso_utc)
VALID_FIELDS = {
    "thing_name": st.text(min_size=1),
    "certificate_id": st.text(min_size=1),
    "endpoint": st.text(min_size=1),
    "not_after": TIMESTAMPS,
    "key_reference": st.sampled_from([KEY_FILE_REFERENCE, PKCS11_REFERENCE]),
    "template": st.text(),
    "device_configuration": st.dictionaries(st.text(), st.text(), max_size=5),
    "provisioned_at": TIMESTAMPS,
}


@given(
    st.builds(Manifest, **VALID_FIELDS),
    st.sampled_from(["format", *VALID_FIELDS]),
    st.none() | JSON_VALUES.map(lambda value: [value]),
)
def test_manifest_from_json_with_one_field_changed(manifest: Manifest, name: str, change: Optional[list[Any]]) -> None:
    """A valid manifest with one field deleted (change is None) or replaced by any JSON value."""
    document = json.loads(manifest.to_json())
    if change is None:
        del document[name]
    else:
        document[name] = change[0]
    try:
        parsed = Manifest.from_json(json.dumps(document).encode(), WHERE)
    except CorruptState as exc:
        assert str(exc).startswith(f"store: {WHERE}")
    else:
        assert change is not None
        assert json.loads(parsed.to_json()) == document


@given(st.builds(Manifest, **VALID_FIELDS))
def test_manifest_round_trips_through_json(manifest: Manifest) -> None:
    assert Manifest.from_json(manifest.to_json(), WHERE) == manifest


def test_recover_removes_half_written_temporary_files(store: Store, state: Path) -> None:
    leftover = state / ".journal.json.tmp-4242"
    leftover.write_bytes(b'{"half":')
    unrelated = state / ".keep-me"
    unrelated.write_bytes(b"x")
    notes = store.recover()
    assert notes == [f"removed {leftover}: a file that was being written when fleetprov stopped"]
    assert not leftover.exists() and unrelated.exists()
