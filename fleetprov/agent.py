"""`fleetprov --once`: provision if needed, prove the identity by connecting with it, and say what happened.

The credential-critical path, in order (each step logged with its duration and outcome):

    parameters -> key -> connect (claim) -> create-certificate -> check-certificate -> register-thing
    -> store (commit a new generation) -> verify (connect with the new identity, CONNACK)

Nothing reaches ``current`` before the certificate is checked against our key and RegisterThing accepted
it. When an identity is already current, ``current`` moves to the new one only after it has connected.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetprov.atomicio import write_atomic
from fleetprov.certcheck import check_certificate
from fleetprov.config import Config
from fleetprov.errors import BadServiceData, ConfigError, FleetprovError
from fleetprov.facts import DeviceFacts, default_claim_client_id, read_facts, template_parameters
from fleetprov.keys import DeviceKey
from fleetprov.keys.file import FileKeyBackend, public_key_der
from fleetprov.provisioning import ProvisioningClient, Registration
from fleetprov.retry import retrying
from fleetprov.session import Endpoint, Identity, connect, open_session
from fleetprov.store import KEY_FILE_REFERENCE, Generation, Manifest, Staging, Store, iso_utc

log = logging.getLogger(__name__)

LAST_RUN = "last-run.json"


@dataclass(frozen=True)
class Outcome:
    generation: Generation
    provisioned: bool  # False: an existing identity was verified


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


def check_readable_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file", step="claim")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable by this user", step="claim")


def check_claim_files(config: Config) -> None:
    check_readable_file(config.root_ca, "root CA")
    check_readable_file(config.claim.certificate, "claim certificate")
    check_readable_file(config.claim.private_key, "claim private key")
    mode = stat.S_IMODE(config.claim.private_key.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"claim private key {config.claim.private_key} is readable by others (mode {mode:04o}): "
            f"run 'chmod 600 {config.claim.private_key}'",
            step="claim",
        )


def _public_key_of_pem(private_key_pem: str) -> bytes:
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise BadServiceData("the privateKey in the reply is not a PEM private key", step="check-certificate") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise BadServiceData("the privateKey in the reply is neither RSA nor EC", step="check-certificate")
    return public_key_der(key.public_key())


def token_fingerprint(token: str) -> str:
    """What the logs may say about an ownership token: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


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


def device_client_id(config: Config, thing_name: str) -> str:
    return config.device_client_id or thing_name


@dataclass(frozen=True)
class CheckedCertificate:
    certificate_id: str
    ownership_token: str = field(repr=False)
    not_after: dt.datetime
    key_reference: str


async def _issue_certificate(
    config: Config, staging: Staging, client: ProvisioningClient, key: Optional[DeviceKey], claim_client_id: str
) -> CheckedCertificate:
    """CreateCertificateFromCsr for ``key``, or CreateKeysAndCertificate without one; checked and staged."""
    if key is not None:
        with step("create-certificate"):
            issued = await client.create_certificate_from_csr(key.csr_pem(claim_client_id))
        expected_key, key_reference = key.public_key_der(), key.key_reference
    else:
        with step("create-certificate"):
            issued = await client.create_keys_and_certificate()
        expected_key, key_reference = _public_key_of_pem(issued.private_key_pem or ""), KEY_FILE_REFERENCE
    log.info(
        "certificate %s issued (ownership token %s...)",
        issued.certificate_id,
        token_fingerprint(issued.ownership_token),
    )
    with step("check-certificate"):
        checked = check_certificate(issued.certificate_pem, expected_key, expected_id=issued.certificate_id)
        if issued.private_key_pem is not None:
            staging.write_private_key(issued.private_key_pem.encode())
        staging.write_certificate(issued.certificate_pem.encode())
    return CheckedCertificate(checked.certificate_id, issued.ownership_token, checked.not_after, key_reference)


