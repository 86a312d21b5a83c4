"""Tests for fleetprov.factory: keygen, CSR subjects for JITP, lab-CA signing and their error paths."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path
from typing import Union

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkcs11 import Attribute, ObjectClass

from fleetprov import factory
from fleetprov.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_USAGE,
    ConfigError,
    FleetprovError,
    StorageError,
    UsageError,
)
from fleetprov.keys.pkcs11 import find_key, open_token
from tests.softhsm import LIBRARY, SoftToken, make_token

Key = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

FULL = factory.Subject(
    common_name="thing-1",
    country="DE",
    organization="Acme GmbH",
    organizational_unit="Line 3",
    state="Bavaria",
    serial_number="SN-0042",
    dn_qualifier="batch.7",
)


def make_ca(directory: Path, *, ca: bool = True, key: Key | None = None) -> tuple[Path, Path, Key]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, key


def exit_code(excinfo: pytest.ExceptionInfo[FleetprovError]) -> int:
    return excinfo.value.exit_code


@pytest.mark.parametrize("key_type", factory.KEY_TYPES)
def test_keygen_writes_a_0600_key_of_the_type(tmp_path: Path, key_type: str) -> None:
    out = tmp_path / "device.key"
    factory.keygen(out, key_type)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = factory.load_private_key(out)
    if key_type.startswith("ec-"):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[key_type]
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == int(key_type[4:])


def test_keygen_refuses_to_overwrite_and_bad_types(tmp_path: Path) -> None:
    out = tmp_path / "device.key"
    out.write_text("precious")
    with pytest.raises(FleetprovError, match="exists already") as excinfo:
        factory.keygen(out, "ec-p256")
    assert exit_code(excinfo) == EX_CANTCREAT
    assert out.read_text() == "precious"
    with pytest.raises(FleetprovError, match="--key-type") as excinfo:
        factory.keygen(tmp_path / "other.key", "dsa-1024")
    assert exit_code(excinfo) == EX_USAGE
    assert not (tmp_path / "other.key").exists()


def test_subject_fields_round_trip_through_csr_and_certificate(tmp_path: Path) -> None:
    factory.keygen(tmp_path / "device.key", "ec-p256")
    request = factory.csr(tmp_path / "device.key", tmp_path / "device.csr", FULL)
    assert factory.subject_of(request.subject) == FULL
    loaded = factory.load_csr(tmp_path / "device.csr")
    assert factory.subject_of(loaded.subject) == FULL
    assert stat.S_IMODE((tmp_path / "device.csr").stat().st_mode) == 0o644

    ca_cert, ca_key, _ = make_ca(tmp_path)
    cert = factory.sign(tmp_path / "device.csr", ca_cert, ca_key, tmp_path / "device.pem", "10")
    assert factory.subject_of(cert.subject) == FULL
    assert factory.describe(cert)[0] == (
        "subject: C=DE, ST=Bavaria, O=Acme GmbH, OU=Line 3, CN=thing-1, serialNumber=SN-0042, dnQualifier=batch.7"
    )


def test_only_common_name_is_required(tmp_path: Path) -> None:
    factory.keygen(tmp_path / "device.key", "ec-p384")
    request = factory.csr(tmp_path / "device.key", tmp_path / "device.csr", factory.Subject("thing-2"))
    assert factory.subject_of(request.subject) == factory.Subject("thing-2")


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        (factory.Subject("thing", country="USA"), "--country must be exactly 2 letters"),
        (factory.Subject("thing", country="1A"), "--country must be exactly 2 letters"),
        (factory.Subject(""), "--cn must not be empty"),
        (factory.Subject("  "), "--cn must not be empty"),
        (factory.Subject("thing", organization=""), "--organization must not be empty"),
        (factory.Subject("thing", state="line\nbreak"), "--state .* control characters"),
        (factory.Subject("thing", serial_number="a_b"), "--serial-number .* only letters"),
        (factory.Subject("thing", dn_qualifier="x" * 65), "--dn-qualifier is longer than 64"),
    ],
)
def test_bad_subject_values_are_usage_errors(tmp_path: Path, subject: factory.Subject, message: str) -> None:
    factory.keygen(tmp_path / "device.key", "ec-p256")
    with pytest.raises(FleetprovError, match=message) as excinfo:
        factory.csr(tmp_path / "device.key", tmp_path / "device.csr", subject)
    assert exit_code(excinfo) == EX_USAGE
    assert not (tmp_path / "device.csr").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read key"), (b"not a key", "not a readable private key")],
)
def test_unusable_key_is_a_config_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    key = tmp_path / "device.key"
    if content is not None:
        key.write_bytes(content)
    with pytest.raises(FleetprovError, match=message) as excinfo:
        factory.csr(key, tmp_path / "device.csr", factory.Subject("thing"))
    assert exit_code(excinfo) == EX_CONFIG


def test_encrypted_key_is_a_config_error(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "device.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(FleetprovError, match="encrypted") as excinfo:
        factory.load_private_key(path)
    assert exit_code(excinfo) == EX_CONFIG


def _csr_file(tmp_path: Path, key: Key) -> Path:
    path = tmp_path / "device.csr"
    path.write_bytes(factory.make_csr(key, factory.Subject("thing")).public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)])
def test_issued_certificate_is_a_client_certificate_of_the_ca(tmp_path: Path, key: Key) -> None:
    ca_cert, ca_key, ca_private = make_ca(tmp_path)
    cert = factory.sign(_csr_file(tmp_path, key), ca_cert, ca_key, tmp_path / "device.pem", "365")

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    assert cert.public_key() == key.public_key()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment == isinstance(key, rsa.RSAPrivateKey)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_private.public_key()).digest
    assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365)
    again = factory.sign(tmp_path / "device.csr", ca_cert, ca_key, tmp_path / "again.pem", "365")
    assert again.serial_number != cert.serial_number


def test_ca_certificate_and_key_must_match(tmp_path: Path) -> None:
    ca_cert, _, _ = make_ca(tmp_path)
    other = tmp_path / "other.key"
    factory.keygen(other, "ec-p256")
    csr = _csr_file(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(FleetprovError, match="does not match CA certificate") as excinfo:
        factory.sign(csr, ca_cert, other, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_CONFIG
    assert not (tmp_path / "device.pem").exists()


def test_ca_certificate_must_be_a_ca(tmp_path: Path) -> None:
    ca_cert, ca_key, _ = make_ca(tmp_path, ca=False)
    csr = _csr_file(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(FleetprovError, match="not a CA certificate") as excinfo:
        factory.sign(csr, ca_cert, ca_key, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_CONFIG


def test_csr_with_a_bad_signature_is_refused(tmp_path: Path) -> None:
    ca_cert, ca_key, _ = make_ca(tmp_path)
    request = factory.make_csr(rsa.generate_private_key(65537, 2048), factory.Subject("thing"))
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte is the signature's
    path = tmp_path / "device.csr"
    path.write_bytes(bytes(der))
    with pytest.raises(FleetprovError, match=r"signature of CSR .* does not verify") as excinfo:
        factory.sign(path, ca_cert, ca_key, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_DATAERR
    assert not (tmp_path / "device.pem").exists()


def test_unreadable_csr_and_bad_days(tmp_path: Path) -> None:
    ca_cert, ca_key, _ = make_ca(tmp_path)
    path = tmp_path / "device.csr"
    path.write_text("-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(FleetprovError, match="not a readable CSR") as excinfo:
        factory.sign(path, ca_cert, ca_key, tmp_path / "device.pem", "365")
    assert exit_code(excinfo) == EX_DATAERR
    for days in ("0", "-1", "soon", "36501"):
        with pytest.raises(FleetprovError, match="--days") as excinfo:
            factory.sign(path, ca_cert, ca_key, tmp_path / "device.pem", days)
        assert exit_code(excinfo) == EX_USAGE


# -- keys in a PKCS#11 token (SoftHSM2) ------------------------------------------------------------------

TOKEN_URI = "pkcs11:token=fleetprov;object=device-key;type=private"
PIN_ENV = "TEST_FACTORY_PIN"


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    return make_token(tmp_path / "hsm", monkeypatch, pin="factory-pin-" + tmp_path.name[-8:])


def token_key(token: SoftToken, uri: str = TOKEN_URI) -> factory.TokenKey:
    return factory.token_key(uri, token.library, None, PIN_ENV)


def environ(token: SoftToken) -> dict[str, str]:
    return {PIN_ENV: token.pin}


@pytest.mark.parametrize(
    ("uri", "library", "pin_file", "pin_env", "message"),
    [
        ("pkcs11:token=t", LIBRARY, None, "P", "--key names no key: the PKCS#11 URI needs object=<key label>"),
        ("pkcs11:token=t;id=%01", LIBRARY, None, "P", "needs object=<key label>"),
        ("pkcs11:object=k", LIBRARY, None, "P", "names no token"),
        ("pkcs11:token=;object=k", LIBRARY, None, "P", "names no token"),
        ("pkcs11:token=t;object=k;type=public", LIBRARY, None, "P", "must name a private key (type=private)"),
        ("pkcs11:token=t;object=k?pin-value=1234", LIBRARY, None, "P", "query attributes"),
        ("pkcs11:token=t;object=k;slot=1", LIBRARY, None, "P", "unsupported PKCS#11 URI attribute"),
        ("pkcs11:token=t;object=k", None, None, "P", "needs --pkcs11-library"),
        ("pkcs11:token=t;object=k", LIBRARY, None, None, "exactly one of --pin-file FILE (mode 0600) and --pin-env"),
        ("pkcs11:token=t;object=k", LIBRARY, Path("pin"), "P", "exactly one of --pin-file"),
        ("pkcs11:token=t;object=k", LIBRARY, None, "A=B", "--pin-env must name an environment variable"),
    ],
)
def test_token_key_refuses_what_does_not_name_one_key(
    uri: str, library: Path | None, pin_file: Path | None, pin_env: str | None, message: str
) -> None:
    with pytest.raises(UsageError) as excinfo:
        factory.token_key(uri, library, pin_file, pin_env)
    assert exit_code(excinfo) == EX_USAGE
    assert message in str(excinfo.value)
    assert "1234" not in str(excinfo.value)  # the URI, which might hold a PIN, is never repeated


def test_token_key_is_named_by_its_canonical_uri() -> None:
    key = factory.token_key("pkcs11:object=k%20x;token=t;id=%0a", LIBRARY, Path("/run/pin"), None)
    assert key.uri == "pkcs11:token=t;object=k%20x;id=%0A;type=private"
    assert (key.settings.token_label, key.settings.key_label, key.settings.key_id) == ("t", "k x", b"\n")
    assert key.pin_option() == "--pin-file /run/pin"
    assert factory.is_token_key(key.uri) and not factory.is_token_key("device.key")


def test_token_options_with_a_key_file_are_refused() -> None:
    factory.no_token_options(None, None, None)
    with pytest.raises(UsageError, match="--pkcs11-library, --pin-env only go with a key in a token"):
        factory.no_token_options(LIBRARY, None, "P")


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_token_csr_has_the_key_file_csr_subject_and_the_token_key(
    token: SoftToken, tmp_path: Path, key_type: str
) -> None:
    key = token_key(token)
    assert factory.token_keygen(key, key_type, environ(token)) == TOKEN_URI
    out = tmp_path / "device.csr"

    request = factory.token_csr(key, out, FULL, environ(token))

    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    loaded = x509.load_pem_x509_csr(out.read_bytes())
    assert loaded.is_signature_valid
    assert isinstance(loaded.signature_hash_algorithm, hashes.SHA256)
    assert loaded.public_bytes(serialization.Encoding.DER) == request.public_bytes(serialization.Encoding.DER)
    # The same subject, byte for byte (string types included), as the CSR of a key file.
    file_key = tmp_path / "file.key"
    factory.keygen(file_key, key_type)
    file_request = factory.csr(file_key, tmp_path / "file.csr", FULL)
    assert (
        loaded.subject.public_bytes()
        == file_request.subject.public_bytes()
        == factory.subject_name(FULL).public_bytes()
    )
    assert factory.subject_of(loaded.subject) == FULL
    with open_token(key.settings, token.pin) as session:
        in_token = find_key(session, "device-key", None).public_key_der()
    spki = loaded.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki == in_token


def test_token_keygen_makes_a_key_that_never_leaves_the_token(token: SoftToken) -> None:
    key = token_key(token, "pkcs11:token=fleetprov;object=device-key;id=%07")
    assert factory.token_keygen(key, "ec-p384", environ(token)) == key.uri
    with open_token(key.settings, token.pin) as session:
        (private,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        assert private[Attribute.SENSITIVE] and private[Attribute.ALWAYS_SENSITIVE]
        assert not private[Attribute.EXTRACTABLE] and private[Attribute.NEVER_EXTRACTABLE]
        assert private[Attribute.ID] == b"\x07"
        with pytest.raises(pkcs11.AttributeSensitive):
            private[Attribute.VALUE]


@pytest.mark.parametrize(
    "uri",
    [TOKEN_URI, "pkcs11:token=fleetprov;object=other;id=%01"],
    ids=["same label", "same id"],
)
def test_token_keygen_never_replaces_a_key(token: SoftToken, uri: str) -> None:
    factory.token_keygen(token_key(token, "pkcs11:token=fleetprov;object=device-key;id=%01"), "ec-p256", environ(token))
    with pytest.raises(StorageError) as excinfo:
        factory.token_keygen(token_key(token, uri), "ec-p256", environ(token))
    assert exit_code(excinfo) == EX_CANTCREAT
    assert "already holds a private key" in str(excinfo.value)
    assert str(excinfo.value).startswith("factory: ")
    with open_token(token.settings(), token.pin) as session:
        assert len(list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))) == 1


def test_token_keygen_refuses_a_stray_public_key_with_the_label(token: SoftToken) -> None:
    factory.token_keygen(token_key(token), "ec-p256", environ(token))
    with open_token(token.settings(), token.pin) as session:
        session.get_key(ObjectClass.PRIVATE_KEY, label="device-key").destroy()
    with pytest.raises(StorageError, match="already holds a public key with label 'device-key'"):
        factory.token_keygen(token_key(token), "ec-p256", environ(token))


def test_token_keygen_refuses_an_unknown_key_type_before_the_token(token: SoftToken) -> None:
    with pytest.raises(UsageError, match="--key-type must be one of"):
        factory.token_keygen(token_key(token), "dsa", {})  # no PIN needed: refused first


@pytest.mark.parametrize(
    ("change", "pin_env_value", "code", "message"),
    [
        ({}, "wrong-pin", EX_CONFIG, "the PIN was refused by token 'fleetprov': check the PIN in --pin-env"),
        ({}, None, EX_CONFIG, f"--pin-env: environment variable {PIN_ENV} is not set"),
        ({}, "", EX_CONFIG, "the PIN is empty"),
        ({"uri": "pkcs11:token=nope;object=device-key"}, "ok", EX_CONFIG, "no token labelled 'nope'"),
        ({"uri": "pkcs11:token=fleetprov;object=nope"}, "ok", EX_CONFIG, "holds no private key with label 'nope'"),
        ({"uri": f"{TOKEN_URI};id=%02"}, "ok", EX_CONFIG, "holds no private key with label 'device-key' and id 02"),
        ({"library": Path("/nonexistent/lib.so")}, "ok", EX_CONFIG, "does not exist or is not a file"),
    ],
)
def test_token_csr_errors_write_nothing_and_never_show_the_pin(
    token: SoftToken,
    tmp_path: Path,
    change: dict[str, object],
    pin_env_value: str | None,
    code: int,
    message: str,
) -> None:
    factory.token_keygen(token_key(token, f"{TOKEN_URI};id=%01"), "ec-p256", environ(token))
    uri = str(change.get("uri", TOKEN_URI))
    library = change.get("library", token.library)
    assert isinstance(library, Path)
    key = factory.token_key(uri, library, None, PIN_ENV)
    env = {} if pin_env_value is None else {PIN_ENV: token.pin if pin_env_value == "ok" else pin_env_value}
    out = tmp_path / "device.csr"
    with pytest.raises(FleetprovError) as excinfo:
        factory.token_csr(key, out, FULL, env)
    assert exit_code(excinfo) == code
    assert message in str(excinfo.value)
    assert str(excinfo.value).startswith("factory: ")
    assert token.pin not in str(excinfo.value) + repr(excinfo.value)
    assert not out.exists()


def test_token_csr_pin_file_must_be_private(token: SoftToken, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o640)
    key = factory.token_key(TOKEN_URI, token.library, pin_file, None)
    out = tmp_path / "device.csr"
    with pytest.raises(ConfigError, match=r"--pin-file .*pin is readable by others \(mode 0640\)"):
        factory.token_csr(key, out, FULL, {})
    pin_file.chmod(0o600)
    factory.token_keygen(key, "ec-p256", {})
    factory.token_csr(key, out, FULL, {})
    assert x509.load_pem_x509_csr(out.read_bytes()).is_signature_valid


def test_token_csr_checks_subject_and_out_before_the_token(token: SoftToken, tmp_path: Path) -> None:
    key = token_key(token)
    with pytest.raises(UsageError, match="exactly 2 letters"):
        factory.token_csr(key, tmp_path / "a.csr", factory.Subject("t", country="USA"), {})
    existing = tmp_path / "b.csr"
    existing.write_text("keep")
    with pytest.raises(StorageError) as excinfo:
        factory.token_csr(key, existing, FULL, {})  # no PIN: refused before the token is asked
    assert exit_code(excinfo) == EX_CANTCREAT
    assert existing.read_text() == "keep"
