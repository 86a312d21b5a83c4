"""File operations for directories that a less privileged user can write, done on file descriptors.

Root working by path in a directory another user can write loses: between mkdir/open and chmod/chown/open
by name, that user puts a symlink (or a hard link) in place of the entry, and root changes the owner or mode
of, or writes, whatever it points at (/etc/shadow). Here nothing is looked up by path more than once:

- open_directory walks a path one component at a time (openat with O_NOFOLLOW; O_PATH on the way, so search
  permission is enough, as for a path lookup) and follows a symlink only in a directory that nobody but root
  and us can write, where no other user can have placed it; a directory it makes is 0700 and given to the
  owner of the directory it is made in (when we are root).
- make_directory and create_file make new entries (mkdir, O_CREAT|O_EXCL|O_NOFOLLOW: a planted name fails,
  it is never followed or reused) and set the mode and owner on the descriptor (fchmod, fchown), never by name:
  a hard link put in place of the name later is not touched.
- remove_entry deletes by name relative to a directory descriptor and enters a directory only through
  O_NOFOLLOW|O_DIRECTORY: it never follows a symlink and never opens a file.

Changes are fsync'd (the file, and the directory whose entries changed) before the functions return, so a
caller's next step (a rename, a switch) relies only on what survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Optional

from fleetprov.atomicio import write_all

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# On the way: O_PATH needs no read permission, only search (x) as a path lookup does: a 0711 directory on the
# way (a home directory) does not stop the service user.
_WAY_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DETOURS = 40  # symlinks followed and creation races lost along one path (Linux follows 40 symlinks)

Owner = Optional[tuple[int, int]]  # (uid, gid) to give new entries, None: leave them ours


def foreign_owner(directory_fd: int) -> Owner:
    """(uid, gid) of the directory when we are root and it belongs to another user, else None."""
    if os.geteuid() != 0:
        return None
    info = os.fstat(directory_fd)
    return (info.st_uid, info.st_gid) if info.st_uid != 0 else None


def open_directory(path: Path, *, create: bool = False) -> int:
    """An O_DIRECTORY descriptor of ``path`` (the caller closes it); with ``create``, missing directories are
    made (0700, for the owner of the directory they are made in, as make_directory does).

    OSError if a component is missing (without ``create``) or not a directory, or is a symlink that another
    user could have placed (ELOOP, the message names it)."""
    walked = Path("/")
    parts = list((Path.cwd() / path).parts[1:])  # no resolve(): it would follow every symlink
    fd = os.open("/", _WAY_FLAGS)
    detours = 0  # symlinks followed and creation races lost: bounded, so a busy attacker cannot keep us here
    try:
        while parts:
            name = parts.pop(0)
            try:
                child = os.open(name, _WAY_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    child = make_directory(fd, name, 0o700, foreign_owner(fd))
                except FileExistsError:  # made meanwhile (another install): look again
                    parts.insert(0, name)
                    child = -1
            except OSError as exc:  # ENOTDIR (ELOOP on some systems): a symlink (O_NOFOLLOW), or not a directory
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                target = _followable_link(fd, name, walked / name, exc)
                parts[:0] = [part for part in Path(target).parts if part != "/"]
                if target.startswith("/"):
                    root = os.open("/", _WAY_FLAGS)
                    os.close(fd)
                    fd, walked = root, Path("/")
                child = -1
            if child == -1:
                detours += 1
                if detours > MAX_DETOURS:
                    raise OSError(errno.ELOOP, f"{path}: too many symbolic links or concurrent changes")
                continue
            os.close(fd)
            fd, walked = child, walked / name
        return os.open(".", DIRECTORY_FLAGS, dir_fd=fd)  # readable: to list, lock and fsync
    finally:
        os.close(fd)


def _followable_link(directory_fd: int, name: str, where: Path, not_opened: OSError) -> str:
    """The target of the symlink ``name`` if no other user can have put it there; else OSError ELOOP.

    Trusted: a directory that root or we own and that neither its group nor others can write. ``not_opened``
    is raised again if ``name`` is no symlink (a file where a directory should be)."""
    try:
        target = os.readlink(name, dir_fd=directory_fd)
    except OSError:
        raise not_opened from None
    info = os.fstat(directory_fd)
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(
            errno.ELOOP,
            f"{where} is a symbolic link in a directory that another user can write (owner uid {info.st_uid}, "
            f"mode {stat.S_IMODE(info.st_mode):04o}): not followed",
        )
    return target


def make_directory(parent_fd: int, name: str, mode: int, owner: Owner) -> int:
    """Make the directory ``name`` in ``parent_fd`` (which may be O_PATH) with exactly ``mode`` and ``owner``;
    its descriptor.

    fsync'd, and its parent too. FileExistsError if the name is taken (nothing planted there is used); OSError
    if the new directory was replaced before it could be opened (ENOTDIR for a symlink, EBUSY for a directory).
    The umask must leave the owner rwx (a non-root caller opens what it made before setting ``mode``)."""
    os.mkdir(name, mode, dir_fd=parent_fd)
    fd = os.open(name, DIRECTORY_FLAGS, dir_fd=parent_fd)  # a symlink put in its place: ENOTDIR
    try:
        if os.fstat(fd).st_uid != os.geteuid():  # a directory of the other user's, renamed in its place
            raise OSError(errno.EBUSY, f"{name} was replaced while it was made")
        settle(fd, mode, owner)
        _fsync_directory(parent_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_directory(directory_fd: int) -> None:
    """fsync the directory, also when ``directory_fd`` is an O_PATH descriptor (which fsync(2) refuses)."""
    fd = os.open(".", DIRECTORY_FLAGS, dir_fd=directory_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(directory_fd: int, name: str, data: bytes, mode: int, owner: Owner) -> None:
    """Create ``name`` in ``directory_fd`` (it must not exist: O_EXCL, never following a symlink) holding
    ``data``, with exactly ``mode`` and ``owner``; fsync'd, the directory too. A failed write removes it."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o700,
                 dir_fd=directory_fd)  # fmt: skip
    try:
        write_all(fd, data, name)
        settle(fd, mode, owner)
        os.fsync(directory_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=directory_fd)
        raise
    finally:
        os.close(fd)


def settle(fd: int, mode: int, owner: Owner) -> None:
    """Exactly ``mode`` whatever the umask, and ``owner``, on the descriptor; fsync'd with the content."""
    os.fchmod(fd, mode)
    if owner is not None:
        os.fchown(fd, *owner)
    os.fsync(fd)


def remove_entry(directory_fd: int, name: str) -> None:
    """Remove ``name`` from ``directory_fd``: a file, a symlink (not what it points at) or a directory and
    the files in it. A directory inside it (fleetprov makes none) stays, and with it the entry; OSError then.
    The caller fsyncs ``directory_fd``."""
    try:
        os.unlink(name, dir_fd=directory_fd)
        return
    except IsADirectoryError:
        pass
    fd = os.open(name, DIRECTORY_FLAGS, dir_fd=directory_fd)  # replaced by a symlink meanwhile: ENOTDIR, kept
    try:
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries]
        for inner in names:
            with contextlib.suppress(IsADirectoryError):
                os.unlink(inner, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=directory_fd)
