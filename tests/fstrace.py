"""Power-loss durability, checked on what a real process did: its file-system calls recorded by strace(1).

A killed process keeps its page cache; a power cut loses everything not fsync'd. The design's order
(DESIGN.md "Crash safety": every step's result is on disk, fsync'd file and fsync'd directory, before the
next network call) is checked on the calls themselves, for paths under one directory (``root``):

(a) a file's contents (and mode or owner) are fsync'd after its last change before it is renamed or linked
    into place; a directory renamed into place has every file and entry under it durable; a symlink made or
    renamed into place points at something durable, itself named in a durable directory entry;
(b) a directory whose entries changed (a file created, mkdir, rename, unlink, rmdir, symlink, link) is
    fsync'd, and so is a changed file, before the next network call and before the traced processes end.

"The next network call": any connect(2) to an IP address; any program started (execve(2): a hook or the
parameter command relies on what was stored, and may talk to the network); and the moment the thread that
made the change hands work to awscrt's event loop (a write to an eventfd: that is how awscrt wakes its thread
for every publish, subscribe or connect a Python call asks for). The network thread's own sends
(acknowledgements, unsubscribes after a reply) are not markers: they race with the Python thread and say
nothing about its order. A connect(2) counts whether it succeeded or not (awscrt's returns EINPROGRESS).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TypeVar

_T = TypeVar("_T")

# %desc: every call on a file descriptor (write, fsync, fchmod, ...); %file: every call taking a path.
TRACE = "trace=%file,%desc,connect,fsync,fdatasync,syncfs,sync"


def strace_command(log: Path, command: Sequence[str]) -> list[str]:
    """``command`` under strace: threads and children followed, fds shown with their paths (-yy), no buffer
    contents (-s 0: a private key's first bytes must not land in a test log), no signal lines."""
    return ["strace", "-f", "-qq", "-yy", "-s", "0", "-e", TRACE, "-e", "signal=none", "-o", str(log), *command]


@dataclass(frozen=True)
class Call:
    line: int  # 1-based line of the log where the call completed
    pid: int  # the thread (strace -f prints thread ids)
    name: str
    args: tuple[str, ...]
    result: str

    @property
    def failed(self) -> bool:
        return self.result.startswith("-1") or self.result == "?"


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(.*)$")
_EXITED = re.compile(r"^\+\+\+ |^--- ")


def parse(text: str) -> Iterator[Call]:
    """The calls of an ``strace -f -yy`` log, an interrupted call joined with its resumption."""
    pending: dict[int, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        matched = _LINE.match(raw)
        if matched is None:
            continue
        pid, rest = int(matched[1]), matched[2]
        if _EXITED.match(rest):
            continue
        if rest.endswith(_UNFINISHED):
            pending[pid] = rest[: -len(_UNFINISHED)]
            continue
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            rest = pending.pop(pid, f"{resumed[1]}(") + resumed[2]
        call = _CALL.match(rest)
        if call is not None:
            yield Call(number, pid, call[1], tuple(split_arguments(call[2])), call[3].strip())


def split_arguments(text: str) -> list[str]:
    """Top-level comma-separated arguments; quotes, brackets and <path> annotations kept whole."""
    closing = {"(": ")", "[": "]", "{": "}", "<": ">"}
    arguments, depth, current, quoted, escaped = [], [], [], False, False
    for char in text:
        current.append(char)
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in closing:
            depth.append(closing[char])
        elif depth and char == depth[-1]:
            depth.pop()
        elif char == "," and not depth:
            current.pop()
            arguments.append("".join(current).strip())
            current = []
    if current:
        arguments.append("".join(current).strip())
    return arguments


_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"(?:\.\.\.)?$')
_FD = re.compile(r"^(?:-?\d+|AT_FDCWD)<(.*)>$")


def _unquote(text: str) -> Optional[str]:
    matched = _STRING.match(text)
    if matched is None:
        return None
    raw = matched[1]
    return re.sub(r"\\([0-7]{1,3}|x[0-9a-fA-F]{2}|.)", _unescape, raw)


def _unescape(match: re.Match[str]) -> str:
    code = match[1]
    simple = {"n": "\n", "t": "\t", "r": "\r", "v": "\v", "f": "\f"}
    if code[0] == "x":
        return chr(int(code[1:], 16))
    if code[0].isdigit():
        return chr(int(code, 8))
    return simple.get(code, code)


def fd_path(argument: str) -> Optional[str]:
    """The path strace -yy shows for a file descriptor argument (``7</state/lock>``), or None."""
    matched = _FD.match(argument)
    if matched is None:
        return None
    return matched[1].removesuffix(" (deleted)")


@dataclass
class _Change:
    line: int
    pid: int
    what: str


@dataclass
class _State:
    """What is not durable yet: changed directory entries (keyed by the entry's path: the directory that must
    be fsync'd is its parent) and files with changed contents, mode or owner."""

    root: str
    cwd: str
    not_state: frozenset[str]
    entries: dict[str, _Change] = field(default_factory=dict)
    contents: dict[str, _Change] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)  # link path -> the path its target names
    violations: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)  # see Report

    def inside(self, path: str) -> bool:
        return _under(path, self.root)

    def absolute(self, path: str, directory: Optional[str] = None) -> str:
        return os.path.normpath(os.path.join(directory or self.cwd, path))

    def entry_changed(self, call: Call, path: str, what: str, *, count: bool = True) -> None:
        if self.inside(path) and os.path.basename(path) not in self.not_state:
            self.calls[what.split(maxsplit=1)[0]] += count
            self.entries[path] = _Change(call.line, call.pid, f"{what} {path}")

    def content_changed(self, call: Call, path: str, what: str) -> None:
        if self.inside(path) and os.path.basename(path) not in self.not_state:
            self.contents[path] = _Change(call.line, call.pid, f"{what} {path}")

    def synced(self, path: str) -> None:
        """fsync(2) of ``path``: its contents, and the entries in it if it is a directory."""
        if self.inside(path):
            self.calls["fsync"] += 1
        self.contents.pop(path, None)
        for name in [name for name in self.entries if os.path.dirname(name) == path]:
            del self.entries[name]

    def gone(self, path: str) -> None:
        """``path`` was removed: nothing of it or under it needs to reach the disk any more."""
        for pending in (self.entries, self.contents, self.symlinks):
            for name in [name for name in pending if _under(name, path)]:
                del pending[name]

    def moved(self, source: str, destination: str) -> None:
        """What is pending in or of ``source`` now is in or of ``destination`` (the change of ``source``'s own
        entry stays with the directory it was in)."""
        _relocate(self.entries, source, destination, own=False)
        _relocate(self.contents, source, destination, own=True)
        _relocate(self.symlinks, source, destination, own=True)

    def require_durable(self, call: Call, path: str, why: str, *, with_entry: bool = False) -> None:
        """Rule (a): the contents of ``path`` and of everything under it are on disk, and the entries of the
        directories under it; with ``with_entry`` (a symlink's target) also ``path``'s own entry."""
        late = [change for name, change in self.contents.items() if _under(name, path)]
        late += [change for name, change in self.entries.items() if _under(name, path) and (with_entry or name != path)]
        for change in late:
            self.violations.append(f"line {call.line}: {why}, but {change.what} (line {change.line}) is not fsync'd")

    def network(self, call: Call, *, marker: str, thread_only: bool) -> None:
        """Rule (b) at a network call: nothing is pending (nothing of this thread, for a hand-over to awscrt).
        Each change is reported once."""
        self.calls[call.name if call.name in ("connect", "execve") else "eventfd"] += 1
        for pending, kind in ((self.entries, "directory"), (self.contents, "file")):
            late = [name for name, change in pending.items() if not thread_only or change.pid == call.pid]
            for name in late:
                change = pending.pop(name)
                where = os.path.dirname(name) if pending is self.entries else name
                self.violations.append(
                    f"line {call.line}: {marker} while {kind} {where} is not fsync'd after {change.what} "
                    f"(line {change.line})"
                )

    def report(self) -> Report:
        """The violations, with what is still not durable when the traced processes have ended."""
        for name, change in self.entries.items():
            self.violations.append(
                f"end: directory {os.path.dirname(name)} is not fsync'd after {change.what} (line {change.line})"
            )
        for name, change in self.contents.items():
            self.violations.append(f"end: file {name} is not fsync'd after {change.what} (line {change.line})")
        return Report(self.violations, self.calls)


