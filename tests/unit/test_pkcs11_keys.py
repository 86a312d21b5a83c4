"""fleetprov.keys.pkcs11 against real SoftHSM2 tokens, one of each test's own (tests/softhsm.py).

CSRs are checked by two independent verifiers (cryptography and `openssl req -verify`); the private key's
attributes are read back from the token; every error is checked for its class, exit code and message, and
for never carrying the PIN.
"""

from __future__ import annotations

import subprocess
import traceback
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pkcs11
import pkcs11._pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_named_curve_parameters

from fleetprov.config import KEY_TYPES
from fleetprov.errors import EX_CONFIG, EX_TEMPFAIL, ConfigError, FleetprovError
from fleetprov.keys import DeviceKey
from fleetprov.keys.pkcs11 import (
    KEY_SPECS,
    KeyMissing,
    Pkcs11Key,
    TokenError,
    _login_error,
    delete_key,
    find_key,
    generate_key,
    open_token,
    signing_mechanism,
    store_certificate,
    token_errors,
    translated,
)
from fleetprov.keys.pkcs11_settings import Pkcs11Settings
from fleetprov.keys.pkcs11_uri import Pkcs11Uri, parse_pkcs11_uri
from fleetprov.store import Manifest
from tests.softhsm import SoftToken, make_token

WRONG_PIN = "wrong-pin-97531"
P256 = encode_named_curve_parameters("secp256r1")


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    return make_token(tmp_path / "hsm", monkeypatch)


@pytest.fixture
def session(token: SoftToken) -> Iterator[pkcs11.Session]:
    with open_token(token.settings(), token.pin) as opened:
        yield opened


def private_object(session: pkcs11.Session, label: str) -> pkcs11.Object:
    return session.get_key(ObjectClass.PRIVATE_KEY, label=label)


def count_objects(session: pkcs11.Session, template: dict[Attribute, object] | None = None) -> int:
    return len(list(session.get_objects(template or {})))


def error_text(exc: BaseException) -> str:
    """Everything an error could show: message, repr and the whole formatted chain."""
    return str(exc) + repr(exc) + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# -- generated keys and their CSRs -----------------------------------------------------------------------


def test_key_specs_cover_the_config_key_types() -> None:
    assert tuple(KEY_SPECS) == KEY_TYPES


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_csr_of_a_generated_key_verifies_with_cryptography_and_openssl(session: pkcs11.Session, key_type: str) -> None:
    key = generate_key(session, key_type, "device-key", b"\x01\x02")
    pem = key.csr_pem("thing-42")

    csr = x509.load_pem_x509_csr(pem.encode())
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thing-42")])
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    public_der = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_der == key.public_key_der()
    public = serialization.load_der_public_key(key.public_key_der())
    if key_type.startswith("ec-"):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[key_type]
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == int(key_type[4:])
        assert public.public_numbers().e == 65537

    verified = subprocess.run(["openssl", "req", "-verify", "-noout"], input=pem.encode(), capture_output=True)
    assert verified.returncode == 0, verified.stderr
    assert b"verify OK" in verified.stderr


def test_a_tampered_csr_fails_verification(session: pkcs11.Session) -> None:
    """The verifiers above are not vacuous: the same CSR with another subject does not verify."""
    key = generate_key(session, "ec-p256", "device-key", None)
    pem = key.csr_pem("thing-aaaa")
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    tampered = x509.load_der_x509_csr(der.replace(b"thing-aaaa", b"thing-bbbb"))
    assert not tampered.is_signature_valid


@pytest.mark.parametrize(
    ("key_type", "secret"), [("ec-p256", Attribute.VALUE), ("rsa-2048", Attribute.PRIVATE_EXPONENT)]
)
def test_the_private_key_is_sensitive_and_never_extractable(
    session: pkcs11.Session, key_type: str, secret: Attribute
) -> None:
    generate_key(session, key_type, "device-key", b"\x07")
    private = private_object(session, "device-key")
    with pytest.raises(pkcs11.AttributeSensitive):
        private[secret]
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.NEVER_EXTRACTABLE] is True
    assert private[Attribute.ALWAYS_SENSITIVE] is True
    assert private[Attribute.TOKEN] is True
    assert private[Attribute.PRIVATE] is True
    assert private[Attribute.SIGN] is True
    for capability in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE):
        assert private[capability] is False
    public = session.get_key(ObjectClass.PUBLIC_KEY, label="device-key")
    assert public[Attribute.TOKEN] is True
    assert public[Attribute.ID] == b"\x07"


