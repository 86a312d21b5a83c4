"""Real transports for `fleetprov --once`: MQTT 5 through Debian's mosquitto, an HTTP CONNECT proxy (Debian's
tinyproxy), and port 443 with ALPN. Fixtures start real processes on free loopback ports, wait (bounded) until
they listen, and stop them at teardown; their logs go into assertion messages."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.support import Emulator, start_emulator

START_TIMEOUT = 30  # seconds for a helper process to listen or say it is ready
STOP_TIMEOUT = 10  # seconds between SIGTERM and SIGKILL

MOSQUITTO = "/usr/sbin/mosquitto"
TINYPROXY = "/usr/bin/tinyproxy"
OPENSSL = "openssl"
RESPONDER = Path(__file__).resolve().parent.parent / "mqtt5_responder.py"


def require_binary(program: str, package: str) -> str:
    """The program's path; a missing one fails the test loudly, naming the Debian package to install."""
    found = shutil.which(program)
    if found is None:
        pytest.fail(f"{program} is not installed: install the Debian package {package} (`make deps` as root)")
    return found


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[Any], what: str, logs: Callable[[], str]) -> None:
    """Wait until ready() holds; fail with the logs if the process exits or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode} before it was ready:\n{logs()}")
        if time.monotonic() > deadline:
            stop_process(process)
            pytest.fail(f"{what} was not ready within {START_TIMEOUT} s:\n{logs()}")
        time.sleep(0.05)


def edit_config(config: Path, **changes: Any) -> dict[str, Any]:
    """Change top-level keys of a device configuration file; returns the new settings."""
    settings: dict[str, Any] = yaml.safe_load(config.read_text())
    settings.update(changes)
    config.write_text(yaml.safe_dump(settings))
    return settings


# -- mosquitto ----------------------------------------------------------------------------------------


@dataclass
class Mosquitto:
    port: int
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    output_path: Path  # stdout/stderr: what it says before its log file is open

    def log(self) -> str:
        return read(self.log_path)

    def logs(self) -> str:
        return f"--- mosquitto log ({self.log_path}):\n{self.log()}\n--- mosquitto output:\n{read(self.output_path)}"


def start_mosquitto(directory: Path, ca_dir: Path) -> Mosquitto:
    """mosquitto on a free loopback port, TLS with the emulator's server certificate; clients must present a
    certificate issued by the emulator's CA (client-ca-bundle.pem: issuing CA + root)."""
    binary = require_binary(MOSQUITTO, "mosquitto")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path, output_path, config_path = (directory / f"mosquitto.{suffix}" for suffix in ("log", "out", "conf"))
    lines = [
        "per_listener_settings false",
        f"listener {port} 127.0.0.1",
        f"cafile {ca_dir / 'client-ca-bundle.pem'}",
        f"certfile {ca_dir / 'server.pem'}",
        f"keyfile {ca_dir / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"log_dest file {log_path}",
        "log_type all",
        "log_timestamp true",
        "connection_messages true",
        "persistence false",
    ]
    if os.geteuid() == 0:
        # As root mosquitto would switch to the user `mosquitto`, who cannot read the emulator's 0700 state.
        lines.append("user root")
    config_path.write_text("\n".join(lines) + "\n")
    with output_path.open("wb") as output:
        process = subprocess.Popen([binary, "-c", str(config_path)], stdout=output, stderr=subprocess.STDOUT)
    mosquitto = Mosquitto(port, process, config_path, log_path, output_path)
    # It logs "running" once its listener is open (probing the port would only add TLS errors to its log).
    wait_until(lambda: " running" in read(log_path), process, "mosquitto", mosquitto.logs)
    return mosquitto


@dataclass
class Responder:
    process: subprocess.Popen[bytes]
    output_path: Path

    def log(self) -> str:
        return read(self.output_path)


def start_responder(directory: Path, emulator: Emulator, mosquitto: Mosquitto) -> Responder:
    """tests/mqtt5_responder.py connected to mosquitto with a certificate of its own, answering requests from
    the emulator's ProvisioningService on the emulator's state."""
    credentials = directory / "responder-identity"
    emulator.admin("claim", "--out", str(credentials))
    output_path = directory / "responder.log"
    with output_path.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(RESPONDER), "--state-dir", str(emulator.state_dir), "--port", str(mosquitto.port),
             "--cert", str(credentials / "claim.pem"), "--key", str(credentials / "claim.key")],
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    responder = Responder(process, output_path)
    wait_until(
        lambda: "ready" in read(output_path).splitlines(),
        process,
        "mqtt5_responder.py",
        lambda: f"--- responder output:\n{responder.log()}\n{mosquitto.logs()}",
    )
    return responder


