"""`fleetprov run`: the long-running agent (fleetprov.service).

    provision if needed (as --once does) -> connect with the permanent identity -> READY=1 -> hold it
    -> lost? reconnect after a jittered, growing delay -> ... until SIGTERM (STOPPING=1, exit 0)
    -> due for rotation? rotate the certificate over the connection (fleetprov/rotation.py), hold the new one
    -> refused daemon.reprovision_after times in a row (revoked, deactivated, deleted, expired)? run
       `fleetprov reprovision` (a child process: it may use the PKCS#11 module, which awscrt holds here), then
       hold the new identity; the old generation stays for `fleetprov rollback`

SIGHUP re-reads the configuration (a bad file is logged and the old configuration kept) and reconnects with
the new one. sd_notify tells systemd what is going on: READY=1 once connected with the permanent identity,
STATUS= the current step in words, WATCHDOG=1 while the event loop is alive. Nothing holds the event loop up:
every child the daemon starts (the hooks, the parameter command, the PKCS#11 key process, `fleetprov
reprovision`) runs within a bound without blocking it (fleetprov/children.py), so the watchdog pings go on
while a child runs, and SIGTERM is answered (exit 0) within 2 s whatever a child is doing: the child is
killed with its process group. A transient failure (the endpoint down, throttling) is waited out here
instead of exiting; a permanent one (refused, bad configuration) exits with its code, and fleetprov.service's
RestartPreventExitStatus keeps it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Callable, Optional, TypeVar, Union

from fleetprov.agent import WaitingForClaim, once, record_last_run, store_of
from fleetprov.children import reprovision_environment, run_child
from fleetprov.claim import device_client_id, device_identity, endpoint_of
from fleetprov.claim_inbox import PENDING, ExpiredClaim
from fleetprov.config import Config
from fleetprov.errors import EX_DATAERR, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, FleetprovError, Refused, StorageError
from fleetprov.rotation import rotate, rotation_due
from fleetprov.sdnotify import Notifier, watchdog_loop
from fleetprov.session import Session, connect
from fleetprov.store import Generation, parse_iso_utc

log = logging.getLogger(__name__)

T = TypeVar("T")
SHUTDOWN_TIMEOUT = 1.0  # seconds for closing the connection on SIGTERM: systemd gets its answer within 2 s
LOST_CLOSE_TIMEOUT = 0.1  # seconds to wait for the disconnect of a connection that is already lost
ROTATION_RETRY_AFTER_REFUSAL = 3600.0  # seconds: a rotation the service refused is tried again this much later
WAKE_UP = 3600.0  # seconds: while connected, the rotation time is looked at again at least this often
INBOX_POLL = 1.0  # seconds between looks into claim.inbox while waiting for a temporary claim
TRANSIENT_EXITS = (EX_TEMPFAIL, EX_UNAVAILABLE, EX_DATAERR)  # of `fleetprov reprovision`: try again later
# Seconds: far more than a `fleetprov reprovision` takes (a clock wait of clock_sync_timeout, two retry.budget
# phases, the key process and the hooks, with the defaults); one still running then is stuck, killed, and
# tried again later.
REPROVISION_TIMEOUT = 3600.0


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: leave whatever is going on."""


class NewIdentityNeeded(Exception):
    """The permanent certificate was refused daemon.reprovision_after times in a row."""


