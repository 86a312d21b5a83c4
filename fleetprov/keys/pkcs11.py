"""Keys in a PKCS#11 token (an HSM, a TPM through tpm2-pkcs11, a smart card, SoftHSM2 in tests).

The private key is generated inside the token, SENSITIVE and not EXTRACTABLE, and never leaves it: the token
signs the CSR. cryptography cannot sign with a key it cannot see, so the CSR (PKCS#10) is assembled with
asn1crypto and only its to-be-signed bytes go to the token.

    with open_token(settings, read_pin(settings, os.environ)) as session:
        key = generate_key(session, "ec-p256", "device-key", b"\\x01")   # or find_key(session, ...)
        csr = key.csr_pem(thing_name)

A key is named, in the manifest and in messages, by an RFC 7512 URI (``pkcs11:token=...;object=...;id=...;
type=private``) that never holds a PIN. Every python-pkcs11 exception is translated at this boundary:
ConfigError (exit 78) for what the operator must fix (library, token, PIN, key, unsupported mechanism),
TokenError (exit 75, transient) for failures of the token itself.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union, cast

import pkcs11
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import pem as asn1_pem
from asn1crypto import x509 as asn1_x509
from asn1crypto.algos import DSASignature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from fleetprov.errors import EX_TEMPFAIL, ConfigError, FleetprovError
from fleetprov.keys.pkcs11_settings import Pkcs11Settings
from fleetprov.keys.pkcs11_uri import pkcs11_uri

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Library

STEP = "key"


class TokenError(FleetprovError):
    """The token or its module failed an operation it should support (device error, removed, out of memory)."""

    exit_code = EX_TEMPFAIL
    transient = True

    def __init__(self, message: str, *, step: str = STEP) -> None:
        super().__init__(message, step=step)


class KeyMissing(ConfigError):
    """No key in the token matches the configured (or recorded) label and id; retrying cannot help."""

    def __init__(self, message: str, *, step: str = STEP) -> None:
        super().__init__(message, step=step)


# -- key types ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySpec:
    key_type: KeyType
    generate: Mechanism
    sign: tuple[Mechanism, ...]  # any one will do, best first
    curve: Optional[str] = None  # asn1crypto's name of the named curve
    bits: Optional[int] = None


_EC_SIGN = (Mechanism.ECDSA, Mechanism.ECDSA_SHA256)
_RSA_SIGN = (Mechanism.SHA256_RSA_PKCS,)

# The names of fleetprov.config.KEY_TYPES, as fleetprov/keys/file.py makes them.
KEY_SPECS: dict[str, KeySpec] = {
    "ec-p256": KeySpec(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, _EC_SIGN, curve="secp256r1"),
    "ec-p384": KeySpec(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, _EC_SIGN, curve="secp384r1"),
    "rsa-2048": KeySpec(KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, _RSA_SIGN, bits=2048),
    "rsa-3072": KeySpec(KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, _RSA_SIGN, bits=3072),
}


def signing_mechanism(key_type: KeyType, available: set[Mechanism]) -> Optional[Mechanism]:
    """The mechanism a CSR for a ``key_type`` key is signed with on a token offering ``available``."""
    wanted = _EC_SIGN if key_type == KeyType.EC else _RSA_SIGN
    return next((mechanism for mechanism in wanted if mechanism in available), None)


def supported_key_types(available: set[Mechanism]) -> list[str]:
    return [
        name
        for name, spec in KEY_SPECS.items()
        if spec.generate in available and signing_mechanism(spec.key_type, available) is not None
    ]


# -- errors ----------------------------------------------------------------------------------------------

# What the operator must change (the key type, the token, the token's configuration), not a passing fault.
_UNSUPPORTED = (
    pkcs11.MechanismInvalid,
    pkcs11.MechanismParamInvalid,
    pkcs11.KeySizeRange,
    pkcs11.DomainParamsInvalid,
    pkcs11.TemplateInconsistent,
    pkcs11.TemplateIncomplete,
    pkcs11.AttributeTypeInvalid,
    pkcs11.AttributeValueInvalid,
    pkcs11.FunctionNotSupported,
    pkcs11.TokenWriteProtected,
)


def _reason(exc: pkcs11.PKCS11Error) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def translated(exc: pkcs11.PKCS11Error, where: str, doing: str) -> FleetprovError:
    """Our error for python-pkcs11's ``exc``, raised while ``doing`` something in ``where`` (a token)."""
    if isinstance(exc, _UNSUPPORTED):
        return ConfigError(f"{where} cannot {doing}: {_reason(exc)}", step=STEP)
    return TokenError(f"{where} failed to {doing}: {_reason(exc)}")


