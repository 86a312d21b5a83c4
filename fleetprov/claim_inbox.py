"""The claim inbox: where a trusted user's installer leaves a temporary claim (fleet provisioning by trusted
user, AWS CreateProvisioningClaim) for fleetprov to provision with. One claim at most is pending.

    <inbox>/                     0700, the daemon user's (``claim.inbox``); never a symlink
      pending -> .claim-<random> the one pending claim: a symlink, switched atomically
      .claim-<random>/           0700, complete before ``pending`` points at it, never changed afterwards
        certificate.pem          0644
        private.key              0600 from its first byte (O_CREAT|O_EXCL)
      .incoming-<random>/        being built, the installer's own (0700) until complete; a crash leaves it
                                 behind, the next install (or discard, if it may) removes it

Why a symlink: a directory cannot be renamed over a non-empty one (os.replace fails with ENOTEMPTY), so
replacing a pending claim by renaming directories would leave an instant with no claim, or with two. A fresh
symlink renamed over ``pending`` (like the store's ``current``) switches from the old complete claim to the
new complete one in one step. Whatever moment a crash or a power cut hits, ``pending`` is absent, the old
claim or the new one; directories it does not point at are leftovers that the next install or discard removes.
Durability, in order: each file's contents and mode fsync'd, then the ``.incoming`` directory, before it is
renamed to ``.claim``; the inbox fsync'd after that rename, after the switch of ``pending`` and after removals.

Use a claim through PendingClaim's paths (inside its ``.claim-<random>`` directory), not through ``pending/``:
an install between reading the certificate and the key would otherwise pair one claim's certificate with the
next claim's key. Replacing or discarding a claim removes its files; a connection already made with them is
unaffected (the TLS library read them when it connected).

Installing, discarding and reading hold a flock on the inbox directory itself (no lock file that root would
own and the daemon could not open), so an install cannot switch ``pending`` between a discard's check and its
removal. Key material is never logged, printed or put into an error message.

Root installing into another user's inbox (as `fleetprov claim install` runs): that user can change the inbox
while root writes in it, so root never acts on a name there that could have been swapped for a symlink or a
hard link (to /etc/shadow) since it was made. Everything is done on descriptors (fleetprov.dirfd): the inbox
is opened with O_NOFOLLOW below a parent reached without following a symlink another user could have placed
(a symlink in place of the inbox is refused); entries are made new (mkdir, O_CREAT|O_EXCL|O_NOFOLLOW), given
their mode and owner with fchmod and fchown, renamed, linked and removed relative to the inbox's descriptor.
Root keeps the ``.incoming`` directory to itself until the claim in it is complete, then gives it and
everything in it to the owner of the inbox. Descriptors rather than dropping to the inbox owner's uid: which
uid to drop to would be read from a path that owner controls (a symlink in place of the inbox, pointing at a
directory of root's, would keep root root), and the missing inbox must be made by root anyway; refusing
another user's symlinks on the way covers both, in one process whose errors need no relaying.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetprov.atomicio import storage_errors
from fleetprov.dirfd import (
    DIRECTORY_FLAGS,
    Owner,
    create_file,
    foreign_owner,
    make_directory,
    open_directory,
    remove_entry,
    settle,
)
from fleetprov.errors import EX_DATAERR, FleetprovError, StorageError
from fleetprov.store import iso_utc

log = logging.getLogger(__name__)

PENDING = "pending"  # the symlink to the pending claim (config.py reads the claim through it)
CERTIFICATE_FILE = "certificate.pem"
KEY_FILE = "private.key"
CLAIM_PREFIX = ".claim-"
INCOMING_PREFIX = ".incoming-"
TEMPORARY_CLAIM_LIFETIME = "5 minutes"  # AWS CreateProvisioningClaim; only for messages
MAX_PEM_BYTES = 1 << 20  # a certificate or key file larger than this is not one
STEP = "claim"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class ClaimFileError(FleetprovError):
    """A certificate or key file given to `fleetprov claim install` that cannot be a temporary claim."""

    exit_code = EX_DATAERR


class ExpiredClaim(FleetprovError):
    """The pending temporary claim has expired (and was removed): a trusted user must install a new one.

    Transient: provisioning can go on as soon as a new claim arrives."""

    transient = True


class CorruptClaim(StorageError):
    """An inbox entry fleetprov cannot use: the message names the path."""


@dataclass(frozen=True)
class PendingClaim:
    certificate: Path  # <inbox>/.claim-<random>/certificate.pem: stays the same file while it is in use
    private_key: Path  # <inbox>/.claim-<random>/private.key
    certificate_id: str  # AWS IoT's: SHA-256 of the DER, lowercase hex
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def entry(self) -> Path:
        """The claim's directory in the inbox."""
        return self.certificate.parent


