"""The one exception tree of fleetprov.

Every error knows the step it happened in, the exit code the CLI turns it into
(sysexits, see README.md "Exit codes") and whether retrying may help.
"""

from __future__ import annotations

# sysexits(3) codes used by the CLI and by fleetprov.service's RestartPreventExitStatus.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


def printable(text: str, limit: int = 120) -> str:
    """``text`` made safe for a one-line message: anything not printable (line breaks, ESC, lone surrogates)
    escaped as in Python source, and text longer than ``limit`` cut with "..."."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in shown)


class FleetprovError(Exception):
    """Root of every error fleetprov raises on purpose."""

    exit_code: int = EX_TEMPFAIL
    transient: bool = False

    def __init__(self, message: str, *, step: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.step = step

    def __str__(self) -> str:
        return f"{self.step}: {self.message}" if self.step else self.message


class UsageError(FleetprovError):
    exit_code = EX_USAGE


class ConfigError(FleetprovError):
    """Bad configuration: names the key and the file."""

    exit_code = EX_CONFIG


class StorageError(FleetprovError):
    """Cannot write (or read back) files we own."""

    exit_code = EX_CANTCREAT


class EndpointUnavailable(FleetprovError):
    exit_code = EX_UNAVAILABLE
    transient = True


class BadServiceData(FleetprovError):
    """The service (or a file it produced) sent something we cannot use."""

    exit_code = EX_DATAERR
    transient = True


class Refused(FleetprovError):
    """The service, a hook or a policy said no: retrying will not help."""

    exit_code = EX_NOPERM


class EmulatorError(FleetprovError):
    """Base for errors raised by the local AWS IoT emulator."""

    exit_code = EX_CONFIG