@contextlib.contextmanager
def token_errors(where: str, doing: str) -> Iterator[None]:
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        raise translated(exc, where, doing) from exc


def _token_name(token: pkcs11.Token) -> str:
    return f"token {token.label!r}"


# -- the token -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_token(settings: Pkcs11Settings, pin: str) -> Iterator[pkcs11.Session]:
    """A read-write session, logged in as the user, on the configured token.

    The module is finalized on the way out, so the next open_token starts afresh (and re-reads the module's
    configuration, e.g. $SOFTHSM2_CONF); one open_token at a time per module and process.
    """
    library = _load_library(settings.library)
    try:
        token = _find_token(library, settings)
        with _logged_in(token, pin, settings.pin_source()) as session:
            yield session
    finally:
        with contextlib.suppress(pkcs11.PKCS11Error):
            library.finalize()


def _load_library(path: Path) -> Library:
    if not path.is_file():
        raise ConfigError(f"PKCS#11 library {path} does not exist or is not a file", step=STEP)
    try:
        return pkcs11.lib(str(path))
    except pkcs11.PKCS11Error as exc:  # dlopen failed, no C_GetFunctionList, or C_Initialize failed
        raise ConfigError(f"{path} is not a usable PKCS#11 library: {_reason(exc)}", step=STEP) from None


def _find_token(library: Library, settings: Pkcs11Settings) -> pkcs11.Token:
    where = f"PKCS#11 library {settings.library}"
    with token_errors(where, "list its tokens"):
        if settings.slot is not None:
            return _token_in_slot(library, settings.slot, where)
        tokens = [token for token in library.get_tokens() if token.flags & TokenFlag.TOKEN_INITIALIZED]
    matching = [token for token in tokens if token.label == settings.token_label]
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise ConfigError(
            f"{len(matching)} tokens of {where} are labelled {settings.token_label!r}: "
            "relabel all but one, or choose the token by slot",
            step=STEP,
        )
    labels = ", ".join(sorted(repr(token.label) for token in tokens)) or "none"
    raise ConfigError(f"{where} has no token labelled {settings.token_label!r} (tokens: {labels})", step=STEP)


def _token_in_slot(library: Library, slot_id: int, where: str) -> pkcs11.Token:
    slots = library.get_slots()
    for slot in slots:
        if slot.slot_id == slot_id:
            try:
                token = slot.get_token()
            except (pkcs11.TokenNotPresent, pkcs11.TokenNotRecognised):
                raise ConfigError(f"slot {slot_id} of {where} holds no usable token", step=STEP) from None
            if not token.flags & TokenFlag.TOKEN_INITIALIZED:
                raise ConfigError(f"the token in slot {slot_id} of {where} is not initialised", step=STEP)
            return token
    known = ", ".join(str(slot.slot_id) for slot in slots) or "none"
    raise ConfigError(f"{where} has no slot {slot_id} (slots: {known})", step=STEP)


