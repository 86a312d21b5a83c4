"""Keys in files: generated on the device with cryptography, written 0600 from their first byte."""

from __future__ import annotations

from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fleetprov.store import KEY_FILE_REFERENCE, CorruptState, Staging

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


def generate_private_key(key_type: str) -> PrivateKey:
    """A new key of one of fleetprov.config.KEY_TYPES."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}")


def public_key_der(public_key: Union[ec.EllipticCurvePublicKey, rsa.RSAPublicKey]) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class FileKey:
    def __init__(self, private_key: PrivateKey) -> None:
        self._private_key = private_key

    def __repr__(self) -> str:  # never show key material, even in a debugger or a traceback
        return f"FileKey({type(self._private_key).__name__})"

    @property
    def key_reference(self) -> str:
        return KEY_FILE_REFERENCE

    def csr_pem(self, common_name: str) -> str:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .sign(self._private_key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def public_key_der(self) -> bytes:
        return public_key_der(self._private_key.public_key())


class FileKeyBackend:
    def load_key(self, staging: Staging) -> FileKey:
        """The key an interrupted run made in ``staging``."""
        try:
            key = serialization.load_pem_private_key(staging.private_key.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise CorruptState(f"{staging.private_key} is not a readable private key", step="key") from exc
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise CorruptState(f"{staging.private_key} is neither an EC nor an RSA key", step="key")
        return FileKey(key)

    def create_key(self, key_type: str, staging: Staging) -> FileKey:
        key = generate_private_key(key_type)
        staging.write_private_key(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return FileKey(key)
