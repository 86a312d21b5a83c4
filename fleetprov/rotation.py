"""Certificate rotation: a new certificate before the current one's not-after, over the permanent connection.

    key (a new one) -> CreateCertificateFromCsr -> check -> RegisterThing (daemon.rotation_template)
    -> stage -> the old connection closes -> verify (connect from staging) -> commit -> hooks

The old identity stays current until the new one has connected; a rotation that fails at any step discards
what it staged and leaves `current` alone (the daemon reconnects with it and tries again later). That holds
for a failure of any kind: an unexpected exception is logged as a bug and raised as RotationBug, a
FleetprovError, never out of the daemon. Rotation is
not journalled: one killed half-way leaves a staging directory that the next start removes, and at most one
certificate that was issued and never used. Only CreateCertificateFromCsr rotates: the key is made on the
device, in a file in the new generation or in the token under a new label (by a child process; see
fleetprov/keys/token_process.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Iterator, Mapping
from typing import Optional

from fleetprov.agent import prune_old
from fleetprov.certcheck import check_certificate
from fleetprov.claim import (
    _parameters,
    _stage_identity,
    device_client_id,
    generation_key_settings,
    pkcs11_settings,
    step,
    verify_identity,
)
from fleetprov.config import Config
from fleetprov.errors import BadServiceData, FleetprovError, printable
from fleetprov.hooks import run_hooks
from fleetprov.journal import Journal
from fleetprov.keys import PreparedKey, prepared
from fleetprov.keys.file import FileKeyBackend
from fleetprov.keys.token_process import prepare_in_child
from fleetprov.provisioning import ProvisioningClient
from fleetprov.session import Session
from fleetprov.store import Generation, Staging, Store, iso_utc, parse_iso_utc

log = logging.getLogger(__name__)

MAX_SPREAD = 86400.0  # seconds: rotation starts up to this much (or a tenth of rotate_before) early, at random
CLOSE_TIMEOUT = 1.0


def rotation_due(config: Config, generation: Generation) -> Optional[float]:
    """When (epoch seconds) ``generation`` should be rotated; None if rotation is off. A little earlier at
    random than configured, so that a fleet provisioned on one day does not rotate in one minute; never
    before half the certificate's life, so that certificates shorter-lived than rotate_before do not make
    the daemon rotate again and again. JITP/JITR identities are not rotated: their certificates come from the
    customer's CA, and a new one reaches the device the way the first one did."""
    before = config.daemon.rotate_before
    if before <= 0 or config.jit is not None:
        return None
    not_after = parse_iso_utc(generation.manifest.not_after).timestamp()
    provisioned = parse_iso_utc(generation.manifest.provisioned_at).timestamp()
    due = not_after - before - random.uniform(0, min(before / 10, MAX_SPREAD))  # noqa: S311 -- spread only
    half_life = provisioned + (not_after - provisioned) / 2
    if due < half_life:
        log.warning(
            "daemon.rotate_before (%g s) is more than half of certificate %s's life: rotating it at half-life, %s",
            before,
            generation.manifest.certificate_id,
            iso_utc(dt.datetime.fromtimestamp(half_life, dt.timezone.utc)),
        )
        return half_life
    return due


def rotation_template(config: Config) -> str:
    return config.daemon.rotation_template or config.required_provisioning().template


class RotationBug(FleetprovError):
    """An unexpected exception in a rotation: a bug in fleetprov, logged for a report. The daemon keeps its
    identity and tries again later, as after a refusal (not transient: the same bug would strike again at
    once); a crash would have systemd restart it into the same rotation, at every restart."""


async def rotate(
    config: Config, store: Store, generation: Generation, session: Session, environ: Mapping[str, str]
) -> Generation:
    """Rotate ``generation``'s certificate over ``session`` (closed on the way: the new identity connects
    with the same client id); the new current generation. Raises only FleetprovError (RotationBug for an
    unexpected exception), with ``current`` unchanged. Once the new generation is committed the rotation has
    happened, whatever pruning and the hooks then do: their failures are logged, never raised."""
    thing = generation.manifest.thing_name
    log.info("rotating the certificate of thing %s (not after %s)", thing, generation.manifest.not_after)
    with _bugs_reported(), store.lock():
        rotated = await _committed(config, store, generation, session, environ)
        await _after_commit("prune", prune_old(config, store, environ))
    log.info(
        "rotated: generation %s (certificate %s, not after %s); generation %s stays for rollback",
        rotated.number,
        rotated.manifest.certificate_id,
        rotated.manifest.not_after,
        generation.number,
    )
    await _after_commit("hooks", run_hooks(config, rotated, environ))
    return rotated


