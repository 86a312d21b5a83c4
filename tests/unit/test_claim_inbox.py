"""fleetprov.claim_inbox: temporary claims installed, read, replaced and discarded with real files and keys."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fleetprov import claim_inbox, dirfd
from fleetprov.claim_inbox import (
    ClaimFileError,
    CorruptClaim,
    ExpiredClaim,
    PendingClaim,
    discard_claim,
    install_claim,
    pending_claim,
)
from fleetprov.errors import EX_CANTCREAT, EX_DATAERR, StorageError

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
MINUTE = dt.timedelta(minutes=1)


def key_pem(key: Any, password: Optional[bytes] = None, fmt: Any = serialization.PrivateFormat.PKCS8) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def certificate_for(
    key: Any, not_before: dt.datetime = NOW - MINUTE, not_after: dt.datetime = NOW + 5 * MINUTE
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "temporary claim")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )


def cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


class Claim:
    """A certificate and its key written to files, as an installer app would leave them."""

    def __init__(self, directory: Path, key: Any = None, **validity: dt.datetime) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.certificate = certificate_for(self.key, **validity)
        self.cert_path, self.key_path = directory / "claim.pem", directory / "claim.key"
        self.cert_path.write_bytes(cert_pem(self.certificate))
        self.key_path.write_bytes(key_pem(self.key))
        self.id = hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    def install(self, inbox: Path, now: dt.datetime = NOW) -> PendingClaim:
        return install_claim(inbox, self.cert_path, self.key_path, now=now)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "state" / "claim-inbox"


def snapshot(directory: Path) -> dict[str, Any]:
    """Every entry under ``directory``: symlink targets, file contents and modes."""
    if not directory.exists():
        return {}
    found: dict[str, Any] = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[str(path)] = ("dir", stat.S_IMODE(info.st_mode))
        else:
            found[str(path)] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# -- installing --------------------------------------------------------------------------------------------


def test_install_publishes_one_complete_claim(tmp_path: Path, inbox: Path) -> None:
    claim = Claim(tmp_path / "from-app")
    installed = claim.install(inbox)

    assert installed.certificate_id == claim.id
    assert (installed.not_before, installed.not_after) == (NOW - MINUTE, NOW + 5 * MINUTE)
    pending = inbox / "pending"
    assert pending.is_symlink() and os.readlink(pending) == installed.entry.name
    assert installed.entry.name.startswith(".claim-") and installed.entry.parent == inbox
    assert sorted(p.name for p in installed.entry.iterdir()) == ["certificate.pem", "private.key"]
    assert x509.load_pem_x509_certificate(installed.certificate.read_bytes()) == claim.certificate
    stored_key = serialization.load_pem_private_key(installed.private_key.read_bytes(), None)
    assert stored_key.private_numbers() == claim.key.private_numbers()  # type: ignore[union-attr]
    assert pending_claim(inbox, now=NOW) == installed
    assert sorted(p.name for p in inbox.iterdir()) == [installed.entry.name, "pending"]


@pytest.mark.parametrize("value", [0o000, 0o022, 0o077, 0o277, 0o777])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, inbox: Path, value: int) -> None:
    claim = Claim(tmp_path / "from-app")
    with umask(value):
        installed = claim.install(inbox)
    assert mode(inbox) == 0o700
    assert mode(installed.entry) == 0o700
    assert mode(installed.certificate) == 0o644
    assert mode(installed.private_key) == 0o600


def test_an_existing_inbox_keeps_its_mode_and_owner(tmp_path: Path, inbox: Path) -> None:
    inbox.mkdir(parents=True, mode=0o750)
    inbox.chmod(0o750)
    Claim(tmp_path / "from-app").install(inbox)
    assert mode(inbox) == 0o750


def test_a_new_claim_replaces_the_pending_one(tmp_path: Path, inbox: Path) -> None:
    first = Claim(tmp_path / "first").install(inbox)
    second_claim = Claim(tmp_path / "second", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    second = second_claim.install(inbox)
    assert second.certificate_id == second_claim.id != first.certificate_id
    assert pending_claim(inbox, now=NOW) == second
    assert not first.entry.exists()
    assert sorted(p.name for p in inbox.iterdir()) == [second.entry.name, "pending"]


def test_leftovers_of_a_crash_are_invisible_and_removed_by_the_next_install(tmp_path: Path, inbox: Path) -> None:
    old = Claim(tmp_path / "old").install(inbox)
    # What a killed install leaves: a half-built directory, a complete one never switched to, a temporary link.
    half = inbox / ".incoming-0123456789abcdef"
    half.mkdir(mode=0o700)
    (half / "certificate.pem").write_bytes(b"-----BEGIN CERT")
    orphan = inbox / ".claim-fedcba9876543210"
    orphan.mkdir(mode=0o700)
    (orphan / "certificate.pem").write_bytes(old.certificate.read_bytes())
    (inbox / "pending.tmp-4242").symlink_to(orphan.name)
    # Symlinks named like entries, or in them: removed, never followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "certificate.pem").write_bytes(b"not the inbox's")
    (inbox / ".claim-0123456789abcdef").symlink_to(elsewhere)
    (half / "private.key").symlink_to(elsewhere / "certificate.pem")
    (orphan / "private.key").symlink_to(elsewhere)

    assert pending_claim(inbox, now=NOW) == old  # the old complete claim, whatever else is there

    new = Claim(tmp_path / "new").install(inbox)
    assert sorted(p.name for p in inbox.iterdir()) == [new.entry.name, "pending"]
    assert snapshot(elsewhere) == {str(elsewhere / "certificate.pem"): ("file", 0o644, b"not the inbox's")}


def test_discard_removes_leftovers_too(tmp_path: Path, inbox: Path) -> None:
    used = Claim(tmp_path / "used").install(inbox)
    (inbox / ".incoming-0123456789abcdef").mkdir()
    (inbox / ".claim-0123456789abcdef").mkdir()
    discard_claim(inbox, used)
    assert list(inbox.iterdir()) == []


def test_a_crash_before_the_first_switch_leaves_no_claim(tmp_path: Path, inbox: Path) -> None:
    inbox.mkdir(parents=True, mode=0o700)
    (inbox / ".incoming-0123456789abcdef").mkdir()
    complete = inbox / ".claim-0123456789abcdef"
    complete.mkdir()
    claim = Claim(tmp_path / "app")
    (complete / "certificate.pem").write_bytes(claim.cert_path.read_bytes())
    (complete / "private.key").write_bytes(claim.key_path.read_bytes())
    assert pending_claim(inbox, now=NOW) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_gives_the_claim_to_the_owner_of_the_inbox(tmp_path: Path, inbox: Path) -> None:
    inbox.mkdir(parents=True, mode=0o700)
    os.chown(inbox, 65534, 65534)
    installed = Claim(tmp_path / "app").install(inbox)
    for path in (installed.entry, installed.certificate, installed.private_key):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_creates_the_inbox_for_the_owner_of_the_state_directory(tmp_path: Path, inbox: Path) -> None:
    inbox.parent.mkdir()
    os.chown(inbox.parent, 65534, 65533)
    installed = Claim(tmp_path / "app").install(inbox)
    for path in (inbox, installed.entry, installed.certificate, installed.private_key):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65533), path


def test_an_inbox_that_is_a_symlink_is_refused_not_followed(tmp_path: Path, inbox: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    inbox.parent.mkdir()
    inbox.symlink_to(elsewhere)
    with pytest.raises(StorageError) as raised:
        Claim(tmp_path / "app").install(inbox)
    assert (
        str(raised.value) == f"store: cannot lock {inbox}: it is a symlink, not followed; the inbox must be a directory"
    )
    assert raised.value.exit_code == EX_CANTCREAT
    assert list(elsewhere.iterdir()) == [] and mode(elsewhere) == 0o755
    assert pending_claim(inbox, now=NOW) is None  # the daemon sees no claim there


def test_symlinks_on_the_way_are_followed_only_where_no_other_user_can_write(tmp_path: Path) -> None:
    """The inbox's path may go through a symlink of root's (or ours) in a directory nobody else can write;
    one in a directory others can write is refused, whatever it points at."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    installed = Claim(tmp_path / "app").install(tmp_path / "link" / "state" / "inbox")
    assert os.readlink(real / "state" / "inbox" / "pending") == installed.entry.name

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone can put a symlink there
    target = tmp_path / "target"
    target.mkdir()
    (shared / "state").symlink_to(target)
    inbox = shared / "state" / "inbox"
    expected = (
        f"cannot create {inbox}: {shared / 'state'} is a symbolic link in a directory that another user can write "
        f"(owner uid {os.geteuid()}, mode 1777): not followed"
    )
    with pytest.raises(StorageError, match=re.escape(expected)):
        Claim(tmp_path / "app").install(inbox)
    assert list(target.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="another user's directory needs root (CI runs as root)")
