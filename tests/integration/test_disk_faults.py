"""`fleetprov --once` when the state directory's disk fails it: full (a small tmpfs), read-only (a read-only
bind mount), deleted under the running process. Always exit 73 with a message naming the path, nothing
half-written, the previous credentials intact, never a traceback.

The tmpfs and the bind mounts need mount(2), i.e. root (CAP_SYS_ADMIN), as `make test` runs in the
development container. Without it these tests fail and say why; they never skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.support import Emulator, device_config, fleetprov

TMPFS_SIZE = 64 * 1024  # 16 pages of 4 KiB; every file fleetprov writes fits in one page
NO_SPACE = "No space left on device"
READ_ONLY = "Read-only file system"


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def _mount(*args: str) -> None:
    done = _run("mount", *args)
    if done.returncode != 0:
        pytest.fail(
            f"`mount {' '.join(args)}` failed with status {done.returncode}: {done.stderr.strip()}\n"
            f"(running as uid {os.getuid()}). These tests need mount(2) (root with CAP_SYS_ADMIN) to put the "
            "state directory on a small tmpfs or a read-only bind mount; they do not skip."
        )


def _umount(path: Path) -> None:
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))  # still busy: detach it, it goes once unused


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, to be filled up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    _mount("-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point))
    try:
        yield mount_point
    finally:
        _umount(mount_point)


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Make a directory read-only for everyone, root included: a read-only bind mount of itself."""
    mounted: list[Path] = []

    def make(directory: Path) -> None:
        _mount("--bind", str(directory), str(directory))
        mounted.append(directory)
        _mount("-o", "remount,ro,bind", str(directory))
        probe = _run("touch", str(directory / "probe"))
        assert probe.returncode != 0 and READ_ONLY in probe.stderr, probe

    yield make
    for directory in reversed(mounted):
        _umount(directory)


def _free_pages(mount_point: Path) -> int:
    return os.statvfs(mount_point).f_bavail


def _fill(mount_point: Path, leave_pages: int) -> None:
    """Fill the tmpfs with a file so that exactly ``leave_pages`` pages stay free."""
    stats = os.statvfs(mount_point)
    assert stats.f_bavail >= leave_pages, f"only {stats.f_bavail} pages free"
    with (mount_point / "filler").open("ab") as filler:
        filler.write(b"\0" * ((stats.f_bavail - leave_pages) * stats.f_bsize))
    assert _free_pages(mount_point) == leave_pages


def _edit(config: Path, change: Callable[[dict[str, Any]], None]) -> None:
    settings = yaml.safe_load(config.read_text())
    change(settings)
    config.write_text(yaml.safe_dump(settings))


def _device(emulator: Emulator, directory: Path, serial: str, state: Path) -> Path:
    config = device_config(emulator, directory, "--serial", serial)
    retry = {"initial_delay": 0.1, "max_delay": 0.5, "budget": 10, "max_attempts": 5}
    _edit(config, lambda s: s.update(state_dir=str(state), retry=retry))
    return config


def _device_certificates(emulator: Emulator) -> list[dict[str, Any]]:
    return [c for c in emulator.admin("certificates") if c["kind"] == "device"]


