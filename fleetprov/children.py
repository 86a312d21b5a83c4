"""The programs fleetprov starts: the environment each gets, and how each is run and ended.

A child's environment is built here, in the parent, from an allow-list; it is never the parent's environment
minus a few names (whatever the service manager or an administrator adds to fleetprov's environment, such as
``FLEETPROV_PROXY__PASSWORD``, would otherwise reach every child). Every child gets these of fleetprov's
variables, when set:

    PATH  HOME  USER  LOGNAME  TMPDIR  TZ  LANG  LANGUAGE  LC_*

plus the variables its caller names: hooks their ``FLEETPROV_*`` description of the new identity
(fleetprov/hooks.py), the parameter command nothing more. fleetprov's own children, the PKCS#11 key process
and the daemon's `fleetprov reprovision`, load the PKCS#11 module and also get what modules read to find
their configuration (TOKEN_MODULE_VARIABLES below); `fleetprov reprovision` re-reads the configuration, so it
also gets the ``FLEETPROV_*`` settings, ``STATE_DIRECTORY``, ``JOURNAL_STREAM``, the variables
``provisioning.parameters.from_env`` names and the PIN's source (``keys.pkcs11.pin_env``'s variable or
``CREDENTIALS_DIRECTORY``). No child gets ``NOTIFY_SOCKET`` or ``WATCHDOG_*`` (only fleetprov speaks to
systemd), and no hook or parameter command gets the PIN's variable, ``CREDENTIALS_DIRECTORY`` or any
``FLEETPROV_*`` setting of fleetprov's own.

run_child runs a child in a process group of its own (a new session) with a deadline, without blocking the
event loop (the daemon's watchdog pings and its SIGTERM handler go on while a hook or the key process runs):

- at the deadline the whole group is killed (SIGKILL);
- when the child itself exits, fleetprov does not wait for its pipes to close: whatever the child left
  running in its group is killed then too, so a hook that starts ``sleep 60 &`` neither holds fleetprov nor
  outlives it. A child must not leave processes behind: a hook starts a service with ``systemctl``, not
  with ``&`` (a process that makes a session of its own, as ``setsid`` does, escapes the group);
- when the call is cancelled (the daemon's SIGTERM), the whole group is killed at once (within _EXIT_POLL)
  and the child reaped before CancelledError goes on;
- its output is kept up to OUTPUT_LIMIT bytes per stream (more is read and dropped, so a chatty child never
  blocks on a full pipe), or goes where fleetprov's goes (``capture=False``); ``shown`` turns it into text
  fit for one log line.

The child is watched from a worker thread (asyncio.to_thread), not with asyncio's subprocesses: in CPython
3.11 Process.wait() returns only once the child's pipes have closed (base_subprocess wakes its exit waiters
in _call_connection_lost), so a background process holding them would hold fleetprov; and asyncio's child
watcher reaps the child at once, so its pid, the group's id, could be reused before the group is killed.
The thread waits with waitid(WNOWAIT) and kills the group before it reaps the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Optional

from fleetprov.errors import printable
from fleetprov.keys.pkcs11_settings import CREDENTIALS_DIRECTORY

if TYPE_CHECKING:
    from fleetprov.config import Config

CHILD_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "LANG", "LANGUAGE")
CHILD_PREFIXES = ("LC_",)
# What PKCS#11 modules read to find their configuration and their token: SoftHSM2, OpenSC, YubiHSM, Thales
# Luna, p11-kit, tpm2-pkcs11 and the TPM2 software stack under it.
TOKEN_MODULE_VARIABLES = ("SOFTHSM2_CONF", "OPENSC_CONF", "OPENSC_DRIVER", "YUBIHSM_PKCS11_CONF",
                          "ChrystokiConfigurationPath")  # fmt: skip
TOKEN_MODULE_PREFIXES = ("P11_KIT_", "TPM2_PKCS11_", "TSS2_")

OUTPUT_LIMIT = 64 * 1024  # bytes kept of each of stdout and stderr
SHOWN_LIMIT = 300  # characters of output in one log line
_CHUNK = 16 * 1024
# How often the loop below looks whether the child has exited while its pipes stay open (a background
# process holding them). Polling, not a pidfd: pidfd_open needs Linux 5.3, older than some devices' kernels.
_EXIT_POLL = 0.05


def child_environment(
    parent: Mapping[str, str],
    given: Optional[Mapping[str, str]] = None,
    *,
    passed: Collection[str] = (),
    passed_prefixes: Sequence[str] = (),
) -> dict[str, str]:
    """The environment of a child: the allow-listed variables of ``parent``, those ``passed`` names (or
    starts with ``passed_prefixes``), then ``given``."""
    prefixes = (*CHILD_PREFIXES, *passed_prefixes)
    environment = {
        name: value
        for name, value in parent.items()
        if name in CHILD_VARIABLES or name in passed or name.startswith(prefixes)
    }
    environment.update(given or {})
    return environment


def token_module_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child of fleetprov's own that loads the PKCS#11 module."""
    return child_environment(parent, passed=TOKEN_MODULE_VARIABLES, passed_prefixes=TOKEN_MODULE_PREFIXES)


