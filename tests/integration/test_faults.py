"""`fleetprov --once` against network and service faults, each a real emulator process with a fault knob and
a real fleetprov process: the broker closing the connection at each request, replies slower than the
operation timeout, throttling, an ownership token that expires during an outage, forced 5xx and 400/403.

Every scenario checks the exit status, what stderr says, what is stored (or kept in the journal to resume
from) and what the registry holds: a device ends with one valid identity, and the orphaned certificates are
exactly those the scenario explains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

from tests.support import Emulator, device_config, fleetprov, start_emulator

# Short retry settings: a scenario that cannot succeed gives up in seconds, not in the default 10 minutes.
FAST_RETRY = {"initial_delay": 0.1, "max_delay": 0.5, "budget": 8, "max_attempts": 10}
RESUMED_KEY_READY = "resuming the interrupted run (stage key-ready)"
RESUMED_ISSUED = "resuming the interrupted run (stage issued)"


def _edit(config: Path, change: Callable[[dict[str, Any]], None]) -> None:
    settings = yaml.safe_load(config.read_text())
    change(settings)
    config.write_text(yaml.safe_dump(settings))


def _device(emulator: Emulator, directory: Path, serial: str, **settings: Any) -> Path:
    """A device configuration for ``emulator`` with the fast retry policy and ``settings`` on top."""
    config = device_config(emulator, directory, "--serial", serial)
    _edit(config, lambda s: s.update({"retry": dict(FAST_RETRY), **settings}))
    return config


def _point_at(config: Path, emulator: Emulator) -> None:
    """A restarted emulator listens on a new port: the device follows it."""
    _edit(config, lambda s: s.update(port=emulator.port))


def _device_certificates(emulator: Emulator) -> list[dict[str, Any]]:
    return [c for c in emulator.admin("certificates") if c["kind"] == "device"]


def _restart_and_resume(
    restart: Callable[[Emulator], Emulator], emulator: Emulator, config: Path, resumed: str
) -> tuple[Emulator, subprocess.CompletedProcess[str]]:
    """The emulator back (on a new port), and the device's rerun, which resumes the interrupted run."""
    emulator = restart(emulator)
    _point_at(config, emulator)
    again = fleetprov("--once", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert resumed in again.stderr
    return emulator, again


def _journal(state: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((state / "journal.json").read_text())
    return document


def _openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], check=True, capture_output=True, text=True).stdout


def _one_identity(emulator: Emulator, state: Path, thing: str) -> dict[str, Any]:
    """Exactly one committed generation, published as ``current``, whose key matches its certificate, which
    chains to the emulator's CA and which the registry has ACTIVE for ``thing``; nothing left over."""
    current = state / "current"
    assert current.is_symlink() and os.readlink(current).startswith("generations/")
    assert len(list(state.glob("generations/*"))) == 1
    generation = current.resolve()
    key, cert = generation / "private.key", generation / "certificate.pem"
    assert _openssl("x509", "-in", str(cert), "-noout", "-pubkey") == _openssl("pkey", "-in", str(key), "-pubout")
    issuing = emulator.root_ca.parent / "issuing-ca.pem"
    assert ": OK" in _openssl("verify", "-CAfile", str(emulator.root_ca), "-untrusted", str(issuing), str(cert))
    manifest: dict[str, Any] = json.loads((generation / "manifest.json").read_text())
    assert manifest["thing_name"] == thing
    [registered] = [c for c in _device_certificates(emulator) if c["certificateId"] == manifest["certificate_id"]]
    assert registered["status"] == "ACTIVE" and registered["things"] == [thing]
    assert not (state / "journal.json").exists()
    assert not list(state.glob("staging-*")) and not list(state.glob("**/*.tmp-*"))
    return manifest


def _nothing_stored(state: Path) -> None:
    assert not (state / "current").exists()
    assert not list(state.glob("generations/*"))
    assert not list(state.glob("staging-*"))
    assert not (state / "journal.json").exists()


def _closes_by_knob(emulator: Emulator) -> int:
    return emulator.log().count("fault knob close_after_messages")


@pytest.fixture
def restart() -> Iterator[Callable[[Emulator], Emulator]]:
    """Stop an emulator and start it again on the same state directory, without its fault knobs."""
    started: list[Emulator] = []

    def again(emulator: Emulator) -> Emulator:
        assert emulator.stop() == 0, emulator.log()
        running = start_emulator(emulator.state_dir)
        started.append(running)
        return running

    yield again
    for running in started:
        running.stop()