def _relocate(pending: dict[str, _T], source: str, destination: str, *, own: bool) -> None:
    """Rename the keys at (with ``own``) and under ``source`` to the same places under ``destination``."""
    for name in [name for name in pending if _under(name, source) and (own or name != source)]:
        pending[destination + name[len(source) :]] = pending.pop(name)


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + "/")


_AT_REMOVEDIR = "AT_REMOVEDIR"


@dataclass(frozen=True)
class Report:
    violations: list[str]
    # How often each kind of call was seen on paths under root (mkdir, create, rename, symlink, unlink, rmdir,
    # link, fsync, ...) and the markers (connect, execve, eventfd): proof that the trace holds the run.
    calls: Counter[str]


def check(text: str, root: Path, cwd: Path, *, not_state: Sequence[str] = ()) -> Report:
    """The violations of rules (a) and (b) (module docstring) in the strace log ``text``, for paths under
    ``root``; relative paths are resolved from ``cwd``. Files named in ``not_state`` (the store's lock:
    flock(2) is the lock, the pid in it only helps a message) may be created and written without fsync."""
    state = _State(os.path.normpath(root), os.path.normpath(cwd), frozenset(not_state))
    for call in parse(text):
        _apply(state, call)
    return state.report()


def _path_at(state: _State, directory: str, path: str) -> Optional[str]:
    """An ``*at`` call's path: ``path`` (a quoted string) relative to the descriptor argument ``directory``."""
    name = _unquote(path)
    if name is None:
        return None
    return state.absolute(name, fd_path(directory))


