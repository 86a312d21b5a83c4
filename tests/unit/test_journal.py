from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprov.errors import StorageError
from fleetprov.journal import (
    JOURNAL,
    TOKEN_LIFETIME,
    TOKEN_MARGIN,
    Journal,
    clear_journal,
    load_journal,
    save_journal,
)
from fleetprov.store import CorruptState


def started() -> Journal:
    return Journal(staging="staging-abc", method="csr", key_type="ec-p256", template="T", endpoint="e.example")


def test_round_trip_and_mode(tmp_path: Path) -> None:
    journal = started().at(
        "issued",
        certificate_id="c" * 64,
        certificate_pem="PEM",
        ownership_token="secret-token",
        token_deadline=1000.0,
        abandoned=("old",),
    )
    save_journal(tmp_path, journal)
    assert stat.S_IMODE((tmp_path / JOURNAL).stat().st_mode) == 0o600
    assert load_journal(tmp_path) == journal
    assert "secret-token" not in repr(journal)


def test_absent_journal(tmp_path: Path) -> None:
    assert load_journal(tmp_path) is None
    clear_journal(tmp_path)  # nothing to remove: no error


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        json.dumps({"staging": "staging-a"}).encode(),
        json.dumps({**vars(started()), "abandoned": [], "stage": "flying"}).encode(),
        json.dumps({**vars(started()), "abandoned": [], "token_deadline": "soon"}).encode(),
        json.dumps({**vars(started()), "abandoned": [], "staging": "../etc"}).encode(),
        json.dumps({**vars(started()), "abandoned": [1]}).encode(),
        json.dumps({**vars(started()), "abandoned": [], "device_configuration": {"a": 1}}).encode(),
        json.dumps({**vars(started()), "abandoned": [], "unknown_field": 1}).encode(),
    ],
)
def test_unreadable_journal_is_set_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / JOURNAL).write_bytes(content)
    assert load_journal(tmp_path) is None
    assert not (tmp_path / JOURNAL).exists()


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_journal_or_none(content: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / JOURNAL).write_bytes(content)
        result = load_journal(Path(directory))
        assert result is None or isinstance(result, Journal)


def test_token_usable_until_the_margin() -> None:
    journal = started().at("issued", token_deadline=10_000.0)
    assert journal.token_usable(now=10_000.0 - TOKEN_MARGIN - 1)
    assert not journal.token_usable(now=10_000.0 - TOKEN_MARGIN)
    assert not started().token_usable(now=0)
    assert TOKEN_LIFETIME == 3600


def test_matches_configuration() -> None:
    journal = started()
    assert journal.matches("csr", "ec-p256", "T", "e.example")
    assert not journal.matches("create-keys", "ec-p256", "T", "e.example")
    assert not journal.matches("csr", "ec-p256", "Other", "e.example")


def test_text_names_what_is_missing() -> None:
    with pytest.raises(CorruptState, match=r"stage started\) has no thing_name"):
        started().text("thing_name")
    assert started().at("registered", thing_name="t").text("thing_name") == "t"


def test_clearing_the_journal_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal that a power cut brings back would resume a finished run: after the unlink the state directory
    is fsync'd, and a failing sync is an error the caller hears of."""
    save_journal(tmp_path, started())
    state_inode, real_fsync = tmp_path.stat().st_ino, os.fsync

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == state_inode:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError) as raised:
        clear_journal(tmp_path)
    monkeypatch.undo()
    assert raised.value.message == f"cannot remove {tmp_path / JOURNAL}: Input/output error"
    assert not (tmp_path / JOURNAL).exists()
    clear_journal(tmp_path)  # nothing left to remove: nothing to say
