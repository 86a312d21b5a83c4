"""Post-provision hooks: executables in ``hooks.directory`` (default ``/etc/fleetprov/hooks.d``), run after each
commit of a new identity, in name order, each bounded by ``hooks.timeout``.

A hook learns the new identity from its environment (nothing secret: a key path or a ``pkcs11:`` URI, never
key material or a PIN):

    FLEETPROV_THING_NAME       the thing name
    FLEETPROV_CERTIFICATE      the certificate (PEM) of the committed generation
    FLEETPROV_PRIVATE_KEY      the private key file, or FLEETPROV_KEY_URI: the key's pkcs11: URI
    FLEETPROV_ENDPOINT         host:port of the AWS IoT data endpoint
    FLEETPROV_DEVICE_CONFIG    the template's DeviceConfiguration (JSON)
    FLEETPROV_GENERATION       the generation number
    FLEETPROV_STATE_DIR        the state directory (its `current` points at the new generation)

A hook gets nothing else of fleetprov's environment but the allow-list of fleetprov/children.py (PATH, HOME,
USER, LOGNAME, TMPDIR, TZ, LANG, LANGUAGE, LC_*): not the PIN's variable, not $CREDENTIALS_DIRECTORY, not
FLEETPROV_PROXY__PASSWORD or any other setting fleetprov itself was given. fleetprov is not dumpable
(fleetprov/hardening.py), so a hook cannot read fleetprov's environment or memory through /proc either. A hook
does run as fleetprov's user, with that user's access to files.

The identity is committed before any hook runs: a hook that fails, hangs (killed at the timeout) or cannot be
started is logged and changes nothing. Each hook runs in a process group of its own; the group is killed when
the hook exits, at the timeout, or when the daemon stops (SIGTERM) while the hook runs, so a hook must not
leave processes behind (start services with ``systemctl``). A hook does not hold up the daemon: its watchdog
pings and its answer to SIGTERM go on meanwhile. Files that are not executable, hidden or backup files
(``.*``, ``*~``, ``*.dpkg-*``) are skipped, so a package's conffile leftovers never run.

Only what root or fleetprov's own user can change runs: a hook (symlinks are followed: it runs by its real
path) and the hooks directory must belong to root or fleetprov's user and must not be writable by group or
others, and so must every directory above them, except that a directory above may be writable by others
with the sticky bit set (/tmp: nobody else can replace what is in it). A hook that fails this is not run
(logged); a hooks directory that fails it runs none. The check walks the real path with O_NOFOLLOW from / and
the hook is then run by that path: nobody but root and fleetprov's user can change what it names in between.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from fleetprov.children import child_environment, run_child, shown
from fleetprov.config import Config
from fleetprov.store import KEY_FILE_REFERENCE, Generation

log = logging.getLogger(__name__)

_SKIPPED_SUFFIXES = ("~", ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".dpkg-tmp", ".rpmnew", ".rpmsave")
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_KIND_NAMES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory"}


class UnsafeHook(Exception):
    """A hook, or a directory on its way, that someone other than root or fleetprov's user could change."""


def hook_environment(config: Config, generation: Generation, base: Mapping[str, str]) -> dict[str, str]:
    manifest = generation.manifest
    identity = {
        "FLEETPROV_THING_NAME": manifest.thing_name,
        "FLEETPROV_CERTIFICATE": str(generation.certificate),
        "FLEETPROV_ENDPOINT": f"{config.endpoint}:{config.port}",
        "FLEETPROV_DEVICE_CONFIG": str(generation.path / "device-config.json"),
        "FLEETPROV_GENERATION": str(generation.number),
        "FLEETPROV_STATE_DIR": str(config.state_dir),
    }
    if manifest.key_reference == KEY_FILE_REFERENCE:
        identity["FLEETPROV_PRIVATE_KEY"] = str(generation.private_key)
    else:
        identity["FLEETPROV_KEY_URI"] = manifest.key_reference
    return child_environment(base, identity)


def hooks_in(directory: Path) -> list[Path]:
    """The hooks that run, in order; a missing directory has none."""
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("hooks: cannot list %s: %s", directory, exc.strerror)
        return []
    return [
        entry
        for entry in entries
        if not entry.name.startswith(".")
        and not entry.name.endswith(_SKIPPED_SUFFIXES)
        and entry.is_file()
        and os.access(entry, os.X_OK)
    ]


