"""Wall time and peak RSS of `fleetprov --once` (file or PKCS#11 key) vs a minimal awsiotsdk script, same exchanges.

What it does:

1. starts one local emulator for the whole benchmark (``fleetprov.emulator.launch.launch`` on a temporary
   state directory; stopped at the end in every case);
2. for every run, writes a FRESH device config with ``fleetprov emulator device-config`` (a new
   ``--serial`` and a new, empty device state directory), so every run really provisions a new thing;
   for (c), first a fresh SoftHSM2 token of the run's own (``<run>/softhsm2.conf``, ``<run>/tokens``,
   ``softhsm2-util --init-token --free --label fleetprov``, the PIN in ``<run>/pin``, mode 0600), so the
   token holds no key yet, as on a first boot; then ``device-config --key-backend pkcs11
   --pkcs11-library /usr/lib/softhsm/libsofthsm2.so --token-label fleetprov --pin-file <run>/pin``
   (the README's user path). Making the token and the config is preparation: it is not measured;
3. runs, each as its own process:

   (a) ``python -m fleetprov --once --config <config>``: connect with the claim, key + CSR,
       CreateCertificateFromCsr, check, RegisterThing, store (fsync'd generation), reconnect as the thing;
   (b) ``python benchmarks/minimal_provision.py <config>``: the same exchanges with nothing but awsiotsdk,
       cryptography and PyYAML (no retries, no checks, plain writes): the baseline;
   (c) "fleetprov-pkcs11": (a) with the device key in the PKCS#11 token (``SOFTHSM2_CONF`` in the child's
       environment): the token makes the key and signs the CSR (the ``key`` step), and the verify
       connection goes through the token (awscrt's PKCS#11 support). ``--no-pkcs11`` leaves it out;

   one warm-up run of each first (not counted: it fills the bytecode cache and the page cache), then
   ``--runs`` runs of each, alternating in ABBA order, extended to three kinds as a c b, b c a, a c b, ...
   (a b, b a, ... with ``--no-pkcs11``), so that machine noise and drift spread evenly: over each two
   rounds every kind has the same mean position;
4. measures each child like ``/usr/bin/time -v``: wall time = ``time.monotonic()`` from just before the
   fork to the return of ``os.wait4`` on the child; peak RSS = the ``ru_maxrss`` (KiB) that ``os.wait4``
   returns for that child (the child and any children it waited for; neither run starts any here); CPU
   time = its ``ru_utime + ru_stime`` (shown for information: it varies less than wall time when other
   processes compete for the cores).

What it reports: median and min/max of wall time, peak RSS and CPU time for (a), (c) and (b); the ratio of
the medians of the wall times (a / b) and the difference of the medians of the peak RSS (a - b), each against
its target (issue 4: wall time within 1.3x, peak RSS within +10 MB = 10,000,000 bytes) as PASS or MISS; for
(c), for information only (no target): the wall time ratios c / b and c / a and the peak RSS difference
c - a; the median duration of each step of (a) and of (c) from their step lines (``connect: ok (0.12 s)``;
in (c), ``key`` is where the token makes the key and signs the CSR).

Bytecode: an installed fleetprov has its .pyc files (pip and Debian packages compile them), but a source
checkout run with ``PYTHONDONTWRITEBYTECODE=1`` recompiles every fleetprov module in every process (~45 ms
here), which the baseline (one small script) hardly pays. So the children run with their own bytecode cache
(``PYTHONPYCACHEPREFIX`` in the temporary directory, ``PYTHONDONTWRITEBYTECODE`` removed), filled by the
warm-up runs: nothing is written into the source tree. ``--no-bytecode-cache`` runs them with
``PYTHONDONTWRITEBYTECODE=1`` instead, to see what compiling costs.

Bounded: each child is killed after ``--timeout`` seconds (default 60), and no run starts after
``--max-seconds`` (default 900). The exit status is non-zero if any run failed (its stderr tail is printed),
``--max-seconds`` cut the runs short, the emulator did not start or a token could not be made (or SoftHSM2
is not installed: ``apt-get install softhsm2``, or ``--no-pkcs11``); a missed target alone is not a failure.

Run::

    .venv/bin/python benchmarks/provision_latency.py               # 7 runs of each
    .venv/bin/python benchmarks/provision_latency.py --runs 15 --json
    .venv/bin/python benchmarks/provision_latency.py --no-bytecode-cache   # modules compiled in every run
    .venv/bin/python benchmarks/provision_latency.py --no-pkcs11          # (a) and (b) only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from benchlib import positive_int, rounded, tail

from fleetprov.emulator.launch import RunningEmulator, launch

HERE = Path(__file__).resolve().parent
MINIMAL_SCRIPT = HERE / "minimal_provision.py"
WALL_TARGET_RATIO = 1.3
RSS_TARGET_BYTES = 10_000_000  # "within 10 MB"
MIB = 1024 * 1024
STDERR_TAIL_LINES = 25
# fleetprov's step lines, e.g. "2025-01-01 12:00:00,000 INFO fleetprov.claim: connect: ok (0.12 s)" (any
# fleetprov module; without the logger's name when $JOURNAL_STREAM is set).
STEP_LINE = re.compile(r"INFO (?:fleetprov[\w.]*: )?([a-z-]+): ok \(([0-9.]+) s\)$", re.MULTILINE)
PKCS11 = "fleetprov-pkcs11"
KINDS = ("fleetprov", PKCS11, "minimal")  # (a), (c), (b): the order of the table and of a round
# (c)'s token: SoftHSM2 (Debian package softhsm2), one token per run, as the README's walk-through makes it.
SOFTHSM2_LIBRARY = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN_LABEL = "fleetprov"
TOKEN_PIN = "1234"
TOKEN_SO_PIN = "5678"


# -- measuring one child process -------------------------------------------------------------------


@dataclass
class Run:
    kind: str  # "fleetprov", "fleetprov-pkcs11" or "minimal"
    index: int  # 0 = warm-up
    exit_code: Optional[int] = None
    wall_seconds: float = 0.0
    peak_rss_kib: int = 0
    cpu_seconds: float = 0.0  # user + system, from wait4 (less sensitive to other processes than wall time)
    timed_out: bool = False
    error: Optional[str] = None  # why the run counts as failed
    steps: dict[str, float] = field(default_factory=dict)  # fleetprov's step durations (seconds), (a) and (c)
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def measure(
    command: list[str], timeout: float, stdout_path: Path, stderr_path: Path, env: Optional[dict[str, str]] = None
) -> tuple[int, float, int, float, bool]:
    """Run ``command``; return (exit code, wall seconds, ru_maxrss KiB, CPU seconds, timed out).

    Killed after ``timeout``.

    The child is reaped with ``os.wait4`` alone (never Popen.wait/poll, which would reap it first); its exit is
    awaited on a pidfd, so the time-out needs no thread and no signal can reach a recycled pid.
    """
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        started = time.monotonic()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
    pidfd = os.pidfd_open(process.pid)
    try:
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
        except BaseException:  # Ctrl-C: leave no child behind
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.wait4(process.pid, 0)
            process.returncode = -signal.SIGKILL
            raise
        timed_out = not ready
        if timed_out:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
    finally:
        os.close(pidfd)
    process.returncode = os.waitstatus_to_exitcode(status)  # so that Popen never waits for it again
    return process.returncode, wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, timed_out


def softhsm2_util() -> str:
    """softhsm2-util's path (Debian package softhsm2), or RuntimeError."""
    path = shutil.which("softhsm2-util")
    if path is None or not SOFTHSM2_LIBRARY.is_file():
        raise RuntimeError(
            f"SoftHSM2 is not installed (softhsm2-util, {SOFTHSM2_LIBRARY}): apt-get install softhsm2, or --no-pkcs11"
        )
    return path


