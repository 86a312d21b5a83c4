"""Bad input, generated with hypothesis: every field of every reply the service sends, and config files.

One emulator serves this module with ``--reply-overrides FILE``; it reads FILE at every request, so each case
writes FILE and runs ``fleetprov --once`` for a fresh device. Whatever the reply, fleetprov must exit with 0,
65, 75 or 77, never show a traceback, end a failure with one clear ``fleetprov: <step>: ...`` line, and write
nothing under the state directory unless it succeeded ("try again later", 75, may keep its journal and key).

``test_hostile_reply`` covers every field of every reply with chosen values and an exact expectation each;
``test_random_replies`` adds hypothesis's variety, judged by ``expected_exit``. The bugs these tests found
(a lone surrogate in the token, unescaped echoes, unchecked thing names, an identity published before it had
connected, falsy configurations) are fixed; their cases stay as regression tests.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import os
import re
import stat
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fleetprov.provisioning import MAX_DEVICE_CONFIGURATION, MAX_OWNERSHIP_TOKEN
from tests.support import Emulator, device_config, fleetprov, start_emulator

CSR = "CreateCertificateFromCsr"
KEYS = "CreateKeysAndCertificate"
REGISTER = "RegisterThing"
RAW = "$raw"
FIELDS = {
    CSR: ("certificateId", "certificatePem", "certificateOwnershipToken"),
    KEYS: ("certificateId", "certificatePem", "certificateOwnershipToken", "privateKey"),
    REGISTER: ("thingName", "deviceConfiguration"),
}
METHOD = {CSR: "csr", KEYS: "create-keys", REGISTER: "csr"}
HUGE = "A" * 1_000_000  # far beyond AWS IoT's 128 KB messages; MQTT (and the emulator's broker) still deliver it
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")  # AWS IoT's ThingName pattern
UNCHANGED = object()  # a field the override leaves as the service sent it

# A clear failure: the last line of stderr, one line, printable, naming the step.
ERROR_LINE = re.compile(r"fleetprov: (?P<step>[a-z][a-z-]*): (?P<message>.+)")
# The `slow` run's budget per operation: bounded for CI (under a minute each); raise it for a longer local run,
# e.g. FLEETPROV_FUZZ_EXAMPLES=2000 make test.
AT_LENGTH_EXAMPLES = int(os.environ.get("FLEETPROV_FUZZ_EXAMPLES", "80"))
FUZZ_RETRY = {"initial_delay": 0.05, "max_delay": 0.1, "max_attempts": 2, "budget": 5}

# --- somebody else's identity, and keys of the wrong kind ----------------------------------------


def _stranger() -> tuple[str, str, str]:
    """A self-signed EC certificate and key that have nothing to do with the emulator, and the certificate's id."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    der = certificate.public_bytes(serialization.Encoding.DER)
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem, hashlib.sha256(der).hexdigest()


