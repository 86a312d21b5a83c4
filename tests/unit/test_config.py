"""Tests for fleetprov.config: the agent's YAML file, FLEETPROV_* environment overrides and CLI overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import string
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetprov.config import (
    _KEYS,
    DEFAULT_STATE_DIR,
    FACT_NAMES,
    KEY_TYPES,
    METHODS,
    ClaimConfig,
    Config,
    KeysConfig,
    ParametersConfig,
    ProvisioningConfig,
    ProxyConfig,
    RetryConfig,
    load_config,
    render_config,
)
from fleetprov.errors import ConfigError
from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX
from fleetprov.keys.pkcs11_settings import Pkcs11Settings
from fleetprov.keys.pkcs11_uri import Pkcs11Uri

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "config.example.yaml"

FULL_YAML = """\
endpoint: abc123-ats.iot.eu-west-1.amazonaws.com
port: 443
root_ca: certs/AmazonRootCA1.pem
mqtt_version: 5
keep_alive: 300
operation_timeout: 12.5
proxy:
  host: proxy.example
  port: 3128
  username: device
  password: hunter2
claim:
  certificate: /etc/fleetprov/claim.pem.crt
  private_key: claim/claim.key
  client_id: fleetprov.claim-0001
provisioning:
  template: My_Template-2
  method: create-keys
  key_type: rsa-3072
  parameters:
    static: {DeviceLocation: lab, 123: digits}
    from_env: {Site: FLEETPROV_SITE}
    facts: {SerialNumber: serial, MacAddress: mac, Machine: machine_id, Host: hostname}
    command: /usr/lib/fleetprov/parameters --json "two words"
    command_timeout: 3