@contextlib.contextmanager
def _logged_in(token: pkcs11.Token, pin: str, pin_source: str) -> Iterator[pkcs11.Session]:
    # A PIN problem is exit 78, configuration: the PIN source on this device disagrees with the token, and the
    # operator fixes it; errors.py keeps 77 (Refused) for a service, hook or policy saying no. Both are in
    # RestartPreventExitStatus, and that matters: every retry with a wrong PIN brings the token nearer to
    # locking it. No message carries the PIN; python-pkcs11's PIN exceptions carry nothing at all.
    name = _token_name(token)
    if token.flags & TokenFlag.USER_PIN_LOCKED:
        raise ConfigError(_locked(name), step=STEP)
    try:
        session = token.open(rw=True, user_pin=pin)
    except pkcs11.PKCS11Error as exc:
        raise _login_error(exc, name, pin_source) from None
    with session:
        yield session


def _login_error(exc: pkcs11.PKCS11Error, name: str, pin_source: str) -> FleetprovError:
    if isinstance(exc, (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange)):
        return ConfigError(
            f"the PIN was refused by {name}: check the PIN in {pin_source} "
            "(each wrong PIN brings the token nearer to locking it)",
            step=STEP,
        )
    if isinstance(exc, pkcs11.PinLocked):
        return ConfigError(_locked(name), step=STEP)
    if isinstance(exc, pkcs11.PinExpired):
        return ConfigError(f"the PIN of {name} has expired: set a new one", step=STEP)
    if isinstance(exc, pkcs11.UserPinNotInitialized):
        return ConfigError(f"{name} has no user PIN yet: initialise it", step=STEP)
    return translated(exc, name, "open a session")


def _locked(name: str) -> str:
    return f"the user PIN of {name} is locked after too many wrong PINs: its security officer must unlock it"


# -- keys ------------------------------------------------------------------------------------------------


_PRIVATE_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}


def _public_template(spec: KeySpec) -> dict[Attribute, object]:
    template: dict[Attribute, object] = {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True}
    if spec.curve is not None:
        template[Attribute.EC_PARAMS] = encode_named_curve_parameters(spec.curve)
    return template


def generate_key(session: pkcs11.Session, key_type: str, label: Optional[str], key_id: Optional[bytes]) -> Pkcs11Key:
    """A new key pair in the token: the private key SENSITIVE, not EXTRACTABLE, for signing only.

    ConfigError if the token cannot make or use keys of ``key_type``, or already holds a key with this label
    or id (a twin would make the key ambiguous: delete_key it first).
    """
    if key_type not in KEY_SPECS:
        raise ValueError(f"unknown key type {key_type!r}")
    if not label and not key_id:
        raise ValueError("a key needs a label, an id or both")
    spec = KEY_SPECS[key_type]
    name = _token_name(session.token)
    with token_errors(name, f"make a {key_type} key"):
        _require_mechanisms(session, key_type)
        for wanted in ({Attribute.LABEL: label}, {Attribute.ID: key_id}):
            if all(wanted.values()) and _objects(session, ObjectClass.PRIVATE_KEY, wanted):
                raise ConfigError(
                    f"{name} already holds a private key with {_described(wanted)}: delete it or choose another",
                    step=STEP,
                )
        public, private = session.generate_keypair(
            spec.key_type,
            spec.bits,
            label=label,
            id=key_id,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template=_public_template(spec),
            private_template=_PRIVATE_TEMPLATE,
        )
    return Pkcs11Key(private, public)


def _require_mechanisms(session: pkcs11.Session, key_type: str) -> None:
    available = session.token.slot.get_mechanisms()
    spec = KEY_SPECS[key_type]
    missing = [] if spec.generate in available else [spec.generate.name]
    if signing_mechanism(spec.key_type, available) is None:
        missing.append(" or ".join(mechanism.name for mechanism in spec.sign))
    if missing:
        supported = ", ".join(supported_key_types(available)) or "none"
        raise ConfigError(
            f"{_token_name(session.token)} does not offer {' and '.join(missing)}, which {key_type} keys need; "
            f"key types it supports: {supported}",
            step=STEP,
        )