def install_claim(inbox: Path, certificate: Path, key: Path, *, now: dt.datetime) -> PendingClaim:
    """Check ``certificate`` and ``key`` and make them the pending claim of ``inbox``, replacing any other.

    ClaimFileError (exit 65) for files that cannot be a claim valid at ``now``; StorageError (exit 73) if the
    inbox cannot be written. Either way the inbox is unchanged.
    """
    certificate_pem, certificate_der, parsed = _read_certificate(certificate)
    key_pem = _read_key(key, parsed)
    not_before, not_after = parsed.not_valid_before_utc, parsed.not_valid_after_utc
    if not_after <= now:
        raise ClaimFileError(f"the certificate {certificate} expired at {iso_utc(not_after)}", step=STEP)
    if not_before > now:
        raise ClaimFileError(
            f"the certificate {certificate} is not valid before {iso_utc(not_before)} (it is {iso_utc(now)} here: is "
            "this device's clock right?)",
            step=STEP,
        )
    with _owner_only_umask(), _locked(_inbox_made_if_missing(inbox), inbox, fcntl.LOCK_EX) as inbox_fd:
        name = CLAIM_PREFIX + secrets.token_hex(8)
        files = ((CERTIFICATE_FILE, certificate_pem, 0o644), (KEY_FILE, key_pem, 0o600))
        _build(inbox_fd, inbox, name, foreign_owner(inbox_fd), files)
        try:
            _switch_pending(inbox_fd, inbox, name)
        except BaseException:
            _remove_quietly(inbox_fd, name)
            raise
        _remove_leftovers(inbox_fd, keep=name)
    claim = PendingClaim(
        inbox / name / CERTIFICATE_FILE,
        inbox / name / KEY_FILE,
        _certificate_id(certificate_der),
        not_before,
        not_after,
    )
    log.info(
        "temporary claim %s installed in %s (valid until %s)", claim.certificate_id[:12], inbox, iso_utc(not_after)
    )
    return claim


def pending_claim(inbox: Path, *, now: dt.datetime) -> Optional[PendingClaim]:
    """The pending claim of ``inbox``, or None if there is none.

    An expired claim is removed, then ExpiredClaim is raised. CorruptClaim names an entry that cannot be used.
    """
    inbox_fd = _existing_inbox(inbox)
    if inbox_fd is None:
        return None
    with _locked(inbox_fd, inbox, fcntl.LOCK_SH):
        claim = _read_pending(inbox_fd, inbox)
    if claim is None or claim.not_after > now:
        return claim
    discard_claim(inbox, claim)
    raise ExpiredClaim(
        f"the temporary claim installed at {inbox / PENDING} expired at {iso_utc(claim.not_after)} (temporary claims "
        f"are valid {TEMPORARY_CLAIM_LIFETIME}): install a new one with fleetprov claim install",
        step=STEP,
    )


def discard_claim(inbox: Path, claim: PendingClaim) -> None:
    """Remove ``claim`` from ``inbox``: after it was used, refused or expired. A newer pending claim stays;
    leftovers of crashes and replaced claims go too, so no old claim key outlives its use."""
    inbox_fd = _existing_inbox(inbox)
    if inbox_fd is None:
        return
    with _locked(inbox_fd, inbox, fcntl.LOCK_EX):
        try:
            target: Optional[str] = os.readlink(PENDING, dir_fd=inbox_fd)
        except OSError:
            target = None
        if target == claim.entry.name:
            with storage_errors("remove", inbox / PENDING):
                os.unlink(PENDING, dir_fd=inbox_fd)
                os.fsync(inbox_fd)
            target = None
        _remove_leftovers(inbox_fd, keep=target)


# -- reading what an installer gives --------------------------------------------------------------------


def _read_input(path: Path, what: str) -> bytes:
    try:
        # O_NONBLOCK: a FIFO must not hang the command; a regular file ignores the flag.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ClaimFileError(f"cannot read the {what} {path}: {exc.strerror or exc}", step=STEP) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ClaimFileError(f"the {what} {path} is not a regular file", step=STEP)
        data = _read_capped(fd)
    except OSError as exc:
        raise ClaimFileError(f"cannot read the {what} {path}: {exc.strerror or exc}", step=STEP) from None
    finally:
        os.close(fd)
    if len(data) > MAX_PEM_BYTES:
        raise ClaimFileError(f"the {what} {path} is larger than {MAX_PEM_BYTES} bytes: not a PEM {what}", step=STEP)
    return data


