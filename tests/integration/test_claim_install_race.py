"""`fleetprov claim install` run as root (as the README says) against the service user racing it: a real
process with the service user's uid (65534 here) owns the state directory and the inbox, and swaps what root
makes there -- the inbox itself, the ``.incoming-``/``.claim-`` directories, the files in them -- for symlinks
to a root-only file (standing in for /etc/shadow), as fast as it can. Root must never change that file's owner,
mode or contents; each install either succeeds or refuses cleanly (exit 73, one line naming the inbox)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.integration.test_claim_cli import write_claim
from tests.support import fleetprov

SERVICE_USER = 65534  # nobody: stands in for the fleetprov service user
ITERATIONS = 42  # installs raced, 14 per target
TARGETS = ("inbox", "entries", "files")
VICTIM_CONTENT = b"root:$y$j9T$not-a-real-hash:19000:0:99999:7:::\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the race needs root (CI runs as root): root installs, "
                                "another uid attacks")  # fmt: skip


def _attack(target: str, inbox: Path, victim: Path, report_fd: int) -> None:
    """The service user's side, forever: swap ``target`` things in the inbox for symlinks to ``victim`` (one
    byte written to ``report_fd`` per swap). ``inbox``: the inbox as soon as root makes it; ``entries``: the
    ``.incoming-``/``.claim-`` directories; ``files``: the certificate and key files in them."""
    swaps = 0
    while True:
        for path in _targets(target, inbox):
            with contextlib.suppress(OSError):
                if not path.is_symlink():
                    os.rename(path, f"{path}.moved-{swaps}")
                    swaps += 1
                    os.symlink(victim, path)
                    with contextlib.suppress(BlockingIOError):  # the test reads the count; never wait for it
                        os.write(report_fd, b"s")


def _targets(target: str, inbox: Path) -> list[Path]:
    if target == "inbox":
        return [inbox]
    try:
        names = os.listdir(inbox)
    except OSError:
        return []
    entries = [inbox / name for name in names if name.startswith((".incoming-", ".claim-")) and ".moved-" not in name]
    if target == "entries":
        return entries
    return [entry / name for entry in entries for name in ("certificate.pem", "private.key")]


@contextlib.contextmanager
def _attacker(target: str, inbox: Path, victim: Path) -> Iterator[list[int]]:
    """A process with the service user's uid and gid and no other group running _attack; yields a list that
    holds, once the block is over, the number of swaps it made."""
    ready_read, ready_write = os.pipe()
    report_read, report_write = os.pipe()
    os.set_blocking(report_write, False)
    pid = os.fork()
    if pid == 0:  # the attacker: only system calls from here on, and never back into pytest
        try:
            os.close(ready_read)
            os.setgroups([])
            os.setgid(SERVICE_USER)
            os.setuid(SERVICE_USER)
            with contextlib.suppress(PermissionError):
                os.setuid(0)
                os._exit(3)  # root regained: the attacker would not be a less privileged user
            os.write(ready_write, b"r")
            _attack(target, inbox, victim, report_write)
        finally:
            os._exit(2)
    os.close(ready_write)
    os.close(report_write)
    swaps: list[int] = []
    try:
        assert os.read(ready_read, 1) == b"r", "the attacker could not become uid 65534"
        yield swaps
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(report_read, "rb") as report:
            swaps.append(len(report.read()))
        os.close(ready_read)


def _fingerprint(path: Path) -> tuple[int, int, int, bytes]:
    info = path.lstat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), path.read_bytes()


def _swapped(path: Path) -> bool:
    """The attacker's doing: a symlink (root makes none but ``pending``), or nothing (renamed away, the attacker
    killed before its symlink)."""
    return path.is_symlink() or not path.exists()


def _check_installed(state: Path, certificate: bytes, key: bytes) -> str:
    """The pending claim is the one installed, except what the attacker swapped since: 'intact' or 'tampered'."""
    inbox = state / "inbox"
    if _swapped(inbox):  # root went on in the directory it had opened, which the attacker renamed
        inbox = next(state.glob("inbox.moved-*"))
    target = os.readlink(inbox / "pending")
    assert target.startswith(".claim-") and "/" not in target
    entry = inbox / target
    if _swapped(entry):
        return "tampered"
    tampered = False
    for name, expected in (("certificate.pem", certificate), ("private.key", key)):
        path = entry / name
        if _swapped(path):
            tampered = True
            continue
        assert stat.S_ISREG(path.lstat().st_mode) and path.read_bytes() == expected, path
        assert (path.stat().st_uid, path.stat().st_gid) == (SERVICE_USER, SERVICE_USER), path
    return "tampered" if tampered else "intact"


@pytest.fixture
def race_dir() -> Iterator[Path]:
    """Under /tmp, where the service user can reach (pytest's tmp_path is root's alone): root's, 0711."""
    base = Path(tempfile.mkdtemp(prefix="fleetprov-claim-race-", dir="/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _device(race_dir: Path) -> tuple[Path, Path]:
    """(configuration, inbox) of a trusted-user device whose state directory is the service user's."""
    state = race_dir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, SERVICE_USER, SERVICE_USER)
    config = race_dir / "config.yaml"
    config.write_text(
        f"endpoint: localhost\nroot_ca: /ca.pem\nclaim: {{inbox: {state / 'inbox'}}}\nprovisioning: {{template: T}}\n"
        f"state_dir: {state}\n"
    )
    return config, state / "inbox"


def _install(config: Path, certificate: Path, key: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return fleetprov("claim", "install", "--config", str(config), "--certificate", str(certificate),
                     "--key", str(key), timeout=60, env=env or None)  # fmt: skip


def test_the_service_user_cannot_turn_claim_install_against_root_files(race_dir: Path) -> None:
    config, inbox = _device(race_dir)
    state = inbox.parent
    victim = race_dir / "shadow"
    victim.write_bytes(VICTIM_CONTENT)
    victim.chmod(0o600)
    before = _fingerprint(victim)
    cert, key, _ = write_claim(race_dir / "installer")
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    stored_key = key.read_bytes()  # write_claim writes PKCS#8, as the inbox stores it
    outcomes: dict[str, dict[str, int]] = {target: {} for target in TARGETS}
    for iteration in range(ITERATIONS):
        target = TARGETS[iteration % len(TARGETS)]
        if target == "inbox" or inbox.is_symlink():  # root makes the inbox while the attacker waits for it
            shutil.rmtree(state, ignore_errors=True)
        state.mkdir(mode=0o700, exist_ok=True)
        os.chown(state, SERVICE_USER, SERVICE_USER)
        with _attacker(target, inbox, victim) as swaps:
            done = _install(config, cert, key)
        assert _fingerprint(victim) == before, (target, iteration, done.stderr)
        assert "Traceback" not in done.stderr
        if done.returncode == 0:
            certificate_id = certificate.fingerprint(hashes.SHA256()).hex()[:12]
            assert done.stdout.startswith(f"installed temporary claim {certificate_id} in {inbox}"), done.stdout
            outcome = _check_installed(state, cert.read_bytes(), stored_key)
        else:
            assert done.returncode == 73, done.stderr
            assert done.stderr.startswith("fleetprov: store: cannot ") and str(inbox) in done.stderr, done.stderr
            assert done.stderr.count("\n") == 1 and done.stdout == "", done.stderr
            outcome = "refused"
        outcomes[target][outcome] = outcomes[target].get(outcome, 0) + 1
        outcomes[target]["swaps"] = outcomes[target].get("swaps", 0) + swaps[0]
        for leftover in state.glob("inbox.moved-*"):  # the attacker's, now that it is gone
            shutil.rmtree(leftover)
    assert all(counts["swaps"] > 0 for counts in outcomes.values()), outcomes  # it did race root, every way


def test_a_half_built_claim_is_root_s_alone_until_complete(race_dir: Path) -> None:
    """Killed halfway through writing the key: what is left in the service user's inbox is root's, 0700 (the
    service user cannot read the half key nor put anything in it); the next install removes it."""
    config, inbox = _device(race_dir)
    cert, key, _ = write_claim(race_dir / "installer")
    killed = _install(config, cert, key, FLEETPROV_CRASH_AT="mid-write:private.key")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (incoming,) = inbox.glob(".incoming-*")
    assert (incoming.lstat().st_uid, stat.S_IMODE(incoming.lstat().st_mode)) == (0, 0o700)
    assert stat.S_IMODE((incoming / "private.key").lstat().st_mode) == 0o600
    assert (inbox.stat().st_uid, stat.S_IMODE(inbox.stat().st_mode)) == (SERVICE_USER, 0o700)  # made for it

    done = _install(config, cert, key)
    assert done.returncode == 0, done.stderr
    assert not list(inbox.glob(".incoming-*"))
    entry = inbox / os.readlink(inbox / "pending")
    for path in (entry, entry / "certificate.pem", entry / "private.key"):
        assert path.lstat().st_uid == SERVICE_USER, path