def child_environment(pycache: Path, bytecode_cache: bool) -> dict[str, str]:
    """The children's environment: their own bytecode cache, or none at all (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if bytecode_cache:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Bench:
    def __init__(self, args: argparse.Namespace, emulator: RunningEmulator, work: Path, deadline: float) -> None:
        self.args = args
        self.emulator = emulator
        self.work = work
        self.deadline = deadline
        self.tag = f"{os.getpid()}-{int(time.time())}"
        self.env = child_environment(work / "pycache", args.bytecode_cache)

    def device_config(self, name: str, options: tuple[str, ...] = (), env: Optional[dict[str, str]] = None) -> Path:
        """A fresh device: its own serial (thing name) and an empty state directory; ``options`` are more
        ``device-config`` options (the key backend)."""
        device = self.work / name
        device.mkdir(exist_ok=True)
        generated = subprocess.run(
            [sys.executable, "-m", "fleetprov", "emulator", "device-config", "--state-dir",
             str(self.emulator.state_dir), "--serial", f"bench-{self.tag}-{name}",
             "--state-dir-for-device", str(device / "state"), *options],
            capture_output=True, text=True, timeout=self.args.timeout, check=False, env=env or self.env,
        )  # fmt: skip
        if generated.returncode != 0:
            raise RuntimeError(f"fleetprov emulator device-config failed: {generated.stderr.strip()}")
        config = device / "config.yaml"
        config.write_text(generated.stdout)
        return config

    def token_device_config(self, name: str) -> tuple[Path, dict[str, str]]:
        """(c)'s fresh device: a fresh SoftHSM2 token with no key in it (as on a first boot) and a device config
        for it; returns the config and the environment (with ``SOFTHSM2_CONF``) to run fleetprov in."""
        device = self.work / name
        (device / "tokens").mkdir(parents=True)
        conf = device / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {device / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
        env = {**self.env, "SOFTHSM2_CONF": str(conf)}
        initialised = subprocess.run(
            [softhsm2_util(), "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", TOKEN_PIN,
             "--so-pin", TOKEN_SO_PIN],
            capture_output=True, text=True, timeout=self.args.timeout, check=False, env=env,
        )  # fmt: skip
        if initialised.returncode != 0:
            raise RuntimeError(
                f"softhsm2-util --init-token failed: {(initialised.stderr or initialised.stdout).strip()}"
            )
        pin = device / "pin"
        pin.touch(mode=0o600)
        pin.write_text(TOKEN_PIN)
        options = ("--key-backend", "pkcs11", "--pkcs11-library", str(SOFTHSM2_LIBRARY),
                   "--token-label", TOKEN_LABEL, "--pin-file", str(pin))  # fmt: skip
        return self.device_config(name, options, env), env

    def run(self, kind: str, index: int) -> Run:
        name = f"{kind}-{index}"
        env = self.env
        if kind == PKCS11:  # preparation, not measured
            config, env = self.token_device_config(name)
        else:
            config = self.device_config(name)
        if kind == "minimal":
            command = [sys.executable, str(MINIMAL_SCRIPT), str(config)]
        else:
            command = [sys.executable, "-m", "fleetprov", "--once", "--config", str(config)]
        stdout_path, stderr_path = config.parent / "stdout", config.parent / "stderr"
        timeout = max(1.0, min(self.args.timeout, self.deadline - time.monotonic()))
        exit_code, wall, rss, cpu, timed_out = measure(command, timeout, stdout_path, stderr_path, env)
        result = Run(kind, index, exit_code, round(wall, 4), rss, round(cpu, 3), timed_out)
        stdout = stdout_path.read_text(errors="replace")
        if timed_out:
            result.error = f"killed after {timeout:g} s"
        elif exit_code != 0:
            result.error = f"exit status {exit_code}"
        elif not stdout.startswith("provisioned: thing "):  # "already provisioned" would not be a fair run
            result.error = f"unexpected output: {stdout.strip()[:200]!r}"
        if kind != "minimal":
            stderr_text = stderr_path.read_text(errors="replace")
            result.steps = {step: float(seconds) for step, seconds in STEP_LINE.findall(stderr_text)}
        if not result.ok:
            result.stderr_tail = tail(stderr_path, STDERR_TAIL_LINES)
        return result


# -- figures ---------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Report:
    runs_per_kind: int
    bytecode_cache: bool
    wall_seconds: dict[str, dict[str, Optional[float]]]
    peak_rss_mib: dict[str, dict[str, Optional[float]]]
    cpu_seconds: dict[str, dict[str, Optional[float]]]
    wall_ratio: Optional[float]  # median fleetprov / median minimal
    cpu_ratio: Optional[float]  # the same for CPU seconds (information only: the target is on wall time)
    rss_difference_mb: Optional[float]  # median fleetprov - median minimal, in MB (10^6 bytes)
    rss_difference_mib: Optional[float]
    wall_target: str
    rss_target: str
    fleetprov_step_seconds_median: dict[str, float]
    # (c), for information only (no target); None when it was not run (--no-pkcs11) or had no good run.
    pkcs11: bool
    pkcs11_wall_ratio_minimal: Optional[float]  # median fleetprov-pkcs11 / median minimal
    pkcs11_wall_ratio_file: Optional[float]  # median fleetprov-pkcs11 / median fleetprov (key in a file)
    pkcs11_rss_difference_mb: Optional[float]  # median fleetprov-pkcs11 - median fleetprov, in MB (10^6 bytes)
    pkcs11_rss_difference_mib: Optional[float]
    pkcs11_step_seconds_median: dict[str, float]
    failures: int
    runs: list[dict[str, Any]]
    emulator_exit_code: Optional[int] = None
    note: str = (
        "each run is a fresh process and a fresh device; wall time from fork to wait4; "
        "peak RSS = ru_maxrss from wait4; warm-up runs are not counted"
    )


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a - b if a is not None and b is not None else None


def _mib_to_mb(mib: Optional[float]) -> Optional[float]:
    return None if mib is None else mib * MIB / 1e6


def step_medians(runs: list[Run]) -> dict[str, float]:
    steps: dict[str, list[float]] = {}
    for run in runs:
        for step, seconds in run.steps.items():
            steps.setdefault(step, []).append(seconds)
    return {step: round(statistics.median(v), 3) for step, v in steps.items()}


def build_report(runs: list[Run], runs_per_kind: int, bytecode_cache: bool, pkcs11: bool) -> Report:
    counted = [run for run in runs if run.index > 0 and run.ok]
    wall = {kind: summary([r.wall_seconds for r in counted if r.kind == kind]) for kind in KINDS}
    rss = {kind: summary([r.peak_rss_kib / 1024 for r in counted if r.kind == kind]) for kind in KINDS}
    cpu = {kind: summary([r.cpu_seconds for r in counted if r.kind == kind]) for kind in KINDS}
    cpu_ratio = _ratio(cpu["fleetprov"]["median"], cpu["minimal"]["median"])
    ratio = _ratio(wall["fleetprov"]["median"], wall["minimal"]["median"])
    difference_mib = _difference(rss["fleetprov"]["median"], rss["minimal"]["median"])
    difference_mb = _mib_to_mb(difference_mib)
    pkcs11_difference_mib = _difference(rss[PKCS11]["median"], rss["fleetprov"]["median"])
    return Report(
        runs_per_kind=runs_per_kind,
        bytecode_cache=bytecode_cache,
        wall_seconds={k: {n: rounded(v, 4) for n, v in s.items()} for k, s in wall.items()},
        peak_rss_mib={k: {n: rounded(v, 2) for n, v in s.items()} for k, s in rss.items()},
        cpu_seconds={k: {n: rounded(v, 3) for n, v in s.items()} for k, s in cpu.items()},
        wall_ratio=rounded(ratio, 3),
        cpu_ratio=rounded(cpu_ratio, 3),
        rss_difference_mb=rounded(difference_mb, 2),
        rss_difference_mib=rounded(difference_mib, 2),
        wall_target=verdict(None if ratio is None else ratio <= WALL_TARGET_RATIO),
        rss_target=verdict(None if difference_mb is None else difference_mb * 1e6 <= RSS_TARGET_BYTES),
        fleetprov_step_seconds_median=step_medians([run for run in counted if run.kind == "fleetprov"]),
        pkcs11=pkcs11,
        pkcs11_wall_ratio_minimal=rounded(_ratio(wall[PKCS11]["median"], wall["minimal"]["median"]), 3),
        pkcs11_wall_ratio_file=rounded(_ratio(wall[PKCS11]["median"], wall["fleetprov"]["median"]), 3),
        pkcs11_rss_difference_mb=rounded(_mib_to_mb(pkcs11_difference_mib), 2),
        pkcs11_rss_difference_mib=rounded(pkcs11_difference_mib, 2),
        pkcs11_step_seconds_median=step_medians([run for run in counted if run.kind == PKCS11]),
        failures=sum(1 for run in runs if not run.ok),
        runs=[{**asdict(run), "ok": run.ok} for run in runs],
    )


def _span(values: dict[str, Optional[float]], unit: str, fmt: str) -> str:
    if values["median"] is None:
        return "-"
    return f"{values['median']:{fmt}} {unit}  (min {values['min']:{fmt}}, max {values['max']:{fmt}})"


def print_table(report: Report) -> None:
    cache = "bytecode cached" if report.bytecode_cache else "no bytecode cache: modules compiled in every run"
    token = ", fleetprov-pkcs11 = key in a SoftHSM2 token" if report.pkcs11 else ""
    print(
        f"\nfleetprov --once (key in a file{token}) vs minimal awsiotsdk script, "
        f"{report.runs_per_kind} runs each, {cache}"
    )
    print(f"  ({report.note})")
    kinds = [kind for kind in KINDS if report.pkcs11 or kind != PKCS11]
    rows = []  # each figure of fleetprov-pkcs11 right below the same figure of fleetprov
    rows += [(f"{kind} wall time", _span(report.wall_seconds[kind], "s", ".3f")) for kind in kinds]
    rows += [(f"{kind} peak RSS", _span(report.peak_rss_mib[kind], "MiB", ".1f")) for kind in kinds]
    rows += [(f"{kind} CPU (user+sys)", _span(report.cpu_seconds[kind], "s", ".3f")) for kind in kinds]
    ratio = "-" if report.wall_ratio is None else f"{report.wall_ratio:.2f}x"
    rows.append(("wall time fleetprov/minimal", f"{ratio}  target <= {WALL_TARGET_RATIO}x: {report.wall_target}"))
    difference = (
        "-"
        if report.rss_difference_mb is None
        else f"{report.rss_difference_mb:+.1f} MB ({report.rss_difference_mib:+.1f} MiB)"
    )
    cpu_ratio = "-" if report.cpu_ratio is None else f"{report.cpu_ratio:.2f}x"
    rows.append(("CPU time fleetprov/minimal", f"{cpu_ratio}  (information: wall time is what the target is on)"))
    rows.append(("peak RSS fleetprov-minimal", f"{difference}  target <= +10 MB: {report.rss_target}"))
    if report.pkcs11:
        for label, value in (
            ("wall time pkcs11/minimal", report.pkcs11_wall_ratio_minimal),
            ("wall time pkcs11/fleetprov", report.pkcs11_wall_ratio_file),
        ):
            rows.append((label, ("-" if value is None else f"{value:.2f}x") + "  (information, no target)"))
        pkcs11_difference = (
            "-"
            if report.pkcs11_rss_difference_mb is None
            else f"{report.pkcs11_rss_difference_mb:+.1f} MB ({report.pkcs11_rss_difference_mib:+.1f} MiB)"
        )
        rows.append(("peak RSS pkcs11-fleetprov", f"{pkcs11_difference}  (information, no target)"))
    for kind, medians in (
        ("fleetprov", report.fleetprov_step_seconds_median),
        (PKCS11, report.pkcs11_step_seconds_median),
    ):
        if medians:
            rows.append((f"{kind} steps (median ms)", ", ".join(f"{k} {v * 1000:.0f}" for k, v in medians.items())))
    rows.append(("failed runs", str(report.failures)))
    rows.append(("emulator exit code", str(report.emulator_exit_code)))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=positive_int, default=7, help="counted runs of each (default 7)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a child is killed (default 60)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="bound on the whole run (default 900)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--bytecode-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give the children a bytecode cache in the temporary directory, as an installed package has "
        "(default: yes; --no-bytecode-cache: PYTHONDONTWRITEBYTECODE=1, modules compiled in every run)",
    )
    parser.add_argument(
        "--pkcs11",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run fleetprov-pkcs11: the device key in a SoftHSM2 token of its own per run "
        "(default: yes; --no-pkcs11: only fleetprov and minimal)",
    )
    return parser.parse_args(argv)


def schedule(runs: int, pkcs11: bool = True) -> list[tuple[str, int]]:
    """Warm-ups (index 0), then ABBA, extended to three kinds: a c b, b c a, a c b, ... (a b, b a, ... without
    fleetprov-pkcs11): over any two rounds every kind's mean position is the same, so linear drift cancels."""
    kinds = [kind for kind in KINDS if pkcs11 or kind != PKCS11]
    order = [(kind, 0) for kind in kinds]
    for index in range(1, runs + 1):
        round_ = [(kind, index) for kind in kinds]
        order += round_ if index % 2 else round_[::-1]
    return order