STRANGER_CERT, STRANGER_KEY, STRANGER_ID = _stranger()
ED25519_KEY = (
    ed25519.Ed25519PrivateKey.generate()
    .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    .decode()
)
BAD_PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
TRUNCATED_CERT = STRANGER_CERT[: len(STRANGER_CERT) // 2]


# --- running a device against the overridden emulator ---------------------------------------------


@dataclass
class Run:
    result: Any  # subprocess.CompletedProcess[str]
    state: Path


@dataclass
class Fuzz:
    emulator: Emulator
    overrides: Path
    root: Path
    base: dict[str, Any]  # a complete device configuration for this emulator
    runs: int = 0

    def run(self, operation: str, override: Mapping[str, Any]) -> Run:
        """``fleetprov --once`` for a new device while ``operation``'s accepted replies get ``override``."""
        self._write_overrides({operation: override})
        self.runs += 1
        device = self.root / f"device-{self.runs}"
        device.mkdir()
        settings = copy.deepcopy(self.base)
        settings["state_dir"] = str(device / "state")
        settings["provisioning"]["method"] = METHOD[operation]
        settings["provisioning"]["parameters"]["static"]["SerialNumber"] = f"fuzz-{self.runs}"
        settings.update(retry=FUZZ_RETRY, operation_timeout=3)
        config = device / "config.yaml"
        config.write_text(yaml.safe_dump(settings))
        return Run(fleetprov("--once", "--config", str(config), timeout=120), device / "state")

    def _write_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> None:
        document = {
            operation: {name: base64.b64encode(value).decode() if name == RAW else value for name, value in o.items()}
            for operation, o in overrides.items()
        }
        temporary = self.overrides.with_suffix(".tmp")
        temporary.write_text(json.dumps(document))  # ensure_ascii: lone surrogates travel as \ud800 escapes
        temporary.replace(self.overrides)  # the emulator never reads a half-written file


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    root = tmp_path_factory.mktemp("fuzz")
    overrides = root / "overrides.json"
    emulator = start_emulator(root / "emulator", "--reply-overrides", str(overrides))
    try:
        base = yaml.safe_load(device_config(emulator, root / "base").read_text())
        yield Fuzz(emulator, overrides, root, base)
    finally:
        emulator.stop()


def assert_nothing_kept(state: Path, *, resumable: bool) -> None:
    """No identity under the state directory; with ``resumable``, the journal and its staged key may stay."""
    assert not os.path.lexists(state / "current")
    assert not list((state / "generations").iterdir())
    left = {path.name for path in state.iterdir()} - {"lock", "last-run.json", "generations"}
    if resumable:
        left = {name for name in left if name != "journal.json" and not name.startswith("staging-")}
        for key in state.glob("staging-*/private.key"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not left, sorted(left)


def check(run: Run, expected: int, *, step: str = "", says: str = "") -> None:
    result = run.result
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-4000:]
    assert result.returncode == expected, result.stderr[-4000:]
    if expected == 0:
        assert (run.state / "current" / "certificate.pem").is_file()
        assert "provisioned: thing fleetprov-fuzz-" in result.stdout
        return
    last = result.stderr.splitlines()[-1]
    match = ERROR_LINE.fullmatch(last)
    assert match is not None and last.isprintable(), result.stderr[-4000:]
    assert match["step"] == (step or match["step"]) and says in match["message"], last
    assert_nothing_kept(run.state, resumable=expected == 75)


def stored_configuration(run: Run) -> Any:
    return json.loads((run.state / "current" / "device-config.json").read_text())


# --- every field of every reply, with an exact expectation each ----------------------------------


def case(operation: str, override: dict[str, Any], expected: int, step: str = "", says: str = "") -> Any:
    label = ",".join(f"{name}={_short(value)}" for name, value in override.items())
    return pytest.param(operation, override, expected, step, says, id=f"{operation}:{label}")


def _short(value: Any) -> str:
    if value is HUGE:
        return "huge"
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _create_cases(operation: str) -> list[Any]:
    def bad_data(name: str, value: Any, step: str, says: str) -> Any:
        return case(operation, {name: value}, 65, step, says)

    issue, check_ = "create-certificate", "check-certificate"
    return [
        # certificateId
        bad_data("certificateId", 42, issue, "the reply has no certificateId"),
        bad_data("certificateId", None, issue, "the reply has no certificateId"),
        bad_data("certificateId", "", issue, "the reply has no certificateId"),
        bad_data("certificateId", ["a"], issue, "the reply has no certificateId"),
        bad_data("certificateId", "0" * 64, check_, "the service said certificate 0000000000000000..."),
        bad_data("certificateId", HUGE, issue, "certificateId in the reply is 1000000 characters long; at most 64"),
        bad_data("certificateId", "\ud800", issue, "not a certificate id (64 hex digits): \\ud800"),
        bad_data("certificateId", "ab\ncd\x1b[31m", issue, "not a certificate id (64 hex digits): ab\\ncd\\x1b[31m"),
        # certificatePem
        bad_data("certificatePem", {"pem": "x"}, issue, "the reply has no certificatePem"),
        bad_data("certificatePem", None, issue, "the reply has no certificatePem"),
        bad_data("certificatePem", "", issue, "the reply has no certificatePem"),
        bad_data("certificatePem", BAD_PEM, check_, "not a PEM X.509 certificate"),
        bad_data("certificatePem", TRUNCATED_CERT, check_, "not a PEM X.509 certificate"),
        bad_data(
            "certificatePem", HUGE, issue, "certificatePem in the reply is 1000000 characters long; at most 65536"
        ),
        bad_data("certificatePem", "\ud800", check_, "not a PEM X.509 certificate"),
        bad_data("certificatePem", STRANGER_CERT, check_, "not for this device's key"),
        # certificateOwnershipToken
        bad_data("certificateOwnershipToken", 7, issue, "the reply has no certificateOwnershipToken"),
        bad_data("certificateOwnershipToken", None, issue, "the reply has no certificateOwnershipToken"),
        bad_data("certificateOwnershipToken", "", issue, "the reply has no certificateOwnershipToken"),
        # A lone surrogate (valid JSON) in the token: the token cannot be sent back as UTF-8, the service refuses.
        case(operation, {"certificateOwnershipToken": "tok\ud800en"}, 77, "register-thing", "400 InvalidPayload"),
        # A token the service then does not know: refused at RegisterThing, three fresh starts, then 77.
        case(operation, {"certificateOwnershipToken": "forged"}, 77, "register-thing", "refused 3 ownership tokens"),
        bad_data("certificateOwnershipToken", HUGE, issue, "certificateOwnershipToken in the reply is 1000000"),
        # the whole payload
        bad_data(RAW, b"\xff\xfe{", issue, "unusable reply: UnicodeDecodeError"),
        bad_data(RAW, b"<html>busy</html>", issue, "unusable reply: JSONDecodeError"),
        bad_data(RAW, b"", issue, "unusable reply: JSONDecodeError"),
        bad_data(RAW, b"null", issue, "unusable reply"),
        bad_data(RAW, b"[]", issue, "unusable reply"),
        bad_data(RAW, b"{}", issue, "the reply has no certificateId"),
        # harmless: an extra field
        case(operation, {"surprise": {"x": [1, None]}}, 0),
    ]


HOSTILE_REPLIES = [
    *_create_cases(CSR),
    *_create_cases(KEYS),
    # privateKey (CreateKeysAndCertificate only)
    case(KEYS, {"privateKey": 5}, 65, "create-certificate", "the reply has no privateKey"),
    case(KEYS, {"privateKey": None}, 65, "create-certificate", "the reply has no privateKey"),
    case(KEYS, {"privateKey": ""}, 65, "create-certificate", "the reply has no privateKey"),
    case(KEYS, {"privateKey": BAD_PEM}, 65, "check-certificate", "not a PEM private key"),
    case(KEYS, {"privateKey": HUGE}, 65, "create-certificate", "privateKey in the reply is 1000000 characters long"),
    case(KEYS, {"privateKey": "\ud800"}, 65, "check-certificate", "not a PEM private key"),
    case(KEYS, {"privateKey": ED25519_KEY}, 65, "check-certificate", "neither RSA nor EC"),
    case(KEYS, {"privateKey": STRANGER_KEY}, 65, "check-certificate", "not for this device's key"),
    # A consistent identity of somebody else: nothing on the device can tell, until it fails to connect.
    case(
        KEYS,
        {"certificatePem": STRANGER_CERT, "privateKey": STRANGER_KEY, "certificateId": STRANGER_ID},
        75,
        "verify",
    ),
    # The certificate alone is stored, re-encoded: a certificatePem with anything else is refused, nothing kept.
    *[
        case(KEYS, {"certificatePem": pem, "privateKey": STRANGER_KEY, "certificateId": STRANGER_ID}, 65, step, says)
        for pem, step, says in (
            (STRANGER_CERT + STRANGER_KEY, "check-certificate", "holds 2 PEM blocks: AWS IoT sends exactly one"),
            (STRANGER_CERT + STRANGER_CERT, "check-certificate", "holds 2 PEM blocks"),
            ("commit: ok\n" + STRANGER_CERT, "check-certificate", "(one CERTIFICATE block, nothing around it)"),
            (STRANGER_CERT + "trailing text\n", "check-certificate", "(one CERTIFICATE block, nothing around it)"),
            (STRANGER_CERT + HUGE, "create-certificate", "certificatePem in the reply is 1000"),
        )
    ],
    # thingName
    case(REGISTER, {"thingName": 12}, 65, "register-thing", "the reply has no thingName"),
    case(REGISTER, {"thingName": None}, 65, "register-thing", "the reply has no thingName"),
    case(REGISTER, {"thingName": ""}, 65, "register-thing", "the reply has no thingName"),
    case(REGISTER, {"thingName": {"name": "x"}}, 65, "register-thing", "the reply has no thingName"),
    case(REGISTER, {"thingName": "has space/../x"}, 65, "register-thing", "not a valid thing name"),
    case(REGISTER, {"thingName": "bad\nname"}, 65, "register-thing", "not a valid thing name"),
    case(REGISTER, {"thingName": "x\ud800"}, 65, "register-thing", "not a valid thing name"),
    case(REGISTER, {"thingName": HUGE}, 65, "register-thing", "thingName in the reply is 1000000 characters long"),
    # A well-formed name of another thing: the device cannot know, the verify connection is refused.
    case(REGISTER, {"thingName": "someone-else"}, 77, "verify", "refused the connection as 'someone-else'"),
    # deviceConfiguration
    case(REGISTER, {"deviceConfiguration": {"a": 1}}, 65, "register-thing", "deviceConfiguration is not an object"),
    case(REGISTER, {"deviceConfiguration": {"a": None}}, 65, "register-thing", "deviceConfiguration is not"),
    case(REGISTER, {"deviceConfiguration": {"n": {"a": "b"}}}, 65, "register-thing", "deviceConfiguration is not"),
    case(REGISTER, {"deviceConfiguration": "text"}, 65, "register-thing", "deviceConfiguration is not"),
    case(REGISTER, {"deviceConfiguration": [["a", "b"]]}, 65, "register-thing", "deviceConfiguration is not"),
    case(REGISTER, {"deviceConfiguration": 3.5}, 65, "register-thing", "deviceConfiguration is not"),
    case(REGISTER, {"deviceConfiguration": 0}, 65, "register-thing", "deviceConfiguration is not"),
    case(REGISTER, {"deviceConfiguration": []}, 65, "register-thing", "deviceConfiguration is not"),
    case(REGISTER, {"deviceConfiguration": ""}, 65, "register-thing", "deviceConfiguration is not"),
    # harmless: a configuration the device stores as given (absent: empty)
    case(REGISTER, {"deviceConfiguration": None}, 0),
    case(REGISTER, {"deviceConfiguration": {}}, 0),
    case(REGISTER, {"deviceConfiguration": {"mode": "test", "ünïcode": "✓ \n\t"}}, 0),
    case(REGISTER, {"deviceConfiguration": {"big": HUGE}}, 65, "register-thing", "holds 1000003 characters; at most"),
    case(REGISTER, {"deviceConfiguration": {"big": "B" * 65533}}, 0),  # 65536 with its key: the cap
    case(REGISTER, {"surprise": 1}, 0),
    # the whole payload
    case(REGISTER, {RAW: b"\xc3\x28"}, 65, "register-thing", "unusable reply: UnicodeDecodeError"),
    case(REGISTER, {RAW: b"thing: yes"}, 65, "register-thing", "unusable reply: JSONDecodeError"),
    case(REGISTER, {RAW: b'"just a string"'}, 65, "register-thing", "unusable reply"),
    case(REGISTER, {RAW: b"{}"}, 65, "register-thing", "the reply has no thingName"),
]


@pytest.mark.parametrize(("operation", "override", "expected", "step", "says"), HOSTILE_REPLIES)
def test_hostile_reply(
    fuzz: Fuzz, operation: str, override: dict[str, Any], expected: int, step: str, says: str
) -> None:
    run = fuzz.run(operation, override)
    check(run, expected, step=step, says=says)
    if expected == 0 and "deviceConfiguration" in override:
        assert stored_configuration(run) == (override["deviceConfiguration"] or {})


@pytest.mark.parametrize("operation", [CSR, KEYS])
def test_a_forged_certificate_id_reaches_the_log_escaped(fuzz: Fuzz, operation: str) -> None:
    """Server strings are logged only once checked, escaped and shortened: no forged log line, no terminal escape."""
    forged = "0\n2026-01-01 00:00:00 INFO fleetprov.claim: commit: ok\x1b[2J"  # under 64 characters
    run = fuzz.run(operation, {"certificateId": forged})
    check(run, 65, step="create-certificate", says="not a certificate id (64 hex digits)")
    output = run.result.stdout + run.result.stderr
    assert "\x1b" not in output
    assert not [line for line in output.splitlines() if "commit: ok" in line and "not a certificate id" not in line]


# --- hypothesis: variety ----------------------------------------------------------------------------


def expected_exit(operation: str, override: Mapping[str, Any]) -> int:
    """What fleetprov must make of ``operation``'s reply changed by ``override``: 0 when the change is harmless,
    65 when the reply is unusable, 77 when a forged ownership token makes the service refuse RegisterThing."""
    if RAW in override:
        try:
            document = json.loads(override[RAW].decode())
        except ValueError:
            return 65
        if not isinstance(document, dict):
            return 65
        fields = {name: document.get(name) for name in FIELDS[operation]}  # awsiotsdk: null is absent
    else:
        fields = {name: override.get(name, UNCHANGED) for name in FIELDS[operation]}
    if operation == REGISTER:
        name, configuration = fields["thingName"], fields["deviceConfiguration"]
        unusable_configuration = configuration is not UNCHANGED and not (
            configuration is None
            or (
                isinstance(configuration, dict)
                and all(isinstance(value, str) for value in configuration.values())
                and sum(map(len, [*configuration, *configuration.values()])) <= MAX_DEVICE_CONFIGURATION
            )
        )
        if unusable_configuration or not (name is UNCHANGED or (isinstance(name, str) and THING_NAME.fullmatch(name))):
            return 65
        # Another thing's name: the device cannot tell, until the verify connection is refused as that client id.
        return 0 if name is UNCHANGED else 77
    token = fields.pop("certificateOwnershipToken")
    if any(value is not UNCHANGED for value in fields.values()):
        return 65  # any change to the certificate, its id or the key is caught before RegisterThing
    if token is UNCHANGED:
        return 0
    return 77 if isinstance(token, str) and 0 < len(token) <= MAX_OWNERSHIP_TOKEN else 65


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
not_strings = json_values.filter(lambda value: not isinstance(value, str))  # null: the field is removed
pem_garbage = st.builds(
    "-----BEGIN {}-----\n{}\n-----END {}-----\n".format,
    st.sampled_from(["CERTIFICATE", "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"]),
    st.text(string.ascii_letters + string.digits + "+/=\n", max_size=200),
    st.sampled_from(["CERTIFICATE", "PRIVATE KEY"]),
)
strings = st.one_of(
    st.just(""),
    st.text(max_size=100),  # hypothesis makes no lone surrogates here; test_hostile_reply has those
    st.just(HUGE),
    pem_garbage,
    st.sampled_from([STRANGER_CERT, STRANGER_KEY, ED25519_KEY, TRUNCATED_CERT]),
)
FIELD_VALUES = {
    "certificateId": not_strings | strings,
    "certificatePem": not_strings | strings,
    "privateKey": not_strings | strings,
    "certificateOwnershipToken": not_strings | strings,
    "thingName": not_strings | strings | st.from_regex(r"[a-zA-Z0-9:_-]{1,20}", fullmatch=True),
    "deviceConfiguration": st.one_of(
        st.dictionaries(st.text(max_size=20), st.text(max_size=40) | st.just(HUGE), max_size=4),
        st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=3),
        json_values,
    ),
}
raw_payloads = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40).map(str.encode),
    json_values.map(lambda value: json.dumps(value).encode()),
)