class ReprovisionFailed(FleetprovError):
    """`fleetprov reprovision` failed for good; the daemon exits with its exit status."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"provisioning anew failed with exit status {exit_code} (its log says why)", step="claim")
        self.exit_code = exit_code


class _Rotate:
    """What waiting on a connection returns when the certificate is due for rotation."""


ROTATE = _Rotate()


class Daemon:
    def __init__(self, load: Callable[[], Config], environ: Mapping[str, str], reprovision: Sequence[str]) -> None:
        self._load = load
        self._environ = environ
        self._reprovision_command = tuple(reprovision)  # argv of `fleetprov reprovision` with this configuration
        self._notifier = Notifier.from_environ(environ)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._failures = 0  # connection attempts that failed in a row (for the backoff)
        self._rotation_failures = 0
        self._rotation_refused = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        watchdog = asyncio.create_task(watchdog_loop(self._notifier, lambda: True))
        config = self._load()
        try:
            while True:
                generation = await self._until_stopped(self._identity(config))
                try:
                    await self._hold(config, generation)
                except NewIdentityNeeded as why:
                    await self._provision_anew(config, str(why))
                if self._reload.is_set():
                    config = self._reloaded(config)
        except Stopped:
            log.info("stopping")
            return EX_OK
        finally:
            self._notifier.stopping()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            self._notifier.close()

    async def _identity(self, config: Config) -> Generation:
        """The permanent identity: provisioned now, or the one there is; transient failures are waited out."""
        while True:
            self._notifier.status("provisioning: getting this device's identity")
            try:
                outcome = await once(config, self._environ, verify_existing=False, report=self._notifier.status)
            except FleetprovError as exc:
                record_last_run(config.state_dir, exc.exit_code, exc)
                if not exc.transient:
                    raise
                if isinstance(exc, (WaitingForClaim, ExpiredClaim)):
                    await self._until_claim_arrives(config, exc)
                else:
                    await self._pause(config, f"provisioning failed ({exc}); trying again")
                continue
            if outcome.provisioned:
                record_last_run(config.state_dir, EX_OK, None, outcome.abandoned)
            return outcome.generation

    async def _hold(self, config: Config, generation: Generation) -> None:
        """Stay connected with ``generation`` until SIGHUP or a rotation (returns), SIGTERM (Stopped) or too
        many refusals (NewIdentityNeeded)."""
        thing = generation.manifest.thing_name
        client_id = device_client_id(config, thing)
        key_file = generation.private_key or generation.path / "private.key"
        identity = device_identity(
            config, generation.certificate, generation.manifest.key_reference, key_file, self._environ
        )
        refusals = 0
        due = rotation_due(config, generation)
        while not self._reload.is_set():
            _still_there(config, generation)
            self._notifier.status(f"connecting to {config.endpoint}:{config.port} as {client_id}")
            try:
                session = await self._until_stopped(connect(endpoint_of(config), identity, client_id))
            except FleetprovError as exc:
                if _refused(exc, generation):
                    refusals += 1
                    self._count_refusal(config, generation, exc, refusals)
                elif not exc.transient:
                    raise
                await self._pause(config, f"cannot connect ({exc.message})")
                continue
            self._failures = refusals = 0
            log.info("connected to %s:%s as %s (thing %s)", config.endpoint, config.port, client_id, thing)
            # One datagram: systemd sees the service ready and why at the same moment.
            self._notifier.send(
                "READY=1", f"STATUS=connected as {client_id} (thing {thing}, generation {generation.number})"
            )
            try:
                why = await self._until_stopped(self._until_reload(_while_connected(session, due)))
                if why is ROTATE:
                    if await self._rotated(config, generation, session):
                        return
                    due = self._next_rotation()
                    continue  # the failed rotation closed the connection: connect again with the old identity
            except Stopped:
                await session.close(SHUTDOWN_TIMEOUT)
                raise
            if why is None:  # SIGHUP: a clean disconnect, then connect with the new configuration
                await session.close(config.operation_timeout)
                continue
            log.warning("connection lost: %s", why)
            # Nothing to flush. awscrt completes the disconnect of a connection it is reconnecting only at its
            # next attempt (seconds later); the request is what matters, so the wait is short.
            await session.close(LOST_CLOSE_TIMEOUT)
            await self._pause(config, f"connection lost ({why})")

    def _count_refusal(self, config: Config, generation: Generation, exc: FleetprovError, refusals: int) -> None:
        """Count one refusal of the permanent certificate; NewIdentityNeeded (or exc) once there are enough."""
        limit = config.daemon.reprovision_after
        if limit == 0:
            raise exc
        what = f"certificate {generation.manifest.certificate_id} refused ({refusals} of {limit}): {exc.message}"
        if refusals >= limit:
            raise NewIdentityNeeded(what)
        log.warning("%s", what)

    async def _rotated(self, config: Config, generation: Generation, session: Session) -> bool:
        """Rotate over ``session``; True once the new generation is current. On failure the session is
        closed and the next attempt scheduled (_next_rotation)."""
        self._notifier.status(f"rotating the certificate of thing {generation.manifest.thing_name}")
        try:
            await self._until_stopped(rotate(config, store_of(config), generation, session, self._environ))
        except FleetprovError as exc:
            await session.close(SHUTDOWN_TIMEOUT)
            self._rotation_failures += 1
            self._rotation_refused = not exc.transient
            log.error("rotation failed, generation %s stays current: %s", generation.number, exc)
            return False
        self._rotation_failures = 0
        return True

    def _next_rotation(self) -> float:
        """When to try a failed rotation again: soon after a transient failure (growing, jittered), an hour
        after a refusal (the template, the policy or a hook needs fixing first)."""
        cap = min(ROTATION_RETRY_AFTER_REFUSAL, 2.0 ** min(self._rotation_failures, 12))
        delay = ROTATION_RETRY_AFTER_REFUSAL if self._rotation_refused else random.uniform(cap / 2, cap)  # noqa: S311
        log.warning("next rotation attempt in %.0f s", delay)
        return time.time() + delay

    async def _provision_anew(self, config: Config, why: str) -> None:
        """`fleetprov reprovision` in a child process until it succeeds; transient failures are waited out."""
        log.warning("%s: provisioning anew with the claim", why)
        while True:
            self._notifier.status(f"provisioning anew with the claim: {why}")
            environment = reprovision_environment(self._environ, config)
            code = await self._until_stopped(_reprovision_child(self._reprovision_command, environment))
            if code == EX_OK:
                self._failures = 0
                return
            if code not in TRANSIENT_EXITS:
                raise ReprovisionFailed(code)
            await self._pause(config, f"provisioning anew failed (exit status {code})")

    async def _until_claim_arrives(self, config: Config, why: FleetprovError) -> None:
        """Trusted user: watch the inbox (a temporary claim lives 5 minutes; provisioning starts at once)."""
        inbox = config.required_claim().inbox
        log.warning("%s", why.message)
        self._notifier.status(f"waiting for a temporary claim in {inbox} (fleetprov claim install)")
        while inbox is not None and not (inbox / PENDING).exists():
            await self._until_stopped(asyncio.sleep(INBOX_POLL))
        log.info("a temporary claim arrived in %s", inbox)

    async def _pause(self, config: Config, what: str) -> None:
        """Wait a full-jitter exponential delay before the next attempt (cut short by SIGHUP)."""
        self._failures += 1
        cap = min(config.daemon.reconnect_max_delay, config.daemon.reconnect_initial_delay * 2 ** (self._failures - 1))
        delay = random.uniform(0, cap)  # noqa: S311 -- jitter, not cryptography
        log.warning("%s: next attempt in %.2f s", what, delay)
        self._notifier.status(f"{what}: next attempt in {delay:.2g} s")
        if self._stop.is_set():  # before making the coroutine below, which would otherwise never be awaited
            raise Stopped
        with contextlib.suppress(asyncio.TimeoutError):
            await self._until_stopped(asyncio.wait_for(self._reload.wait(), delay))

    def _reloaded(self, config: Config) -> Config:
        self._reload.clear()
        self._notifier.reloading()
        try:
            fresh = self._load()
        except FleetprovError as exc:
            log.error("reload: keeping the configuration in use: %s", exc)
            return config
        logging.getLogger().setLevel(fresh.log_level.upper())
        log.info("reload: configuration re-read")
        return fresh

    async def _until_reload(self, waiting: Awaitable[T]) -> Optional[T]:
        """``waiting``'s result, or None if SIGHUP comes first."""
        return await _first(waiting, self._reload)

    async def _until_stopped(self, waiting: Awaitable[T]) -> T:
        """``waiting``'s result; Stopped (``waiting`` cancelled) if SIGTERM comes first."""
        if self._stop.is_set():
            _discard(waiting)
            raise Stopped
        result = await _first(waiting, self._stop)
        if self._stop.is_set():
            raise Stopped
        return result  # type: ignore[return-value]  # None only when the stop event won


