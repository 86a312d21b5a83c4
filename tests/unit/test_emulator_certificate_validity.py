"""The emulator's certificate_validity: how long the device certificates it issues run.

Settings (YAML key ``certificate_validity``, ``serve --certificate-validity SECONDS``), the CA issuing with
it, and serve refusing a bad value that was set in code.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetprov.emulator.ca import (
    BACKDATE,
    CLAIM_VALIDITY,
    DEVICE_VALIDITY,
    LATEST_NOT_AFTER,
    CaMaterial,
    CertificateAuthority,
    IssuedCertificate,
    device_validity_problem,
    ensure_ca_material,
)
from fleetprov.emulator.registry import Registry
from fleetprov.emulator.server import create_claim, serve
from fleetprov.emulator.settings import (
    DEFAULT_CERTIFICATE_VALIDITY,
    EmulatorSettings,
    load_settings,
    with_flags,
)
from fleetprov.errors import EX_CONFIG, ConfigError, EmulatorError
from tests.unit.serve_flags import flags

TEN_YEARS = 3650 * 86400.0
EXAMPLE = Path(__file__).parents[2] / "configs" / "emulator.example.yaml"


def load_yaml(tmp_path: Path, text: str) -> EmulatorSettings:
    path = tmp_path / "emulator.yaml"
    path.write_text(textwrap.dedent(text))
    return load_settings(path, tmp_path / "state")


# --- settings ------------------------------------------------------------------------------------


def test_default_is_ten_years(tmp_path: Path) -> None:
    assert DEFAULT_CERTIFICATE_VALIDITY == TEN_YEARS
    assert EmulatorSettings(state_dir=tmp_path).certificate_validity == TEN_YEARS
    assert load_settings(None, tmp_path).certificate_validity == TEN_YEARS
    assert load_yaml(tmp_path, "port: 0\n").certificate_validity == TEN_YEARS
    assert with_flags(EmulatorSettings(state_dir=tmp_path), **flags()).certificate_validity == TEN_YEARS


def test_the_documented_example_sets_the_default(tmp_path: Path) -> None:
    assert load_settings(EXAMPLE, tmp_path).certificate_validity == TEN_YEARS


@pytest.mark.parametrize(("text", "seconds"), [("60", 60.0), ("1.5", 1.5), ("86400", 86400.0), ("3.0e+3", 3000.0)])
def test_yaml_key(tmp_path: Path, text: str, seconds: float) -> None:
    settings = load_yaml(tmp_path, f"certificate_validity: {text}\n")
    assert settings.certificate_validity == seconds
    assert isinstance(settings.certificate_validity, float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "must be a positive number of seconds"),
        ("-60", "must be a positive number of seconds"),
        (".nan", "must be a positive number of seconds"),
        (".inf", "must be a positive number of seconds"),
        ("1" + "0" * 400, "must be a positive number of seconds"),  # an integer too big for a float
        ("100000000000000000000", "is too long: certificates cannot run past 9999-12-31T23:59:59Z"),
        ("1.0e+20", "is too long: certificates cannot run past 9999-12-31T23:59:59Z"),
        ("1e20", "expected an integer or a number, got str"),  # YAML 1.1: a float needs its dot
        ("abc", "expected an integer or a number, got str"),
        ('"60"', "expected an integer or a number, got str"),
        ("true", "expected an integer or a number, got a boolean"),
        ("[60]", "expected an integer or a number, got list"),
    ],
)
def test_yaml_key_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml(tmp_path, f"certificate_validity: {text}\n")
    assert str(caught.value).startswith(f"config: {tmp_path / 'emulator.yaml'}: certificate_validity: ")
    assert message in str(caught.value)
    assert caught.value.exit_code == EX_CONFIG == 78


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), (" 60 ", 60.0), ("0.5", 0.5), (90, 90.0)])
def test_flag(tmp_path: Path, value: Any, seconds: float) -> None:
    settings = with_flags(EmulatorSettings(state_dir=tmp_path), **flags(certificate_validity=value))
    assert settings.certificate_validity == seconds


def test_flag_wins_over_yaml(tmp_path: Path) -> None:
    from_yaml = load_yaml(tmp_path, "certificate_validity: 600\n")
    assert with_flags(from_yaml, **flags()).certificate_validity == 600.0
    assert with_flags(from_yaml, **flags(certificate_validity="45")).certificate_validity == 45.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be a positive number of seconds"),
        ("-1", "must be a positive number of seconds"),
        ("nan", "must be a positive number of seconds"),
        ("inf", "must be a positive number of seconds"),
        ("1e400", "must be a positive number of seconds"),
        ("1e20", "is too long: certificates cannot run past 9999-12-31T23:59:59Z"),
        ("abc", "not a number of seconds"),
        ("", "not a number of seconds"),
        ("60s", "not a number of seconds"),
    ],
)
def test_flag_errors(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        with_flags(EmulatorSettings(state_dir=tmp_path), **flags(certificate_validity=value))
    assert str(caught.value).startswith(f"config: --certificate-validity {value}: ")
    assert message in str(caught.value)
    assert caught.value.exit_code == 78


def test_flag_error_shows_unprintable_text_escaped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--certificate-validity 6\\n0: not a number"):
        with_flags(EmulatorSettings(state_dir=tmp_path), **flags(certificate_validity="6\n0"))


def test_the_longest_validity_ends_at_the_latest_x509_time() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    longest = (LATEST_NOT_AFTER - now).total_seconds()
    assert device_validity_problem(longest, now) is None
    problem = device_validity_problem(longest + 1, now)
    assert problem is not None and f"at most {int(longest)} seconds from now" in problem
    assert device_validity_problem(1e-3, now) is None


# --- issuing -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> CaMaterial:
    return ensure_ca_material(tmp_path_factory.mktemp("state"))


def make_csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def issued_between(issue: Any) -> tuple[dt.datetime, x509.Certificate, dt.datetime]:
    """Run ``issue`` and return (time before, the certificate it issued, time after)."""
    before = utcnow()
    issued = issue()
    after = utcnow()
    certificate = issued[0] if isinstance(issued, tuple) else issued
    assert isinstance(certificate, IssuedCertificate)
    cert = x509.load_pem_x509_certificate(certificate.certificate_pem.encode())
    assert certificate.not_after == cert.not_valid_after_utc
    return before, cert, after


def assert_valid_for(seconds: float, before: dt.datetime, cert: x509.Certificate, after: dt.datetime) -> None:
    """not_after is the issue time + ``seconds`` (X.509 keeps whole seconds: rounded down), not_before is
    the issue time backdated by BACKDATE, both from the same issue time."""
    validity, floor = dt.timedelta(seconds=seconds), before.replace(microsecond=0)
    assert floor + validity <= cert.not_valid_after_utc <= after + validity
    assert floor - BACKDATE <= cert.not_valid_before_utc <= after - BACKDATE
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == validity + BACKDATE


@pytest.mark.parametrize("seconds", [60.0, 120.0, 3600.0])
def test_sign_csr_issues_with_the_given_validity(material: CaMaterial, seconds: float) -> None:
    issuer = material.issuing.with_device_validity(dt.timedelta(seconds=seconds))
    before, cert, after = issued_between(lambda: issuer.sign_csr(make_csr()))
    assert_valid_for(seconds, before, cert, after)
    cert.verify_directly_issued_by(material.issuing.cert)


def test_create_keys_and_certificate_issues_with_the_given_validity(material: CaMaterial) -> None:
    issuer = material.issuing.with_device_validity(dt.timedelta(seconds=60))
    before, cert, after = issued_between(issuer.create_keys_and_certificate)
    assert_valid_for(60, before, cert, after)


def test_default_device_validity_is_ten_years(material: CaMaterial) -> None:
    assert material.issuing.device_validity == DEVICE_VALIDITY == dt.timedelta(days=3650)
    before, cert, after = issued_between(lambda: material.issuing.sign_csr(make_csr()))
    assert_valid_for(TEN_YEARS, before, cert, after)


def test_with_device_validity_leaves_the_original_alone(material: CaMaterial) -> None:
    short = material.issuing.with_device_validity(dt.timedelta(seconds=60))
    assert (short.cert, short.key) == (material.issuing.cert, material.issuing.key)
    assert short.device_validity == dt.timedelta(seconds=60)
    assert material.issuing.device_validity == DEVICE_VALIDITY


@pytest.mark.parametrize("seconds", [0, -60, 1e12])
def test_with_device_validity_refuses_bad_values(material: CaMaterial, seconds: float) -> None:
    with pytest.raises(EmulatorError, match="certificate validity: "):
        material.issuing.with_device_validity(dt.timedelta(seconds=seconds))


def test_an_explicit_validity_wins_over_the_device_validity(material: CaMaterial) -> None:
    short = material.issuing.with_device_validity(dt.timedelta(seconds=60))
    key = ec.generate_private_key(ec.SECP256R1())
    before, cert, after = issued_between(lambda: short.sign_client(key.public_key(), "claim", CLAIM_VALIDITY))
    assert_valid_for(CLAIM_VALIDITY.total_seconds(), before, cert, after)


def test_the_claim_keeps_ten_years(tmp_path: Path, material: CaMaterial) -> None:
    short = CaMaterial(material.paths, material.root, material.issuing.with_device_validity(dt.timedelta(seconds=60)))
    registry = Registry(tmp_path / "registry.sqlite")
    try:
        before = utcnow()
        claim = create_claim(registry, short, tmp_path / "claim", None)
        cert = x509.load_pem_x509_certificate(claim.certificate.read_bytes())
        assert_valid_for(TEN_YEARS, before, cert, utcnow())
    finally:
        registry.close()


def test_not_after_never_passes_the_latest_x509_time(material: CaMaterial) -> None:
    """Had a validity slipped past the check (made in code), not_after stops at 9999-12-31T23:59:59Z."""
    endless = CertificateAuthority(material.issuing.cert, material.issuing.key, dt.timedelta(days=3_000_000))
    issued = endless.sign_csr(make_csr())
    assert issued.not_after == LATEST_NOT_AFTER


# --- serve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf"), 1e20])
def test_serve_refuses_a_bad_validity_before_touching_the_state_dir(tmp_path: Path, seconds: float) -> None:
    settings = EmulatorSettings(state_dir=tmp_path / "state", certificate_validity=seconds)
    with pytest.raises(ConfigError, match=r"certificate_validity .*: ") as caught:
        asyncio.run(serve(settings, asyncio.Event()))
    assert caught.value.exit_code == 78
    assert not (tmp_path / "state").exists()
