"""Fleet-provisioning throughput of the local emulator (`make bench`).

What it does:

1. starts ``python -m fleetprov emulator serve --state-dir <tmp> --port 0`` as a subprocess and waits for
   ``<tmp>/endpoint.json``;
2. BEFORE the timed phase, generates one EC P-256 key and CSR per simulated device and builds each
   device's MQTT connection object (``mtls_from_path`` creates a TLS context per call: ~7 ms of client
   CPU that holds the GIL; ``--no-prebuild`` moves it into the timed phase), so the figures measure the
   emulator (and the MQTT/TLS round trips), not the client's key generation and set-up;
3. timed phase: N devices, at most C in flight (a thread pool of C workers, one device at a time each).
   Every device uses its OWN MQTT connection with the claim certificate and a unique client id:
   connect (mutual TLS, awsiotsdk ``mtls_from_path``), CreateCertificateFromCsr, RegisterThing with the
   template ``fleetprov-demo`` and a unique ``SerialNumber``, disconnect. The device side is the unmodified
   awsiotsdk: ``mqtt_connection_builder`` and ``iotidentity.IotIdentityClientV2``;
4. stops the emulator with SIGTERM and checks that it exits 0.

What it reports:

* provisions/s = N / wall time of the timed phase (first connect to last disconnect);
* per-device latency p50/p95/p99/max, from connect start to RegisterThing accepted, and separately the
  CreateCertificateFromCsr + RegisterThing part alone (without connect);
* failures (each distinct error printed once, with its count);
* the emulator process's RSS (VmRSS, and its peak VmHWM) at the end and its CPU seconds (utime + stime from
  /proc/<pid>/stat), over the timed phase and in total; the client's own CPU seconds, since both share
  this machine, and the CPU that other processes used meanwhile (from /proc/stat): if that is not ~0,
  something else competed for the two cores and the figures are low.

Every operation is bounded by 30 s and the whole run by ``--max-seconds`` (in-flight devices then fail with
"--max-seconds reached"); Ctrl-C stops too. The emulator is stopped in every case. Only loopback is used.
The exit status is non-zero if any device failed or the emulator did not exit 0.

Run::

    .venv/bin/python benchmarks/emulator_throughput.py                      # 200 devices, 50 in flight
    .venv/bin/python benchmarks/emulator_throughput.py --devices 500 --concurrency 100 --json
    .venv/bin/python benchmarks/emulator_throughput.py --no-prebuild        # client set-up inside the timing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout  # not yet the built-in TimeoutError on 3.9/3.10
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from awscrt import mqtt, mqtt_request_response
from awsiot import V2ServiceException, iotidentity, mqtt_connection_builder
from benchlib import percentile, positive_int
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TEMPLATE = "fleetprov-demo"
OPERATION_TIMEOUT = 30.0  # seconds, for every connect, request and disconnect
ENDPOINT_WAIT_SECONDS = 60.0
STOP_WAIT_SECONDS = 20.0
# What a device would use: the two reply topics of one request at a time (as scripts/demo.py).
RR_SUBSCRIPTIONS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the emulator process ----------------------------------------------------------------------


@dataclass
class Emulator:
    process: subprocess.Popen[bytes]
    endpoint: dict[str, Any]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_WAIT_SECONDS)
        return self.process.returncode


def start_emulator(state_dir: Path, log_path: Path, wait_seconds: float) -> Emulator:
    """Start the emulator on a free loopback port and wait for its endpoint.json (stopped again on failure)."""
    command = [sys.executable, "-m", "fleetprov", "emulator", "serve", "--state-dir", str(state_dir), "--port", "0"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    emulator = Emulator(process, {}, log_path)
    try:
        _wait_for_endpoint(emulator, state_dir / "endpoint.json", time.monotonic() + wait_seconds)
    except BaseException:  # also Ctrl-C while waiting
        emulator.stop()
        raise
    return emulator


def _wait_for_endpoint(emulator: Emulator, endpoint: Path, until: float) -> None:
    while not endpoint.exists():
        if emulator.process.poll() is not None or time.monotonic() > until:
            raise RuntimeError(f"emulator did not start (exit {emulator.process.poll()}):\n{emulator.log_tail()}")
        time.sleep(0.05)
    emulator.endpoint = json.loads(endpoint.read_text())
    if emulator.endpoint["host"] not in ("127.0.0.1", "::1", "localhost"):
        raise RuntimeError(f"emulator listens on {emulator.endpoint['host']}, not on loopback")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/<pid>/status."""
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            memory[name] = int(value.split()[0])
    return memory


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine spent busy (everything but idle and iowait), from /proc/stat."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    guest = sum(ticks[8:])  # guest time is counted in user time already
    return (sum(ticks) - idle - iowait - guest) / CLOCK_TICKS


