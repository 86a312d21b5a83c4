"""Run the emulator: prepare the state directory, start the broker, publish ``endpoint.json``, serve until
SIGTERM/SIGINT, then remove ``endpoint.json`` so that nobody waits on a stale one.

State directory layout::

    ca/            root CA, issuing CA, server certificate (see ca.py)
    claim/         claim.pem, claim.key: the fleet's claim certificate (no claim.key when issued from a CSR)
    lambda/        the inline Lambda functions of a CloudFormation file, run as pre-provisioning hooks
    registry.sqlite
    endpoint.json  written atomically once the broker listens
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fleetprov.atomicio import write_atomic
from fleetprov.emulator.broker import EmulatorBroker
from fleetprov.emulator.ca import CaMaterial, device_validity_problem, ensure_ca_material
from fleetprov.emulator.claims import ClaimFiles, attach_claim_policy, existing_claim, issue_claim
from fleetprov.emulator.cloudformation import CloudStack, read_stack
from fleetprov.emulator.faults import Faults
from fleetprov.emulator.policy import Policy, PolicyError, claim_policy_document
from fleetprov.emulator.registry import Registry
from fleetprov.emulator.service import ProvisioningService
from fleetprov.emulator.settings import (
    DEFAULT_CERTIFICATE_VALIDITY,
    DEFAULT_TEMPLATE_NAME,
    DEFAULT_TEMPLATE_PATH,
    EmulatorSettings,
    TemplateSource,
)
from fleetprov.emulator.stack_setup import install_stack, served_templates
from fleetprov.emulator.templates import TemplateError, parse_template
from fleetprov.errors import ConfigError, EmulatorError

log = logging.getLogger(__name__)

CLAIM_POLICY_NAME = "fleetprov-claim-policy"
SWEEP_INTERVAL_SECONDS = 5.0  # at most; shorter when tokens live shorter (tests)
STATUS_POLL_SECONDS = 1.0  # how soon a connection closes after its certificate stops being ACTIVE


def open_registry(state_dir: Path) -> Registry:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Registry(state_dir / "registry.sqlite")


def create_claim(
    registry: Registry, material: CaMaterial, out_dir: Path, templates: Optional[tuple[str, ...]]
) -> ClaimFiles:
    """Issue a claim certificate and key into ``out_dir``, registered ACTIVE with the claim policy."""
    with registry.transaction():
        files = issue_claim(registry, material, out_dir)
        attach_claim_policy(registry, CLAIM_POLICY_NAME, templates, files.certificate_id)
    return files


@dataclass(frozen=True)
class PreparedState:
    material: CaMaterial
    registry: Registry
    claim: ClaimFiles
    templates: list[str]  # what endpoint.json lists: the CloudFormation file's templates first


def prepare_state(settings: EmulatorSettings) -> PreparedState:
    """First run: create CAs, claim and registry. Later runs: reuse them and load templates again."""
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stack = _read_stack(settings)  # before anything changes: a file the emulator cannot run changes nothing
    material = ensure_ca_material(settings.state_dir)
    registry = open_registry(settings.state_dir)
    claim = None
    if stack is not None:
        claim = install_stack(stack, registry, material, settings.state_dir, region=settings.region)
    if claim is None:
        # Without a claim certificate in a CloudFormation file, the claim gets the built-in claim policy: for the
        # file's templates, or those of claim_templates.
        claim_templates = settings.claim_templates if stack is None else tuple(served_templates(stack))
        claim = _builtin_claim(registry, material, settings.state_dir / "claim", claim_templates)
    _load_templates(registry, settings)
    _load_policies(registry, settings)
    registry.add_named("thing_groups", settings.thing_groups)
    registry.add_named("thing_types", settings.thing_types)
    registry.add_named("billing_groups", settings.billing_groups)
    first = served_templates(stack) if stack is not None else []
    templates = first + [name for name in registry.template_names() if name not in first]
    return PreparedState(material, registry, claim, templates)


def _read_stack(settings: EmulatorSettings) -> Optional[CloudStack]:
    if settings.cloudformation is None:
        return None
    return read_stack(
        settings.cloudformation,
        dict(settings.cloudformation_parameters),
        region=settings.region,
        account=settings.account,
    )


def _builtin_claim(
    registry: Registry, material: CaMaterial, claim_dir: Path, templates: Optional[tuple[str, ...]]
) -> ClaimFiles:
    if (claim_dir / "claim.pem").exists():
        claim = _existing_claim(claim_dir, registry)
    else:
        claim = create_claim(registry, material, claim_dir, templates)
    # The claim policy follows the current settings, so a restricted claim can be widened again.
    registry.put_policy(CLAIM_POLICY_NAME, json.dumps(claim_policy_document(templates), sort_keys=True))
    return claim


def _existing_claim(claim_dir: Path, registry: Registry) -> ClaimFiles:
    found = existing_claim(claim_dir, registry)
    if found is None:
        raise EmulatorError(f"{claim_dir / 'claim.pem'} is not in {registry.path}: remove the state directory")
    return found[0]


def _load_templates(registry: Registry, settings: EmulatorSettings) -> None:
    sources = list(settings.templates)
    if not registry.template_names() and not any(source.path for source in sources) and not settings.cloudformation:
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
        # None when the claim was issued from a CSR: its key stays where the CSR was made.
        "claim_private_key": str(claim.private_key.resolve()) if claim.private_key is not None else None,
        "claim_certificate_id": claim.certificate_id,
        "templates": templates,
        "region": settings.region,
    }


async def serve(settings: EmulatorSettings, stop: Optional[asyncio.Event] = None) -> None:
    problem = device_validity_problem(settings.certificate_validity)
    if problem is not None:  # settings made in code rather than by load_settings/with_flags
        raise ConfigError(f"certificate_validity {settings.certificate_validity}: {problem}", step="config")
    state = prepare_state(settings)
    material, registry, claim = state.material, state.registry, state.claim
    endpoint_path = settings.state_dir / "endpoint.json"
    with contextlib.suppress(FileNotFoundError):
        endpoint_path.unlink()
    client_ca_bundle = settings.state_dir / "ca" / "client-ca-bundle.pem"
    write_atomic(client_ca_bundle, material.paths.issuing_cert.read_bytes() + material.paths.root_cert.read_bytes())
    faults = Faults(settings.faults)
    issuer = material.issuing.with_device_validity(dt.timedelta(seconds=settings.certificate_validity))
    service = ProvisioningService(
        registry, issuer, faults, token_ttl=settings.token_ttl, region=settings.region,
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
    enforcer = asyncio.ensure_future(broker.enforce_certificate_status(STATUS_POLL_SECONDS))
    try:
        write_atomic(
            endpoint_path,
            json.dumps(endpoint_document(settings, port, material, claim, state.templates), indent=2).encode(),
        )
        log.info("emulator listening on %s:%s (state %s)", settings.host, port, settings.state_dir)
        if settings.certificate_validity != DEFAULT_CERTIFICATE_VALIDITY:
            log.info("device certificates are valid for %g seconds", settings.certificate_validity)
        await stop.wait()
    finally:
        sweeper.cancel()
        enforcer.cancel()
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