def test_a_key_outlives_its_session(token: SoftToken) -> None:
    with open_token(token.settings(), token.pin) as session:
        made = generate_key(session, "ec-p256", "device-key", b"\x01")
        expected = made.public_key_der()
    with open_token(token.settings(), token.pin) as session:
        found = find_key(session, "device-key", None)
        assert found.public_key_der() == expected
        assert x509.load_pem_x509_csr(found.csr_pem("thing").encode()).is_signature_valid


def test_key_reference_is_an_rfc7512_uri_the_manifest_accepts(session: pkcs11.Session) -> None:
    key = generate_key(session, "ec-p256", "clé;/ 1%", b"\x00\xff")
    assert key.key_reference == "pkcs11:token=fleetprov;object=cl%C3%A9%3B%2F%201%25;id=%00%FF;type=private"
    assert parse_pkcs11_uri(key.key_reference) == Pkcs11Uri("fleetprov", "clé;/ 1%", b"\x00\xff")
    assert repr(key) == f"Pkcs11Key({key.key_reference})"
    assert find_key(session, "clé;/ 1%", None).key_reference == key.key_reference
    device_key: DeviceKey = key  # the protocol the provisioning flow uses
    manifest = Manifest(
        thing_name="thing",
        certificate_id="c" * 64,
        endpoint="localhost",
        not_after="2036-11-20T08:00:00Z",
        key_reference=device_key.key_reference,
        template="t",
        device_configuration={},
        provisioned_at="2026-01-01T00:00:00Z",
    )
    assert manifest.key_reference == key.key_reference


def test_a_key_with_only_an_id_has_no_object_in_its_uri(session: pkcs11.Session) -> None:
    key = generate_key(session, "ec-p256", None, b"\x42")
    assert key.key_reference == "pkcs11:token=fleetprov;id=%42;type=private"
    assert find_key(session, None, b"\x42").key_reference == key.key_reference


@pytest.mark.parametrize("common_name", ["", "x" * 65])
def test_csr_refuses_a_common_name_x509_does_not_allow(session: pkcs11.Session, common_name: str) -> None:
    key = generate_key(session, "ec-p256", "device-key", None)
    with pytest.raises(ValueError, match="1 to 64"):
        key.csr_pem(common_name)


def test_generate_key_refuses_unknown_key_types_and_nameless_keys(session: pkcs11.Session) -> None:
    with pytest.raises(ValueError, match="unknown key type"):
        generate_key(session, "ec-p521", "device-key", None)
    with pytest.raises(ValueError, match="label, an id"):
        generate_key(session, "ec-p256", None, None)
    assert count_objects(session) == 0


@pytest.mark.parametrize(
    ("label", "key_id", "named"), [("device-key", b"\x09", "label 'device-key'"), ("other", b"\x01", "id 01")]
)
def test_generate_key_refuses_a_label_or_id_already_in_use(
    session: pkcs11.Session, label: str, key_id: bytes, named: str
) -> None:
    generate_key(session, "ec-p256", "device-key", b"\x01")
    with pytest.raises(ConfigError, match=f"already holds a private key with {named}") as caught:
        generate_key(session, "ec-p256", label, key_id)
    assert caught.value.exit_code == EX_CONFIG
    assert count_objects(session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY}) == 1


# -- finding and deleting keys ---------------------------------------------------------------------------


def test_find_key_by_label_by_id_and_by_both(session: pkcs11.Session) -> None:
    first = generate_key(session, "ec-p256", "first", b"\x01")
    second = generate_key(session, "rsa-2048", "second", b"\x02")
    assert find_key(session, "first", None).public_key_der() == first.public_key_der()
    assert find_key(session, None, b"\x02").public_key_der() == second.public_key_der()
    assert find_key(session, "second", b"\x02").public_key_der() == second.public_key_der()
    assert first.public_key_der() != second.public_key_der()


@pytest.mark.parametrize(
    ("label", "key_id", "named"), [("absent", None, "label 'absent'"), ("first", b"\x02", "label 'first' and id 02")]
)
def test_find_key_reports_a_missing_key(session: pkcs11.Session, label: str, key_id: bytes | None, named: str) -> None:
    generate_key(session, "ec-p256", "first", b"\x01")
    with pytest.raises(KeyMissing) as caught:
        find_key(session, label, key_id)
    assert str(caught.value) == f"key: token 'fleetprov' holds no private key with {named}"
    assert caught.value.exit_code == EX_CONFIG
    assert not caught.value.transient


