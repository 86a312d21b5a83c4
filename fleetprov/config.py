"""The device agent's configuration: a YAML file, then ``FLEETPROV_*`` environment variables, then the command line.

Every key is documented in ``configs/config.example.yaml``. Unknown keys, wrong types, out-of-range values and
missing required keys are ConfigErrors (exit 78) naming the file, or the environment variable or flag that set
the value, and the dotted key. Whether the files the config names exist is checked where they are used.

Environment overrides: a variable whose name is ``FLEETPROV_`` + an upper-cased top-level key, alone or followed
by ``__`` and the next level, e.g. ``FLEETPROV_PORT``, ``FLEETPROV_PROXY__HOST``,
``FLEETPROV_PROVISIONING__PARAMETERS__STATIC__DeviceLocation`` (template parameter names keep their case).
Other ``FLEETPROV_*`` variables (``FLEETPROV_CONFIG``, sources of ``parameters.from_env``) are not overrides.
Values are read as YAML, as if written after the key in the file: ``443`` is an integer, ``null`` or an empty
value removes the key (its default applies), ``[a, b]`` is a list.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional

import yaml

from fleetprov.claim_inbox import CERTIFICATE_FILE as CLAIM_CERTIFICATE_FILE
from fleetprov.claim_inbox import KEY_FILE as CLAIM_KEY_FILE
from fleetprov.claim_inbox import PENDING as PENDING_CLAIM
from fleetprov.errors import ConfigError
from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX, FACT_NAMES
from fleetprov.keys.pkcs11_settings import Pkcs11Settings
from fleetprov.keys.pkcs11_uri import URI_SCHEME, Pkcs11Uri, parse_pkcs11_uri
from fleetprov.yamlread import YamlReader, load_yaml_mapping, parse_yaml

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_DIR",
    "ENV_PREFIX",
    "FACT_NAMES",
    "KEY_TYPES",
    "LOG_LEVELS",
    "METHODS",
    "ClaimConfig",
    "Config",
    "DaemonConfig",
    "HooksConfig",
    "JitConfig",
    "KeysConfig",
    "ParametersConfig",
    "ProvisioningConfig",
    "ProxyConfig",
    "load_config",
    "render_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/fleetprov/config.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/fleetprov")
ENV_PREFIX = "FLEETPROV_"
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
METHODS = ("csr", "create-keys")
KEY_BACKENDS = ("file", "pkcs11")
DEFAULT_PKCS11_KEY_LABEL = "fleetprov-device"
LOG_LEVELS = ("debug", "info", "warning", "error")
MQTT_VERSIONS = (3, 5)
REDACTED = "<redacted>"


@dataclass(frozen=True)
class ProxyConfig:
    """An HTTP proxy reached with CONNECT."""

    host: str
    port: int
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)  # a secret: never logged, rendered as <redacted>


@dataclass(frozen=True)
class ClaimConfig:
    certificate: Path
    private_key: Optional[Path]  # None when the claim key is in a PKCS#11 token: then private_key_uri
    client_id: Optional[str] = None  # None: derived per device (fleetprov.facts), never one ID for the fleet
    private_key_uri: Optional[Pkcs11Uri] = None  # the claim key in keys.pkcs11's library, with its PIN
    remove_after_success: bool = False  # delete the claim's key file once an identity is committed
    inbox: Optional[Path] = None  # trusted user: temporary claims arrive here (`fleetprov claim install`)


JIT_THING_NAME_SOURCES = ("common-name", "serial-number", "certificate-id")


@dataclass(frozen=True)
class JitConfig:
    """JITP/JITR: the device holds a certificate signed by the customer's CA; AWS IoT registers it when the
    device first connects (fleetprov/jit.py)."""

    certificate: Path  # the device certificate (PEM)
    private_key: Optional[Path]  # its key in a file, or None: private_key_uri names it in the token
    ca_certificate: Optional[Path] = None  # the CA that signed it: checked, and sent after it as the chain
    private_key_uri: Optional[Pkcs11Uri] = None
    thing_name: Optional[str] = None  # the thing the template names; None: from thing_name_from
    thing_name_from: str = "common-name"  # one of JIT_THING_NAME_SOURCES
    wait: float = 3600.0  # seconds one run keeps connecting until the certificate is ACTIVE; then exit 75


@dataclass(frozen=True)
class KeysConfig:
    """Where the device key lives: a file in the generation (default) or a PKCS#11 token."""

    backend: str = "file"  # one of KEY_BACKENDS
    pkcs11: Optional[Pkcs11Settings] = None  # required for backend pkcs11 and for a claim key in a token


