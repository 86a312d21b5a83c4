"""What every fleetprov process does first: it stops being dumpable and stops dumping core.

Not dumpable (prctl PR_SET_DUMPABLE 0): processes of the same user, such as a hook, the parameter command or
anything else running as fleetprov's user, can no longer read its /proc/<pid>/environ, mem, maps or fds, nor
ptrace it; only root (CAP_SYS_PTRACE) can. No core file (RLIMIT_CORE 0, the hard limit too, so the children
inherit it): a crash never writes the PIN, the proxy password or a key to disk.

The kernel makes each new program dumpable again at execve, so every entry point calls harden_process itself
before it reads anything secret: fleetprov.cli.main (the ``fleetprov`` command), fleetprov/__main__.py
(``python -m fleetprov``, as the daemon starts ``fleetprov reprovision``: before it imports the rest) and the
PKCS#11 key process (fleetprov.keys.token_process, before it reads the PIN from its stdin). What is left: from
execve to that call, the interpreter's start-up, a process of the same user could read the new process's
/proc/<pid>/environ; that is where ``fleetprov reprovision`` has the PIN's variable (keys.pkcs11.pin_env).
"""

from __future__ import annotations

import ctypes
import os
import resource

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def harden_process() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(error)}")