# -- one simulated device ------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    index: int
    serial: str
    client_id: str
    csr_pem: str


@dataclass
class DeviceResult:
    device: Device
    latency: Optional[float] = None  # connect start -> RegisterThing accepted
    api_latency: Optional[float] = None  # CreateCertificateFromCsr start -> RegisterThing accepted
    error: Optional[str] = None


class Deadline:
    """The end of the whole run: each operation waits at most OPERATION_TIMEOUT and never past it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.aborted = threading.Event()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.aborted.is_set():
            raise RuntimeError("run aborted")
        if self.remaining() <= 0:
            raise TimeoutError("--max-seconds reached")

    def timeout(self) -> float:
        """How long the next operation may wait."""
        self.check()
        return min(OPERATION_TIMEOUT, self.remaining())


def make_devices(count: int, run_id: str, deadline: Deadline) -> list[Device]:
    """One EC P-256 key and CSR per device (the keys are not needed afterwards)."""
    devices = []
    for index in range(count):
        deadline.check()
        serial = f"bench-{run_id}-{index:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
            .sign(key, hashes.SHA256())
        )
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        devices.append(Device(index, serial, f"claim-{serial}", pem))
    return devices


def new_connection(endpoint: dict[str, Any], client_id: str) -> mqtt.Connection:
    return mqtt_connection_builder.mtls_from_path(
        endpoint="localhost",
        port=int(endpoint["port"]),
        cert_filepath=str(endpoint["claim_certificate"]),
        pri_key_filepath=str(endpoint["claim_private_key"]),
        ca_filepath=str(endpoint["root_ca"]),
        client_id=client_id,
        clean_session=True,
        keep_alive_secs=30,
    )


def describe_error(step: str, exc: BaseException, deadline: Deadline) -> str:
    """One line per distinct error: no device-specific details, so equal failures group together."""
    if isinstance(exc, (TimeoutError, FutureTimeout)):
        limit = "--max-seconds reached" if deadline.remaining() <= 0 else f"no answer within {OPERATION_TIMEOUT:g} s"
        return f"{step}: timed out: {limit}"
    if isinstance(exc, V2ServiceException):
        modeled = exc.modeled_error
        if modeled is not None:
            return f"{step}: rejected {modeled.status_code} {modeled.error_code}: {modeled.error_message}"
        inner = f" ({type(exc.inner_error).__name__}: {exc.inner_error})" if exc.inner_error else ""
        return f"{step}: {exc.message}{inner}"
    return f"{step}: {type(exc).__name__}: {exc}"


def build_connections(
    devices: list[Device], endpoint: dict[str, Any], deadline: Deadline
) -> dict[int, mqtt.Connection]:
    """Each device's own MQTT connection object (not connected yet), by device index.

    ``mtls_from_path`` creates a TLS context per call: ~7 ms of client CPU, holding the GIL, that would
    otherwise compete with the emulator for this machine's two cores.
    """
    connections = {}
    for device in devices:
        deadline.check()
        connections[device.index] = new_connection(endpoint, device.client_id)
    return connections


def provision(
    device: Device, endpoint: dict[str, Any], deadline: Deadline, prebuilt: Optional[mqtt.Connection] = None
) -> DeviceResult:
    """Connect, CreateCertificateFromCsr, RegisterThing, disconnect. Never raises: errors go in the result."""
    result = DeviceResult(device)
    step = "build connection"
    connection: Optional[mqtt.Connection] = None
    try:
        started = time.monotonic()
        connection = prebuilt or new_connection(endpoint, device.client_id)
        step = "connect"
        connection.connect().result(deadline.timeout())
        client = iotidentity.IotIdentityClientV2(
            connection,
            mqtt_request_response.ClientOptions(
                max_request_response_subscriptions=RR_SUBSCRIPTIONS,
                max_streaming_subscriptions=RR_SUBSCRIPTIONS,
                # A little later than our own bound, so that a time-out is always reported the same way.
                operation_timeout_in_seconds=int(OPERATION_TIMEOUT) + 5,
            ),
        )
        step = "CreateCertificateFromCsr"
        api_started = time.monotonic()
        created = client.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=device.csr_pem)
        ).result(deadline.timeout())
        step = "RegisterThing"
        registered = client.register_thing(
            iotidentity.RegisterThingRequest(
                template_name=TEMPLATE,
                certificate_ownership_token=created.certificate_ownership_token,
                parameters={"SerialNumber": device.serial},
            )
        ).result(deadline.timeout())
        finished = time.monotonic()
        if registered.thing_name != f"fleetprov-{device.serial}":
            raise RuntimeError(f"unexpected thing name {registered.thing_name!r}")
        step = "disconnect"
        disconnecting, connection = connection, None
        disconnecting.disconnect().result(deadline.timeout())
        result.latency, result.api_latency = finished - started, finished - api_started
    except Exception as exc:  # a failed device is counted, never the end of the run
        result.error = describe_error(step, exc, deadline)
        if connection is not None:  # best effort: release the connection of a device that failed midway
            with contextlib.suppress(Exception):
                connection.disconnect().result(5)
    return result


# -- the timed phase -----------------------------------------------------------------------------


class ErrorLog:
    """Counts errors and prints each distinct one the first time it is seen (on stderr)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, error: str, device: Device) -> None:
        with self._lock:
            first = error not in self.counts
            self.counts[error] = self.counts.get(error, 0) + 1
        if first:
            print(f"device {device.client_id} failed: {error}", file=sys.stderr, flush=True)


