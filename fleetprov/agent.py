"""`fleetprov --once`: provision if needed (or finish an interrupted run), prove the identity by connecting
with it, and remember how the run ended for `fleetprov status`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from fleetprov.atomicio import fsync_dir, write_atomic
from fleetprov.claim import Provisioned, device_client_id, provision, step, verify
from fleetprov.claim_inbox import discard_claim, pending_claim
from fleetprov.clock import wait_for_plausible_clock
from fleetprov.config import Config
from fleetprov.crashpoints import delay_point
from fleetprov.errors import FleetprovError, Refused, UsageError
from fleetprov.jit import enrol
from fleetprov.journal import Journal, load_journal
from fleetprov.keys.pkcs11_uri import URI_SCHEME
from fleetprov.keys.token_process import delete_in_child
from fleetprov.store import Generation, Store, iso_utc

log = logging.getLogger(__name__)

LAST_RUN = "last-run.json"
PRUNED_KEYS = "pruned-keys.json"  # the token keys of removed generations: deleted, or not (and why)
KEEP_GENERATIONS = 2  # current and the one before it


@dataclass(frozen=True)
class Outcome:
    generation: Generation
    provisioned: bool  # False: an existing identity was verified
    abandoned: tuple[str, ...] = ()  # certificates issued to this device and given up on


async def once(
    config: Config,
    environ: Optional[Mapping[str, str]] = None,
    *,
    verify_existing: bool = True,
    report: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """Provision if needed (or finish an interrupted run); an existing identity is verified by connecting with
    it unless ``verify_existing`` is False (the daemon's own connection is that proof). ``report`` hears what a
    long wait is waiting for (the daemon puts it in STATUS=)."""
    await wait_for_plausible_clock(config.clock_sync_timeout)
    async with _recovered(config) as (store, journal):
        current = store.current()
        environ = os.environ if environ is None else environ
        if current is not None and journal is None:
            log.info("already provisioned as %s (generation %s)", current.manifest.thing_name, current.number)
            if verify_existing:
                await verify(config, current, device_client_id(config, current.manifest.thing_name), environ)
            return Outcome(current, provisioned=False)
        if config.jit is not None:
            return Outcome(await enrol(config, store, environ, report), provisioned=True)
        result = await _provision(config, store, environ, journal)
        await prune_old(config, store, environ)
    _remove_claim_key(config)
    return Outcome(result.generation, provisioned=True, abandoned=result.abandoned)


class WaitingForClaim(FleetprovError):
    """Fleet provisioning by trusted user, and no temporary claim in the inbox (yet): try again later."""

    transient = True


async def _provision(
    config: Config, store: Store, environ: Mapping[str, str], journal: Optional[Journal]
) -> Provisioned:
    """Provision by claim: the configured one, or the temporary claim a trusted user left in claim.inbox
    (used once: removed after success, after a refusal and when it has expired)."""
    inbox = config.required_claim().inbox
    if inbox is None:
        return await provision(config, store, environ, journal)
    pending = pending_claim(inbox, now=dt.datetime.now(dt.timezone.utc))  # ExpiredClaim: it is removed
    if pending is None:
        raise WaitingForClaim(
            f"no temporary claim in {inbox}: a trusted user installs one with `fleetprov claim install`",
            step="claim",
        )
    log.info("provisioning with the temporary claim %s (valid until %s)", pending.certificate_id[:12],
             iso_utc(pending.not_after))  # fmt: skip
    # The claim's own directory, not the `pending` link: a claim installed meanwhile must not mix with this one.
    claim = replace(config.required_claim(), certificate=pending.certificate, private_key=pending.private_key)
    try:
        result = await provision(replace(config, claim=claim), store, environ, journal)
    except FleetprovError as exc:
        if not exc.transient:
            discard_claim(inbox, pending)
            log.info("removed the temporary claim %s: it was refused", pending.certificate_id[:12])
        raise
    discard_claim(inbox, pending)
    return result


async def reprovision(config: Config, environ: Optional[Mapping[str, str]] = None) -> Outcome:
    """Provision anew with the claim although there is a current identity (its certificate is refused, or an
    operator asked for it); the old generation stays for `fleetprov rollback`. An interrupted run is finished."""
    delay_point("reprovision")  # test-only: a slow `fleetprov reprovision` child of the daemon
    await wait_for_plausible_clock(config.clock_sync_timeout)
    async with _recovered(config) as (store, journal):
        current = store.current()
        if current is not None and journal is None:
            if config.jit is not None:
                raise Refused(
                    "cannot provision anew: a JITP/JITR device has only the certificate from your CA, and it was "
                    f"refused (certificate {current.manifest.certificate_id}): activate it again, or give the "
                    "device a new one",
                    step="claim",
                )
            claim = config.required_claim()
            if claim.inbox is None and claim.private_key is not None and not claim.private_key.exists():
                raise Refused(
                    f"cannot provision anew: the claim key {claim.private_key} is gone"
                    + (" (claim.remove_after_success)" if claim.remove_after_success else ""),
                    step="claim",
                )
            log.warning(
                "provisioning anew with the claim; generation %s (thing %s, certificate %s) stays for rollback",
                current.number,
                current.manifest.thing_name,
                current.manifest.certificate_id,
            )
        environ = os.environ if environ is None else environ
        result = await _provision(config, store, environ, journal)
        await prune_old(config, store, environ)
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


async def prune_old(config: Config, store: Store, environ: Mapping[str, str]) -> list[int]:
    """Keep the current generation and the one before it (for `fleetprov rollback`); best effort. The token
    keys of the generations removed go too (PRUNED_KEYS says which went and which could not)."""
    before = _token_keys_of(store, store.generations())
    try:
        pruned = store.prune(keep=KEEP_GENERATIONS)
    except FleetprovError as exc:
        log.warning("could not remove old generations: %s", exc.message)
        return []
    if pruned:
        log.info("removed old generations %s", ", ".join(map(str, pruned)))
    # A key that a kept generation (or the claim) still uses stays: generations provisioned before each got a
    # key of its own share one.
    still_used = {*_token_keys_of(store, store.generations()).values()}
    if config.claim is not None and config.claim.private_key_uri is not None:
        still_used.add(str(config.claim.private_key_uri))
    doomed = {before[number] for number in pruned if number in before} - still_used
    left_over = {str(entry["key"]) for entry in _not_deleted(store.state_dir)} - still_used
    if doomed or left_over:
        await _delete_token_keys(config, store.state_dir, sorted(doomed | left_over), environ)
    return pruned


def _token_keys_of(store: Store, numbers: list[int]) -> dict[int, str]:
    """The token key each of these generations uses (those whose manifest can be read)."""
    keys = {}
    for number in numbers:
        with contextlib.suppress(FleetprovError):
            reference = store.load(number).manifest.key_reference
            if reference.startswith(URI_SCHEME):
                keys[number] = reference
    return keys


async def _delete_token_keys(
    config: Config, state_dir: Path, references: list[str], environ: Mapping[str, str]
) -> None:
    """Delete ``references`` from the token (by the key process: awscrt may have loaded the module here), and
    say in PRUNED_KEYS which went and which could not (those are tried again at the next prune)."""
    settings = config.keys.pkcs11
    outcome: dict[str, Optional[str]]
    if settings is None:
        outcome = dict.fromkeys(references, "keys.pkcs11 is not configured")
    else:
        try:
            outcome = await delete_in_child(settings, references, environ)
        except FleetprovError as exc:
            outcome = dict.fromkeys(references, exc.message)
    deleted = [reference for reference, why in outcome.items() if why is None]
    failed = [{"key": reference, "error": why} for reference, why in outcome.items() if why is not None]
    if deleted:
        log.info("deleted the token keys of removed generations: %s", ", ".join(deleted))
    for entry in failed:
        log.warning("could not delete the token key %s of a removed generation: %s", entry["key"], entry["error"])
    document = {"updated_at": iso_utc(dt.datetime.now(dt.timezone.utc)), "deleted": deleted, "not_deleted": failed}
    try:
        write_atomic(state_dir / PRUNED_KEYS, json.dumps(document, indent=2).encode(), mode=0o600)
    except (FleetprovError, OSError) as exc:  # a status file must never stop the real work
        log.warning("cannot write %s: %s", state_dir / PRUNED_KEYS, exc)


def read_token_keys(state_dir: Path) -> Optional[dict[str, object]]:
    """The token keys of removed generations: the last ones deleted and those that could not be, for `status`."""
    try:
        document = json.loads((state_dir / PRUNED_KEYS).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _not_deleted(state_dir: Path) -> list[dict[str, object]]:
    entries = (read_token_keys(state_dir) or {}).get("not_deleted")
    if not isinstance(entries, list):
        return []
    return [entry for entry in entries if isinstance(entry, dict) and "key" in entry]


def _remove_claim_key(config: Config) -> None:
    """claim.remove_after_success: the claim key goes once an identity is committed (best effort, logged)."""
    if config.claim is None or not config.claim.remove_after_success or config.claim.private_key is None:
        return
    key = config.claim.private_key
    try:
        key.unlink(missing_ok=True)
        fsync_dir(key.parent)  # gone for good: a power cut must not bring the key back
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