device: {client_id: gateway-7}
state_dir: state
log_level: DEBUG
"""

MINIMAL_YAML = """\
endpoint: localhost
root_ca: /ca.pem
claim: {certificate: /claim.crt, private_key: /claim.key}
provisioning: {template: T}
"""


def write(directory: Path, text: str, name: str = "config.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path, environ: dict[str, str] | None = None, overrides: dict[str, str] | None = None) -> Config:
    return load_config(path, environ or {}, overrides or {})


def minimal(tmp_path: Path, extra: str = "") -> Path:
    return write(tmp_path, MINIMAL_YAML + textwrap.dedent(extra))


# --- the file ------------------------------------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_YAML)

    assert load(path) == Config(
        source=path,
        endpoint="abc123-ats.iot.eu-west-1.amazonaws.com",
        root_ca=tmp_path / "certs" / "AmazonRootCA1.pem",
        claim=ClaimConfig(
            certificate=Path("/etc/fleetprov/claim.pem.crt"),
            private_key=tmp_path / "claim" / "claim.key",
            client_id="fleetprov.claim-0001",
        ),
        provisioning=ProvisioningConfig(
            template="My_Template-2",
            method="create-keys",
            key_type="rsa-3072",
            parameters=ParametersConfig(
                static={"DeviceLocation": "lab", "123": "digits"},
                from_env={"Site": "FLEETPROV_SITE"},
                facts={"SerialNumber": "serial", "MacAddress": "mac", "Machine": "machine_id", "Host": "hostname"},
                command=("/usr/lib/fleetprov/parameters", "--json", "two words"),
                command_timeout=3.0,
            ),
        ),
        port=443,
        mqtt_version=5,
        keep_alive=300,
        operation_timeout=12.5,
        proxy=ProxyConfig(host="proxy.example", port=3128, username="device", password="hunter2"),
        device_client_id="gateway-7",
        state_dir=tmp_path / "state",
        log_level="debug",
    )


def test_minimal_file_gives_defaults(tmp_path: Path) -> None:
    path = minimal(tmp_path)
    config = load(path)

    assert config == Config(
        source=path,
        endpoint="localhost",
        root_ca=Path("/ca.pem"),
        claim=ClaimConfig(Path("/claim.crt"), Path("/claim.key")),
        provisioning=ProvisioningConfig(template="T"),
    )
    assert (config.port, config.mqtt_version, config.keep_alive, config.operation_timeout) == (8883, 3, 60, 30.0)
    assert (config.proxy, config.device_client_id, config.claim.client_id) == (None, None, None)
    assert (config.state_dir, config.log_level) == (DEFAULT_STATE_DIR, "info")
    assert (config.provisioning.method, config.provisioning.key_type) == ("csr", "ec-p256")
    assert config.provisioning.parameters == ParametersConfig()
    assert config.provisioning.parameters.command_timeout == 10.0
    assert isinstance(config.operation_timeout, float)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(minimal(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_example_file_loads() -> None:
    config = load(EXAMPLE)

    assert config.source == EXAMPLE
    assert config.endpoint.endswith(".amazonaws.com")
    assert config.root_ca == Path("/etc/fleetprov/AmazonRootCA1.pem")
    assert config.claim == ClaimConfig(Path("/etc/fleetprov/claim.pem.crt"), Path("/etc/fleetprov/claim.pem.key"))
    assert config.provisioning.template == "MyTemplate"
    assert (config.provisioning.method, config.provisioning.key_type) == ("csr", "ec-p256")
    assert config.provisioning.parameters.facts == {"SerialNumber": "serial", "MacAddress": "mac"}
    assert (config.port, config.mqtt_version, config.proxy, config.state_dir) == (8883, 3, None, DEFAULT_STATE_DIR)


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = sorted({key for section in _KEYS.values() for key in section} | set(_KEYS))
    assert len(keys) > 40
    for key in (key.rpartition(".")[2] for key in keys if key):
        assert re.search(rf"^\s*#?\s*{key}:", text, re.MULTILINE), key
    for value in (*KEY_TYPES, *METHODS, *FACT_NAMES):
        assert value in text


def test_relative_paths_resolve_against_the_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    write(conf, FULL_YAML)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load(Path("../etc/config.yaml"))

    assert config.source == Path("../etc/config.yaml")
    assert config.root_ca == elsewhere / ".." / "etc" / "certs" / "AmazonRootCA1.pem"
    assert config.root_ca.is_absolute()
    assert config.claim.private_key.resolve() == (conf / "claim" / "claim.key").resolve()
    assert config.claim.certificate == Path("/etc/fleetprov/claim.pem.crt")


def test_empty_file_needs_the_required_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: endpoint: missing"):
        load(path)


def test_command_as_a_list(tmp_path: Path) -> None:
    path = minimal(tmp_path, "")
    path.write_text(MINIMAL_YAML.replace("{template: T}", "{template: T, parameters: {command: [/bin/p, a b]}}"))
    assert load(path).provisioning.parameters.command == ("/bin/p", "a b")


def test_file_does_not_check_that_referenced_files_exist(tmp_path: Path) -> None:
    config = load(minimal(tmp_path))
    assert not config.root_ca.exists()


# --- errors name the file and the key --------------------------------------------------------------

MISSING = [
    ("endpoint", "endpoint"),
    ("root_ca", "root_ca"),
    ("claim", "claim"),
    ("provisioning", "provisioning"),
]


@pytest.mark.parametrize(("drop", "key"), MISSING)
def test_missing_required_top_level_key(tmp_path: Path, drop: str, key: str) -> None:
    text = "".join(line + "\n" for line in MINIMAL_YAML.splitlines() if not line.startswith(drop))
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: {key}: missing") as caught:
        load(path)
    assert caught.value.step == "config"
    assert caught.value.exit_code == 78


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("claim: {private_key: /claim.key}", r"claim\.certificate: missing"),
        ("claim: {certificate: /claim.crt}", r"claim\.private_key: missing"),
        ("claim: {certificate: /claim.crt, private_key: null}", r"claim\.private_key: missing"),
        ("provisioning: {method: csr}", r"provisioning\.template: missing"),
        ("claim: {}", r"claim\.certificate: missing"),
    ],
)
def test_missing_required_nested_key(tmp_path: Path, section: str, key: str) -> None:
    name = section.partition(":")[0]
    text = "".join(line + "\n" for line in MINIMAL_YAML.splitlines() if not line.startswith(name)) + section + "\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: {key}"):
        load(path)


BAD_VALUES = [
    ("bogus: 1\n", r"bogus: unknown key \(known: endpoint, port,"),
    ("endpoint: ''\n", r"endpoint: must not be empty$"),
    ("endpoint: 42\n", r"endpoint: expected a string, got int$"),
    ("endpoint: https://x.example/mqtt\n", r"endpoint: 'https://x.example/mqtt' is not a host name"),
    ("endpoint: x.example:8883\n", r"endpoint: 'x.example:8883' is not a host name: give the port in `port`"),
    ("port: 0\n", r"port: 0 is not a TCP port"),
    ("port: 65536\n", r"port: 65536 is not a TCP port"),
    ("port: '8883'\n", r"port: expected an integer, got str$"),
    ("port: true\n", r"port: expected an integer, got a boolean$"),
    ("root_ca: [a]\n", r"root_ca: expected a string, got list$"),
    ("root_ca: ''\n", r"root_ca: must not be empty$"),
    ("mqtt_version: 4\n", r"mqtt_version: 4 is not one of 3, 5$"),
    ("mqtt_version: 3.1\n", r"mqtt_version: expected an integer, got float$"),
    ("keep_alive: 4\n", r"keep_alive: 4 is not between 5 and 1200 seconds$"),
    ("keep_alive: 1201\n", r"keep_alive: 1201 is not between 5 and 1200 seconds$"),
    ("operation_timeout: 0\n", r"operation_timeout: must be a positive number of seconds$"),
    ("operation_timeout: .inf\n", r"operation_timeout: must be a positive number of seconds$"),
    ("operation_timeout: .nan\n", r"operation_timeout: must be a positive number of seconds$"),
    (f"operation_timeout: {10**400}\n", r"operation_timeout: must be a positive number of seconds$"),
    ("operation_timeout: soon\n", r"operation_timeout: expected an integer or a number, got str$"),
    ("proxy: proxy.example:3128\n", r"proxy: expected a mapping, got str$"),
    ("proxy: {port: 3128}\n", r"proxy\.host: missing"),
    ("proxy: {host: p}\n", r"proxy\.port: missing"),
    ("proxy: {host: p, port: 99999}\n", r"proxy\.port: 99999 is not a TCP port"),
    ("proxy: {host: p, port: 1, user: u}\n", r"proxy\.user: unknown key \(known: host, port, username, password\)"),
    ("proxy: {host: '', port: 1}\n", r"proxy\.host: must not be empty$"),
    ("claim: {certificate: /c, private_key: /k, extra: 1}\n", r"claim\.extra: unknown key"),
    ("claim: {certificate: /c, private_key: /k, client_id: ''}\n", r"claim\.client_id: must not be empty$"),
    (f"claim: {{certificate: /c, private_key: /k, client_id: {'x' * 129}}}\n", r"claim\.client_id: longer than"),
    ("claim: {certificate: /c, private_key: /k, client_id: gw-7}\n",
     r"claim\.client_id: 'gw-7' does not start with 'fleetprov\.claim-': the claim policy allows claim connections "
     r"only with client ids of that prefix"),
    ("claim: {inbox: /in, client_id: claim-0001}\n", r"claim\.client_id: 'claim-0001' does not start with"),
    ("claim: [/c, /k]\n", r"claim: expected a mapping, got list$"),
    ("claim: {certificate: 5, private_key: /k}\n", r"claim\.certificate: expected a string, got int$"),
    ("provisioning: {template: 'my template'}\n", r"provisioning\.template: 'my template' is not a template name"),
    (f"provisioning: {{template: {'t' * 37}}}\n", r"provisioning\.template: '" + "t" * 37 + "' is not a template"),
    ("provisioning: {template: T, method: jitp}\n", r"provisioning\.method: 'jitp' is not one of csr, create-keys$"),
    ("provisioning: {template: T, key_type: ed25519}\n", r"provisioning\.key_type: 'ed25519' is not one of ec-p256"),
    ("provisioning: {template: T, extra: 1}\n", r"provisioning\.extra: unknown key"),
    ("provisioning: {template: T, parameters: [a]}\n", r"provisioning\.parameters: expected a mapping, got list$"),
    ("provisioning: {template: T, parameters: {other: 1}}\n", r"provisioning\.parameters\.other: unknown key"),
    ("provisioning: {template: T, parameters: {static: {V: 2}}}\n",
     r"provisioning\.parameters\.static\.V: expected a non-empty string: the parameter's value \(quote numbers\)$"),
    ("provisioning: {template: T, parameters: {static: {V: ''}}}\n", r"provisioning\.parameters\.static\.V: "),
    ("provisioning: {template: T, parameters: {static: {true: b}}}\n",
     r"provisioning\.parameters\.static\.True: expected a template parameter name$"),
    ("provisioning: {template: T, parameters: {from_env: {Site: null}}}\n",
     r"provisioning\.parameters\.from_env\.Site: expected a non-empty string: the name of an environment variable$"),
    ("provisioning: {template: T, parameters: {facts: {S: cpu}}}\n",
     r"provisioning\.parameters\.facts\.S: 'cpu' is not one of serial, machine_id, mac, hostname$"),
    ("provisioning: {template: T, parameters: {command: ''}}\n", r"provisioning\.parameters\.command: must name a"),
    ("provisioning: {template: T, parameters: {command: []}}\n", r"provisioning\.parameters\.command: must name a"),
    ("provisioning: {template: T, parameters: {command: [a, 1]}}\n",
     r"provisioning\.parameters\.command: expected a list of non-empty strings$"),
    ("provisioning: {template: T, parameters: {command: \"a 'b\"}}\n",
     r"provisioning\.parameters\.command: cannot split into arguments: No closing quotation$"),
    ("provisioning: {template: T, parameters: {command: {a: b}}}\n",
     r"provisioning\.parameters\.command: expected a string or a list, got dict$"),
    ("provisioning: {template: T, parameters: {command_timeout: -1}}\n",
     r"provisioning\.parameters\.command_timeout: must be a positive number of seconds$"),
    ("device: {client_id: ''}\n", r"device\.client_id: must not be empty$"),
    ("device: {client_id: fleetprov.claim-gw-7}\n",
     r"device\.client_id: 'fleetprov\.claim-gw-7' starts with 'fleetprov\.claim-', the prefix of claim connections"),
    ("device: {thing_name: x}\n", r"device\.thing_name: unknown key \(known: client_id\)$"),
    ("device: gateway\n", r"device: expected a mapping, got str$"),
    ("state_dir: 7\n", r"state_dir: expected a string, got int$"),
    ("state_dir: \"a\\0b\"\n", r"state_dir: a path cannot contain a NUL character$"),
    ("log_level: verbose\n", r"log_level: 'verbose' is not one of debug, info, warning, error$"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_VALUES)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    # Later keys win in YAML mappings: the bad value replaces the minimal file's own.
    data = yaml.safe_load(MINIMAL_YAML)
    data.update(yaml.safe_load(text))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: {message}") as caught:
        load(path)
    assert caught.value.exit_code == 78


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: cannot read: No such file or directory$"):
        load(path)


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(tmp_path))}: cannot read: Is a directory$"):
        load(tmp_path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "endpoint: [x\nport: 1\n")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: not valid YAML: .*line 2, column 5"):
        load(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"endpoint: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: not UTF-8 text \(byte 10\)$"):
        load(path)


@pytest.mark.parametrize("text", ["created: 2001-13-45\n", "port: !!int abc\n", "a: !!timestamp x\n"])
def test_values_pyyaml_cannot_build(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: not valid YAML: a value YAML cannot"):
        load(path)


def test_several_documents(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "---\n" + MINIMAL_YAML)
    with pytest.raises(ConfigError, match=r"not valid YAML: expected a single document in the stream \(line 1"):
        load(path)


@pytest.mark.parametrize("text", ["- endpoint: x\n", "endpoint\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: expected a mapping at the top level$"):
        load(path)


# --- secrets ---------------------------------------------------------------------------------------

SECRET = "S3cr3t-Pa55"


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        (f"{{host: p, port: 1, password: {SECRET}}}", r"proxy\.password: given without proxy\.username$"),
        (f"{{host: p, port: 1, username: u, password: [{SECRET}]}}", r"proxy\.password: expected a string, got list$"),
        (f'{{host: p, port: 1, username: u, password: "{SECRET}}}\n', r"not valid YAML"),  # unclosed quote
        (f"{{host: p, port: 1, username: u, {SECRET}: x}}", rf"proxy\.{SECRET}: unknown key"),  # a key, not a value
    ],
)
def test_secrets_stay_out_of_error_messages(tmp_path: Path, proxy: str, message: str) -> None:
    path = minimal(tmp_path, f"proxy: {proxy}\n")
    with pytest.raises(ConfigError, match=message) as caught:
        load(path)
    if "unknown key" not in message:
        assert SECRET not in str(caught.value)


@pytest.mark.parametrize("value", [f"*{SECRET}", f"!!int {SECRET}", f"'{SECRET}", f"{SECRET}: [x"])
def test_password_from_environment_that_is_not_yaml_is_not_quoted(tmp_path: Path, value: str) -> None:
    path = minimal(tmp_path, "proxy: {host: p, port: 1, username: u}\n")
    with pytest.raises(ConfigError) as caught:
        load(path, {"FLEETPROV_PROXY__PASSWORD": value})
    assert str(caught.value) == (
        "config: environment variable FLEETPROV_PROXY__PASSWORD: not a valid YAML value (quote it)"
    )


# --- environment overrides -------------------------------------------------------------------------


def test_env_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    config = load(
        minimal(tmp_path),
        {
            "FLEETPROV_ENDPOINT": "abc-ats.iot.eu-west-1.amazonaws.com",
            "FLEETPROV_PORT": "443",
            "FLEETPROV_MQTT_VERSION": "5",
            "FLEETPROV_OPERATION_TIMEOUT": "2.5",
            "FLEETPROV_LOG_LEVEL": "warning",
            "FLEETPROV_PROVISIONING__TEMPLATE": "Other",
            "FLEETPROV_PROVISIONING__PARAMETERS__COMMAND": "[/bin/params, --json]",
        },
    )
    assert config.endpoint == "abc-ats.iot.eu-west-1.amazonaws.com"
    assert (config.port, config.mqtt_version, config.operation_timeout) == (443, 5, 2.5)
    assert config.log_level == "warning"
    assert config.provisioning.template == "Other"
    assert config.provisioning.parameters.command == ("/bin/params", "--json")


def test_env_nested_keys_create_sections_and_keep_parameter_case(tmp_path: Path) -> None:
    config = load(
        minimal(tmp_path),
        {
            "FLEETPROV_PROXY__HOST": "proxy.lan",
            "FLEETPROV_PROXY__PORT": "3128",
            "FLEETPROV_DEVICE__CLIENT_ID": "dev-1",
            "FLEETPROV_PROVISIONING__PARAMETERS__STATIC__DeviceLocation": "lab",
            "FLEETPROV_PROVISIONING__PARAMETERS__FACTS__Serial": "serial",
        },
    )
    assert config.proxy == ProxyConfig("proxy.lan", 3128)
    assert config.device_client_id == "dev-1"
    assert config.provisioning.parameters.static == {"DeviceLocation": "lab"}
    assert config.provisioning.parameters.facts == {"Serial": "serial"}


def test_env_merges_into_a_file_section(tmp_path: Path) -> None:
    path = minimal(tmp_path, "proxy: {host: p, port: 1, username: u}\n")
    config = load(path, {"FLEETPROV_PROXY__PASSWORD": SECRET, "FLEETPROV_CLAIM__CLIENT_ID": "fleetprov.claim-c-1"})
    assert config.proxy == ProxyConfig("p", 1, "u", SECRET)
    assert config.claim == ClaimConfig(Path("/claim.crt"), Path("/claim.key"), "fleetprov.claim-c-1")


@pytest.mark.parametrize("value", ["null", "~", ""])
def test_env_null_clears_the_proxy(tmp_path: Path, value: str) -> None:
    path = minimal(tmp_path, "proxy: {host: p, port: 3128}\n")
    assert load(path).proxy == ProxyConfig("p", 3128)
    assert load(path, {"FLEETPROV_PROXY": value}).proxy is None


def test_env_null_restores_a_default(tmp_path: Path) -> None:
    path = minimal(tmp_path, "port: 443\n")
    assert load(path, {"FLEETPROV_PORT": "null"}).port == 8883


def test_env_null_of_a_required_key_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: environment variable FLEETPROV_ENDPOINT: endpoint: missing"):
        load(minimal(tmp_path), {"FLEETPROV_ENDPOINT": "null"})


def test_env_section_cleared_then_rebuilt(tmp_path: Path) -> None:
    path = minimal(tmp_path, "proxy: {host: p, port: 3128, username: u}\n")
    config = load(path, {"FLEETPROV_PROXY__PORT": "8080", "FLEETPROV_PROXY": "null", "FLEETPROV_PROXY__HOST": "q"})
    assert config.proxy == ProxyConfig("q", 8080)


def test_env_whole_section_as_yaml(tmp_path: Path) -> None:
    config = load(minimal(tmp_path), {"FLEETPROV_PROXY": "{host: q, port: 8080}"})
    assert config.proxy == ProxyConfig("q", 8080)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FLEETPROV_PORT", "https", r"port: expected an integer, got str$"),
        ("FLEETPROV_PORT", "70000", r"port: 70000 is not a TCP port"),
        ("FLEETPROV_PROXY__HOST", "[p]", r"proxy\.host: expected a string, got list$"),
        ("FLEETPROV_PROXY", "{host: q, port: 1, pass: x}", r"proxy\.pass: unknown key"),
        ("FLEETPROV_PROVISIONING__METHOD", "jitr", r"provisioning\.method: 'jitr' is not one of"),
        ("FLEETPROV_STATE_DIR", "''", r"state_dir: must not be empty$"),
    ],
)
def test_env_errors_name_the_variable_and_the_key(tmp_path: Path, name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config: environment variable {name}: {message}"):
        load(minimal(tmp_path), {name: value})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("FLEETPROV_PROXY__HOTS", r"proxy: no key 'HOTS' \(known: host, port, username, password\)$"),
        (
            "FLEETPROV_CLAIM__CERT",
            r"claim: no key 'CERT' \(known: certificate, private_key, client_id, remove_after_success, inbox\)$",
        ),
        ("FLEETPROV_PORT__NUMBER", r"port: not a section, it has no key 'NUMBER'$"),
        ("FLEETPROV_PROVISIONING__PARAMETERS__STATIC__A__B", r"provisioning\.parameters\.static\.A: not a section"),
        ("FLEETPROV_PROVISIONING__PARAMETERS__STATIC__", r"provisioning\.parameters\.static: empty template param"),
        ("FLEETPROV_PROXY____HOST", r"proxy: no key ''"),
    ],
)
def test_unknown_override_variable_is_an_error(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config: environment variable {re.escape(name)}: {message}"):
        load(minimal(tmp_path), {name: "x"})


def test_section_made_by_an_override_names_the_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: environment variable FLEETPROV_PROXY__PORT: proxy\.host: missing"):
        load(minimal(tmp_path), {"FLEETPROV_PROXY__PORT": "3128"})
    path = minimal(tmp_path, "proxy: {port: 3128}\n")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: proxy\.host: missing"):
        load(path, {"FLEETPROV_PROXY__USERNAME": "u"})


def test_env_section_that_is_not_a_mapping_in_the_file(tmp_path: Path) -> None:
    path = minimal(tmp_path, "proxy: proxy.example\n")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: proxy: expected a mapping, got str$"):
        load(path, {"FLEETPROV_PROXY__PORT": "1"})


def test_variables_that_are_not_overrides_are_ignored(tmp_path: Path) -> None:
    environ = {
        "FLEETPROV_CONFIG": "/etc/other.yaml",
        "FLEETPROV_SITE": "lab-3",  # a from_env source
        "FLEETPROV_PORTS": "x",  # not PORT followed by __
        "FLEETPROV_port": "x",  # top-level keys are upper case
        "FLEETPROV": "x",
        "PORT": "1",
        "HOME": "/root",
    }
    assert load(minimal(tmp_path), environ) == load(minimal(tmp_path))


def test_env_relative_paths_resolve_against_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = minimal(tmp_path / "etc")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = load(
        path,
        {"FLEETPROV_CLAIM__CERTIFICATE": "claim.crt", "FLEETPROV_CLAIM": "{certificate: c.crt, private_key: c.key}"},
    )
    assert config.claim.certificate == cwd / "claim.crt"
    assert config.claim.private_key == cwd / "c.key"  # set by FLEETPROV_CLAIM: relative to the cwd too

    config = load(path, {"FLEETPROV_ROOT_CA": "ca.pem", "FLEETPROV_STATE_DIR": "/abs/state"})
    assert config.root_ca == cwd / "ca.pem"
    assert config.state_dir == Path("/abs/state")


def test_file_paths_next_to_env_overrides_stay_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "etc", MINIMAL_YAML.replace("/claim.key", "claim.key"))
    monkeypatch.chdir(tmp_path)
    config = load(path, {"FLEETPROV_CLAIM__CERTIFICATE": "env.crt"})
    assert config.claim.certificate == tmp_path / "env.crt"
    assert config.claim.private_key == tmp_path / "etc" / "claim.key"


# --- command-line overrides ------------------------------------------------------------------------


def test_cli_overrides_beat_env_and_file(tmp_path: Path) -> None:
    path = minimal(tmp_path, "state_dir: /from/file\nlog_level: error\n")
    environ = {"FLEETPROV_STATE_DIR": "/from/env", "FLEETPROV_LOG_LEVEL": "warning", "FLEETPROV_PORT": "443"}

    config = load(path, environ, {"state_dir": "/from/cli", "log_level": "debug"})

    assert (config.state_dir, config.log_level, config.port) == (Path("/from/cli"), "debug", 443)
    assert load(path, environ).state_dir == Path("/from/env")
    assert load(path).state_dir == Path("/from/file")


def test_cli_nested_override_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = minimal(tmp_path / "etc")
    config = load(path, {"FLEETPROV_PROXY__HOST": "env"}, {"proxy.host": "cli", "proxy.port": "1", "root_ca": "c"})
    assert config.proxy == ProxyConfig("cli", 1)
    assert config.root_ca == tmp_path / "c"


def test_cli_errors_name_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: command line: port: 0 is not a TCP port"):
        load(minimal(tmp_path), overrides={"port": "0"})
    with pytest.raises(ConfigError, match=r"^config: command line: \(top level\): no key 'state_directory'"):
        load(minimal(tmp_path), overrides={"state_directory": "/x"})


# --- state directory default ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/run/state/fleetprov", Path("/run/state/fleetprov")),
        ("/var/lib/fleetprov:/var/lib/other", Path("/var/lib/fleetprov")),
        ("", DEFAULT_STATE_DIR),
    ],
)
def test_state_directory_default(tmp_path: Path, value: str, expected: Path) -> None:
    assert load(minimal(tmp_path), {"STATE_DIRECTORY": value}).state_dir == expected


def test_state_dir_in_the_file_wins_over_state_directory(tmp_path: Path) -> None:
    path = minimal(tmp_path, "state_dir: /srv/fleetprov\n")
    assert load(path, {"STATE_DIRECTORY": "/var/lib/fleetprov"}).state_dir == Path("/srv/fleetprov")


# --- render_config -------------------------------------------------------------------------------


def test_repr_leaves_out_the_password(tmp_path: Path) -> None:
    """A Config in a traceback's locals, a debug line or an assertion message shows no proxy password."""
    config = load(write(tmp_path, FULL_YAML))
    assert config.proxy is not None and config.proxy.password == "hunter2"
    assert "hunter2" not in repr(config)
    assert "username='device'" in repr(config.proxy)


