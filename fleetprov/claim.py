"""Fleet provisioning by claim: the credential-critical path, readable in one sitting.

    parameters -> key -> connect (claim) -> create-certificate -> check-certificate -> register-thing
    -> store (staged files) -> verify (connect with the new identity) -> commit (a new generation, current)

Write before you talk: each step's result is in the journal (fleetprov/journal.py) before the next network
call, so a run that was killed resumes where it stopped. RegisterThing is retried with the saved ownership
token while the token is valid; past that the certificate is abandoned (recorded, and reported by
`fleetprov status`) and the run starts over with a new one.

Never lose good credentials: the new identity connects from its staging directory before it is committed,
so `current` only ever moves to an identity that has connected, in one atomic step. A run that fails for
good (not "try again later") keeps nothing and names every certificate it was issued and gave up on.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetprov.certcheck import check_certificate
from fleetprov.config import DEFAULT_PKCS11_KEY_LABEL, Config
from fleetprov.crashpoints import crash_point
from fleetprov.errors import EX_TEMPFAIL, BadServiceData, ConfigError, FleetprovError, Refused, printable
from fleetprov.facts import default_claim_client_id, read_facts, template_parameters
from fleetprov.hooks import run_hooks
from fleetprov.journal import TOKEN_LIFETIME, Journal, clear_journal, save_journal
from fleetprov.keys import PreparedKey, prepared
from fleetprov.keys.file import FileKeyBackend, public_key_der
from fleetprov.keys.pkcs11_settings import Pkcs11Settings, read_pin
from fleetprov.keys.pkcs11_uri import Pkcs11Uri, parse_pkcs11_uri
from fleetprov.keys.token_process import prepare_in_child
from fleetprov.provisioning import ProvisioningClient, ServiceRejected
from fleetprov.retry import retrying
from fleetprov.session import Endpoint, Identity, Session, TokenKey, connect, open_session
from fleetprov.store import KEY_FILE_REFERENCE, CorruptState, Generation, Manifest, Staging, Store, iso_utc

log = logging.getLogger(__name__)

MAX_FRESH_STARTS = 3  # certificates one run may abandon before it gives up


@dataclass(frozen=True)
class Provisioned:
    generation: Generation
    abandoned: tuple[str, ...]  # certificate ids issued to this device and given up on


class TokenAbandoned(FleetprovError):
    """The ownership token can no longer be used: start over with a new certificate."""


class Progress:
    """This run's latest journal. It is updated in memory before it is written, so that a run whose journal
    write fails (a full disk) still knows which certificate it was issued, and says so."""

    def __init__(self, state_dir: Path, journal: Journal) -> None:
        self.state_dir = state_dir
        self.journal = journal

    def save(self, journal: Journal) -> Journal:
        self.journal = journal
        return save_journal(self.state_dir, journal)


@contextlib.contextmanager
def step(name: str, *, owns_errors: bool = False) -> Iterator[None]:
    """Log one step: `name: ok (0.12 s)` or `name: failed after 0.12 s: why`; errors learn their step (with
    ``owns_errors``, even those that name an inner step: a verify connection fails as "verify")."""
    started = time.monotonic()
    try:
        yield
    except FleetprovError as exc:
        exc.step = name if owns_errors else exc.step or name
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
    """What the logs may say about an ownership token: never the token itself (any string, even one with a
    lone surrogate, which JSON allows)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def device_client_id(config: Config, thing_name: str) -> str:
    return config.device_client_id or thing_name


# -- before anything goes on the network ---------------------------------------------------------------


def check_readable_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file", step="claim")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable by this user", step="claim")


def check_private_key_file(key: Path, what: str) -> None:
    """Readable by this user and by nobody else."""
    check_readable_file(key, what)
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{what} {key} is readable by others (mode {mode:04o}): run 'chmod 600 {key}'", step="claim")


