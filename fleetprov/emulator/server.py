"""Run the emulator: prepare the state directory, start the broker, publish ``endpoint.json``, serve until
SIGTERM/SIGINT, then remove ``endpoint.json`` so that nobody waits on a stale one.

State directory layout::

    ca/            root CA, issuing CA, server certificate (see ca.py)
    claim/         claim.pem, claim.key: the fleet's claim certificate
    registry.sqlite
    endpoint.json  written atomically once the broker listens
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cryptography import x509

from fleetprov.atomicio import write_atomic, write_new_private
from fleetprov.emulator.broker import EmulatorBroker
from fleetprov.emulator.ca import (
    CaMaterial,
    certificate_id,
    ensure_ca_material,
    new_client_key,
    private_key_pem,
)
from fleetprov.emulator.faults import Faults
from fleetprov.emulator.policy import Policy, PolicyError, claim_policy_document
from fleetprov.emulator.registry import Registry
from fleetprov.emulator.service import ProvisioningService
from fleetprov.emulator.settings import (
    DEFAULT_TEMPLATE_NAME,
    DEFAULT_TEMPLATE_PATH,
    EmulatorSettings,
    TemplateSource,
)
from fleetprov.emulator.templates import TemplateError, parse_template
from fleetprov.errors import ConfigError, EmulatorError

log = logging.getLogger(__name__)

CLAIM_POLICY_NAME = "fleetprov-claim-policy"
SWEEP_INTERVAL_SECONDS = 5.0  # at most; shorter when tokens live shorter (tests)


@dataclass(frozen=True)
class ClaimFiles:
    certificate: Path
    private_key: Path
    certificate_id: str


def open_registry(state_dir: Path) -> Registry:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Registry(state_dir / "registry.sqlite")


def create_claim(
    registry: Registry, material: CaMaterial, out_dir: Path, templates: Optional[tuple[str, ...]]
) -> ClaimFiles:
    """Issue a claim certificate and key into ``out_dir``, registered ACTIVE with the claim policy."""
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = new_client_key()
    issued = material.issuing.sign_client(key.public_key(), "fleetprov claim certificate")
    files = ClaimFiles(out_dir / "claim.pem", out_dir / "claim.key", issued.certificate_id)
    write_new_private(files.private_key, private_key_pem(key).encode())
    write_atomic(files.certificate, issued.certificate_pem.encode())
    with registry.transaction():
        registry.add_certificate(
            issued.certificate_id, issued.certificate_pem, status="ACTIVE", kind="claim", created_at=time.time()
        )
        registry.put_policy(CLAIM_POLICY_NAME, json.dumps(claim_policy_document(templates), sort_keys=True))
        registry.attach_policy(CLAIM_POLICY_NAME, issued.certificate_id)
    return files


def prepare_state(settings: EmulatorSettings) -> tuple[CaMaterial, Registry, ClaimFiles]:
    """First run: create CAs, claim and registry. Later runs: reuse them and load templates again."""
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    material = ensure_ca_material(settings.state_dir)
    registry = open_registry(settings.state_dir)
    claim_dir = settings.state_dir / "claim"
    if (claim_dir / "claim.pem").exists():
        claim = _existing_claim(claim_dir, registry)
    else:
        claim = create_claim(registry, material, claim_dir, settings.claim_templates)
    # The claim policy follows the current settings, so a restricted claim can be widened again.
    registry.put_policy(CLAIM_POLICY_NAME, json.dumps(claim_policy_document(settings.claim_templates), sort_keys=True))
    _load_templates(registry, settings)
    _load_policies(registry, settings)
    registry.add_named("thing_groups", settings.thing_groups)
    registry.add_named("thing_types", settings.thing_types)
    registry.add_named("billing_groups", settings.billing_groups)
    return material, registry, claim


def _existing_claim(claim_dir: Path, registry: Registry) -> ClaimFiles:
    pem = (claim_dir / "claim.pem").read_bytes()
    cert_id = certificate_id(x509.load_pem_x509_certificate(pem))
    if registry.certificate(cert_id) is None:
        raise EmulatorError(f"{claim_dir / 'claim.pem'} is not in {registry.path}: remove the state directory")
    return ClaimFiles(claim_dir / "claim.pem", claim_dir / "claim.key", cert_id)


def _load_templates(registry: Registry, settings: EmulatorSettings) -> None:
    sources = list(settings.templates)
    if not registry.template_names() and not any(source.path for source in sources):
        # First run without templates: install the demo one (a --hook may still name it).
        sources.insert(0, TemplateSource(DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE_PATH))
    for source in sources:
        if source.path is None:
            if registry.template(source.name) is None:
                raise ConfigError(f"--hook {source.name}=...: no template named {source.name!r}", step="config")
            registry.set_template_hook(source.name, source.hook or (), _cwd(source))
            continue
        try:
            body = source.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"template {source.name}: cannot read {source.path}: {exc.strerror}", step="config"
            ) from exc
        try:
            parse_template(body)
        except TemplateError as exc:
            raise ConfigError(f"template {source.name} ({source.path}): {exc.message}", step="config") from exc
        registry.put_template(source.name, body, source.hook, _cwd(source))


def _cwd(source: TemplateSource) -> Optional[str]:
    return str(source.hook_cwd) if source.hook_cwd else None


def _load_policies(registry: Registry, settings: EmulatorSettings) -> None:
    for name, path in settings.policies:
        try:
            document = path.read_text(encoding="utf-8")
            Policy.parse(name, document)
        except OSError as exc:
            raise ConfigError(f"policy {name}: cannot read {path}: {exc.strerror}", step="config") from exc
        except PolicyError as exc:
            raise ConfigError(f"policy {name} ({path}): {exc.message}", step="config") from exc
        registry.put_policy(name, document)


def endpoint_document(settings: EmulatorSettings, port: int, material: CaMaterial, claim: ClaimFiles,
                      templates: list[str]) -> dict[str, Any]:  # fmt: skip
    return {
        "host": settings.host,
        "port": port,
        "root_ca": str(material.paths.root_cert.resolve()),
        "claim_certificate": str(claim.certificate.resolve()),
        "claim_private_key": str(claim.private_key.resolve()),
        "claim_certificate_id": claim.certificate_id,
        "templates": templates,
        "region": settings.region,
    }


async def serve(settings: EmulatorSettings, stop: Optional[asyncio.Event] = None) -> None:
    material, registry, claim = prepare_state(settings)
    endpoint_path = settings.state_dir / "endpoint.json"
    with contextlib.suppress(FileNotFoundError):
        endpoint_path.unlink()
    client_ca_bundle = settings.state_dir / "ca" / "client-ca-bundle.pem"
    write_atomic(client_ca_bundle, material.paths.issuing_cert.read_bytes() + material.paths.root_cert.read_bytes())
    faults = Faults(settings.faults)
    service = ProvisioningService(
        registry, material.issuing, faults, token_ttl=settings.token_ttl, region=settings.region,
        account=settings.account,
    )  # fmt: skip
    broker = EmulatorBroker(
        {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{settings.host}:{settings.port}",
                    "ssl": True,
                    "certfile": str(material.paths.server_cert),
                    "keyfile": str(material.paths.server_key),
                    "cafile": str(client_ca_bundle),
                }
            },
            "plugins": {},
        },
        registry=registry,
        service=service,
        faults=faults,
        region=settings.region,
        account=settings.account,
    )
    amqtt_log = logging.getLogger("amqtt.broker")
    level = amqtt_log.level
    amqtt_log.setLevel(logging.CRITICAL)  # amqtt logs a traceback for a busy port; we say it in one line
    try:
        await broker.start()
    except Exception as exc:  # amqtt wraps every start failure (port in use, bad address) in BrokerError
        raise EmulatorError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from exc
    finally:
        amqtt_log.setLevel(level)
    port = broker.listening_port()
    broker.require_alpn = port == 443
    stop = stop or _stop_on_signals()
    sweeper = asyncio.ensure_future(_sweep_expired(registry, min(SWEEP_INTERVAL_SECONDS, settings.token_ttl / 2)))
    try:
        write_atomic(
            endpoint_path,
            json.dumps(
                endpoint_document(settings, port, material, claim, registry.template_names()), indent=2
            ).encode(),
        )
        log.info("emulator listening on %s:%s (state %s)", settings.host, port, settings.state_dir)
        await stop.wait()
    finally:
        sweeper.cancel()
        with contextlib.suppress(FileNotFoundError):
            endpoint_path.unlink()
        await broker.shutdown()
        registry.close()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _sweep_expired(registry: Registry, interval: float) -> None:
    """Delete certificates whose ownership token expired unused, as AWS does."""
    while True:
        await asyncio.sleep(interval)
        for expired in registry.delete_expired_pending(time.time()):
            log.info("ownership token expired: deleted certificate %s", expired)
