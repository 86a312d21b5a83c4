"""fleetprov.jit.check_material: what a JITP/JITR device's own credentials must be before it connects, and the
config sections of the other ways in (jit:, claim.inbox)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetprov import factory
from fleetprov.config import JitConfig, load_config, render_config
from fleetprov.errors import ConfigError, FleetprovError
from fleetprov.jit import _can_wait_out, check_material

NOW = dt.datetime.now(dt.timezone.utc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


SUBJECT = factory.Subject(common_name="lamp-7", country="DE", serial_number="SN-7")


def _ca(directory: Path, name: str = "customer root", *, is_ca: bool = True) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _device(directory: Path, ca: tuple[Path, Path], subject: factory.Subject = SUBJECT, days: str = "30") -> JitConfig:
    key = directory / "device.key"
    factory.keygen(key, "ec-p256")
    factory.csr(key, directory / "device.csr", subject)
    factory.sign(directory / "device.csr", ca[0], ca[1], directory / "device.crt", days)
    return JitConfig(certificate=directory / "device.crt", private_key=key, ca_certificate=ca[0])


def test_the_staged_certificate_is_the_chain_and_the_thing_is_the_common_name(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path))
    material = check_material(jit, _now())
    certificates = x509.load_pem_x509_certificates(material.certificate_pem)
    assert certificates[1].subject.rfc4514_string() == "CN=customer root"
    assert certificates[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lamp-7"
    assert len(certificates) == 2
    der = certificates[0].public_bytes(serialization.Encoding.DER)
    assert material.certificate_id == hashlib.sha256(der).hexdigest()
    assert material.thing_name == "lamp-7"
    assert material.key_pem == jit.private_key.read_bytes()  # type: ignore[union-attr]


def test_without_a_ca_certificate_only_the_device_certificate_is_staged(tmp_path: Path) -> None:
    jit = replace(_device(tmp_path, _ca(tmp_path)), ca_certificate=None)
    assert len(x509.load_pem_x509_certificates(check_material(jit, _now()).certificate_pem)) == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"thing_name_from": "serial-number"}, "SN-7"),
        ({"thing_name": "kitchen-lamp"}, "kitchen-lamp"),
        ({"thing_name_from": "certificate-id"}, None),
    ],
)
def test_thing_name_sources(tmp_path: Path, change: dict[str, str], expected: str | None) -> None:
    jit = replace(_device(tmp_path, _ca(tmp_path)), **change)
    material = check_material(jit, _now())
    assert material.thing_name == (expected or material.certificate_id)


def test_a_missing_subject_field_for_the_thing_name_is_named(tmp_path: Path) -> None:
    jit = replace(_device(tmp_path, _ca(tmp_path), factory.Subject(common_name="x")), thing_name_from="serial-number")
    with pytest.raises(ConfigError, match="has no serialNumber"):
        check_material(jit, _now())


def test_a_thing_name_that_aws_would_refuse_is_refused_escaped(tmp_path: Path) -> None:
    """The thing name is logged, stored, the client id and in hooks' environment: it is checked first."""
    jit = _device(tmp_path, _ca(tmp_path), factory.Subject(common_name="lamp 7/../x"))
    with pytest.raises(ConfigError, match=r"the commonName of .*device\.crt \(lamp 7/\.\./x\) is not a valid thing"):
        check_material(jit, _now())
    with pytest.raises(ConfigError, match=r"jit\.thing_name \(bad\\nname\\x1b\[2J\) is not a valid thing name"):
        check_material(replace(jit, thing_name="bad\nname\x1b[2J"), _now())


def test_a_certificate_from_another_ca_is_not_a_chain(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path))
    other, _ = _ca(tmp_path, "someone else")
    with pytest.raises(ConfigError, match="not issued by that CA") as excinfo:
        check_material(replace(jit, ca_certificate=other), _now())
    assert excinfo.value.exit_code == 78