def check_claim_files(config: Config) -> None:
    check_readable_file(config.root_ca, "root CA")
    claim = config.required_claim()
    check_readable_file(claim.certificate, "claim certificate")
    if claim.private_key is not None:  # else in a token: awscrt finds it when it connects
        check_private_key_file(claim.private_key, "claim private key")


def _token_key(config: Config, uri: Pkcs11Uri, environ: Mapping[str, str]) -> TokenKey:
    settings = config.keys.pkcs11
    if settings is None:  # config.py refuses a pkcs11: key without keys.pkcs11; a manifest may still name one
        raise ConfigError(f"the key {uri} is in a PKCS#11 token: configure keys.pkcs11", step="config")
    if uri.key_label is None:
        raise ConfigError(f"awscrt selects a token key by its label; {uri} names none", step="config")
    return TokenKey(
        library=settings.library,
        token_label=uri.token_label,
        slot=None,
        key_label=uri.key_label,
        pin=read_pin(settings, environ),
    )


def claim_identity(config: Config, environ: Mapping[str, str]) -> Identity:
    claim = config.required_claim()
    if claim.private_key_uri is not None:
        return Identity(claim.certificate, token_key=_token_key(config, claim.private_key_uri, environ))
    return Identity(claim.certificate, claim.private_key)


def device_identity(
    config: Config, certificate: Path, key_reference: str, key_file: Path, environ: Mapping[str, str]
) -> Identity:
    """The identity of a generation (or a staged one): its key in ``key_file`` or in the token it names."""
    if key_reference == KEY_FILE_REFERENCE:
        return Identity(certificate, key_file)
    try:
        uri = parse_pkcs11_uri(key_reference)
    except ValueError as exc:
        raise CorruptState(f"the key reference {key_reference!r} is unusable: {exc}", step="verify") from None
    return Identity(certificate, token_key=_token_key(config, uri, environ))


async def _parameters(
    config: Config, environ: Mapping[str, str], claim_client_id: Optional[str]
) -> tuple[dict[str, str], str]:
    facts = read_facts()
    wanted = config.required_provisioning().parameters
    with step("parameters"):
        parameters = await template_parameters(
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
        method=config.required_provisioning().method,
        key_type=config.required_provisioning().key_type,
        template=config.required_provisioning().template,
        endpoint=config.endpoint,
        abandoned=abandoned,
    )
    try:
        save_journal(store.state_dir, journal)
    except FleetprovError:
        staging.discard()  # no journal names it: nothing would ever resume from it
        raise
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
    provisioning = config.required_provisioning()
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


@dataclass(frozen=True)
class _IssuedKey:
    """CreateKeysAndCertificate's privateKey, parsed: its public key, and the key re-encoded (PKCS#8 PEM, nothing
    else) for the staging directory."""

    public_key_der: bytes
    private_key_pem: bytes = field(repr=False)


def _issued_key(private_key_pem: str) -> _IssuedKey:
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BadServiceData("the privateKey in the reply is not a PEM private key", step="check-certificate") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise BadServiceData("the privateKey in the reply is neither RSA nor EC", step="check-certificate")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _IssuedKey(public_key_der(key.public_key()), pem)


