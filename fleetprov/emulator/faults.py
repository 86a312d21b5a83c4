"""Fault knobs: make the emulator slow, rude or overloaded on purpose, for tests and for trying a device's
retry behaviour offline. Configured from the emulator YAML (``faults:``) or ``serve`` flags."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

OPERATIONS = ("CreateKeysAndCertificate", "CreateCertificateFromCsr", "RegisterThing")


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


class Faults:
    """The mutable side of FaultConfig: counters and the throttle window."""

    def __init__(self, config: FaultConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._rejections = {rejection.operation: rejection for rejection in config.reject}
        self._remaining = {rejection.operation: rejection.count for rejection in config.reject}
        self._recent: collections.deque[float] = collections.deque()

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