def run_devices(
    devices: list[Device],
    connections: dict[int, mqtt.Connection],
    endpoint: dict[str, Any],
    concurrency: int,
    deadline: Deadline,
    errors: ErrorLog,
) -> list[DeviceResult]:
    """Provision every device, ``concurrency`` at a time; a device without a prebuilt connection builds one."""
    results: list[DeviceResult] = []

    def done(future: Future[DeviceResult]) -> None:
        if future.cancelled():
            return
        outcome = future.result()
        if outcome.error is not None:
            errors.add(outcome.error, outcome.device)

    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="device")
    futures = {}
    try:
        for device in devices:
            future = executor.submit(provision, device, endpoint, deadline, connections.pop(device.index, None))
            future.add_done_callback(done)
            futures[future] = device
        wait(futures, timeout=max(0.0, deadline.remaining()) + 1)
    finally:
        deadline.aborted.set()  # devices still queued or running stop at their next step
        executor.shutdown(wait=True, cancel_futures=True)
    for future, device in futures.items():
        if future.cancelled():
            error = "not started: --max-seconds reached or run aborted"
            outcome = DeviceResult(device, error=error)
            errors.add(error, device)
        else:
            outcome = future.result()
        results.append(outcome)
    return results


# -- figures -------------------------------------------------------------------------------------


