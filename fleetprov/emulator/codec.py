"""Payload formats of the fleet-provisioning API: ``json`` and ``cbor`` (the topic's last level says which)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Set
from typing import Any

import cbor2

from fleetprov.errors import EmulatorError


class PayloadError(EmulatorError):
    """A request payload that is not a well-formed object in its declared format."""


def decode_payload(payload: bytes, payload_format: str) -> Mapping[str, Any]:
    try:
        value = _load_cbor(payload) if payload_format == "cbor" else json.loads(payload.decode("utf-8"))
        _check_expansion(value, len(payload))
        # JSON's "\ud800" escapes decode to strings that cannot be encoded again; refuse them here rather
        # than fail later while hashing or storing them.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, OverflowError, LookupError, RecursionError, cbor2.CBORDecodeError) as exc:
        raise PayloadError(f"payload is not valid {payload_format.upper()}: {_short(exc)}") from exc
    if not isinstance(value, dict):
        raise PayloadError(f"payload must be a {payload_format.upper()} object, got {type(value).__name__}")
    return value


def _load_cbor(payload: bytes) -> Any:
    """One CBOR data item and nothing after it (cbor2.loads ignores trailing bytes; json.loads does not)."""
    stream = io.BytesIO(payload)
    value = cbor2.CBORDecoder(stream).decode()
    if stream.tell() != len(payload):
        raise ValueError(f"{len(payload) - stream.tell()} bytes after the CBOR data item")
    return value


def _check_expansion(value: Any, encoded_size: int) -> None:
    """Refuse a value that decodes to more than its encoding holds, before anything walks it in full.

    Without references every decoded item costs at least one byte of JSON or CBOR, and a string no more
    characters than its bytes: so items plus string lengths never exceed the payload's size. CBOR's shared
    values (tags 28 and 29) and string references (tags 256 and 25) break that: a 226-byte request whose
    arrays share their halves decodes to 2**25 leaves, and json.dumps below then wrote them all (seconds of
    CPU and hundreds of MB). Counting stops at the bound, so this costs at most the payload's size, however
    deep the sharing or even cyclic.
    """
    budget = encoded_size
    pending = [value]
    while pending:
        item = pending.pop()
        budget -= 1 + (len(item) if isinstance(item, (str, bytes)) else 0)
        if budget < 0:
            raise ValueError(
                f"decodes to more than its {encoded_size} bytes: shared or referenced values "
                "(CBOR tags 28/29, 256/25) are not accepted"
            )
        if isinstance(item, Mapping):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, Set)):
            pending.extend(item)


def encode_payload(body: Mapping[str, Any], payload_format: str) -> bytes:
    if payload_format == "cbor":
        return bytes(cbor2.dumps(dict(body)))
    return json.dumps(dict(body), separators=(",", ":")).encode()


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."