def test_root_follows_no_symlink_the_service_user_placed(tmp_path: Path) -> None:
    service_home = tmp_path / "service"
    service_home.mkdir(mode=0o755)
    os.chown(service_home, 65534, 65534)
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    (service_home / "state").symlink_to(root_only)
    inbox = service_home / "state" / "inbox"
    refusal = f"{service_home / 'state'} is a symbolic link in a directory that another user can write (owner uid 65534"
    with pytest.raises(StorageError, match=re.escape(refusal)):
        Claim(tmp_path / "app").install(inbox)
    assert list(root_only.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming the service user needs root (CI runs as root)")
def test_the_service_user_reads_and_discards_through_directories_it_may_only_search(tmp_path: Path) -> None:
    """The daemon, as the service user, uses what root installed, on a path through a directory it may search
    but not list (0711, like a home directory)."""
    home = Path(tempfile.mkdtemp(prefix="fleetprov-home-", dir="/tmp"))  # tmp_path is root's alone (0700)
    try:
        home.chmod(0o711)
        inbox = home / "state" / "inbox"
        inbox.parent.mkdir(mode=0o700)
        os.chown(inbox.parent, 65534, 65534)
        installed = Claim(tmp_path / "app").install(inbox)
        pid = os.fork()
        if pid == 0:  # the service user: never back into pytest
            status = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                if pending_claim(inbox, now=NOW) == installed:
                    discard_claim(inbox, installed)
                    status = 0 if pending_claim(inbox, now=NOW) is None and not os.listdir(inbox) else 2
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0
        assert list(inbox.iterdir()) == []
    finally:
        shutil.rmtree(home)


def test_a_certificate_file_with_a_chain_and_text_around_it(tmp_path: Path, inbox: Path) -> None:
    claim = Claim(tmp_path / "app")
    other = certificate_for(ec.generate_private_key(ec.SECP256R1()))
    claim.cert_path.write_bytes(b"subject=CN=claim\n" + cert_pem(claim.certificate) + cert_pem(other))
    installed = claim.install(inbox)
    assert installed.certificate_id == claim.id
    assert installed.certificate.read_bytes() == cert_pem(claim.certificate) + cert_pem(other)


def test_certificate_and_key_in_one_file(tmp_path: Path, inbox: Path) -> None:
    claim = Claim(tmp_path / "app")
    both = tmp_path / "both.pem"
    both.write_bytes(claim.key_path.read_bytes() + claim.cert_path.read_bytes())
    assert install_claim(inbox, both, both, now=NOW).certificate_id == claim.id


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8], ids=["sec1", "pkcs8"]
)
def test_key_formats(tmp_path: Path, inbox: Path, fmt: Any) -> None:
    claim = Claim(tmp_path / "app")
    claim.key_path.write_bytes(key_pem(claim.key, fmt=fmt))
    installed = claim.install(inbox)
    assert installed.private_key.read_bytes() == key_pem(claim.key)  # stored as PKCS#8