def latency_summary(values: list[float]) -> dict[str, Optional[float]]:
    return {
        "p50_ms": _ms(percentile(values, 50)),
        "p95_ms": _ms(percentile(values, 95)),
        "p99_ms": _ms(percentile(values, 99)),
        "max_ms": _ms(max(values) if values else None),
        "mean_ms": _ms(sum(values) / len(values) if values else None),
    }


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)


@dataclass
class Report:
    devices: int
    concurrency: int
    csr_generation_seconds: float
    connection_build_seconds: Optional[float]  # None: built inside the timed phase (--no-prebuild)
    wall_seconds: float
    succeeded: int
    failures: int
    provisions_per_second: float  # N / wall time of the timed phase
    successful_provisions_per_second: float  # succeeded / wall time of the timed phase
    latency_connect_to_registered: dict[str, Optional[float]]
    latency_csr_to_registered: dict[str, Optional[float]]
    emulator_rss_kib: int
    emulator_peak_rss_kib: int
    emulator_cpu_seconds_timed_phase: float
    emulator_cpu_seconds_total: float
    client_cpu_seconds_timed_phase: float
    other_processes_cpu_seconds_timed_phase: float
    emulator_exit_code: Optional[int] = None
    errors: dict[str, int] = field(default_factory=dict)
    note: str = (
        "EC P-256 CSRs (and, unless --no-prebuild, the connection objects) are made before the timed phase, "
        "so the figures measure the emulator"
    )


def print_table(report: Report) -> None:
    wall = report.wall_seconds or float("nan")
    rows = [
        ("devices / concurrency", f"{report.devices} / {report.concurrency}"),
        ("CSRs generated", f"{report.csr_generation_seconds:.2f} s (before the timed phase)"),
        ("connection objects built", _build(report.connection_build_seconds)),
        ("timed phase wall time", f"{report.wall_seconds:.2f} s"),
        ("provisions/s (N / wall)", f"{report.provisions_per_second:.1f}"),
        ("successful provisions/s", f"{report.successful_provisions_per_second:.1f}"),
        ("succeeded / failed", f"{report.succeeded} / {report.failures}"),
    ]
    for label, summary in (
        ("latency connect->registered", report.latency_connect_to_registered),
        ("latency CSR->registered", report.latency_csr_to_registered),
    ):
        rows.append((label, "  ".join(f"{k[:-3]} {_fmt_ms(v)}" for k, v in summary.items())))
    rows += [
        (
            "emulator RSS (end / peak)",
            f"{report.emulator_rss_kib / 1024:.1f} / {report.emulator_peak_rss_kib / 1024:.1f} MiB",
        ),
        ("emulator CPU (timed phase)", _cpu(report.emulator_cpu_seconds_timed_phase, wall)),
        ("emulator CPU (whole life)", f"{report.emulator_cpu_seconds_total:.2f} s"),
        ("client CPU (timed phase)", _cpu(report.client_cpu_seconds_timed_phase, wall)),
        ("other processes' CPU", _cpu(report.other_processes_cpu_seconds_timed_phase, wall) + "  (should be ~0)"),
        ("emulator exit code", str(report.emulator_exit_code)),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"\nfleetprov emulator throughput\n  ({report.note})")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for error, count in report.errors.items():
        print(f"  error x{count}: {error}")


def _build(seconds: Optional[float]) -> str:
    if seconds is None:
        return "inside the timed phase (--no-prebuild)"
    return f"{seconds:.2f} s (before the timed phase)"


def _cpu(seconds: float, wall: float) -> str:
    return f"{seconds:.2f} s  ({seconds / wall:.0%} of one core)"


def _fmt_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}ms"


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=positive_int, default=200, help="simulated devices (default 200)")
    parser.add_argument("--concurrency", type=positive_int, default=50, help="devices in flight (default 50)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run (default 300)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--prebuild",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the devices' connection objects (TLS contexts) before the timed phase (default: yes)",
    )
    return parser.parse_args(argv)


