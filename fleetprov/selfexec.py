"""The command line that runs this fleetprov again, for the child processes it starts itself (`fleetprov
reprovision` from the daemon, the PKCS#11 key process): the same interpreter, and isolated (-I) when this one
is, as the Debian package's launcher runs it, so that a child, too, ignores PYTHONPATH and the working
directory (a writable directory must not be able to put a module named fleetprov in front of ours)."""

from __future__ import annotations

import sys


def python_command(*arguments: str) -> list[str]:
    return [sys.executable, *(["-I"] if sys.flags.isolated else []), *arguments]