def test_find_key_refuses_duplicate_labels(session: pkcs11.Session) -> None:
    for key_id in (b"\x01", b"\x02", b"\x03"):  # generate_key refuses twins, another program may not
        session.generate_keypair(KeyType.RSA, 2048, label="twin", id=key_id, store=True)
    with pytest.raises(ConfigError, match="holds 3 private keys with label 'twin': the key is ambiguous") as caught:
        find_key(session, "twin", None)
    assert caught.value.exit_code == EX_CONFIG
    assert find_key(session, "twin", b"\x02").key_reference.endswith("id=%02;type=private")


def test_find_key_needs_the_public_key(session: pkcs11.Session) -> None:
    generate_key(session, "ec-p256", "device-key", b"\x01")
    session.get_key(ObjectClass.PUBLIC_KEY, label="device-key").destroy()
    with pytest.raises(KeyMissing, match="holds 0 public keys for the private key with label 'device-key'"):
        find_key(session, "device-key", None)


def test_find_key_needs_a_name(session: pkcs11.Session) -> None:
    with pytest.raises(ValueError, match="label, its id or both"):
        find_key(session, None, None)


def self_signed_der(key: Pkcs11Key) -> bytes:
    """A certificate for the token key, signed by a throwaway CA key (the token key never signs it)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thing")]))
        .issuer_name(name)
        .public_key(serialization.load_der_public_key(key.public_key_der()))  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_store_certificate_puts_one_certificate_next_to_the_key(session: pkcs11.Session) -> None:
    key = generate_key(session, "ec-p256", "device-key", b"\x01")
    first, second = self_signed_der(key), self_signed_der(key)
    store_certificate(session, "device-key", b"\x01", first)
    store_certificate(session, "device-key", b"\x01", second)  # replaces the first
    (stored,) = session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: "device-key"})
    assert stored[Attribute.VALUE] == second
    assert stored[Attribute.ID] == b"\x01"
    assert stored[Attribute.SUBJECT] == x509.load_der_x509_certificate(second).subject.public_bytes()


def test_delete_key_removes_the_pair_and_its_certificate_and_is_idempotent(session: pkcs11.Session) -> None:
    key = generate_key(session, "ec-p256", "device-key", b"\x01")
    generate_key(session, "ec-p256", "bystander", b"\x02")
    store_certificate(session, "device-key", b"\x01", self_signed_der(key))
    assert count_objects(session, {Attribute.LABEL: "device-key"}) == 3

    assert delete_key(session, "device-key", b"\x01") == 3
    assert count_objects(session, {Attribute.LABEL: "device-key"}) == 0
    with pytest.raises(KeyMissing):
        find_key(session, "device-key", None)
    assert delete_key(session, "device-key", b"\x01") == 0
    assert delete_key(session, None, b"\x01") == 0
    assert count_objects(session, {Attribute.LABEL: "bystander"}) == 2  # untouched


def test_delete_key_by_id_alone(session: pkcs11.Session) -> None:
    generate_key(session, "rsa-2048", "device-key", b"\x05")
    assert delete_key(session, None, b"\x05") == 2
    assert count_objects(session) == 0


# -- opening the token -----------------------------------------------------------------------------------


def refused(settings: Pkcs11Settings, pin: str) -> ConfigError:
    """The ConfigError open_token raises instead of opening the token."""
    with pytest.raises(ConfigError) as caught, open_token(settings, pin):
        pytest.fail("open_token opened the token")
    assert caught.value.exit_code == EX_CONFIG
    assert not caught.value.transient
    return caught.value


def test_wrong_pin_is_a_config_error_that_never_shows_the_pin(token: SoftToken) -> None:
    error = refused(token.settings(), WRONG_PIN)
    assert error.message == (
        "the PIN was refused by token 'fleetprov': check the PIN in pin_env TEST_PKCS11_PIN "
        "(each wrong PIN brings the token nearer to locking it)"
    )
    text = error_text(error)
    assert WRONG_PIN not in text
    assert token.pin not in text
    assert "PinIncorrect" not in text  # the pkcs11 exception is not even chained


def test_locked_pin_is_reported_without_trying_the_pin(token: SoftToken) -> None:
    token.lock_user_pin()
    error = refused(token.settings(), token.pin)  # the right PIN, which SoftHSM2 would still accept
    assert error.message.startswith("the user PIN of token 'fleetprov' is locked after too many wrong PINs")
    assert token.pin not in error_text(error)


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (pkcs11.PinIncorrect(), "the PIN was refused by token 't'"),
        (pkcs11.PinLenRange(), "the PIN was refused by token 't'"),
        (pkcs11.PinLocked(), "the user PIN of token 't' is locked"),
        (pkcs11.PinExpired(), "the PIN of token 't' has expired"),
        (pkcs11.UserPinNotInitialized(), "token 't' has no user PIN yet"),
    ],
)
def test_every_pin_problem_is_a_config_error(exception: pkcs11.PKCS11Error, expected: str) -> None:
    """SoftHSM2 neither locks nor expires PINs: the translation of what real tokens answer, at least."""
    error = _login_error(exception, "token 't'", "pin_file /etc/pin")
    assert isinstance(error, ConfigError)
    assert error.message.startswith(expected)


def test_token_chosen_by_label_that_is_not_there_lists_the_labels(token: SoftToken) -> None:
    token.add_token("other token", "1111")
    error = refused(token.settings(token_label="absent"), token.pin)
    assert error.message == (
        f"PKCS#11 library {token.library} has no token labelled 'absent' (tokens: 'fleetprov', 'other token')"
    )


def test_two_tokens_with_the_label_are_refused(token: SoftToken) -> None:
    token.add_token("fleetprov", "1111")
    error = refused(token.settings(), token.pin)
    assert error.message == (
        f"2 tokens of PKCS#11 library {token.library} are labelled 'fleetprov': "
        "relabel all but one, or choose the token by slot"
    )


def slot_ids(token: SoftToken) -> dict[str, int]:
    """slot id of each initialised token by label, and of the free slot as ''."""
    library = pkcs11.lib(str(token.library))
    try:
        return {
            slot.get_token().label if slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED else "": slot.slot_id
            for slot in library.get_slots()
        }
    finally:
        library.finalize()


def test_token_chosen_by_slot(token: SoftToken) -> None:
    slots = slot_ids(token)
    with open_token(token.settings(token_label=None, slot=slots["fleetprov"]), token.pin) as session:
        assert session.token.label == "fleetprov"
    error = refused(token.settings(token_label=None, slot=slots[""]), token.pin)
    assert error.message == f"the token in slot {slots['']} of PKCS#11 library {token.library} is not initialised"
    absent = max(slots.values()) + 1
    error = refused(token.settings(token_label=None, slot=absent), token.pin)
    listed = ", ".join(str(slot) for slot in slot_ids(token).values())
    assert error.message == f"PKCS#11 library {token.library} has no slot {absent} (slots: {listed})"


def test_missing_library(token: SoftToken, tmp_path: Path) -> None:
    missing = tmp_path / "libmissing.so"
    error = refused(token.settings(library=missing), token.pin)
    assert error.message == f"PKCS#11 library {missing} does not exist or is not a file"


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "not-a-library.so"
    path.write_text("this is not a shared object\n")
    return path


@pytest.mark.parametrize(
    ("library", "reason"),
    [
        (lambda tmp_path: Path("/bin/true"), "cannot dynamically load"),  # an executable, not a library
        (_text_file, "file too short"),
        (lambda tmp_path: Path(pkcs11._pkcs11.__file__), "undefined symbol: C_GetFunctionList"),  # a real .so
    ],
    ids=["executable", "text-file", "other-shared-object"],
)
def test_a_file_that_is_no_pkcs11_library(token: SoftToken, tmp_path: Path, library: object, reason: str) -> None:
    path = library(tmp_path)  # type: ignore[operator]
    error = refused(token.settings(library=path), token.pin)
    assert error.message.startswith(f"{path} is not a usable PKCS#11 library: PKCS11Error: ")
    assert reason in error.message


def test_a_module_that_fails_to_initialise(token: SoftToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "missing.conf"))
    error = refused(token.settings(), token.pin)
    assert error.message == f"{token.library} is not a usable PKCS#11 library: GeneralError"


def test_a_key_used_after_its_token_was_closed_is_a_token_error(token: SoftToken) -> None:
    with open_token(token.settings(), token.pin) as session:
        key = generate_key(session, "ec-p256", "device-key", None)
    with pytest.raises(TokenError, match="token 'fleetprov' failed to sign: PKCS11Error") as caught:
        key.csr_pem("thing")
    assert caught.value.exit_code == EX_TEMPFAIL
    assert caught.value.transient


# -- mechanisms the token does not offer -----------------------------------------------------------------


def test_a_token_without_ec_key_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = make_token(tmp_path, monkeypatch, mechanisms=["CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_SHA256_RSA_PKCS"])
    with open_token(token.settings(), token.pin) as session:
        with pytest.raises(ConfigError) as caught:
            generate_key(session, "ec-p256", "device-key", None)
        assert caught.value.message == (
            "token 'fleetprov' does not offer EC_KEY_PAIR_GEN and ECDSA or ECDSA_SHA256, which ec-p256 keys need; "
            "key types it supports: rsa-2048, rsa-3072"
        )
        assert caught.value.exit_code == EX_CONFIG
        assert count_objects(session) == 0
        key = generate_key(session, "rsa-2048", "device-key", None)
        assert x509.load_pem_x509_csr(key.csr_pem("thing").encode()).is_signature_valid


def test_the_token_itself_refuses_a_mechanism_it_does_not_offer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past fleetprov's own check (a lower-level call): the token's CKR_MECHANISM_INVALID is a config error."""
    token = make_token(tmp_path, monkeypatch, mechanisms=["CKM_EC_KEY_PAIR_GEN"])
    with open_token(token.settings(), token.pin) as session:
        _, private = session.generate_keypair(KeyType.EC, public_template={Attribute.EC_PARAMS: P256})
        with pytest.raises(ConfigError) as caught, token_errors("token 'fleetprov'", "sign"):
            private.sign(bytes(32), mechanism=Mechanism.ECDSA)
    assert caught.value.message == "token 'fleetprov' cannot sign: MechanismInvalid"
    assert caught.value.exit_code == EX_CONFIG
    assert isinstance(caught.value.__cause__, pkcs11.MechanismInvalid)


