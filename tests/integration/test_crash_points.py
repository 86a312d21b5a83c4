"""Kill -9 `fleetprov --once` at every step boundary and in the middle of writing files, then prove recovery.

Each scenario runs fleetprov three times on a fresh device:

1. with ``FLEETPROV_CRASH_AT=<point>``: the process SIGKILLs itself there (returncode -9; a point that is
   never reached fails the test);
2. without it: the rerun finishes the job (exit 0);
3. once more: "already provisioned; verified" and no new certificate.

Then: exactly one committed generation, ``current`` pointing at it, its files parse and its key matches its
certificate; nothing else in the state directory (no staging, temporary, journal or removing leftovers);
``fleetprov status --json`` says provisioned; the emulator's registry holds no more orphaned certificates
(device certificates of this device that are not ACTIVE and attached to a thing) than the point allows.

A real external ``kill -9`` (not the crash seam) is exercised too, against an emulator whose replies are slow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_once import _check_stored_identity
from tests.support import Emulator, device_config, fleetprov

GENERATION_FILES = {"certificate.pem", "private.key", "manifest.json", "device-config.json", "identity.json"}
STATE_ENTRIES = {"lock", "last-run.json", "generations", "current"}


@dataclass(frozen=True)
class Point:
    """One crash scenario: where fleetprov dies and what a correct recovery looks like."""

    at: str  # the FLEETPROV_CRASH_AT value
    method: str  # "csr" or "create-keys"
    exercises: str  # what the point actually interrupts (shown in the test id's docs and in failures)
    journal_written: bool  # a journal is on disk at the crash: the rerun must say it resumes
    max_orphans: int  # certificates the crash may lose (issued by the service, never heard of by the journal)
    certificate_journalled: bool  # the journal holds the issued certificate: the rerun must not ask for another
    finished: bool = False  # the crashed run had already provisioned: the rerun only verifies


def _csr(at: str, exercises: str, *, journal: bool = True, orphans: int = 0, issued: bool = False) -> Point:
    return Point(at, "csr", exercises, journal, orphans, issued)


def _keys(at: str, exercises: str, *, journal: bool = True, orphans: int = 0, issued: bool = False) -> Point:
    return Point(at, "create-keys", exercises, journal, orphans, issued)


POINTS = [
    # -- CreateCertificateFromCsr ------------------------------------------------------------------------
    _csr("after-start", "journal 'started' saved, staging dir empty, before the key is made"),
    _csr("mid-write:private.key", "device key half-written in staging (O_EXCL, no temp file), journal 'started'"),
    _csr("after-key", "key in staging and journal 'key-ready', before any network call"),
    # mid-write:<file> fires on the FIRST write of that file. For journal.json that is the 'started' journal;
    # the later journal writes (key-ready, issued, registered) are replaced atomically the same
    # way but cannot be singled out: the step-boundary points around them cover the states they leave.
    _csr(
        "mid-write:journal.json",
        "the FIRST journal write ('started') half-written in its temp file: no journal, an unnamed staging dir",
        journal=False,
    ),
    _csr(
        "after-issue-reply",
        "CreateCertificateFromCsr answered, journal still 'key-ready': the issued certificate is lost",
        orphans=1,
    ),
    _csr("after-issued", "journal 'issued' (certificate, token, deadline), before RegisterThing", issued=True),
    _csr(
        "after-register-reply",
        "RegisterThing accepted, journal still 'issued': the rerun repeats RegisterThing with the same token",
        issued=True,
    ),
    _csr("after-registered", "journal 'registered', before the generation is written", issued=True),
    _csr("mid-write:certificate.pem", "certificate.pem half-written in staging, journal 'registered'", issued=True),
    _csr("mid-write:device-config.json", "device-config.json half-written in staging", issued=True),
    _csr("mid-write:manifest.json", "manifest.json half-written in staging", issued=True),
    _csr("mid-write:identity.json", "identity.json half-written in staging", issued=True),
    _csr("before-verify", "staging complete, journal 'registered', before the new identity connects", issued=True),
    _csr("before-commit", "the new identity connected from staging, not yet renamed to generations/<n>", issued=True),
    _csr(
        "after-commit", "generations/1 and current published, the journal ('registered') not yet removed", issued=True
    ),
    # Beyond the brief's list: the last write of a run, after provisioning succeeded (the rerun only verifies).
    Point(
        "mid-write:last-run.json",
        "csr",
        "provisioned and journal removed; last-run.json (for `status`) half-written in its temp file",
        journal_written=False,
        max_orphans=0,
        certificate_journalled=True,
        finished=True,
    ),
    # -- CreateKeysAndCertificate (no device key step: after-key and the staging files written from the
    #    journal behave as for csr and are not repeated) ---------------------------------------------------
    _keys("after-start", "journal 'started', before any network call"),
    _keys(
        "mid-write:journal.json",
        "the FIRST journal write ('started') half-written in its temp file: no journal",
        journal=False,
    ),
    _keys(
        "after-issue-reply",
        "CreateKeysAndCertificate answered, nothing saved: the certificate and its key are lost",
        orphans=1,
    ),
    _keys(
        "mid-write:private.key",
        "the service's private key half-written to staging, journal 'started': the certificate is lost",
        orphans=1,
    ),
    _keys("after-issued", "journal 'issued', service key in staging, before RegisterThing", issued=True),
    _keys("after-register-reply", "RegisterThing accepted, journal still 'issued'", issued=True),
    _keys("after-registered", "journal 'registered'", issued=True),
    _keys("before-verify", "staging complete, not yet verified", issued=True),
    _keys("before-commit", "verified from staging, not yet committed", issued=True),
    _keys("after-commit", "committed and current, the journal not yet removed", issued=True),
]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(repr=False)
class Transcript:
    """Every run of one scenario, so that any failing assertion shows what fleetprov said."""

    runs: list[tuple[str, int, str, str]] = field(default_factory=list)

    def add(self, label: str, result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.runs.append((label, result.returncode, result.stdout, result.stderr))
        return result

    def __repr__(self) -> str:  # pytest shows arguments in tracebacks: the runs are in the message already
        return f"Transcript({len(self.runs)} runs)"

    def __str__(self) -> str:
        return "\n".join(
            f"--- {label}: exit {code}\nstdout:\n{out}\nstderr:\n{err}" for label, code, out, err in self.runs
        )


def _device_certificates(emulator: Emulator) -> dict[str, dict[str, Any]]:
    return {c["certificateId"]: c for c in emulator.admin("certificates") if c["kind"] == "device"}


def _is_orphan(certificate: dict[str, Any]) -> bool:
    return not (certificate["status"] == "ACTIVE" and certificate["things"])


def _state_leftovers(state: Path) -> list[str]:
    """Everything under the state directory that a finished run must not leave (an allow-list)."""
    leftovers = [name for name in os.listdir(state) if name not in STATE_ENTRIES]
    generations = state / "generations"
    for number in os.listdir(generations):
        generation = generations / number
        if generation.is_dir():
            leftovers += [f"generations/{number}/{n}" for n in os.listdir(generation) if n not in GENERATION_FILES]
    return sorted(leftovers)


def _check_recovered(
    emulator: Emulator,
    config: Path,
    serial: str,
    before: dict[str, dict[str, Any]],
    max_orphans: int,
    transcript: Transcript,
) -> None:
    """The rerun has finished: one intact committed generation, nothing stray, a quiet third run, the registry."""
    state = config.parent / "state"
    generations = sorted(os.listdir(state / "generations"))
    assert generations == ["1"], f"expected exactly one committed generation, got {generations}\n{transcript}"
    assert os.readlink(state / "current") == "generations/1", str(transcript)
    manifest = _check_stored_identity(emulator, state)
    thing = f"fleetprov-{serial}"
    assert manifest["thing_name"] == thing, str(transcript)
    # The explicit patterns the brief names, then the allow-list that catches anything else.
    stray = sorted(
        {
            str(path.relative_to(state))
            for pattern in ("staging-*", "**/.*.tmp-*", "current.tmp-*", "journal.json", "removing-*")
            for path in state.glob(pattern)
        }
    )
    assert not stray, f"stray files in {state}: {stray}\n{transcript}"
    leftovers = _state_leftovers(state)
    assert not leftovers, f"unexpected entries in {state}: {leftovers}\n{transcript}"

    after_rerun = _device_certificates(emulator)
    third = transcript.add("third run", fleetprov("--once", "--config", str(config)))
    assert third.returncode == 0, str(transcript)
    assert "verify: ok" in third.stderr, str(transcript)  # the stored identity connects
    assert f"already provisioned; verified: thing {thing}, certificate {manifest['certificate_id']}" in third.stdout, (
        str(transcript)
    )
    after = _device_certificates(emulator)
    assert after.keys() == after_rerun.keys(), f"the third run created a certificate\n{transcript}"

    status = transcript.add("status --json", fleetprov("status", "--json", "--config", str(config)))
    assert status.returncode == 0, str(transcript)
    report = json.loads(status.stdout)
    assert report["provisioned"] is True, str(transcript)
    assert (report["thing_name"], report["certificate_id"], report["generation"]) == (
        thing,
        manifest["certificate_id"],
        1,
    ), str(transcript)
    assert report["key_backend"] == "file" and report["last_run"]["exit_code"] == 0, str(transcript)

    new = {cid: cert for cid, cert in after.items() if cid not in before}
    stored = new.get(manifest["certificate_id"])
    assert stored is not None, f"the stored certificate is not one this scenario created\n{transcript}"
    assert (stored["status"], stored["things"]) == ("ACTIVE", [thing]), str(transcript)
    orphans = {cid: (c["status"], c["things"]) for cid, c in new.items() if _is_orphan(c)}
    assert len(orphans) <= max_orphans, (
        f"{len(orphans)} orphaned certificate(s), at most {max_orphans} allowed: {orphans}\n{transcript}"
    )
    # The only certificates this device got are the stored one and the allowed orphans.
    assert set(new) == {manifest["certificate_id"], *orphans}, str(transcript)


@pytest.mark.parametrize("point", POINTS, ids=[f"{p.method}-{p.at}" for p in POINTS])
def test_kill_at_crash_point_then_rerun_recovers(emulator: Emulator, tmp_path: Path, point: Point) -> None:
    serial = _slug(f"crash-{point.method}-{point.at}")
    config = device_config(emulator, tmp_path / "device", "--method", point.method, "--serial", serial)
    transcript = Transcript()
    before = _device_certificates(emulator)

    crashed = transcript.add(
        f"crash at {point.at} ({point.exercises})",
        fleetprov("--once", "--config", str(config), env={"FLEETPROV_CRASH_AT": point.at}),
    )
    assert crashed.returncode == -signal.SIGKILL, f"the crash point {point.at} was not reached\n{transcript}"
    state = tmp_path / "device" / "state"
    assert (state / "journal.json").exists() == point.journal_written, (
        f"journal.json {'missing' if point.journal_written else 'present'} after the crash\n{transcript}"
    )

    at_crash = _device_certificates(emulator) if point.certificate_journalled else {}
    rerun = transcript.add("rerun", fleetprov("--once", "--config", str(config)))
    assert rerun.returncode == 0, str(transcript)
    verb = "already provisioned; verified" if point.finished else "provisioned"
    assert f"\n{verb}: thing fleetprov-{serial}" in f"\n{rerun.stdout}", str(transcript)
    if point.journal_written:
        assert "resuming the interrupted run" in rerun.stderr, str(transcript)
    if point.certificate_journalled:
        created = set(_device_certificates(emulator)) - set(at_crash)
        assert not created, f"the resumed run created certificate(s) {created}\n{transcript}"

    _check_recovered(emulator, config, serial, before, point.max_orphans, transcript)


def _run_until(
    args: list[str], markers: tuple[str, ...], timeout: float
) -> tuple[subprocess.Popen[bytes], list[str], threading.Thread]:
    """Start fleetprov; return once a line of its stderr contains one of ``markers`` (stderr keeps being read)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetprov", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for raw in iter(process.stderr.readline, b""):
            line = raw.decode(errors="replace")
            lines.append(line)
            if any(marker in line for marker in markers):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not seen.wait(timeout):
        process.kill()
        process.wait(10)
        reader.join(10)
        raise AssertionError(f"fleetprov never logged any of {markers}:\n{''.join(lines)}")
    return process, lines, reader


