"""Soak of the daemon `fleetprov run`: N forced disconnects, then idle; reconnect latency, RSS, fds, idle CPU.

What it does:

1. starts the emulator (``fleetprov.emulator.launch.launch`` on a temporary state directory; stopped at the end
   in every case), writes a device config with ``fleetprov emulator device-config`` (a fresh serial and state
   directory) with short reconnect delays (``daemon.reconnect_initial_delay`` 0.05 s, ``reconnect_max_delay``
   0.2 s, so that the soak takes minutes), and starts ``python -m fleetprov run --config <config>`` as systemd
   would: ``NOTIFY_SOCKET`` bound to an AF_UNIX datagram socket of this script, read by a thread as the
   datagrams come (the queue holds only 10), and ``WATCHDOG_USEC=60000000`` (``WatchdogSec=60``: a ping every
   30 s). It waits for ``READY=1`` (the daemon provisions first);
2. forces ``--disconnects`` disconnects, one at a time: a second MQTT 3.1.1 client (awsiotsdk's builder, as a
   device makes it) connects with the daemon's own certificate, key and client id (from its
   ``STATUS=connected as <client id>`` line); the emulator, like AWS IoT, closes the older of two connections
   with one client id before it sends the newcomer's CONNACK. The intruder disconnects at once, and the daemon
   reconnects after its jittered delay. Per cycle, from the moment the intruder's CONNACK arrived (stamped on
   awscrt's thread) to the daemon's next ``STATUS=connected as`` notification (stamped on receipt): the
   reconnect latency, and on the way the daemon's ``STATUS=connection lost`` (it noticed and closed the old
   session) and its last ``STATUS=connecting to`` (the jittered pause is over). The daemon's VmRSS, open fds
   (``/proc/PID/fd``) and threads are sampled once READY, after the warm-up (the first 20 cycles), at five
   evenly spaced points after it (the last at the end of the cycles) and after the idle phase;
3. idles: the daemon connected and nothing happening for ``--idle-seconds``; its CPU time (utime + stime of
   ``/proc/PID/stat``, in clock ticks) over that wall time is its idle CPU, in % of one core;
4. stops it with SIGTERM and checks that it exits 0 (within 2 s is the README's promise) after ``STOPPING=1``.

What it reports: the cycles done, reconnect latency p50/p90/p99/max (ms) and where the time goes, RSS and fd
count after the warm-up and at the end of the cycles, the daemon's CPU per reconnect, idle CPU; PASS or FAIL
against the targets (RSS growth <= 2 MB = 2,000,000 bytes from the warm-up to the end, fd count at the end not
above the warm-up's, idle CPU <= 0.5 % of a core, SIGTERM: exit 0 within 2 s); what the daemon logged
(connections lost and made, other warnings, errors, tracebacks).

The exit status is 0 whatever the figures (a missed target is reported, not a failure), and 1 when the daemon
did not become ready, died, did not reconnect within 60 s of a disconnect, or did not exit 0 on SIGTERM (the
tail of its log is printed).

Run::

    .venv/bin/python benchmarks/soak.py                          # 500 disconnects, 60 s idle
    .venv/bin/python benchmarks/soak.py --disconnects 100 --idle-seconds 10
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from awscrt import mqtt
from awsiot import mqtt_connection_builder
from benchlib import percentile, positive_int, tail

from fleetprov.emulator.launch import RunningEmulator, launch

RECONNECT_INITIAL_DELAY = 0.05  # seconds; config.py accepts any positive number
RECONNECT_MAX_DELAY = 0.2
WATCHDOG_USEC = 60_000_000  # WatchdogSec=60: systemd's WATCHDOG_USEC; the daemon pings every 30 s
WAIT = 60.0  # bound on every wait: READY, each reconnect, the stop
WARM_UP = 20  # cycles before the first RSS / fd sample that counts
SAMPLES_AFTER_WARM_UP = 5  # evenly spaced samples from the warm-up to the end of the cycles
RSS_GROWTH_TARGET_MB = 2.0  # MB = 10^6 bytes
IDLE_CPU_TARGET_PERCENT = 0.5
STOP_PROMISE_SECONDS = 2.0  # README: SIGTERM stops it within 2 s
LOG_TAIL_LINES = 40
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat's unit of CPU time, per second
CONNECTED, LOST, CONNECTING = "STATUS=connected as ", "STATUS=connection lost", "STATUS=connecting to "
CLIENT_ID = re.compile(r"^STATUS=connected as (\S+) \(thing ")
# The daemon's log lines: "2025-01-01 12:00:00,000 WARNING fleetprov.daemon: connection lost: ..."
LOG_LEVEL = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ", re.MULTILINE)


class SoakFailure(Exception):
    """The daemon did not do what the soak needs (ready, alive, reconnecting, stopping): exit 1."""

    log_tail: str = ""  # the end of the daemon's log, once there is a daemon


# -- the daemon's end of sd_notify -----------------------------------------------------------------


@dataclass
class Notification:
    received: float  # time.monotonic() when this script read it
    lines: list[str]

    def starts(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.lines)


class NotifyListener:
    """The AF_UNIX datagram socket that NOTIFY_SOCKET names; a thread reads every datagram as it arrives and
    stamps it: the socket's queue holds 10 (net.unix.max_dgram_qlen) and the daemon drops what does not fit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[Notification] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.2)
        self._thread = threading.Thread(target=self._read, name="notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                datagram = self._socket.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            received = time.monotonic()
            with self._changed:
                self.messages.append(Notification(received, datagram.decode(errors="replace").splitlines()))
                self._changed.notify_all()

    def count(self) -> int:
        with self._changed:
            return len(self.messages)

    def between(self, start: int, end: int) -> list[Notification]:
        with self._changed:
            return self.messages[start:end]

    def wait_for(self, prefix: str, after: int, deadline: float, alive: Callable[[], bool]) -> Optional[int]:
        """The index of the first message from ``after`` on with a line starting with ``prefix``; None once
        ``deadline`` (monotonic) has passed or ``alive()`` is false."""
        with self._changed:
            while True:
                for index in range(after, len(self.messages)):
                    if self.messages[index].starts(prefix):
                        return index
                after = len(self.messages)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not alive():
                    return None
                self._changed.wait(min(remaining, 0.2))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(1.0)
        self._socket.close()


# -- the daemon process ------------------------------------------------------------------------------


@dataclass
class Sample:
    label: str
    cycle: int
    rss_kib: int
    fds: int
    threads: int


class Agent:
    """A running `fleetprov run` and what /proc says about it."""

    def __init__(self, config: Path, notify: NotifyListener, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        for name in ("WATCHDOG_PID", "JOURNAL_STREAM"):  # the watchdog is for this child; timestamped log lines
            env.pop(name, None)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fleetprov", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.proc = Path("/proc") / str(self.process.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sample(self, label: str, cycle: int) -> Sample:
        status = dict(line.split(":", 1) for line in (self.proc / "status").read_text().splitlines() if ":" in line)
        rss_kib = int(status["VmRSS"].split()[0])
        return Sample(label, cycle, rss_kib, sum(1 for _ in (self.proc / "fd").iterdir()), int(status["Threads"]))

    def cpu_ticks(self) -> int:
        """utime + stime, in clock ticks (fields 14 and 15 of /proc/PID/stat; the name in field 2 may hold
        spaces and parentheses, so count from its closing one)."""
        stat = (self.proc / "stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])

    def stop(self) -> tuple[Optional[int], float]:
        """SIGTERM; (exit status or None if it did not exit within WAIT, seconds it took)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: Optional[int] = self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()


def device_config(emulator: RunningEmulator, work: Path) -> Path:
    """A fresh device for this emulator with short reconnect delays."""
    device = work / "device"
    device.mkdir()
    generated = subprocess.run(
        [sys.executable, "-m", "fleetprov", "emulator", "device-config", "--state-dir", str(emulator.state_dir),
         "--serial", f"soak-{os.getpid()}", "--state-dir-for-device", str(device / "state")],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    if generated.returncode != 0:
        raise SoakFailure(f"fleetprov emulator device-config failed: {generated.stderr.strip()}")
    settings = yaml.safe_load(generated.stdout)
    settings["daemon"] = {
        "reconnect_initial_delay": RECONNECT_INITIAL_DELAY,
        "reconnect_max_delay": RECONNECT_MAX_DELAY,
    }
    config = device / "config.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    return config


# -- one forced disconnect ---------------------------------------------------------------------------


@dataclass
class Cycle:
    """Milliseconds from the intruder's CONNACK to each of the daemon's notifications (None if not seen)."""

    reconnect_ms: float
    lost_ms: Optional[float]  # STATUS=connection lost: noticed, old session closed, pause begins
    connecting_ms: Optional[float]  # the last STATUS=connecting to: the pause is over
    attempts: int  # connection attempts it took (1 unless one failed)
    intruder_kicked: bool  # the daemon's new connection closed the intruder's before it disconnected


class Intruder:
    """Connections with the daemon's own identity and client id, each taking the daemon's connection away."""

    def __init__(self, emulator: RunningEmulator, certificate: Path, key: Path, client_id: str) -> None:
        self.emulator = emulator
        self.certificate = certificate
        self.key = key
        self.client_id = client_id

    def strike(self) -> tuple[float, bool]:
        """Connect (the emulator closes the daemon's connection first) and disconnect again; returns the
        monotonic time at which the CONNACK arrived and whether the connection was closed before the
        disconnect."""
        kicked = threading.Event()
        connack: list[float] = []

        def interrupted(connection: mqtt.Connection, error: Exception, **kwargs: Any) -> None:
            kicked.set()

        connection = mqtt_connection_builder.mtls_from_path(
            endpoint="localhost",
            port=self.emulator.endpoint["port"],
            cert_filepath=str(self.certificate),
            pri_key_filepath=str(self.key),
            ca_filepath=self.emulator.endpoint["root_ca"],
            client_id=self.client_id,
            clean_session=True,
            keep_alive_secs=30,
            on_connection_interrupted=interrupted,
        )
        connecting = connection.connect()
        connecting.add_done_callback(lambda _: connack.append(time.monotonic()))  # on awscrt's thread
        try:
            connecting.result(WAIT)
        except Exception as exc:
            raise SoakFailure(f"the intruder could not connect as {self.client_id}: {exc!r}") from exc
        try:
            connection.disconnect().result(WAIT)
        except Exception as exc:
            raise SoakFailure(f"the intruder could not disconnect: {exc!r}") from exc
        return connack[0], kicked.is_set()


def force_disconnect(intruder: Intruder, notify: NotifyListener, agent: Agent) -> Cycle:
    start = notify.count()  # the daemon is connected and quiet: only watchdog pings until the intruder comes
    connack, kicked = intruder.strike()
    connected = notify.wait_for(CONNECTED, start, connack + WAIT, agent.alive)
    if connected is None:
        if not agent.alive():
            raise SoakFailure(f"fleetprov run exited with status {agent.process.returncode}")
        raise SoakFailure(f"fleetprov run did not reconnect within {WAIT:g} s of the intruder's CONNACK")
    messages = notify.between(start, connected + 1)
    lost = next((m.received for m in messages if m.starts(LOST)), None)
    attempts = [m.received for m in messages if m.starts(CONNECTING)]

    def since(moment: Optional[float]) -> Optional[float]:
        return None if moment is None else (moment - connack) * 1000

    return Cycle(
        reconnect_ms=(messages[-1].received - connack) * 1000,
        lost_ms=since(lost),
        connecting_ms=since(attempts[-1] if attempts else None),
        attempts=len(attempts),
        intruder_kicked=kicked,
    )


# -- the soak ----------------------------------------------------------------------------------------


@dataclass
class Idle:
    seconds: float
    cpu_ticks: int
    watchdog_pings: int
    reconnects: int  # connections the daemon made during the idle phase (0 expected)

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_ticks / CLOCK_TICKS

    @property
    def cpu_percent(self) -> float:
        return self.cpu_seconds / self.seconds * 100


@dataclass
class Outcome:
    cycles: list[Cycle]
    samples: list[Sample]
    warm_up: int
    cycles_seconds: float  # wall time of the cycles
    cycles_cpu_ticks: int  # the daemon's CPU time during them
    idle: Idle
    stop_code: Optional[int]
    stop_seconds: float
    stopping_sent: bool
    log: str
    emulator_log: str


def sample_points(disconnects: int) -> tuple[int, list[int]]:
    """(the warm-up's cycle, the cycles after which to sample: the warm-up's, evenly spaced ones, the last)."""
    warm_up = min(WARM_UP, disconnects // 2)
    span = disconnects - warm_up
    points = {warm_up + round(k * span / SAMPLES_AFTER_WARM_UP) for k in range(SAMPLES_AFTER_WARM_UP + 1)}
    return warm_up, sorted(points)


def idle(agent: Agent, notify: NotifyListener, seconds: float) -> Idle:
    start = notify.count()
    ticks, began = agent.cpu_ticks(), time.monotonic()
    deadline = began + seconds
    while time.monotonic() < deadline:
        if not agent.alive():
            raise SoakFailure(f"fleetprov run exited with status {agent.process.returncode} while idle")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    ticks, wall = agent.cpu_ticks() - ticks, time.monotonic() - began
    messages = notify.between(start, notify.count())
    return Idle(
        seconds=wall,
        cpu_ticks=ticks,
        watchdog_pings=sum(1 for m in messages if "WATCHDOG=1" in m.lines),
        reconnects=sum(1 for m in messages if m.starts(CONNECTED)),
    )


def soak(args: argparse.Namespace, emulator: RunningEmulator, work: Path) -> Outcome:
    config = device_config(emulator, work)
    notify = NotifyListener(work / "notify")
    agent = Agent(config, notify, work / "daemon.log")
    try:
        ready = notify.wait_for("READY=1", 0, time.monotonic() + WAIT, agent.alive)
        if ready is None:
            alive = agent.alive()
            raise SoakFailure(
                f"no READY=1 within {WAIT:g} s" if alive else f"fleetprov run exited {agent.process.returncode}"
            )
        lines = notify.between(ready, ready + 1)[0].lines
        match = next(filter(None, (CLIENT_ID.match(line) for line in lines)), None)
        if match is None:
            raise SoakFailure(f"READY=1 came without 'STATUS=connected as <client id>': {lines}")
        generation = (config.parent / "state" / "current").resolve()
        intruder = Intruder(emulator, generation / "certificate.pem", generation / "private.key", match.group(1))
        print(f"daemon pid {agent.process.pid} ready as {match.group(1)}; forcing {args.disconnects} disconnects")

        warm_up, points = sample_points(args.disconnects)
        samples = [agent.sample("ready", 0)]
        cycles: list[Cycle] = []
        ticks, began = agent.cpu_ticks(), time.monotonic()
        for number in range(1, args.disconnects + 1):
            cycles.append(force_disconnect(intruder, notify, agent))
            if number in points:
                samples.append(agent.sample("warm-up" if number == warm_up else f"cycle {number}", number))
                print(
                    f"  {number:5} cycles  RSS {samples[-1].rss_kib * 1024 / 1e6:6.2f} MB  fds {samples[-1].fds:3}  "
                    f"threads {samples[-1].threads:3}  last reconnect {cycles[-1].reconnect_ms:6.1f} ms",
                    flush=True,
                )
        ticks, cycles_seconds = agent.cpu_ticks() - ticks, time.monotonic() - began
        if warm_up == 0:
            samples[0].label = "ready = warm-up"

        print(f"idle for {args.idle_seconds:g} s", flush=True)
        time.sleep(1.0)  # settle after the last reconnect (not measured)
        idled = idle(agent, notify, args.idle_seconds)
        samples.append(agent.sample("after idle", args.disconnects))

        before_stop = notify.count()
        stop_code, stop_seconds = agent.stop()
        time.sleep(0.3)  # the last datagrams reach the reader thread
        stopping = any("STOPPING=1" in m.lines for m in notify.between(before_stop, notify.count()))
        if stop_code is None:
            raise SoakFailure(f"fleetprov run did not exit within {WAIT:g} s of SIGTERM")
        return Outcome(
            cycles,
            samples,
            warm_up,
            cycles_seconds,
            ticks,
            idled,
            stop_code,
            stop_seconds,
            stopping,
            agent.log(),
            emulator.log_path.read_text(),
        )
    except SoakFailure as failure:
        failure.log_tail = tail(agent.log_path, LOG_TAIL_LINES) or "(empty)"
        raise
    finally:
        agent.kill()
        notify.close()


# -- figures -----------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p90, p99 = (percentile(values, p) for p in (50, 90, 99))
    return f"p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {max(values):.1f}  (min {min(values):.1f})"


def log_summary(log: str, disconnects: int) -> list[tuple[str, str]]:
    levels = LOG_LEVEL.findall(log)
    warnings = [
        line
        for line in log.splitlines()
        if LOG_LEVEL.match(line) and "connection lost" not in line  # the expected ones, one per disconnect
    ]
    rows = [
        (
            "daemon log",
            f"{log.count('fleetprov.daemon: connection lost: ')} 'connection lost' (expected {disconnects}), "
            f"{log.count('fleetprov.daemon: connected to ')} 'connected to' (expected {disconnects + 1})",
        ),
        (
            "daemon log levels",
            f"{levels.count('WARNING')} WARNING, {levels.count('ERROR')} ERROR, {levels.count('CRITICAL')} CRITICAL, "
            f"{log.count('Traceback')} Traceback",
        ),
    ]
    distinct = sorted({line.split(" ", 2)[2] for line in warnings})
    rows += [("other warning/error", line[:150]) for line in distinct[:10]]
    return rows


def print_report(args: argparse.Namespace, outcome: Outcome, elapsed: float) -> None:
    cycles = outcome.cycles
    by_label = {sample.label: sample for sample in outcome.samples}
    warm = next(s for s in outcome.samples if s.cycle == outcome.warm_up)
    end = next(s for s in outcome.samples if s.cycle == args.disconnects and s.label != "after idle")
    after_idle = by_label["after idle"]
    growth_mb = (end.rss_kib - warm.rss_kib) * 1024 / 1e6
    rows = [
        ("disconnects done", f"{len(cycles)} of {args.disconnects}"),
        ("reconnect latency (ms)", spread([c.reconnect_ms for c in cycles])),
        ("  CONNACK -> 'connection lost'", spread([c.lost_ms for c in cycles if c.lost_ms is not None])),
        ("  CONNACK -> last 'connecting to'", spread([c.connecting_ms for c in cycles if c.connecting_ms is not None])),
        (
            "  'connecting to' -> connected",
            spread([c.reconnect_ms - c.connecting_ms for c in cycles if c.connecting_ms is not None]),
        ),
        (
            "old session closed at once",
            f"{sum(1 for c in cycles if c.lost_ms is not None and c.lost_ms < 500)} cycles "
            "(< 500 ms from CONNACK to 'connection lost')",
        ),
        ("cycles with > 1 attempt", str(sum(1 for c in cycles if c.attempts > 1))),
        ("intruder closed by the reconnect", f"{sum(1 for c in cycles if c.intruder_kicked)} (before it disconnected)"),
        (
            f"RSS warm-up (cycle {warm.cycle}) / end",
            f"{warm.rss_kib * 1024 / 1e6:.2f} MB / {end.rss_kib * 1024 / 1e6:.2f} MB  (after idle "
            f"{after_idle.rss_kib * 1024 / 1e6:.2f} MB; at READY {outcome.samples[0].rss_kib * 1024 / 1e6:.2f} MB)",
        ),
        (
            "RSS growth",
            f"{growth_mb:+.2f} MB  target <= {RSS_GROWTH_TARGET_MB:g} MB: {verdict(growth_mb <= RSS_GROWTH_TARGET_MB)}",
        ),
        (
            "fds warm-up / end",
            f"{warm.fds} / {end.fds}  (after idle {after_idle.fds}; samples "
            f"{', '.join(str(s.fds) for s in outcome.samples)})  stable: {verdict(end.fds <= warm.fds)}",
        ),
        ("threads warm-up / end", f"{warm.threads} / {end.threads}"),
        (
            "daemon CPU during the cycles",
            f"{outcome.cycles_cpu_ticks / CLOCK_TICKS:.2f} s in {outcome.cycles_seconds:.0f} s "
            f"({outcome.cycles_cpu_ticks / CLOCK_TICKS / max(1, len(cycles)) * 1000:.1f} ms per reconnect)",
        ),
        (
            "idle CPU",
            f"{outcome.idle.cpu_percent:.3f} % of one core ({outcome.idle.cpu_ticks} ticks of "
            f"{1000 / CLOCK_TICKS:g} ms in {outcome.idle.seconds:.1f} s)  target <= {IDLE_CPU_TARGET_PERCENT:g} %: "
            f"{verdict(outcome.idle.cpu_percent <= IDLE_CPU_TARGET_PERCENT)}",
        ),
        ("idle", f"{outcome.idle.watchdog_pings} WATCHDOG=1, {outcome.idle.reconnects} reconnects"),
        (
            "SIGTERM",
            f"exit {outcome.stop_code} in {outcome.stop_seconds:.2f} s, "
            f"STOPPING=1 {'seen' if outcome.stopping_sent else 'NOT seen'}"
            f"  {verdict(outcome.stop_code == 0 and outcome.stop_seconds <= STOP_PROMISE_SECONDS)}",
        ),
        *log_summary(outcome.log, len(cycles)),
        ("emulator log", f"{outcome.emulator_log.count('Traceback')} Traceback"),
        ("wall time", f"{elapsed:.0f} s"),
    ]
    print(
        f"\nfleetprov run soak: {args.disconnects} forced disconnects (reconnect delay {RECONNECT_INITIAL_DELAY:g} s "
        f"initial, {RECONNECT_MAX_DELAY:g} s cap), {args.idle_seconds:g} s idle, WATCHDOG_USEC={WATCHDOG_USEC}"
    )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


# -- main --------------------------------------------------------------------------------------------


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--disconnects", type=positive_int, default=500, help="forced disconnects (default 500)")
    parser.add_argument(
        "--idle-seconds", type=positive_seconds, default=60.0, help="idle phase for the CPU figure (default 60)"
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetprov-soak-") as tmp:
        work = Path(tmp)
        emulator = launch(work / "emulator", log_path=work / "emulator.log", wait=WAIT)
        try:
            outcome = soak(args, emulator, work)
        except SoakFailure as failure:
            print(f"\nFAILED: {failure}", file=sys.stderr)
            if failure.log_tail:
                print(f"fleetprov run's log ends with:\n{failure.log_tail}", file=sys.stderr)
            return 1
        finally:  # also on an error or Ctrl-C
            emulator.stop()
    print_report(args, outcome, time.monotonic() - started)
    if outcome.stop_code != 0:
        print(f"\nfleetprov run exited {outcome.stop_code} on SIGTERM; its log ends with:", file=sys.stderr)
        print("\n".join(outcome.log.splitlines()[-LOG_TAIL_LINES:]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the daemon and the emulator were stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