def test_a_token_that_can_make_ec_keys_but_not_sign_with_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = make_token(tmp_path, monkeypatch, mechanisms=["CKM_EC_KEY_PAIR_GEN"])
    with open_token(token.settings(), token.pin) as session, pytest.raises(ConfigError) as caught:
        generate_key(session, "ec-p384", "device-key", None)
    assert caught.value.message == (
        "token 'fleetprov' does not offer ECDSA or ECDSA_SHA256, which ec-p384 keys need; key types it supports: none"
    )


def test_a_key_the_token_no_longer_signs_with(token: SoftToken) -> None:
    with open_token(token.settings(), token.pin) as session:
        generate_key(session, "ec-p256", "device-key", None)
    token.conf.write_text(token.conf.read_text() + "slots.mechanisms = CKM_EC_KEY_PAIR_GEN\n")
    with open_token(token.settings(), token.pin) as session:
        key = find_key(session, "device-key", None)
        with pytest.raises(ConfigError, match="token 'fleetprov' offers no SHA-256 signature for this key"):
            key.csr_pem("thing")


def test_a_key_that_may_not_sign(session: pkcs11.Session) -> None:
    session.generate_keypair(
        KeyType.EC,
        store=True,
        label="no-sign",
        capabilities=pkcs11.MechanismFlag.VERIFY,
        public_template={Attribute.EC_PARAMS: P256},
    )
    key = find_key(session, "no-sign", None)
    with pytest.raises(ConfigError, match="does not let this key sign"):
        key.csr_pem("thing")


