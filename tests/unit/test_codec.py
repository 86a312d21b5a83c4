"""Tests for fleetprov.emulator.codec: the json and cbor payload formats of the fleet-provisioning API."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprov.emulator.codec import PayloadError, decode_payload, encode_payload
from fleetprov.errors import EmulatorError

FORMATS = ("json", "cbor")

REGISTER_REPLY = {
    "deviceConfiguration": {"site": "bench", "telemetryTopic": "devices/x/telemetry"},
    "thingName": "fleetprov-0001",
}
REJECTED = {"statusCode": 400, "errorCode": "InvalidPayload", "errorMessage": "bad"}


@pytest.mark.parametrize("payload_format", FORMATS)
@pytest.mark.parametrize(
    "body", [REGISTER_REPLY, REJECTED, {}, {"unicode": "Grüße ✓", "nested": {"a": [1, 2.5, None]}}]
)
def test_round_trip(payload_format: str, body: Mapping[str, Any]) -> None:
    encoded = encode_payload(body, payload_format)
    assert isinstance(encoded, bytes)
    assert decode_payload(encoded, payload_format) == body


def test_json_encoding_is_compact_utf8() -> None:
    assert encode_payload({"a": 1, "b": "x"}, "json") == b'{"a":1,"b":"x"}'


def test_cbor_encoding_is_cbor() -> None:
    encoded = encode_payload(REJECTED, "cbor")
    assert cbor2.loads(encoded) == REJECTED
    assert encoded[0] == 0xA3  # a CBOR map of three pairs, not JSON text


def test_formats_are_not_interchangeable() -> None:
    with pytest.raises(PayloadError, match="payload is not valid JSON"):
        decode_payload(encode_payload(REJECTED, "cbor"), "json")


def test_decode_accepts_what_other_clients_send() -> None:
    assert decode_payload(json.dumps({"certificateOwnershipToken": "t"}).encode(), "json") == {
        "certificateOwnershipToken": "t"
    }
    assert decode_payload(cbor2.dumps({"certificateOwnershipToken": "t"}), "cbor") == {"certificateOwnershipToken": "t"}


@pytest.mark.parametrize("payload_format", FORMATS)
@pytest.mark.parametrize(("value", "type_name"), [([1, 2], "list"), ("text", "str"), (3, "int"), (None, "NoneType")])
def test_non_object_payloads_are_rejected(payload_format: str, value: Any, type_name: str) -> None:
    payload = cbor2.dumps(value) if payload_format == "cbor" else json.dumps(value).encode()
    with pytest.raises(PayloadError, match=rf"^payload must be a {payload_format.upper()} object, got {type_name}$"):
        decode_payload(payload, payload_format)


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe{}", b'{"a": "\xc3\x28"}', b"\xed\xa0\x80"],
    ids=["bom-like", "bad-continuation", "encoded-surrogate"],
)
def test_invalid_utf8_json_is_rejected(payload: bytes) -> None:
    with pytest.raises(PayloadError, match=r"^payload is not valid JSON: .*utf-8"):
        decode_payload(payload, "json")


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"{'a': 1}", b'{"a": 1,}', b'{"a": 1} trailing', b"[" * 100_000, b"1" * 5000],
    ids=["empty", "unterminated", "single-quotes", "trailing-comma", "extra-data", "deep-nesting", "huge-int"],
)
def test_invalid_json_is_rejected(payload: bytes) -> None:
    with pytest.raises(PayloadError, match=r"^payload is not valid JSON: "):
        decode_payload(payload, "json")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xa1",  # a map of one pair, with nothing after it
        b"\xa1\x61",  # a truncated text key
        b"\x1c",  # reserved additional information
        b"\xa1\x61a\x62\xff\xfe",  # a text string that is not UTF-8
        b"\xd8\x1e\x82\x01\x00",  # tag 30: a rational with denominator 0
        b"\xd8\x1d\x05",  # tag 29: a reference to a shared value that does not exist
        b"\x81" * 100_000,  # nesting beyond the recursion limit
    ],
    ids=["empty", "truncated-map", "truncated-key", "reserved", "bad-utf8", "zero-denominator", "bad-ref", "deep"],
)
def test_invalid_cbor_is_rejected(payload: bytes) -> None:
    with pytest.raises(PayloadError, match=r"^payload is not valid CBOR: "):
        decode_payload(payload, "cbor")


def test_error_messages_are_short() -> None:
    with pytest.raises(PayloadError) as caught:
        decode_payload(b"\xa1" + b"\x7b" + b"\x7f" * 8, "cbor")
    assert len(str(caught.value)) <= len("payload is not valid CBOR: ") + 120


def test_payload_error_is_an_emulator_error() -> None:
    assert issubclass(PayloadError, EmulatorError)


def test_cbor_trailing_bytes_are_rejected_like_json() -> None:
    with pytest.raises(PayloadError):
        decode_payload(cbor2.dumps({"certificateOwnershipToken": "t"}) + b"\x00garbage", "cbor")


def _shared_halves(depth: int) -> bytes:
    """A CSR request whose arrays share their two halves (CBOR value sharing, tags 28/29): a couple of hundred
    bytes that decode to 2**depth leaves."""
    value: Any = "AAAAAAAA"
    for _ in range(depth):
        value = [value, value]
    return bytes(cbor2.dumps({"certificateSigningRequest": value}, value_sharing=True))


def _cyclic() -> bytes:
    loop: list[Any] = []
    loop.append(loop)
    return bytes(cbor2.dumps({"certificateSigningRequest": loop}, value_sharing=True))


def _string_references() -> bytes:
    """One 2 KiB string, then 200 references to it (tags 256/25): each reference is 2 bytes."""
    text = "A" * 2048
    return bytes(cbor2.dumps({"a": text, "b": [text] * 200}, string_referencing=True))


@pytest.mark.parametrize(
    "payload",
    [_shared_halves(2), _cyclic(), _string_references()],
    ids=["shared-halves", "cyclic", "string-references"],
)
def test_cbor_that_decodes_larger_than_its_encoding_is_refused(payload: bytes) -> None:
    with pytest.raises(PayloadError, match=r"^payload is not valid CBOR: decodes to more than its \d+ bytes"):
        decode_payload(payload, "cbor")


def test_the_shared_value_bomb_of_the_review_is_refused() -> None:
    bomb = _shared_halves(25)  # json.dumps took 14 s and 650 MB to expand it
    assert len(bomb) < 250
    with pytest.raises(PayloadError, match="CBOR tags 28/29"):
        decode_payload(bomb, "cbor")


def test_a_shared_value_used_once_costs_nothing_and_is_accepted() -> None:
    single = {"certificateSigningRequest": ["only", "once"]}
    assert decode_payload(cbor2.dumps(single, value_sharing=True), "cbor") == single


@pytest.mark.parametrize("payload", [b'{"a": "\\ud800"}', b'{"\\udfff": "x"}'], ids=["value", "key"])
def test_json_lone_surrogate_escape_is_rejected(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_payload(payload, "json")


# --- properties ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300), payload_format=st.sampled_from(FORMATS))
def test_decode_arbitrary_bytes_returns_a_mapping_or_raises_payload_error(payload: bytes, payload_format: str) -> None:
    try:
        decoded = decode_payload(payload, payload_format)
    except PayloadError as exc:
        assert str(exc).startswith("payload ")
    else:
        assert isinstance(decoded, Mapping)


@settings(max_examples=100, deadline=None)
@given(prefix=st.sampled_from([b"{", b'{"a":', b"\xa1", b"\xa1\x61a", b"\xbf"]), rest=st.binary(max_size=50))
def test_decode_almost_valid_bytes_returns_a_mapping_or_raises_payload_error(prefix: bytes, rest: bytes) -> None:
    for payload_format in FORMATS:
        try:
            decoded = decode_payload(prefix + rest, payload_format)
        except PayloadError:
            continue
        assert isinstance(decoded, Mapping)


@settings(max_examples=100, deadline=None)
@given(body=json_objects, payload_format=st.sampled_from(FORMATS))
def test_round_trip_property(body: dict[str, Any], payload_format: str) -> None:
    assert decode_payload(encode_payload(body, payload_format), payload_format) == body
