"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the directory.

A reader (or a reboot) sees either the old content or the new one, never a mix. Files that must not exist
yet (a private key, anything inside a staging directory) are created with O_EXCL instead, with their final
mode from the first byte. set_mode changes a mode through a descriptor opened with O_NOFOLLOW, never by
path: a symlink put in the place of a file is refused, not followed. Every write function (and set_mode)
raises StorageError naming the path; the fsync helpers raise OSError for their caller to name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from fleetprov.crashpoints import crash_mid_write, crash_point
from fleetprov.errors import StorageError


@contextlib.contextmanager
def storage_errors(action: str, path: Path) -> Iterator[None]:
    """Turn an OSError into StorageError("cannot <action> <path>: <strerror>") for the CLI's exit 73."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot {action} {path}: {exc.strerror or exc}", step="store") from exc


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_mode(path: Path, mode: int, *, directory: bool = False, parent_fd: Optional[int] = None) -> None:
    """Give the regular file (or, with ``directory``, the directory) ``path`` exactly ``mode`` and fsync it: the
    mode, and whatever was written to it, are on disk when this returns. With ``parent_fd`` (a descriptor of
    ``path``'s directory) the name is looked up in that directory, not along the path.

    The mode is set on a descriptor opened with O_NOFOLLOW (and O_NONBLOCK: a FIFO put there does not block
    us), never by path: chmod(2) by path follows a symlink that whoever can write the directory put in the
    file's place, and would change the mode of its target (any file). A symlink or anything but the expected
    kind of file is refused: StorageError naming ``path``.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    kind = "a directory" if directory else "a regular file"
    name = path if parent_fd is None else path.name
    with storage_errors("set the mode of", path):
        try:
            fd = os.open(name, flags, dir_fd=parent_fd)
        except OSError as exc:
            # O_NOFOLLOW refuses a symlink with ELOOP, or with ENOTDIR when O_DIRECTORY is set
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, parent_fd):
                raise StorageError(
                    f"cannot set the mode of {path}: it is a symlink, not {kind}", step="store"
                ) from None
            raise
    try:
        with storage_errors("set the mode of", path):
            found = os.fstat(fd).st_mode
            if not (stat.S_ISDIR(found) if directory else stat.S_ISREG(found)):
                raise StorageError(f"cannot set the mode of {path}: it is not {kind}", step="store")
            if stat.S_IMODE(found) != mode:
                os.fchmod(fd, mode)
        with storage_errors("sync", path):
            os.fsync(fd)
    finally:
        os.close(fd)


def _is_symlink(name: Path | str, parent_fd: Optional[int]) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=parent_fd).st_mode)
    except OSError:
        return False


def write_all(fd: int, data: bytes, name: str) -> None:
    """Write all of ``data`` to the new file ``fd`` and fsync it. ``name`` is the file the crash tests know it
    by (fleetprov.crashpoints): they may stop the process half-way through it."""
    if crash_mid_write(name):
        os.write(fd, data[: len(data) // 2])
        os.fsync(fd)
        crash_point(f"mid-write:{name}")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _create_and_write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode`` from its first byte, write ``data``, fsync it.

    If writing fails the partial file is removed; a file that existed before is never touched.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data, path.name.split(".tmp-")[0].lstrip("."))  # the file a temporary file stands in for
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    finally:
        os.close(fd)


TEMPORARY_FILE = re.compile(r"\..+\.tmp-\d+")


def temporary_path(path: Path) -> Path:
    """Where write_atomic builds the new content of ``path`` (matches TEMPORARY_FILE)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``; the file has ``mode`` from its first byte."""
    tmp = temporary_path(path)
    with storage_errors("write", path):
        try:
            try:
                _create_and_write(tmp, data, mode)
            except FileExistsError:  # left by a killed process that had our pid (pids repeat across boots)
                tmp.unlink()
                _create_and_write(tmp, data, mode)
            tmp.replace(path)
            fsync_dir(path.parent)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_new_private(path: Path, data: bytes) -> None:
    """Write a private key that must not exist yet: mode 0600 from its first byte, O_EXCL."""
    write_atomic(path, data, mode=0o600)


def write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path``, which must not exist (O_EXCL), with ``mode`` from its first byte; fsync it and its directory.

    For files inside a directory nobody reads yet (a staging directory): there is no old content to keep, so
    no temporary file and no rename.
    """
    with storage_errors("write", path):
        _create_and_write(path, data, mode)
        fsync_dir(path.parent)


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically: a fresh ``<link>.tmp-<pid>`` symlink renamed over it, then fsync."""
    tmp = link.with_name(f"{link.name}.tmp-{os.getpid()}")
    with storage_errors("switch", link):
        try:
            try:
                tmp.symlink_to(target)
            except FileExistsError:  # left by a crashed process that had our pid (pids repeat across boots)
                tmp.unlink()
                tmp.symlink_to(target)
            tmp.replace(link)
            fsync_dir(link.parent)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