def test_render_redacts_the_password_and_keeps_the_layout(tmp_path: Path) -> None:
    config = load(write(tmp_path, FULL_YAML))
    text = render_config(config)

    assert "hunter2" not in text
    rendered = yaml.safe_load(text)
    assert rendered["proxy"] == {"host": "proxy.example", "port": 3128, "username": "device", "password": "<redacted>"}
    assert set(rendered) == {
        "endpoint", "port", "root_ca", "mqtt_version", "keep_alive", "operation_timeout", "proxy", "claim",
        "provisioning", "device", "state_dir", "log_level", "retry", "clock_sync_timeout", "keys",
        "daemon", "hooks", "share_with_group",
    }  # fmt: skip
    assert rendered["retry"] == {
        "initial_delay": 1.0,
        "max_delay": 60.0,
        "budget": 600.0,
        "max_attempts": 10,
        "strategy": "exponential",
    }
    assert rendered["root_ca"] == str(tmp_path / "certs" / "AmazonRootCA1.pem")
    assert rendered["provisioning"]["parameters"]["command"] == ["/usr/lib/fleetprov/parameters", "--json", "two words"]


def test_render_round_trips(tmp_path: Path) -> None:
    for source in (write(tmp_path, FULL_YAML), minimal(tmp_path / "min"), EXAMPLE):
        config = load(source)
        again = load(write(tmp_path / "rendered", render_config(config)))
        expected = config
        if config.proxy is not None and config.proxy.password is not None:
            expected = dataclasses.replace(config, proxy=dataclasses.replace(config.proxy, password="<redacted>"))
        assert dataclasses.replace(again, source=source) == expected