# -- refusing ----------------------------------------------------------------------------------------------


def refused(inbox: Path, certificate: Path, key: Path, match: str, now: dt.datetime = NOW) -> str:
    """install_claim must fail with ClaimFileError (exit 65) matching ``match`` and change nothing."""
    before = snapshot(inbox)
    with pytest.raises(ClaimFileError, match=match) as raised:
        install_claim(inbox, certificate, key, now=now)
    assert raised.value.exit_code == EX_DATAERR
    assert snapshot(inbox) == before
    return str(raised.value)


@pytest.fixture(params=["empty inbox", "inbox with a pending claim"])
def any_inbox(request: pytest.FixtureRequest, tmp_path: Path, inbox: Path) -> Path:
    if request.param != "empty inbox":
        Claim(tmp_path / "earlier").install(inbox)
    return inbox


def test_key_of_another_certificate(tmp_path: Path, any_inbox: Path) -> None:
    claim = Claim(tmp_path / "app")
    other_ec = tmp_path / "other-ec.key"
    other_ec.write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    refused(any_inbox, claim.cert_path, other_ec, f"the private key {other_ec} is not the key of the certificate")
    rsa_key = tmp_path / "rsa.key"
    rsa_key.write_bytes(key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    refused(any_inbox, claim.cert_path, rsa_key, "is not the key of the certificate")
    rsa_claim = Claim(tmp_path / "rsa", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    refused(any_inbox, rsa_claim.cert_path, claim.key_path, "is not the key of the certificate")


def test_expired_and_not_yet_valid(tmp_path: Path, any_inbox: Path) -> None:
    expired = Claim(tmp_path / "expired", not_before=NOW - 10 * MINUTE, not_after=NOW - 5 * MINUTE)
    message = refused(any_inbox, expired.cert_path, expired.key_path, "expired at")
    assert f"expired at {(NOW - 5 * MINUTE):%Y-%m-%dT%H:%M:%SZ}" in message
    # not_after == now is expired already
    refused(any_inbox, expired.cert_path, expired.key_path, "expired at", now=NOW - 5 * MINUTE)
    early = Claim(tmp_path / "early", not_before=NOW + MINUTE, not_after=NOW + 6 * MINUTE)
    message = refused(any_inbox, early.cert_path, early.key_path, "is not valid before")
    assert f"not valid before {(NOW + MINUTE):%Y-%m-%dT%H:%M:%SZ}" in message


def test_unusable_files(tmp_path: Path, any_inbox: Path) -> None:
    claim = Claim(tmp_path / "app")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(300))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    broken_cert = tmp_path / "broken.pem"
    broken_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    broken_key = tmp_path / "broken.key"
    label = " ".join(("PRIVATE", "KEY"))  # a damaged PEM block, built here: no key-like text in the repository
    broken_key.write_bytes(f"-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n".encode())
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (2 << 20))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    missing = tmp_path / "missing"
    cert, key = claim.cert_path, claim.key_path
    for certificate, private_key, match in [
        (missing, key, f"cannot read the certificate {missing}: No such file or directory"),
        (cert, missing, f"cannot read the private key {missing}: No such file or directory"),
        (tmp_path, key, f"the certificate {tmp_path} is not a regular file"),
        (fifo, key, "is not a regular file"),
        (huge, key, "is larger than 1048576 bytes"),
        (garbage, key, f"the certificate {garbage} is not a PEM certificate$"),
        (empty, key, "is not a PEM certificate$"),
        (key, key, r"is not a PEM certificate \(it holds: PRIVATE KEY\)"),
        (broken_cert, key, "holds a CERTIFICATE block that cannot be read"),
        (cert, garbage, f"the private key {garbage} is not a PEM private key$"),
        (cert, cert, r"is not a PEM private key \(it holds: CERTIFICATE\)"),
        (cert, broken_key, "cannot be read as a private key"),
    ]:
        refused(any_inbox, certificate, private_key, match)


