"""Connections that cannot be made: a key file that is not a key, a broker that never sends its CONNACK, a
CONNACK that comes after fleetprov gave up. Clear errors, documented exit codes, no traceback, and no
connection left behind with the device's client id (real awscrt, real TLS on loopback, the real emulator)."""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetprov.errors import EX_CONFIG, EX_TEMPFAIL, EndpointUnavailable
from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX
from fleetprov.session import Endpoint, Identity, connect
from tests.support import Emulator, device_config, fleetprov
from tests.support import connect as connect_directly

NOT_A_KEY = "this file is readable, but it is not a private key\n"
TIMEOUT = 1.0  # operation_timeout of these tests: short, so that they are
GONE_WAIT = 30.0  # generous bound on a wait for what must happen; nothing here asserts a duration


def _config(emulator: Emulator, directory: Path, **changes: Any) -> Path:
    path = device_config(emulator, directory)
    document = yaml.safe_load(path.read_text())
    document.update(changes)
    path.write_text(yaml.safe_dump(document))
    return path


def _server_context(emulator: Emulator) -> ssl.SSLContext:
    """The emulator's own TLS server side (its certificate, client certificates required): a device's TLS
    handshake succeeds, so what follows is about MQTT."""
    ca = emulator.root_ca.parent
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca / "client-ca-bundle.pem"))
    context.load_cert_chain(str(ca / "server.pem"), str(ca / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("broken", ["claim key", "device key"])
def test_a_file_that_is_not_a_key_exits_78_naming_it(emulator: Emulator, tmp_path: Path, broken: str) -> None:
    not_a_key = tmp_path / "not-a.key"
    not_a_key.write_text(NOT_A_KEY)
    not_a_key.chmod(0o600)
    if broken == "claim key":
        config = _config(
            emulator, tmp_path, claim={"certificate": str(emulator.claim_cert), "private_key": str(not_a_key)}
        )
    else:  # provisioned, then the stored key is damaged: the check of the identity at the next start says so
        config = _config(emulator, tmp_path)
        assert fleetprov("--once", "--config", str(config)).returncode == 0
        not_a_key = (tmp_path / "state" / "current" / "private.key").resolve()
        not_a_key.write_text(NOT_A_KEY)
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == EX_CONFIG, result.stderr
    step = "connect" if broken == "claim key" else "verify"
    assert _one_line_error(result.stderr) == f"fleetprov: {step}: {not_a_key} is not a PEM private key"


class SilentBroker:
    """Accepts TCP and TLS as the emulator does, reads what comes, and never answers: no CONNACK, ever.
    Counts the connections and the most ever open at once."""

    def __init__(self, emulator: Emulator) -> None:
        self._context = _server_context(emulator)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.most_open = 0
        self._open: set[ssl.SSLSocket] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stopping.is_set():
                ready = [key.fileobj for key, _ in selector.select(0.05)]
                # Hang-ups first, then new connections: a connection the client closed before it opened the next
                # one never counts as open at the same time as that one.
                for connection in [c for c in ready if c is not self._listener]:
                    assert isinstance(connection, ssl.SSLSocket)
                    if not self._read(connection):
                        selector.unregister(connection)
                        self._open.discard(connection)
                        connection.close()
                if self._listener in ready:
                    accepted = self._accept()
                    if accepted is not None:
                        selector.register(accepted, selectors.EVENT_READ)
            for connection in self._open:
                connection.close()

    def _accept(self) -> ssl.SSLSocket | None:
        raw, _ = self._listener.accept()
        raw.settimeout(10)
        try:
            connection = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return None
        connection.setblocking(False)
        self.connections += 1
        self._open.add(connection)
        self.most_open = max(self.most_open, len(self._open))
        return connection

    @staticmethod
    def _read(connection: ssl.SSLSocket) -> bool:
        """Reads all that has come; False once the client has gone (the end may come right after data)."""
        try:
            while connection.recv(65536):
                pass
        except ssl.SSLWantReadError:
            return True  # all read; still open
        except (OSError, ssl.SSLError):
            return False
        return False

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._listener.close()


@pytest.fixture
def silent_broker(emulator: Emulator) -> Iterator[SilentBroker]:
    broker = SilentBroker(emulator)
    yield broker
    broker.stop()


def test_no_connack_is_a_clear_temporary_failure_and_each_attempt_is_closed(
    emulator: Emulator, silent_broker: SilentBroker, tmp_path: Path
) -> None:
    config = _config(emulator, tmp_path, port=silent_broker.port, operation_timeout=TIMEOUT)
    attempts = yaml.safe_load(config.read_text())["retry"]["max_attempts"]
    result = fleetprov("--once", "--config", str(config))
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert _one_line_error(result.stderr).endswith(
        f"last error: connect: CONNECT to localhost:{silent_broker.port}: no CONNACK within {TIMEOUT:g} s"
    )
    assert silent_broker.connections == attempts
    # awscrt gave every attempt up (and closed it) when fleetprov did: none was still waiting for its CONNACK,
    # with the device's client id, while the next one connected.
    assert silent_broker.most_open == 1


class HoldingProxy:
    """A proxy in front of the emulator that passes on what the device sends at once, and what the emulator
    answers only once ``release`` is called. ``terminate_tls``: TLS with the device as the emulator (its server
    certificate) and with the emulator as the claim, so that what is held is the CONNACK; otherwise plain TCP, so
    that what is held is the TLS handshake (and the CONNACK comes as soon as the CONNECT can be sent)."""

    def __init__(self, emulator: Emulator, *, terminate_tls: bool) -> None:
        self._emulator = emulator
        self._terminate_tls = terminate_tls
        self._released = asyncio.Event()
        self.device_gone = asyncio.Event()  # the device closed its connection
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        device_side = _server_context(self._emulator) if self._terminate_tls else None
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=device_side)
        self.port = self._server.sockets[0].getsockname()[1]

    def release(self) -> None:
        self._released.set()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, device_reader: asyncio.StreamReader, device_writer: asyncio.StreamWriter) -> None:
        emulator_side = None
        if self._terminate_tls:
            emulator_side = ssl.create_default_context(cafile=str(self._emulator.root_ca))
            emulator_side.load_cert_chain(str(self._emulator.claim_cert), str(self._emulator.claim_key))
        emulator_reader, emulator_writer = await asyncio.open_connection(
            "localhost", self._emulator.port, ssl=emulator_side
        )
        answers = asyncio.ensure_future(self._answers(emulator_reader, device_writer))
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await device_reader.read(65536):
                emulator_writer.write(data)
                await emulator_writer.drain()
        self.device_gone.set()
        answers.cancel()
        for writer in (device_writer, emulator_writer):
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):
                await self._released.wait()
                if self.device_gone.is_set():
                    return
                writer.write(data)
                await writer.drain()


