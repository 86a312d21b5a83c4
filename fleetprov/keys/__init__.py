"""Where the device's private key lives: a file (default) or, later, a PKCS#11 token.

A backend makes a new key inside a staging directory and answers the two questions the provisioning flow
asks of it: a CSR for the key, and the public key to compare an issued certificate with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from fleetprov.store import Staging


class DeviceKey(Protocol):
    """A private key the device holds; never exposes the private part."""

    @property
    def key_reference(self) -> str:
        """What the manifest records: ``file:private.key`` or a ``pkcs11:`` URI."""
        ...

    def csr_pem(self, common_name: str) -> str: ...

    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo, DER: compared with the issued certificate's key."""
        ...


class KeyBackend(Protocol):
    def create_key(self, key_type: str, staging: Staging) -> DeviceKey: ...


@dataclass(frozen=True)
class PreparedKey:
    """The device key as the network steps need it, made before the claim connection opens (a token's module
    is then no longer needed by anything but awscrt): how the manifest names it, its public key and a CSR."""

    key_reference: str
    public_key_der: bytes
    csr_pem: str


# X.509's ub-common-name is 64 characters (RFC 5280, appendix A.1); cryptography counts UTF-8 bytes, the
# stricter measure, and refuses more. A thing name may have 128 characters, a claim client id 128 bytes.
MAX_COMMON_NAME_BYTES = 64
_KEPT_PREFIX_BYTES = 47  # a name too long for a common name keeps this much, then "-" and 16 hex digits
_DIGEST_HEX_DIGITS = 16


def csr_common_name(name: str) -> str:
    """The common name of a CSR for ``name`` (the thing name at a rotation, the claim client id at the first
    provisioning), for both key backends: ``name`` itself when it fits the 64 bytes X.509 allows, else its
    first 47 bytes, "-" and the first 16 hex digits of its SHA-256 (distinct names keep distinct common names).

    Nothing relies on the common name: AWS IoT issues certificates under a default subject, "CN=AWS IoT
    Certificate" (CreateKeysAndCertificate's API reference, on certificateId: "AWS IoT issues a default
    subject name for the certificate (for example, AWS IoT Certificate)"; AWS's answer in
    aws/aws-iot-device-sdk-cpp#111: that subject is common to all certificates AWS IoT generates;
    CreateCertificateFromCsr's reference does not say otherwise), and fleetprov's emulator does the same
    (emulator/ca.py). It only has to be valid for every name, and say whose key it is to whoever reads the CSR."""
    encoded = name.encode()
    if 1 <= len(encoded) <= MAX_COMMON_NAME_BYTES:
        return name
    kept = encoded[:_KEPT_PREFIX_BYTES].decode(errors="ignore")  # never half a character
    return f"{kept}-{hashlib.sha256(encoded).hexdigest()[:_DIGEST_HEX_DIGITS]}"


def prepared(key: DeviceKey, name: str) -> PreparedKey:
    """``key`` with a CSR whose common name is made from ``name`` by csr_common_name."""
    return PreparedKey(key.key_reference, key.public_key_der(), key.csr_pem(csr_common_name(name)))
