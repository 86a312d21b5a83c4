"""Payload formats of the fleet-provisioning API: ``json`` and ``cbor`` (the topic's last level says which)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import cbor2

from fleetprov.errors import EmulatorError


class PayloadError(EmulatorError):
    """A request payload that is not a well-formed object in its declared format."""


def decode_payload(payload: bytes, payload_format: str) -> Mapping[str, Any]:
    try:
        value = _load_cbor(payload) if payload_format == "cbor" else json.loads(payload.decode("utf-8"))
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


def encode_payload(body: Mapping[str, Any], payload_format: str) -> bytes:
    if payload_format == "cbor":
        return bytes(cbor2.dumps(dict(body)))
    return json.dumps(dict(body), separators=(",", ":")).encode()


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."