@dataclass
class Mqtt5Broker:
    """mosquitto (MQTT 5) answering fleet provisioning through the responder, on an emulator's state."""

    emulator: Emulator
    mosquitto: Mosquitto
    responder: Responder

    @property
    def port(self) -> int:
        return self.mosquitto.port

    def logs(self) -> str:
        return f"{self.mosquitto.logs()}\n--- responder output:\n{self.responder.log()}"


@pytest.fixture
def mqtt5_broker(tmp_path: Path) -> Iterator[Mqtt5Broker]:
    # The emulator runs only for its state: CA files (client-ca-bundle.pem is written when it serves), the
    # claim and the registry. Devices talk to mosquitto, never to it.
    emulator = start_emulator(tmp_path / "emulator-state")
    started: list[Callable[[], Any]] = [emulator.stop]
    try:
        mosquitto = start_mosquitto(tmp_path / "mosquitto", emulator.state_dir / "ca")
        started.append(lambda: stop_process(mosquitto.process))
        responder = start_responder(tmp_path / "mosquitto", emulator, mosquitto)
        started.append(lambda: stop_process(responder.process))
        yield Mqtt5Broker(emulator, mosquitto, responder)
    finally:
        for stop in reversed(started):
            with contextlib.suppress(Exception):  # stop the rest even if one is already gone
                stop()


# -- tinyproxy ----------------------------------------------------------------------------------------


@dataclass
class TinyProxy:
    port: int
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    output_path: Path

    def log(self) -> str:
        return read(self.log_path)

    def logs(self) -> str:
        return f"--- tinyproxy log ({self.log_path}):\n{self.log()}\n--- tinyproxy output:\n{read(self.output_path)}"


def start_tinyproxy(directory: Path, connect_port: int) -> TinyProxy:
    """tinyproxy in the foreground on a free loopback port, allowing CONNECT only to connect_port."""
    binary = require_binary(TINYPROXY, "tinyproxy")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path, output_path, config_path = (directory / f"tinyproxy.{suffix}" for suffix in ("log", "out", "conf"))
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 60",
        "Allow 127.0.0.1",
        f"ConnectPort {connect_port}",
        f'LogFile "{log_path}"',
        "LogLevel Info",
        f'PidFile "{directory / "tinyproxy.pid"}"',
        "MaxClients 20",
    ]
    config_path.write_text("\n".join(lines) + "\n")
    with output_path.open("wb") as output:
        process = subprocess.Popen([binary, "-d", "-c", str(config_path)], stdout=output, stderr=subprocess.STDOUT)
    proxy = TinyProxy(port, process, config_path, log_path, output_path)
    wait_until(lambda: "Accepting connections." in read(log_path), process, "tinyproxy", proxy.logs)
    return proxy


@pytest.fixture
def tinyproxy(emulator: Emulator, tmp_path: Path) -> Iterator[TinyProxy]:
    """tinyproxy in front of the shared emulator."""
    proxy = start_tinyproxy(tmp_path / "tinyproxy", emulator.port)
    try:
        yield proxy
    finally:
        stop_process(proxy.process)


# -- port 443 -----------------------------------------------------------------------------------------


def require_free_port_443() -> None:
    """Fail loudly, never skip, when this machine cannot give the emulator 127.0.0.1:443."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", 443))
        except OSError as exc:
            pytest.fail(
                f"cannot bind 127.0.0.1:443 ({exc.strerror}): the port 443 test needs it free and needs root "
                "(or CAP_NET_BIND_SERVICE); `ss -ltnp 'sport = :443'` shows who holds it"
            )


def openssl_alpn(emulator: Emulator, cert: Path, key: Path, alpn: str) -> subprocess.CompletedProcess[str]:
    """One TLS handshake with `openssl s_client` offering ALPN `alpn`, presenting cert/key."""
    return subprocess.run(
        [require_binary(OPENSSL, "openssl"), "s_client", "-connect", f"127.0.0.1:{emulator.port}", "-alpn", alpn,
         "-CAfile", str(emulator.root_ca), "-cert", str(cert), "-key", str(key), "-verify_return_error"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
