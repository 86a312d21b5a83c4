"""MQTT sessions with AWS IoT Core over mutual TLS: awscrt through awsiotsdk's builders, MQTT 3.1.1 or 5.

One job: open a connection with a given identity, wait for its CONNACK, hand the protocol client to the
provisioning API, and close it. Port 443 uses ALPN ``x-amzn-mqtt-ca`` (the builders set it). An HTTP proxy
is reached with CONNECT. Server verification cannot be turned off: there is no option for it.

The boundary to awscrt: every awscrt error leaves as a FleetprovError (ConfigError for the device's own files and
token, EndpointUnavailable or ConnectionRefused for the endpoint); every awscrt future is awaited with
``crt_result``; a CONNECT fleetprov gave up on never stays connected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from awscrt import exceptions as crt_exceptions
from awscrt import http, io, mqtt, mqtt5
from awsiot import mqtt5_client_builder, mqtt_connection_builder

from fleetprov.config import ProxyConfig
from fleetprov.errors import ConfigError, EndpointUnavailable, Refused
from fleetprov.tls_files import unusable_file

log = logging.getLogger(__name__)

ProtocolClient = Union[mqtt.Connection, mqtt5.Client]
T = TypeVar("T")

# What a refused connection looks like from the device: AWS IoT Core closes the connection after the TLS
# handshake (bad certificate status, a policy without iot:Connect for this client id) rather than sending
# a CONNACK with a reason code; brokers that do answer say "not authorized".
_REFUSAL_ERRORS = frozenset({"AWS_ERROR_MQTT_PROTOCOL_ERROR", "AWS_ERROR_MQTT_UNEXPECTED_HANGUP"})
_REFUSAL_CODES = frozenset({mqtt.ConnectReturnCode.NOT_AUTHORIZED, mqtt.ConnectReturnCode.BAD_USERNAME_OR_PASSWORD})
# What awscrt reports when its own wait for the CONNACK ends (MQTT 3.1.1, MQTT 5).
_CONNACK_TIMEOUTS = frozenset({"AWS_ERROR_MQTT_TIMEOUT", "AWS_ERROR_MQTT5_CONNACK_TIMEOUT"})
# awscrt gives a CONNECT up itself (and closes its socket then); fleetprov waits this much longer, only in case
# awscrt's callback never comes.
_CALLBACK_GRACE = 1.0


class ConnectionRefused(Refused):
    """The endpoint accepted TLS but refused this identity or client id."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    root_ca: Path
    mqtt_version: int = 3
    keep_alive: int = 60
    timeout: float = 30.0
    proxy: Optional[ProxyConfig] = None


@dataclass(frozen=True)
class TokenKey:
    """A private key in a PKCS#11 token, as awscrt selects it: library, token (label or slot), key label."""

    library: Path
    token_label: Optional[str]
    slot: Optional[int]
    key_label: str
    pin: str = field(repr=False)  # a secret: never shown, not even in a traceback's locals


@dataclass(frozen=True)
class Identity:
    """The TLS client identity: a certificate file, and its private key in a file or in a token."""

    certificate: Path
    private_key: Optional[Path] = None
    token_key: Optional[TokenKey] = None

    def __post_init__(self) -> None:
        if (self.private_key is None) == (self.token_key is None):
            raise ValueError("an identity has its key in a file or in a token")


_pkcs11_libraries: dict[Path, io.Pkcs11Lib] = {}


def _pkcs11_library(path: Path) -> io.Pkcs11Lib:
    """One awscrt handle per module and process. DEFAULT: C_Initialize tolerates a module that python-pkcs11
    initialised, and awscrt never calls C_Finalize, which would pull the module from under the other."""
    if path not in _pkcs11_libraries:
        try:
            _pkcs11_libraries[path] = io.Pkcs11Lib(
                file=str(path), behavior=io.Pkcs11Lib.InitializeFinalizeBehavior.DEFAULT
            )
        except crt_exceptions.AwsCrtError as exc:
            raise ConfigError(f"{path} is not a usable PKCS#11 library: {exc.name}", step="connect") from None
    return _pkcs11_libraries[path]


