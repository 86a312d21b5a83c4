"""Tests for fleetprov.emulator.settings: the emulator's YAML settings and serve's flags on top."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from fleetprov.emulator.faults import FaultConfig, ForcedRejection
from fleetprov.emulator.settings import (
    DEFAULT_TEMPLATE_PATH,
    EmulatorSettings,
    TemplateSource,
    load_settings,
    parse_reject_flag,
    with_flags,
)
from fleetprov.errors import ConfigError
from tests.unit.serve_flags import flags

FULL_YAML = """\
host: 0.0.0.0
port: 8883
token_ttl: 120
region: eu-west-1
account: "210987654321"
templates:
  demo: demo.json
  hooked:
    path: templates/hooked.json
    hook: /usr/bin/python3 "/opt/my hooks/allow.py" --strict
thing_groups: [lab, field]
thing_types: [sensor]
billing_groups: [default-billing]
policies:
  DevicePolicy: policies/device.json
claim_templates: [demo]
faults:
  reply_delay: 0.25
  close_after_messages: 7
  throttle_per_second: 5
  reject:
    - operation: RegisterThing
      count: 2
      status_code: 503
      error_code: ServiceUnavailable
      error_message: try later
    - operation: CreateCertificateFromCsr
"""


def write(tmp_path: Path, text: str, name: str = "emulator.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str) -> EmulatorSettings:
    return load_settings(write(tmp_path, text), tmp_path / "state")


# --- load_settings -------------------------------------------------------------------------------


def test_full_yaml(tmp_path: Path) -> None:
    settings = load(tmp_path, FULL_YAML)

    assert settings == EmulatorSettings(
        state_dir=tmp_path / "state",
        host="0.0.0.0",
        port=8883,
        token_ttl=120.0,
        region="eu-west-1",
        account="210987654321",
        templates=(
            TemplateSource("demo", tmp_path / "demo.json"),
            TemplateSource(
                "hooked",
                tmp_path / "templates" / "hooked.json",
                ("/usr/bin/python3", "/opt/my hooks/allow.py", "--strict"),
                tmp_path.resolve(),  # hooks run in the YAML file's directory
            ),
        ),
        thing_groups=("lab", "field"),
        thing_types=("sensor",),
        billing_groups=("default-billing",),
        policies=(("DevicePolicy", tmp_path / "policies" / "device.json"),),
        claim_templates=("demo",),
        faults=FaultConfig(
            reply_delay=0.25,
            close_after_messages=7,
            throttle_per_second=5,
            reject=(
                ForcedRejection("RegisterThing", 2, 503, "ServiceUnavailable", "try later"),
                ForcedRejection(
                    "CreateCertificateFromCsr", 1, 500, "InternalFailure", "rejected by an emulator fault knob"
                ),
            ),
        ),
    )
    assert isinstance(settings.token_ttl, float)


def test_none_path_gives_defaults(tmp_path: Path) -> None:
    settings = load_settings(None, tmp_path)
    assert settings == EmulatorSettings(state_dir=tmp_path)
    assert (settings.host, settings.port, settings.token_ttl) == ("127.0.0.1", 0, 3600.0)
    assert (settings.region, settings.account) == ("us-east-1", "123456789012")
    assert settings.templates == ()
    assert settings.policies == ()
    assert settings.claim_templates is None
    assert settings.faults == FaultConfig()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, text) == EmulatorSettings(state_dir=tmp_path / "state")


def test_quoted_account_and_float_ttl(tmp_path: Path) -> None:
    settings = load(tmp_path, 'account: "012345678901"\ntoken_ttl: 0.5\n')
    assert settings.account == "012345678901"
    assert settings.token_ttl == 0.5


def test_unquoted_account_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "account: 123456789012\n")
    with pytest.raises(ConfigError, match=r"account: expected a string, got int"):
        load_settings(path, tmp_path)


def test_hook_cwd_is_the_config_directory_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", "templates:\n  demo: {path: demo.json, hook: ./allow.sh}\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("conf/emulator.yaml"), tmp_path / "state")
    assert settings.templates == (
        TemplateSource("demo", Path("conf/demo.json"), ("./allow.sh",), (tmp_path / "conf").resolve()),
    )
    assert settings.templates[0].hook_cwd is not None
    assert settings.templates[0].hook_cwd.is_absolute()


def test_empty_claim_templates_allows_none(tmp_path: Path) -> None:
    assert load(tmp_path, "claim_templates: []\n").claim_templates == ()


def test_template_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", "templates:\n  demo: ../t/demo.json\n  abs: /etc/t.json\n")
    settings = load_settings(path, tmp_path)
    assert settings.templates == (
        TemplateSource("demo", tmp_path / "conf" / ".." / "t" / "demo.json"),
        TemplateSource("abs", Path("/etc/t.json")),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hots: x\n", r"hots: unknown key \(known: host, port, "),
        ("faults:\n  delay: 1\n", r"faults\.delay: unknown key \(known: reply_delay, "),
        ('port: "8883"\n', r"port: expected an integer, got str$"),
        ("port: true\n", r"port: expected an integer, got a boolean$"),
        ("port: 70000\n", r"port: 70000 is not a TCP port$"),
        ("port: -1\n", r"port: -1 is not a TCP port$"),
        ("token_ttl: 0\n", r"token_ttl: must be a positive number of seconds$"),
        ("token_ttl: -5.5\n", r"token_ttl: must be a positive number of seconds$"),
        ("token_ttl: an hour\n", r"token_ttl: expected an integer or a number, got str$"),
        ("host: 127\n", r"host: expected a string, got int$"),
        ("templates:\n  demo:\n    hook: ./allow.sh\n", r"templates\.demo\.path: missing: the template's JSON file$"),
        ("templates:\n  demo:\n    path: d.json\n    timeout: 3\n", r"templates\.demo\.timeout: unknown key"),
        ("templates: [demo.json]\n", r"templates: expected a mapping, got list$"),
        ("templates:\n  demo: 5\n", r"templates\.demo: expected the template's JSON file, or a mapping with path "),
        ("faults:\n  reject:\n    - operation: Connect\n", r"faults\.reject\[0\]\.operation: 'Connect' is not one of "),
        ("faults:\n  reject:\n    - count: 1\n", r"faults\.reject\[0\]\.operation: '' is not one of "),
        ("faults:\n  reject:\n    - operation: RegisterThing\n      count: 0\n", r"faults\.reject\[0\]\.count: "),
        ("faults:\n  reject:\n    - RegisterThing\n", r"faults\.reject\[0\]: expected a mapping$"),
        ("faults:\n  reject:\n    - {operation: RegisterThing, code: 1}\n", r"faults\.reject\[0\]\.code: unknown key"),
        ("faults: [throttle]\n", r"faults: expected a mapping, got list$"),
        ("faults:\n  throttle_per_second: fast\n", r"faults\.throttle_per_second: expected an integer or a number"),
        ("thing_groups: lab\n", r"thing_groups: expected a list, got str$"),
        ("thing_groups: [lab, 3]\n", r"thing_groups: expected a list of non-empty strings$"),
        ('thing_types: [""]\n', r"thing_types: expected a list of non-empty strings$"),
        ("claim_templates: {demo: 1}\n", r"claim_templates: expected a list, got dict$"),
        ("policies: [p.json]\n", r"policies: expected a mapping, got list$"),
        ("policies:\n  DevicePolicy: {path: p.json}\n", r"policies\.DevicePolicy: expected the policy document's JSON"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: {message}") as caught:
        load_settings(path, tmp_path / "state")
    assert caught.value.step == "config"
    assert caught.value.exit_code == 78


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: cannot read: No such file or directory$"):
        load_settings(path, tmp_path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "port: [8883\nhost: x\n")
    with pytest.raises(ConfigError, match=rf"(?s)^config: {re.escape(str(path))}: not valid YAML: .*line 2"):
        load_settings(path, tmp_path)


@pytest.mark.parametrize("text", ["- host: x\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(path))}: expected a mapping at the top level$"):
        load_settings(path, tmp_path)


@pytest.mark.parametrize(
    ("text", "section"),
    [
        ("templates:\n  demo:\n", "templates"),
        ("policies:\n  DevicePolicy:\n", "policies"),
    ],
    ids=["template-null", "policy-null"],
)
def test_entry_without_value_is_a_config_error(tmp_path: Path, text: str, section: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: {section}\."):
        load_settings(path, tmp_path)


def test_numeric_names_are_names(tmp_path: Path) -> None:
    """YAML reads `123:` as an integer key; AWS template and policy names may be all digits."""
    settings = load(tmp_path, "templates:\n  123: t.json\npolicies:\n  456: p.json\n")
    assert [source.name for source in settings.templates] == ["123"]
    assert [name for name, _ in settings.policies] == ["456"]


def test_token_ttl_nan_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "token_ttl: .nan\n")
    with pytest.raises(ConfigError, match="token_ttl"):
        load_settings(path, tmp_path)


def test_bad_status_code_names_status_code(tmp_path: Path) -> None:
    path = write(tmp_path, "faults:\n  reject:\n    - operation: RegisterThing\n      status_code: 999\n")
    with pytest.raises(ConfigError, match=r"faults\.reject\[0\]\.status_code: "):
        load_settings(path, tmp_path)


def test_account_with_leading_zero_is_kept_or_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "account: 012345670123\n")
    try:
        settings = load_settings(path, tmp_path)
    except ConfigError as exc:
        assert "account" in str(exc)
    else:
        assert settings.account == "012345670123"


# --- with_flags ----------------------------------------------------------------------------------


def test_flags_override_yaml(tmp_path: Path) -> None:
    base = load(tmp_path, FULL_YAML)

    settings = with_flags(
        base,
        **flags(
            host="::1",
            port=0,
            token_ttl=5.0,
            reply_delay=0.0,
            close_after=1,
            throttle=100.0,
            rejects=["RegisterThing:1:500:InternalFailure"],
            thing_groups=["extra"],
        ),
    )

    assert settings.host == "::1"
    assert settings.port == 0  # 0 is a value, not "unset"
    assert settings.token_ttl == 5.0
    assert settings.faults.reply_delay == 0.0
    assert settings.faults.close_after_messages == 1
    assert settings.faults.throttle_per_second == 100.0
    assert settings.faults.reject == (
        *base.faults.reject,
        ForcedRejection("RegisterThing", 1, 500, "InternalFailure", "rejected by an emulator fault knob"),
    )
    assert settings.thing_groups == ("lab", "field", "extra")
    # Untouched by flags.
    assert (settings.region, settings.account, settings.templates) == (base.region, base.account, base.templates)
    assert (settings.policies, settings.claim_templates) == (base.policies, base.claim_templates)


def test_no_flags_change_nothing(tmp_path: Path) -> None:
    base = load(tmp_path, FULL_YAML)
    assert with_flags(base, **flags()) == base


def test_template_flag_keeps_an_existing_hook(tmp_path: Path) -> None:
    base = load(tmp_path, FULL_YAML)
    settings = with_flags(base, **flags(templates=["hooked=/srv/other.json", "new=/srv/new.json"]))
    assert settings.templates == (
        TemplateSource("demo", tmp_path / "demo.json"),
        TemplateSource(
            "hooked",
            Path("/srv/other.json"),
            ("/usr/bin/python3", "/opt/my hooks/allow.py", "--strict"),
            tmp_path.resolve(),
        ),
        TemplateSource("new", Path("/srv/new.json"), None),
    )


def test_hook_flag_sets_the_hook_of_a_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = load(tmp_path, FULL_YAML)
    workdir = tmp_path / "where-serve-started"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    settings = with_flags(base, **flags(hooks=["demo=python3 'my hook.py' -v", "hooked=./other.sh"]))
    # A hook from the command line runs where serve started, even for a template from the YAML file.
    assert settings.templates == (
        TemplateSource("demo", tmp_path / "demo.json", ("python3", "my hook.py", "-v"), workdir),
        TemplateSource("hooked", tmp_path / "templates" / "hooked.json", ("./other.sh",), workdir),
    )


def test_hook_flag_for_a_template_from_a_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = with_flags(
        EmulatorSettings(state_dir=tmp_path),
        **flags(templates=[f"fleetprov-demo={DEFAULT_TEMPLATE_PATH}"], hooks=["fleetprov-demo=./allow.sh"]),
    )
    assert settings.templates == (TemplateSource("fleetprov-demo", DEFAULT_TEMPLATE_PATH, ("./allow.sh",), tmp_path),)


def test_hook_flag_for_an_unknown_template_has_no_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry (set_template_hook) refuses it later; settings keep the name so the error can say it."""
    monkeypatch.chdir(tmp_path)
    settings = with_flags(EmulatorSettings(state_dir=tmp_path), **flags(hooks=["ghost=./allow.sh"]))
    assert settings.templates == (TemplateSource("ghost", None, ("./allow.sh",), tmp_path),)