def test_signing_mechanism_prefers_plain_ecdsa_and_falls_back_to_ecdsa_sha256() -> None:
    assert signing_mechanism(KeyType.EC, {Mechanism.ECDSA, Mechanism.ECDSA_SHA256}) == Mechanism.ECDSA
    assert signing_mechanism(KeyType.EC, {Mechanism.ECDSA_SHA256}) == Mechanism.ECDSA_SHA256
    assert signing_mechanism(KeyType.EC, {Mechanism.SHA256_RSA_PKCS}) is None
    assert signing_mechanism(KeyType.RSA, {Mechanism.SHA256_RSA_PKCS, Mechanism.ECDSA}) == Mechanism.SHA256_RSA_PKCS
    assert signing_mechanism(KeyType.RSA, {Mechanism.RSA_PKCS}) is None


@pytest.mark.parametrize(
    ("exception", "kind", "exit_code"),
    [
        (pkcs11.MechanismInvalid(), ConfigError, EX_CONFIG),
        (pkcs11.KeySizeRange(), ConfigError, EX_CONFIG),
        (pkcs11.TokenWriteProtected(), ConfigError, EX_CONFIG),
        (pkcs11.DeviceError(), TokenError, EX_TEMPFAIL),
        (pkcs11.DeviceRemoved(), TokenError, EX_TEMPFAIL),
        (pkcs11.PKCS11Error("Unmapped error code 0x140"), TokenError, EX_TEMPFAIL),
    ],
)
def test_translated(exception: pkcs11.PKCS11Error, kind: type[FleetprovError], exit_code: int) -> None:
    error = translated(exception, "token 't'", "sign")
    assert type(error) is kind
    assert error.exit_code == exit_code
    assert error.message.startswith(f"token 't' {'cannot' if kind is ConfigError else 'failed to'} sign: ")
    assert type(exception).__name__ in error.message
