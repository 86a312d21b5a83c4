"""Where the device's private key lives: a file (default) or, later, a PKCS#11 token.

A backend makes a new key inside a staging directory and answers the two questions the provisioning flow
asks of it: a CSR for the key, and the public key to compare an issued certificate with.
"""

from __future__ import annotations

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


def prepared(key: DeviceKey, common_name: str) -> PreparedKey:
    return PreparedKey(key.key_reference, key.public_key_der(), key.csr_pem(common_name))