async def _committed(
    config: Config, store: Store, generation: Generation, session: Session, environ: Mapping[str, str]
) -> Generation:
    """The new identity, staged, verified and committed (``store`` locked by the caller); on failure what was
    staged is discarded and the exception raised."""
    staging = store.stage()
    issued: Optional[str] = None
    try:
        key = await _new_key(config, store, generation, staging, environ)
        journal = await _registered(
            config, generation=generation, session=session, staging=staging, key=key, environ=environ
        )
        issued = journal.certificate_id
        identity = _stage_identity(config, journal, staging, environ)
        await session.close(CLOSE_TIMEOUT)
        await verify_identity(config, identity, device_client_id(config, generation.manifest.thing_name))
        with step("commit"):
            return store.commit(staging, publish=True)
    except BaseException:
        staging.discard()
        if issued is not None:
            log.warning("rotation failed: certificate %s, issued to this device, is abandoned", issued)
        raise


@contextlib.contextmanager
def _bugs_reported() -> Iterator[None]:
    """FleetprovError passes; any other exception (cancellation aside) is logged as a bug, one line (its
    traceback at debug level), and raised as RotationBug."""
    try:
        yield
    except FleetprovError:
        raise
    except Exception as exc:
        _log_bug("rotation", exc)
        raise RotationBug(f"unexpected {_described(exc)}: a bug in fleetprov", step="rotation") from exc


async def _after_commit(what: str, action: Awaitable[object]) -> None:
    """``action``, after the commit: what it raises is logged; the new generation stays current."""
    try:
        await action
    except FleetprovError as exc:
        log.error("%s after the rotation failed (the new certificate is current): %s", what, exc)
    except Exception as exc:
        _log_bug(what, exc)


def _log_bug(what: str, exc: Exception) -> None:
    log.error(
        "%s: unexpected %s: a bug in fleetprov, please report it (log_level debug shows its traceback)",
        what,
        _described(exc),
    )
    log.debug("%s: the unexpected exception's traceback", what, exc_info=exc)


def _described(exc: Exception) -> str:
    return f"{type(exc).__name__}: {printable(str(exc), 200)}"


async def _new_key(
    config: Config, store: Store, generation: Generation, staging: Staging, environ: Mapping[str, str]
) -> PreparedKey:
    thing = generation.manifest.thing_name  # a CSR's common name is made from it: keys.csr_common_name
    with step("key"):
        if config.keys.backend != "pkcs11":
            return prepared(FileKeyBackend().create_key(config.required_provisioning().key_type, staging), thing)
        # The number the new generation gets (not current's + 1: after a rollback a newer generation, and its
        # key, may exist); a key under that label is one a failed rotation left: a fresh one replaces it.
        settings = generation_key_settings(pkcs11_settings(config), max(store.generations(), default=0) + 1)
        return await prepare_in_child(settings, config.required_provisioning().key_type, thing, environ, fresh=True)


async def _registered(
    config: Config,
    *,
    generation: Generation,
    session: Session,
    staging: Staging,
    key: PreparedKey,
    environ: Mapping[str, str],
) -> Journal:
    """CreateCertificateFromCsr and RegisterThing over the permanent connection: what to stage, as a journal
    (kept in memory only)."""
    thing = generation.manifest.thing_name
    template = rotation_template(config)
    client = ProvisioningClient(session.protocol_client, config.operation_timeout)
    with step("create-certificate"):
        issued = await client.create_certificate_from_csr(key.csr_pem)
    with step("check-certificate"):
        checked = check_certificate(issued.certificate_pem, key.public_key_der, expected_id=issued.certificate_id)
    log.info("certificate %s issued for the rotation", checked.certificate_id)
    parameters = dict((await _parameters(config, environ, config.required_claim().client_id))[0])
    parameters.setdefault("ThingName", thing)
    with step("register-thing"):
        registration = await client.register_thing(template, issued.ownership_token, parameters)
        if registration.thing_name != thing:
            raise BadServiceData(
                f"the rotation template {template} registered thing {registration.thing_name}, not this device's "
                f"thing {thing}: check that it names the thing by its ThingName parameter"
            )
    log.info("registered the new certificate with thing %s (template %s)", thing, template)
    return Journal(
        staging=staging.path.name,
        method="csr",
        key_type=config.required_provisioning().key_type,
        template=template,
        endpoint=config.endpoint,
        stage="registered",
        certificate_id=checked.certificate_id,
        certificate_pem=checked.certificate_pem,
        not_after=iso_utc(checked.not_after),
        key_reference=key.key_reference,
        thing_name=registration.thing_name,
        device_configuration=dict(registration.device_configuration),
    )