async def _issue(journal: Journal, staging: Staging, client: ProvisioningClient, key: Optional[PreparedKey]) -> Journal:
    """CreateCertificateFromCsr for ``key``, or CreateKeysAndCertificate; checked; the next journal stage."""
    with step("create-certificate"):
        if key is not None:
            issued = await client.create_certificate_from_csr(key.csr_pem)
        else:
            issued = await client.create_keys_and_certificate()
    issued_at = time.time()
    crash_point("after-issue-reply")
    with step("check-certificate"):
        if key is not None:
            key_reference = key.key_reference
            checked = check_certificate(issued.certificate_pem, key.public_key_der, expected_id=issued.certificate_id)
        else:
            issued_key = _issued_key(issued.private_key_pem or "")
            checked = check_certificate(
                issued.certificate_pem, issued_key.public_key_der, expected_id=issued.certificate_id
            )
            key_reference = KEY_FILE_REFERENCE
            staging.write_private_key(issued_key.private_key_pem)
    log.info(
        "certificate %s issued (ownership token %s...)",
        checked.certificate_id,
        token_fingerprint(issued.ownership_token),
    )
    return journal.at(
        "issued",
        certificate_id=checked.certificate_id,
        certificate_pem=checked.certificate_pem,
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
                config.required_provisioning().template, journal.text("ownership_token"), {**parameters}
            )
        except ServiceRejected as exc:
            if exc.error_code == "InvalidCertificateOwnershipToken":
                raise TokenAbandoned(
                    f"the service refused the ownership token: {printable(exc.error_message, 400)}"
                ) from exc
            raise
    crash_point("after-register-reply")
    log.info("registered thing %s", registration.thing_name)
    return journal.at(
        "registered", thing_name=registration.thing_name, device_configuration=dict(registration.device_configuration)
    )


async def _key(
    config: Config, progress: Progress, store: Store, staging: Staging, *, common_name: str, environ: Mapping[str, str]
) -> Optional[PreparedKey]:
    """The device key, while a CSR is still to be sent: made now (stage started) or found again (key-ready);
    None for CreateKeysAndCertificate and once the certificate is issued."""
    journal = progress.journal
    if config.required_provisioning().method != "csr":
        if journal.stage == "started" and staging.private_key.exists():
            # Killed after CreateKeysAndCertificate answered, before the journal heard of it.
            log.warning("a certificate created by the interrupted run was lost with it; AWS deletes it in an hour")
            staging.private_key.unlink()
        return None
    if journal.stage not in ("started", "key-ready"):
        return None
    with step("key"):
        if config.keys.backend == "pkcs11":
            key = await _token_key_for(config, journal, store, environ, common_name)
        elif journal.stage == "key-ready":
            key = prepared(FileKeyBackend().load_key(staging), common_name)
        else:
            staging.private_key.unlink(missing_ok=True)  # a key half-written when the last run was killed
            key = prepared(FileKeyBackend().create_key(config.required_provisioning().key_type, staging), common_name)
    if journal.stage == "started":
        progress.save(journal.at("key-ready", key_reference=key.key_reference))
        crash_point("after-key")
    return key


def pkcs11_settings(config: Config) -> Pkcs11Settings:
    if config.keys.pkcs11 is None:  # config.py requires it for backend pkcs11
        raise ConfigError("keys.backend is pkcs11, but keys.pkcs11 is missing", step="config")
    return config.keys.pkcs11


def generation_key_settings(settings: Pkcs11Settings, number: int) -> Pkcs11Settings:
    """Where generation ``number``'s own token key lives: the configured label + ``-g<number>``. A new key for
    every identity, as with key files; the old one stays usable (rollback) until its generation is pruned."""
    return replace(settings, key_label=f"{settings.key_label or DEFAULT_PKCS11_KEY_LABEL}-g{number}", key_id=None)


async def _token_key_for(
    config: Config, journal: Journal, store: Store, environ: Mapping[str, str], common_name: str
) -> PreparedKey:
    """The token key of the identity this run provisions, found or made by the key process (awscrt may have
    loaded the module in this process already: a daemon that provisions anew). The first identity uses the
    configured key (made at the factory, or now); every later one a key of its own; a resumed run the key it
    journalled."""
    settings, fresh = pkcs11_settings(config), False
    if journal.stage == "key-ready" and journal.key_reference:
        try:
            uri = parse_pkcs11_uri(journal.key_reference)
        except ValueError as exc:
            raise CorruptState(f"the journal's key reference is unusable: {exc}", step="key") from None
        settings = replace(settings, key_label=uri.key_label, key_id=uri.key_id)
    elif store.generations():
        settings, fresh = generation_key_settings(settings, max(store.generations()) + 1), True
    key_type = config.required_provisioning().key_type
    return await prepare_in_child(settings, key_type, common_name, environ, fresh=fresh)


