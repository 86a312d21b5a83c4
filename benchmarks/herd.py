"""Herd: N concurrent `fleetprov --once` processes against the emulator throttled to R requests/s.

Issue 5 asks that at least 100 devices booting at once against a throttled service all provision, none gives
up, and the makespan stays within 1.5x of the ideal N * (requests per device) / R; and that this be compared
with a fixed 5 s retry (the Greengrass plugin's policy).

What it does:

1. floor (CPU-bound, no network): N concurrent ``python -m fleetprov --version``: what it costs this machine
   just to start N fleetprov processes;
2. warm-up: one ``--once`` against an emulator of its own (it fills the children's bytecode cache; not
   counted); then the baseline (unless ``--no-baseline``): one emulator WITHOUT throttling and the herd of N
   ``--once`` with policy A: the makespan this machine reaches when the throttle is not what limits it (the
   processes, the TLS handshakes and the emulator share the cores). When this exceeds the ideal at R, R is
   not the bottleneck here: the script says so with the figures and also runs R/2, R/4, ... down to the
   first rate whose ideal exceeds that makespan (at most 4 more; ``--no-lower`` turns that off);
3. for every R of ``--throttle`` and every policy of ``--policies``: a FRESH emulator (its own state
   directory, started with ``fleetprov.emulator.launch.launch`` and ``--throttle R``; stopped in every
   case), then the herd:

   * N device configs, from one ``fleetprov emulator device-config`` output each with its own
     ``SerialNumber`` (thing ``fleetprov-herd-<i>``), its own empty state directory, its own claim client id
     ``claim: {client_id: herd-<i>}`` (processes on one machine would otherwise derive the same one, and
     AWS, like the emulator, closes the older of two connections with one client id) and the policy's
     ``retry:`` section;
   * N processes ``sh -c 'read _; exec python -m fleetprov --once --config <config>'`` are spawned first
     and all block on one pipe; closing its write end releases them at the same moment (time 0), so the
     time it takes to fork N processes is not part of the makespan;
   * ``--device-nice N`` runs them at nice N (default 0): the emulator stands in for a remote service, and
     100 CPU-bound processes otherwise starve it (slower handshakes and replies);
   * each child is reaped with ``os.wait4`` (exit status, CPU seconds, peak RSS) as soon as its pidfd says
     it exited; at ``--timeout`` the ones left are killed (SIGKILL) and counted as killed.

Policies (``retry:`` of every device config):

* A ``exponential``: fleetprov's backoff, exponential with full jitter, capped: initial_delay 1, max_delay 10,
  budget 300, max_attempts 100 (a budget large enough for the whole herd; the shipped defaults are 1 / 60 /
  600 / 10);
* B ``fixed``: ``strategy: fixed, initial_delay: 5, max_attempts: 100, budget: 300``: always 5 s, no jitter.

What it reports for each (R, policy):

* makespan: from the release (time 0) to the last child's exit; ideal = N * 2 / R (CreateCertificateFromCsr
  and RegisterThing are throttled; connects are not), the ratio makespan / ideal against the target 1.5x
  (PASS/MISS), and for information the ratio against max(ideal, the unthrottled baseline's makespan) and the
  request phase (first request to last accepted one) / ideal, which leaves out the processes' start-up;
* how many provisioned (exit 0 and "provisioned: thing ..."), how many gave up (histogram of exit codes;
  "killed" for the ones killed at the timeout);
* requests the emulator received, from its log (``fleetprov.emulator.service`` lines: accepted ones as
  ``CreateCertificateFromCsr for <client>: ...`` / ``RegisterThing <template> for <client>: ...``,
  rejected ones as ``<operation> from <client> rejected: <status> <code> <message>``): total, accepted,
  throttled (429 ThrottlingException), other rejections and 500s; claim connections, dropped replies,
  emulator tracebacks, and "connected again" (as every device has its own client ids here, each is a device's
  retry connecting before the emulator has processed the close of its previous connection: reported, not
  counted as misbehaviour);
* when the first request arrived and the last one was accepted (seconds after time 0) and the accepted
  rate in between; completion times p50/p90/max; retries per device (fleetprov's "attempt N failed" lines);
* CPU seconds of the N children (sum, from wait4) and of the emulator during the herd (/proc/<pid>/stat);
* the registry afterwards: things, device certificates by status (an issued certificate that never got
  registered stays PENDING_ACTIVATION: an orphan), things with more than one certificate;
* any fleetprov misbehaviour: a traceback in a child's stderr, an exit 0 without "provisioned:", a thing
  whose certificate is not the one its device stored. The stderr of such children is printed.

Bounded: each herd by ``--timeout`` (default 420 s: the 300 s budget plus the verify step), everything by
``--max-seconds`` (default 2400; no herd starts after it); every child left is killed and every emulator
stopped, also on an error, Ctrl-C or SIGTERM. Children get their own bytecode cache in the temporary
directory (as an installed package has its .pyc files; nothing is written into the source tree). ``--keep DIR``
works in DIR instead and keeps it: emulator logs, configs, every child's stdout and stderr.

Exit status: 0 when every planned run completed without fleetprov or emulator misbehaviour (a missed target
alone is not a failure), else 1.

Run::

    .venv/bin/python benchmarks/herd.py                          # N=100, R=20 (+ R/2, ... if CPU-bound)
    .venv/bin/python benchmarks/herd.py --throttle 20 10 --json
    .venv/bin/python benchmarks/herd.py --devices 30 --policies fixed --no-baseline
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from benchlib import percentile, positive_int, rounded, tail

from fleetprov.emulator.launch import RunningEmulator, launch

REQUESTS_PER_DEVICE = 2  # CreateCertificateFromCsr + RegisterThing; connects are not throttled
TARGET_RATIO = 1.5
STDERR_TAIL_LINES = 30
MAX_SHOWN_FAILURES = 5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

POLICIES: dict[str, dict[str, Any]] = {
    "exponential": {
        "strategy": "exponential",
        "initial_delay": 1,
        "max_delay": 20,
        "budget": 300,
        "max_attempts": 100,
    },
    "fixed": {"strategy": "fixed", "initial_delay": 5, "budget": 300, "max_attempts": 100},  # max_delay: unused
}
POLICY_LABELS = {"exponential": "A exponential+jitter", "fixed": "B fixed 5 s"}

# The emulator's log lines (format "%(asctime)s %(levelname)s %(name)s: %(message)s", see fleetprov/cli.py).
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
ACCEPTED = re.compile(
    r"fleetprov\.emulator\.service: (?:(CreateCertificateFromCsr|CreateKeysAndCertificate) for (\S+): certificate"
    r"|(RegisterThing) \S+ for (\S+): thing)"
)
REJECTED = re.compile(r"fleetprov\.emulator\.service: (\w+) from (\S+) rejected: (\d+) (\w+)")
FAILED = re.compile(r"fleetprov\.emulator\.service: (\w+) from (\S+) failed")
CLAIM_CONNECT = re.compile(r"fleetprov\.emulator\.broker: client '([^']*)' connected: claim certificate")
BROKER_EVENTS = {
    "connected_again": "connected again: closing its older connection",
    "replies_dropped": "reply dropped",
    "connections_refused": "refusing connection",
    "connections_closed": "closing connection",
}
RETRY_LINE = re.compile(r"attempt \d+ failed \(")


# -- a herd of processes released at once -------------------------------------------------------------


@dataclass
class Child:
    index: int
    pid: int
    pidfd: int
    stdout_path: Path
    stderr_path: Path
    seconds: Optional[float] = None  # from the release to its exit
    exit_code: Optional[int] = None
    cpu_seconds: float = 0.0
    peak_rss_kib: int = 0
    killed: bool = False


@dataclass
class HerdResult:
    children: list[Child]
    released_at: float  # time.time() at the release, to compare with the emulator's log
    spawn_seconds: float  # forking the N waiting processes (before the release, not in the makespan)
    makespan: float  # release to the last exit (or to the kill at the time-out)

    @property
    def cpu_seconds(self) -> float:
        return sum(child.cpu_seconds for child in self.children)


def run_herd(commands: list[list[str]], work: Path, env: dict[str, str], timeout: float, nice: int = 0) -> HerdResult:
    """Spawn every command blocked on one pipe, release them all at once, reap them; kill what is left."""
    work.mkdir(parents=True, exist_ok=True)
    gate_read, gate_write = os.pipe()
    children: list[Child] = []
    released = False
    try:
        spawn_started = time.monotonic()
        for index, command in enumerate(commands):
            out, err = work / f"{index}.stdout", work / f"{index}.stderr"
            with out.open("wb") as stdout, err.open("wb") as stderr:
                process = subprocess.Popen(
                    ["sh", "-c", 'read _ignored; exec nice -n "$0" "$@" </dev/null', str(nice), *command],
                    stdin=gate_read, stdout=stdout, stderr=stderr, env=env,
                )  # fmt: skip
            process.returncode = 0  # reaped with os.wait4 below: keep Popen from ever waiting for it
            children.append(Child(index, process.pid, os.pidfd_open(process.pid), out, err))
        spawn_seconds = time.monotonic() - spawn_started
        os.close(gate_read)
        gate_read = -1
        released_at = time.time()
        started = time.monotonic()
        os.close(gate_write)  # every child's `read` sees end-of-file now
        gate_write = -1
        released = True
        waiting = {child.pidfd: child for child in children}
        poller = select.poll()
        for pidfd in waiting:
            poller.register(pidfd, select.POLLIN)
        deadline = started + timeout
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for pidfd, _ in poller.poll(min(remaining, 1.0) * 1000):
                child = waiting.pop(pidfd)
                poller.unregister(pidfd)
                _reap(child, started)
        makespan = time.monotonic() - started
    finally:
        for fd in (gate_read, gate_write):
            if fd >= 0:
                os.close(fd)
        for child in children:  # on the time-out, an error or Ctrl-C: no child outlives the herd
            if child.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
                child.killed = True
                _reap(child, started if released else time.monotonic())
            os.close(child.pidfd)
    return HerdResult(children, released_at, spawn_seconds, makespan)


def _reap(child: Child, started: float) -> None:
    _, status, usage = os.wait4(child.pid, 0)
    child.seconds = time.monotonic() - started
    child.exit_code = os.waitstatus_to_exitcode(status)
    child.cpu_seconds = usage.ru_utime + usage.ru_stime
    child.peak_rss_kib = usage.ru_maxrss


# -- the emulator's side ------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> Optional[float]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _log_time(line: str) -> Optional[float]:
    match = LOG_TIME.match(line)
    if not match:
        return None
    return dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Requests:
    total: int = 0
    accepted: int = 0
    throttled: int = 0
    other_rejections: dict[str, int] = field(default_factory=dict)  # "403 AccessDenied" -> count
    internal_failures: int = 0
    by_operation: dict[str, dict[str, int]] = field(default_factory=dict)  # operation -> outcome -> count
    clients: int = 0  # distinct client ids that sent a request
    max_per_client: int = 0
    claim_connections: int = 0
    broker_events: dict[str, int] = field(default_factory=dict)
    emulator_tracebacks: int = 0
    first_request_s: Optional[float] = None  # seconds after the release
    last_accepted_s: Optional[float] = None
    accepted_rate: Optional[float] = None  # accepted requests/s between the first and the last accepted one
    accepted_per_second: list[int] = field(default_factory=list)  # second k after the release -> accepted
    throttled_per_second: list[int] = field(default_factory=list)


def count_requests(log_text: str, released_at: float) -> Requests:
    counts = Requests()
    per_client: Counter[str] = Counter()
    operations: dict[str, Counter[str]] = {}
    accepted_times: list[float] = []
    throttled_times: list[float] = []
    request_times: list[float] = []
    for line in log_text.splitlines():
        if line.startswith("Traceback"):
            counts.emulator_tracebacks += 1
        for name, text in BROKER_EVENTS.items():
            if text in line:
                counts.broker_events[name] = counts.broker_events.get(name, 0) + 1
        if CLAIM_CONNECT.search(line):
            counts.claim_connections += 1
            continue
        when = _log_time(line)
        if match := ACCEPTED.search(line):
            operation, client = (match[1], match[2]) if match[1] else (match[3], match[4])
            outcome = "accepted"
            counts.accepted += 1
            if when is not None:
                accepted_times.append(when)
        elif match := REJECTED.search(line):
            operation, client = match[1], match[2]
            outcome = f"{match[3]} {match[4]}"
            if outcome == "429 ThrottlingException":
                counts.throttled += 1
                if when is not None:
                    throttled_times.append(when)
            else:
                counts.other_rejections[outcome] = counts.other_rejections.get(outcome, 0) + 1
        elif match := FAILED.search(line):
            operation, client = match[1], match[2]
            outcome = "500 InternalFailure"
            counts.internal_failures += 1
        else:
            continue
        counts.total += 1
        per_client[client] += 1
        operations.setdefault(operation, Counter())[outcome] += 1
        if when is not None:
            request_times.append(when)
    counts.by_operation = {operation: dict(outcomes) for operation, outcomes in sorted(operations.items())}
    counts.clients = len(per_client)
    counts.max_per_client = max(per_client.values(), default=0)
    if request_times:
        counts.first_request_s = round(min(request_times) - released_at, 3)
    if accepted_times:
        counts.last_accepted_s = round(max(accepted_times) - released_at, 3)
        span = max(accepted_times) - min(accepted_times)
        if span > 0:
            counts.accepted_rate = round((len(accepted_times) - 1) / span, 2)
    counts.accepted_per_second = _per_second(accepted_times, released_at)
    counts.throttled_per_second = _per_second(throttled_times, released_at)
    return counts


def _per_second(times: list[float], released_at: float) -> list[int]:
    if not times:
        return []
    buckets = Counter(max(0, int(t - released_at)) for t in times)
    return [buckets.get(second, 0) for second in range(max(buckets) + 1)]


def registry_summary(emulator_state: Path, env: dict[str, str]) -> dict[str, Any]:
    """Things and device certificates in the emulator's registry (its admin commands print JSON)."""

    def admin(command: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "fleetprov", "emulator", command, "--state-dir", str(emulator_state)],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"fleetprov emulator {command} failed: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)

    things = admin("things")
    certificates = [c for c in admin("certificates") if c.get("kind") == "device"]
    return {
        "things": len(things),
        "things_with_several_certificates": sum(1 for t in things if len(t.get("principals") or []) > 1),
        "device_certificates": dict(Counter(c.get("status") for c in certificates)),
        "orphaned_certificates": sum(1 for c in certificates if not c.get("things")),
        "principals": {t["thingName"]: t.get("principals") or [] for t in things},
    }


