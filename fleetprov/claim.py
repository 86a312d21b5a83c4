"""Fleet provisioning by claim: the credential-critical path, readable in one sitting.

    parameters -> key -> connect (claim) -> create-certificate -> check-certificate -> register-thing
    -> store (a new generation) -> verify (connect with the new identity) -> current

Write before you talk: each step's result is in the journal (fleetprov/journal.py) before the next network
call, so a run that was killed resumes where it stopped. RegisterThing is retried with the saved ownership
token while the token is valid; past that the certificate is abandoned (recorded, and reported by
`fleetprov status`) and the run starts over with a new one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetprov.certcheck import check_certificate
from fleetprov.config import Config
from fleetprov.crashpoints import crash_point
from fleetprov.errors import EX_TEMPFAIL, BadServiceData, ConfigError, FleetprovError, Refused
from fleetprov.facts import default_claim_client_id, read_facts, template_parameters
from fleetprov.journal import TOKEN_LIFETIME, Journal, clear_journal, save_journal
from fleetprov.keys import DeviceKey
from fleetprov.keys.file import FileKeyBackend, public_key_der
from fleetprov.provisioning import ProvisioningClient, ServiceRejected
from fleetprov.retry import retrying
from fleetprov.session import Endpoint, Identity, connect, open_session
from fleetprov.store import KEY_FILE_REFERENCE, Generation, Manifest, Staging, Store, iso_utc

log = logging.getLogger(__name__)

MAX_FRESH_STARTS = 3  # certificates one run may abandon before it gives up


@dataclass(frozen=True)
class Provisioned:
    generation: Generation
    abandoned: tuple[str, ...]  # certificate ids issued to this device and given up on


class TokenAbandoned(FleetprovError):
    """The ownership token can no longer be used: start over with a new certificate."""


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Log one step: `name: ok (0.12 s)` or `name: failed after 0.12 s: why`; errors learn their step."""
    started = time.monotonic()
    try:
        yield
    except FleetprovError as exc:
        exc.step = exc.step or name
        log.error("%s: failed after %.2f s: %s", name, time.monotonic() - started, exc.message)
        raise
    log.info("%s: ok (%.2f s)", name, time.monotonic() - started)


def endpoint_of(config: Config) -> Endpoint:
    return Endpoint(
        host=config.endpoint,
        port=config.port,
        root_ca=config.root_ca,
        mqtt_version=config.mqtt_version,
        keep_alive=config.keep_alive,
        timeout=config.operation_timeout,
        proxy=config.proxy,
    )


def token_fingerprint(token: str) -> str:
    """What the logs may say about an ownership token: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def device_client_id(config: Config, thing_name: str) -> str:
    return config.device_client_id or thing_name


# -- before anything goes on the network ---------------------------------------------------------------


def _check_readable_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file", step="claim")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable by this user", step="claim")


def check_claim_files(config: Config) -> None:
    _check_readable_file(config.root_ca, "root CA")
    _check_readable_file(config.claim.certificate, "claim certificate")
    _check_readable_file(config.claim.private_key, "claim private key")
    mode = stat.S_IMODE(config.claim.private_key.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"claim private key {config.claim.private_key} is readable by others (mode {mode:04o}): "
            f"run 'chmod 600 {config.claim.private_key}'",
            step="claim",
        )


def _parameters(
    config: Config, environ: Mapping[str, str], claim_client_id: Optional[str]
) -> tuple[dict[str, str], str]:
    facts = read_facts()
    wanted = config.provisioning.parameters
    with step("parameters"):
        parameters = template_parameters(
            wanted.static,
            wanted.from_env,
            wanted.facts,
            wanted.command,
            wanted.command_timeout,
            environ=environ,
            facts=facts,
        )
    return parameters, claim_client_id or default_claim_client_id(facts)


# -- the journal's stages -----------------------------------------------------------------------------


def _start(config: Config, store: Store, abandoned: tuple[str, ...]) -> tuple[Journal, Staging]:
    staging = store.stage()
    journal = Journal(
        staging=staging.path.name,
        method=config.provisioning.method,
        key_type=config.provisioning.key_type,
        template=config.provisioning.template,
        endpoint=config.endpoint,
        abandoned=abandoned,
    )
    save_journal(store.state_dir, journal)
    crash_point("after-start")
    return journal, staging


def _abandon(journal: Journal) -> tuple[str, ...]:
    if journal.certificate_id and journal.stage in ("issued", "registered"):
        log.warning("abandoning certificate %s (issued to this device, never used)", journal.certificate_id)
        return (*journal.abandoned, journal.certificate_id)
    return journal.abandoned


def _resume_or_start(config: Config, store: Store, journal: Optional[Journal]) -> tuple[Journal, Optional[Staging]]:
    """Where this run starts: the interrupted run's stage, or a fresh start."""
    if journal is None:
        return _start(config, store, ())
    provisioning = config.provisioning
    if not journal.matches(provisioning.method, provisioning.key_type, provisioning.template, config.endpoint):
        log.warning("the configuration changed since the interrupted run: starting over")
        _discard(store, journal)
        return _start(config, store, _abandon(journal))
    if journal.stage == "committed":
        log.info("resuming the interrupted run (stage committed: generation %s)", journal.generation)
        return journal, None
    staging = store.reopen(journal.staging)
    if staging is None:
        committed = _generation_of(store, journal.certificate_id) if journal.stage == "registered" else None
        if committed is not None:  # the commit happened; the journal did not hear of it
            log.info("resuming the interrupted run (stage committed: generation %s)", committed.number)
            return journal.at("committed", generation=committed.number), None
        log.warning("the interrupted run's staging directory is gone: starting over")
        return _start(config, store, _abandon(journal))
    log.info("resuming the interrupted run (stage %s)", journal.stage)
    return journal, staging


