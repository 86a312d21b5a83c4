"""A new key in the PKCS#11 token, made by a child process: for work on the token after awscrt has loaded the
same module in this process (the daemon's rotation). python-pkcs11 and awscrt each C_Initialize and
C_Finalize the module as if they owned it; in one process they break each other's sessions.

    prepare_in_child(settings, key_type, common_name) -> PreparedKey

The child is ``python -m fleetprov.keys.token_process``: it reads one JSON request on stdin and answers one
JSON object on stdout (the PreparedKey, or the error's class name, exit code and message). It inherits the
environment, so the PIN comes from the same source (file, variable or systemd credential); the PIN itself
never crosses the pipe.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from fleetprov.errors import EX_TEMPFAIL, ConfigError, FleetprovError
from fleetprov.keys import PreparedKey
from fleetprov.keys.pkcs11_settings import Pkcs11Settings
from fleetprov.selfexec import python_command

CHILD_TIMEOUT = 120.0  # seconds: RSA-3072 generation on a slow token takes a while


class ChildFailed(FleetprovError):
    """The child reported a failure; exit_code and transient are the child's error's."""

    def __init__(self, message: str, exit_code: int, *, transient: bool) -> None:
        super().__init__(message, step="key")
        self.exit_code = exit_code
        self.transient = transient


def prepare_in_child(
    settings: Pkcs11Settings, key_type: str, common_name: str, environ: Mapping[str, str]
) -> PreparedKey:
    """The key ``settings`` names (found, or made now) and its CSR, from a fresh process."""
    request = {"settings": _settings_json(settings), "key_type": key_type, "common_name": common_name}
    try:
        done = subprocess.run(
            python_command("-m", "fleetprov.keys.token_process"),
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            env=dict(environ),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ChildFailed(f"the token key process failed: {exc}", EX_TEMPFAIL, transient=True) from None
    try:
        answer = json.loads(done.stdout)
        if "error" in answer:
            raise ChildFailed(str(answer["error"]), int(answer["exit_code"]), transient=bool(answer["transient"]))
        return PreparedKey(
            key_reference=str(answer["key_reference"]),
            public_key_der=base64.b64decode(answer["public_key_der"]),
            csr_pem=str(answer["csr_pem"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        message = f"the token key process answered nothing usable ({exc}): {tail[0]}"
        raise ChildFailed(message, EX_TEMPFAIL, transient=True) from None


def _settings_json(settings: Pkcs11Settings) -> dict[str, Any]:
    document = asdict(settings)
    for name, value in document.items():
        if isinstance(value, Path):
            document[name] = str(value)
        elif isinstance(value, bytes):
            document[name] = value.hex()
    return document


def _settings_of(document: Mapping[str, Any]) -> Pkcs11Settings:
    def path(name: str) -> Optional[Path]:
        value = document.get(name)
        return None if value is None else Path(value)

    key_id = document.get("key_id")
    return Pkcs11Settings(
        library=Path(document["library"]),
        token_label=document.get("token_label"),
        slot=document.get("slot"),
        key_label=document.get("key_label"),
        key_id=None if key_id is None else bytes.fromhex(key_id),
        pin_file=path("pin_file"),
        pin_env=document.get("pin_env"),
        pin_credential=document.get("pin_credential"),
    )


def main() -> int:
    import os  # noqa: PLC0415

    from fleetprov.keys.token import prepare_token_key  # noqa: PLC0415 -- needs the extra 'pkcs11'

    try:
        request = json.loads(sys.stdin.read())
        key = prepare_token_key(
            _settings_of(request["settings"]), os.environ, str(request["key_type"]), str(request["common_name"])
        )
    except FleetprovError as exc:
        answer: dict[str, Any] = {"error": exc.message, "exit_code": exc.exit_code, "transient": exc.transient}
    except (ValueError, KeyError, TypeError) as exc:
        error = ConfigError(f"bad request to the token key process: {exc}")
        answer = {"error": error.message, "exit_code": error.exit_code, "transient": False}
    else:
        answer = {
            "key_reference": key.key_reference,
            "public_key_der": base64.b64encode(key.public_key_der).decode(),
            "csr_pem": key.csr_pem,
        }
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
