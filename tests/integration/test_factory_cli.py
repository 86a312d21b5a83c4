"""`fleetprov factory keygen|csr|sign` run as a user would, the results checked with openssl."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import fleetprov


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True)


@pytest.fixture
def lab_ca(tmp_path: Path) -> tuple[Path, Path]:
    """rootCA.key and rootCA.pem as seed 002 makes them."""
    key, cert = tmp_path / "rootCA.key", tmp_path / "rootCA.pem"
    assert openssl("genrsa", "-out", str(key), "2048").returncode == 0
    made = openssl("req", "-x509", "-new", "-nodes", "-key", str(key), "-sha256", "-days", "30",
                   "-out", str(cert), "-subj", "/CN=lab root CA")  # fmt: skip
    assert made.returncode == 0, made.stderr
    return cert, key


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_keygen_csr_sign_make_a_certificate_openssl_verifies(
    tmp_path: Path, lab_ca: tuple[Path, Path], key_type: str
) -> None:
    ca_cert, ca_key = lab_ca
    key, csr, cert = tmp_path / "device.key", tmp_path / "device.csr", tmp_path / "device.pem"

    result = fleetprov("factory", "keygen", "--out", str(key), "--key-type", key_type)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    result = fleetprov("factory", "csr", "--key", str(key), "--out", str(csr), "--cn", "thing-7",
                       "--country", "US", "--organization", "Acme", "--organizational-unit", "Line 3",
                       "--state", "WA", "--serial-number", "0007", "--dn-qualifier", "q1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    verified = openssl("req", "-verify", "-noout", "-in", str(csr))
    assert verified.returncode == 0, verified.stderr

    result = fleetprov("factory", "sign", "--csr", str(csr), "--ca-cert", str(ca_cert), "--ca-key", str(ca_key),
                       "--out", str(cert), "--days", "500")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "subject: C=US, ST=WA, O=Acme, OU=Line 3, CN=thing-7, serialNumber=0007, dnQualifier=q1" in result.stdout
    assert "not after: " in result.stdout

    verified = openssl("verify", "-CAfile", str(ca_cert), str(cert))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    subject = openssl("x509", "-noout", "-subject", "-nameopt", "compat", "-in", str(cert)).stdout
    assert subject.strip() == "subject=/C=US/ST=WA/O=Acme/OU=Line 3/CN=thing-7/serialNumber=0007/dnQualifier=q1"
    text = openssl("x509", "-noout", "-text", "-in", str(cert)).stdout
    assert "CA:FALSE" in text
    assert "TLS Web Client Authentication" in text
    assert "sha256WithRSAEncryption" in text  # signed by the RSA lab CA with SHA-256


def test_errors_are_one_line_with_their_exit_codes(tmp_path: Path, lab_ca: tuple[Path, Path]) -> None:
    ca_cert, ca_key = lab_ca
    key, csr = tmp_path / "device.key", tmp_path / "device.csr"
    assert fleetprov("factory", "keygen", "--out", str(key)).returncode == 0

    cases = [
        (["keygen", "--out", str(key)], 73, "exists already"),
        (["keygen", "--out", str(tmp_path / "x.key"), "--key-type", "dsa"], 64, "--key-type must be one of"),
        (["csr", "--key", str(key), "--out", str(csr), "--cn", "t", "--country", "USA"], 64, "exactly 2 letters"),
        (["csr", "--key", str(key), "--out", str(csr), "--cn", ""], 64, "--cn must not be empty"),
        (["csr", "--key", str(ca_cert), "--out", str(csr), "--cn", "t"], 78, "not a readable private key"),
        (
            [
                "sign",
                "--csr",
                str(ca_cert),
                "--ca-cert",
                str(ca_cert),
                "--ca-key",
                str(ca_key),
                "--out",
                str(tmp_path / "c.pem"),
            ],
            65,
            "not a readable CSR",
        ),
    ]
    for args, code, message in cases:
        result = fleetprov("factory", *args)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith("fleetprov: factory: "), result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr

    assert fleetprov("factory", "csr", "--key", str(key), "--out", str(csr), "--cn", "t").returncode == 0
    result = fleetprov("factory", "sign", "--csr", str(csr), "--ca-cert", str(ca_cert), "--ca-key", str(key),
                       "--out", str(tmp_path / "c.pem"))  # fmt: skip
    assert result.returncode == 78
    assert "does not match CA certificate" in result.stderr
    assert not (tmp_path / "c.pem").exists()


@pytest.mark.parametrize(
    ("step", "options"),
    [
        ("keygen", ["--out", "--key", "--key-type", "--pkcs11-library", "--pin-file", "--pin-env"]),
        (
            "csr",
            [
                "--key",
                "--out",
                "--cn",
                "--country",
                "--organization",
                "--organizational-unit",
                "--state",
                "--serial-number",
                "--dn-qualifier",
                "--pkcs11-library",
                "--pin-file",
                "--pin-env",
            ],
        ),
        ("sign", ["--csr", "--ca-cert", "--ca-key", "--out", "--days"]),
    ],
)
def test_help_documents_each_option(step: str, options: list[str]) -> None:
    result = fleetprov("factory", step, "--help")
    assert result.returncode == 0, result.stderr
    for option in options:
        assert option in result.stdout, option
