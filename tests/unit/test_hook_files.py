"""fleetprov.hooks.changeable_only_by on real files (the tests run as root, uid 65534 stands in for the service
user): which hook files and directories are trusted, and by which path a hook runs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fleetprov.hooks import UnsafeHook, changeable_only_by

SERVICE_UID = 65534


def _file(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def _refusal(path: Path, kind: int = stat.S_IFREG, service_uid: int = SERVICE_UID) -> str:
    with pytest.raises(UnsafeHook) as refused:
        changeable_only_by(path, service_uid, kind)
    return str(refused.value)


def test_root_and_the_service_user_may_own_a_hook(tmp_path: Path) -> None:
    hook = _file(tmp_path / "hook")
    assert changeable_only_by(hook, SERVICE_UID, stat.S_IFREG) == hook
    os.chown(hook, SERVICE_UID, SERVICE_UID)
    assert changeable_only_by(hook, SERVICE_UID, stat.S_IFREG) == hook
    assert _refusal(hook, service_uid=SERVICE_UID - 1) == (
        f"{hook} belongs to uid {SERVICE_UID}, neither root nor fleetprov's user (uid {SERVICE_UID - 1})"
    )


def test_a_directory_above_may_be_open_to_all_with_the_sticky_bit(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    hook = _file(shared / "hook")
    shared.chmod(0o1777)  # as /tmp: others may add entries, not replace root's
    assert changeable_only_by(hook, SERVICE_UID, stat.S_IFREG) == hook
    shared.chmod(0o775)
    assert _refusal(hook) == f"{shared} is writable by its group or others (mode 0775)"


def test_the_hooks_directory_itself_gets_no_sticky_exception(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    hooks.chmod(0o1777)  # anyone could add a hook
    assert _refusal(hooks, stat.S_IFDIR) == f"{hooks} is writable by its group or others (mode 1777)"


def test_a_symlink_is_followed_and_its_target_checked(tmp_path: Path) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    target = _file(library / "hook")
    link = tmp_path / "10-hook"
    link.symlink_to(target)
    assert changeable_only_by(link, SERVICE_UID, stat.S_IFREG) == target  # the path it then runs by
    library.chmod(0o777)
    assert _refusal(link) == f"{library} is writable by its group or others (mode 0777)"


def test_the_kind_is_checked(tmp_path: Path) -> None:
    assert _refusal(tmp_path) == f"{tmp_path} is not a regular file"
    hook = _file(tmp_path / "hook")
    assert _refusal(hook, stat.S_IFDIR) == f"{hook} is not a directory"


def test_a_missing_hook_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        changeable_only_by(tmp_path / "gone", SERVICE_UID, stat.S_IFREG)
