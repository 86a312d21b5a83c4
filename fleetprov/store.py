"""Credential storage: numbered generations, an atomic ``current`` pointer, one lock, recovery at start.

Layout of the state directory (docs/device-agent.md; every directory 0700, but see share_with_group)::

    current -> generations/<n>          relative symlink, replaced by renaming a fresh current.tmp-<pid> over it
    generations/<n>/certificate.pem     0644
    generations/<n>/private.key         0600 from its first byte; absent when the key lives in a PKCS#11 token
    generations/<n>/manifest.json       0644, see Manifest
    generations/<n>/device-config.json  0644, the deviceConfiguration from RegisterThing
    generations/<n>/identity.json       0644, for local applications (identity_document); older generations lack it
    staging-<random>/                   a generation being built, never visible as current
    removing-<n>-<random>/              a generation being deleted by prune()
    lock                                flock(2) target; holds the holder's pid

<n> is 1 to MAX_GENERATION in decimal (generation_name, generation_number: one rule for reading and writing);
any other name in generations/ is not a generation. A commit whose number would pass MAX_GENERATION fails
before it renames anything.

With share_with_group (GROUP_MODES) the published identity is readable by the directories' group: the state
directory, generations/ and each generation 0750, a generation's files 0640 (private.key too). The lock, the
journal and staging directories stay 0600/0700, and a generation's directory and files get their final modes
(umask-independent) at commit, before the rename that makes them visible. Modes are set through descriptors
opened with O_NOFOLLOW (atomicio.set_mode), never by path: a symlink in the place of a file or directory is
refused with a StorageError naming it, never followed.

Why a crash cannot leave anything half-written under ``current``: every file of a generation is written and
fsync'd inside a staging directory nobody reads; one rename(2) turns it into generations/<n>, complete; a
second rename(2), of a symlink, publishes it. After a crash ``current`` names the old generation or the new
one, both complete, and recover() removes the leftovers (staging-*, removing-*, current.tmp-*).

A power cut loses more than a crash (the page cache), so the order is on disk too (DESIGN.md "Crash safety"):
a file is fsync'd after its last change (contents, mode) before a rename places it, and a directory whose
entries changed is fsync'd before the next step relies on it: the rename staging-* -> generations/<n> fsyncs
both parents before ``current`` names the generation; prune() fsyncs generations/ and the state directory
around each deletion, recover() the state directory after its removals. tests/integration/test_durability.py
checks this on the system calls of real runs.

stage, commit, switch_to, prune and recover expect the caller to hold lock().
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Optional

from fleetprov.atomicio import TEMPORARY_FILE, fsync_dir, replace_symlink, set_mode, storage_errors, write_new
from fleetprov.errors import EX_TEMPFAIL, FleetprovError, StorageError

CURRENT = "current"
GENERATIONS = "generations"
LOCK = "lock"
STAGING_PREFIX = "staging-"
REMOVING_PREFIX = "removing-"
CERTIFICATE = "certificate.pem"
PRIVATE_KEY = "private.key"
MANIFEST = "manifest.json"
DEVICE_CONFIG = "device-config.json"
IDENTITY = "identity.json"

KEY_FILE_REFERENCE = f"file:{PRIVATE_KEY}"
PKCS11_PREFIX = "pkcs11:"
MANIFEST_FORMAT = 1
IDENTITY_FORMAT = 1

_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# One rule for generation numbers, reading and writing: 1 to MAX_GENERATION, written in decimal without leading
# zeros (generation_name, generation_number). A directory named otherwise is not a generation.
MAX_GENERATION = 10**18 - 1
_GENERATION_NAME = re.compile(rf"[1-9][0-9]{{0,{len(str(MAX_GENERATION)) - 1}}}")


class CorruptState(StorageError):
    """A file under the state directory is missing or unreadable as ours; the message names it."""

    def __init__(self, message: str, *, step: str = "store") -> None:
        super().__init__(message, step=step)


class StoreLocked(FleetprovError):
    """Another fleetprov process holds the state directory's lock."""

    exit_code = EX_TEMPFAIL
    transient = True

    def __init__(self, message: str, *, step: str = "lock") -> None:
        super().__init__(message, step=step)


