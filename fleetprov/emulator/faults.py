"""Fault knobs: make the emulator slow, rude or overloaded on purpose, for tests and for trying a device's
retry behaviour offline. Configured from the emulator YAML (``faults:``) or ``serve`` flags."""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

OPERATIONS = ("CreateKeysAndCertificate", "CreateCertificateFromCsr", "RegisterThing")
RAW_PAYLOAD = "$raw"  # in a reply override: base64 of the exact payload bytes to send instead of the reply


@dataclass(frozen=True)
class ForcedRejection:
    """Reject the next ``count`` requests of ``operation`` with this status and error code."""

    operation: str
    count: int
    status_code: int
    error_code: str
    error_message: str = "rejected by an emulator fault knob"


@dataclass(frozen=True)
class FaultConfig:
    reply_delay: float = 0.0
    close_after_messages: Optional[int] = None
    throttle_per_second: Optional[float] = None
    reject: tuple[ForcedRejection, ...] = field(default_factory=tuple)
    # Operations whose accepted replies are made inconsistent: a certificate for another key
    # (CreateCertificateFromCsr), a private key that does not match (CreateKeysAndCertificate), no
    # thingName (RegisterThing). For testing a device's checks.
    tamper: tuple[str, ...] = ()
    # A JSON file read again at every request: {OPERATION: {field: value, ...}} replaces fields of OP's
    # accepted replies (null removes one; "$raw": base64 replaces the whole payload). See ReplyOverride.
    reply_overrides_file: Optional[Path] = None


@dataclass(frozen=True)
class ReplyOverride:
    """What ``reply_overrides_file`` does to one operation's accepted reply."""

    fields: Mapping[str, Any] = field(default_factory=dict)  # replace these; a None value removes the field
    raw: Optional[bytes] = None  # send these bytes instead of the (encoded) reply; wins over ``fields``

    def applied_to(self, body: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**body, **self.fields}
        return {key: value for key, value in merged.items() if value is not None}


def load_reply_overrides(path: Path) -> dict[str, ReplyOverride]:
    """The overrides in ``path``; ValueError (or OSError) when it cannot be used as a whole."""
    document = json.loads(path.read_bytes().decode("utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object of operations, got {type(document).__name__}")
    overrides = {}
    for operation, fields in document.items():
        if operation not in OPERATIONS:
            raise ValueError(f"{operation!r} is not one of {', '.join(OPERATIONS)}")
        if not isinstance(fields, dict):
            raise ValueError(f"{operation}: expected an object of reply fields, got {type(fields).__name__}")
        raw = fields.pop(RAW_PAYLOAD, None)
        if raw is not None and not isinstance(raw, str):
            raise ValueError(f"{operation}.{RAW_PAYLOAD}: expected a base64 string")
        try:
            payload = None if raw is None else base64.b64decode(raw, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{operation}.{RAW_PAYLOAD}: not base64: {exc}") from exc
        overrides[operation] = ReplyOverride(fields, payload)
    return overrides


class Faults:
    """The mutable side of FaultConfig: counters and the throttle window."""

    def __init__(self, config: FaultConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._rejections = {rejection.operation: rejection for rejection in config.reject}
        self._remaining = {rejection.operation: rejection.count for rejection in config.reject}
        self._recent: collections.deque[float] = collections.deque()
        self._overrides_problem: Optional[str] = None  # the last problem logged

    def reply_override(self, operation: str) -> Optional[ReplyOverride]:
        """``operation``'s entry in ``reply_overrides_file``, read now: tests change the file between runs."""
        path = self.config.reply_overrides_file
        if path is None:
            return None
        try:
            overrides = load_reply_overrides(path)
        except FileNotFoundError:
            self._note_problem(logging.INFO, path, "does not exist")
            return None
        except (OSError, ValueError, RecursionError) as exc:
            self._note_problem(logging.WARNING, path, f"is unusable ({exc})")
            return None
        self._overrides_problem = None
        override = overrides.get(operation)
        if override is not None:
            changed = "the whole payload" if override.raw is not None else ", ".join(override.fields) or "nothing"
            log.info("%s reply overridden from %s: %s", operation, path, changed)
        return override

    def _note_problem(self, level: int, path: Path, problem: str) -> None:
        """Log a problem with the overrides file once, not at every request (again if it changes)."""
        if problem != self._overrides_problem:
            log.log(level, "reply overrides file %s %s: replies are unchanged", path, problem)
            self._overrides_problem = problem

    def forced_rejection(self, operation: str) -> Optional[ForcedRejection]:
        if self._remaining.get(operation, 0) <= 0:
            return None
        self._remaining[operation] -= 1
        return self._rejections[operation]

    def throttled(self) -> bool:
        """True when this request would exceed ``throttle_per_second`` over the last second."""
        limit = self.config.throttle_per_second
        if limit is None:
            return False
        now = self._clock()
        while self._recent and self._recent[0] <= now - 1.0:
            self._recent.popleft()
        if len(self._recent) >= limit:
            return True
        self._recent.append(now)
        return False