async def _registered(
    config: Config,
    *,
    progress: Progress,
    store: Store,
    staging: Staging,
    parameters: Mapping[str, str],
    claim_client_id: str,
    environ: Mapping[str, str],
) -> None:
    """Advance the journal to "registered", resuming from whatever stage it is at."""
    if progress.journal.stage == "registered":
        return
    key = await _key(config, progress, store, staging, common_name=claim_client_id, environ=environ)
    connection = _ClaimConnection(config, claim_identity(config, environ), claim_client_id)

    async def attempt() -> None:
        if progress.journal.stage == "issued" and not progress.journal.token_usable():
            raise TokenAbandoned("the ownership token has expired or is about to")
        client = await connection.client()
        try:
            if progress.journal.stage in ("started", "key-ready"):
                progress.save(await _issue(progress.journal, staging, client, key))
                crash_point("after-issued")
            progress.save(await _register(config, progress.journal, client, parameters))
            crash_point("after-registered")
        except ServiceRejected as exc:
            if not exc.transient:
                await connection.close()
            raise  # 429 or 5xx: the service answered, so the connection is fine; the retry reuses it
        except BaseException:
            await connection.close()  # lost, or in an unknown state: the retry connects afresh
            raise

    try:
        await retrying(config.retry, attempt, progress=lambda: progress.journal.stage)
    finally:
        await connection.close()


class _ClaimConnection:
    """The claim connection, kept across retries that the service asked for (429, 5xx): a throttled fleet
    should not also pay a TLS handshake per retry, nor race its own client id on reconnect."""

    def __init__(self, config: Config, claim: Identity, client_id: str) -> None:
        self._config = config
        self._claim = claim
        self._client_id = client_id
        self._session: Optional[Session] = None
        self._client: Optional[ProvisioningClient] = None

    async def client(self) -> ProvisioningClient:
        if self._session is None or self._client is None:
            with step("connect"):
                self._session = await connect(endpoint_of(self._config), self._claim, self._client_id)
            self._client = ProvisioningClient(self._session.protocol_client, self._config.operation_timeout)
        return self._client

    async def close(self) -> None:
        session, self._session, self._client = self._session, None, None
        if session is not None:
            await session.close(self._config.operation_timeout)


# -- storing and proving ------------------------------------------------------------------------------


def _stage_identity(config: Config, journal: Journal, staging: Staging, environ: Mapping[str, str]) -> Identity:
    """Write the registered identity's files next to its key; the journal holds everything they say."""
    with step("store"):
        staging.remove_derived()  # a crash may have left one half-written; the journal has their content
        certificate = staging.write_certificate(journal.text("certificate_pem").encode())
        staging.write_device_config(journal.device_configuration or {})
        manifest = Manifest(
            thing_name=journal.text("thing_name"),
            certificate_id=journal.text("certificate_id"),
            endpoint=config.endpoint,
            not_after=journal.text("not_after"),
            key_reference=journal.key_reference or KEY_FILE_REFERENCE,
            template=journal.template,
            device_configuration=dict(journal.device_configuration or {}),
            provisioned_at=iso_utc(dt.datetime.now(dt.timezone.utc)),
        )
        staging.write_manifest(manifest)
        staging.write_identity(manifest, port=config.port, root_ca=config.root_ca)
    crash_point("before-verify")
    key_reference = journal.key_reference or KEY_FILE_REFERENCE
    return device_identity(config, certificate, key_reference, staging.private_key, environ)


async def verify(config: Config, generation: Generation, client_id: str, environ: Mapping[str, str]) -> None:
    """Connect with a committed generation's identity and wait for CONNACK: the proof that it works."""
    key_file = generation.private_key or generation.certificate.parent / "private.key"
    identity = device_identity(config, generation.certificate, generation.manifest.key_reference, key_file, environ)
    await verify_identity(config, identity, client_id)