def _proxy_options(proxy: Optional[ProxyConfig]) -> Optional[http.HttpProxyOptions]:
    if proxy is None:
        return None
    if proxy.username is not None:
        return http.HttpProxyOptions(
            proxy.host,
            proxy.port,
            auth_type=http.HttpProxyAuthenticationType.Basic,
            auth_username=proxy.username,
            auth_password=proxy.password or "",
        )
    return http.HttpProxyOptions(proxy.host, proxy.port)


def _builder_options(endpoint: Endpoint, identity: Identity, client_id: str) -> dict[str, Any]:
    """What awsiotsdk's MQTT 3.1.1 and MQTT 5 builders take alike (they add ALPN for port 443 themselves)."""
    options: dict[str, Any] = {
        "endpoint": endpoint.host,
        "port": endpoint.port,
        "cert_filepath": str(identity.certificate),
        "ca_filepath": str(endpoint.root_ca),
        "client_id": client_id,
        "http_proxy_options": _proxy_options(endpoint.proxy),
    }
    token = identity.token_key
    if token is None:
        options["pri_key_filepath"] = str(identity.private_key)
    else:
        options.update(
            pkcs11_lib=_pkcs11_library(token.library),
            user_pin=token.pin,
            slot_id=token.slot,
            token_label=token.token_label,
            private_key_label=token.key_label,
        )
    return options


def _built(build: Callable[..., T], identity: Identity, root_ca: Path, **options: Any) -> T:
    """An awsiotsdk builder's client. Whatever stops awscrt from making one is local (a file, a token, the proxy
    settings), so every error here is a ConfigError (exit 78) that names what to fix."""
    try:
        return build(**options)
    except OSError as exc:  # awscrt reads the certificate, key and CA files itself, in Python
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}", step="connect") from None
    except (crt_exceptions.AwsCrtError, RuntimeError) as exc:  # awscrt raises RuntimeError("1075 (AWS_ERROR_...)")
        error = str(exc) + getattr(exc, "name", "")
        token = identity.token_key
        if token is not None and "AWS_ERROR_PKCS11" in error:
            raise ConfigError(_token_problem(token, error), step="connect") from None
        # awscrt's error names no file (AWS_ERROR_INVALID_ARGUMENT, AWS_IO_TLS_CTX_ERROR): find the one at fault.
        problem = unusable_file(root_ca, identity.certificate, identity.private_key)
        if problem is None:
            name = re.search(r"AWS_\w+", error)
            problem = f"awscrt cannot use {identity.certificate} and its key: {name.group(0) if name else error}"
        raise ConfigError(problem, step="connect") from None


def _token_problem(token: TokenKey, error: str) -> str:
    where = f"token {token.token_label!r}" if token.token_label is not None else f"the token in slot {token.slot}"
    if "KEY_NOT_FOUND" in error:
        return f"{where} holds no private key with label {token.key_label!r} (or more than one)"
    if "PIN_INCORRECT" in error:
        return f"the PIN was refused by {where}"
    if "TOKEN_NOT_FOUND" in error:
        return f"no token labelled {token.token_label!r} in {token.library}"
    name = re.search(r"AWS_ERROR_PKCS11\w*", error)
    return f"{where} cannot give key {token.key_label!r} to TLS: {name.group(0) if name else error}"


def _refusal(endpoint: Endpoint, client_id: str, what: str) -> ConnectionRefused:
    return ConnectionRefused(
        f"{endpoint.host}:{endpoint.port} refused the connection as {client_id!r} ({what}): check that the "
        "certificate is registered and ACTIVE, that its policy allows iot:Connect for this client id, and that "
        "no other connection uses the same client id",
        step="connect",
    )


def _where(endpoint: Endpoint) -> str:
    proxy = f" via HTTP proxy {endpoint.proxy.host}:{endpoint.proxy.port}" if endpoint.proxy else ""
    return f"{endpoint.host}:{endpoint.port}{proxy}"


