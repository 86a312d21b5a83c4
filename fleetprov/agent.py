"""`fleetprov --once`: provision if needed (or finish an interrupted run), prove the identity by connecting
with it, and remember how the run ended for `fleetprov status`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fleetprov.atomicio import write_atomic
from fleetprov.claim import device_client_id, provision, verify
from fleetprov.clock import wait_for_plausible_clock
from fleetprov.config import Config
from fleetprov.errors import FleetprovError
from fleetprov.journal import load_journal
from fleetprov.store import Generation, Store, iso_utc

log = logging.getLogger(__name__)

LAST_RUN = "last-run.json"


@dataclass(frozen=True)
class Outcome:
    generation: Generation
    provisioned: bool  # False: an existing identity was verified
    abandoned: tuple[str, ...] = ()  # certificates issued to this device and given up on


async def once(config: Config, environ: Optional[Mapping[str, str]] = None, *, verify_existing: bool = True) -> Outcome:
    """Provision if needed (or finish an interrupted run); an existing identity is verified by connecting with
    it unless ``verify_existing`` is False (the daemon's own connection is that proof)."""
    await wait_for_plausible_clock(config.clock_sync_timeout)
    store = Store(config.state_dir)
    store.ensure()
    with store.lock():
        journal = load_journal(config.state_dir)
        # Inside the lock: a staging directory is a leftover only when no journal names it.
        for note in store.recover(keep=journal.staging if journal else None):
            log.info("recovered: %s", note)
        current = store.current()
        environ = os.environ if environ is None else environ
        if current is not None and journal is None:
            log.info("already provisioned as %s (generation %s)", current.manifest.thing_name, current.number)
            if verify_existing:
                await verify(config, current, device_client_id(config, current.manifest.thing_name), environ)
            return Outcome(current, provisioned=False)
        result = await provision(config, store, environ, journal)
        return Outcome(result.generation, provisioned=True, abandoned=result.abandoned)


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
            write_atomic(state_dir / LAST_RUN, json.dumps(document, indent=2).encode())


def read_last_run(state_dir: Path) -> Optional[dict[str, object]]:
    try:
        document = json.loads((state_dir / LAST_RUN).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