def _apply(state: _State, call: Call) -> None:
    name, args = call.name, call.args
    if name == "connect":  # counts whether it succeeded or not (EINPROGRESS)
        if len(args) > 1 and ("AF_INET" in args[1]):
            state.network(call, marker="connect(2)", thread_only=False)
        return
    if call.failed:
        return
    if name == "execve":  # a hook or command starts: it may act on what this run stored, or talk
        state.network(call, marker="a program started", thread_only=False)
        return
    if name in ("write", "writev") and args and fd_path(args[0]) == "anon_inode:[eventfd]":
        state.network(call, marker="a request handed to awscrt", thread_only=True)
        return
    if name in ("write", "writev", "pwrite64", "pwritev", "pwritev2", "ftruncate", "fallocate", "fchmod", "fchown"):
        path = fd_path(args[0]) if args else None
        if path is not None:
            state.content_changed(call, path, name)
        return
    if name in ("fsync", "fdatasync"):
        path = fd_path(args[0]) if args else None
        if path is not None:
            state.synced(path)
        return
    if name in ("sync", "syncfs"):
        state.entries.clear()
        state.contents.clear()
        return
    target = _target(state, call)
    if target is None:
        return
    if name in ("open", "openat", "creat", "openat2"):
        flags = args[2] if name == "openat" else args[1] if len(args) > 1 else ""
        if name == "creat" or "O_CREAT" in flags:
            state.entry_changed(call, target, "create")
        if "O_TRUNC" in flags:
            state.content_changed(call, target, "truncate")
    elif name in ("chmod", "fchmodat", "chown", "lchown", "fchownat", "truncate"):
        state.content_changed(call, target, name)
    elif name in ("mkdir", "mkdirat", "mknod", "mknodat"):
        state.entry_changed(call, target, name.removesuffix("at"))
    elif name in ("unlink", "unlinkat", "rmdir"):
        what = "rmdir" if name == "rmdir" or _AT_REMOVEDIR in args[-1] else "unlink"
        state.gone(target)
        state.entry_changed(call, target, what)
    elif name in ("rename", "renameat", "renameat2"):
        source, destination = target, _second_path(state, call)
        if destination is None:
            return
        state.require_durable(call, source, f"{source} is renamed to {destination}")
        linked = state.symlinks.get(source)
        if linked is not None:
            state.require_durable(call, linked, f"the symlink {destination} is put in place", with_entry=True)
        state.gone(destination)
        state.moved(source, destination)
        state.entry_changed(call, source, "rename from", count=False)  # one rename, counted once
        state.entry_changed(call, destination, "rename to")
    elif name in ("symlink", "symlinkat"):
        link = _second_path(state, call)
        link_target = _unquote(args[0])
        if link is None or link_target is None:
            return
        resolved = state.absolute(link_target, os.path.dirname(link))
        state.symlinks[link] = resolved
        state.require_durable(call, resolved, f"the symlink {link} -> {link_target} is made", with_entry=True)
        state.entry_changed(call, link, "symlink")
    elif name in ("link", "linkat"):
        destination = _second_path(state, call)
        if destination is None:
            return
        state.require_durable(call, target, f"{target} is linked as {destination}")
        state.entry_changed(call, destination, "link")


_AT_CALLS = frozenset({"openat", "openat2", "fchmodat", "fchownat", "mkdirat", "mknodat", "unlinkat", "renameat",
                       "renameat2", "linkat"})  # fmt: skip


def _target(state: _State, call: Call) -> Optional[str]:
    """The first path a call acts on, absolute."""
    args = call.args
    if call.name in _AT_CALLS:
        return _path_at(state, args[0], args[1]) if len(args) > 1 else None
    if call.name in ("symlink", "symlinkat"):
        return _second_path(state, call)
    name = _unquote(args[0]) if args else None
    return state.absolute(name) if name is not None else None


def _second_path(state: _State, call: Call) -> Optional[str]:
    """The second path of rename/link/symlink and their *at forms (the destination, or the link's name)."""
    args = call.args
    if call.name in ("renameat", "renameat2", "linkat"):
        return _path_at(state, args[2], args[3]) if len(args) > 3 else None
    if call.name == "symlinkat":
        return _path_at(state, args[1], args[2]) if len(args) > 2 else None
    name = _unquote(args[1]) if len(args) > 1 else None
    return state.absolute(name) if name is not None else None