# -- one herd against one emulator --------------------------------------------------------------------


def exit_histogram(children: list[Child]) -> dict[str, int]:
    counts = Counter("killed" if c.killed else str(c.exit_code) for c in children)
    return dict(sorted(counts.items()))


@dataclass
class Run:
    label: str  # "baseline" or "R=20 exponential"
    throttle: Optional[float]
    policy: str
    retry: dict[str, Any]
    devices: int
    makespan: float = 0.0
    ideal: Optional[float] = None
    ratio: Optional[float] = None
    target: str = "n/a"
    floor_adjusted_ratio: Optional[float] = None  # makespan / max(ideal, unthrottled baseline makespan)
    # (last accepted request - first request) / ideal: how well the retries use the rate once devices ask
    request_phase_ratio: Optional[float] = None
    provisioned: int = 0
    gave_up: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    completion_s: dict[str, Optional[float]] = field(default_factory=dict)  # p50, p90, max
    retries_per_device: dict[str, Optional[float]] = field(default_factory=dict)  # mean, max
    spawn_seconds: float = 0.0
    children_cpu_seconds: float = 0.0
    emulator_cpu_seconds: Optional[float] = None
    peak_rss_mib_max: Optional[float] = None
    requests: Optional[Requests] = None
    registry: dict[str, Any] = field(default_factory=dict)
    misbehaviour: list[str] = field(default_factory=list)
    emulator_exit_code: Optional[int] = None


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, deadline: float) -> None:
        self.args = args
        self.work = work
        self.deadline = deadline
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        self.env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        self.env.pop("FLEETPROV_CONFIG", None)
        self.log = sys.stderr if args.json else sys.stdout
        self.failures: list[str] = []  # misbehaviour of any run, for the exit status

    def say(self, message: str) -> None:
        print(message, file=self.log, flush=True)

    def timeout(self) -> float:
        return max(1.0, min(float(self.args.timeout), self.deadline - time.monotonic()))

    def policy(self, name: str) -> dict[str, Any]:
        retry = dict(POLICIES[name])
        if name == "exponential":
            retry.update(
                initial_delay=self.args.initial_delay,
                max_delay=self.args.max_delay,
                budget=self.args.budget,
                max_attempts=self.args.max_attempts,
            )
        else:
            retry.update(
                initial_delay=self.args.fixed_delay, budget=self.args.budget, max_attempts=self.args.max_attempts
            )
        return retry

    def version_floor(self) -> dict[str, Any]:
        """N concurrent `fleetprov --version`: the cost of starting N fleetprov processes, nothing else."""
        command = [sys.executable, "-m", "fleetprov", "--version"]
        run_herd([command], self.work / "floor-warm-up", self.env, 60)  # fills the bytecode cache
        herd = run_herd([command] * self.args.devices, self.work / "floor", self.env, self.timeout())
        failed = sum(1 for child in herd.children if child.exit_code != 0)
        return {
            "command": "python -m fleetprov --version",
            "processes": self.args.devices,
            "makespan": round(herd.makespan, 3),
            "cpu_seconds": round(herd.cpu_seconds, 3),
            "cpu_seconds_per_process": round(herd.cpu_seconds / self.args.devices, 4),
            "processes_per_second": round(self.args.devices / herd.makespan, 1),
            "failed": failed,
        }

    def warm_up(self) -> None:
        """One `--once` against an emulator of its own: fills the children's bytecode cache (not counted)."""
        run_dir = self.work / "warm-up"
        run_dir.mkdir()
        emulator = launch(run_dir / "emulator", log_path=run_dir / "emulator.log", wait=60)
        try:
            (config,) = self.device_configs(emulator, run_dir, self.policy("exponential"), 1)
            warm = run_herd([self.once(config)], run_dir / "out", self.env, min(120.0, self.timeout()))
        finally:
            emulator.stop()
        if warm.children[0].exit_code != 0:
            raise RuntimeError(f"the warm-up run failed:\n{tail(warm.children[0].stderr_path, STDERR_TAIL_LINES)}")

    def device_configs(self, emulator: RunningEmulator, run_dir: Path, retry: dict[str, Any], count: int) -> list[Path]:
        generated = subprocess.run(
            [sys.executable, "-m", "fleetprov", "emulator", "device-config", "--state-dir", str(emulator.state_dir),
             "--serial", "herd-template"],
            capture_output=True, text=True, timeout=60, check=False, env=self.env,
        )  # fmt: skip
        if generated.returncode != 0:
            raise RuntimeError(f"fleetprov emulator device-config failed: {generated.stderr.strip()}")
        template = yaml.safe_load(generated.stdout)
        configs = []
        for index in range(count):
            device = run_dir / "devices" / f"{index}"
            device.mkdir(parents=True)
            config = json.loads(json.dumps(template))  # a deep copy
            config["provisioning"]["parameters"]["static"]["SerialNumber"] = f"herd-{index}"
            config["state_dir"] = str(device / "state")
            config["claim"]["client_id"] = f"herd-{index}"
            config["retry"] = dict(retry)
            path = device / "config.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            configs.append(path)
        return configs

    def herd(self, label: str, throttle: Optional[float], policy: str, baseline: Optional[float]) -> Run:
        retry = self.policy(policy)
        run_dir = self.work / label.replace(" ", "-").replace("=", "")
        run = Run(label, throttle, policy, retry, self.args.devices)
        serve_args = () if throttle is None else ("--throttle", f"{throttle:g}")
        log_path = run_dir / "emulator.log"
        run_dir.mkdir(parents=True)
        emulator = launch(run_dir / "emulator", *serve_args, log_path=log_path, wait=60)
        try:
            configs = self.device_configs(emulator, run_dir, retry, self.args.devices)
            cpu_before = process_cpu_seconds(emulator.process.pid)
            commands = [self.once(config) for config in configs]
            result = run_herd(commands, run_dir / "out", self.env, self.timeout(), self.args.device_nice)
            cpu_after = process_cpu_seconds(emulator.process.pid)
            if cpu_before is not None and cpu_after is not None:
                run.emulator_cpu_seconds = round(cpu_after - cpu_before, 2)
        finally:
            run.emulator_exit_code = emulator.stop()
        self.evaluate(run, result, configs, log_path, emulator.state_dir, baseline)
        return run

    @staticmethod
    def once(config: Path) -> list[str]:
        return [sys.executable, "-m", "fleetprov", "--once", "--config", str(config)]

    def evaluate(
        self, run: Run, result: HerdResult, configs: list[Path], log_path: Path, state: Path, baseline: Optional[float]
    ) -> None:
        children = result.children
        run.makespan = round(result.makespan, 3)
        run.spawn_seconds = round(result.spawn_seconds, 3)
        run.children_cpu_seconds = round(result.cpu_seconds, 2)
        run.peak_rss_mib_max = round(max(c.peak_rss_kib for c in children) / 1024, 1)
        run.exit_codes = exit_histogram(children)
        seconds = [c.seconds for c in children if c.seconds is not None]
        run.completion_s = {
            "p50": rounded(percentile(seconds, 50)),
            "p90": rounded(percentile(seconds, 90)),
            "max": rounded(max(seconds, default=None)),
        }
        if run.throttle:
            run.ideal = round(run.devices * REQUESTS_PER_DEVICE / run.throttle, 3)
            run.ratio = round(run.makespan / run.ideal, 3)
            if baseline is not None:
                run.floor_adjusted_ratio = round(run.makespan / max(run.ideal, baseline), 3)
        run.requests = count_requests(log_path.read_text(errors="replace"), result.released_at)
        first, last = run.requests.first_request_s, run.requests.last_accepted_s
        if run.ideal and first is not None and last is not None:
            run.request_phase_ratio = round((last - first) / run.ideal, 3)
        try:
            run.registry = registry_summary(state, self.env)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            run.misbehaviour.append(f"registry not readable: {exc}")
            run.registry = {}
        principals = run.registry.pop("principals", {})
        retries = []
        shown = 0
        for child, config in zip(children, configs):
            stdout = child.stdout_path.read_text(errors="replace")
            stderr = child.stderr_path.read_text(errors="replace")
            retries.append(len(RETRY_LINE.findall(stderr)))
            problems = []
            if "Traceback" in stderr:
                problems.append("traceback in stderr")
            if child.exit_code == 0 and not stdout.startswith("provisioned: thing "):
                problems.append(f"exit 0 but stdout is {stdout.strip()[:200]!r}")
            if child.exit_code == 0 and principals:
                problems += self.check_identity(config, principals)
            if child.exit_code == 0 and not problems:
                run.provisioned += 1
            elif child.exit_code != 0:
                run.gave_up += 1
            if problems:
                run.misbehaviour.append(f"device {child.index}: {'; '.join(problems)}")
            if (problems or child.exit_code != 0) and shown < MAX_SHOWN_FAILURES:
                shown += 1
                why = "killed at the time-out" if child.killed else f"exit {child.exit_code}"
                stderr = tail(child.stderr_path, STDERR_TAIL_LINES)
                self.say(f"\n[{run.label}] device {child.index} ({why}); stderr ends with:\n{stderr}")
        if run.ratio is not None:  # issue 5: all provision, none gives up, and within 1.5x of the ideal
            run.target = "PASS" if run.ratio <= TARGET_RATIO and run.provisioned == run.devices else "MISS"
        run.retries_per_device = {
            "mean": rounded(statistics.mean(retries) if retries else None),
            "max": max(retries, default=None),
        }
        requests = run.requests
        if requests.emulator_tracebacks or requests.internal_failures:
            run.misbehaviour.append(
                f"emulator: {requests.emulator_tracebacks} tracebacks, {requests.internal_failures} internal failures"
            )
        # Every device has its own claim client id and thing name here, so a "connected again" is a device's
        # retry connecting before the emulator has processed the close of that device's previous connection:
        # reported (broker_events), not counted as misbehaviour.
        if run.registry.get("things_with_several_certificates"):
            run.misbehaviour.append(
                f"{run.registry['things_with_several_certificates']} things with several certificates"
            )
        if run.emulator_exit_code != 0:
            run.misbehaviour.append(f"emulator exit status {run.emulator_exit_code}")
        if any(c.killed for c in children):
            run.misbehaviour.append(f"{sum(c.killed for c in children)} devices killed at the time-out")
        self.failures += [f"{run.label}: {m}" for m in run.misbehaviour]

    @staticmethod
    def check_identity(config: Path, principals: dict[str, list[str]]) -> list[str]:
        """The device's stored identity is its thing's one certificate."""
        state = Path(yaml.safe_load(config.read_text())["state_dir"])
        try:
            manifest = json.loads((state / "current" / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            return [f"no readable manifest: {exc}"]
        thing, certificate = manifest.get("thing_name"), manifest.get("certificate_id")
        if principals.get(thing) != [certificate]:
            return [f"stored {thing}/{certificate}, registry has {principals.get(thing)}"]
        return []


# -- report -------------------------------------------------------------------------------------------


def bottleneck_note(floor: dict[str, Any], baseline: Optional[Run], throttle: float, devices: int) -> str:
    ideal = devices * REQUESTS_PER_DEVICE / throttle
    text = (
        f"R={throttle:g}: ideal {ideal:.1f} s; starting {devices} processes (--version) takes "
        f"{floor['makespan']:.1f} s ({floor['cpu_seconds']:.1f} CPU s)"
    )
    if baseline is None:
        return text
    text += (
        f"; the unthrottled herd takes {baseline.makespan:.1f} s ({baseline.children_cpu_seconds:.0f} CPU s in "
        f"the devices, {baseline.emulator_cpu_seconds or 0:.1f} in the emulator, on {os.cpu_count()} cores)"
    )
    if baseline.makespan >= ideal:
        return text + f": this machine, not R={throttle:g}, is the bottleneck"
    if baseline.makespan >= 0.5 * ideal:
        return text + f": the machine's floor is a large part of the ideal at R={throttle:g}"
    return text + f": R={throttle:g} is the bottleneck"


def print_table(report: dict[str, Any]) -> None:
    floor = report["floor"]
    print(f"\nherd: {report['devices']} concurrent `fleetprov --once` processes, {report['cpu_count']} CPUs")
    print(f"  load average before: {report['load_average_before']}; devices at nice {report['device_nice']}")
    for name in report["policies"]:
        settings = ", ".join(f"{k} {v}" for k, v in report["policies"][name].items())
        print(f"  policy {POLICY_LABELS[name]}: {settings}")
    print(
        f"  floor: {floor['processes']} x `{floor['command']}`: {floor['makespan']:.2f} s wall, "
        f"{floor['cpu_seconds']:.1f} CPU s ({floor['cpu_seconds_per_process'] * 1000:.0f} ms each), "
        f"{floor['processes_per_second']:.0f} processes/s"
    )
    for note in report["notes"]:
        print(f"  {note}")
    runs = [Run(**{**r, "requests": None}) for r in report["runs"]]
    requests = [r["requests"] for r in report["runs"]]
    header = [("run", 26), ("makespan", 9), ("ideal", 6), ("ratio", 6), ("<=1.5x", 6), ("ok", 4), ("gave up", 7)]
    header += [("exit codes", 16), ("requests", 8), ("throttled", 9), ("1st/last", 11), ("p50/p90", 11)]
    header += [("retries", 8), ("dev/emu CPU", 12)]
    print()
    print("  ".join(f"{name:<{width}}" for name, width in header))
    for run, req in zip(runs, requests):
        label = "unthrottled baseline" if run.throttle is None else f"R={run.throttle:g} {POLICY_LABELS[run.policy]}"
        cells = [
            label,
            f"{run.makespan:.1f} s",
            "-" if run.ideal is None else f"{run.ideal:.0f} s",
            "-" if run.ratio is None else f"{run.ratio:.2f}x",
            run.target,
            str(run.provisioned),
            str(run.gave_up),
            " ".join(f"{code}:{n}" for code, n in run.exit_codes.items()),
            str(req["total"]),
            str(req["throttled"]),
            f"{req['first_request_s'] or 0:.1f}/{req['last_accepted_s'] or 0:.1f}",
            f"{run.completion_s['p50'] or 0:.1f}/{run.completion_s['p90'] or 0:.1f}",
            f"{run.retries_per_device['mean'] or 0:.1f}/{run.retries_per_device['max'] or 0}",
            f"{run.children_cpu_seconds:.0f}/{run.emulator_cpu_seconds or 0:.1f} s",
        ]
        print("  ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, header)))
    print(
        "\n  makespan: release of all processes to the last exit; ideal = N x 2 / R; requests/throttled: from the "
        "emulator log;\n  1st/last: first request and last accepted one, s after the release; retries: mean/max "
        "per device; CPU: sum over the devices / the emulator"
    )
    for run, req in zip(runs, requests):
        registry = run.registry
        extra = (
            f"accepted {req['accepted']} ({req['accepted_rate'] or 0:.1f}/s), other rejections "
            f"{req['other_rejections'] or 0}, 500s {req['internal_failures']}, claim connections "
            f"{req['claim_connections']}, distinct client ids {req['clients']}, broker {req['broker_events']}; "
            f"registry: {registry.get('things')} things, certificates {registry.get('device_certificates')}, "
            f"orphans {registry.get('orphaned_certificates')}"
        )
        if run.floor_adjusted_ratio is not None:
            extra += f"; makespan / max(ideal, unthrottled) = {run.floor_adjusted_ratio:.2f}x"
        if run.request_phase_ratio is not None:
            extra += f"; (last accepted - first request) / ideal = {run.request_phase_ratio:.2f}x"
        print(f"  {run.label}: {extra}")
        for problem in run.misbehaviour:
            print(f"    MISBEHAVIOUR: {problem}")


# -- main ---------------------------------------------------------------------------------------------


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=positive_int, default=100, help="concurrent processes N (default 100)")
    parser.add_argument(
        "--throttle", type=positive_float, nargs="+", default=[20.0], help="emulator rate(s) R, requests/s (default 20)"
    )
    parser.add_argument(
        "--policies", nargs="+", choices=sorted(POLICIES), default=["exponential", "fixed"], help="(default both)"
    )
    parser.add_argument("--initial-delay", type=positive_float, default=1.0, help="policy A (default 1)")
    parser.add_argument("--max-delay", type=positive_float, default=10.0, help="policy A (default 10)")
    parser.add_argument("--fixed-delay", type=positive_float, default=5.0, help="policy B (default 5)")
    parser.add_argument("--budget", type=positive_float, default=300.0, help="both policies (default 300)")
    parser.add_argument("--max-attempts", type=positive_int, default=100, help="both policies (default 100)")
    parser.add_argument(
        "--device-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="0..19",
        help="run the --once processes at this nice value, so that the emulator, which stands in for a remote "
        "service, is not starved by them (default 0: no priority)",
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the unthrottled herd")
    parser.add_argument(
        "--no-lower", dest="lower", action="store_false", help="no R/2, R/4, ... when the machine is the bottleneck"
    )
    parser.add_argument("--timeout", type=positive_float, default=420.0, help="bound on one herd (default 420 s)")
    parser.add_argument("--max-seconds", type=positive_float, default=2400.0, help="bound on everything (default 2400)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--keep", type=Path, help="work in this new directory and keep it (logs, configs, every child's output)"
    )
    return parser.parse_args(argv)


def benchmark(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    notes: list[str] = []
    bench.say(f"floor: {args.devices} x fleetprov --version ...")
    floor = bench.version_floor()
    bench.say(f"  {floor['makespan']:.2f} s, {floor['cpu_seconds']:.1f} CPU s")
    bench.say("warm-up: 1 x fleetprov --once ...")
    bench.warm_up()
    runs: list[Run] = []
    baseline: Optional[Run] = None
    if args.baseline:
        bench.say(f"baseline: {args.devices} x fleetprov --once, no throttle ...")
        baseline = bench.herd("baseline", None, "exponential", None)
        runs.append(baseline)
        bench.say(f"  {baseline.makespan:.1f} s, exit codes {baseline.exit_codes}")
    throttles = list(dict.fromkeys(args.throttle))
    notes += [bottleneck_note(floor, baseline, throttle, args.devices) for throttle in throttles]
    if args.lower and baseline is not None:
        # Halve the lowest R (at most 4 times) until its ideal exceeds the unthrottled makespan: the first rate
        # at which the throttle, not this machine, should set the pace.
        lowest, added = min(throttles), list[float]()
        while baseline.makespan >= args.devices * REQUESTS_PER_DEVICE / lowest and len(added) < 4:
            lowest /= 2
            added.append(lowest)
        if added:
            throttles += added
            notes.append(
                f"so R={', '.join(f'{r:g}' for r in added)} run too (halving until the ideal exceeds the "
                f"unthrottled makespan of {baseline.makespan:.1f} s)"
            )
    complete = True
    for throttle in throttles:
        for policy in args.policies:
            label = f"R={throttle:g} {policy}"
            if time.monotonic() > bench.deadline:
                bench.say(f"--max-seconds ({args.max_seconds:g}) reached: {label} not run")
                complete = False
                continue
            bench.say(f"{label}: {args.devices} x fleetprov --once ...")
            run = bench.herd(label, throttle, policy, None if baseline is None else baseline.makespan)
            runs.append(run)
            bench.say(
                f"  {run.makespan:.1f} s (ideal {run.ideal:g} s, {run.ratio:.2f}x), exit codes {run.exit_codes}, "
                f"{run.requests.total if run.requests else '?'} requests, "
                f"{run.requests.throttled if run.requests else '?'} throttled"
            )
    return {
        "devices": args.devices,
        "cpu_count": os.cpu_count(),
        "load_average_before": None,
        "requests_per_device": REQUESTS_PER_DEVICE,
        "target_ratio": TARGET_RATIO,
        "policies": {name: bench.policy(name) for name in args.policies},
        "device_nice": args.device_nice,
        "floor": floor,
        "notes": notes,
        "runs": [asdict(run) for run in runs],
        "complete": complete,
        "misbehaviour": bench.failures,
    }


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every `finally`: children killed, emulators stopped


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT even when started in the background, where the shell ignores it) clean up too.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    deadline = time.monotonic() + args.max_seconds
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True)  # a new one: refuses to mix with an earlier run's files
            work = args.keep.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleetprov-herd-")))
        report = benchmark(args, Bench(args, work, deadline))
    report["load_average_before"] = [round(x, 2) for x in load_before]
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if report["complete"] and not report["misbehaviour"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every child was killed and every emulator stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