# -- the broker closing the connection at each request --------------------------------------------------
#
# The device publishes CreateCertificateFromCsr (1st) and RegisterThing (2nd) on its claim connection; the
# verify connection publishes nothing. --close-after N closes every connection at its N+1th publish,
# unanswered. awscrt's MQTT 3.1.1 connection reconnects by itself after about 5 s, and its request-response
# client then fails the request (AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE); with an operation
# timeout under 5 s the request times out first (AWS_ERROR_MQTT_REQUEST_RESPONSE_TIMEOUT). Both are a lost
# connection: transient, retried on a fresh connection, exit 75 when the budget runs out.


@pytest.mark.parametrize(
    "operation_timeout",
    [
        pytest.param(None, id="default-timeout"),  # 30 s: awscrt reconnects within the attempt
        pytest.param(2, id="timeout-2s"),  # the request times out before awscrt reconnects
    ],
)
def test_close_at_the_first_request_never_succeeds_then_resumes(
    emulator_with: Any, restart: Any, tmp_path: Path, operation_timeout: Optional[int]
) -> None:
    emulator = emulator_with("--close-after", "0")
    extra = {} if operation_timeout is None else {"operation_timeout": operation_timeout}
    config = _device(emulator, tmp_path / "device", "close0", **extra)
    state = tmp_path / "device" / "state"
    result = fleetprov("--once", "--config", str(config))
    # Every connection is closed at CreateCertificateFromCsr: it can never succeed.
    assert result.returncode == 75, result.stderr
    assert "fleetprov: create-certificate: gave up after" in result.stderr, result.stderr
    assert "retrying in" in result.stderr
    assert "Traceback" not in result.stderr
    attempts = result.stderr.count("connect: ok")
    assert attempts >= 2 and _closes_by_knob(emulator) == attempts
    # The close comes before the request is handled: nothing was issued. The journal keeps the key.
    assert _device_certificates(emulator) == []
    journal = _journal(state)
    assert journal["stage"] == "key-ready"
    key = (state / journal["staging"] / "private.key").read_bytes()
    assert not (state / "current").exists()

    emulator, again = _restart_and_resume(restart, emulator, config, RESUMED_KEY_READY)
    assert "retrying in" not in again.stderr
    _one_identity(emulator, state, "fleetprov-close0")
    assert (state / "current" / "private.key").read_bytes() == key
    assert len(_device_certificates(emulator)) == 1