@dataclass(frozen=True)
class ParametersConfig:
    """Template parameters; merged in this order, later sources winning: static, from_env, facts, command."""

    static: Mapping[str, str] = field(default_factory=dict)  # parameter -> literal value
    from_env: Mapping[str, str] = field(default_factory=dict)  # parameter -> environment variable name
    facts: Mapping[str, str] = field(default_factory=dict)  # parameter -> one of FACT_NAMES
    command: Optional[tuple[str, ...]] = None  # argv of a program printing a JSON object of string values
    command_timeout: float = 10.0


@dataclass(frozen=True)
class ProvisioningConfig:
    template: str
    method: str = "csr"  # one of METHODS
    key_type: str = "ec-p256"  # one of KEY_TYPES
    parameters: ParametersConfig = field(default_factory=ParametersConfig)


RETRY_STRATEGIES = ("exponential", "fixed")


@dataclass(frozen=True)
class RetryConfig:
    """How long to keep trying through transient failures (timeouts, lost connections, 429, 5xx)."""

    initial_delay: float = 1.0  # seconds; delays grow exponentially with full jitter
    max_delay: float = 60.0  # cap of one delay
    budget: float = 600.0  # seconds from the first attempt; then give up with exit 75
    max_attempts: int = 10
    strategy: str = "exponential"  # or "fixed": always initial_delay, no jitter (for comparisons)


DEFAULT_HOOKS_DIR = Path("/etc/fleetprov/hooks.d")


@dataclass(frozen=True)
class HooksConfig:
    """Executables run after each commit of a new identity (fleetprov/hooks.py)."""

    directory: Path = DEFAULT_HOOKS_DIR
    timeout: float = 30.0  # seconds per hook; then it is killed


@dataclass(frozen=True)
class DaemonConfig:
    """`fleetprov run`: how the permanent connection is held."""

    reconnect_initial_delay: float = 1.0  # seconds; reconnect delays grow exponentially with full jitter
    reconnect_max_delay: float = 120.0  # cap of one reconnect delay
    reprovision_after: int = 3  # refusals of the permanent certificate in a row before provisioning anew; 0: never
    rotate_before: float = 30 * 86400.0  # seconds before the certificate's not-after to rotate it; 0: never
    rotation_template: Optional[str] = None  # RegisterThing template for rotation; None: provisioning.template


@dataclass(frozen=True)
class Config:
    source: Optional[Path]  # the YAML file it came from
    endpoint: str  # host name of the AWS IoT data endpoint
    root_ca: Path  # CA bundle that verifies the endpoint
    claim: Optional[ClaimConfig]  # None with jit: the two ways in exclude each other
    provisioning: Optional[ProvisioningConfig]
    port: int = 8883  # 443 means ALPN x-amzn-mqtt-ca
    mqtt_version: int = 3  # 3 (MQTT 3.1.1) or 5
    keep_alive: int = 60  # seconds
    operation_timeout: float = 30.0  # seconds per network operation
    proxy: Optional[ProxyConfig] = None
    device_client_id: Optional[str] = None  # None: the thing name
    state_dir: Path = DEFAULT_STATE_DIR
    log_level: str = "info"  # one of LOG_LEVELS
    retry: RetryConfig = RetryConfig()
    keys: KeysConfig = KeysConfig()
    daemon: DaemonConfig = DaemonConfig()
    hooks: HooksConfig = HooksConfig()
    share_with_group: bool = False  # group `fleetprov` may read the published identity (docs/device-agent.md)
    clock_sync_timeout: float = 300.0  # seconds to wait for an implausible (pre-release) clock to be synchronised
    jit: Optional[JitConfig] = None  # JITP/JITR instead of a claim

    def required_claim(self) -> ClaimConfig:
        """The claim section, for what only fleet provisioning by claim does."""
        if self.claim is None:
            raise ConfigError("fleet provisioning by claim needs claim:; this device uses jit:", step="config")
        return self.claim

    def required_provisioning(self) -> ProvisioningConfig:
        """The provisioning section, for what only fleet provisioning by claim does."""
        if self.provisioning is None:
            raise ConfigError("fleet provisioning by claim needs provisioning:; this device uses jit:", step="config")
        return self.provisioning


# The key layout, section by dotted path. Keys of the _NAME_MAPS sections are template parameter names.
_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "endpoint", "port", "root_ca", "mqtt_version", "keep_alive", "operation_timeout", "proxy", "claim",
        "provisioning", "device", "state_dir", "log_level", "retry", "clock_sync_timeout", "keys", "daemon",
        "hooks", "share_with_group", "jit",
    ),
    "jit": (
        "certificate", "ca_certificate", "private_key", "thing_name", "thing_name_from", "wait",
    ),
    "hooks": ("directory", "timeout"),
    "daemon": (
        "reconnect_initial_delay", "reconnect_max_delay", "reprovision_after", "rotate_before", "rotation_template",
    ),
    "keys": ("backend", "pkcs11"),
    "keys.pkcs11": (
        "library", "token_label", "slot", "key_label", "key_id", "pin_file", "pin_env", "pin_credential",
    ),
    "retry": ("initial_delay", "max_delay", "budget", "max_attempts", "strategy"),
    "proxy": ("host", "port", "username", "password"),
    "claim": ("certificate", "private_key", "client_id", "remove_after_success", "inbox"),
    "provisioning": ("template", "method", "key_type", "parameters"),
    "provisioning.parameters": ("static", "from_env", "facts", "command", "command_timeout"),
    "device": ("client_id",),
}  # fmt: skip
_NAME_MAPS = ("provisioning.parameters.static", "provisioning.parameters.from_env", "provisioning.parameters.facts")