def reprovision_environment(parent: Mapping[str, str], config: Config) -> dict[str, str]:
    """The environment of the daemon's `fleetprov reprovision`: fleetprov itself, with ``config``, so it gets
    what reading that configuration again and provisioning with it take."""
    from fleetprov.config import ENV_PREFIX  # noqa: PLC0415 -- config imports facts, which imports this module

    names = {"STATE_DIRECTORY", "JOURNAL_STREAM", *TOKEN_MODULE_VARIABLES}
    if config.provisioning is not None:
        names.update(config.provisioning.parameters.from_env.values())
    token = config.keys.pkcs11
    if token is not None and token.pin_env is not None:
        names.add(token.pin_env)
    elif token is not None and token.pin_credential is not None:
        names.add(CREDENTIALS_DIRECTORY)
    return child_environment(parent, passed=names, passed_prefixes=(ENV_PREFIX, *TOKEN_MODULE_PREFIXES))


@dataclass(frozen=True)
class Finished:
    """How a child ended: its exit status (negative: killed by that signal) and the start of its output."""

    status: int
    stdout: bytes
    stderr: bytes
    timed_out: bool  # killed, with its group, at the deadline


async def run_child(
    argv: Sequence[str], environment: Mapping[str, str], timeout: float, *, stdin: bytes = b"", capture: bool = True
) -> Finished:
    """Run ``argv`` with exactly ``environment``, ``stdin`` on its standard input, until it exits or
    ``timeout`` seconds have passed; its output is kept (``capture``) or goes where fleetprov's goes. OSError
    if it cannot be started. Cancelled: the group is killed and the child reaped, then CancelledError."""
    cancelled = threading.Event()
    work = functools.partial(_run, argv, environment, timeout, stdin=stdin, capture=capture, cancelled=cancelled)
    running = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        cancelled.set()
        await asyncio.wait({running})  # the thread kills the group and reaps the child within _EXIT_POLL
        raise


def _run(
    argv: Sequence[str],
    environment: Mapping[str, str],
    timeout: float,
    *,
    stdin: bytes,
    capture: bool,
    cancelled: threading.Event,
) -> Finished:
    """run_child's work, in a worker thread: it ends early, killing the group, once ``cancelled`` is set."""
    output = subprocess.PIPE if capture else None
    process = subprocess.Popen(
        list(argv),
        env=dict(environment),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
    )
    outputs = _Outputs(process)
    try:
        timed_out = not outputs.until_exit(stdin, time.monotonic() + timeout, cancelled)
    finally:
        # The child is not reaped yet (waitid WNOWAIT): its pid, the group's id, cannot have been reused.
        _kill_group(process)
        outputs.drain()
        status = process.wait()
        outputs.close()
    return Finished(status, bytes(outputs.stdout), bytes(outputs.stderr), timed_out)


def shown(output: bytes, limit: int = SHOWN_LIMIT) -> str:
    """A child's output as part of one log line or message: its last ``limit`` characters (errors come
    last), anything not printable escaped."""
    text = output.decode(errors="replace").strip()
    return printable("..." + text[-limit:] if len(text) > limit else text, limit + 3)


class _Outputs:
    """The child's stdout and stderr, read as they come, and its stdin, written as it drains."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._selector = selectors.DefaultSelector()
        pipes = ((process.stdout, self.stdout), (process.stderr, self.stderr))  # None: not captured
        for stream, sink in ((stream, sink) for stream, sink in pipes if stream is not None):
            os.set_blocking(stream.fileno(), False)
            self._selector.register(stream, selectors.EVENT_READ, sink)

    def until_exit(self, stdin: bytes, deadline: float, cancelled: threading.Event) -> bool:
        """Read the output (and write ``stdin``) until the child exits (True), the deadline or ``cancelled``
        (False)."""
        pending = memoryview(stdin)
        if self._process.stdin is not None:
            os.set_blocking(self._process.stdin.fileno(), False)
            self._selector.register(self._process.stdin, selectors.EVENT_WRITE)
        while not _exited(self._process.pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or cancelled.is_set():
                return False
            for key, _ in self._selector.select(min(remaining, _EXIT_POLL)):
                if key.data is None:
                    pending = self._write(key.fileobj, pending)  # type: ignore[arg-type]
                else:
                    self._read(key.fileobj, key.data)  # type: ignore[arg-type]
        return True

    def drain(self) -> None:
        """What is in the pipes now, without waiting for a writer that is still there (a process that left
        the group) to close them."""
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                while len(key.data) < OUTPUT_LIMIT and self._read(key.fileobj, key.data):  # type: ignore[arg-type]
                    pass

    def close(self) -> None:
        self._selector.close()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()

    def _read(self, stream: IO[bytes], sink: bytearray) -> bool:
        """One chunk into ``sink`` (beyond OUTPUT_LIMIT: dropped); False when there is nothing more now."""
        try:
            chunk = os.read(stream.fileno(), _CHUNK)
        except BlockingIOError:
            return False
        if not chunk:
            self._selector.unregister(stream)
            return False
        sink += chunk[: max(0, OUTPUT_LIMIT - len(sink))]
        return True

    def _write(self, stream: IO[bytes], pending: memoryview) -> memoryview:
        try:
            pending = pending[os.write(stream.fileno(), pending[:_CHUNK]) :]
        except BrokenPipeError:  # the child does not read its input: its answer says what happened
            pending = pending[:0]
        if not pending:
            self._selector.unregister(stream)
            stream.close()
        return pending


def _exited(pid: int) -> bool:
    """Whether the child has exited, leaving it unreaped (WNOWAIT)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The child itself too, in case it left its group (setpgid) and is still running.
    for kill, target in ((os.killpg, process.pid), (os.kill, process.pid)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)