async def _register(config: Config, client: ProvisioningClient, issued: CheckedCertificate,
                    parameters: Mapping[str, str]) -> Registration:  # fmt: skip
    with step("register-thing"):
        try:
            registration = await client.register_thing(config.provisioning.template, issued.ownership_token, parameters)
        except FleetprovError:
            log.warning(
                "certificate %s was issued but not registered; AWS deletes it when its ownership token expires",
                issued.certificate_id,
            )
            raise
    log.info("registered thing %s", registration.thing_name)
    return registration


def _manifest(config: Config, issued: CheckedCertificate, registration: Registration) -> Manifest:
    return Manifest(
        thing_name=registration.thing_name,
        certificate_id=issued.certificate_id,
        endpoint=config.endpoint,
        not_after=iso_utc(issued.not_after),
        key_reference=issued.key_reference,
        template=config.provisioning.template,
        device_configuration=dict(registration.device_configuration),
        provisioned_at=iso_utc(dt.datetime.now(dt.timezone.utc)),
    )


def _parameters(config: Config, environ: Mapping[str, str], facts: DeviceFacts) -> dict[str, str]:
    wanted = config.provisioning.parameters
    with step("parameters"):
        return template_parameters(
            wanted.static,
            wanted.from_env,
            wanted.facts,
            wanted.command,
            wanted.command_timeout,
            environ=environ,
            facts=facts,
        )


async def provision(config: Config, store: Store, environ: Mapping[str, str]) -> Generation:
    check_claim_files(config)
    facts = read_facts()
    parameters = _parameters(config, environ, facts)
    claim_client_id = config.claim.client_id or default_claim_client_id(facts)
    claim = Identity(config.claim.certificate, config.claim.private_key)
    staging = store.stage()
    try:
        key: Optional[DeviceKey] = None
        if config.provisioning.method == "csr":
            with step("key"):
                key = FileKeyBackend().create_key(config.provisioning.key_type, staging)
        issued: Optional[CheckedCertificate] = None

        async def attempt() -> tuple[CheckedCertificate, Registration]:
            # A retry after the certificate was issued resumes at RegisterThing with the same token.
            nonlocal issued
            with step("connect"):
                session = await connect(endpoint_of(config), claim, claim_client_id)
            try:
                client = ProvisioningClient(session.protocol_client, config.operation_timeout)
                if issued is None:
                    issued = await _issue_certificate(config, staging, client, key, claim_client_id)
                return issued, await _register(config, client, issued, parameters)
            finally:
                await session.close(config.operation_timeout)

        certificate, registration = await retrying(config.retry, attempt)
        with step("store"):
            staging.write_device_config(registration.device_configuration)
            staging.write_manifest(_manifest(config, certificate, registration))
            previous = store.current()
            # With good credentials in place, `current` moves only once the new identity has connected.
            generation = store.commit(staging, publish=previous is None)
    except BaseException:
        staging.discard()
        raise
    try:
        await verify(config, generation, device_client_id(config, registration.thing_name))
    except FleetprovError:
        if previous is not None:
            log.error(
                "the new identity (generation %s) could not connect: generation %s stays current",
                generation.number,
                previous.number,
            )
        raise
    if previous is not None:
        store.switch_to(generation)
    return generation


async def once(config: Config, environ: Optional[Mapping[str, str]] = None) -> Outcome:
    store = Store(config.state_dir)
    store.ensure()
    with store.lock():
        # Inside the lock: another instance's staging directory is not a leftover while it runs.
        for note in store.recover():
            log.info("recovered: %s", note)
        current = store.current()
        if current is not None:
            log.info("already provisioned as %s (generation %s)", current.manifest.thing_name, current.number)
            await verify(config, current, device_client_id(config, current.manifest.thing_name))
            return Outcome(current, provisioned=False)
        generation = await provision(config, store, os.environ if environ is None else environ)
        return Outcome(generation, provisioned=True)


def record_last_run(state_dir: Path, exit_code: int, error: Optional[FleetprovError]) -> None:
    """Remember how the last run ended, for `fleetprov status` (best effort: never masks the real error)."""
    document = {
        "finished_at": iso_utc(dt.datetime.now(dt.timezone.utc)),
        "exit_code": exit_code,
        "step": error.step if error else None,
        "error": error.message if error else None,
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