def test_a_tampered_device_certificate_is_not_a_chain(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path))
    certificate = x509.load_pem_x509_certificate(jit.certificate.read_bytes())
    der = bytearray(certificate.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_certificate(bytes(der))
    jit.certificate.write_bytes(tampered.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not issued by that CA"):
        check_material(jit, _now())


def test_a_ca_certificate_that_is_not_a_ca_is_refused(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path))
    leaf, _ = _ca(tmp_path, "leaf", is_ca=False)
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        check_material(replace(jit, ca_certificate=leaf), _now())


def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path))
    other = tmp_path / "other.key"
    factory.keygen(other, "ec-p256")
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        check_material(replace(jit, private_key=other), _now())


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path))
    assert jit.private_key is not None
    os.chmod(jit.private_key, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        check_material(jit, _now())


def test_an_expired_certificate_is_refused_before_connecting(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path), days="1")
    with pytest.raises(ConfigError, match="not now"):
        check_material(jit, _now() + dt.timedelta(days=2))


def test_garbage_is_not_a_certificate(tmp_path: Path) -> None:
    jit = _device(tmp_path, _ca(tmp_path))
    jit.certificate.write_text("hello\n")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        check_material(jit, _now())


# -- the config sections -----------------------------------------------------------------------------------


BASE = "endpoint: iot.example\nroot_ca: ca.pem\n"
CLAIM = "claim:\n  certificate: c.pem\n  private_key: c.key\nprovisioning:\n  template: T\n"
JIT = "jit:\n  certificate: d.crt\n  private_key: d.key\n  ca_certificate: ca.crt\n  thing_name_from: serial-number\n"


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "config.yaml"
    path.write_text(BASE + text)
    return load_config(path, environ={})


def test_jit_replaces_claim_and_provisioning(tmp_path: Path) -> None:
    config = _load(tmp_path, JIT)
    assert config.claim is None and config.provisioning is None  # type: ignore[attr-defined]
    jit = config.jit  # type: ignore[attr-defined]
    assert jit.certificate == tmp_path / "d.crt" and jit.thing_name_from == "serial-number" and jit.wait == 3600
    rendered = render_config(config)  # type: ignore[arg-type]
    assert "jit:" in rendered and "claim:" not in rendered
    with pytest.raises(ConfigError, match="needs claim"):
        config.required_claim()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (JIT + CLAIM, "exclude each other"),
        (JIT.replace("  thing_name_from: serial-number\n", "  thing_name: a\n  thing_name_from: common-name\n"),
         "not both"),
        (JIT + "  wait: 0\n", "positive number"),
        (JIT.replace("serial-number", "mac"), "is not one of"),
        (JIT + "daemon:\n  rotation_template: R\n", "rotation is for identities provisioned by claim"),
        (JIT.replace("d.key", "'pkcs11:token=t;object=k;type=private'"), "keys.pkcs11"),
        (JIT + "  color: red\n", "color"),
        ("provisioning:\n  template: T\nclaim:\n  inbox: in\n  certificate: c.pem\n", "replaces certificate"),
    ],
)  # fmt: skip
def test_bad_sections_are_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        _load(tmp_path, text)


def test_the_inbox_claim_is_read_through_the_pending_link(tmp_path: Path) -> None:
    config = _load(tmp_path, "claim:\n  inbox: in\nprovisioning:\n  template: T\n")
    claim = config.claim  # type: ignore[attr-defined]
    assert claim.inbox == tmp_path / "in"
    assert claim.certificate == tmp_path / "in" / "pending" / "certificate.pem"
    assert claim.private_key == tmp_path / "in" / "pending" / "private.key"
    assert "inbox:" in render_config(config)  # type: ignore[arg-type]


def test_a_bad_file_or_token_at_connect_is_not_waited_out() -> None:
    """session.py reports an unusable key, certificate or token as a ConfigError at the connect step: waiting for
    activation cannot fix it (exit 78 at once); a refused or closed connection can."""
    assert not _can_wait_out(ConfigError("/etc/device.key is not a PEM private key", step="connect"))
    assert _can_wait_out(FleetprovError("the connection was closed before its CONNACK", step="connect"))