_NO_OVERRIDES: Mapping[str, str] = MappingProxyType({})
_TEMPLATE_NAME = re.compile(r"[0-9A-Za-z_-]{1,36}")  # AWS's templateName pattern; it is part of the topics
_MAX_CLIENT_ID_BYTES = 128  # AWS IoT refuses longer MQTT client IDs
_KEEP_ALIVE_RANGE = (5, 1200)  # AWS IoT allows up to 1200 s; short values help tests


def load_config(
    path: Path, environ: Mapping[str, str] = os.environ, overrides: Mapping[str, str] = _NO_OVERRIDES
) -> Config:
    """The effective configuration: ``path``, then ``FLEETPROV_*`` variables of ``environ``, then ``overrides``.

    ``overrides`` come from the command line: dotted key paths (``state_dir``, ``proxy.host``) to values read
    as YAML, like environment values. Relative paths resolve against the file's directory when they come from
    the file, against the current directory when they come from the environment or the command line.
    """
    data = load_yaml_mapping(path)
    origins: dict[str, str] = {}
    env_overrides = [
        (key_path, f"environment variable {name}", text)
        for name, text in environ.items()
        if (key_path := _env_key_path(name)) is not None
    ]
    cli_overrides = [
        (_key_path(dotted.split("."), "command line"), "command line", text) for dotted, text in overrides.items()
    ]
    for key_path, where, text in _shallow_first(env_overrides) + _shallow_first(cli_overrides):
        _apply(data, key_path, _yaml_value(text, where), where=where, origins=origins, file=str(path))
    top = YamlReader(data, str(path), origins=origins)
    return _parse(top, path, path.absolute().parent, _default_state_dir(environ))


def render_config(config: Config) -> str:
    """The effective configuration as YAML in the file's layout, with secrets replaced by ``<redacted>``."""
    proxy = config.proxy
    document = {
        "endpoint": config.endpoint,
        "port": config.port,
        "root_ca": str(config.root_ca),
        "mqtt_version": config.mqtt_version,
        "keep_alive": config.keep_alive,
        "operation_timeout": config.operation_timeout,
        "proxy": None
        if proxy is None
        else {
            "host": proxy.host,
            "port": proxy.port,
            "username": proxy.username,
            "password": None if proxy.password is None else REDACTED,
        },
        **_render_way_in(config),
        "device": {"client_id": config.device_client_id},
        "state_dir": str(config.state_dir),
        "log_level": config.log_level,
        "clock_sync_timeout": config.clock_sync_timeout,
        "keys": _render_keys(config.keys),
        "hooks": {"directory": str(config.hooks.directory), "timeout": config.hooks.timeout},
        "share_with_group": config.share_with_group,
        "daemon": {
            "reconnect_initial_delay": config.daemon.reconnect_initial_delay,
            "reconnect_max_delay": config.daemon.reconnect_max_delay,
            "reprovision_after": config.daemon.reprovision_after,
            "rotate_before": config.daemon.rotate_before,
            "rotation_template": config.daemon.rotation_template,
        },
        "retry": {
            "initial_delay": config.retry.initial_delay,
            "max_delay": config.retry.max_delay,
            "budget": config.retry.budget,
            "max_attempts": config.retry.max_attempts,
            "strategy": config.retry.strategy,
        },
    }
    # ASCII with escapes: PyYAML emits some characters (NEL, U+0085) raw that it then reads back as line breaks.
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _render_way_in(config: Config) -> dict[str, object]:
    """claim: and provisioning:, or jit:"""
    jit = config.jit
    if jit is not None:
        return {
            "jit": {
                "certificate": str(jit.certificate),
                "ca_certificate": None if jit.ca_certificate is None else str(jit.ca_certificate),
                "private_key": str(jit.private_key_uri or jit.private_key),
                "thing_name": jit.thing_name,
                "thing_name_from": None if jit.thing_name else jit.thing_name_from,
                "wait": jit.wait,
            }
        }
    claim, provisioning = config.required_claim(), config.required_provisioning()
    parameters = provisioning.parameters
    rendered_claim: dict[str, object] = (
        {"inbox": str(claim.inbox)}
        if claim.inbox is not None
        else {
            "certificate": str(claim.certificate),
            "private_key": str(claim.private_key_uri or claim.private_key),
            "remove_after_success": claim.remove_after_success,
        }
    )
    rendered_claim["client_id"] = claim.client_id
    return {
        "claim": rendered_claim,
        "provisioning": {
            "template": provisioning.template,
            "method": provisioning.method,
            "key_type": provisioning.key_type,
            "parameters": {
                "static": dict(parameters.static),
                "from_env": dict(parameters.from_env),
                "facts": dict(parameters.facts),
                "command": None if parameters.command is None else list(parameters.command),
                "command_timeout": parameters.command_timeout,
            },
        },
    }