@st.composite
def overrides(draw: st.DrawFn, operation: str) -> dict[str, Any]:
    if draw(st.integers(0, 4)) == 0:
        return {RAW: draw(raw_payloads)}
    optional = {name: FIELD_VALUES[name] for name in FIELDS[operation]}
    return draw(st.fixed_dictionaries({}, optional={**optional, "surprise": json_values}))


def fuzz_one(fuzz: Fuzz, operation: str, data: st.DataObject) -> None:
    override = data.draw(overrides(operation), label="override")
    check(fuzz.run(operation, override), expected_exit(operation, override))


# Each --once takes about 0.7 s: 40 examples per operation keep the default run under a minute and a half.
@pytest.mark.parametrize("operation", [CSR, KEYS, REGISTER])
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_replies(fuzz: Fuzz, operation: str, data: st.DataObject) -> None:
    fuzz_one(fuzz, operation, data)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("operation", [CSR, KEYS, REGISTER])
@settings(max_examples=AT_LENGTH_EXAMPLES, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_replies_at_length(fuzz: Fuzz, operation: str, data: st.DataObject) -> None:
    fuzz_one(fuzz, operation, data)


# --- hypothesis: config files through the command line -------------------------------------------

MINIMAL_CONFIG = {
    "endpoint": "localhost",
    "root_ca": "/nonexistent/root-ca.pem",
    "claim": {"certificate": "/nonexistent/claim.pem", "private_key": "/nonexistent/claim.key"},
    "provisioning": {"template": "demo"},
    "state_dir": "/nonexistent/state",
}
CONFIG_KEYS = [
    "endpoint", "port", "root_ca", "mqtt_version", "keep_alive", "operation_timeout", "proxy", "claim",
    "provisioning", "device", "state_dir", "log_level", "retry", "clock_sync_timeout", "host", "username",
    "password", "certificate", "private_key", "client_id", "template", "method", "key_type", "parameters",
    "static", "from_env", "facts", "command", "budget", "verify", "insecure",
]  # fmt: skip


@st.composite
def mutated_configs(draw: st.DrawFn) -> bytes:
    """The minimal config with a few keys, at any depth, set to any YAML value."""
    config = copy.deepcopy(MINIMAL_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        section: dict[str, Any] = config
        while draw(st.booleans()):
            children = [value for value in section.values() if isinstance(value, dict)]
            if not children:
                break
            section = draw(st.sampled_from(children))
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8))
        section[key] = draw(json_values | st.sampled_from(CONFIG_KEYS))
    return yaml.safe_dump(config, allow_unicode=draw(st.booleans())).encode()