# --- hypothesis ----------------------------------------------------------------------------------

KNOWN_KEYS = [
    "endpoint", "port", "root_ca", "mqtt_version", "keep_alive", "operation_timeout", "proxy", "host", "username",
    "password", "claim", "certificate", "private_key", "client_id", "provisioning", "template", "method",
    "key_type", "parameters", "static", "from_env", "facts", "command", "command_timeout", "device", "state_dir",
    "log_level", *FACT_NAMES, *METHODS, *KEY_TYPES,
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(["/a/b", "rel/path", "x.example", "ec-p256", "csr", "3", "[a]", "{a: b}", "null"]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers(-5, 5))
yamlish = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)),
    max_leaves=30,
)
env_names = st.one_of(
    st.sampled_from(
        [
            "FLEETPROV_PORT",
            "FLEETPROV_PROXY",
            "FLEETPROV_PROXY__HOST",
            "FLEETPROV_CLAIM__CERTIFICATE",
            "FLEETPROV_PROVISIONING__PARAMETERS__STATIC__X",
            "FLEETPROV_CONFIG",
            "FLEETPROV_DEVICE__X",
            "STATE_DIRECTORY",
        ]
    ),
    st.text(alphabet=string.ascii_letters + "_", max_size=12).map(lambda s: "FLEETPROV_" + s),
)
env_values = st.one_of(st.text(max_size=20), scalars.map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n")))


def valid_base() -> dict[str, Any]:
    return yaml.safe_load(MINIMAL_YAML)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    top=st.dictionaries(keys, yamlish, max_size=8),
    merge=st.booleans(),
    environ=st.dictionaries(env_names, env_values, max_size=3),
)
def test_random_mappings_give_a_config_or_a_config_error(
    tmp_path: Path, top: dict[Any, Any], merge: bool, environ: dict[str, str]
) -> None:
    data = {**valid_base(), **top} if merge else top
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        config = load_config(path, environ, {})
    except ConfigError as exc:
        assert str(exc).startswith("config: ")
    else:
        assert isinstance(config, Config)
        assert yaml.safe_load(render_config(config))["endpoint"] == config.endpoint


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_text_gives_a_config_or_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "random.yaml"
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        load_config(path, {}, {})


names = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=8).filter(
    lambda s: not s.isdigit()
)
nonempty = st.text(min_size=1, max_size=12).filter(lambda s: "\0" not in s)
paths = st.lists(st.text(string.ascii_letters + "-. ", min_size=1, max_size=6), min_size=1, max_size=3).map(
    lambda parts: Path("/", *parts)
)


def claim_id(suffix: str) -> str:
    return CLAIM_CLIENT_ID_PREFIX + suffix


valid_configs = st.builds(
    Config,
    source=st.none(),
    endpoint=st.sampled_from(["localhost", "127.0.0.1", "abc-ats.iot.eu-west-1.amazonaws.com"]),
    root_ca=paths,
    claim=st.builds(ClaimConfig, paths, paths, st.none() | st.text("abc-_0", min_size=1, max_size=20).map(claim_id)),
    provisioning=st.builds(
        ProvisioningConfig,
        template=st.from_regex(r"[0-9A-Za-z_-]{1,36}", fullmatch=True),
        method=st.sampled_from(METHODS),
        key_type=st.sampled_from(KEY_TYPES),
        parameters=st.builds(
            ParametersConfig,
            static=st.dictionaries(names, nonempty, max_size=3),
            from_env=st.dictionaries(names, names, max_size=3),
            facts=st.dictionaries(names, st.sampled_from(FACT_NAMES), max_size=3),
            command=st.none() | st.lists(nonempty, min_size=1, max_size=3).map(tuple),
            command_timeout=st.floats(min_value=0.001, max_value=1e6),
        ),
    ),
    port=st.integers(1, 65535),
    mqtt_version=st.sampled_from([3, 5]),
    keep_alive=st.integers(5, 1200),
    operation_timeout=st.floats(min_value=0.001, max_value=1e6),
    proxy=st.none() | st.builds(ProxyConfig, st.sampled_from(["p", "proxy.lan"]), st.integers(1, 65535)),
    device_client_id=st.none() | st.text("xyz-1", min_size=1, max_size=10),
    state_dir=paths,
    log_level=st.sampled_from(["debug", "info", "warning", "error"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=valid_configs)
def test_render_round_trips_any_valid_config(tmp_path: Path, config: Config) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(render_config(config))
    assert dataclasses.replace(load_config(path, {}, {}), source=None) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("retry:\n  budget: 0\n", r"retry\.budget: must be a positive number of seconds$"),
        ("retry:\n  max_attempts: 0\n", r"retry\.max_attempts: must be at least 1$"),
        ("retry:\n  initial_delay: 5\n  max_delay: 1\n", r"retry\.max_delay: must not be smaller than "),
        ("retry:\n  backoff: 2\n", r"retry\.backoff: unknown key"),
    ],
)
def test_retry_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(minimal(tmp_path, text))