def test_close_at_register_thing_completes_on_a_fresh_connection(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with("--close-after", "1")
    config = _device(emulator, tmp_path / "device", "close1")
    state = tmp_path / "device" / "state"
    result = fleetprov("--once", "--config", str(config))
    # RegisterThing is the 2nd publish of the first connection (closed) and the 1st of the next one (answered).
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("retrying in") == 1
    assert "register-thing: failed after" in result.stderr
    assert result.stderr.count("create-certificate: ok") == 1
    assert _closes_by_knob(emulator) == 1
    manifest = _one_identity(emulator, state, "fleetprov-close1")
    # RegisterThing was retried with the same ownership token: one certificate, no orphan.
    [certificate] = _device_certificates(emulator)
    assert certificate["certificateId"] == manifest["certificate_id"]


def test_close_after_two_requests_is_never_reached(emulator_with: Any, restart: Any, tmp_path: Path) -> None:
    emulator = emulator_with("--close-after", "2")
    config = _device(emulator, tmp_path / "device", "close2")
    state = tmp_path / "device" / "state"
    result = fleetprov("--once", "--config", str(config))
    # A device publishes two requests per claim connection, and none on the verify connection.
    assert result.returncode == 0, result.stderr
    assert "retrying in" not in result.stderr
    assert _closes_by_knob(emulator) == 0
    manifest = _one_identity(emulator, state, "fleetprov-close2")

    emulator = restart(emulator)
    _point_at(config, emulator)
    again = fleetprov("--once", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "already provisioned; verified" in again.stdout
    [certificate] = _device_certificates(emulator)
    assert certificate["certificateId"] == manifest["certificate_id"]


def test_close_at_register_thing_on_the_last_attempt_keeps_the_certificate(
    emulator_with: Any, restart: Any, tmp_path: Path
) -> None:
    """The run ends while the certificate is issued but not registered: the journal keeps the certificate
    and its token, and the next run registers that certificate instead of asking for another."""
    emulator = emulator_with("--close-after", "1")
    config = _device(emulator, tmp_path / "device", "close1-last", retry={**FAST_RETRY, "max_attempts": 1})
    state = tmp_path / "device" / "state"
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 75, result.stderr
    assert "fleetprov: register-thing: gave up after 1 attempts" in result.stderr, result.stderr
    journal = _journal(state)
    assert journal["stage"] == "issued"
    [issued] = _device_certificates(emulator)
    assert issued["certificateId"] == journal["certificate_id"] and issued["status"] == "PENDING_ACTIVATION"

    emulator, again = _restart_and_resume(restart, emulator, config, RESUMED_ISSUED)
    assert "create-certificate" not in again.stderr
    manifest = _one_identity(emulator, state, "fleetprov-close1-last")
    assert manifest["certificate_id"] == journal["certificate_id"]
    assert len(_device_certificates(emulator)) == 1


# -- replies slower than the operation timeout ----------------------------------------------------------


def test_replies_delayed_beyond_the_timeout(emulator_with: Any, restart: Any, tmp_path: Path) -> None:
    """Each attempt's CreateCertificateFromCsr is handled at once (a certificate is issued) but answered 3 s
    later, after the device gave up waiting: every attempt orphans one certificate, 3 attempts 3 orphans."""
    emulator = emulator_with("--reply-delay", "3")
    config = _device(
        emulator,
        tmp_path / "device",
        "slow",
        operation_timeout=1,
        retry={"initial_delay": 0.1, "max_delay": 0.5, "budget": 60, "max_attempts": 3},
    )
    state = tmp_path / "device" / "state"
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 75, result.stderr
    assert "fleetprov: create-certificate: gave up after 3 attempts" in result.stderr, result.stderr
    assert result.stderr.count("no reply: AWS_ERROR_MQTT_REQUEST_RESPONSE_TIMEOUT") >= 3
    assert result.stderr.count("retrying in") == 2
    journal = _journal(state)
    assert journal["stage"] == "key-ready"
    key = (state / journal["staging"] / "private.key").read_bytes()
    orphans = _device_certificates(emulator)
    assert len(orphans) == 3
    assert all(c["status"] == "PENDING_ACTIVATION" and c["things"] == [] for c in orphans)

    emulator, _ = _restart_and_resume(restart, emulator, config, RESUMED_KEY_READY)
    manifest = _one_identity(emulator, state, "fleetprov-slow")
    assert (state / "current" / "private.key").read_bytes() == key
    certificates = _device_certificates(emulator)
    assert len(certificates) == 4
    assert {c["certificateId"] for c in certificates if c["status"] == "PENDING_ACTIVATION"} == {
        c["certificateId"] for c in orphans
    }
    assert manifest["certificate_id"] not in {c["certificateId"] for c in orphans}


# -- throttling -----------------------------------------------------------------------------------------

HERD = 6


def test_throttled_devices_all_provision(emulator_with: Any, tmp_path: Path) -> None:
    """6 devices at once against 1 request/s: 12 requests need at least 11 s; everyone backs off and gets there."""
    emulator = emulator_with("--throttle", "1")
    configs = []
    for index in range(HERD):
        config = _device(
            emulator,
            tmp_path / f"device{index}",
            f"herd{index}",
            retry={"initial_delay": 0.5, "max_delay": 4, "budget": 120, "max_attempts": 100},
        )
        # Devices on one machine share their facts: give each its own claim client id, as real devices have.
        _edit(config, lambda s, i=index: s["claim"].update(client_id=f"fleetprov.claim-herd-{i}"))
        configs.append(config)
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "fleetprov", "--once", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for config in configs
    ]
    outputs = [process.communicate(timeout=150) for process in processes]
    makespan = time.monotonic() - started
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert "gave up" not in stderr
    throttled = [stderr for _, stderr in outputs if "429 ThrottlingException" in stderr and "retrying in" in stderr]
    assert throttled, "no device was throttled"
    assert makespan >= (2 * HERD - 1) / 1.0 * 0.9  # 12 requests at 1/s (a little slack for the window edges)
    for index in range(HERD):
        _one_identity(emulator, tmp_path / f"device{index}" / "state", f"fleetprov-herd{index}")
    # Throttled RegisterThing calls were retried with the same token: one certificate per device.
    assert len(_device_certificates(emulator)) == HERD
    # A 429 is an answer: the retries reuse the claim connection instead of reconnecting (and racing their own
    # client id): one claim connection per device, however often it was throttled.
    log = emulator.log()
    for index in range(HERD):
        assert log.count(f"client 'fleetprov.claim-herd-{index}' connected: claim") == 1, index


# -- the ownership token expiring during an outage ------------------------------------------------------


def test_ownership_token_expired_during_an_outage(emulator_with: Any, tmp_path: Path) -> None:
    """Killed right after the certificate was issued; back after the token expired. fleetprov assumes AWS's
    one hour, so it tries RegisterThing with the saved token, the service refuses it, and fleetprov abandons
    that certificate and starts over with a new one."""
    emulator = emulator_with("--token-ttl", "3")
    config = _device(emulator, tmp_path / "device", "outage")
    state = tmp_path / "device" / "state"
    killed = fleetprov("--once", "--config", str(config), env={"FLEETPROV_CRASH_AT": "after-issued"})
    assert killed.returncode == -9, killed.stderr
    journal = _journal(state)
    assert journal["stage"] == "issued"
    abandoned = journal["certificate_id"]
    assert [c["certificateId"] for c in _device_certificates(emulator)] == [abandoned]
    time.sleep(4)  # the outage: longer than the emulator's 3 s token lifetime

    again = fleetprov("--once", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert RESUMED_ISSUED in again.stderr
    assert "the service refused the ownership token" in again.stderr
    assert "starting over with a new certificate" in again.stderr
    assert f"abandoned: certificate {abandoned}" in again.stdout
    manifest = _one_identity(emulator, state, "fleetprov-outage")
    assert manifest["certificate_id"] != abandoned
    status = fleetprov("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["last_run"]["exit_code"] == 0
    assert report["last_run"]["abandoned_certificates"] == [abandoned]
    assert report["certificate_id"] == manifest["certificate_id"]
    # The emulator deletes a certificate whose token expired unused, as AWS does.
    deadline = time.monotonic() + 10
    while abandoned in {c["certificateId"] for c in _device_certificates(emulator)}:
        assert time.monotonic() < deadline, "the abandoned certificate is still in the registry"
        time.sleep(0.5)
    assert [c["certificateId"] for c in _device_certificates(emulator)] == [manifest["certificate_id"]]


# -- forced 5xx and 400/403 -----------------------------------------------------------------------------


def test_forced_5xx_is_retried_with_the_same_certificate(emulator_with: Any, tmp_path: Path) -> None:
    emulator = emulator_with("--reject", "RegisterThing:2:500:InternalFailure")
    config = _device(emulator, tmp_path / "device", "five-hundred")
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("retrying in") == 2
    assert "register-thing: rejected: 500 InternalFailure: rejected by an emulator fault knob" in result.stderr
    assert result.stderr.count("create-certificate: ok") == 1
    manifest = _one_identity(emulator, tmp_path / "device" / "state", "fleetprov-five-hundred")
    [certificate] = _device_certificates(emulator)
    assert certificate["certificateId"] == manifest["certificate_id"]


@pytest.mark.parametrize(
    ("reject", "step", "issued"),
    [
        ("CreateCertificateFromCsr:1:403:AccessDenied", "create-certificate", 0),
        ("RegisterThing:1:400:InvalidParameters", "register-thing", 1),
    ],
)
def test_forced_4xx_exits_77_at_once(emulator_with: Any, tmp_path: Path, reject: str, step: str, issued: int) -> None:
    emulator = emulator_with("--reject", reject)
    _, _, status_code, error_code = reject.split(":")
    config = _device(emulator, tmp_path / "device", "refused")
    state = tmp_path / "device" / "state"
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == 77, result.stderr
    assert "retrying in" not in result.stderr
    assert "Traceback" not in result.stderr
    final = result.stderr.strip().splitlines()[-1]
    assert final.startswith(f"fleetprov: {step}: rejected: {status_code} {error_code}: "), final
    assert "rejected by an emulator fault knob" in final  # AWS's errorMessage
    _nothing_stored(state)
    certificates = _device_certificates(emulator)
    assert len(certificates) == issued
    for certificate in certificates:
        # Refused after the certificate was issued: it is orphaned, and the message says which one.
        assert certificate["status"] == "PENDING_ACTIVATION"
        assert f"certificate {certificate['certificateId']}, issued to this device, is abandoned" in final, final
