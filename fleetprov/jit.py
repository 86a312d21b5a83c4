"""JITP and JITR: the device already holds a certificate signed by the customer's CA, and AWS IoT registers it
when the device first connects.

    check (certificate, key, chain; before any network) -> stage (certificate + CA chain, key, manifest)
    -> connect until the certificate is ACTIVE -> commit (a new generation, current) -> hooks

The first connection of an unknown certificate is closed while AWS IoT registers it (JITP: the CA's template
runs and makes it ACTIVE; JITR: it stays PENDING_ACTIVATION until something activates it out of band), so a
refused or closed connection here means "not active yet": fleetprov tries again with jittered, growing delays
(retry.initial_delay up to retry.max_delay) for jit.wait seconds, says so in `fleetprov status` and in
systemd's STATUS=, then exits 75 (the daemon keeps waiting). Nothing is journalled: every step can simply be
done again, and `current` only ever moves to an identity that has connected.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleetprov.atomicio import write_atomic
from fleetprov.claim import (
    check_private_key_file,
    check_readable_file,
    device_client_id,
    device_identity,
    endpoint_of,
    step,
)
from fleetprov.config import Config, JitConfig
from fleetprov.errors import ConfigError, FleetprovError, printable
from fleetprov.hooks import run_hooks
from fleetprov.provisioning import THING_NAME
from fleetprov.session import Identity, open_session
from fleetprov.store import KEY_FILE_REFERENCE, Generation, Manifest, Staging, Store, iso_utc

log = logging.getLogger(__name__)

ACTIVATION_FILE = "activation.json"  # while waiting: what `fleetprov status` shows

Report = Callable[[str], None]


class NotActivated(FleetprovError):
    """The certificate did not become ACTIVE within jit.wait: try again later (exit 75)."""

    transient = True


@dataclass(frozen=True)
class JitMaterial:
    """The device's own credentials, checked: what is staged as the new generation."""

    certificate_pem: bytes  # the device certificate, then the CA certificate when there is one (the chain)
    certificate_id: str  # SHA-256 of the device certificate's DER, as AWS IoT computes it
    thing_name: str
    not_after: dt.datetime
    key_pem: Optional[bytes]  # None: the key is in a token


def _read_certificate(path: Path, what: str) -> x509.Certificate:
    check_readable_file(path, what)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not a PEM certificate: {exc}", step="jit") from None


def _check_signed_by(certificate: x509.Certificate, ca: x509.Certificate, jit: JitConfig) -> None:
    where = f"{jit.certificate} and jit.ca_certificate {jit.ca_certificate}"
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"jit.ca_certificate {jit.ca_certificate} is not a CA certificate", step="jit")
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        problem = str(exc) or "the signature does not verify"
        raise ConfigError(
            f"{where} do not form a chain: the device certificate was not issued by that CA ({problem})", step="jit"
        ) from None


def _check_key(jit: JitConfig, certificate: x509.Certificate) -> Optional[bytes]:
    """The key file's PEM, checked against the certificate (a token key is checked by the TLS handshake)."""
    if jit.private_key is None:
        return None
    check_private_key_file(jit.private_key, "jit.private_key")
    pem = jit.private_key.read_bytes()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"jit.private_key {jit.private_key} is not an unencrypted PEM private key: {exc}",
                          step="jit") from None  # fmt: skip
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ConfigError(
            f"jit.private_key {jit.private_key} is not the key of the certificate {jit.certificate}", step="jit"
        )
    return pem


def thing_name_of(certificate: x509.Certificate, jit: JitConfig, certificate_id: str) -> str:
    """The thing the CA's template names: jit.thing_name, or a field of the certificate; checked, because it is
    logged, stored, used as the client id and handed to hooks."""
    if jit.thing_name is not None:
        return _checked_thing_name(jit.thing_name, "jit.thing_name")
    if jit.thing_name_from == "certificate-id":
        return certificate_id
    oid = NameOID.COMMON_NAME if jit.thing_name_from == "common-name" else NameOID.SERIAL_NUMBER
    values = certificate.subject.get_attributes_for_oid(oid)
    if not values or not str(values[0].value):
        raise ConfigError(
            f"jit.thing_name_from is {jit.thing_name_from}, but the subject of {jit.certificate} "
            f"({printable(certificate.subject.rfc4514_string())}) has no {oid._name}",
            step="jit",
        )
    return _checked_thing_name(str(values[0].value), f"the {oid._name} of {jit.certificate}")


def _checked_thing_name(name: str, source: str) -> str:
    if not THING_NAME.fullmatch(name):
        raise ConfigError(
            f"{source} ({printable(name, 40)}) is not a valid thing name: AWS IoT thing names are 1 to 128 of "
            "a-z, A-Z, 0-9, ':', '_' and '-'",
            step="jit",
        )
    return name


def check_material(jit: JitConfig, now: dt.datetime) -> JitMaterial:
    """Everything that can be checked before connecting; ConfigError (exit 78) naming the file otherwise."""
    with step("jit"):
        certificate = _read_certificate(jit.certificate, "jit.certificate")
        chain = b""
        if jit.ca_certificate is not None:
            ca = _read_certificate(jit.ca_certificate, "jit.ca_certificate")
            _check_signed_by(certificate, ca, jit)
            chain = ca.public_bytes(serialization.Encoding.PEM)
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            raise ConfigError(
                f"the certificate {jit.certificate} is valid from {iso_utc(certificate.not_valid_before_utc)} to "
                f"{iso_utc(certificate.not_valid_after_utc)}, not now ({iso_utc(now)})",
                step="jit",
            )
        key_pem = _check_key(jit, certificate)
        der = certificate.public_bytes(serialization.Encoding.DER)
        certificate_id = hashlib.sha256(der).hexdigest()
        return JitMaterial(
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM) + chain,
            certificate_id=certificate_id,
            thing_name=thing_name_of(certificate, jit, certificate_id),
            not_after=certificate.not_valid_after_utc,
            key_pem=key_pem,
        )


