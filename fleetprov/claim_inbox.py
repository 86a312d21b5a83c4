"""The claim inbox: where a trusted user's installer leaves a temporary claim (fleet provisioning by trusted
user, AWS CreateProvisioningClaim) for fleetprov to provision with. One claim at most is pending.

    <inbox>/                     0700, the daemon user's (``claim.inbox``)
      pending -> .claim-<random> the one pending claim: a symlink, switched atomically
      .claim-<random>/           0700, complete before ``pending`` points at it, never changed afterwards
        certificate.pem          0644
        private.key              0600 from its first byte (O_CREAT|O_EXCL), fsync'd
      .incoming-<random>/        being built; a crash leaves it behind, the next install or discard removes it

Why a symlink: a directory cannot be renamed over a non-empty one (os.replace fails with ENOTEMPTY), so
replacing a pending claim by renaming directories would leave an instant with no claim, or with two. A fresh
symlink renamed over ``pending`` (atomicio.replace_symlink, like the store's ``current``) switches from the old
complete claim to the new complete one in one step. Whatever moment a crash hits, ``pending`` is absent, the
old claim or the new one; directories it does not point at are leftovers that the next install or discard
removes.

Use a claim through PendingClaim's paths (inside its ``.claim-<random>`` directory), not through ``pending/``:
an install between reading the certificate and the key would otherwise pair one claim's certificate with the
next claim's key. Replacing or discarding a claim removes its files; a connection already made with them is
unaffected (the TLS library read them when it connected).

Installing, discarding and reading hold a flock on the inbox directory itself (no lock file that root would
own and the daemon could not open), so an install cannot switch ``pending`` between a discard's check and its
removal. Run as root with an inbox that belongs to another user (the daemon's), everything installed is
chowned to that user. Key material is never logged, printed or put into an error message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetprov.atomicio import fsync_dir, fsync_file, replace_symlink, storage_errors, write_new
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
    owner = _ensure_inbox(inbox)
    with _locked(inbox, fcntl.LOCK_EX):
        name = CLAIM_PREFIX + secrets.token_hex(8)
        incoming = inbox / (INCOMING_PREFIX + secrets.token_hex(8))
        try:
            with storage_errors("create", incoming):
                incoming.mkdir(mode=0o700)
                _settle(incoming, 0o700, owner)
            _write(incoming / CERTIFICATE_FILE, certificate_pem, 0o644, owner)
            _write(incoming / KEY_FILE, key_pem, 0o600, owner)
            with storage_errors("publish", inbox / name):
                fsync_dir(incoming)
                incoming.rename(inbox / name)
                fsync_dir(inbox)
        except BaseException:
            _remove_tree(incoming)
            _remove_tree(inbox / name)
            raise
        try:
            replace_symlink(inbox / PENDING, name)
        except BaseException:
            _remove_tree(inbox / name)
            raise
        _remove_leftovers(inbox, keep=name)
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
    if not inbox.is_dir():
        return None
    with _locked(inbox, fcntl.LOCK_SH):
        claim = _read_pending(inbox)
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
    if not inbox.is_dir():
        return
    with _locked(inbox, fcntl.LOCK_EX):
        try:
            target: Optional[str] = str((inbox / PENDING).readlink())
        except OSError:
            target = None
        if target == claim.entry.name:
            with storage_errors("remove", inbox / PENDING):
                (inbox / PENDING).unlink()
                fsync_dir(inbox)
            target = None
        _remove_leftovers(inbox, keep=target)


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
        data = b""
        while len(data) <= MAX_PEM_BYTES:
            chunk = os.read(fd, MAX_PEM_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ClaimFileError(f"cannot read the {what} {path}: {exc.strerror or exc}", step=STEP) from None
    finally:
        os.close(fd)
    if len(data) > MAX_PEM_BYTES:
        raise ClaimFileError(f"the {what} {path} is larger than {MAX_PEM_BYTES} bytes: not a PEM {what}", step=STEP)
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


def _read_pending(inbox: Path) -> Optional[PendingClaim]:
    link = inbox / PENDING
    try:
        target = str(link.readlink())
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
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM certificate"
        raise CorruptClaim(f"{unusable}: {certificate_path}: {why}", step=STEP) from None
    try:
        key_is_file = stat.S_ISREG(key_path.lstat().st_mode)
    except OSError:
        key_is_file = False
    if not key_is_file:
        raise CorruptClaim(f"{unusable}: {key_path} is not a file", step=STEP)
    return PendingClaim(
        certificate_path,
        key_path,
        _certificate_id(certificate.public_bytes(serialization.Encoding.DER)),
        certificate.not_valid_before_utc,
        certificate.not_valid_after_utc,
    )


def _ensure_inbox(inbox: Path) -> Optional[tuple[int, int]]:
    """Create ``inbox`` (0700) if missing; the (uid, gid) to chown new files to, or None to leave them ours.

    A new inbox belongs to the owner of its parent (the daemon's state directory) when root creates it."""
    with storage_errors("create", inbox):
        if not inbox.is_dir():
            for directory in reversed([inbox, *inbox.parents]):
                if directory.is_dir():
                    continue
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o700)
                    _settle(directory, 0o700, _foreign_owner(directory.parent))
                fsync_dir(directory.parent)
        return _foreign_owner(inbox)


def _foreign_owner(directory: Path) -> Optional[tuple[int, int]]:
    """(uid, gid) of ``directory`` when we are root and it belongs to another user, else None."""
    if os.geteuid() != 0:
        return None
    info = directory.stat()
    return (info.st_uid, info.st_gid) if info.st_uid != 0 else None


def _settle(path: Path, mode: int, owner: Optional[tuple[int, int]]) -> None:
    """Give ``path`` exactly ``mode`` whatever the umask, and ``owner``; fsync the change."""
    path.chmod(mode)  # a file or directory just made, never a symlink
    if owner is not None:
        os.chown(path, *owner)
    if path.is_dir():
        fsync_dir(path)
    else:
        fsync_file(path)


def _write(path: Path, data: bytes, mode: int, owner: Optional[tuple[int, int]]) -> None:
    """A new file (O_CREAT|O_EXCL, ``mode`` from its first byte, fsync'd) with exactly ``mode`` and ``owner``."""
    write_new(path, data, mode=mode)
    with storage_errors("write", path):
        _settle(path, mode, owner)


@contextlib.contextmanager
def _locked(inbox: Path, operation: int) -> Iterator[None]:
    with storage_errors("lock", inbox):
        fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with storage_errors("lock", inbox):
            fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(inbox: Path, keep: Optional[str]) -> None:
    """Remove what crashes and replaced claims leave: every entry but ``keep``, and stray temporary symlinks."""
    for path in inbox.iterdir():
        name = path.name
        if name.startswith((CLAIM_PREFIX, INCOMING_PREFIX)) and name != keep:
            _remove_tree(path)
        elif name.startswith(f"{PENDING}.tmp-") and path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()


def _remove_tree(path: Path) -> None:
    """Best effort: a leftover that cannot be removed now is removed by the next install."""
    if path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _certificate_id(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()