def _still_there(config: Config, generation: Generation) -> None:
    """The identity's files, before each connection. A state directory deleted under the running agent is a
    storage failure (exit 73): the restart systemd then makes starts from scratch, as a first boot does.
    While connected nothing is read: the connection goes on with what it loaded."""
    if not generation.certificate.is_file():
        raise StorageError(
            f"{generation.certificate} has gone (was {config.state_dir} deleted?): cannot reconnect", step="connect"
        )


def _refused(exc: FleetprovError, generation: Generation) -> bool:
    """Whether a failed connection means the certificate is no good: refused at CONNECT (AWS IoT refuses a
    REVOKED, INACTIVE or deleted certificate), or the certificate has expired (the TLS handshake fails)."""
    if isinstance(exc, Refused):
        return True
    return time.time() > parse_iso_utc(generation.manifest.not_after).timestamp()


async def _while_connected(session: Session, due: Optional[float]) -> Union[str, _Rotate]:
    """Why the connection was lost, or ROTATE once ``due`` (epoch seconds) has come. The wall clock is looked
    at again at least hourly: it may be set while the daemon waits."""
    while True:
        wait = None if due is None else min(WAKE_UP, max(0.0, due - time.time()))
        if wait == 0.0:
            return ROTATE
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(session.lost.wait(), wait)


async def _reprovision_child(argv: Sequence[str], environment: Mapping[str, str]) -> int:
    """Run `fleetprov reprovision` (``argv``; its output goes where ours goes) and return its exit status:
    EX_TEMPFAIL when it cannot start or is killed at REPROVISION_TIMEOUT. SIGTERM meanwhile (cancelled) kills
    it with its process group: an interrupted run resumes from its journal at the next start."""
    try:
        done = await run_child(argv, environment, REPROVISION_TIMEOUT, capture=False)
    except OSError as exc:
        log.error("cannot start `fleetprov reprovision`: %s", exc.strerror or exc)
        return EX_TEMPFAIL
    if done.timed_out:
        log.error("`fleetprov reprovision` killed after %g s", REPROVISION_TIMEOUT)
        return EX_TEMPFAIL
    return done.status


async def _first(waiting: Awaitable[T], event: asyncio.Event) -> Optional[T]:
    task = asyncio.ensure_future(waiting)
    signalled = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({task, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
    if task in done:
        return task.result()
    task.cancel()
    # Bounded: a step being cancelled closes its connection; SIGTERM must still be answered within 2 s.
    await asyncio.wait({task}, timeout=SHUTDOWN_TIMEOUT)
    return None


def _discard(waiting: Awaitable[object]) -> None:
    if asyncio.iscoroutine(waiting):
        waiting.close()


async def run(load: Callable[[], Config], environ: Mapping[str, str], reprovision: Sequence[str]) -> int:
    return await Daemon(load, environ, reprovision).run()
