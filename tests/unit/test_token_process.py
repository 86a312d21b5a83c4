"""fleetprov.keys.token_process: a key made in the token by a child process (real SoftHSM2), and the child's
errors carried back with their exit code, the PIN in none of them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetprov.keys import PreparedKey
from fleetprov.keys.token_process import ChildFailed, prepare_in_child
from tests.softhsm import make_token


def prepare(*arguments: Any, **keywords: Any) -> PreparedKey:
    return asyncio.run(prepare_in_child(*arguments, **keywords))


def test_key_made_in_the_child_and_found_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = make_token(tmp_path / "hsm", monkeypatch, pin="child-pin-42")
    monkeypatch.setenv("TEST_PIN", token.pin)
    settings = dataclasses.replace(token.settings(), key_label="device-g2", pin_env="TEST_PIN", pin_file=None)
    first = prepare(settings, "ec-p256", "thing-1", os.environ)
    assert "object=device-g2" in first.key_reference and "pin" not in first.key_reference
    csr = x509.load_pem_x509_csr(first.csr_pem.encode())
    assert csr.is_signature_valid
    assert (
        csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        == first.public_key_der
    )
    again = prepare(settings, "ec-p256", "thing-1", os.environ)  # a rerun finds the same key
    assert again.public_key_der == first.public_key_der


def test_wrong_pin_comes_back_as_exit_78(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = make_token(tmp_path / "hsm", monkeypatch, pin="right-pin-77")
    monkeypatch.setenv("TEST_PIN", "wrong-pin-00")
    settings = dataclasses.replace(token.settings(), pin_env="TEST_PIN", pin_file=None)
    with pytest.raises(ChildFailed) as failed:
        prepare(settings, "ec-p256", "thing-1", os.environ)
    assert failed.value.exit_code == 78 and not failed.value.transient
    assert "PIN" in failed.value.message and "wrong-pin-00" not in failed.value.message


def test_a_child_that_dies_is_a_transient_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = make_token(tmp_path / "hsm", monkeypatch)
    monkeypatch.setenv("TEST_PKCS11_PIN", token.pin)
    monkeypatch.setattr("sys.executable", "/bin/false")  # exits 1 and answers nothing
    with pytest.raises(ChildFailed) as failed:
        prepare(token.settings(), "ec-p256", "thing-1", os.environ)
    assert failed.value.exit_code == 75 and failed.value.transient
    assert "answered nothing usable" in failed.value.message


def test_the_pin_reaches_the_child_on_stdin_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for the child records its argv, environment and stdin: the PIN is in its stdin, and
    neither the PIN nor any variable outside the allow-list is in its argv or environment."""
    token = make_token(tmp_path / "hsm", monkeypatch, pin="stdin-pin-31")
    monkeypatch.setenv("TEST_PIN", token.pin)
    monkeypatch.setenv("FLEETPROV_PROXY__PASSWORD", "proxy-secret-9")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    record = tmp_path / "record"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/bin/sh\n{{ echo "$@"; env; cat; }} > {record}\n')
    stand_in.chmod(0o755)
    monkeypatch.setattr("sys.executable", str(stand_in))
    settings = dataclasses.replace(token.settings(), pin_env="TEST_PIN")
    with pytest.raises(ChildFailed):  # the stand-in answers nothing
        prepare(settings, "ec-p256", "thing-1", os.environ)
    argv, *rest = record.read_text().splitlines()
    environment = dict(line.split("=", 1) for line in rest[:-1] if "=" in line)
    request = json.loads(rest[-1])
    assert argv.endswith("-m fleetprov.keys.token_process")
    assert request["pin"] == "stdin-pin-31"
    assert "stdin-pin-31" not in argv and "stdin-pin-31" not in "\n".join(rest[:-1])
    assert {"TEST_PIN", "FLEETPROV_PROXY__PASSWORD", "CREDENTIALS_DIRECTORY"}.isdisjoint(environment)
    assert environment["SOFTHSM2_CONF"] == os.environ["SOFTHSM2_CONF"]  # the module finds its token