def _discard(store: Store, journal: Journal) -> None:
    staging = store.reopen(journal.staging)
    if staging is not None:
        staging.discard()


def _generation_of(store: Store, certificate_id: Optional[str]) -> Optional[Generation]:
    for number in reversed(store.generations()):
        with contextlib.suppress(FleetprovError):
            generation = store.load(number)
            if generation.manifest.certificate_id == certificate_id:
                return generation
    return None


# -- the network steps --------------------------------------------------------------------------------


def _public_key_of_pem(private_key_pem: str) -> bytes:
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise BadServiceData("the privateKey in the reply is not a PEM private key", step="check-certificate") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise BadServiceData("the privateKey in the reply is neither RSA nor EC", step="check-certificate")
    return public_key_der(key.public_key())


async def _issue(
    journal: Journal, staging: Staging, client: ProvisioningClient, key: Optional[DeviceKey], claim_client_id: str
) -> Journal:
    """CreateCertificateFromCsr for ``key``, or CreateKeysAndCertificate; checked; the next journal stage."""
    with step("create-certificate"):
        if key is not None:
            issued = await client.create_certificate_from_csr(key.csr_pem(claim_client_id))
        else:
            issued = await client.create_keys_and_certificate()
    issued_at = time.time()
    crash_point("after-issue-reply")
    log.info(
        "certificate %s issued (ownership token %s...)",
        issued.certificate_id,
        token_fingerprint(issued.ownership_token),
    )
    with step("check-certificate"):
        if key is not None:
            expected, key_reference = key.public_key_der(), key.key_reference
        else:
            expected, key_reference = _public_key_of_pem(issued.private_key_pem or ""), KEY_FILE_REFERENCE
        checked = check_certificate(issued.certificate_pem, expected, expected_id=issued.certificate_id)
        if issued.private_key_pem is not None:
            staging.write_private_key(issued.private_key_pem.encode())
    return journal.at(
        "issued",
        certificate_id=checked.certificate_id,
        certificate_pem=issued.certificate_pem,
        ownership_token=issued.ownership_token,
        token_deadline=issued_at + TOKEN_LIFETIME,
        not_after=iso_utc(checked.not_after),
        key_reference=key_reference,
    )


async def _register(
    config: Config, journal: Journal, client: ProvisioningClient, parameters: Mapping[str, str]
) -> Journal:
    with step("register-thing"):
        try:
            registration = await client.register_thing(
                config.provisioning.template, journal.text("ownership_token"), {**parameters}
            )
        except ServiceRejected as exc:
            if exc.error_code == "InvalidCertificateOwnershipToken":
                raise TokenAbandoned(f"the service refused the ownership token: {exc.error_message}") from exc
            raise
    crash_point("after-register-reply")
    log.info("registered thing %s", registration.thing_name)
    return journal.at(
        "registered", thing_name=registration.thing_name, device_configuration=dict(registration.device_configuration)
    )


def _key(config: Config, journal: Journal, staging: Staging, state_dir: Path) -> tuple[Journal, Optional[DeviceKey]]:
    """The device key of this run: made now (CSR, stage started), read back (CSR, later stages), or none."""
    backend = FileKeyBackend()
    if config.provisioning.method != "csr":
        if journal.stage == "started" and staging.private_key.exists():
            # Killed after CreateKeysAndCertificate answered, before the journal heard of it.
            log.warning("a certificate created by the interrupted run was lost with it; AWS deletes it in an hour")
            staging.private_key.unlink()
        return journal, None
    if journal.stage != "started":
        return journal, backend.load_key(staging)
    staging.private_key.unlink(missing_ok=True)  # a key half-written when the last run was killed
    with step("key"):
        key = backend.create_key(config.provisioning.key_type, staging)
    journal = save_journal(state_dir, journal.at("key-ready", key_reference=key.key_reference))
    crash_point("after-key")
    return journal, key


