"""RFC 7512 ``pkcs11:`` URIs: how the manifest, the journal and the config name a key in a token.

Only the path attributes fleetprov writes are accepted (token, object, id, type); a query (``pin-value``,
``pin-source``, ``module-path``) is refused, so a URI can never carry a PIN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote, unquote_to_bytes

URI_SCHEME = "pkcs11:"
_OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
# pk11-pchar without pct-encoded: pk11-unreserved and pk11-path-res-avail, kept as they are.
_PATH_SAFE = ":[]@!$'()*+,=&-._~"
_PATH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" + _PATH_SAFE)


@dataclass(frozen=True)
class Pkcs11Uri:
    """The path attributes fleetprov writes and reads: token, object, id and type."""

    token_label: str
    key_label: Optional[str] = None
    key_id: Optional[bytes] = None
    object_type: str = "private"

    def __str__(self) -> str:
        parts = [f"token={quote(self.token_label, safe=_PATH_SAFE)}"]
        if self.key_label is not None:
            parts.append(f"object={quote(self.key_label, safe=_PATH_SAFE)}")
        if self.key_id is not None:
            parts.append("id=" + "".join(f"%{byte:02X}" for byte in self.key_id))
        parts.append(f"type={self.object_type}")
        return URI_SCHEME + ";".join(parts)


def pkcs11_uri(token_label: str, key_label: Optional[str], key_id: Optional[bytes]) -> str:
    """``pkcs11:token=...;object=...;id=%01%02;type=private`` (RFC 7512): the key_reference of a token key."""
    return str(Pkcs11Uri(token_label, key_label, key_id))


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """The inverse of pkcs11_uri; ValueError for anything else, including any query (pin-value, pin-source)."""
    if not uri.startswith(URI_SCHEME):
        raise ValueError(f"a PKCS#11 URI starts with {URI_SCHEME!r}")
    path = uri[len(URI_SCHEME) :]
    if "?" in path:
        raise ValueError("PKCS#11 URI query attributes (pin-value, pin-source, module-path ...) are not accepted")
    values: dict[str, bytes] = {}
    for part in path.split(";"):
        name, equals, value = part.partition("=")
        if name not in ("token", "object", "id", "type") or not equals:
            raise ValueError(f"unsupported PKCS#11 URI attribute {name[:20]!r}")
        if name in values:
            raise ValueError(f"PKCS#11 URI attribute {name} appears twice")
        values[name] = _pct_decoded(value)
    if "token" not in values:
        raise ValueError("the PKCS#11 URI names no token")
    object_type = values.get("type", b"private").decode("ascii", errors="replace")
    if object_type not in _OBJECT_TYPES:
        raise ValueError(f"unknown PKCS#11 object type {object_type[:20]!r}")
    return Pkcs11Uri(
        token_label=_utf8(values["token"], "token"),
        key_label=_utf8(values["object"], "object") if "object" in values else None,
        key_id=values.get("id"),
        object_type=object_type,
    )


def _pct_decoded(value: str) -> bytes:
    chars = iter(value)
    for char in chars:
        if char == "%":
            pair = next(chars, "") + next(chars, "")
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                raise ValueError("a % in a PKCS#11 URI is not followed by two hex digits")
        elif char not in _PATH_CHARS:
            raise ValueError(f"character {char!r} must be %-encoded in a PKCS#11 URI")
    return unquote_to_bytes(value)


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ValueError(f"PKCS#11 URI attribute {name} is not UTF-8") from None