def test_encrypted_keys(tmp_path: Path, any_inbox: Path) -> None:
    claim = Claim(tmp_path / "app")
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        claim.key_path.write_bytes(key_pem(claim.key, b"secret", fmt))
        refused(any_inbox, claim.cert_path, claim.key_path, "is encrypted; give it unencrypted")


def test_keys_other_than_ec_and_rsa(tmp_path: Path, any_inbox: Path) -> None:
    claim = Claim(tmp_path / "app", key=ed25519.Ed25519PrivateKey.generate())
    refused(any_inbox, claim.cert_path, claim.key_path, "is neither an EC nor an RSA key")


def test_two_keys_in_the_key_file(tmp_path: Path, any_inbox: Path) -> None:
    claim = Claim(tmp_path / "app")
    claim.key_path.write_bytes(key_pem(claim.key) + key_pem(ec.generate_private_key(ec.SECP256R1())))
    refused(any_inbox, claim.cert_path, claim.key_path, "holds 2 private keys")


def test_messages_never_show_the_key(tmp_path: Path, inbox: Path) -> None:
    claim, other = Claim(tmp_path / "app"), Claim(tmp_path / "other")
    body = key_pem(claim.key).splitlines()[1].decode()
    for certificate in (claim.key_path, other.cert_path):  # a key where the certificate goes; another's certificate
        with pytest.raises(ClaimFileError) as raised:
            install_claim(inbox, certificate, claim.key_path, now=NOW)
        assert body[:16] not in str(raised.value)


