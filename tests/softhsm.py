"""Test support: a fresh SoftHSM2 token of a test's own, in a temporary directory.

SoftHSM2 reads $SOFTHSM2_CONF when the module is initialised; fleetprov.keys.pkcs11.open_token finalizes the
module when it is done, so every test's open_token sees that test's tokens and no other's.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetprov.keys.pkcs11_settings import Pkcs11Settings

LIBRARY = Path("/usr/lib/softhsm/libsofthsm2.so")
SO_PIN = "so-pin-5678"
# CKF_* token flags (PKCS#11 2.40) and how SoftHSM2 2.6 stores them in token.object: a big-endian ulong.
_STORED_FLAGS = 0x42D  # RNG | LOGIN_REQUIRED | USER_PIN_INITIALIZED | RESTORE_KEY_NOT_NEEDED | TOKEN_INITIALIZED
_USER_PIN_LOCKED = 0x40000


@dataclass(frozen=True)
class SoftToken:
    library: Path
    label: str
    pin: str
    conf: Path
    token_dir: Path

    def settings(self, **changes: object) -> Pkcs11Settings:
        """Settings for this token, the key 'device-key', the PIN from $TEST_PKCS11_PIN; ``changes`` override."""
        values: dict[str, object] = {
            "library": self.library,
            "token_label": self.label,
            "key_label": "device-key",
            "pin_env": "TEST_PKCS11_PIN",
        }
        values.update(changes)
        return Pkcs11Settings(**values)  # type: ignore[arg-type]

    def add_token(self, label: str, pin: str) -> None:
        """Initialise one more token (in the next free slot) in the same token directory."""
        init_token(self.conf, label, pin)

    def lock_user_pin(self) -> None:
        """Set CKF_USER_PIN_LOCKED, as a token that counts wrong PINs does (SoftHSM2 never locks on its own)."""
        (token_object,) = self.token_dir.glob("*/token.object")
        data = token_object.read_bytes()
        stored = struct.pack(">Q", _STORED_FLAGS)
        assert data.count(stored) == 1, "SoftHSM2's token.object layout changed"
        token_object.write_bytes(data.replace(stored, struct.pack(">Q", _STORED_FLAGS | _USER_PIN_LOCKED)))


def softhsm2_util() -> str:
    """softhsm2-util's path; fails (never skips) when SoftHSM2 is not installed: `make deps` installs it."""
    path = shutil.which("softhsm2-util")
    if path is None or not LIBRARY.is_file():
        pytest.fail(
            "SoftHSM2 is not installed (softhsm2-util, libsofthsm2.so): run `make deps` or apt-get install softhsm2"
        )
    return path


def init_token(conf: Path, label: str, pin: str) -> None:
    subprocess.run(
        [softhsm2_util(), "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", SO_PIN],
        env={"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )


def make_token(
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    label: str = "fleetprov",
    pin: str = "user-pin-1234",
    mechanisms: Sequence[str] = (),
) -> SoftToken:
    """A SoftHSM2 configuration in ``directory`` with one token, made the process's $SOFTHSM2_CONF.

    ``mechanisms`` (e.g. ``["CKM_RSA_PKCS_KEY_PAIR_GEN"]``) limits what the token offers (slots.mechanisms).
    """
    token_dir = directory / "tokens"
    token_dir.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    lines = [f"directories.tokendir = {token_dir}", "objectstore.backend = file", "log.level = ERROR"]
    if mechanisms:
        lines.append(f"slots.mechanisms = {','.join(mechanisms)}")
    conf.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    init_token(conf, label, pin)
    return SoftToken(library=LIBRARY, label=label, pin=pin, conf=conf, token_dir=token_dir)