def _connect_error(endpoint: Endpoint, client_id: str, exc: BaseException) -> Exception:
    if isinstance(exc, crt_exceptions.AwsCrtError):
        if exc.name in _REFUSAL_ERRORS:
            return _refusal(endpoint, client_id, exc.name)
        if exc.name in _CONNACK_TIMEOUTS:
            return _no_connack(endpoint)
        return EndpointUnavailable(f"cannot connect to {_where(endpoint)}: {exc.name}", step="connect")
    if exc.args and isinstance(exc.args[0], mqtt.ConnectReturnCode):
        code = exc.args[0]
        if code in _REFUSAL_CODES:
            return _refusal(endpoint, client_id, f"CONNACK {code.name}")
        return EndpointUnavailable(f"{endpoint.host}:{endpoint.port} answered CONNACK {code.name}", step="connect")
    return EndpointUnavailable(f"cannot connect to {_where(endpoint)}: {exc}", step="connect")


async def crt_result(future: concurrent.futures.Future[T], timeout: Optional[float]) -> T:
    """The outcome of a future that awscrt completes from its own threads, awaited for at most ``timeout``
    seconds (None: no limit); asyncio.TimeoutError when it is not complete by then.

    The only way fleetprov awaits awscrt: a timeout, or the awaiting task being cancelled, leaves awscrt's future
    alone. ``wait_for(wrap_future(future))`` would cancel it, and awscrt completing a cancelled future later
    raises InvalidStateError in awscrt's thread ("Exception ignored in ..." on stderr, the outcome lost)."""
    outcome = asyncio.wrap_future(future)
    # Given up on, the outcome is nobody's: an error in it must not be logged as "never retrieved" (asyncio.shield
    # stops looking at its inner future when the outer one is cancelled).
    outcome.add_done_callback(_retrieved)
    return await asyncio.wait_for(asyncio.shield(outcome), timeout)


def _retrieved(outcome: asyncio.Future[Any]) -> None:
    if not outcome.cancelled():
        outcome.exception()


def _connack_timeout(endpoint: Endpoint) -> float:
    """How long awscrt waits for the CONNACK: the operation timeout, but less than the keep-alive (MQTT 3.1.1's
    wait is awscrt's ping timeout, 3 s by default whatever the operation timeout, and must be shorter)."""
    return min(endpoint.timeout, endpoint.keep_alive / 2)


def _no_connack(endpoint: Endpoint) -> EndpointUnavailable:
    return EndpointUnavailable(
        f"CONNECT to {_where(endpoint)}: no CONNACK within {_connack_timeout(endpoint):g} s", step="connect"
    )


class _LostSignal:
    """Set, from awscrt's thread, when an established connection goes away: the daemon reconnects itself (with
    jitter), so awscrt's own reconnect is cut short by closing the session."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[str] = concurrent.futures.Future()

    def set(self, why: str) -> None:
        if not self.future.done():
            self.future.set_result(why)

    async def wait(self) -> str:
        """Why the connection was lost, once it is."""
        return await crt_result(self.future, None)


class _Mqtt3Session:
    def __init__(self, endpoint: Endpoint, identity: Identity, client_id: str) -> None:
        self.client_id = client_id
        self.lost = _LostSignal()
        build = (
            mqtt_connection_builder.mtls_with_pkcs11 if identity.token_key else mqtt_connection_builder.mtls_from_path
        )
        self.connection = _built(
            build,
            identity,
            endpoint.root_ca,
            **_builder_options(endpoint, identity, client_id),
            clean_session=True,
            keep_alive_secs=endpoint.keep_alive,
            ping_timeout_ms=max(1, round(_connack_timeout(endpoint) * 1000)),
            on_connection_interrupted=self._on_interrupted,
        )

    def _on_interrupted(self, connection: mqtt.Connection, error: BaseException, **kwargs: Any) -> None:
        self.lost.set(getattr(error, "name", "") or str(error) or type(error).__name__)

    async def open(self, endpoint: Endpoint) -> None:
        try:
            connected = self.connection.connect()
        except Exception as exc:
            raise _connect_error(endpoint, self.client_id, exc) from exc
        try:
            await crt_result(connected, _connack_timeout(endpoint) + _CALLBACK_GRACE)
        except BaseException as exc:
            # awscrt refuses to disconnect a connection still waiting for its CONNACK, and a CONNACK after this
            # point would leave a live connection with this client id, nobody using it: it goes once connected.
            connected.add_done_callback(self._disconnect_if_connected)
            if isinstance(exc, asyncio.TimeoutError):
                raise _no_connack(endpoint) from None
            if isinstance(exc, Exception):  # awscrt reports every failure as a plain exception from the future
                raise _connect_error(endpoint, self.client_id, exc) from exc
            raise  # cancelled

    def _disconnect_if_connected(self, connected: concurrent.futures.Future[Any]) -> None:
        """Runs in awscrt's thread (or at once, if the CONNECT is over)."""
        if not connected.cancelled() and connected.exception() is None:
            log.info("CONNACK for %s came after fleetprov gave up: disconnecting", self.client_id)
            with contextlib.suppress(Exception):  # disconnecting is all that is left to do; nobody waits for it
                self.connection.disconnect()

    async def close(self, timeout: float) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection is best effort
            await crt_result(self.connection.disconnect(), timeout)

    @property
    def protocol_client(self) -> ProtocolClient:
        return self.connection