def _tree(state: Path) -> dict[str, str]:
    """Every file under ``state`` (symlinks as their target) with a digest of its content."""
    tree = {}
    for path in sorted(state.rglob("*")):
        name = str(path.relative_to(state))
        if path.is_symlink():
            tree[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            tree[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            tree[name] = "dir"
    return tree


def _credentials(state: Path) -> dict[str, str]:
    """The published identity: where ``current`` points and the digest of each of its files."""
    return {name: value for name, value in _tree(state).items() if name.startswith(("current", "generations"))}


def _nothing_left(state: Path) -> None:
    """No identity, no journal and nothing half-written: no staging directory, no temporary file."""
    assert not (state / "current").exists() and not (state / "current").is_symlink()
    assert not list(state.glob("generations/*"))
    assert not (state / "journal.json").exists()
    leftovers = [p.name for p in state.iterdir() if p.name.startswith(("staging-", "removing-")) or ".tmp-" in p.name]
    assert leftovers == [], f"left behind in {state}: {leftovers}"


def _clear_failure(result: subprocess.CompletedProcess[str], path_prefix: Path, why: str) -> str:
    """Exit 73, one final line naming a path under ``path_prefix`` and the reason; no traceback."""
    assert result.returncode == 73, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    final = result.stderr.strip().splitlines()[-1]
    assert final.startswith("fleetprov: ") and f"{path_prefix}/" in final and why in final, final
    return final


# -- ENOSPC ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free_pages", "fails_writing", "issued"),
    [
        # Each file fleetprov writes takes one page; the lock file holds the pid (a page) while it is held.
        (0, ("lock", "journal.json"), 0),  # no page for the pid in the lock (nor, were that optional, the journal)
        (1, ("journal.json",), 0),  # the pid takes it; none for the journal's first stage
        (2, ("private.key",), 0),  # pid and journal; none for the device key
        (3, ("journal.json",), 0),  # "key-ready": the new journal beside the old one
        (4, ("device-config.json",), 1),  # after RegisterThing: certificate.pem fits, device-config.json not
        (5, ("manifest.json",), 1),
        (6, ("identity.json",), 1),  # the last file; with one page more the run succeeds (below)
    ],
)
def test_full_disk_at_first_provisioning(
    emulator: Emulator, tmpfs: Path, tmp_path: Path, free_pages: int, fails_writing: tuple[str, ...], issued: int
) -> None:
    """A first provisioning on a disk with no room for all its files: 73 naming the file, nothing stored."""
    state = tmpfs / "state"
    config = _device(emulator, tmp_path / "device", f"enospc-{free_pages}", state)
    _fill(tmpfs, free_pages)
    before = {c["certificateId"] for c in _device_certificates(emulator)}
    result = fleetprov("--once", "--config", str(config))
    final = _clear_failure(result, state, NO_SPACE)
    assert any(f"/{name}: {NO_SPACE}" in final for name in fails_writing), final
    _nothing_left(state)
    issued_now = [c["certificateId"] for c in _device_certificates(emulator) if c["certificateId"] not in before]
    assert len(issued_now) == issued
    for certificate_id in issued_now:  # registered, then given up on: the message says which
        assert f"certificate {certificate_id}, issued to this device, is abandoned" in final


def test_just_enough_room_provisions(emulator: Emulator, tmpfs: Path, tmp_path: Path) -> None:
    """Seven free pages hold everything a first provisioning writes: the commit is a rename, the journal's
    removal frees a page, and last-run.json is best effort."""
    state = tmpfs / "state"
    config = _device(emulator, tmp_path / "device", "enospc-enough", state)
    _fill(tmpfs, 7)
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "provisioned: thing fleetprov-enospc-enough" in result.stdout
    assert os.readlink(state / "current") == "generations/1"
    assert not (state / "journal.json").exists() and not list(state.glob("staging-*"))


def test_full_disk_when_already_provisioned_still_verifies(emulator: Emulator, tmpfs: Path, tmp_path: Path) -> None:
    """Verifying an identity needs no room: the lock and last-run.json are not worth failing for."""
    state = tmpfs / "state"
    config = _device(emulator, tmp_path / "device", "enospc-verify", state)
    first = fleetprov("--once", "--config", str(config))
    assert first.returncode == 0, first.stderr
    credentials = _credentials(state)
    _fill(tmpfs, 0)
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "already provisioned; verified" in result.stdout
    assert _credentials(state) == credentials


@pytest.mark.parametrize(
    ("free_pages", "fails_writing"),
    [
        (1, "journal.json"),  # "issued": the certificate has just been issued
        (2, "device-config.json"),  # the new generation, after RegisterThing
        (3, "manifest.json"),  # the new generation is complete but has not connected: never published
    ],
)
def test_full_disk_keeps_the_previous_credentials(
    emulator: Emulator, tmpfs: Path, tmp_path: Path, free_pages: int, fails_writing: str
) -> None:
    """A new identity being provisioned while one is current (an interrupted run's journal: the shape a
    rotation has) runs out of room: 73, the current identity untouched, the new one gone and reported."""
    state = tmpfs / "state"
    config = _device(emulator, tmp_path / "device", f"enospc-previous-{free_pages}", state)
    first = fleetprov("--once", "--config", str(config))
    assert first.returncode == 0, first.stderr
    credentials = _credentials(state)
    # An interrupted run, killed once its key was ready, moved onto this state directory.
    elsewhere = tmp_path / "elsewhere"
    _edit(config, lambda s: s.update(state_dir=str(elsewhere)))
    killed = fleetprov("--once", "--config", str(config), env={"FLEETPROV_CRASH_AT": "after-key"})
    assert killed.returncode == -9, killed.stderr
    journal = json.loads((elsewhere / "journal.json").read_text())
    assert journal["stage"] == "key-ready"
    shutil.copytree(elsewhere / journal["staging"], state / journal["staging"])
    shutil.copy2(elsewhere / "journal.json", state / "journal.json")
    _edit(config, lambda s: s.update(state_dir=str(state)))
    before = {c["certificateId"] for c in _device_certificates(emulator)}
    _fill(tmpfs, free_pages)
    result = fleetprov("--once", "--config", str(config))
    final = _clear_failure(result, state, NO_SPACE)
    assert f"/{fails_writing}: {NO_SPACE}" in final, final
    assert "resuming the interrupted run (stage key-ready)" in result.stderr
    assert _credentials(state) == credentials
    assert not (state / "journal.json").exists()
    assert not [p.name for p in state.iterdir() if p.name.startswith("staging-") or ".tmp-" in p.name]
    # The certificate this run was issued is given up, and the message says which.
    [issued] = [c["certificateId"] for c in _device_certificates(emulator) if c["certificateId"] not in before]
    assert f"certificate {issued}, issued to this device, is abandoned" in final, final
    # The current identity still works.
    again = fleetprov("--once", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "already provisioned; verified" in again.stdout
    assert _credentials(state) == credentials


# -- a read-only state directory ------------------------------------------------------------------------


def test_read_only_state_directory_when_provisioned(
    emulator: Emulator, read_only: Callable[[Path], None], tmp_path: Path
) -> None:
    """fleetprov takes its lock before anything else, and cannot on a read-only directory: 73 naming the
    lock; the credentials stay as they are, and `status` still reads them."""
    state = tmp_path / "state"
    config = _device(emulator, tmp_path / "device", "read-only", state)
    first = fleetprov("--once", "--config", str(config))
    assert first.returncode == 0, first.stderr
    credentials = _credentials(state)
    read_only(state)
    result = fleetprov("--once", "--config", str(config))
    final = _clear_failure(result, state, READ_ONLY)
    assert f"{state}/lock" in final
    assert _credentials(state) == credentials
    status = fleetprov("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["provisioned"] is True and report["thing_name"] == "fleetprov-read-only"


def test_read_only_state_directory_when_not_provisioned(
    emulator: Emulator, read_only: Callable[[Path], None], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = _device(emulator, tmp_path / "device", "read-only-new", state)
    before = len(_device_certificates(emulator))
    read_only(state)
    result = fleetprov("--once", "--config", str(config))
    _clear_failure(result, state, READ_ONLY)
    assert list(state.iterdir()) == []
    assert len(_device_certificates(emulator)) == before  # it stopped before asking for a certificate


# -- the state directory deleted under a running process ------------------------------------------------


def test_state_directory_deleted_while_waiting_for_the_service(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with("--reply-delay", "2")
    state = tmp_path / "state"
    config = _device(emulator, tmp_path / "device", "deleted", state)
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetprov", "--once", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The request has been handled; its reply is 2 s away. fleetprov writes nothing until it comes.
        deadline = time.monotonic() + 30
        while "CreateCertificateFromCsr for" not in emulator.log():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "fleetprov never asked for a certificate"
            time.sleep(0.05)
        shutil.rmtree(state)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    final = _clear_failure(result, state, "No such file or directory")
    assert "journal.json" in final
    # Nothing was recreated half-way.
    assert not state.exists() or list(state.iterdir()) == []