@pytest.mark.parametrize(
    ("marker", "stages", "exercises"),
    [
        # "connect: ok" is logged just before CreateCertificateFromCsr is sent; its reply takes 2 s, so the
        # kill lands while the request is in flight (journal 'key-ready'): the certificate may be lost.
        ("connect: ok", ("key-ready",), "kill -9 during CreateCertificateFromCsr"),
        # "create-certificate: ok" comes right before the 'issued' journal write and RegisterThing (2 s reply):
        # the kill almost always lands with the certificate journalled and RegisterThing in flight (possibly
        # done by the service); should it beat the journal write, the stage is still 'key-ready'.
        ("create-certificate: ok", ("key-ready", "issued"), "kill -9 during RegisterThing"),
    ],
    ids=["during-create-certificate", "during-register-thing"],
)
def test_external_kill_9_then_rerun_recovers(
    emulator_with: Any, tmp_path: Path, marker: str, stages: tuple[str, ...], exercises: str
) -> None:
    emulator = emulator_with("--reply-delay", "2")
    serial = _slug(f"kill9-{marker}")
    config = device_config(emulator, tmp_path / "device", "--serial", serial)
    transcript = Transcript()
    before = _device_certificates(emulator)

    process, lines, reader = _run_until(["--once", "--config", str(config)], (marker,), timeout=30)
    os.kill(process.pid, signal.SIGKILL)
    returncode = process.wait(10)
    reader.join(10)
    transcript.runs.append((f"{exercises} (after {marker!r})", returncode, "", "".join(lines)))
    assert returncode == -signal.SIGKILL, f"fleetprov had finished before the kill\n{transcript}"
    state = tmp_path / "device" / "state"
    assert (state / "journal.json").exists(), f"no journal after a kill past the key step\n{transcript}"
    journal = json.loads((state / "journal.json").read_text())
    assert journal["stage"] in stages, str(transcript)
    # Killed before the journal recorded a certificate: the service may have issued one that is now lost.
    max_orphans = 0 if journal["stage"] == "issued" else 1

    at_kill = _device_certificates(emulator)
    rerun = transcript.add("rerun", fleetprov("--once", "--config", str(config)))
    assert rerun.returncode == 0, str(transcript)
    assert f"resuming the interrupted run (stage {journal['stage']})" in rerun.stderr, str(transcript)
    if journal["stage"] == "issued":
        created = set(_device_certificates(emulator)) - set(at_kill)
        assert not created, f"the resumed run created certificate(s) {created}\n{transcript}"

    _check_recovered(emulator, config, serial, before, max_orphans, transcript)
