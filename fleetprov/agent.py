"""`fleetprov --once`: provision if needed (or finish an interrupted run), prove the identity by connecting
with it, and remember how the run ended for `fleetprov status`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fleetprov.atomicio import write_atomic
from fleetprov.claim import device_client_id, provision, step, verify
from fleetprov.clock import wait_for_plausible_clock
from fleetprov.config import Config
from fleetprov.errors import FleetprovError, Refused, UsageError
from fleetprov.journal import Journal, load_journal
from fleetprov.store import Generation, Store, iso_utc

log = logging.getLogger(__name__)

LAST_RUN = "last-run.json"
KEEP_GENERATIONS = 2  # current and the one before it


@dataclass(frozen=True)
class Outcome:
    generation: Generation
    provisioned: bool  # False: an existing identity was verified
    abandoned: tuple[str, ...] = ()  # certificates issued to this device and given up on


async def once(config: Config, environ: Optional[Mapping[str, str]] = None, *, verify_existing: bool = True) -> Outcome:
    """Provision if needed (or finish an interrupted run); an existing identity is verified by connecting with
    it unless ``verify_existing`` is False (the daemon's own connection is that proof)."""
    await wait_for_plausible_clock(config.clock_sync_timeout)
    async with _recovered(config) as (store, journal):
        current = store.current()
        environ = os.environ if environ is None else environ
        if current is not None and journal is None:
            log.info("already provisioned as %s (generation %s)", current.manifest.thing_name, current.number)
            if verify_existing:
                await verify(config, current, device_client_id(config, current.manifest.thing_name), environ)
            return Outcome(current, provisioned=False)
        result = await provision(config, store, environ, journal)
        prune_old(store)
    _remove_claim_key(config)
    return Outcome(result.generation, provisioned=True, abandoned=result.abandoned)


async def reprovision(config: Config, environ: Optional[Mapping[str, str]] = None) -> Outcome:
    """Provision anew with the claim although there is a current identity (its certificate is refused, or an
    operator asked for it); the old generation stays for `fleetprov rollback`. An interrupted run is finished."""
    await wait_for_plausible_clock(config.clock_sync_timeout)
    async with _recovered(config) as (store, journal):
        current = store.current()
        if current is not None and journal is None:
            if config.claim.private_key is not None and not config.claim.private_key.exists():
                raise Refused(
                    f"cannot provision anew: the claim key {config.claim.private_key} is gone"
                    + (" (claim.remove_after_success)" if config.claim.remove_after_success else ""),
                    step="claim",
                )
            log.warning(
                "provisioning anew with the claim; generation %s (thing %s, certificate %s) stays for rollback",
                current.number,
                current.manifest.thing_name,
                current.manifest.certificate_id,
            )
        result = await provision(config, store, os.environ if environ is None else environ, journal)
        prune_old(store)
    _remove_claim_key(config)
    return Outcome(result.generation, provisioned=True, abandoned=result.abandoned)


def store_of(config: Config) -> Store:
    return Store(config.state_dir, share_with_group=config.share_with_group)


@contextlib.asynccontextmanager
async def _recovered(config: Config) -> AsyncIterator[tuple[Store, Optional[Journal]]]:
    """The state directory, locked, with what an interrupted run left behind cleaned up, and its journal."""
    store = store_of(config)
    store.ensure()
    with store.lock():
        journal = load_journal(config.state_dir)
        # Inside the lock: a staging directory is a leftover only when no journal names it.
        for note in store.recover(keep=journal.staging if journal else None):
            log.info("recovered: %s", note)
        yield store, journal


def rollback(config: Config) -> tuple[Generation, Generation]:
    """Point ``current`` at the generation before it (kept by re-provisioning and rotation); (from, to)."""
    store = store_of(config)
    with store.lock():
        current = store.current()
        if current is None:
            raise UsageError(f"nothing to roll back: {config.state_dir} holds no identity", step="rollback")
        older = [number for number in store.generations() if number < current.number]
        if not older:
            raise UsageError(f"generation {current.number} is the oldest there is: nothing to roll back to",
                             step="rollback")  # fmt: skip
        previous = store.load(older[-1])
        with step("rollback"):
            store.switch_to(previous)
    log.warning("rolled back from generation %s to %s", current.number, previous.number)
    return current, previous


def prune_old(store: Store) -> list[int]:
    """Keep the current generation and the one before it (for `fleetprov rollback`); best effort."""
    try:
        pruned = store.prune(keep=KEEP_GENERATIONS)
    except FleetprovError as exc:
        log.warning("could not remove old generations: %s", exc.message)
        return []
    if pruned:
        log.info("removed old generations %s", ", ".join(map(str, pruned)))
    return pruned


def _remove_claim_key(config: Config) -> None:
    """claim.remove_after_success: the claim key goes once an identity is committed (best effort, logged)."""
    key = config.claim.private_key
    if not config.claim.remove_after_success or key is None:
        return
    try:
        key.unlink(missing_ok=True)
    except OSError as exc:
        log.error("claim.remove_after_success: cannot remove the claim key %s: %s", key, exc.strerror)
        return
    log.info("removed the claim key %s (claim.remove_after_success)", key)


def record_last_run(
    state_dir: Path, exit_code: int, error: Optional[FleetprovError], abandoned: tuple[str, ...] = ()
) -> None:
    """Remember how the last run ended, for `fleetprov status` (best effort: never masks the real error)."""
    document = {
        "finished_at": iso_utc(dt.datetime.now(dt.timezone.utc)),
        "exit_code": exit_code,
        "step": error.step if error else None,
        "error": error.message if error else None,
        "abandoned_certificates": list(abandoned) or None,
    }
    with contextlib.suppress(FleetprovError, OSError):
        if state_dir.is_dir():
            write_atomic(state_dir / LAST_RUN, json.dumps(document, indent=2).encode(), mode=0o600)


def read_last_run(state_dir: Path) -> Optional[dict[str, object]]:
    try:
        document = json.loads((state_dir / LAST_RUN).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