def test_a_failed_write_changes_nothing(tmp_path: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Claim(tmp_path / "earlier").install(inbox)
    before = snapshot(inbox)
    real_create_file = dirfd.create_file

    def full_disk(directory_fd: int, name: str, data: bytes, mode: int, owner: Optional[tuple[int, int]]) -> None:
        if name == "private.key":
            real_create_file(directory_fd, name, data[:10], mode, owner)  # half written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_create_file(directory_fd, name, data, mode, owner)

    monkeypatch.setattr(claim_inbox, "create_file", full_disk)
    with pytest.raises(
        StorageError, match=r"cannot write .*/\.incoming-[0-9a-f]{16}/private.key: No space left on device"
    ):
        Claim(tmp_path / "app").install(inbox)
    assert snapshot(inbox) == before


def test_a_failed_switch_changes_nothing(tmp_path: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Claim(tmp_path / "earlier").install(inbox)
    before = snapshot(inbox)

    real_rename = os.rename

    def read_only(source: str, destination: str, **dir_fds: int) -> None:
        if destination == "pending":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_rename(source, destination, **dir_fds)

    monkeypatch.setattr(os, "rename", read_only)  # as claim_inbox calls it
    with pytest.raises(StorageError, match=f"cannot switch {inbox / 'pending'}: Read-only file system"):
        Claim(tmp_path / "app").install(inbox)
    assert snapshot(inbox) == before


def test_an_inbox_that_cannot_be_made(tmp_path: Path) -> None:
    claim = Claim(tmp_path / "app")
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(StorageError, match=f"cannot create {blocker / 'claim-inbox'}") as raised:
        install_claim(blocker / "claim-inbox", claim.cert_path, claim.key_path, now=NOW)
    assert raised.value.exit_code == EX_CANTCREAT
    assert blocker.read_text() == "a file where the state directory should be"


# -- reading and discarding --------------------------------------------------------------------------------


def test_no_inbox_or_no_claim(inbox: Path) -> None:
    assert pending_claim(inbox, now=NOW) is None
    inbox.mkdir(parents=True)
    assert pending_claim(inbox, now=NOW) is None


def test_an_expired_pending_claim_is_removed_and_reported(tmp_path: Path, inbox: Path) -> None:
    installed = Claim(tmp_path / "app").install(inbox)
    assert pending_claim(inbox, now=NOW + 5 * MINUTE - dt.timedelta(seconds=1)) == installed
    with pytest.raises(ExpiredClaim) as raised:
        pending_claim(inbox, now=NOW + 5 * MINUTE)
    assert str(raised.value) == (
        f"claim: the temporary claim installed at {inbox / 'pending'} expired at "
        f"{(NOW + 5 * MINUTE):%Y-%m-%dT%H:%M:%SZ} (temporary claims are valid 5 minutes): install a new one with "
        "fleetprov claim install"
    )
    assert raised.value.transient
    assert list(inbox.iterdir()) == []
    assert pending_claim(inbox, now=NOW) is None
    discard_claim(inbox, installed)  # after expiry, as after success: nothing left to do


def test_discard_removes_the_claim(tmp_path: Path, inbox: Path) -> None:
    installed = Claim(tmp_path / "app").install(inbox)
    discard_claim(inbox, installed)
    assert list(inbox.iterdir()) == []
    assert pending_claim(inbox, now=NOW) is None
    discard_claim(inbox, installed)  # twice is fine


def test_discard_keeps_a_newer_claim(tmp_path: Path, inbox: Path) -> None:
    used = Claim(tmp_path / "used").install(inbox)
    newer = Claim(tmp_path / "newer").install(inbox)
    discard_claim(inbox, used)
    assert pending_claim(inbox, now=NOW) == newer


def test_corrupt_entries_are_named(tmp_path: Path, inbox: Path) -> None:
    installed = Claim(tmp_path / "app").install(inbox)
    pending = inbox / "pending"

    installed.private_key.unlink()
    with pytest.raises(CorruptClaim, match=f"{installed.private_key} is not a file"):
        pending_claim(inbox, now=NOW)

    good_copy = tmp_path / "copy.pem"
    good_copy.write_bytes(installed.certificate.read_bytes())
    installed.certificate.unlink()
    installed.certificate.symlink_to(good_copy)  # the claim's files are the inbox's own, never followed elsewhere
    with pytest.raises(CorruptClaim, match=f"{installed.certificate}: Too many levels of symbolic links"):
        pending_claim(inbox, now=NOW)

    installed.certificate.unlink()
    installed.certificate.write_bytes(b"not a certificate")
    with pytest.raises(CorruptClaim, match=f"{installed.certificate}: not a PEM certificate"):
        pending_claim(inbox, now=NOW)

    installed.certificate.unlink()
    with pytest.raises(CorruptClaim, match=f"{installed.certificate}: No such file or directory"):
        pending_claim(inbox, now=NOW)

    pending.unlink()
    pending.symlink_to("/etc")
    with pytest.raises(CorruptClaim, match=f"{pending} points at '/etc', not at a claim in {inbox}"):
        pending_claim(inbox, now=NOW)

    pending.unlink()
    pending.mkdir()
    with pytest.raises(CorruptClaim, match=f"{pending} is not a symlink to a claim") as raised:
        pending_claim(inbox, now=NOW)
    assert raised.value.exit_code == EX_CANTCREAT