def _key_reference(jit: JitConfig) -> str:
    return KEY_FILE_REFERENCE if jit.private_key_uri is None else str(jit.private_key_uri)


def _stage(config: Config, jit: JitConfig, material: JitMaterial, staging: Staging) -> Manifest:
    with step("store"):
        if material.key_pem is not None:
            staging.write_private_key(material.key_pem)
        staging.write_certificate(material.certificate_pem)
        staging.write_device_config({})
        manifest = Manifest(
            thing_name=material.thing_name,
            certificate_id=material.certificate_id,
            endpoint=config.endpoint,
            not_after=iso_utc(material.not_after),
            key_reference=_key_reference(jit),
            template="",  # the CA's template (JITP) or a rule (JITR) registered it: nothing the device knows
            device_configuration={},
            provisioned_at=iso_utc(dt.datetime.now(dt.timezone.utc)),
        )
        staging.write_manifest(manifest)
        staging.write_identity(manifest, port=config.port, root_ca=config.root_ca)
    return manifest


class _Waiting:
    """What the wait for activation looks like from outside: logs, STATUS= and activation.json."""

    def __init__(self, state_dir: Path, material: JitMaterial, report: Report) -> None:
        self._path = state_dir / ACTIVATION_FILE
        self._material = material
        self._report = report
        self._since = iso_utc(dt.datetime.now(dt.timezone.utc))

    def attempt_failed(self, attempt: int, error: FleetprovError, delay: float) -> None:
        certificate = self._material.certificate_id
        message = f"waiting for activation of certificate {certificate[:12]} (attempt {attempt}: {error.message})"
        log.warning("%s; next attempt in %.1f s", message, delay)
        self._report(message)
        document = {
            "certificate_id": certificate,
            "thing_name": self._material.thing_name,
            "waiting_since": self._since,
            "attempts": attempt,
            "last_error": error.message,
            "next_attempt_at": iso_utc(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay)),
        }
        try:
            write_atomic(self._path, json.dumps(document, indent=2).encode(), mode=0o600)
        except (FleetprovError, OSError) as exc:  # a status file must never stop the real work
            log.warning("cannot write %s: %s", self._path, exc)

    def done(self) -> None:
        self._path.unlink(missing_ok=True)


def read_activation(state_dir: Path) -> Optional[dict[str, object]]:
    """The wait for activation under way, for `fleetprov status` (None when there is none)."""
    try:
        document = json.loads((state_dir / ACTIVATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _can_wait_out(exc: FleetprovError) -> bool:
    """A refused or closed connection is what a certificate that is not ACTIVE yet gets; so are timeouts.
    A bad file or token is not (ConfigError), though it fails at the connect step too."""
    return not isinstance(exc, ConfigError) and (exc.transient or exc.step == "connect")


async def _connected(config: Config, jit: JitConfig, identity: Identity, client_id: str, waiting: _Waiting) -> None:
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            async with open_session(endpoint_of(config), identity, client_id):
                log.info("connected to %s:%s as %s: the certificate is ACTIVE", config.endpoint, config.port, client_id)
                return
        except FleetprovError as exc:
            if not _can_wait_out(exc):
                raise
            left = jit.wait - (time.monotonic() - started)
            if left <= 0:
                raise NotActivated(
                    f"certificate not ACTIVE after {attempt} attempts in {jit.wait:g} s (last: {exc.message}): with "
                    "JITP check the CA's registration and template, with JITR the rule or person that activates "
                    "certificates",
                    step="activation",
                ) from None
            cap = min(config.retry.max_delay, config.retry.initial_delay * 2 ** min(attempt - 1, 30))
            delay = min(left, random.uniform(0, cap))  # noqa: S311 -- jitter, not cryptography
            waiting.attempt_failed(attempt, exc, delay)
            await asyncio.sleep(delay)


async def enrol(config: Config, store: Store, environ: Mapping[str, str], report: Report) -> Generation:
    """Make the device's own certificate its identity once AWS IoT has registered and activated it."""
    jit = config.jit
    if jit is None:
        raise ConfigError("this device uses fleet provisioning by claim, not jit:", step="config")
    material = check_material(jit, dt.datetime.now(dt.timezone.utc))
    log.info("JIT identity: certificate %s, thing %s", material.certificate_id, material.thing_name)
    staging = store.stage()
    waiting = _Waiting(store.state_dir, material, report)
    try:
        _stage(config, jit, material, staging)
        client_id = device_client_id(config, material.thing_name)
        identity = device_identity(
            config, staging.path / "certificate.pem", _key_reference(jit), staging.private_key, environ
        )
        report(f"connecting as {client_id} with certificate {material.certificate_id[:12]}")
        await _connected(config, jit, identity, client_id, waiting)
        with step("commit"):
            generation = store.commit(staging, publish=True)
    except BaseException:
        staging.discard()
        raise
    finally:
        waiting.done()
    await run_hooks(config, generation, environ)
    return generation