def benchmark(args: argparse.Namespace, bench: Bench) -> list[Run]:
    log = sys.stderr if args.json else sys.stdout
    results = []
    for kind, index in schedule(args.runs, args.pkcs11):
        if time.monotonic() > bench.deadline:
            print(f"--max-seconds ({args.max_seconds:g}) reached: stopping early", file=sys.stderr)
            break
        result = bench.run(kind, index)
        label = "warm-up" if index == 0 else f"run {index}"
        outcome = "ok" if result.ok else f"FAILED: {result.error}"
        print(
            f"{kind:>16} {label:<7} {result.wall_seconds:7.3f} s  {result.peak_rss_kib / 1024:6.1f} MiB  "
            f"cpu {result.cpu_seconds:5.3f} s  {outcome}",
            file=log,
            flush=True,
        )
        results.append(result)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.pkcs11:
        try:
            softhsm2_util()
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="fleetprov-latency-") as tmp:
        work = Path(tmp)
        emulator = launch(work / "emulator", log_path=work / "emulator.log", wait=min(60.0, args.max_seconds))
        runs: list[Run] = []
        try:
            runs = benchmark(args, Bench(args, emulator, work, deadline))
        finally:  # also on an error or Ctrl-C
            emulator_exit = emulator.stop()
    report = build_report(runs, args.runs, args.bytecode_cache, args.pkcs11)
    report.emulator_exit_code = emulator_exit
    for run in runs:
        if not run.ok:
            print(f"\n{run.kind} run {run.index} failed: {run.error}; stderr ends with:", file=sys.stderr)
            print(run.stderr_tail or "(empty)", file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print_table(report)
    complete = len(runs) == len(schedule(args.runs, args.pkcs11))
    return 0 if report.failures == 0 and complete else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the emulator was stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
