"""Payload formats of the fleet-provisioning API: ``json`` and ``cbor`` (the topic's last level says which)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import cbor2

from fleetprov.errors import EmulatorError


class PayloadError(EmulatorError):
    """A request payload that is not a well-formed object in its declared format."""


def decode_payload(payload: bytes, payload_format: str) -> Mapping[str, Any]:
    try:
        value = cbor2.loads(payload) if payload_format == "cbor" else json.loads(payload.decode("utf-8"))
    except (ValueError, TypeError, OverflowError, LookupError, RecursionError, cbor2.CBORDecodeError) as exc:
        raise PayloadError(f"payload is not valid {payload_format.upper()}: {_short(exc)}") from exc
    if not isinstance(value, dict):
        raise PayloadError(f"payload must be a {payload_format.upper()} object, got {type(value).__name__}")
    return value


def encode_payload(body: Mapping[str, Any], payload_format: str) -> bytes:
    if payload_format == "cbor":
        return bytes(cbor2.dumps(dict(body)))
    return json.dumps(dict(body), separators=(",", ":")).encode()


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."
