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

The identity is committed before any hook runs: a hook that fails, hangs (killed at the timeout) or cannot be
started is logged and changes nothing. The PIN's environment variable and $CREDENTIALS_DIRECTORY are not
passed on. Files that are not executable, hidden or backup files (``.*``, ``*~``,
``*.dpkg-*``) are skipped, so a package's conffile leftovers never run.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from fleetprov.config import Config
from fleetprov.errors import printable
from fleetprov.keys.pkcs11_settings import CREDENTIALS_DIRECTORY
from fleetprov.store import KEY_FILE_REFERENCE, Generation

log = logging.getLogger(__name__)

_SKIPPED_SUFFIXES = ("~", ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".dpkg-tmp", ".rpmnew", ".rpmsave")


def hook_environment(config: Config, generation: Generation, base: Mapping[str, str]) -> dict[str, str]:
    manifest = generation.manifest
    # The PIN's sources are not the hooks' business: its environment variable and systemd's credentials go.
    withheld = {CREDENTIALS_DIRECTORY}
    if config.keys.pkcs11 is not None and config.keys.pkcs11.pin_env is not None:
        withheld.add(config.keys.pkcs11.pin_env)
    environment = {
        **{name: value for name, value in base.items() if name not in withheld},
        "FLEETPROV_THING_NAME": manifest.thing_name,
        "FLEETPROV_CERTIFICATE": str(generation.certificate),
        "FLEETPROV_ENDPOINT": f"{config.endpoint}:{config.port}",
        "FLEETPROV_DEVICE_CONFIG": str(generation.path / "device-config.json"),
        "FLEETPROV_GENERATION": str(generation.number),
        "FLEETPROV_STATE_DIR": str(config.state_dir),
    }
    if manifest.key_reference == KEY_FILE_REFERENCE:
        environment["FLEETPROV_PRIVATE_KEY"] = str(generation.private_key)
    else:
        environment["FLEETPROV_KEY_URI"] = manifest.key_reference
    return environment


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


def run_hooks(config: Config, generation: Generation, base: Mapping[str, str]) -> int:
    """Run every hook for ``generation``; how many succeeded. Never raises: the commit stands."""
    environment = hook_environment(config, generation, base)
    succeeded = 0
    for hook in hooks_in(config.hooks.directory):
        if _run_one(hook, environment, config.hooks.timeout):
            succeeded += 1
    return succeeded


def _run_one(hook: Path, environment: Mapping[str, str], timeout: float) -> bool:
    try:
        done = subprocess.run(
            [str(hook)],
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("hook %s: killed after %g s (the identity stays committed)", hook, timeout)
        return False
    except OSError as exc:
        log.warning("hook %s: cannot run: %s (the identity stays committed)", hook, exc.strerror)
        return False
    output = printable(
        done.stdout.decode(errors="replace").strip() + " " + done.stderr.decode(errors="replace").strip()
    )
    if done.returncode != 0:
        log.warning("hook %s: exit status %d (the identity stays committed): %s", hook, done.returncode, output.strip())
        return False
    log.info("hook %s: ok", hook)
    return True
