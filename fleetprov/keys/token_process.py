"""A new key in the PKCS#11 token, made by a child process: for work on the token after awscrt has loaded the
same module in this process (the daemon's rotation). python-pkcs11 and awscrt each C_Initialize and
C_Finalize the module as if they owned it; in one process they break each other's sessions.

    await prepare_in_child(settings, key_type, common_name, environ, fresh=...) -> PreparedKey
    await delete_in_child(settings, key_references, environ) -> {key reference: None (deleted) or why not}

The child is ``python -m fleetprov.keys.token_process``: it reads one JSON request on stdin (the settings and
the PIN, read here from its source) and answers one JSON object on stdout (the PreparedKey, or the error's
class name, exit code and message). The PIN crosses only that pipe, never argv or the child's environment:
the child's environment is the allow-list of fleetprov/children.py and what PKCS#11 modules read to find
their configuration (and, in tests only, fleetprov/crashpoints.py's delay knob), and the child makes itself
non-dumpable before it reads its stdin. The child runs without holding up the daemon's event loop, within
CHILD_TIMEOUT, and is killed with its process group if the daemon stops meanwhile (fleetprov/children.py).
"""

from __future__ import annotations

import base64
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, TypeVar

from fleetprov.children import run_child, shown, token_module_environment
from fleetprov.crashpoints import delay_knob, delay_point
from fleetprov.errors import EX_TEMPFAIL, ConfigError, FleetprovError, printable
from fleetprov.hardening import harden_process
from fleetprov.keys import PreparedKey
from fleetprov.keys.pkcs11_settings import Pkcs11Settings, read_pin
from fleetprov.selfexec import python_command

log = logging.getLogger(__name__)

Answer = TypeVar("Answer")

CHILD_TIMEOUT = 120.0  # seconds: RSA-3072 generation on a slow token takes a while


class ChildFailed(FleetprovError):
    """The child reported a failure; exit_code and transient are the child's error's."""

    def __init__(self, message: str, exit_code: int, *, transient: bool) -> None:
        super().__init__(message, step="key")
        self.exit_code = exit_code
        self.transient = transient


async def prepare_in_child(
    settings: Pkcs11Settings, key_type: str, common_name: str, environ: Mapping[str, str], *, fresh: bool = False
) -> PreparedKey:
    """The key ``settings`` names (found, or made now; with ``fresh`` always made now) and its CSR, from a fresh
    process. The PIN is read here, from ``environ`` or its file, and handed to the child on its stdin."""

    def read(answer: Mapping[str, Any]) -> PreparedKey:
        log.info("%s", printable(str(answer["done"]), 400))
        return PreparedKey(
            key_reference=str(answer["key_reference"]),
            public_key_der=base64.b64decode(answer["public_key_der"]),
            csr_pem=str(answer["csr_pem"]),
        )

    return await _ask_child(settings, {"key_type": key_type, "common_name": common_name, "fresh": fresh}, environ, read)


async def delete_in_child(
    settings: Pkcs11Settings, key_references: Sequence[str], environ: Mapping[str, str]
) -> dict[str, Optional[str]]:
    """Delete the token keys ``key_references`` name, from a fresh process: for each, None or why not."""

    def read(answer: Mapping[str, Any]) -> dict[str, Optional[str]]:
        deleted = answer["deleted"]
        return {key: None if deleted[key] is None else str(deleted[key]) for key in key_references}

    return await _ask_child(settings, {"delete": list(key_references)}, environ, read)


async def _ask_child(
    settings: Pkcs11Settings,
    request: Mapping[str, Any],
    environ: Mapping[str, str],
    read: Callable[[Mapping[str, Any]], Answer],
) -> Answer:
    """The child's answer to ``request`` (with the settings and the PIN added), as ``read`` makes it of the
    JSON; ChildFailed if the child failed or answered something ``read`` cannot use."""
    document = {"settings": _settings_json(settings), "pin": read_pin(settings, environ), **request}
    command = python_command("-m", "fleetprov.keys.token_process")
    try:
        # The delay knob (test-only: a slow token, fleetprov/crashpoints.py) is the one variable added on purpose.
        environment = {**token_module_environment(environ), **delay_knob(environ)}
        done = await run_child(command, environment, CHILD_TIMEOUT, stdin=json.dumps(document).encode())
    except OSError as exc:
        raise ChildFailed(f"the token key process cannot start: {exc.strerror}", EX_TEMPFAIL, transient=True) from None
    if done.timed_out:
        raise ChildFailed(
            f"the token key process did not answer within {CHILD_TIMEOUT:g} s", EX_TEMPFAIL, transient=True
        )
    try:
        answer = json.loads(done.stdout)
        if "error" in answer:
            raise ChildFailed(str(answer["error"]), int(answer["exit_code"]), transient=bool(answer["transient"]))
        return read(answer)
    except (ValueError, KeyError, TypeError) as exc:
        said = shown(done.stderr) or f"exit status {done.status}"
        message = f"the token key process answered nothing usable ({exc}): {said}"
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
    harden_process()  # before the PIN arrives
    delay_point("token-process")

    try:
        answer = _answer(json.loads(sys.stdin.read()))
    except FleetprovError as exc:
        answer = {"error": exc.message, "exit_code": exc.exit_code, "transient": exc.transient}
    except (ValueError, KeyError, TypeError) as exc:
        error = ConfigError(f"bad request to the token key process: {exc}")
        answer = {"error": error.message, "exit_code": error.exit_code, "transient": False}
    sys.stdout.write(json.dumps(answer))
    return 0


def _answer(request: Mapping[str, Any]) -> dict[str, Any]:
    """What the child does: delete keys (``delete``), or find or make one and sign its CSR."""
    try:
        from fleetprov.keys.token import delete_token_keys, prepare_token_key  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"keys.backend pkcs11 needs python-pkcs11 and asn1crypto ({exc.name} is missing): install fleetprov[pkcs11]"
        ) from None

    settings, pin = _settings_of(request["settings"]), str(request["pin"])
    if "delete" in request:
        return {"deleted": delete_token_keys(settings, pin, [str(reference) for reference in request["delete"]])}
    key, done = prepare_token_key(
        settings, pin, str(request["key_type"]), str(request["common_name"]), fresh=request["fresh"] is True
    )
    return {
        "done": done,
        "key_reference": key.key_reference,
        "public_key_der": base64.b64encode(key.public_key_der).decode(),
        "csr_pem": key.csr_pem,
    }


if __name__ == "__main__":
    sys.exit(main())