def find_key(session: pkcs11.Session, label: Optional[str], key_id: Optional[bytes]) -> Pkcs11Key:
    """The one private key with this label and/or id, and its public key; KeyMissing if there is none."""
    wanted = _key_attributes(label, key_id)
    name = _token_name(session.token)
    what = _described(wanted)
    with token_errors(name, "search for keys"):
        private = _objects(session, ObjectClass.PRIVATE_KEY, wanted)
        if len(private) > 1:
            raise ConfigError(
                f"{name} holds {len(private)} private keys with {what}: the key is ambiguous; "
                "give it a unique label or id (or delete the extra keys)",
                step=STEP,
            )
        if not private:
            raise KeyMissing(f"{name} holds no private key with {what}")
        key = private[0]
        identity = {Attribute.LABEL: key[Attribute.LABEL], Attribute.ID: key[Attribute.ID]}
        public = _objects(session, ObjectClass.PUBLIC_KEY, identity)
    if len(public) != 1:
        raise KeyMissing(f"{name} holds {len(public)} public keys for the private key with {what}, not 1")
    # get_objects types what it finds as Object; the CLASS searched for makes them these.
    return Pkcs11Key(cast(pkcs11.PrivateKey, key), cast(pkcs11.PublicKey, public[0]))


def delete_key(session: pkcs11.Session, label: Optional[str], key_id: Optional[bytes]) -> int:
    """Destroy the private and public keys and certificates with this label and/or id; how many there were.

    Idempotent: deleting what is not there is not an error.
    """
    wanted = _key_attributes(label, key_id)
    with token_errors(_token_name(session.token), "delete keys"):
        doomed = [
            item
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.CERTIFICATE)
            for item in _objects(session, object_class, wanted)
        ]
        for item in doomed:
            item.destroy()
    return len(doomed)


def store_certificate(
    session: pkcs11.Session, label: Optional[str], key_id: Optional[bytes], certificate_der: bytes
) -> None:
    """Put the key's X.509 certificate into the token next to it (replacing one stored before)."""
    wanted = _key_attributes(label, key_id)
    certificate = asn1_x509.Certificate.load(certificate_der)
    with token_errors(_token_name(session.token), "store a certificate"):
        for old in _objects(session, ObjectClass.CERTIFICATE, wanted):
            old.destroy()
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: label or "",
                Attribute.ID: key_id or b"",
                Attribute.SUBJECT: certificate.subject.dump(),
                Attribute.ISSUER: certificate.issuer.dump(),
                Attribute.SERIAL_NUMBER: certificate["tbs_certificate"]["serial_number"].dump(),
                Attribute.VALUE: certificate_der,
            }
        )


def _key_attributes(label: Optional[str], key_id: Optional[bytes]) -> dict[Attribute, object]:
    wanted: dict[Attribute, object] = {}
    if label:
        wanted[Attribute.LABEL] = label
    if key_id:
        wanted[Attribute.ID] = key_id
    if not wanted:
        raise ValueError("name a key by its label, its id or both")
    return wanted


def _described(attributes: Mapping[Attribute, object]) -> str:
    """``label 'device-key' and id 0102``: how messages name a key."""
    return " and ".join(
        f"id {value.hex()}" if isinstance(value, bytes) else f"label {value!r}" for value in attributes.values()
    )


def _objects(
    session: pkcs11.Session, object_class: ObjectClass, attributes: Mapping[Attribute, object]
) -> list[pkcs11.Object]:
    return list(session.get_objects({Attribute.CLASS: object_class, **attributes}))


# -- public key and CSR ----------------------------------------------------------------------------------


