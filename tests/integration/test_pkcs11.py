"""`fleetprov --once` with the device key in a PKCS#11 token (SoftHSM2): the key is made in the token, the token
signs the CSR, and the identity connects through awscrt's PKCS#11 support. Each test has a token of its own
($SOFTHSM2_CONF in a temporary directory, selected by label), and every output is searched for the PIN.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, ObjectClass

from fleetprov.keys.pkcs11 import generate_key, open_token, public_key_der
from tests.integration.transports import Mqtt5Broker, edit_config, mqtt5_broker  # noqa: F401 -- fixture
from tests.softhsm import SoftToken, make_token
from tests.support import Emulator, device_config, fleetprov

KEY_LABEL = "fleetprov-device"  # the default keys.pkcs11.key_label


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    return make_token(tmp_path / "hsm", monkeypatch, pin="pin-" + tmp_path.name[-12:])


def _pin_file(token: SoftToken, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pkcs11-pin"
    path.write_text(token.pin + "\n")
    path.chmod(0o600)
    return path


def _config(emulator: Emulator, directory: Path, token: SoftToken, *options: str) -> Path:
    """`fleetprov emulator device-config` for the token backend, as the README tells a user to run it."""
    return device_config(
        emulator, directory,
        "--key-backend", "pkcs11", "--pkcs11-library", str(token.library), "--token-label", token.label,
        "--pin-file", str(_pin_file(token, directory)), *options,
    )  # fmt: skip


def _run(token: SoftToken, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = fleetprov(*args, env=env)
    assert token.pin not in result.stdout + result.stderr, "the PIN was printed"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _edit(config: Path, change: Any) -> None:
    settings = yaml.safe_load(config.read_text())
    change(settings)
    config.write_text(yaml.safe_dump(settings))


def _private_keys(token: SoftToken) -> list[dict[str, Any]]:
    """Every private key object in the token, with the attributes that say whether it can leave."""
    with open_token(token.settings(), token.pin) as session:
        keys = []
        for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            facts = {
                "label": key[Attribute.LABEL],
                "sensitive": key[Attribute.SENSITIVE],
                "extractable": key[Attribute.EXTRACTABLE],
                "never_extractable": key[Attribute.NEVER_EXTRACTABLE],
                "always_sensitive": key[Attribute.ALWAYS_SENSITIVE],
            }
            try:
                key[Attribute.VALUE if key.key_type == KeyType.EC else Attribute.PRIVATE_EXPONENT]
                facts["readable"] = True
            except pkcs11.PKCS11Error:  # AttributeSensitive: the token refuses to show it
                facts["readable"] = False
            keys.append(facts)
        return keys


def _token_public_key(token: SoftToken, label: str) -> bytes:
    with open_token(token.settings(), token.pin) as session:
        [public] = session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label})
        return public_key_der(public)  # type: ignore[arg-type]


def _generation(state: Path) -> Path:
    return (state / "current").resolve()


def _check_token_identity(token: SoftToken, state: Path) -> dict[str, Any]:
    """The committed generation names the token key by URI, holds no key file, and its certificate is for
    the one key in the token, which cannot leave it."""
    generation = _generation(state)
    manifest: dict[str, Any] = json.loads((generation / "manifest.json").read_text())
    assert manifest["key_reference"].startswith(f"pkcs11:token={token.label};object={KEY_LABEL};"), manifest
    assert "pin" not in manifest["key_reference"]
    assert not (generation / "private.key").exists()
    assert not list(state.rglob("*.key"))
    [key] = _private_keys(token)
    assert key == {
        "label": KEY_LABEL,
        "sensitive": True,
        "extractable": False,
        "never_extractable": True,
        "always_sensitive": True,
        "readable": False,
    }
    certificate = x509.load_pem_x509_certificate((generation / "certificate.pem").read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki == _token_public_key(token, KEY_LABEL)
    return manifest


# -- the whole flow through the token ----------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_provision_and_reconnect_through_the_token(
    emulator: Emulator, token: SoftToken, tmp_path: Path, key_type: str
) -> None:
    config = _config(emulator, tmp_path / "device", token, "--key-type", key_type, "--serial", f"hsm-{key_type}")
    state = tmp_path / "device" / "state"
    first = _run(token, "--once", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert f"provisioned: thing fleetprov-hsm-{key_type}" in first.stdout
    assert f"made a {key_type} key in token 'fleetprov'" in first.stderr, first.stderr
    manifest = _check_token_identity(token, state)
    certificate = x509.load_pem_x509_certificate((_generation(state) / "certificate.pem").read_bytes())
    expected = ec.EllipticCurvePublicKey if key_type.startswith("ec") else object
    assert isinstance(certificate.public_key(), expected)

    # The second run proves the identity by connecting with it: the key exists only inside the token.
    again = _run(token, "--once", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "already provisioned; verified" in again.stdout
    connects = [
        line
        for line in emulator.log().splitlines()
        if f"client 'fleetprov-hsm-{key_type}' connected: device certificate {manifest['certificate_id'][:12]}" in line
    ]
    assert len(connects) == 2, emulator.log()[-3000:]  # the verify of the first run, and this one

    status = _run(token, "status", "--json", "--config", str(config))
    assert json.loads(status.stdout)["key_reference"] == manifest["key_reference"]


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_mqtt5_through_the_token(
    mqtt5_broker: Mqtt5Broker,  # noqa: F811
    token: SoftToken,
    tmp_path: Path,
    key_type: str,
) -> None:
    serial = f"hsm-mqtt5-{key_type}"
    config = _config(mqtt5_broker.emulator, tmp_path / "device", token, "--protocol", "5", "--serial", serial)
    edit_config(config, port=mqtt5_broker.port)
    _edit(config, lambda s: s["provisioning"].update(key_type=key_type))
    result = _run(token, "--once", "--config", str(config))
    assert result.returncode == 0, f"{result.stderr}\n{mqtt5_broker.logs()}"
    _check_token_identity(token, tmp_path / "device" / "state")
    log = mqtt5_broker.mosquitto.log()
    assert f" as fleetprov-{serial} (p5, c1, " in log, log  # the verify connection: MQTT 5, the token's key


def test_a_factory_made_key_is_used(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    """A key put into the token at the factory (same label) is used, not replaced; no second key is made."""

    with open_token(token.settings(key_label=KEY_LABEL), token.pin) as session:
        factory = generate_key(session, "ec-p384", KEY_LABEL, b"\x42").public_key_der()
    config = _config(emulator, tmp_path / "device", token, "--serial", "hsm-factory")
    result = _run(token, "--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "using the key already in token 'fleetprov'" in result.stderr
    manifest = _check_token_identity(token, tmp_path / "device" / "state")
    assert manifest["key_reference"].endswith(";id=%42;type=private")
    assert _token_public_key(token, KEY_LABEL) == factory


# -- crash safety --------------------------------------------------------------------------------------


def _certified_key(state: Path) -> bytes:
    certificate = x509.load_pem_x509_certificate((_generation(state) / "certificate.pem").read_bytes())
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_every_identity_gets_a_key_of_its_own(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    """Re-provisioning makes a new key in the token (a label per generation), as it makes a new key file; the
    key of a generation that is pruned is deleted from the token, and `fleetprov status` says so."""
    config = _config(emulator, tmp_path / "device", token, "--serial", "hsm-again")
    state = tmp_path / "device" / "state"
    assert _run(token, "--once", "--config", str(config)).returncode == 0
    first = _check_token_identity(token, state)
    certified = [_certified_key(state)]
    # A key a failed run left under generation 2's label: replaced, never certified.
    with open_token(token.settings(), token.pin) as session:
        left_over = generate_key(session, "ec-p256", f"{KEY_LABEL}-g2", None).public_key_der()
    for number in (2, 3):
        result = _run(token, "reprovision", "--config", str(config))
        assert result.returncode == 0, result.stderr
        label = f"{KEY_LABEL}-g{number}"
        assert f"made a ec-p256 key in token '{token.label}': pkcs11:token={token.label};object={label};" in (
            result.stderr
        )
        replaced = "deleted the 2 object(s) a failed run had left under its label" in result.stderr
        assert replaced == (number == 2), result.stderr
        manifest = json.loads((_generation(state) / "manifest.json").read_text())
        assert manifest["key_reference"].startswith(f"pkcs11:token={token.label};object={label};"), manifest
        assert _certified_key(state) == _token_public_key(token, label)
        certified.append(_certified_key(state))
    assert len({*certified, left_over}) == 4, "a key was certified twice"
    # Generation 1 was pruned (the current one and the one before it stay): its key is gone from the token.
    assert sorted(key["label"] for key in _private_keys(token)) == [f"{KEY_LABEL}-g2", f"{KEY_LABEL}-g3"]
    status = _run(token, "status", "--json", "--config", str(config))
    pruned = json.loads(status.stdout)["pruned_token_keys"]
    assert (pruned["deleted"], pruned["not_deleted"]) == ([first["key_reference"]], [])
    text = _run(token, "status", "--config", str(config)).stdout
    assert f"pruned token keys: updated_at={pruned['updated_at']}, deleted=['{first['key_reference']}']" in text


def test_a_pruned_key_that_cannot_be_deleted_is_reported(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", token, "--serial", "hsm-elsewhere")
    state = tmp_path / "device" / "state"
    assert _run(token, "--once", "--config", str(config)).returncode == 0
    # Generation 1's key is (as far as its manifest says) in a token that is not the configured one.
    manifest_path = _generation(state) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    elsewhere = manifest["key_reference"].replace(f"token={token.label};", "token=elsewhere;")
    manifest_path.write_text(json.dumps({**manifest, "key_reference": elsewhere}))
    for _ in range(2):
        result = _run(token, "reprovision", "--config", str(config))
        assert result.returncode == 0, result.stderr
    assert f"could not delete the token key {elsewhere} of a removed generation" in result.stderr
    pruned = json.loads(_run(token, "status", "--json", "--config", str(config)).stdout)["pruned_token_keys"]
    assert pruned["deleted"] == []
    assert pruned["not_deleted"] == [
        {"key": elsewhere, "error": f"in token 'elsewhere', not the configured {token.label!r}"}
    ]


@pytest.mark.parametrize("point", ["after-key", "after-issue-reply", "after-registered"])
def test_kill_then_rerun_leaves_one_key(emulator: Emulator, token: SoftToken, tmp_path: Path, point: str) -> None:
    config = _config(emulator, tmp_path / "device", token, "--serial", f"hsm-kill-{point}")
    killed = _run(token, "--once", "--config", str(config), env={"FLEETPROV_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr
    assert len(_private_keys(token)) == 1
    rerun = _run(token, "--once", "--config", str(config))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming the interrupted run" in rerun.stderr
    _check_token_identity(token, tmp_path / "device" / "state")  # exactly one key, the certificate's


# -- errors: each a clear message, the right exit code, never the PIN -------------------------------------


def _fails(result: subprocess.CompletedProcess[str], code: int, *says: str) -> str:
    assert result.returncode == code, result.stderr
    final = result.stderr.strip().splitlines()[-1]
    assert final.startswith("fleetprov: "), result.stderr
    for text in says:
        assert text in final, final
    return final


def test_wrong_pin(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", token)
    pin_file = tmp_path / "device" / "pkcs11-pin"
    pin_file.write_text("not-the-pin-9876\n")
    result = _run(token, "--once", "--config", str(config))
    _fails(result, 78, "the PIN was refused by token 'fleetprov'", f"pin_file {pin_file}")
    assert "not-the-pin-9876" not in result.stdout + result.stderr
    assert not list((tmp_path / "device" / "state").glob("generations/*"))


def test_pin_in_the_config_file_is_refused(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", token)
    _edit(config, lambda s: s["keys"]["pkcs11"].update(pin=token.pin))
    result = _run(token, "check-config", "--config", str(config))
    _fails(result, 78, "keys.pkcs11.pin", "pin_file")


def test_token_missing(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", token)
    _edit(config, lambda s: s["keys"]["pkcs11"].update(token_label="no-such-token"))
    _fails(_run(token, "--once", "--config", str(config)), 78, "no token labelled 'no-such-token'", "'fleetprov'")


def test_library_missing_or_not_pkcs11(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", token)
    _edit(config, lambda s: s["keys"]["pkcs11"].update(library=str(tmp_path / "nothing.so")))
    _fails(_run(token, "--once", "--config", str(config)), 78, "nothing.so does not exist")
    not_a_module = tmp_path / "text.so"
    not_a_module.write_text("not a shared object\n")
    _edit(config, lambda s: s["keys"]["pkcs11"].update(library=str(not_a_module)))
    _fails(_run(token, "--once", "--config", str(config)), 78, "is not a usable PKCS#11 library")


def test_duplicate_key_labels(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    with open_token(token.settings(), token.pin) as session:
        for key_id in (b"\x01", b"\x02"):
            session.generate_keypair(KeyType.RSA, 2048, label=KEY_LABEL, id=key_id, store=True)
    config = _config(emulator, tmp_path / "device", token)
    _fails(_run(token, "--once", "--config", str(config)), 78, f"2 private keys with label '{KEY_LABEL}'")


def test_key_deleted_from_the_token_after_provisioning(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", token, "--serial", "hsm-deleted")
    assert _run(token, "--once", "--config", str(config)).returncode == 0
    with open_token(token.settings(), token.pin) as session:
        for key in session.get_objects({Attribute.LABEL: KEY_LABEL}):
            key.destroy()
    _fails(_run(token, "--once", "--config", str(config)), 78, f"no private key with label '{KEY_LABEL}'")


def test_mechanism_unsupported(emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rsa_only = make_token(
        tmp_path / "hsm", monkeypatch, mechanisms=["CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_SHA256_RSA_PKCS"]
    )
    config = _config(emulator, tmp_path / "device", rsa_only, "--key-type", "ec-p256")
    _fails(_run(rsa_only, "--once", "--config", str(config)), 78, "EC_KEY_PAIR_GEN", "rsa-2048")


def test_create_keys_cannot_use_the_token(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    config = _config(emulator, tmp_path / "device", token, "--method", "create-keys")
    _fails(_run(token, "check-config", "--config", str(config)), 78, "create-keys", "pkcs11")


# -- the claim key in the token too ------------------------------------------------------------------------


@pytest.fixture
def claim_in_token(emulator: Emulator, token: SoftToken, tmp_path: Path) -> Iterator[Path]:
    """A device config whose claim key is imported into the token and named by a pkcs11: URI."""
    config = _config(emulator, tmp_path / "device", token, "--serial", "hsm-claim")
    settings = yaml.safe_load(config.read_text())
    claim_key = Path(settings["claim"]["private_key"])
    subprocess.run(
        ["softhsm2-util", "--import", str(claim_key), "--token", token.label, "--label", "claim-key",
         "--id", "c1a1", "--pin", token.pin],
        check=True, capture_output=True,
    )  # fmt: skip
    claim_uri = "pkcs11:token=fleetprov;object=claim-key;type=private"
    _edit(config, lambda s: s["claim"].update(private_key=claim_uri, client_id="fleetprov.claim-hsm"))
    yield config


def test_claim_key_in_the_token(emulator: Emulator, token: SoftToken, claim_in_token: Path, tmp_path: Path) -> None:
    result = _run(token, "--once", "--config", str(claim_in_token))
    assert result.returncode == 0, result.stderr
    with open_token(token.settings(), token.pin) as session:
        labels = sorted(k[Attribute.LABEL] for k in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    assert labels == ["claim-key", KEY_LABEL]
    assert "client 'fleetprov.claim-hsm' connected: claim certificate" in emulator.log(), emulator.log()[-3000:]


def test_wrong_pin_when_already_provisioned(emulator: Emulator, token: SoftToken, tmp_path: Path) -> None:
    """The verify of an existing identity goes through awscrt alone: its PKCS#11 errors are translated too."""
    config = _config(emulator, tmp_path / "device", token, "--serial", "hsm-verify-pin")
    assert _run(token, "--once", "--config", str(config)).returncode == 0
    (tmp_path / "device" / "pkcs11-pin").write_text("wrong-pin-4321\n")
    result = _run(token, "--once", "--config", str(config))
    _fails(result, 78, "the PIN was refused by token 'fleetprov'")
    assert "wrong-pin-4321" not in result.stdout + result.stderr
    assert (tmp_path / "device" / "state" / "current").is_symlink()  # the identity is kept


def test_device_config_for_a_token_needs_its_flags(emulator: Emulator, tmp_path: Path) -> None:
    result = fleetprov("emulator", "device-config", "--state-dir", str(emulator.state_dir), "--key-backend", "pkcs11")
    assert result.returncode == 78, result.stderr
    assert "--key-backend pkcs11 needs --pkcs11-library, --token-label, --pin-file" in result.stderr