def _read_capped(fd: int) -> bytes:
    """What ``fd`` holds, but no more than MAX_PEM_BYTES + 1 bytes (enough to tell a file that is too large)."""
    data = b""
    while len(data) <= MAX_PEM_BYTES:
        chunk = os.read(fd, MAX_PEM_BYTES + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _blocks(data: bytes) -> list[tuple[str, bytes]]:
    return [(match.group(1).decode(), match.group(0)) for match in _PEM_BLOCK.finditer(data)]


def _read_certificate(path: Path) -> tuple[bytes, bytes, x509.Certificate]:
    """(PEM to store, DER of the first certificate, the first certificate) of a PEM certificate file."""
    blocks = _blocks(_read_input(path, "certificate"))
    pems = [pem for label, pem in blocks if label == "CERTIFICATE"]
    if not pems:
        held = f" (it holds: {', '.join(sorted({label for label, _ in blocks}))})" if blocks else ""
        raise ClaimFileError(f"the certificate {path} is not a PEM certificate{held}", step=STEP)
    try:
        certificates = [x509.load_pem_x509_certificate(pem) for pem in pems]
    except ValueError:
        raise ClaimFileError(
            f"the certificate {path} holds a CERTIFICATE block that cannot be read", step=STEP
        ) from None
    # Stored re-encoded: the certificates only, whatever text was around them.
    stored = b"".join(certificate.public_bytes(serialization.Encoding.PEM) for certificate in certificates)
    return stored, certificates[0].public_bytes(serialization.Encoding.DER), certificates[0]


def _read_key(path: Path, certificate: x509.Certificate) -> bytes:
    """The key of ``path`` as unencrypted PKCS#8 PEM, if it is the certificate's key. No message shows key bytes."""
    blocks = _blocks(_read_input(path, "private key"))
    keys = [(label, pem) for label, pem in blocks if label.endswith("PRIVATE KEY")]
    if not keys:
        held = f" (it holds: {', '.join(sorted({label for label, _ in blocks}))})" if blocks else ""
        raise ClaimFileError(f"the private key {path} is not a PEM private key{held}", step=STEP)
    if len(keys) > 1:
        raise ClaimFileError(f"the private key {path} holds {len(keys)} private keys; give one", step=STEP)
    label, pem = keys[0]
    encrypted = ClaimFileError(f"the private key {path} is encrypted; give it unencrypted", step=STEP)
    if label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in pem:
        raise encrypted
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's way of saying a password is needed
        raise encrypted from None
    except (ValueError, UnsupportedAlgorithm):
        raise ClaimFileError(f"the private key {path} cannot be read as a private key", step=STEP) from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ClaimFileError(f"the private key {path} is neither an EC nor an RSA key", step=STEP)
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        raise ClaimFileError(f"the private key {path} is not the key of the certificate", step=STEP)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        return b""  # a certificate for another kind of key: no EC or RSA key matches it
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- the inbox on disk ----------------------------------------------------------------------------------


def _read_pending(inbox_fd: int, inbox: Path) -> Optional[PendingClaim]:
    link = inbox / PENDING
    try:
        target = os.readlink(PENDING, dir_fd=inbox_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # EINVAL: something else than a symlink
        raise CorruptClaim(f"{link} is not a symlink to a claim ({exc.strerror or exc})", step=STEP) from None
    entry = inbox / target
    if "/" in target or not target.startswith(CLAIM_PREFIX):
        raise CorruptClaim(f"{link} points at {target!r}, not at a claim in {inbox}", step=STEP)
    certificate_path, key_path = entry / CERTIFICATE_FILE, entry / KEY_FILE
    unusable = f"the pending claim {entry} cannot be used"
    try:
        entry_fd = os.open(target, DIRECTORY_FLAGS, dir_fd=inbox_fd)
    except OSError as exc:
        raise CorruptClaim(f"{unusable}: {entry}: {exc.strerror or exc}", step=STEP) from None
    try:
        try:
            certificate = x509.load_pem_x509_certificate(_read_entry_file(entry_fd, CERTIFICATE_FILE))
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM certificate"
            raise CorruptClaim(f"{unusable}: {certificate_path}: {why}", step=STEP) from None
        try:
            key_is_file = stat.S_ISREG(os.stat(KEY_FILE, dir_fd=entry_fd, follow_symlinks=False).st_mode)
        except OSError:
            key_is_file = False
    finally:
        os.close(entry_fd)
    if not key_is_file:
        raise CorruptClaim(f"{unusable}: {key_path} is not a file", step=STEP)
    return PendingClaim(
        certificate_path,
        key_path,
        _certificate_id(certificate.public_bytes(serialization.Encoding.DER)),
        certificate.not_valid_before_utc,
        certificate.not_valid_after_utc,
    )


def _read_entry_file(entry_fd: int, name: str) -> bytes:
    """``name`` in the claim's directory, read never through a symlink and never waiting on a FIFO."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry_fd)
    try:
        return _read_capped(fd)
    finally:
        os.close(fd)


def _inbox_made_if_missing(inbox: Path) -> int:
    """A descriptor of ``inbox``, made if missing (0700, for the owner of its parent, as are missing parents).

    A symlink in its place is refused, never followed: in the daemon's state directory the daemon's user could
    have put it there, pointing anywhere."""
    with storage_errors("create", inbox):
        parent_fd = open_directory(inbox.parent, create=True)
    try:
        with storage_errors("lock", inbox):
            try:
                return os.open(inbox.name, DIRECTORY_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                pass
            except NotADirectoryError:  # O_NOFOLLOW|O_DIRECTORY: a symlink or a file
                if stat.S_ISLNK(os.stat(inbox.name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "it is a symlink, not followed; the inbox must be a directory") from None
                raise
        with storage_errors("create", inbox):
            return make_directory(parent_fd, inbox.name, 0o700, foreign_owner(parent_fd))
    finally:
        os.close(parent_fd)


def _existing_inbox(inbox: Path) -> Optional[int]:
    """A descriptor of ``inbox``; None if there is no inbox directory there (nothing, a file or a symlink)."""
    try:
        with storage_errors("read", inbox):
            parent_fd = open_directory(inbox.parent)
            try:
                return os.open(inbox.name, DIRECTORY_FLAGS, dir_fd=parent_fd)
            finally:
                os.close(parent_fd)
    except StorageError as exc:
        if isinstance(exc.__cause__, (FileNotFoundError, NotADirectoryError)):
            return None
        raise


@contextlib.contextmanager
def _locked(inbox_fd: int, inbox: Path, operation: int) -> Iterator[int]:
    """``inbox_fd`` flock'ed; closed (and so unlocked) afterwards."""
    try:
        with storage_errors("lock", inbox):
            fcntl.flock(inbox_fd, operation)
        yield inbox_fd
    finally:
        os.close(inbox_fd)


@contextlib.contextmanager
def _owner_only_umask() -> Iterator[None]:
    """New entries start owner-only (their final modes are set on their descriptors), so nothing is more open
    than meant at any moment, and a non-root installer can open the directories it makes whatever its umask."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _build(inbox_fd: int, inbox: Path, name: str, owner: Owner, files: tuple[tuple[str, bytes, int], ...]) -> None:
    """The complete claim (``files``: name, content, mode) as ``<inbox>/<name>``, durable, built as
    ``.incoming-<random>``; nothing left of it on failure.

    Root's own (0700) while being filled, so the inbox's owner cannot put anything in it or in place of its
    files; given to ``owner`` (on descriptors) once complete, then renamed into place."""
    incoming = INCOMING_PREFIX + secrets.token_hex(8)
    try:
        with storage_errors("create", inbox / incoming):
            incoming_fd = make_directory(inbox_fd, incoming, 0o700, None)
        try:
            for file_name, data, mode in files:
                with storage_errors("write", inbox / incoming / file_name):
                    create_file(incoming_fd, file_name, data, mode, owner)
            with storage_errors("publish", inbox / name):
                settle(incoming_fd, 0o700, owner)
                os.rename(incoming, name, src_dir_fd=inbox_fd, dst_dir_fd=inbox_fd)
                os.fsync(inbox_fd)
        finally:
            os.close(incoming_fd)
    except BaseException:
        _remove_quietly(inbox_fd, incoming)
        _remove_quietly(inbox_fd, name)
        raise


def _switch_pending(inbox_fd: int, inbox: Path, name: str) -> None:
    """Point ``pending`` at ``name`` atomically: a fresh ``pending.tmp-<pid>`` symlink renamed over it, fsync'd."""
    temporary = f"{PENDING}.tmp-{os.getpid()}"
    with storage_errors("switch", inbox / PENDING):
        try:
            with contextlib.suppress(FileNotFoundError):  # left by a crashed process that had our pid
                os.unlink(temporary, dir_fd=inbox_fd)
            os.symlink(name, temporary, dir_fd=inbox_fd)
            os.rename(temporary, PENDING, src_dir_fd=inbox_fd, dst_dir_fd=inbox_fd)
            os.fsync(inbox_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=inbox_fd)
            raise


def _remove_leftovers(inbox_fd: int, keep: Optional[str]) -> None:
    """Remove what crashes and replaced claims leave: every entry but ``keep``, and stray temporary symlinks.

    Best effort, like the removals themselves: the claim is installed or discarded already, and what is left
    now goes with the next install or discard."""
    with contextlib.suppress(OSError):
        with os.scandir(inbox_fd) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            if name.startswith((CLAIM_PREFIX, INCOMING_PREFIX, f"{PENDING}.tmp-")) and name != keep:
                _remove_quietly(inbox_fd, name)
        os.fsync(inbox_fd)


def _remove_quietly(inbox_fd: int, name: str) -> None:
    """Best effort: a leftover that cannot be removed now (a root install's ``.incoming`` when the daemon
    discards) is removed by the next install."""
    with contextlib.suppress(OSError):
        remove_entry(inbox_fd, name)


def _certificate_id(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()
