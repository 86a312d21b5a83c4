"""RFC 7512 PKCS#11 URIs as fleetprov writes (key_reference) and reads them."""

from __future__ import annotations

import re
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprov.keys.pkcs11_uri import Pkcs11Uri, parse_pkcs11_uri, pkcs11_uri

# RFC 7512: "pkcs11:" then path attributes of pk11-pchar (unreserved, pk11-path-res-avail, %XX) split by ";".
_PCHAR = r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=&]|%[0-9A-F]{2})"
RFC7512_PATH = re.compile(rf"pkcs11:[a-z-]+={_PCHAR}*(?:;[a-z-]+={_PCHAR}*)*")


def test_the_documented_example() -> None:
    uri = pkcs11_uri("fleetprov", "device-key", b"\x01\x02")
    assert uri == "pkcs11:token=fleetprov;object=device-key;id=%01%02;type=private"
    assert parse_pkcs11_uri(uri) == Pkcs11Uri("fleetprov", "device-key", b"\x01\x02", "private")


@pytest.mark.parametrize(
    ("label", "encoded"),
    [
        ("my key", "my%20key"),
        ("a;b", "a%3Bb"),
        ("a/b", "a%2Fb"),
        ("100%", "100%25"),
        ("clé", "cl%C3%A9"),
        ("鍵", "%E9%8D%B5"),
        ("a?b#c", "a%3Fb%23c"),
        ("a:b@c&d=e!$'()*+,[]", "a:b@c&d=e!$'()*+,[]"),  # pk11-path-res-avail stays as it is
        ("A-z.0_9~", "A-z.0_9~"),  # pk11-unreserved too
    ],
)
def test_labels_are_percent_encoded_as_rfc7512_path_values(label: str, encoded: str) -> None:
    uri = pkcs11_uri(label, label, None)
    assert uri == f"pkcs11:token={encoded};object={encoded};type=private"
    assert parse_pkcs11_uri(uri) == Pkcs11Uri(label, label, None)


def test_id_is_always_fully_percent_encoded() -> None:
    assert pkcs11_uri("t", None, b"AZaz09") == "pkcs11:token=t;id=%41%5A%61%7A%30%39;type=private"


def test_another_producers_uri() -> None:
    """Lower-case hex, literal safe characters in id, no type: still the same key."""
    parsed = parse_pkcs11_uri("pkcs11:object=my%20key;id=%0a%0Bz;token=t")
    assert parsed == Pkcs11Uri("t", "my key", b"\x0a\x0bz", "private")
    assert parse_pkcs11_uri("pkcs11:token=t;type=cert").object_type == "cert"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:private.key", "starts with 'pkcs11:'"),
        ("pkcs11:", "unsupported PKCS#11 URI attribute ''"),
        ("pkcs11:token=t?pin-value=1234", "query attributes"),
        ("pkcs11:token=t;pin-value=1234", "unsupported PKCS#11 URI attribute 'pin-value'"),
        ("pkcs11:token=t;serial=1", "unsupported PKCS#11 URI attribute 'serial'"),
        ("pkcs11:token", "unsupported PKCS#11 URI attribute 'token'"),
        ("pkcs11:token=a;token=b", "token appears twice"),
        ("pkcs11:object=k", "names no token"),
        ("pkcs11:token=t;type=secret", "unknown PKCS#11 object type 'secret'"),
        ("pkcs11:token=t%G1", "not followed by two hex digits"),
        ("pkcs11:token=t%4", "not followed by two hex digits"),
        ("pkcs11:token=t%", "not followed by two hex digits"),
        ("pkcs11:token=my key", "character ' ' must be %-encoded"),
        ("pkcs11:token=a/b", "character '/' must be %-encoded"),
        ("pkcs11:token=clé", "character 'é' must be %-encoded"),
        ("pkcs11:token=t;object=%FF", "attribute object is not UTF-8"),
        ("pkcs11:token=%C3", "attribute token is not UTF-8"),
    ],
)
def test_what_is_not_accepted(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_pkcs11_uri(uri)


labels = st.text(st.characters(exclude_categories=("Cs",)))  # any text UTF-8 can carry


@settings(max_examples=300, deadline=None)
@given(token=labels, key_label=st.none() | labels, key_id=st.none() | st.binary())
def test_round_trip(token: str, key_label: Optional[str], key_id: Optional[bytes]) -> None:
    uri = pkcs11_uri(token, key_label, key_id)
    assert RFC7512_PATH.fullmatch(uri), uri
    assert parse_pkcs11_uri(uri) == Pkcs11Uri(token, key_label, key_id)
    assert str(parse_pkcs11_uri(uri)) == uri