def _render_keys(keys: KeysConfig) -> dict[str, object]:
    token = keys.pkcs11
    if token is None:
        return {"backend": keys.backend, "pkcs11": None}
    settings = {
        "library": str(token.library),
        "token_label": token.token_label,
        "slot": token.slot,
        "key_label": token.key_label,
        "key_id": None if token.key_id is None else token.key_id.hex(),
        "pin_file": None if token.pin_file is None else str(token.pin_file),
        "pin_env": token.pin_env,
        "pin_credential": token.pin_credential,
    }
    return {"backend": keys.backend, "pkcs11": {name: value for name, value in settings.items() if value is not None}}


# --- overrides -----------------------------------------------------------------------------------


def _shallow_first(overrides: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    # So that FLEETPROV_PROXY=null and FLEETPROV_PROXY__HOST=h together leave a proxy with host h.
    return sorted(overrides, key=lambda item: (item[0].count("."), item[0]))


def _env_key_path(name: str) -> Optional[str]:
    """The dotted key path a FLEETPROV_* variable overrides, or None when the variable is not an override."""
    if not name.startswith(ENV_PREFIX):
        return None
    segments = name[len(ENV_PREFIX) :].split("__")
    if segments[0] not in {key.upper() for key in _KEYS[""]}:
        return None
    return _key_path(segments, f"environment variable {name}")


def _key_path(segments: list[str], where: str) -> str:
    """Fixed keys match in any case below the top level; template parameter names keep theirs."""
    path: list[str] = []
    for segment in segments:
        section = ".".join(path)
        if section in _NAME_MAPS and not segment:
            raise ConfigError(f"{where}: {section}: empty template parameter name", step="config")
        if section in _NAME_MAPS:
            path.append(segment)
        elif section in _KEYS and segment.lower() in _KEYS[section]:
            path.append(segment.lower())
        elif section in _KEYS:
            known = ", ".join(_KEYS[section])
            raise ConfigError(
                f"{where}: {section or '(top level)'}: no key {segment!r} (known: {known})", step="config"
            )
        else:
            raise ConfigError(f"{where}: {section}: not a section, it has no key {segment!r}", step="config")
    return ".".join(path)


def _yaml_value(text: str, where: str) -> Any:
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        # Not PyYAML's message: it quotes the value, which may be a password.
        raise ConfigError(f"{where}: not a valid YAML value (quote it)", step="config") from None


def _apply(data: dict[Any, Any], key_path: str, value: Any, *, where: str, origins: dict[str, str], file: str) -> None:
    """Set ``key_path`` in ``data`` to ``value`` (None removes it), creating sections on the way."""
    *sections, key = key_path.split(".")
    node = data
    for depth, name in enumerate(sections):
        child = node.get(name)
        section = ".".join(sections[: depth + 1])
        if child is not None and not isinstance(child, dict):
            raise YamlReader({}, file, origins=origins).error(
                section, f"expected a mapping, got {type(child).__name__}"
            )
        if child is None:
            # The override made this section: what it lacks is reported against the override, not the file.
            origins.setdefault(section, where)
        # A copy: a YAML alias may share this mapping with another section.
        node[name] = dict(child or {})
        node = node[name]
    if value is None:
        node.pop(key, None)
    else:
        node[key] = value
    for stale in [path for path in origins if path.startswith(f"{key_path}.")]:
        del origins[stale]
    origins[key_path] = where


def _default_state_dir(environ: Mapping[str, str]) -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY, colon-separated when the unit names several.
    first = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path.cwd() / first if first else DEFAULT_STATE_DIR


# --- parsing -------------------------------------------------------------------------------------


def _parse(top: YamlReader, source: Path, base: Path, default_state_dir: Path) -> Config:
    top.check_keys(_KEYS[""])
    config = _parse_keys(top, source, base, default_state_dir)
    _check_key_places(top, config)
    return config


def _check_key_places(top: YamlReader, config: Config) -> None:
    """What the sections allow alone but not together."""
    token = config.keys.pkcs11
    if config.keys.backend == "pkcs11" and token is None:
        raise top.error("keys.pkcs11", "missing: the token (library, token_label, a PIN source) for backend pkcs11")
    if config.claim is not None and config.claim.private_key_uri is not None and token is None:
        raise top.error("keys.pkcs11", "missing: the PKCS#11 library and PIN for the claim key's pkcs11: URI")
    if config.jit is not None and config.jit.private_key_uri is not None and token is None:
        raise top.error("keys.pkcs11", "missing: the PKCS#11 library and PIN for the device key's pkcs11: URI")
    if config.jit is not None and config.daemon.rotation_template is not None:
        # Rotation sends CreateCertificateFromCsr and RegisterThing, which need provisioning.parameters.
        raise top.error("daemon.rotation_template", "rotation is for identities provisioned by claim, not jit:")
    method = config.provisioning.method if config.provisioning is not None else None
    if config.keys.backend == "pkcs11" and method == "create-keys":
        raise top.error(
            "provisioning.method",
            "create-keys cannot keep its key in a PKCS#11 token (the service makes that key, outside the token): "
            "use csr with keys.backend pkcs11",
        )


def _parse_keys(top: YamlReader, source: Path, base: Path, default_state_dir: Path) -> Config:
    # Keyword arguments are evaluated in order: the file's order, so the first error is the first bad key.
    return Config(
        source=source,
        endpoint=_endpoint(top),
        port=_port(top, "port", 8883),
        root_ca=_required_path(top, "root_ca", base, "the CA bundle that verifies the endpoint"),
        mqtt_version=_choice(top, "mqtt_version", int, MQTT_VERSIONS, 3),
        keep_alive=_keep_alive(top),
        operation_timeout=_seconds(top, "operation_timeout", 30.0),
        proxy=_proxy(top.child("proxy")),
        claim=_claim_section(top, base),
        provisioning=_provisioning_section(top),
        device_client_id=_device_client_id(top.child("device")),
        state_dir=_path(top, "state_dir", base) or default_state_dir,
        log_level=_log_level(top),
        retry=_retry(top.child("retry")),
        keys=_keys(top.child("keys"), base),
        daemon=_daemon(top.child("daemon")),
        hooks=_hooks(top.child("hooks"), base),
        share_with_group=top.get("share_with_group", bool, False),
        clock_sync_timeout=_clock_sync_timeout(top),
        jit=_jit_section(top, base),
    )


def _claim_section(top: YamlReader, base: Path) -> Optional[ClaimConfig]:
    if _uses_jit(top, "claim"):
        return None
    return _claim(_required_section(top, "claim", "the claim certificate and key (certificate, private_key)"), base)


def _provisioning_section(top: YamlReader) -> Optional[ProvisioningConfig]:
    if _uses_jit(top, "provisioning"):
        return None
    return _provisioning(_required_section(top, "provisioning", "the provisioning template (template)"))


def _uses_jit(top: YamlReader, section: str) -> bool:
    """True when the device uses jit: (then ``section``, of fleet provisioning by claim, must be absent)."""
    if top.child("jit") is None:
        return False
    if top.child(section) is not None:
        raise top.error(
            section, "jit: and fleet provisioning by claim exclude each other: remove claim: and provisioning:"
        )
    return True


def _jit_section(top: YamlReader, base: Path) -> Optional[JitConfig]:
    section = top.child("jit")
    if section is None:
        return None
    section.check_keys(_KEYS["jit"])
    certificate = _required_path(section, "certificate", base, "the device certificate signed by your CA (PEM)")
    ca_certificate = _path(section, "ca_certificate", base)
    key = _required_text(section, "private_key", "the device certificate's private key (PEM, or a pkcs11: URI)")
    key_path, key_uri = (
        (None, _key_uri(section)) if key.startswith(URI_SCHEME) else (_path(section, "private_key", base), None)
    )
    thing_name = _text(section, "thing_name")
    if thing_name is not None and "thing_name_from" in section.data:
        raise section.error("thing_name", "give thing_name or thing_name_from, not both")
    wait = section.number("wait", 3600.0)
    if not (math.isfinite(wait) and wait > 0):
        raise section.error("wait", "must be a positive number of seconds")
    return JitConfig(
        certificate=certificate,
        private_key=key_path,
        ca_certificate=ca_certificate,
        private_key_uri=key_uri,
        thing_name=thing_name,
        thing_name_from=_choice(section, "thing_name_from", str, JIT_THING_NAME_SOURCES, "common-name"),
        wait=wait,
    )


def _key_uri(section: YamlReader) -> Pkcs11Uri:
    """A private key in a token, named by the section's private_key URI (by label: awscrt selects keys so)."""
    try:
        uri = parse_pkcs11_uri(section.get("private_key", str))
    except ValueError as exc:
        raise section.error("private_key", f"not a usable PKCS#11 URI: {exc}") from None
    if uri.key_label is None or uri.object_type != "private":
        raise section.error("private_key", "a key URI names a private key by label (object=...)")
    return uri


def _clock_sync_timeout(top: YamlReader) -> float:
    seconds = top.number("clock_sync_timeout", 300.0)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise top.error("clock_sync_timeout", "must be zero or a positive number of seconds")
    return seconds


def _retry(section: Optional[YamlReader]) -> RetryConfig:
    if section is None:
        return RetryConfig()
    section.check_keys(_KEYS["retry"])
    max_attempts = section.get("max_attempts", int, RetryConfig.max_attempts)
    if max_attempts < 1:
        raise section.error("max_attempts", "must be at least 1")
    retry = RetryConfig(
        initial_delay=_seconds(section, "initial_delay", RetryConfig.initial_delay),
        max_delay=_seconds(section, "max_delay", RetryConfig.max_delay),
        budget=_seconds(section, "budget", RetryConfig.budget),
        max_attempts=max_attempts,
        strategy=_choice(section, "strategy", str, RETRY_STRATEGIES, RetryConfig.strategy),
    )
    if retry.max_delay < retry.initial_delay:
        raise section.error("max_delay", "must not be smaller than retry.initial_delay")
    return retry


def _hooks(section: Optional[YamlReader], base: Path) -> HooksConfig:
    if section is None:
        return HooksConfig()
    section.check_keys(_KEYS["hooks"])
    timeout = _seconds(section, "timeout", HooksConfig.timeout)
    if timeout <= 0:
        raise section.error("timeout", "must be a positive number of seconds")
    return HooksConfig(directory=_path(section, "directory", base) or DEFAULT_HOOKS_DIR, timeout=timeout)


def _daemon(section: Optional[YamlReader]) -> DaemonConfig:
    if section is None:
        return DaemonConfig()
    section.check_keys(_KEYS["daemon"])
    reprovision_after: int = section.get("reprovision_after", int, DaemonConfig.reprovision_after)
    if reprovision_after < 0:
        raise section.error("reprovision_after", "must be 0 (never) or a positive count of refusals")
    rotate_before = section.number("rotate_before", DaemonConfig.rotate_before)
    if not (math.isfinite(rotate_before) and rotate_before >= 0):
        raise section.error("rotate_before", "must be 0 (never) or a positive number of seconds")
    rotation_template = _text(section, "rotation_template")
    if rotation_template is not None and not _TEMPLATE_NAME.fullmatch(rotation_template):
        raise section.error("rotation_template", "not a template name (1-36 of A-Z a-z 0-9 _ -)")
    daemon = DaemonConfig(
        reconnect_initial_delay=_seconds(section, "reconnect_initial_delay", DaemonConfig.reconnect_initial_delay),
        reconnect_max_delay=_seconds(section, "reconnect_max_delay", DaemonConfig.reconnect_max_delay),
        reprovision_after=reprovision_after,
        rotate_before=rotate_before,
        rotation_template=rotation_template,
    )
    if daemon.reconnect_max_delay < daemon.reconnect_initial_delay:
        raise section.error("reconnect_max_delay", "must not be smaller than daemon.reconnect_initial_delay")
    return daemon


def _required_section(top: YamlReader, key: str, what: str) -> YamlReader:
    section = top.child(key)
    if section is None:
        raise top.error(key, f"missing: {what}")
    section.check_keys(_KEYS[key])
    return section


def _text(reader: YamlReader, key: str) -> Optional[str]:
    """A non-empty string. The value never appears in the error: it may be a secret."""
    value: Optional[str] = reader.get(key, str)
    if value == "":
        raise reader.error(key, "must not be empty")
    return value


def _required_text(reader: YamlReader, key: str, what: str) -> str:
    value = _text(reader, key)
    if value is None:
        raise reader.error(key, f"missing: {what}")
    return value


def _path(reader: YamlReader, key: str, base: Path) -> Optional[Path]:
    text = _text(reader, key)
    if text is None:
        return None
    if "\0" in text:
        raise reader.error(key, "a path cannot contain a NUL character")
    # Values from the environment or the command line are relative to where fleetprov was started.
    return (Path.cwd() if reader.origin(key) else base) / text


def _required_path(reader: YamlReader, key: str, base: Path, what: str) -> Path:
    path = _path(reader, key, base)
    if path is None:
        raise reader.error(key, f"missing: {what}")
    return path


def _endpoint(top: YamlReader) -> str:
    endpoint = _required_text(top, "endpoint", "the AWS IoT data endpoint (aws iot describe-endpoint)")
    if "/" in endpoint or any(char.isspace() for char in endpoint):
        raise top.error("endpoint", f"{endpoint!r} is not a host name (no scheme, path or spaces)")
    if endpoint.count(":") == 1:
        raise top.error("endpoint", f"{endpoint!r} is not a host name: give the port in `port`")
    return endpoint


def _port(reader: YamlReader, key: str, default: Optional[int]) -> int:
    port: Optional[int] = reader.get(key, int, default)
    if port is None:
        raise reader.error(key, "missing: the TCP port")
    if not 1 <= port <= 65535:
        raise reader.error(key, f"{port} is not a TCP port (1..65535)")
    return port


def _choice(reader: YamlReader, key: str, kind: type, allowed: tuple[Any, ...], default: Any) -> Any:
    value = reader.get(key, kind, default)
    if value not in allowed:
        raise reader.error(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def _keep_alive(top: YamlReader) -> int:
    low, high = _KEEP_ALIVE_RANGE
    keep_alive: int = top.get("keep_alive", int, 60)
    if not low <= keep_alive <= high:
        raise top.error("keep_alive", f"{keep_alive} is not between {low} and {high} seconds")
    return keep_alive


def _seconds(reader: YamlReader, key: str, default: float) -> float:
    seconds = reader.number(key, default)
    if not (math.isfinite(seconds) and seconds > 0):
        raise reader.error(key, "must be a positive number of seconds")
    return seconds


def _client_id(reader: YamlReader) -> Optional[str]:
    client_id = _text(reader, "client_id")
    if client_id is not None and len(client_id.encode()) > _MAX_CLIENT_ID_BYTES:
        raise reader.error("client_id", f"longer than AWS IoT's {_MAX_CLIENT_ID_BYTES} bytes")
    return client_id


def _claim_client_id(section: YamlReader) -> Optional[str]:
    """The shipped claim policies let a claim connect only with a client id of this prefix (fleetprov.facts)."""
    client_id = _client_id(section)
    if client_id is not None and not client_id.startswith(CLAIM_CLIENT_ID_PREFIX):
        raise section.error(
            "client_id",
            f"{client_id!r} does not start with {CLAIM_CLIENT_ID_PREFIX!r}: the claim policy allows claim connections "
            "only with client ids of that prefix, so that no claim holder can take a provisioned device's client id; "
            "leave claim.client_id out (fleetprov derives one per device) or start it with the prefix",
        )
    return client_id


def _device_client_id(section: Optional[YamlReader]) -> Optional[str]:
    if section is None:
        return None
    section.check_keys(_KEYS["device"])
    client_id = _client_id(section)
    if client_id is not None and client_id.startswith(CLAIM_CLIENT_ID_PREFIX):
        raise section.error(
            "client_id",
            f"{client_id!r} starts with {CLAIM_CLIENT_ID_PREFIX!r}, the prefix of claim connections, which every "
            "claim holder may use: a device's own client id must not (leave it out: the thing name is used)",
        )
    return client_id


def _log_level(top: YamlReader) -> str:
    level: str = top.get("log_level", str, "info")
    if level.lower() not in LOG_LEVELS:
        raise top.error("log_level", f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
    return level.lower()


def _proxy(section: Optional[YamlReader]) -> Optional[ProxyConfig]:
    if section is None:
        return None
    section.check_keys(_KEYS["proxy"])
    username = _text(section, "username")
    password = _text(section, "password")
    if password is not None and username is None:
        raise section.error("password", "given without proxy.username")
    host = _required_text(section, "host", "the proxy's host name")
    if any(char in host for char in "/@") or any(char.isspace() for char in host):
        # Not echoed: a proxy URL (as in https_proxy) may carry a password.
        raise section.error(
            "host",
            "give the proxy's host name only, not a URL (no scheme, user, password or path); "
            "credentials go in proxy.username and proxy.password",
        )
    return ProxyConfig(
        host=host,
        port=_port(section, "port", None),
        username=username,
        password=password,
    )


def _claim(section: YamlReader, base: Path) -> ClaimConfig:
    inbox = _path(section, "inbox", base)
    if inbox is not None:
        return _trusted_user_claim(section, inbox)
    certificate = _required_path(section, "certificate", base, "the claim certificate (PEM)")
    key = _required_text(section, "private_key", "the claim certificate's private key (PEM, or a pkcs11: URI)")
    remove: bool = section.get("remove_after_success", bool, False)
    if key.startswith(URI_SCHEME):
        uri = _key_uri(section)
        if remove:
            raise section.error(
                "remove_after_success", "fleetprov removes claim key files only; a key in a token stays there"
            )
        return ClaimConfig(certificate, None, _claim_client_id(section), uri)
    return ClaimConfig(
        certificate=certificate,
        private_key=_required_path(section, "private_key", base, "the claim certificate's private key (PEM)"),
        client_id=_claim_client_id(section),
        remove_after_success=remove,
    )


def _trusted_user_claim(section: YamlReader, inbox: Path) -> ClaimConfig:
    """Fleet provisioning by trusted user: the claim is the temporary one `fleetprov claim install` left in the
    inbox, at fixed paths through the inbox's `pending` link."""
    for key in ("certificate", "private_key", "remove_after_success"):
        if key in section.data:
            raise section.error(
                key, "claim.inbox (temporary claims from a trusted user) replaces certificate and private_key; "
                "fleetprov removes each temporary claim once used"
            )  # fmt: skip
    pending = inbox / PENDING_CLAIM
    return ClaimConfig(
        certificate=pending / CLAIM_CERTIFICATE_FILE,
        private_key=pending / CLAIM_KEY_FILE,
        client_id=_claim_client_id(section),
        inbox=inbox,
    )


def _keys(section: Optional[YamlReader], base: Path) -> KeysConfig:
    if section is None:
        return KeysConfig()
    section.check_keys(_KEYS["keys"])
    backend = _choice(section, "backend", str, KEY_BACKENDS, "file")
    token = section.child("pkcs11")
    return KeysConfig(backend=backend, pkcs11=None if token is None else _pkcs11(token, base))


def _pkcs11(section: YamlReader, base: Path) -> Pkcs11Settings:
    if "pin" in section.data:
        # Config files are copied, diffed and attached to bug reports: a PIN does not belong in one.
        raise section.error("pin", "a PIN in the config file is refused: use pin_file, pin_env or pin_credential")
    section.check_keys(_KEYS["keys.pkcs11"])
    library = _required_path(section, "library", base, "the PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so)")
    slot = section.get("slot", int)
    key_id = _text(section, "key_id")
    try:
        key_id_bytes = None if key_id is None else bytes.fromhex(key_id)
    except ValueError:
        raise section.error("key_id", "expected hexadecimal digits, e.g. '01a2'") from None
    try:
        return Pkcs11Settings(
            library=library,
            token_label=_text(section, "token_label"),
            slot=slot,
            key_label=_text(section, "key_label") or DEFAULT_PKCS11_KEY_LABEL,
            key_id=key_id_bytes,
            pin_file=_path(section, "pin_file", base),
            pin_env=_text(section, "pin_env"),
            pin_credential=_text(section, "pin_credential"),
        )
    except ValueError as exc:  # which of the keys go together
        raise section.error("", str(exc)) from None


def _provisioning(section: YamlReader) -> ProvisioningConfig:
    template = _required_text(section, "template", "the name of the provisioning template")
    if not _TEMPLATE_NAME.fullmatch(template):
        raise section.error("template", f"{template!r} is not a template name (1-36 of A-Z a-z 0-9 _ -)")
    parameters = section.child("parameters")
    return ProvisioningConfig(
        template=template,
        method=_choice(section, "method", str, METHODS, "csr"),
        key_type=_choice(section, "key_type", str, KEY_TYPES, "ec-p256"),
        parameters=ParametersConfig() if parameters is None else _parameters(parameters),
    )


def _parameters(section: YamlReader) -> ParametersConfig:
    section.check_keys(_KEYS["provisioning.parameters"])
    facts = _names(section, "facts", "a device fact")
    for name, fact in facts.items():
        if fact not in FACT_NAMES:
            raise section.error(f"facts.{name}", f"{fact!r} is not one of {', '.join(FACT_NAMES)}")
    return ParametersConfig(
        static=_names(section, "static", "the parameter's value (quote numbers)"),
        from_env=_names(section, "from_env", "the name of an environment variable"),
        facts=facts,
        command=_command(section),
        command_timeout=_seconds(section, "command_timeout", 10.0),
    )


def _names(section: YamlReader, key: str, what: str) -> dict[str, str]:
    """A mapping of template parameter names to non-empty strings."""
    entries = section.child(key)
    if entries is None:
        return {}
    result = {}
    for name, value in entries.data.items():
        # YAML reads `123:` as an integer; parameter names may be all digits.
        if isinstance(name, bool) or not isinstance(name, (str, int)) or name == "":
            raise entries.error(str(name), "expected a template parameter name")
        if not (isinstance(value, str) and value):
            raise entries.error(str(name), f"expected a non-empty string: {what}")
        result[str(name)] = value
    return result


def _command(section: YamlReader) -> Optional[tuple[str, ...]]:
    value = section.get("command", (str, list))
    if value is None:
        return None
    if isinstance(value, list):
        argv = section.strings("command")
    else:
        try:
            argv = tuple(shlex.split(value))
        except ValueError as exc:  # an unclosed quote
            raise section.error("command", f"cannot split into arguments: {exc}") from None
    if not argv:
        raise section.error("command", "must name a program")
    return argv