def iso_utc(moment: datetime) -> str:
    """``moment`` as the manifest writes times: ``2036-11-20T08:00:00Z`` (whole seconds, UTC)."""
    if moment.utcoffset() is None:
        raise ValueError("a manifest time needs a timezone")
    return moment.astimezone(timezone.utc).strftime(_TIMESTAMP_FORMAT)


def parse_iso_utc(text: str) -> datetime:
    """The inverse of iso_utc: an aware UTC datetime, or ValueError."""
    if not _TIMESTAMP.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 UTC time like 2036-11-20T08:00:00Z")
    return datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Manifest:
    """What a generation holds, saved as its manifest.json. Validated on construction (ValueError).

    thing_name, certificate_id and endpoint are non-empty; template may be empty (JITP/JITR have none on
    the device); times are iso_utc strings; key_reference is KEY_FILE_REFERENCE or a pkcs11: URI without
    a pin-value (a PIN never lands on disk or in a message).
    """

    thing_name: str
    certificate_id: str
    endpoint: str
    not_after: str
    key_reference: str
    template: str
    device_configuration: Mapping[str, str]
    provisioned_at: str

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name != "device_configuration" and not isinstance(getattr(self, field.name), str):
                raise ValueError(f"{field.name} must be a string")
        for name in ("thing_name", "certificate_id", "endpoint"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")
        for name in ("not_after", "provisioned_at"):
            try:
                parse_iso_utc(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        # The reference is never echoed: a pkcs11: URI may carry a PIN.
        reference = self.key_reference
        if reference != KEY_FILE_REFERENCE and not (
            reference.startswith(PKCS11_PREFIX) and len(reference) > len(PKCS11_PREFIX)
        ):
            raise ValueError(f"key_reference must be {KEY_FILE_REFERENCE!r} or a {PKCS11_PREFIX} URI")
        if "pin-value" in reference.lower():
            raise ValueError("key_reference must not contain a pin-value: the PIN comes from a file")
        config = self.device_configuration
        if not isinstance(config, Mapping) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in config.items()
        ):
            raise ValueError("device_configuration must map strings to strings")
        object.__setattr__(self, "device_configuration", MappingProxyType(dict(config)))

    def to_json(self) -> bytes:
        document: dict[str, object] = {"format": MANIFEST_FORMAT}
        document.update((field.name, getattr(self, field.name)) for field in fields(self))
        document["device_configuration"] = dict(self.device_configuration)
        return _json_bytes(document)

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> Manifest:
        """Parse a manifest.json read from ``where``; CorruptState naming ``where`` if it is not one."""
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CorruptState(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise CorruptState(f"{where} is not a JSON object")
        version = document.get("format")
        if type(version) is not int or version != MANIFEST_FORMAT:
            raise CorruptState(f"{where} has manifest format {str(version)[:20]!r}; this fleetprov reads format 1")
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in document]
        if missing:
            raise CorruptState(f"{where} lacks {', '.join(missing)}")
        try:
            return cls(**{name: document[name] for name in names})
        except ValueError as exc:
            raise CorruptState(f"{where}: {exc}") from None


def identity_document(manifest: Manifest, state_dir: Path, *, port: int, root_ca: Path) -> dict[str, object]:
    """identity.json: where local applications find the device identity (docs/device-agent.md).

    Paths go through ``current`` (not generations/<n>), so the file stays right after a rotation switches
    ``current``; the generation's number is not known before the commit and is not in it.
    """
    current = state_dir.absolute() / CURRENT
    key_in_file = manifest.key_reference == KEY_FILE_REFERENCE
    return {
        "format": IDENTITY_FORMAT,
        "thing_name": manifest.thing_name,
        "certificate_id": manifest.certificate_id,
        "endpoint": manifest.endpoint,
        "port": port,
        "root_ca": str(root_ca.absolute()),
        "certificate": str(current / CERTIFICATE),
        "private_key": str(current / PRIVATE_KEY) if key_in_file else None,
        "key_reference": manifest.key_reference,  # never holds a PIN: Manifest refuses a pin-value
        "device_configuration": str(current / DEVICE_CONFIG),
        "not_after": manifest.not_after,
    }


@dataclass(frozen=True)
class Modes:
    """The modes of what a generation publishes; the lock, the journal and staging directories are 0600/0700
    either way."""

    directory: int  # the state directory, generations/ and each generation
    file: int  # certificate, manifest, device configuration, identity.json
    private_key: int

    def of_file(self, name: str) -> int:
        return self.private_key if name == PRIVATE_KEY else self.file


PRIVATE_MODES = Modes(directory=0o700, file=0o644, private_key=0o600)
GROUP_MODES = Modes(directory=0o750, file=0o640, private_key=0o640)  # share_with_group


@dataclass(frozen=True)
class Generation:
    number: int
    path: Path
    manifest: Manifest
    certificate: Path
    private_key: Optional[Path]  # None for pkcs11 key references


class Staging:
    """A generation being built: a 0700 directory nobody reads until Store.commit renames it into place.

    Every write creates its file exclusively (O_EXCL) with its final mode (less what the umask takes away:
    never more open) and returns once the file and the directory are fsync'd, so each step is on disk before
    the next network call. A failed write discards the whole staging directory: that generation is abandoned.
    """

    def __init__(self, path: Path, modes: Modes = PRIVATE_MODES) -> None:
        self.path = path  # always directly in the state directory
        self.modes = modes

    def __repr__(self) -> str:
        return f"Staging({str(self.path)!r})"

    def write_private_key(self, pem: bytes) -> Path:
        return self._write(PRIVATE_KEY, pem)

    def write_certificate(self, pem: bytes) -> Path:
        return self._write(CERTIFICATE, pem)

    def write_device_config(self, config: Mapping[str, str]) -> Path:
        return self._write(DEVICE_CONFIG, _json_bytes(dict(config)))

    def write_manifest(self, manifest: Manifest) -> Path:
        return self._write(MANIFEST, manifest.to_json())

    def write_identity(self, manifest: Manifest, *, port: int, root_ca: Path) -> Path:
        """identity.json for local applications (see identity_document); port and root_ca from the config."""
        document = identity_document(manifest, self.path.parent, port=port, root_ca=root_ca)
        return self._write(IDENTITY, _json_bytes(document))

    @property
    def private_key(self) -> Path:
        return self.path / PRIVATE_KEY

    def remove_derived(self) -> None:
        """Remove the files that are written from the journal (certificate, manifest, device configuration,
        identity.json): a crash may have left one half-written. The private key is not derived and stays."""
        for name in (CERTIFICATE, MANIFEST, DEVICE_CONFIG, IDENTITY):
            with storage_errors("remove", self.path / name):
                (self.path / name).unlink(missing_ok=True)
        with storage_errors("sync", self.path):
            fsync_dir(self.path)

    def discard(self) -> None:
        """Remove the staging directory, and sync the state directory; best effort (recover() finishes the job),
        never raises."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            fsync_dir(self.path.parent)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.path / name
        try:
            write_new(path, data, mode=self.modes.of_file(name))
        except StorageError:
            self.discard()
            raise
        return path


class Store:
    """The state directory. See the module docstring for the layout and the crash-safety argument.

    ``share_with_group`` (the config key): generations committed from now on are readable by the group of
    the state directory (GROUP_MODES); generations committed before keep their modes.
    """

    def __init__(self, state_dir: Path, *, share_with_group: bool = False) -> None:
        self.state_dir = state_dir
        self.share_with_group = share_with_group
        self.modes = GROUP_MODES if share_with_group else PRIVATE_MODES
        self._generations = state_dir / GENERATIONS
        self._current = state_dir / CURRENT

    def ensure(self) -> None:
        """Create the state directory and generations/ if missing, with ``modes.directory`` (0700, or 0750 with
        share_with_group), and give generations/ that mode if it has another: switching share_with_group off
        closes every generation to the group at once. An existing state directory keeps its mode (set by an
        administrator or systemd's StateDirectoryMode=) unless share_with_group needs it 0750. Modes are set
        through descriptors (atomicio.set_mode): a symlink in the place of generations/, or of the state
        directory when its mode is set, is refused (StorageError)."""
        wanted = self.modes.directory
        for directory in (self.state_dir, self._generations):
            with storage_errors("create", directory):
                created = _make_directory(directory, wanted)
            if not created and (directory != self.state_dir or self.share_with_group):
                set_mode(directory, wanted, directory=True)  # a symlink in its place is refused

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the state directory's lock (non-blocking flock on <state>/lock); StoreLocked if it is taken.

        flock belongs to an open file description, so a second lock() fails even in the same process; the
        kernel releases it when the holder exits, however it exits.
        """
        path = self.state_dir / LOCK
        with storage_errors("open", path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with storage_errors("lock", path):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    who = f"another fleetprov (pid {holder})" if holder else "another fleetprov"
                    raise StoreLocked(f"{who} holds {path}; wait for it to finish") from None
            with contextlib.suppress(OSError):  # the pid only helps the next message; a full disk must not stop us
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):  # a stale pid would only mislead the next message
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def current(self) -> Optional[Generation]:
        """The published generation; None if there is none; CorruptState naming the path if it is broken."""
        number = self._current_number()
        if number is None:
            return None
        path = self._generations / generation_name(number)
        if not path.is_dir():
            raise CorruptState(f"{self._current} points to {path}, which does not exist")
        return self._load(number)

    def stage(self) -> Staging:
        with storage_errors("create a staging directory in", self.state_dir):
            staging = Staging(Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.state_dir)), self.modes)
        try:
            with storage_errors("sync", self.state_dir):
                fsync_dir(self.state_dir)
        except StorageError:
            staging.discard()
            raise
        return staging

    def commit(self, staging: Staging, *, publish: bool = True) -> Generation:
        """Publish ``staging`` as generations/<max + 1> and, unless ``publish`` is False, point ``current`` at it
        (with publish=False the caller switches later, e.g. once the new identity has connected).

        The generation's files and directory get this store's modes first, whatever the umask was when they
        were written (the systemd unit sets 0077) or whatever share_with_group said then (a resumed run).

        On failure (StorageError naming the path) ``current`` is left as it was, or put back, and the staging
        directory and any half-published generation are removed. A number past MAX_GENERATION fails before
        anything is renamed.
        """
        try:
            previous = self._current_target()
            manifest = self._check_complete(staging)
            number = self._next_number()
        except StorageError:
            staging.discard()
            raise
        destination = self._generations / generation_name(number)
        try:
            _set_final_modes(staging.path, self.modes)
            with storage_errors(f"rename {staging.path} to", destination):
                staging.path.rename(destination)
            # A rename changes two directories: both are on disk before `current` may name the generation.
            for parent in (self._generations, self.state_dir):
                with storage_errors("sync", parent):
                    fsync_dir(parent)
            if publish:
                replace_symlink(self._current, _link_target(number))
        except StorageError:
            self._undo_commit(previous, number)
            staging.discard()
            raise
        return self._generation(number, manifest)

    def switch_to(self, generation: Generation) -> None:
        """Point ``current`` at an existing, intact generation (rollback); CorruptState if it is not intact."""
        self._load(generation.number)
        replace_symlink(self._current, _link_target(generation.number))

    def generations(self) -> list[int]:
        try:
            names = [entry.name for entry in self._generations.iterdir()]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self._generations}: {exc.strerror}", step="store") from exc
        return sorted(number for number in map(generation_number, names) if number is not None)

    def prune(self, keep: int = 2) -> list[int]:
        """Delete generations, keeping ``current`` and the newest ``keep - 1`` published before it.

        Generations newer than ``current`` (rolled back from, or never published because of a crash) are
        deleted too. Without a ``current`` nothing is deleted. Returns the deleted numbers.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1: the current generation always stays")
        current = self._current_number()
        if current is None:
            return []
        numbers = self.generations()
        older = [number for number in numbers if number < current]
        kept = {current, *older[max(len(older) - (keep - 1), 0) :]}
        doomed = [number for number in numbers if number not in kept]
        for number in doomed:
            with storage_errors("remove", self._generations / str(number)):
                self._remove_generation(number)
        return doomed

    def reopen(self, name: str) -> Optional[Staging]:
        """The staging directory ``name`` of an interrupted run, if it is still there."""
        path = self.state_dir / name
        if not name.startswith(STAGING_PREFIX) or "/" in name or not _is_real_dir(path):
            return None
        return Staging(path, self.modes)

    def load(self, number: int) -> Generation:
        """Generation ``number``, checked like ``current`` is (CorruptState if it is not intact)."""
        return self._load(number)

    def recover(self, keep: Optional[str] = None) -> list[str]:
        """Remove what an interrupted run left behind; returns one note per thing found.

        A leftover that cannot be removed is reported in the notes, not raised: credentials under
        ``current`` stay usable on a read-only state directory.
        """
        try:
            names = sorted(entry.name for entry in self.state_dir.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.state_dir}: {exc.strerror}", step="store") from exc
        notes: list[str] = []
        for name in names:
            path = self.state_dir / name
            if name == keep:
                continue  # the journal names it: the run it belongs to resumes
            if name.startswith(STAGING_PREFIX) and _is_real_dir(path):
                done = f"removed {path}: a generation that was being built when fleetprov stopped"
            elif name.startswith(REMOVING_PREFIX) and _is_real_dir(path):
                done = f"removed {path}: an old generation that was being deleted when fleetprov stopped"
            elif name.startswith(f"{CURRENT}.tmp-") and path.is_symlink():
                done = f"removed {path}: a switch of {CURRENT} that was interrupted"
            elif TEMPORARY_FILE.fullmatch(name) and path.is_file() and not path.is_symlink():
                done = f"removed {path}: a file that was being written when fleetprov stopped"
            else:
                continue
            try:
                if path.is_symlink() or path.is_file():
                    path.unlink()
                else:
                    shutil.rmtree(path)
            except OSError as exc:
                notes.append(f"could not remove {path}: {exc.strerror}")
            else:
                notes.append(done)
        if notes:  # what was removed stays removed, whatever comes next (a connect, a new staging directory)
            try:
                fsync_dir(self.state_dir)
            except OSError as exc:
                notes.append(f"could not sync {self.state_dir}: {exc.strerror}")
        return notes

    def _next_number(self) -> int:
        """The number of the next generation: one more than the highest; StorageError past MAX_GENERATION."""
        number = max(self.generations(), default=0) + 1
        if number > MAX_GENERATION:
            raise StorageError(
                f"cannot commit a new generation: {self._generations / generation_name(number - 1)} has the highest "
                f"number a generation can have; move the generations in {self._generations} to lower numbers",
                step="store",
            )
        return number

    def _current_target(self) -> Optional[str]:
        """What ``current`` points to, as written; None if there is no ``current``."""
        try:
            return str(self._current.readlink())
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise CorruptState(f"{self._current} is not a symlink") from None
            raise StorageError(f"cannot read {self._current}: {exc.strerror}", step="store") from exc

    def _current_number(self) -> Optional[int]:
        target = self._current_target()
        if target is None:
            return None
        prefix = f"{GENERATIONS}/"
        number = generation_number(target[len(prefix) :]) if target.startswith(prefix) else None
        if number is None:
            raise CorruptState(f"{self._current} points to {target!r}, not to {GENERATIONS}/<n>")
        return number

    def _load(self, number: int) -> Generation:
        """Read generations/<number> back; CorruptState naming the first missing or invalid file."""
        if not 1 <= number <= MAX_GENERATION:  # a number from the journal, say: not one a generation can have
            raise CorruptState(f"there is no generation {number} in {self._generations}")
        manifest_path = self._generations / generation_name(number) / MANIFEST
        try:
            data = manifest_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptState(f"{manifest_path} is missing") from None
        except OSError as exc:
            raise StorageError(f"cannot read {manifest_path}: {exc.strerror}", step="store") from exc
        generation = self._generation(number, Manifest.from_json(data, manifest_path))
        for required in (generation.certificate, generation.private_key):
            if required is not None and not required.is_file():
                raise CorruptState(f"{required} is missing")
        return generation

    def _generation(self, number: int, manifest: Manifest) -> Generation:
        path = self._generations / generation_name(number)
        key = path / PRIVATE_KEY if manifest.key_reference == KEY_FILE_REFERENCE else None
        return Generation(number, path, manifest, path / CERTIFICATE, key)

    def _check_complete(self, staging: Staging) -> Manifest:
        # identity.json is not required: it is for other applications, and older generations lack it.
        for name in (CERTIFICATE, MANIFEST):
            if not (staging.path / name).is_file():
                raise StorageError(f"cannot commit {staging.path}: {name} is missing", step="store")
        manifest_path = staging.path / MANIFEST
        with storage_errors("read", manifest_path):
            manifest = Manifest.from_json(manifest_path.read_bytes(), manifest_path)
        key_in_file = manifest.key_reference == KEY_FILE_REFERENCE
        if key_in_file != (staging.path / PRIVATE_KEY).is_file():
            why = f"{PRIVATE_KEY} is missing" if key_in_file else f"it holds {PRIVATE_KEY} for a PKCS#11 key"
            raise StorageError(f"cannot commit {staging.path}: {why}", step="store")
        return manifest

    def _undo_commit(self, previous: Optional[str], number: int) -> None:
        """Best effort after a failed commit: ``current`` back where it was, the new generation gone."""
        published = _link_target(number)
        with contextlib.suppress(OSError, StorageError):
            if self._current_target() == published:
                if previous is None:
                    self._current.unlink()
                else:
                    replace_symlink(self._current, previous)
        # If `current` could not be put back, the new generation is complete and in use: keep it.
        with contextlib.suppress(OSError, StorageError):
            if self._current_target() != published:
                self._remove_generation(number)

    def _remove_generation(self, number: int) -> None:
        """Rename generations/<number> out of the way first, so that no half-deleted generation is ever listed;
        then delete it. Both directories the rename changed are fsync'd before the deletion starts, the state
        directory again after it (a removing-* left by a power cut is finished by recover())."""
        doomed = self.state_dir / f"{REMOVING_PREFIX}{number}-{secrets.token_hex(4)}"
        (self._generations / generation_name(number)).rename(doomed)
        fsync_dir(self._generations)
        fsync_dir(self.state_dir)
        shutil.rmtree(doomed, ignore_errors=True)
        fsync_dir(self.state_dir)


def generation_name(number: int) -> str:
    """The directory name of generation ``number``; ValueError outside 1..MAX_GENERATION."""
    if not 1 <= number <= MAX_GENERATION:
        raise ValueError(f"generation numbers go from 1 to {MAX_GENERATION}, not {number}")
    return str(number)


def generation_number(name: str) -> Optional[int]:
    """The number of a generation directory named ``name``; None for any other name (generation_name's inverse)."""
    return int(name) if _GENERATION_NAME.fullmatch(name) else None


def _link_target(number: int) -> str:
    return f"{GENERATIONS}/{generation_name(number)}"


def _set_final_modes(staging: Path, modes: Modes) -> None:
    """Give a staging directory and its files their published modes, and fsync them (the directory last: its
    entries are on disk too). Through descriptors: the directory is opened with O_NOFOLLOW and its files are
    looked up in it, so a symlink put in the place of either is refused, never followed (atomicio.set_mode)."""
    with storage_errors("open", staging):
        try:
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except NotADirectoryError:  # O_NOFOLLOW|O_DIRECTORY's answer to a symlink
            raise StorageError(f"cannot commit {staging}: it is a symlink or not a directory", step="store") from None
    try:
        with storage_errors("list", staging):
            names = sorted(os.listdir(fd))  # noqa: PTH208 -- the directory opened, not whatever the path names now
        for name in names:
            set_mode(staging / name, modes.of_file(name), parent_fd=fd)
    finally:
        os.close(fd)
    set_mode(staging, modes.directory, directory=True)


def _make_directory(directory: Path, mode: int) -> bool:
    """Create ``directory`` with exactly ``mode``, and missing parents as ``mkdir -p`` would (modes from the
    umask); False if it is there already. Every directory made is on disk (its parent fsync'd) on return."""
    missing = [parent for parent in directory.parents if not parent.is_dir()]
    for parent in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile; a file there makes the mkdir below fail
            parent.mkdir()
        fsync_dir(parent.parent)
    try:
        directory.mkdir(mode=mode)
    except FileExistsError:
        if directory.is_dir():
            return False
        raise
    set_mode(directory, mode, directory=True)  # mkdir's mode went through the umask
    fsync_dir(directory.parent)
    return True


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _read_pid(fd: int) -> Optional[int]:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
    return None


def _json_bytes(document: Mapping[str, object]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