async def run_hooks(config: Config, generation: Generation, base: Mapping[str, str]) -> int:
    """Run every hook for ``generation``, one after the other; how many succeeded. Never raises but
    CancelledError (the daemon's SIGTERM: the running hook's group is killed): the commit stands."""
    try:
        # Listed by its real path, the one checked: the configured path may pass through symlinks elsewhere.
        directory = changeable_only_by(config.hooks.directory, os.geteuid(), stat.S_IFDIR)
    except FileNotFoundError:
        return 0
    except (UnsafeHook, OSError) as exc:
        log.warning("hooks: none of %s runs: %s", config.hooks.directory, _reason(exc))
        return 0
    hooks = hooks_in(directory)
    environment = hook_environment(config, generation, base)
    return sum([await _run_one(hook, environment, config.hooks.timeout) for hook in hooks])


def changeable_only_by(path: Path, service_uid: int, kind: int) -> Path:
    """``path`` with its symlinks resolved, once it is of ``kind`` (stat.S_IFREG or S_IFDIR) and only root
    and ``service_uid`` can change what it names: it and every directory above it belong to one of them and
    are not writable by group or others, but for a directory above with the sticky bit. UnsafeHook or
    OSError otherwise.

    The real path is walked from / with O_NOFOLLOW, so what is checked is what that path names: a component
    swapped for a symlink after Path.resolve is not followed, and refused."""
    real = path.resolve(strict=True)
    directory = os.open("/", os.O_PATH | os.O_DIRECTORY)
    where = Path("/")
    try:
        for name in real.parts[1:]:
            _check_above(os.fstat(directory), where, service_uid)
            component = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory, where = component, where / name
        status = os.fstat(directory)
    finally:
        os.close(directory)
    if stat.S_IFMT(status.st_mode) != kind:
        raise UnsafeHook(f"{where} is not a {_KIND_NAMES[kind]}")
    _check_owner(status, where, service_uid)
    if status.st_mode & _WRITABLE_BY_OTHERS:
        raise UnsafeHook(f"{where} is writable by its group or others (mode {stat.S_IMODE(status.st_mode):04o})")
    return real


def _check_above(status: os.stat_result, where: Path, service_uid: int) -> None:
    _check_owner(status, where, service_uid)
    # With the sticky bit (/tmp), others may add entries but not rename or remove those of root or
    # fleetprov's user, which the next component is checked to be.
    if status.st_mode & _WRITABLE_BY_OTHERS and not status.st_mode & stat.S_ISVTX:
        raise UnsafeHook(f"{where} is writable by its group or others (mode {stat.S_IMODE(status.st_mode):04o})")


def _check_owner(status: os.stat_result, where: Path, service_uid: int) -> None:
    if status.st_uid not in (0, service_uid):
        raise UnsafeHook(
            f"{where} belongs to uid {status.st_uid}, neither root nor fleetprov's user (uid {service_uid})"
        )


def _reason(exc: Exception) -> str:
    return f"cannot check it: {exc.strerror}" if isinstance(exc, OSError) else str(exc)


async def _run_one(hook: Path, environment: Mapping[str, str], timeout: float) -> bool:
    try:
        real = changeable_only_by(hook, os.geteuid(), stat.S_IFREG)
    except (UnsafeHook, OSError) as exc:
        log.warning("hook %s: not run: %s", hook, _reason(exc))
        return False
    try:
        # By the path just checked, whose every component only root and this user can change (resolving the
        # hook's symlinks again could pass through a directory nobody checked).
        done = await run_child([str(real)], environment, timeout)
    except OSError as exc:
        log.warning("hook %s: cannot run: %s (the identity stays committed)", hook, exc.strerror)
        return False
    if done.timed_out:
        log.warning("hook %s: killed after %g s (the identity stays committed)", hook, timeout)
        return False
    output = shown(done.stdout.strip() + b" " + done.stderr.strip())
    if done.status != 0:
        log.warning("hook %s: exit status %d (the identity stays committed): %s", hook, done.status, output)
        return False
    log.info("hook %s: ok", hook)
    return True