yaml_syntax = st.lists(
    st.sampled_from([*":-?[]{},#&*!|>'\"%@` \n\t", "endpoint", "port", "proxy", "1", "x"]), max_size=60
).map("".join)
config_files = st.one_of(
    mutated_configs(),
    yaml_syntax.map(str.encode),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("configs") / "config.yaml"


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(content=config_files)
@example(content=b"\xef\xbb\xbfendpoint: x\n")  # a byte-order mark
@example(content=b"[" * 5000)  # nesting deep enough to exhaust the YAML parser's recursion
@example(content=b"a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n")
@example(content=yaml.safe_dump({**MINIMAL_CONFIG, "port": 10**30, "keep_alive": float("inf")}).encode())
@example(content=yaml.safe_dump({**MINIMAL_CONFIG, "endpoint": "x\ud800", "state_dir": "/a\0b"}).encode())
def test_random_config_files_give_a_config_or_exit_78(config_file: Path, content: bytes) -> None:
    config_file.write_bytes(content)
    result = fleetprov("check-config", "--config", str(config_file), timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 78), result.stderr
    if result.returncode == 0:
        assert isinstance(yaml.safe_load(result.stdout), dict)
        return
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[-1].isprintable(), result.stderr
    assert lines[-1].startswith(f"fleetprov: config: {config_file}: "), result.stderr


def test_a_key_with_a_line_break_is_a_one_line_error(config_file: Path) -> None:
    config_file.write_text(yaml.safe_dump({**MINIMAL_CONFIG, "a\rb": 1}))
    result = fleetprov("check-config", "--config", str(config_file), timeout=60)
    assert result.returncode == 78
    assert "\r" not in result.stderr and result.stderr.count("\n") == 1, repr(result.stderr)


def test_a_control_character_is_a_one_line_error(config_file: Path) -> None:
    config_file.write_bytes(b'endpoint: "a\x01b"\n')
    result = fleetprov("check-config", "--config", str(config_file), timeout=60)
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1, result.stderr