async def _registered(
    config: Config,
    store: Store,
    *,
    journal: Journal,
    staging: Staging,
    parameters: Mapping[str, str],
    claim_client_id: str,
) -> Journal:
    """Advance the journal to "registered", resuming from whatever stage it is at."""
    journal, key = _key(config, journal, staging, store.state_dir)
    claim = Identity(config.claim.certificate, config.claim.private_key)

    async def attempt() -> Journal:
        nonlocal journal
        if journal.stage == "issued" and not journal.token_usable():
            raise TokenAbandoned("the ownership token has expired or is about to")
        with step("connect"):
            session = await connect(endpoint_of(config), claim, claim_client_id)
        try:
            client = ProvisioningClient(session.protocol_client, config.operation_timeout)
            if journal.stage in ("started", "key-ready"):
                journal = save_journal(store.state_dir, await _issue(journal, staging, client, key, claim_client_id))
                crash_point("after-issued")
            journal = save_journal(store.state_dir, await _register(config, journal, client, parameters))
            crash_point("after-registered")
            return journal
        finally:
            await session.close(config.operation_timeout)

    if journal.stage == "registered":
        return journal
    return await retrying(config.retry, attempt)


# -- storing and proving ------------------------------------------------------------------------------


def _commit(config: Config, store: Store, journal: Journal, staging: Staging) -> tuple[Journal, Generation]:
    with step("store"):
        staging.remove_derived()  # a crash may have left one half-written; the journal has their content
        staging.write_certificate(journal.text("certificate_pem").encode())
        staging.write_device_config(journal.device_configuration or {})
        staging.write_manifest(
            Manifest(
                thing_name=journal.text("thing_name"),
                certificate_id=journal.text("certificate_id"),
                endpoint=config.endpoint,
                not_after=journal.text("not_after"),
                key_reference=journal.key_reference or KEY_FILE_REFERENCE,
                template=config.provisioning.template,
                device_configuration=dict(journal.device_configuration or {}),
                provisioned_at=iso_utc(dt.datetime.now(dt.timezone.utc)),
            )
        )
        crash_point("before-commit")
        # With good credentials in place, `current` moves only once the new identity has connected.
        generation = store.commit(staging, publish=store.current() is None)
        journal = save_journal(store.state_dir, journal.at("committed", generation=generation.number))
    crash_point("after-commit")
    return journal, generation


async def verify(config: Config, generation: Generation, client_id: str) -> None:
    """Connect with the generation's identity and wait for CONNACK: the proof that it works."""
    if generation.private_key is None:
        raise ConfigError("this generation's key is in a PKCS#11 token, which this build cannot use", step="verify")
    identity = Identity(generation.certificate, generation.private_key)

    async def attempt() -> None:
        with step("verify"):
            async with open_session(endpoint_of(config), identity, client_id):
                log.info("connected to %s:%s as %s", config.endpoint, config.port, client_id)

    await retrying(config.retry, attempt)


async def provision(
    config: Config, store: Store, environ: Mapping[str, str], journal: Optional[Journal]
) -> Provisioned:
    """Provision by claim (or finish the interrupted run the journal describes); returns once verified."""
    check_claim_files(config)
    parameters, claim_client_id = _parameters(config, environ, config.claim.client_id)
    journal, staging = _resume_or_start(config, store, journal)
    for _ in range(MAX_FRESH_STARTS):
        if staging is None:
            break
        try:
            journal = await _registered(
                config, store, journal=journal, staging=staging, parameters=parameters, claim_client_id=claim_client_id
            )
            journal, generation = _commit(config, store, journal, staging)
            break
        except TokenAbandoned as exc:
            log.warning("%s: starting over with a new certificate", exc.message)
            staging.discard()
            journal, staging = _start(config, store, _abandon(journal))
        except FleetprovError as exc:
            if exc.exit_code != EX_TEMPFAIL:
                # Final: nothing of this run is kept. Only "try again later" leaves the journal to resume from.
                staging.discard()
                clear_journal(store.state_dir)
                for certificate_id in _abandon(journal):
                    exc.message += f" (certificate {certificate_id}, issued to this device, is abandoned)"
            raise
    else:
        if staging is not None:
            staging.discard()
        clear_journal(store.state_dir)
        raise Refused(
            f"the service refused {MAX_FRESH_STARTS} ownership tokens in a row; giving up", step="register-thing"
        )
    generation = store.load(journal.generation or 0)
    await verify(config, generation, device_client_id(config, journal.text("thing_name")))
    if store.current() != generation:
        store.switch_to(generation)
    crash_point("after-verify")
    clear_journal(store.state_dir)
    return Provisioned(generation, journal.abandoned)
