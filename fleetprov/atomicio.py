"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the directory.

A reader (or a reboot) sees either the old content or the new one, never a mix. Files that must not exist
yet (a private key, anything inside a staging directory) are created with O_EXCL instead, with their final
mode from the first byte. Every write function raises StorageError naming the path; the fsync helpers
raise OSError for their caller to name.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from fleetprov.crashpoints import crash_mid_write, crash_point
from fleetprov.errors import StorageError


@contextlib.contextmanager
def storage_errors(action: str, path: Path) -> Iterator[None]:
    """Turn an OSError into StorageError("cannot <action> <path>: <strerror>") for the CLI's exit 73."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot {action} {path}: {exc.strerror or exc}", step="store") from exc


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    _fsync(directory, os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    _fsync(path, os.O_NOFOLLOW)


def _create_and_write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode`` from its first byte, write ``data``, fsync it.

    If writing fails the partial file is removed; a file that existed before is never touched.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        target = path.name.split(".tmp-")[0].lstrip(".")  # the file a temporary file stands in for
        if crash_mid_write(target):
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            crash_point(f"mid-write:{target}")
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
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
