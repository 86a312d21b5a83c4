"""systemd's sd_notify protocol, written in-tree so that fleetprov needs no python-systemd.

A service started by systemd with ``Type=notify`` (or ``NotifyAccess=``, ``WatchdogSec=``) finds in its
environment ``NOTIFY_SOCKET``: the address of an AF_UNIX datagram socket, a filesystem path or, when it starts
with "@", a name in the abstract namespace. The service reports its state by sending newline-separated
``KEY=value`` assignments to it. fleetprov sends:

- ``READY=1`` once it is connected with its permanent credentials, so that units ordered after it start then;
- ``STATUS=`` the current step in words, one line, shown by ``systemctl status``;
- ``WATCHDOG=1`` every half of ``WatchdogSec`` (``WATCHDOG_USEC``) while it is healthy: withholding the pings
  of a stuck agent is what makes systemd restart it. The pings come from a task of the daemon's event loop
  (watchdog_loop), so they say that loop is alive: nothing the daemon does holds it up, the children it
  starts included (fleetprov/children.py runs them off the loop);
- ``STOPPING=1`` on shutdown, and ``RELOADING=1`` with ``MONOTONIC_USEC=`` on reload (``Type=notify-reload``).

Without ``NOTIFY_SOCKET`` (run by hand, in a container, under another supervisor) nothing is sent and nothing
fails. Sending is best effort: an error is logged once at debug level and otherwise ignored, because a lost
notification must never take the agent down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Callable, Optional

from fleetprov.errors import printable

log = logging.getLogger(__name__)

# systemctl shows the status on one line; more than this helps nobody.
STATUS_LIMIT = 200


def _positive_int(text: Optional[str]) -> Optional[int]:
    """``text`` as a positive decimal integer, or None (as sd_watchdog_enabled, which treats bad values as unset)."""
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value > 0 else None


class Notifier:
    """Sends sd_notify messages to ``address`` (None: a notifier that does nothing)."""

    def __init__(self, address: Optional[bytes] = None, *, watchdog_usec: Optional[int] = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._socket: Optional[socket.socket] = None
        self._failure_logged = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        notify_socket = environ.get("NOTIFY_SOCKET", "")
        if notify_socket.startswith("@"):
            address: Optional[bytes] = b"\0" + os.fsencode(notify_socket[1:])
        elif notify_socket.startswith("/"):
            address = os.fsencode(notify_socket)
        else:
            if notify_socket:  # e.g. vsock: (systemd >= 254 in VMs), which we do not speak
                log.debug("ignoring NOTIFY_SOCKET=%s: not a path nor an abstract socket", printable(notify_socket))
            address = None
        watchdog_usec = _positive_int(environ.get("WATCHDOG_USEC"))
        watchdog_pid = environ.get("WATCHDOG_PID")
        if watchdog_pid is not None and _positive_int(watchdog_pid) != os.getpid():
            watchdog_usec = None  # the watchdog is for another process (we were forked or exec'd by it)
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between watchdog pings (half of WatchdogSec, as sd_watchdog_enabled(3) advises), or None."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2 / 1_000_000

    def send(self, *assignments: str) -> None:
        """Send the ``KEY=value`` assignments in one datagram; never raises."""
        if self._address is None:
            return
        datagram = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._socket is None:
                # Non-blocking: a full queue at systemd's end must not stall the event loop (EAGAIN, then dropped).
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            # sendto, not connect: a socket re-created at the same path (systemd re-executed) is still reached.
            self._socket.sendto(datagram, self._address)
        except OSError as error:
            if not self._failure_logged:
                self._failure_logged = True
                log.debug("cannot notify systemd at %r (further failures not logged): %s", self._address, error)

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        self.send("STATUS=" + printable(" ".join(text.splitlines()), STATUS_LIMIT))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        # systemd >= 253 matches the reload to this timestamp for Type=notify-reload; older versions ignore it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def close(self) -> None:
        """Close the socket; the notifier does nothing afterwards."""
        self._address = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Ping the watchdog every ``notifier.watchdog_interval`` seconds while ``healthy()``; run until cancelled.

    Returns at once when there is no watchdog. An unhealthy agent skips its pings so that systemd restarts it."""
    interval = notifier.watchdog_interval
    if interval is None:
        return
    was_healthy = True
    while True:
        is_healthy = healthy()
        if is_healthy:
            notifier.watchdog()
            if not was_healthy:
                log.info("healthy again: watchdog pings resumed")
        elif was_healthy:
            log.warning("not healthy: withholding watchdog pings, systemd will restart fleetprov if this lasts")
        was_healthy = is_healthy
        await asyncio.sleep(interval)