def benchmark(args: argparse.Namespace, emulator: Emulator, deadline: Deadline) -> Report:
    if TEMPLATE not in emulator.endpoint.get("templates", []):
        raise RuntimeError(f"the emulator has no template {TEMPLATE}: {emulator.endpoint.get('templates')}")
    log = sys.stderr if args.json else sys.stdout
    print(f"generating {args.devices} EC P-256 CSRs (before the timed phase)...", file=log, flush=True)
    started = time.monotonic()
    devices = make_devices(args.devices, f"{os.getpid()}", deadline)
    csr_seconds = time.monotonic() - started
    connections: dict[int, mqtt.Connection] = {}
    build_seconds = None
    if args.prebuild:
        print(f"building {args.devices} MQTT connections (TLS contexts; before the timed phase)...", file=log)
        started = time.monotonic()
        connections = build_connections(devices, emulator.endpoint, deadline)
        build_seconds = round(time.monotonic() - started, 3)
    print(f"provisioning {args.devices} devices, {args.concurrency} in flight...", file=log, flush=True)
    errors = ErrorLog()
    emulator_cpu_before, client_cpu_before = process_cpu_seconds(emulator.pid), own_cpu_seconds()
    machine_before = machine_busy_cpu_seconds()
    started = time.monotonic()
    results = run_devices(devices, connections, emulator.endpoint, args.concurrency, deadline, errors)
    wall = time.monotonic() - started
    emulator_cpu = process_cpu_seconds(emulator.pid)
    client_cpu = own_cpu_seconds() - client_cpu_before
    machine = machine_busy_cpu_seconds() - machine_before
    memory = process_memory_kib(emulator.pid)
    ok = [r for r in results if r.error is None]
    return Report(
        devices=len(devices),
        concurrency=args.concurrency,
        csr_generation_seconds=round(csr_seconds, 3),
        connection_build_seconds=build_seconds,
        wall_seconds=round(wall, 3),
        succeeded=len(ok),
        failures=len(results) - len(ok),
        provisions_per_second=round(len(devices) / wall, 2) if wall > 0 else 0.0,
        successful_provisions_per_second=round(len(ok) / wall, 2) if wall > 0 else 0.0,
        latency_connect_to_registered=latency_summary([r.latency for r in ok if r.latency is not None]),
        latency_csr_to_registered=latency_summary([r.api_latency for r in ok if r.api_latency is not None]),
        emulator_rss_kib=memory.get("VmRSS", 0),
        emulator_peak_rss_kib=memory.get("VmHWM", 0),
        emulator_cpu_seconds_timed_phase=round(emulator_cpu - emulator_cpu_before, 2),
        emulator_cpu_seconds_total=round(emulator_cpu, 2),
        client_cpu_seconds_timed_phase=round(client_cpu, 2),
        other_processes_cpu_seconds_timed_phase=round(
            max(0.0, machine - client_cpu - (emulator_cpu - emulator_cpu_before)), 2
        ),
        errors=dict(errors.counts),
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.max_seconds)
    with tempfile.TemporaryDirectory(prefix="fleetprov-bench-") as tmp:
        wait_seconds = min(ENDPOINT_WAIT_SECONDS, deadline.remaining())
        emulator = start_emulator(Path(tmp) / "emulator", Path(tmp) / "emulator.log", wait_seconds)
        report: Optional[Report] = None
        try:
            report = benchmark(args, emulator, deadline)
        except TimeoutError as exc:  # while preparing: the devices' own time-outs are counted as failures
            print(f"benchmark stopped before the timed phase: {exc}", file=sys.stderr)
        finally:  # also on an error or Ctrl-C
            exit_code = emulator.stop()
            if exit_code != 0:
                print(f"emulator exited {exit_code}; its log ends with:\n{emulator.log_tail()}", file=sys.stderr)
    if report is None:
        return 1
    report.emulator_exit_code = exit_code
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print_table(report)
    return 0 if report.failures == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the emulator was stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
