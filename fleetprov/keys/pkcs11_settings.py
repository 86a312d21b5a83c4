"""Where the PKCS#11 key lives and where its PIN comes from.

The PIN comes from exactly one of three sources, named in the config file:

- ``pin_file``: a file of the service user's, mode 0600 (a file readable by group or others is refused, as
  the claim key is); one trailing newline is ignored, so ``echo 1234 > pin`` works;
- ``pin_env``: an environment variable (for containers and tests; systemd units should prefer a credential);
- ``pin_credential``: a systemd credential (``LoadCredential=`` / ``LoadCredentialEncrypted=``), read from
  ``$CREDENTIALS_DIRECTORY/<name>``: the PIN stays out of the unit file and, encrypted, off the disk.

A PIN written in the config file itself is refused (the config parser rejects a ``pin:`` key): config files
are copied, diffed, attached to bug reports and often world-readable. The command line is no source either:
any user can read another process's argv. Error messages name the source of a PIN, never its value.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fleetprov.errors import ConfigError

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"  # set by systemd for a unit with credentials


@dataclass(frozen=True)
class Pkcs11Settings:
    """The ``pkcs11:`` section of the config. Validated on construction (ValueError naming the keys)."""

    library: Path  # the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so
    token_label: Optional[str] = None  # exactly one of token_label and slot
    slot: Optional[int] = None
    key_label: Optional[str] = None  # at least one of key_label and key_id
    key_id: Optional[bytes] = None  # hex in the config file
    pin_file: Optional[Path] = None  # exactly one of pin_file, pin_env and pin_credential
    pin_env: Optional[str] = None
    pin_credential: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.token_label is None) == (self.slot is None):
            raise ValueError("set exactly one of token_label and slot")
        if self.token_label == "":
            raise ValueError("token_label is empty")
        if self.slot is not None and self.slot < 0:
            raise ValueError("slot must not be negative")
        if self.key_label is None and self.key_id is None:
            raise ValueError("set key_label, key_id or both")
        if self.key_label == "" or self.key_id == b"":
            raise ValueError("key_label and key_id must not be empty")
        sources = [name for name in ("pin_file", "pin_env", "pin_credential") if getattr(self, name) is not None]
        if len(sources) != 1:
            found = ", ".join(sources) or "none"
            raise ValueError(f"set exactly one of pin_file, pin_env and pin_credential (found: {found})")
        credential = self.pin_credential
        if credential is not None and (credential in ("", ".", "..") or "/" in credential):
            raise ValueError(f"pin_credential {credential!r} is not a credential name")

    def pin_source(self) -> str:
        """The PIN's source as messages name it: ``pin_file /etc/fleetprov/pin``, never the PIN."""
        if self.pin_file is not None:
            return f"pin_file {self.pin_file}"
        if self.pin_env is not None:
            return f"pin_env {self.pin_env}"
        return f"pin_credential {self.pin_credential}"


def read_pin(settings: Pkcs11Settings, environ: Mapping[str, str]) -> str:
    """The PIN from the one configured source; ConfigError (exit 78) naming the source if it has none."""
    if settings.pin_file is not None:
        return read_pin_file(settings.pin_file, f"pin_file {settings.pin_file}", private=True)
    if settings.pin_env is not None:
        return _pin_from_env(settings.pin_env, environ)
    return _pin_from_credential(settings.pin_credential or "", environ)  # __post_init__: the one source left


def _pin_from_env(name: str, environ: Mapping[str, str]) -> str:
    if name not in environ:
        raise ConfigError(f"pin_env: environment variable {name} is not set", step="config")
    return checked_pin(environ[name], f"pin_env: environment variable {name}")


def _pin_from_credential(name: str, environ: Mapping[str, str]) -> str:
    directory = environ.get(CREDENTIALS_DIRECTORY)
    if not directory:
        raise ConfigError(
            f"pin_credential {name}: ${CREDENTIALS_DIRECTORY} is not set "
            f"(run under systemd with LoadCredential={name}:<path of the PIN file>)",
            step="config",
        )
    # The credentials directory is systemd's, private to the unit: no mode check.
    path = Path(directory) / name
    return read_pin_file(path, f"pin_credential {name} ({path})", private=False)


def read_pin_file(path: Path, source: str, *, private: bool) -> str:
    if not path.is_file():
        raise ConfigError(f"{source} does not exist or is not a file", step="config")
    mode = stat.S_IMODE(path.stat().st_mode)
    if private and mode & 0o077:
        raise ConfigError(f"{source} is readable by others (mode {mode:04o}): run 'chmod 600 {path}'", step="config")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source} cannot be read: {exc.strerror}", step="config") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:  # from None: the exception quotes the bytes it could not decode
        raise ConfigError(f"{source}: the PIN is not UTF-8 text", step="config") from None
    return checked_pin(text.removesuffix("\n"), source)


def checked_pin(pin: str, source: str) -> str:
    if not pin:
        raise ConfigError(f"{source}: the PIN is empty", step="config")
    if "\n" in pin or "\0" in pin:
        raise ConfigError(f"{source}: the PIN has more than one line or a NUL byte", step="config")
    return pin