def test_retry_from_file_and_environment(tmp_path: Path) -> None:
    config = load(
        minimal(tmp_path, "retry:\n  initial_delay: 0.5\n  budget: 30\n"), {"FLEETPROV_RETRY__MAX_ATTEMPTS": "3"}
    )
    assert config.retry == RetryConfig(initial_delay=0.5, max_delay=60.0, budget=30.0, max_attempts=3)


# --- keys: a file, or a PKCS#11 token -----------------------------------------------------------


TOKEN_YAML = """\
keys:
  backend: pkcs11
  pkcs11:
    library: lib/libsofthsm2.so
    token_label: fleetprov
    key_id: 0a1B
    pin_file: pin
"""


def test_keys_default_to_a_file(tmp_path: Path) -> None:
    assert load(minimal(tmp_path)).keys == KeysConfig("file", None)


def test_keys_in_a_token(tmp_path: Path) -> None:
    keys = load(minimal(tmp_path, TOKEN_YAML)).keys
    assert keys == KeysConfig(
        "pkcs11",
        Pkcs11Settings(
            library=tmp_path / "lib" / "libsofthsm2.so",
            token_label="fleetprov",
            key_label="fleetprov-device",
            key_id=bytes.fromhex("0a1b"),
            pin_file=tmp_path / "pin",
        ),
    )
    rendered = yaml.safe_load(render_config(load(minimal(tmp_path, TOKEN_YAML))))
    assert rendered["keys"]["pkcs11"]["key_id"] == "0a1b"
    assert load(write(tmp_path / "again", render_config(load(minimal(tmp_path, TOKEN_YAML))))).keys == keys


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pin": "1234"}, r"keys\.pkcs11\.pin: a PIN in the config file is refused: use pin_file"),
        ({"key_id": "xyz"}, r"keys\.pkcs11\.key_id: expected hexadecimal digits"),
        ({"pin_env": "PIN"}, r"keys\.pkcs11: set exactly one of pin_file, pin_env and pin_credential"),
        ({"slot": 0}, r"keys\.pkcs11: set exactly one of token_label and slot"),
        ({"library": None}, r"keys\.pkcs11\.library: missing"),
        ({"colour": "red"}, r"keys\.pkcs11\.colour: unknown key"),
    ],
)
def test_token_settings_errors(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    settings = yaml.safe_load(TOKEN_YAML)
    settings["keys"]["pkcs11"].update(change)
    settings["keys"]["pkcs11"] = {k: v for k, v in settings["keys"]["pkcs11"].items() if v is not None}
    path = minimal(tmp_path, yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: {message}") as caught:
        load(path)
    assert "1234" not in str(caught.value)


def test_pkcs11_backend_needs_the_token_and_csr(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": keys\.pkcs11: missing: the token"):
        load(minimal(tmp_path / "a", "keys: {backend: pkcs11}\n"))
    path = write(
        tmp_path / "b", MINIMAL_YAML.replace("{template: T}", "{template: T, method: create-keys}") + TOKEN_YAML
    )
    with pytest.raises(ConfigError, match=r": provisioning\.method: create-keys cannot keep its key in a PKCS#11"):
        load(path)


def test_claim_key_in_a_token(tmp_path: Path) -> None:
    uri = "pkcs11:token=fleetprov;object=claim%20key;type=private"
    text = MINIMAL_YAML.replace("private_key: /claim.key", f"private_key: '{uri}'")
    config = load(write(tmp_path, text + TOKEN_YAML.replace("backend: pkcs11", "backend: file")))
    assert config.claim.private_key is None
    assert config.claim.private_key_uri == Pkcs11Uri("fleetprov", "claim key")
    assert yaml.safe_load(render_config(config))["claim"]["private_key"] == uri
    with pytest.raises(ConfigError, match=r": keys\.pkcs11: missing: the PKCS#11 library and PIN"):
        load(write(tmp_path / "no-token", text))
    bad = MINIMAL_YAML.replace("private_key: /claim.key", "private_key: 'pkcs11:token=t;id=%01?pin-value=1'")
    with pytest.raises(ConfigError, match=r": claim\.private_key: not a usable PKCS#11 URI"):
        load(write(tmp_path / "bad", bad + TOKEN_YAML))


# --- the daemon's identity keeping, the claim's removal --------------------------------------------


def test_daemon_identity_keys(tmp_path: Path) -> None:
    daemon = load(minimal(tmp_path)).daemon
    assert (daemon.reprovision_after, daemon.rotate_before, daemon.rotation_template) == (3, 2592000.0, None)
    daemon = load(
        minimal(tmp_path, "daemon:\n  reprovision_after: 0\n  rotate_before: 0\n  rotation_template: Rot_1\n"),
        {"FLEETPROV_DAEMON__ROTATE_BEFORE": "86400"},
    ).daemon
    assert (daemon.reprovision_after, daemon.rotate_before, daemon.rotation_template) == (0, 86400.0, "Rot_1")


def test_claim_removal(tmp_path: Path) -> None:
    assert load(minimal(tmp_path)).claim.remove_after_success is False
    path = write(
        tmp_path, MINIMAL_YAML.replace("private_key: /claim.key}", "private_key: /k, remove_after_success: true}")
    )
    assert load(path).claim.remove_after_success is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("daemon:\n  reprovision_after: -1\n", r"daemon\.reprovision_after: must be 0 \(never\) or a positive count"),
        ("daemon:\n  reprovision_after: 1.5\n", r"daemon\.reprovision_after: expected an integer"),
        ("daemon:\n  rotate_before: -5\n", r"daemon\.rotate_before: must be 0 \(never\) or a positive number"),
        ("daemon:\n  rotate_before: .nan\n", r"daemon\.rotate_before: must be 0 \(never\) or a positive number"),
        ("daemon:\n  rotation_template: 'a/b'\n", r"daemon\.rotation_template: not a template name"),
        ("claim:\n  remove_after_success: yes please\n", r"claim\.remove_after_success: expected true or false"),
    ],
)
def test_daemon_identity_errors(tmp_path: Path, text: str, message: str) -> None:
    base = (
        MINIMAL_YAML
        if not text.startswith("claim")
        else MINIMAL_YAML.replace(
            "claim: {certificate: /claim.crt, private_key: /claim.key}\n",
            "claim:\n  certificate: /claim.crt\n  private_key: /claim.key\n",
        )
    )
    source = base + text if not text.startswith("claim") else base.replace("claim:\n", "claim:\n" + text[7:], 1)
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, source))


def test_a_claim_key_in_a_token_is_not_removed(tmp_path: Path) -> None:
    source = (
        MINIMAL_YAML.replace(
            "private_key: /claim.key}",
            "private_key: 'pkcs11:token=t;object=claim;type=private', remove_after_success: true}",
        )
        + "keys:\n  pkcs11: {library: /lib.so, token_label: t, key_label: k, pin_env: PIN}\n"
    )
    with pytest.raises(ConfigError, match=r"claim\.remove_after_success: fleetprov removes claim key files only"):
        load(write(tmp_path, source))
