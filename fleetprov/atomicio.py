"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the directory.

A reader (or a reboot) sees either the old content or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fleetprov.errors import StorageError


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``; the file has ``mode`` from its first byte."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}", step="store") from exc


def write_new_private(path: Path, data: bytes) -> None:
    """Write a private key that must not exist yet: mode 0600 from its first byte, O_EXCL."""
    write_atomic(path, data, mode=0o600)