async def verify_identity(config: Config, identity: Identity, client_id: str) -> None:
    async def attempt() -> None:
        with step("verify", owns_errors=True):
            async with open_session(endpoint_of(config), identity, client_id):
                log.info("connected to %s:%s as %s", config.endpoint, config.port, client_id)

    await retrying(config.retry, attempt)


async def _verified_and_committed(
    config: Config, store: Store, progress: Progress, staging: Staging, environ: Mapping[str, str]
) -> Generation:
    """The registered identity connects from staging; only then is it committed and made current."""
    journal = progress.journal
    identity = _stage_identity(config, journal, staging, environ)
    await verify_identity(config, identity, device_client_id(config, journal.text("thing_name")))
    crash_point("before-commit")
    with step("commit"):
        generation = store.commit(staging, publish=True)
    crash_point("after-commit")
    return generation


def _finish(store: Store, generation: Generation) -> None:
    """After the commit nothing can fail the run: the journal goes, and if it cannot, the next run sees the
    commit (the generation holds the journal's certificate) and removes it then."""
    try:
        clear_journal(store.state_dir)
    except FleetprovError as exc:
        log.warning("generation %s is committed, but the journal stays: %s", generation.number, exc.message)


def _give_up(store: Store, progress: Progress, staging: Optional[Staging], exc: FleetprovError) -> None:
    """A final failure keeps nothing of this run, and names every certificate it was issued and abandoned."""
    if staging is not None:
        staging.discard()
    with contextlib.suppress(FleetprovError):
        clear_journal(store.state_dir)
    for certificate_id in _abandon(progress.journal):
        exc.message += f" (certificate {certificate_id}, issued to this device, is abandoned)"


def _committed(store: Store, journal: Journal) -> Generation:
    """An interrupted run that got as far as its commit: make sure `current` is the committed generation."""
    generation = store.load(journal.generation or 0)
    if store.current() != generation:
        with step("commit"):
            store.switch_to(generation)
    return generation


async def provision(
    config: Config, store: Store, environ: Mapping[str, str], journal: Optional[Journal]
) -> Provisioned:
    """Provision by claim (or finish the interrupted run the journal describes); returns once verified."""
    check_claim_files(config)
    parameters, claim_client_id = await _parameters(config, environ, config.required_claim().client_id)
    progress = Progress(store.state_dir, journal or _no_journal(config))
    staging: Optional[Staging] = None
    try:
        progress.journal, staging = _resume_or_start(config, store, journal)
        for _ in range(MAX_FRESH_STARTS):
            if staging is None:
                generation = _committed(store, progress.journal)
                break
            try:
                await _registered(
                    config,
                    progress=progress,
                    store=store,
                    staging=staging,
                    parameters=parameters,
                    claim_client_id=claim_client_id,
                    environ=environ,
                )
                generation = await _verified_and_committed(config, store, progress, staging, environ)
                break
            except TokenAbandoned as exc:
                log.warning("%s: starting over with a new certificate", exc.message)
                staging.discard()
                staging = None
                progress.journal, staging = _start(config, store, _abandon(progress.journal))
        else:
            raise Refused(
                f"the service refused {MAX_FRESH_STARTS} ownership tokens in a row; giving up", step="register-thing"
            )
    except FleetprovError as exc:
        if exc.exit_code != EX_TEMPFAIL:  # only "try again later" leaves the journal to resume from
            _give_up(store, progress, staging, exc)
        raise
    _finish(store, generation)
    await run_hooks(config, generation, environ)
    return Provisioned(generation, progress.journal.abandoned)


def _no_journal(config: Config) -> Journal:
    """What Progress holds before the first journal exists: nothing issued, nothing to report."""
    return Journal(
        staging="",
        method=config.required_provisioning().method,
        key_type=config.required_provisioning().key_type,
        template=config.required_provisioning().template,
        endpoint=config.endpoint,
    )