def public_key_der(public_key: pkcs11.PublicKey) -> bytes:
    """SubjectPublicKeyInfo, DER, of a public key in the token."""
    with token_errors(_token_name(public_key.session.token), "read a public key"):
        if public_key.key_type == KeyType.EC:
            # EC_POINT is the DER encoding of the point, an OCTET STRING (PKCS#11 2.40, as SoftHSM2 does it).
            return encode_ec_public_key(public_key)
        if public_key.key_type == KeyType.RSA:
            pkcs1 = asn1_keys.RSAPublicKey.load(encode_rsa_public_key(public_key))
            info = asn1_keys.PublicKeyInfo({"algorithm": {"algorithm": "rsa"}, "public_key": pkcs1})
            return bytes(info.dump())
    raise ConfigError(f"key type {public_key.key_type!r} is neither EC nor RSA", step=STEP)


def csr_pem(private_key: pkcs11.PrivateKey, public_key_der: bytes, subject: Union[str, asn1_x509.Name]) -> str:
    """A PKCS#10 request for ``public_key_der``, signed (SHA-256) in the token.

    ``subject`` is a common name (subject CN=subject) or a whole X.509 name; a name loaded from DER (e.g.
    ``asn1_x509.Name.load(cryptography_name.public_bytes())``) goes into the request exactly as encoded, string
    types included.
    """
    if isinstance(subject, str):
        if not 1 <= len(subject) <= 64:  # ub-common-name, as cryptography enforces for FileKey
            raise ValueError("a common name has 1 to 64 characters")
        name = asn1_x509.Name.build({"common_name": subject})
    else:
        name = subject
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": name,
            "subject_pk_info": asn1_keys.PublicKeyInfo.load(public_key_der),
            "attributes": [],
        }
    )
    algorithm, signature = _sign(private_key, info.dump())
    request = asn1_csr.CertificationRequest(
        {"certification_request_info": info, "signature_algorithm": {"algorithm": algorithm}, "signature": signature}
    )
    return str(asn1_pem.armor("CERTIFICATE REQUEST", request.dump()).decode())


def _sign(private_key: pkcs11.PrivateKey, data: bytes) -> tuple[str, bytes]:
    """(asn1crypto's name of the signature algorithm, the signature as X.509 wants it)."""
    token = private_key.session.token
    with token_errors(_token_name(token), "sign"):
        mechanism = signing_mechanism(private_key.key_type, token.slot.get_mechanisms())
        if mechanism is None:
            raise ConfigError(f"{_token_name(token)} offers no SHA-256 signature for this key", step=STEP)
        if not isinstance(private_key, pkcs11.SignMixin):
            raise ConfigError(
                f"{_token_name(token)} does not let this key sign (its SIGN attribute is false)", step=STEP
            )
        if mechanism == Mechanism.SHA256_RSA_PKCS:
            return "sha256_rsa", private_key.sign(data, mechanism=mechanism)
        # CKM_ECDSA signs a digest it is given; both return r || s, X.509 wants ECDSA-Sig-Value (DER).
        message = hashlib.sha256(data).digest() if mechanism == Mechanism.ECDSA else data
        raw = private_key.sign(message, mechanism=mechanism)
    return "sha256_ecdsa", bytes(DSASignature.from_p1363(raw).dump())


class Pkcs11Key:
    """A key pair in a token (DeviceKey); usable while the session it was found or made in is open."""

    def __init__(self, private_key: pkcs11.PrivateKey, public_key: pkcs11.PublicKey) -> None:
        self._private_key = private_key
        token = private_key.session.token
        with token_errors(_token_name(token), "read a key's label and id"):
            label, key_id = private_key[Attribute.LABEL], private_key[Attribute.ID]
        self._reference = pkcs11_uri(token.label, label or None, key_id or None)
        self._public_key_der = public_key_der(public_key)

    def __repr__(self) -> str:  # the URI names the key; it never holds a PIN
        return f"Pkcs11Key({self._reference})"

    @property
    def key_reference(self) -> str:
        return self._reference

    def csr_pem(self, subject: Union[str, asn1_x509.Name]) -> str:
        """A CSR signed in the token, for a common name (DeviceKey) or a whole subject name (csr_pem)."""
        return csr_pem(self._private_key, self._public_key_der, subject)

    def public_key_der(self) -> bytes:
        return self._public_key_der