class _Mqtt5Session:
    def __init__(self, endpoint: Endpoint, identity: Identity, client_id: str) -> None:
        self.client_id = client_id
        self._connected: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.lost = _LostSignal()
        build = mqtt5_client_builder.mtls_with_pkcs11 if identity.token_key else mqtt5_client_builder.mtls_from_path
        self.client = _built(
            build,
            identity,
            endpoint.root_ca,
            **_builder_options(endpoint, identity, client_id),
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            keep_alive_interval_sec=endpoint.keep_alive,
            connack_timeout_ms=max(1, round(_connack_timeout(endpoint) * 1000)),
            on_lifecycle_connection_success=self._on_success,
            on_lifecycle_connection_failure=self._on_failure,
            on_lifecycle_stopped=self._on_stopped,
            on_lifecycle_disconnection=self._on_disconnection,
        )

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        error = data.exception
        self.lost.set(getattr(error, "name", "") or str(error or "") or "disconnected")

    # Lifecycle callbacks run on awscrt's threads; concurrent futures carry the outcome to asyncio.
    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        if not self._connected.done():
            self._connected.set_result(None)

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        if self._connected.done():
            return
        connack = data.connack_packet
        if connack is not None and connack.reason_code in (
            mqtt5.ConnectReasonCode.NOT_AUTHORIZED,
            mqtt5.ConnectReasonCode.BANNED,
            mqtt5.ConnectReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
        ):
            self._connected.set_exception(PermissionError(connack.reason_code.name))
        else:
            self._connected.set_exception(data.exception or ConnectionError("connection failed"))

    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)

    async def open(self, endpoint: Endpoint) -> None:
        try:
            self.client.start()
            await crt_result(self._connected, _connack_timeout(endpoint) + _CALLBACK_GRACE)
        except asyncio.CancelledError:
            self._stop()  # not awaited: the task is going; awscrt's client must not go on connecting without it
            raise
        except Exception as exc:
            # Stopped whatever went wrong: awscrt's client would otherwise go on connecting (and reconnecting)
            # with this client id.
            await self.close(endpoint.timeout)
            if isinstance(exc, asyncio.TimeoutError):
                raise _no_connack(endpoint) from None
            if isinstance(exc, PermissionError):
                raise _refusal(endpoint, self.client_id, f"CONNACK {exc}") from exc
            raise _connect_error(endpoint, self.client_id, exc) from exc

    def _stop(self) -> None:
        with contextlib.suppress(Exception):  # stopping a client that never started is best effort
            self.client.stop()

    async def close(self, timeout: float) -> None:
        self._stop()
        with contextlib.suppress(Exception):
            await crt_result(self._stopped, timeout)

    @property
    def protocol_client(self) -> ProtocolClient:
        return self.client


Session = Union[_Mqtt3Session, _Mqtt5Session]


async def connect(endpoint: Endpoint, identity: Identity, client_id: str) -> Session:
    """A connected session (its CONNACK received); the caller closes it with ``await session.close(...)``."""
    session: Session = (
        _Mqtt5Session(endpoint, identity, client_id)
        if endpoint.mqtt_version == 5
        else _Mqtt3Session(endpoint, identity, client_id)
    )
    await session.open(endpoint)
    return session


@contextlib.asynccontextmanager
async def open_session(endpoint: Endpoint, identity: Identity, client_id: str) -> AsyncIterator[Session]:
    """``connect`` as a context manager: closed on exit."""
    session = await connect(endpoint, identity, client_id)
    try:
        yield session
    finally:
        await session.close(endpoint.timeout)