@pytest.mark.parametrize(
    ("kind", "text"),
    [("templates", "demo"), ("templates", "=x.json"), ("templates", "demo="), ("hooks", "demo")],
)
def test_name_value_flags_must_have_both(tmp_path: Path, kind: str, text: str) -> None:
    flag = "--template" if kind == "templates" else "--hook"
    with pytest.raises(ConfigError, match=rf"^config: {flag} '{text}': expected NAME=VALUE$"):
        with_flags(EmulatorSettings(state_dir=tmp_path), **flags(**{kind: [text]}))


def test_parse_reject_flag() -> None:
    assert parse_reject_flag("RegisterThing:2:500:InternalFailure") == ForcedRejection(
        "RegisterThing", 2, 500, "InternalFailure", "rejected by an emulator fault knob"
    )
    assert parse_reject_flag("CreateKeysAndCertificate:1:429:ThrottlingException").status_code == 429


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("RegisterThing:2:500", r"--reject: RegisterThing:2:500: expected OPERATION:COUNT:STATUS:ERROR_CODE"),
        ("RegisterThing:two:500:X", r"expected OPERATION:COUNT:STATUS:ERROR_CODE"),
        ("RegisterThing:2:5xx:X", r"expected OPERATION:COUNT:STATUS:ERROR_CODE"),
        ("RegisterThing:-1:500:X", r"expected OPERATION:COUNT:STATUS:ERROR_CODE"),
        ("RegisterThing:2:500:X:Y", r"expected OPERATION:COUNT:STATUS:ERROR_CODE"),
        ("Connect:1:500:X", r"--reject: operation: 'Connect' is not one of CreateKeysAndCertificate, "),
        ("RegisterThing:0:500:X", r"count: 0 is not a positive number of requests"),
        ("RegisterThing:1:99:X", r"status_code: 99 is not an HTTP status code"),
        ("RegisterThing:1:600:X", r"status_code: 600 is not an HTTP status code"),
    ],
)
def test_parse_reject_flag_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_reject_flag(text)


def test_bad_reject_flag_fails_with_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected OPERATION:COUNT:STATUS:ERROR_CODE"):
        with_flags(EmulatorSettings(state_dir=tmp_path), **flags(rejects=["nonsense"]))


def test_the_documented_example_config_loads(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "configs" / "emulator.example.yaml"
    settings = load_settings(example, tmp_path)
    configs = example.parent
    assert settings.state_dir == tmp_path
    assert (settings.host, settings.port, settings.token_ttl) == ("127.0.0.1", 0, 3600.0)
    assert [source.name for source in settings.templates] == ["widget", "fleetprov-demo"]
    assert settings.templates[0].hook == ("python3", "hooks/allow_known_serials.py")
    assert settings.templates[0].hook_cwd == configs.resolve()
    assert settings.templates[1].path is not None
    assert settings.templates[1].path.resolve() == DEFAULT_TEMPLATE_PATH.resolve()
    assert settings.policies == (("widget-policy", configs / "templates" / "widget-policy.json"),)
    assert settings.claim_templates == ("widget", "fleetprov-demo")
    assert settings.faults == FaultConfig()