@pytest.mark.parametrize(
    "held",
    [
        # awscrt's own wait for the CONNACK ends with fleetprov's: it closes the connection then.
        "connack",
        # The TLS handshake is held past fleetprov's wait, so awscrt's wait for the CONNACK (which starts after
        # it) is not over when the CONNACK comes: the connection is made, after fleetprov gave up. It is closed.
        "tls handshake",
    ],
)
def test_a_connack_after_fleetprov_gave_up_leaves_no_connection(emulator: Emulator, held: str) -> None:
    client_id = CLAIM_CLIENT_ID_PREFIX + "late-" + held.replace(" ", "-")

    async def give_up_waiting() -> None:
        proxy = HoldingProxy(emulator, terminate_tls=held == "connack")
        await proxy.start()
        endpoint = Endpoint(host="localhost", port=proxy.port, root_ca=emulator.root_ca, timeout=TIMEOUT)
        claim = Identity(certificate=emulator.claim_cert, private_key=emulator.claim_key)
        try:
            with pytest.raises(EndpointUnavailable, match=f"no CONNACK within {TIMEOUT:g} s"):
                await connect(endpoint, claim, client_id)
            proxy.release()
            try:
                await asyncio.wait_for(proxy.device_gone.wait(), GONE_WAIT)
            except asyncio.TimeoutError:
                raise AssertionError(f"{client_id} is still connected, after fleetprov gave it up") from None
        finally:
            await proxy.stop()

    asyncio.run(give_up_waiting())
    assert f"client {client_id!r} connected" in emulator.log()  # the emulator had the CONNECT
    # The emulator, like AWS, closes the older of two connections with one client id: it has none to close.
    connection = connect_directly(emulator, emulator.claim_cert, emulator.claim_key, client_id)
    connection.disconnect().result(10)
    assert f"client id {client_id!r} connected again" not in emulator.log()
