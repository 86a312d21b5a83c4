"""The CSR's subject for every name fleetprov signs one for: a thing name (1-128 of [a-zA-Z0-9:_-], rotation)
or a claim client id (up to 128 bytes of any text, first provisioning). X.509 allows 64 in a common name:
longer names are shortened by keys.csr_common_name, the same way for a key file and a key in a token."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from fleetprov.keys import MAX_COMMON_NAME_BYTES, PreparedKey, csr_common_name, prepared
from fleetprov.keys.file import FileKey
from fleetprov.keys.token import prepare_token_key
from fleetprov.provisioning import THING_NAME
from tests.softhsm import make_token

THING_NAMES = st.from_regex(THING_NAME, fullmatch=True)
KEY = FileKey(ec.generate_private_key(ec.SECP256R1()))  # one key: the subject is what varies


def _subject_of(key: PreparedKey) -> str:
    """The CSR's only subject attribute, a common name; the CSR's signature verified."""
    csr = x509.load_pem_x509_csr(key.csr_pem.encode())
    assert csr.is_signature_valid
    (attribute,) = csr.subject
    assert attribute.oid == NameOID.COMMON_NAME
    return str(attribute.value)


@given(THING_NAMES)
def test_a_key_file_signs_a_csr_for_every_thing_name(name: str) -> None:
    common_name = _subject_of(prepared(KEY, name))
    assert common_name == csr_common_name(name)
    assert 1 <= len(common_name.encode()) <= MAX_COMMON_NAME_BYTES
    if len(name) <= MAX_COMMON_NAME_BYTES:
        assert common_name == name
    else:  # still says whose it is
        assert common_name.startswith(name[:47] + "-")


@given(st.text(min_size=0, max_size=128))
def test_any_text_makes_a_valid_common_name(name: str) -> None:
    """Claim client ids are any text of up to 128 bytes: a common name of 1-64 bytes, never half a character."""
    common_name = csr_common_name(name)
    assert 1 <= len(common_name.encode()) <= MAX_COMMON_NAME_BYTES
    assert common_name == csr_common_name(name)
    x509.NameAttribute(NameOID.COMMON_NAME, common_name)  # cryptography's own check: ValueError if not


@pytest.mark.parametrize(
    ("length", "kept"),
    [(1, 1), (63, 63), (64, 64), (65, 47), (68, 47), (127, 47), (128, 47)],
)
def test_boundaries(length: int, kept: int) -> None:
    name = ("bar-" + "0123456789abcdef" * 8)[:length]
    common_name = _subject_of(prepared(KEY, name))
    assert common_name[:kept] == name[:kept]
    if kept == length:
        assert common_name == name
    else:
        assert len(common_name) == MAX_COMMON_NAME_BYTES


def test_long_names_that_share_a_prefix_keep_distinct_common_names() -> None:
    stem = "bar-" + "a" * 60
    assert csr_common_name(stem + "1") != csr_common_name(stem + "2")


def test_a_long_non_ascii_client_id_is_cut_between_characters() -> None:
    name = "fleetprov.claim-" + "é" * 56  # 128 bytes, 72 characters
    common_name = _subject_of(prepared(KEY, name))
    assert len(common_name.encode()) <= MAX_COMMON_NAME_BYTES
    assert common_name.startswith("fleetprov.claim-" + "é" * 15 + "-")  # 16 + 30 bytes: the 47th would split one


@pytest.mark.parametrize("length", [64, 65, 128])
def test_a_token_key_signs_a_csr_for_the_longest_thing_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, length: int
) -> None:
    """The same rule in the token (asn1crypto builds its CSR): the same common name as a key file's."""
    token = make_token(tmp_path / "hsm", monkeypatch)
    name = ("bar-" + "f" * 124)[:length]
    key, _ = prepare_token_key(token.settings(), token.pin, "ec-p256", name, fresh=True)
    assert _subject_of(key) == csr_common_name(name) == _subject_of(prepared(KEY, name))
