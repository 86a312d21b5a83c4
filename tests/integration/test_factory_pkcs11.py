"""`fleetprov factory keygen|csr --key pkcs11:...` run as a user would, with a SoftHSM2 token of the test's own
($SOFTHSM2_CONF in a temporary directory, the token chosen by label): the key is made in the token, the token
signs the CSR, openssl and cryptography check it, and every output is searched for the PIN.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass

from fleetprov import factory
from fleetprov.keys.pkcs11 import find_key, open_token
from tests.softhsm import SoftToken, make_token
from tests.support import fleetprov

KEY_URI = "pkcs11:token=factory;object=device-1;type=private"
SUBJECT = ["--cn", "thing-7", "--country", "US", "--organization", "Acme", "--organizational-unit", "Line 3",
           "--state", "WA", "--serial-number", "0007", "--dn-qualifier", "q1"]  # fmt: skip
SUBJECT_TEXT = "C=US, ST=WA, O=Acme, OU=Line 3, CN=thing-7, serialNumber=0007, dnQualifier=q1"


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    return make_token(tmp_path / "hsm", monkeypatch, label="factory", pin="pin-" + tmp_path.name[-12:])


@pytest.fixture
def pin_file(token: SoftToken, tmp_path: Path) -> Path:
    path = tmp_path / "pin"
    path.write_text(token.pin + "\n")
    path.chmod(0o600)
    return path


def run(token: SoftToken, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = fleetprov("factory", *args, env=env)
    assert token.pin not in result.stdout + result.stderr, "the PIN was printed"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def token_options(token: SoftToken, pin_file: Path) -> list[str]:
    return ["--pkcs11-library", str(token.library), "--pin-file", str(pin_file)]


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True)


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_keygen_and_csr_in_the_token_with_the_full_jitp_subject(
    token: SoftToken, pin_file: Path, tmp_path: Path, key_type: str
) -> None:
    result = run(token, "keygen", "--key", KEY_URI, "--key-type", key_type, *token_options(token, pin_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"key: {KEY_URI} ({key_type}, made in the token, not extractable)\n"

    csr = tmp_path / "device.csr"
    result = run(token, "csr", "--key", KEY_URI, "--out", str(csr), *SUBJECT, *token_options(token, pin_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"key: {KEY_URI}\ncsr: {csr}\nsubject: {SUBJECT_TEXT}\n"

    checked = openssl("req", "-verify", "-noout", "-text", "-in", str(csr))
    assert checked.returncode == 0, checked.stderr
    assert "verify OK" in checked.stderr
    assert "Subject: C = US, ST = WA, O = Acme, OU = Line 3, CN = thing-7, serialNumber = 0007, dnQualifier = q1" in (
        checked.stdout
    )
    algorithm = "ecdsa-with-SHA256" if key_type.startswith("ec") else "sha256WithRSAEncryption"
    assert f"Signature Algorithm: {algorithm}" in checked.stdout

    request = x509.load_pem_x509_csr(csr.read_bytes())
    assert request.is_signature_valid
    jitp = factory.Subject("thing-7", "US", "Acme", "Line 3", "WA", "0007", "q1")
    assert request.subject.public_bytes() == factory.subject_name(jitp).public_bytes()
    spki = request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with open_token(token.settings(), token.pin) as session:
        assert spki == find_key(session, "device-1", None).public_key_der()
        (private,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        assert private[Attribute.SENSITIVE] and not private[Attribute.EXTRACTABLE]


def test_a_token_csr_becomes_a_certificate_openssl_verifies(token: SoftToken, tmp_path: Path) -> None:
    """The whole lab flow with the PIN from the environment: keygen, csr, sign with a lab CA, openssl verify."""
    env = {"FACTORY_PIN": token.pin}
    options = ["--pkcs11-library", str(token.library), "--pin-env", "FACTORY_PIN"]
    ca_key, ca_cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    assert run(token, "keygen", "--out", str(ca_key)).returncode == 0
    made = openssl("req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "30", "-out", str(ca_cert),
                   "-subj", "/CN=lab root CA")  # fmt: skip
    assert made.returncode == 0, made.stderr
    csr, cert = tmp_path / "device.csr", tmp_path / "device.pem"
    assert run(token, "keygen", "--key", KEY_URI, *options, env=env).returncode == 0
    result = run(token, "csr", "--key", KEY_URI, "--out", str(csr), *SUBJECT, *options, env=env)
    assert result.returncode == 0, result.stderr
    result = run(token, "sign", "--csr", str(csr), "--ca-cert", str(ca_cert), "--ca-key", str(ca_key),
                 "--out", str(cert))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"subject: {SUBJECT_TEXT}" in result.stdout
    verified = openssl("verify", "-CAfile", str(ca_cert), str(cert))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_errors_are_one_line_with_their_exit_codes_and_write_nothing(
    token: SoftToken, pin_file: Path, tmp_path: Path
) -> None:
    assert run(token, "keygen", "--key", KEY_URI, *token_options(token, pin_file)).returncode == 0
    lib = ["--pkcs11-library", str(token.library)]
    pin = ["--pin-file", str(pin_file)]
    open_pin = tmp_path / "open-pin"
    open_pin.write_text(token.pin)
    open_pin.chmod(0o644)
    file_key = tmp_path / "file.key"
    assert run(token, "keygen", "--out", str(file_key)).returncode == 0
    existing = tmp_path / "existing.csr"
    existing.write_text("keep me\n")
    out = tmp_path / "device.csr"
    csr = ["csr", "--out", str(out), "--cn", "thing-7"]
    wrong = {"FACTORY_PIN": "not-the-pin"}
    cases: list[tuple[list[str], dict[str, str] | None, int, str]] = [
        ([*csr, "--key", KEY_URI, *lib, "--pin-env", "FACTORY_PIN"], wrong, 78,
         "the PIN was refused by token 'factory': check the PIN in --pin-env FACTORY_PIN"),
        ([*csr, "--key", KEY_URI, *lib, "--pin-env", "FACTORY_PIN"], {}, 78,
         "--pin-env: environment variable FACTORY_PIN is not set"),
        ([*csr, "--key", "pkcs11:token=other;object=device-1", *lib, *pin], None, 78,
         "has no token labelled 'other' (tokens: 'factory')"),
        ([*csr, "--key", "pkcs11:token=factory;object=device-2", *lib, *pin], None, 78,
         "token 'factory' holds no private key with label 'device-2'"),
        ([*csr, "--key", "pkcs11:token=factory;id=%01", *lib, *pin], None, 64,
         "--key names no key: the PKCS#11 URI needs object=<key label>"),
        ([*csr, "--key", "pkcs11:token=factory;object=device-1?pin-value=1234", *lib, *pin], None, 64,
         "query attributes (pin-value, pin-source, module-path ...) are not accepted"),
        ([*csr, "--key", KEY_URI, *pin], None, 64, "a pkcs11: --key needs --pkcs11-library"),
        ([*csr, "--key", KEY_URI, *lib], None, 64, "needs exactly one of --pin-file FILE (mode 0600) and --pin-env"),
        ([*csr, "--key", KEY_URI, *lib, *pin, "--pin-env", "FACTORY_PIN"], None, 64, "needs exactly one of"),
        ([*csr, "--key", KEY_URI, *lib, "--pin-file", str(open_pin)], None, 78,
         f"--pin-file {open_pin} is readable by others (mode 0644): run 'chmod 600 {open_pin}'"),
        ([*csr, "--key", KEY_URI, "--pkcs11-library", str(tmp_path / "no.so"), *pin], None, 78,
         "does not exist or is not a file"),
        ([*csr, "--key", KEY_URI, *lib, *pin, "--country", "USA"], None, 64, "--country must be exactly 2 letters"),
        ([*csr, "--key", str(file_key), *lib], None, 64,
         "--pkcs11-library only go with a key in a token (--key pkcs11:...)"),
        (["csr", "--out", str(existing), "--cn", "t", "--key", KEY_URI, *lib, *pin], None, 73,
         f"{existing} exists already; not overwriting it"),
        (["keygen", "--key", KEY_URI, *lib, *pin], None, 73,
         "token 'factory' already holds a private key with label 'device-1'; not overwriting it"),
        (["keygen", "--key", "pkcs11:token=factory;object=k", "--key-type", "dsa", *lib, *pin], None, 64,
         "--key-type must be one of"),
        (["keygen", *lib, *pin], None, 64, "give --out KEY (a key file) or --key pkcs11:... (a key in a token)"),
        (["keygen", "--key", str(tmp_path / "k.pem"), *lib, *pin], None, 64, "use --out for a key file"),
        (["keygen", "--out", str(tmp_path / "k.pem"), *pin], None, 64, "--pin-file only go with a key in a token"),
    ]  # fmt: skip
    for args, env, code, message in cases:
        result = run(token, *args, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith("fleetprov: factory: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, (message, result.stderr)
        assert "1234" not in result.stderr  # not even a PIN smuggled into the URI is repeated
        assert not out.exists(), args
    assert existing.read_text() == "keep me\n"
    assert not (tmp_path / "k.pem").exists()
    with open_token(token.settings(), token.pin) as session:
        assert len(list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))) == 1


@pytest.mark.parametrize("step", ["keygen", "csr"])
def test_help_documents_the_token_options(step: str) -> None:
    result = fleetprov("factory", step, "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--key", "pkcs11:token=LABEL;object=KEYLABEL;type=private", "--pkcs11-library", "--pin-file",
                   "--pin-env", "mode 0600"):  # fmt: skip
        assert option in result.stdout, option
