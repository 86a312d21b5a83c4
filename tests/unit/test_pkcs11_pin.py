"""fleetprov.keys.pkcs11_settings: the settings' invariants and read_pin from a file, the environment or a
systemd credential; no error ever carries the PIN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetprov.errors import EX_CONFIG, ConfigError
from fleetprov.keys.pkcs11_settings import Pkcs11Settings, read_pin

PIN = "s3cret-PIN-8642"
LIBRARY = Path("/usr/lib/softhsm/libsofthsm2.so")


def settings(**changes: Any) -> Pkcs11Settings:
    values: dict[str, Any] = {"library": LIBRARY, "token_label": "fleetprov", "key_label": "device-key"}
    values.update(changes)
    return Pkcs11Settings(**values)


def pin_file(directory: Path, content: bytes, mode: int = 0o600) -> Path:
    path = directory / "pin"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def refused(config: Pkcs11Settings, environ: dict[str, str], *secrets: str) -> str:
    """read_pin's ConfigError message, checked for exit code 78 and for carrying none of ``secrets``."""
    with pytest.raises(ConfigError) as caught:
        read_pin(config, environ)
    error = caught.value
    assert error.exit_code == EX_CONFIG
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None
    for secret in (PIN, *secrets):
        assert secret not in str(error)
        assert secret not in repr(error)
    return error.message


# -- the settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slot": 1}, "set exactly one of token_label and slot"),
        ({"token_label": None}, "set exactly one of token_label and slot"),
        ({"token_label": ""}, "token_label is empty"),
        ({"token_label": None, "slot": -1}, "slot must not be negative"),
        ({"key_label": None}, "set key_label, key_id or both"),
        ({"key_label": ""}, "key_label and key_id must not be empty"),
        ({"key_id": b""}, "key_label and key_id must not be empty"),
        ({"pin_env": None}, r"set exactly one of pin_file, pin_env and pin_credential \(found: none\)"),
        ({"pin_file": Path("/p")}, r"\(found: pin_file, pin_env\)"),
        ({"pin_credential": "pin"}, r"\(found: pin_env, pin_credential\)"),
        ({"pin_env": None, "pin_credential": "../pin"}, "'../pin' is not a credential name"),
        ({"pin_env": None, "pin_credential": ".."}, "'..' is not a credential name"),
        ({"pin_env": None, "pin_credential": ""}, "'' is not a credential name"),
    ],
)
def test_invalid_settings(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(**{"pin_env": "FLEETPROV_PKCS11_PIN", **changes})


def test_valid_settings() -> None:
    by_slot = settings(token_label=None, slot=0, key_label=None, key_id=b"\x01", pin_credential="pin")
    assert by_slot.slot == 0
    assert by_slot.pin_source() == "pin_credential pin"
    assert settings(pin_file=Path("/etc/fleetprov/pin")).pin_source() == "pin_file /etc/fleetprov/pin"
    assert settings(pin_env="PIN").pin_source() == "pin_env PIN"


# -- pin_file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [PIN.encode(), PIN.encode() + b"\n"])
def test_pin_file(tmp_path: Path, content: bytes) -> None:
    assert read_pin(settings(pin_file=pin_file(tmp_path, content)), {}) == PIN


def test_pin_file_keeps_everything_but_one_trailing_newline(tmp_path: Path) -> None:
    assert read_pin(settings(pin_file=pin_file(tmp_path, b" 12 34 \r\n")), {}) == " 12 34 \r"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_pin_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = pin_file(tmp_path, PIN.encode(), mode)
    message = refused(settings(pin_file=path), {})
    assert message == f"pin_file {path} is readable by others (mode {mode:04o}): run 'chmod 600 {path}'"


def test_pin_file_mode_0400_is_fine(tmp_path: Path) -> None:
    assert read_pin(settings(pin_file=pin_file(tmp_path, PIN.encode(), 0o400)), {}) == PIN


def test_missing_pin_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    assert refused(settings(pin_file=path), {}) == f"pin_file {path} does not exist or is not a file"
    assert refused(settings(pin_file=tmp_path), {}) == f"pin_file {tmp_path} does not exist or is not a file"


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_empty_pin_file(tmp_path: Path, content: bytes) -> None:
    path = pin_file(tmp_path, content)
    assert refused(settings(pin_file=path), {}) == f"pin_file {path}: the PIN is empty"


@pytest.mark.parametrize("content", [PIN.encode() + b"\n\n", PIN.encode() + b"\nsecond line", b"12\x0034"])
def test_pin_file_with_more_than_one_line(tmp_path: Path, content: bytes) -> None:
    path = pin_file(tmp_path, content)
    message = refused(settings(pin_file=path), {}, "second line")
    assert message == f"pin_file {path}: the PIN has more than one line or a NUL byte"


def test_pin_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = pin_file(tmp_path, b"caf\xe9-" + PIN.encode())
    assert refused(settings(pin_file=path), {}, "caf", "xe9") == f"pin_file {path}: the PIN is not UTF-8 text"


# -- pin_env ---------------------------------------------------------------------------------------------


def test_pin_env() -> None:
    assert read_pin(settings(pin_env="FLEETPROV_PKCS11_PIN"), {"FLEETPROV_PKCS11_PIN": PIN}) == PIN


def test_pin_env_unset_or_empty() -> None:
    config = settings(pin_env="FLEETPROV_PKCS11_PIN")
    assert refused(config, {"OTHER": PIN}) == "pin_env: environment variable FLEETPROV_PKCS11_PIN is not set"
    assert refused(config, {"FLEETPROV_PKCS11_PIN": ""}) == (
        "pin_env: environment variable FLEETPROV_PKCS11_PIN: the PIN is empty"
    )


def test_pin_env_with_a_newline() -> None:
    config = settings(pin_env="FLEETPROV_PKCS11_PIN")
    message = refused(config, {"FLEETPROV_PKCS11_PIN": PIN + "\n"})
    assert message.endswith("the PIN has more than one line or a NUL byte")


# -- pin_credential --------------------------------------------------------------------------------------


def test_pin_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    # systemd makes credentials 0400 for the unit's user; their directory is private, so no mode check.
    (credentials / "fleetprov-pin").write_text(PIN + "\n")
    (credentials / "fleetprov-pin").chmod(0o444)
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert read_pin(settings(pin_credential="fleetprov-pin"), environ) == PIN


def test_pin_credential_without_credentials_directory() -> None:
    message = refused(settings(pin_credential="fleetprov-pin"), {"PIN": PIN})
    assert message == (
        "pin_credential fleetprov-pin: $CREDENTIALS_DIRECTORY is not set "
        "(run under systemd with LoadCredential=fleetprov-pin:<path of the PIN file>)"
    )


def test_missing_or_empty_pin_credential(tmp_path: Path) -> None:
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    path = tmp_path / "fleetprov-pin"
    message = refused(settings(pin_credential="fleetprov-pin"), environ)
    assert message == f"pin_credential fleetprov-pin ({path}) does not exist or is not a file"
    path.write_text("")
    message = refused(settings(pin_credential="fleetprov-pin"), environ)
    assert message == f"pin_credential fleetprov-pin ({path}): the PIN is empty"
