"""Factory helpers: the openssl steps of a JITP/JITR factory line, without openssl.

keygen  a device private key, PEM, 0600 from its first byte (as ``openssl genrsa`` / ``ecparam -genkey``),
        or a key pair made inside a PKCS#11 token (SENSITIVE, not EXTRACTABLE; as ``pkcs11-tool --keypairgen``)
csr     a CSR with the subject fields JITP templates read (as ``openssl req -new``), signed by a key file or by
        a key in a PKCS#11 token, which signs it without the key ever leaving the token
sign    a device certificate signed by a lab CA (as ``openssl x509 -req -CA ... -CAkey ...``)

A token key is named by an RFC 7512 URI, ``pkcs11:token=LABEL;object=KEYLABEL;type=private`` (``id=%01`` may be
added), with the module (``--pkcs11-library``) and the PIN's source (``--pin-file``, mode 0600, or
``--pin-env``) given beside it: never the PIN itself, which no message shows. The token's CSR carries the same
subject, byte for byte, as a key file's (fleetprov.keys.pkcs11.csr_pem signs the DER of subject_name()).

Exit codes: 64 bad arguments (including a token key named without its object label, module or PIN source),
65 a CSR that is unreadable or whose signature does not verify, 73 an output file that exists already or cannot
be written, or a token key whose label is taken already, 78 an unusable key, CA key or CA certificate, or a
token problem (module, token label, PIN, no such key, a key type the token cannot make). Nothing is written on
any error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pkcs11
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkcs11 import Attribute, ObjectClass

from fleetprov.atomicio import write_new
from fleetprov.errors import EX_DATAERR, ConfigError, FleetprovError, StorageError, UsageError, printable
from fleetprov.keys.file import PrivateKey, generate_private_key
from fleetprov.keys.pkcs11 import find_key, generate_key, open_token, token_errors
from fleetprov.keys.pkcs11_settings import Pkcs11Settings, checked_pin, read_pin_file
from fleetprov.keys.pkcs11_uri import URI_SCHEME, parse_pkcs11_uri, pkcs11_uri

STEP = "factory"
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
DEFAULT_DAYS = 365
MAX_DAYS = 36500

# PrintableString (X.680): what cryptography encodes Country, SerialNumber and DN qualifier as.
_PRINTABLE_STRING = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+")


class BadInput(FleetprovError):
    """A CSR that cannot be read or whose signature does not verify."""

    exit_code = EX_DATAERR


@dataclass(frozen=True)
class Subject:
    """The subject fields AWS IoT JITP templates read (AWS::IoT::Certificate::<field>)."""

    common_name: str
    country: Optional[str] = None
    organization: Optional[str] = None
    organizational_unit: Optional[str] = None
    state: Optional[str] = None
    serial_number: Optional[str] = None
    dn_qualifier: Optional[str] = None


# (field, OID, option, PrintableString only)
_FIELDS = (
    ("country", NameOID.COUNTRY_NAME, "--country", True),
    ("state", NameOID.STATE_OR_PROVINCE_NAME, "--state", False),
    ("organization", NameOID.ORGANIZATION_NAME, "--organization", False),
    ("organizational_unit", NameOID.ORGANIZATIONAL_UNIT_NAME, "--organizational-unit", False),
    ("common_name", NameOID.COMMON_NAME, "--cn", False),
    ("serial_number", NameOID.SERIAL_NUMBER, "--serial-number", True),
    ("dn_qualifier", NameOID.DN_QUALIFIER, "--dn-qualifier", True),
)


def subject_name(subject: Subject) -> x509.Name:
    """The X.509 name of ``subject``; UsageError (exit 64) names the option of a bad value."""
    attributes = []
    for field, oid, option, printable_only in _FIELDS:
        value = getattr(subject, field)
        if value is None:
            continue
        if not value.strip():
            raise UsageError(f"{option} must not be empty", step=STEP)
        if not value.isprintable():
            raise UsageError(f"{option} {printable(value)!r} contains control characters", step=STEP)
        if field == "country" and not re.fullmatch(r"[A-Za-z]{2}", value):
            raise UsageError(f"--country must be exactly 2 letters (ISO 3166), not {printable(value)!r}", step=STEP)
        if printable_only and not _PRINTABLE_STRING.fullmatch(value):
            raise UsageError(
                f"{option} {printable(value)!r} may hold only letters, digits, spaces and '()+,-./:=?", step=STEP
            )
        if len(value) > 64:
            raise UsageError(f"{option} is longer than 64 characters", step=STEP)
        try:
            attributes.append(x509.NameAttribute(oid, value))
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}", step=STEP) from None
    return x509.Name(attributes)


def subject_of(name: x509.Name) -> Subject:
    """The JITP fields of ``name`` (the first value of each)."""
    values: dict[str, Optional[str]] = {}
    for field, oid, _option, _printable in _FIELDS:
        found = name.get_attributes_for_oid(oid)
        values[field] = str(found[0].value) if found else None
    common_name = values.pop("common_name") or ""
    return Subject(common_name, **values)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        write_new(path, data, mode=mode)
    except StorageError as exc:
        if isinstance(exc.__cause__, FileExistsError):
            raise StorageError(f"{path} exists already; not overwriting it", step=STEP) from None
        raise


def _read(path: Path, what: str, error: type[FleetprovError]) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}", step=STEP) from None


def load_private_key(path: Path, what: str = "key") -> PrivateKey:
    """An unencrypted EC or RSA private key, PEM or DER; ConfigError (exit 78) if unusable."""
    data = _read(path, what, ConfigError)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{what} {path} is encrypted; use an unencrypted key", step=STEP) from None
    except ValueError:
        raise ConfigError(f"{what} {path} is not a readable private key", step=STEP) from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{what} {path} is neither an EC nor an RSA key", step=STEP)
    return key


def keygen(out: Path, key_type: str) -> None:
    """Write a new private key (PKCS#8 PEM) to ``out``, which must not exist, mode 0600 from its first byte."""
    if key_type not in KEY_TYPES:
        raise UsageError(f"--key-type must be one of {', '.join(KEY_TYPES)}, not {printable(key_type)!r}", step=STEP)
    key = generate_private_key(key_type)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_new(out, pem, 0o600)


def make_csr(key: PrivateKey, subject: Subject) -> x509.CertificateSigningRequest:
    return x509.CertificateSigningRequestBuilder().subject_name(subject_name(subject)).sign(key, hashes.SHA256())


def csr(key_path: Path, out: Path, subject: Subject) -> x509.CertificateSigningRequest:
    """Write a PEM CSR for the key in ``key_path`` to ``out`` (must not exist, mode 0644)."""
    subject_name(subject)  # bad arguments first, before touching any file
    request = make_csr(load_private_key(key_path), subject)
    _write_new(out, request.public_bytes(serialization.Encoding.PEM), 0o644)
    return request


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    """A CSR whose signature verifies; BadInput (exit 65) otherwise."""
    data = _read(path, "CSR", BadInput)
    try:
        request = x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
        valid = request.is_signature_valid
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise BadInput(f"{path} is not a readable CSR: {printable(str(exc))}", step=STEP) from None
    if not valid:
        raise BadInput(f"the signature of CSR {path} does not verify", step=STEP)
    if not isinstance(request.public_key(), (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise BadInput(f"CSR {path} is for neither an EC nor an RSA key", step=STEP)
    return request


def _spki(key: object) -> bytes:
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKey]:
    """A CA certificate and its key; ConfigError (exit 78) if either is unusable or they do not belong together."""
    data = _read(cert_path, "CA certificate", ConfigError)
    try:
        certificate = (
            x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        )
    except ValueError:
        raise ConfigError(f"{cert_path} is not a readable certificate", step=STEP) from None
    key = load_private_key(key_path, "CA key")
    if not isinstance(certificate.public_key(), (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise ConfigError(f"CA certificate {cert_path} is for neither an EC nor an RSA key", step=STEP)
    if _spki(certificate.public_key()) != _spki(key.public_key()):
        raise ConfigError(f"CA key {key_path} does not match CA certificate {cert_path}", step=STEP)
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{cert_path} is not a CA certificate (no basicConstraints CA:TRUE)", step=STEP)
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise ConfigError(f"CA certificate {cert_path} may not sign certificates (no keyCertSign)", step=STEP)
    return certificate, key


def parse_days(days: str) -> int:
    try:
        value = int(days)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_DAYS:
        raise UsageError(f"--days must be a whole number from 1 to {MAX_DAYS}, not {printable(days)!r}", step=STEP)
    return value


def issue(
    request: x509.CertificateSigningRequest,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    days: int,
    now: Optional[datetime.datetime] = None,
) -> x509.Certificate:
    """A device (TLS client) certificate for ``request``, signed by the CA with SHA-256."""
    public_key = request.public_key()
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise BadInput("the CSR is for neither an EC nor an RSA key", step=STEP)
    start = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        ca_ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(request.subject)
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def sign(csr_path: Path, ca_cert: Path, ca_key: Path, out: Path, days: str) -> x509.Certificate:
    """Write a device certificate for the CSR in ``csr_path`` to ``out`` (must not exist, mode 0644)."""
    valid_days = parse_days(days)
    request = load_csr(csr_path)
    ca_certificate, key = load_ca(ca_cert, ca_key)
    certificate = issue(request, ca_certificate, key, valid_days)
    _write_new(out, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return certificate


# -- keys in a PKCS#11 token ------------------------------------------------------------------------------

TOKEN_OPTIONS = ("--pkcs11-library", "--pin-file", "--pin-env")


@dataclass(frozen=True)
class TokenKey:
    """A key in a PKCS#11 token as `fleetprov factory` names it: its URI, the module and the PIN's source."""

    uri: str  # canonical RFC 7512 form; never holds a PIN
    settings: Pkcs11Settings

    def pin_option(self) -> str:
        """Where the PIN comes from, as messages name it: ``--pin-file /run/pin``; never the PIN."""
        if self.settings.pin_file is not None:
            return f"--pin-file {self.settings.pin_file}"
        return f"--pin-env {self.settings.pin_env}"


def is_token_key(key: str) -> bool:
    """Whether ``--key`` names a key in a PKCS#11 token (a ``pkcs11:`` URI) rather than a key file."""
    return key.startswith(URI_SCHEME)


def token_key(uri: str, library: Optional[Path], pin_file: Optional[Path], pin_env: Optional[str]) -> TokenKey:
    """The token key ``uri`` names; UsageError (exit 64) if it and the options do not name exactly one.

    Messages never repeat the URI: a mistyped one might carry a PIN (``?pin-value=``), which is refused.
    """
    try:
        parsed = parse_pkcs11_uri(uri)
    except ValueError as exc:
        raise UsageError(f"--key is not a usable PKCS#11 URI: {exc}", step=STEP) from None
    if parsed.object_type != "private":
        raise UsageError(f"--key must name a private key (type=private), not type={parsed.object_type}", step=STEP)
    if not parsed.token_label:
        raise UsageError("--key names no token: the PKCS#11 URI needs token=<token label>", step=STEP)
    if not parsed.key_label:
        raise UsageError("--key names no key: the PKCS#11 URI needs object=<key label>", step=STEP)
    if library is None:
        raise UsageError(
            "a pkcs11: --key needs --pkcs11-library (the token's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so)",
            step=STEP,
        )
    if (pin_file is None) == (pin_env is None):
        raise UsageError(
            "a pkcs11: --key needs exactly one of --pin-file FILE (mode 0600) and --pin-env VAR "
            "(the PIN itself is never taken from the command line)",
            step=STEP,
        )
    if pin_env is not None and (not pin_env or "=" in pin_env or "\0" in pin_env):
        raise UsageError("--pin-env must name an environment variable", step=STEP)
    try:
        settings = Pkcs11Settings(
            library=library,
            token_label=parsed.token_label,
            key_label=parsed.key_label,
            key_id=parsed.key_id or None,
            pin_file=pin_file,
            pin_env=pin_env,
        )
    except ValueError as exc:
        raise UsageError(f"--key: {exc}", step=STEP) from None
    return TokenKey(pkcs11_uri(parsed.token_label, parsed.key_label, settings.key_id), settings)


def no_token_options(library: Optional[Path], pin_file: Optional[Path], pin_env: Optional[str]) -> None:
    """UsageError if token options come with a key file, where they would be silently ignored."""
    given = [option for option, value in zip(TOKEN_OPTIONS, (library, pin_file, pin_env)) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} only go with a key in a token (--key pkcs11:...)", step=STEP)


def _token_pin(key: TokenKey, environ: Mapping[str, str]) -> str:
    settings = key.settings
    if settings.pin_file is not None:
        return read_pin_file(settings.pin_file, key.pin_option(), private=True)
    name = settings.pin_env or ""
    if name not in environ:
        raise ConfigError(f"--pin-env: environment variable {name} is not set", step=STEP)
    return checked_pin(environ[name], f"--pin-env: environment variable {name}")


@contextlib.contextmanager
def _token_session(key: TokenKey, environ: Mapping[str, str]) -> Iterator[pkcs11.Session]:
    """A logged-in session on the key's token; every error in it reported as a factory error (exit 73 or 78)."""
    try:
        pin = _token_pin(key, environ)
        with open_token(key.settings, pin) as session:
            yield session
    except FleetprovError as exc:
        # fleetprov.keys.pkcs11 names the PIN's source as the config file does (pin_file ...): name the option.
        exc.message = exc.message.replace(key.settings.pin_source(), key.pin_option())
        exc.step = STEP
        raise


def _refuse_existing(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise StorageError(f"{out} exists already; not overwriting it", step=STEP)


def token_csr(
    key: TokenKey, out: Path, subject: Subject, environ: Mapping[str, str] = os.environ
) -> x509.CertificateSigningRequest:
    """Write to ``out`` (must not exist, mode 0644) a PEM CSR signed in the token by ``key``.

    The subject is the DER of subject_name(subject), so the CSR names the device exactly as csr() does.
    """
    name = subject_name(subject)  # bad arguments first, before the PIN or the token
    _refuse_existing(out)
    with _token_session(key, environ) as session:
        found = find_key(session, key.settings.key_label, key.settings.key_id)
        pem = found.csr_pem(asn1_x509.Name.load(name.public_bytes()))
    request = x509.load_pem_x509_csr(pem.encode())
    if not request.is_signature_valid:
        raise ConfigError(f"the token's signature of the CSR for {key.uri} does not verify", step=STEP)
    _write_new(out, request.public_bytes(serialization.Encoding.PEM), 0o644)
    return request


def _refuse_taken(session: pkcs11.Session, key: TokenKey) -> None:
    wanted = {"label": (Attribute.LABEL, key.settings.key_label), "id": (Attribute.ID, key.settings.key_id)}
    token = repr(key.settings.token_label)
    with token_errors(f"token {token}", "search for keys"):
        for what, (attribute, value) in wanted.items():
            if value is None:
                continue
            for object_class, kind in ((ObjectClass.PRIVATE_KEY, "private"), (ObjectClass.PUBLIC_KEY, "public")):
                if list(session.get_objects({Attribute.CLASS: object_class, attribute: value})):
                    shown = value.hex() if isinstance(value, bytes) else repr(value)
                    raise StorageError(
                        f"token {token} already holds a {kind} key with {what} {shown}; not overwriting it "
                        "(choose another object= label, or delete that key first)",
                        step=STEP,
                    )


def token_keygen(key: TokenKey, key_type: str, environ: Mapping[str, str] = os.environ) -> str:
    """Make a ``key_type`` key pair in the token (private key SENSITIVE, not EXTRACTABLE); its URI.

    StorageError (exit 73) if the token holds a key with that label (or id) already: keys are never replaced.
    """
    if key_type not in KEY_TYPES:
        raise UsageError(f"--key-type must be one of {', '.join(KEY_TYPES)}, not {printable(key_type)!r}", step=STEP)
    with _token_session(key, environ) as session:
        _refuse_taken(session, key)
        made = generate_key(session, key_type, key.settings.key_label, key.settings.key_id)
        return made.key_reference


_SHORT_NAMES = {NameOID.SERIAL_NUMBER: "serialNumber", NameOID.DN_QUALIFIER: "dnQualifier"}


def subject_text(name: x509.Name) -> str:
    """``name`` in certificate order, as ``openssl x509 -subject`` shows it: C=US, O=Acme, CN=thing-1."""
    return ", ".join(attribute.rfc4514_string(_SHORT_NAMES) for attribute in name)


def describe(certificate: x509.Certificate) -> Sequence[str]:
    """The lines `fleetprov factory sign` prints."""
    return (
        f"subject: {subject_text(certificate.subject)}",
        f"not after: {certificate.not_valid_after_utc.isoformat()}",
    )
