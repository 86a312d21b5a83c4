"""amqtt's Broker, taught to behave like AWS IoT Core's endpoint for fleet provisioning.

amqtt 0.12.1 is pinned exactly because this subclass overrides private methods; each override is pinned
by tests/unit/test_amqtt_guard.py, which fails if amqtt's version of the method changes. The overrides:

* ``_create_ssl_context`` (an instance method here, amqtt's is static): client certificates are required
  (amqtt only asks for them), TLS >= 1.2, and ALPN ``x-amzn-mqtt-ca`` is offered for MQTT over port 443 as AWS
  does. Client certificates verify against the emulator's CAs and the customer CAs registered with
  ``fleetprov emulator register-ca``; an ``sni_callback`` records the server name each client sent and, at every
  handshake, adds CAs registered since (so a CA registered while the emulator runs is trusted at once).
* ``_handle_client_session``: identify the connection by its certificate before CONNACK, and drop an older
  connection that uses the same client id, as AWS does. A certificate unknown to the registry but issued by a
  registered CA with auto-registration goes through just-in-time registration first (jit.py): that connection is
  closed without CONNACK, and for JITR the registration event is published with amqtt's
  ``internal_message_broadcast`` (which queues it through ``_broadcast_message``), so ``_topic_filtering``
  decides who receives it.
* ``_authenticate``: only registered ACTIVE certificates whose policy allows iot:Connect get in (and
  ``enforce_certificate_status`` closes a connection whose certificate stops being ACTIVE).
* ``_topic_filtering``: IoT policies decide publish, subscribe and receive; a denied publish or subscribe
  closes the connection, as AWS does.
* ``_handle_message_delivery``: requests on ``$aws/...`` topics (which amqtt refuses) go to the
  provisioning service, and the reply is published to the requesting connection only.
* AWS IoT Core's message broker limits (mqtt_limits.py): ``stream_connected`` reads each connection through a
  CappedStreamReader, on which amqtt's fixed-header decoder (patched by ``install_packet_size_cap``) refuses a
  packet larger than any AWS accepts (a 128 KB payload and its topic) before reading its body;
  ``_initialize_client_session`` closes a connection that sends no CONNECT within 10 s, or an oversized one;
  ``_handle_subscription`` closes a connection whose SUBSCRIBE has more than 8 topic filters or takes it over 50
  subscriptions, as AWS does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import ssl
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from fleetprov.emulator.access import ConnectionRefused, Identity, identify
from fleetprov.emulator.faults import Faults
from fleetprov.emulator.jit import JitOutcome, JustInTime, run_activation
from fleetprov.emulator.mqtt_limits import (
    CONNECT_TIMEOUT_SECONDS,
    CappedStreamReader,
    PacketTooLarge,
    install_packet_size_cap,
    subscribe_problem,
)
from fleetprov.emulator.registry import Registry
from fleetprov.emulator.service import Caller, ProvisioningService, Reply, parse_request_topic
from fleetprov.errors import EmulatorError

log = logging.getLogger(__name__)

ALPN_MQTT_ON_443 = "x-amzn-mqtt-ca"
MAX_CACHED_DECISIONS = 256

_IOT_ACTIONS = {
    Action.PUBLISH: "iot:Publish",
    Action.SUBSCRIBE: "iot:Subscribe",
    Action.RECEIVE: "iot:Receive",
}


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic filter matching ($-topics never match a leading wildcard)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass
class Connection:
    """What the emulator knows about one live MQTT connection."""

    client_id: str
    handler: BrokerProtocolHandler
    identity: Optional[Identity]
    refusal: str = ""
    messages: int = 0
    pending: set[asyncio.Future[Any]] = field(default_factory=set)
    decisions: dict[tuple[str, str], bool] = field(default_factory=dict)

    def allows(self, action: str, resource: str) -> bool:
        """The policy decision, remembered: a device asks the same few questions many times."""
        if self.identity is None:
            return False
        key = (action, resource)
        decision = self.decisions.get(key)
        if decision is None:
            if len(self.decisions) >= MAX_CACHED_DECISIONS:
                self.decisions.clear()  # a client walking endless topics must not grow memory
            decision = self.decisions[key] = self.identity.allows(action, resource)
        return decision


class EmulatorBroker(Broker):  # type: ignore[misc]
    def __init__(
        self,
        config: dict[str, Any],
        *,
        registry: Registry,
        service: ProvisioningService,
        faults: Faults,
        region: str,
        account: str,
    ) -> None:
        super().__init__(config)
        install_packet_size_cap()
        self.registry = registry
        self.service = service
        self.faults = faults
        self.region = region
        self.account = account
        self._connections: dict[int, Connection] = {}
        # Set once the listener is bound: on port 443, ALPN x-amzn-mqtt-ca is required.
        self.require_alpn = False
        self.jit = JustInTime(registry, account=account)
        # The SNI each TLS connection sent (None: none), recorded during its handshake.
        self._server_names: weakref.WeakKeyDictionary[ssl.SSLObject, Optional[str]] = weakref.WeakKeyDictionary()
        self._trusted_cas: set[str] = set()  # registered CAs already loaded into the TLS context
        self._activations: dict[str, asyncio.Task[None]] = {}  # running activation commands by certificate id

    def listening_port(self) -> int:
        """The port the listener bound (the configured one, or the free one chosen for port 0)."""
        sockets = self._servers["default"].instance.sockets
        port: int = sockets[0].getsockname()[1]
        return port

    # -- TLS ------------------------------------------------------------------------------------

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=listener["cafile"])
        context.load_cert_chain(listener["certfile"], listener["keyfile"])
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols([ALPN_MQTT_ON_443])
        self._trust_registered_cas(context)
        context.sni_callback = self._on_client_hello
        return context

    def _on_client_hello(self, ssl_object: ssl.SSLObject, server_name: Optional[str], context: ssl.SSLContext) -> None:
        """OpenSSL's servername callback, called for every ClientHello (server_name None without SNI), before
        the client's certificate is verified: the moment to trust CAs registered since the last handshake."""
        self._server_names[ssl_object] = server_name
        self._trust_registered_cas(context)

    def _trust_registered_cas(self, context: ssl.SSLContext) -> None:
        """Add the CAs registered since the last call to the live context's trust store (a registered CA cannot
        be deregistered, so nothing is ever removed). Must not raise: it runs inside the TLS handshake."""
        try:
            registered = self.registry.ca_certificate_ids()
            for ca_id in registered - self._trusted_cas:
                record = self.registry.ca_certificate(ca_id)
                if record is not None and record.status == "ACTIVE":
                    context.load_verify_locations(cadata=record.pem)
                    log.info("trusting client certificates issued by registered CA %s", ca_id[:12])
                    self._trusted_cas.add(ca_id)
        except (sqlite3.Error, ssl.SSLError, EmulatorError) as exc:
            log.warning("cannot load the registered CA certificates: %s", exc)

    # -- connections ----------------------------------------------------------------------------

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        await self._client_connected(listener_name, CappedStreamReader(reader), StreamWriterAdapter(writer))

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's: wait for the CONNECT and make the session. Closes the connection if no CONNECT comes within
        CONNECT_TIMEOUT_SECONDS of the TLS handshake (amqtt would wait forever) or if the first packet is too
        large; NoDataError makes amqtt's _client_connected give the connection up."""
        try:
            initialized: tuple[BrokerProtocolHandler, Session] = await asyncio.wait_for(
                super()._initialize_client_session(reader, writer, remote_address, remote_port),
                CONNECT_TIMEOUT_SECONDS,
            )
        except (asyncio.TimeoutError, PacketTooLarge) as exc:
            reason = str(exc) if isinstance(exc, PacketTooLarge) else f"no CONNECT within {CONNECT_TIMEOUT_SECONDS:g} s"
            log.info("closing connection from %s:%s: %s", remote_address, remote_port, reason)
            with contextlib.suppress(OSError):
                await writer.close()
            raise NoDataError(reason) from exc
        return initialized

    async def _handle_client_session(  # noqa: PLR0917 -- amqtt's signature
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        ssl_object = writer.get_ssl_info()
        peer_der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        server_name = self._server_names.get(ssl_object) if ssl_object is not None else None
        client_id = client_session.client_id or ""
        try:
            if self.require_alpn and alpn != ALPN_MQTT_ON_443:
                # AWS IoT Core speaks MQTT on 443 only to clients that ask for it with ALPN.
                raise ConnectionRefused(f"MQTT on port 443 needs TLS ALPN {ALPN_MQTT_ON_443}, got {alpn}")
            outcome = self.jit.admit(peer_der, server_name) if peer_der else None
            if outcome is not None:
                await self._after_just_in_time(client_id, writer, outcome)
                return
            found = identify(self.registry, peer_der, client_id, region=self.region, account=self.account)
            log.info(
                "client %r connected: %s certificate %s, TLS ALPN %s",
                client_id,
                found.kind,
                found.certificate_id[:12],
                alpn or "-",
            )
            identity: Optional[Identity] = found
            refusal = ""
        except ConnectionRefused as exc:
            identity, refusal = None, exc.message
            log.info("refusing connection %r: %s", client_id, refusal)
        if identity is not None:
            await self._drop_duplicate(client_id)
        connection = Connection(client_id=client_id, handler=handler, identity=identity, refusal=refusal)
        key = id(client_session)
        self._connections[key] = connection
        try:
            await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)
        except OSError as exc:
            # amqtt closes a refused connection with a TLS shutdown, which fails when the client has already gone
            # or sent more (SSLError, ConnectionResetError): the connection is over either way, not a bug.
            log.info("connection %r ended: %s", client_id, exc)
        finally:
            if self._connections.get(key) is connection:
                del self._connections[key]

    async def _after_just_in_time(self, client_id: str, writer: Any, outcome: JitOutcome) -> None:
        """Publish the JITR event and start the CA's activation command, if any, then close the connection
        just-in-time registration handled, without CONNACK: AWS drops it."""
        log.info("closing connection %r: %s", client_id, outcome.reason)
        if outcome.event is not None:
            await self.internal_message_broadcast(outcome.event.topic, outcome.event.payload)
        activation = outcome.activation
        if activation is not None and activation.certificate_id in self._activations:
            # A device retrying every few hundred ms must not pile up commands that all do the same thing.
            log.info("activation command for certificate %s is still running", activation.certificate_id[:12])
        elif activation is not None:
            # Not awaited: the command may connect back, and the broker must go on serving meanwhile.
            task = asyncio.ensure_future(run_activation(activation, self.registry.path.parent))
            self._activations[activation.certificate_id] = task
            task.add_done_callback(lambda _: self._activations.pop(activation.certificate_id, None))
        # A client that sent more after CONNECT (awscrt subscribes at once) makes the TLS shutdown fail with
        # APPLICATION_DATA_AFTER_CLOSE_NOTIFY or a reset: the connection is gone either way.
        with contextlib.suppress(OSError):
            await writer.close()

    async def shutdown(self) -> None:
        running = list(self._activations.values())
        for task in running:
            task.cancel()  # run_activation kills its command
        await asyncio.gather(*running, return_exceptions=True)
        await super().shutdown()

    async def _drop_duplicate(self, client_id: str) -> None:
        for connection in list(self._connections.values()):
            if connection.client_id == client_id and connection.identity is not None:
                log.info("client id %r connected again: closing its older connection", client_id)
                await self._drop(connection, "duplicate client id")

    async def _drop(self, connection: Connection, reason: str) -> None:
        log.info("closing connection %r: %s", connection.client_id, reason)
        await connection.handler.handle_connection_closed()

    async def enforce_certificate_status(self, interval: float) -> None:
        """Close the connections of certificates that are no longer ACTIVE (changed with `fleetprov emulator
        set-certificate-status`, or deleted), as AWS IoT does after UpdateCertificate. Runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            for connection in list(self._connections.values()):
                if connection.identity is None:
                    continue
                record = self.registry.certificate(connection.identity.certificate_id)
                status = "deleted" if record is None else record.status
                if status != "ACTIVE":
                    why = f"certificate {connection.identity.certificate_id[:12]} is {status}"
                    connection.identity = None  # closed once; refused everything until it is gone
                    await self._drop(connection, why)

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        connection = self._connections.get(id(session))
        return connection is not None and connection.identity is not None

    # -- authorization --------------------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        connection = self._connections.get(id(session))
        if connection is None or connection.identity is None:
            return False
        allowed = connection.allows(_IOT_ACTIONS[action], topic)
        if not allowed and action in (Action.PUBLISH, Action.SUBSCRIBE):
            await self._drop(connection, f"policy does not allow {_IOT_ACTIONS[action]} on {topic!r}")
        return allowed

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        """amqtt's, within AWS's subscription quotas: a SUBSCRIBE over them closes the connection, without SUBACK."""
        requested = [topic_filter for topic_filter, _ in subscribe_waiter.result().topics]
        held = [
            topic_filter
            for topic_filter, subscribers in self.subscriptions.items()
            if any(subscriber is client_session for subscriber, _ in subscribers)
        ]
        problem = subscribe_problem(held, requested)
        if problem is None:
            await super()._handle_subscription(client_session, handler, subscribe_waiter)
            return
        log.info("closing connection %r: %s", client_session.client_id, problem)
        await handler.handle_connection_closed()

    # -- messages -------------------------------------------------------------------------------

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        connection = self._connections.get(id(client_session))
        if message is None or connection is None or connection.identity is None or not message.topic:
            return await self._deliver_as_amqtt(client_session, handler, wait_deliver)
        connection.messages += 1
        limit = self.faults.config.close_after_messages
        if limit is not None and connection.messages > limit:
            await self._drop(connection, f"fault knob close_after_messages={limit}")
            return True
        topic: str = message.topic
        if not topic.startswith("$"):
            return await self._deliver_as_amqtt(client_session, handler, wait_deliver)
        request = parse_request_topic(topic)
        if request is None:
            await self._drop(connection, f"publish to unsupported reserved topic {topic!r}")
            return True
        if not await self._topic_filtering(client_session, topic, Action.PUBLISH):
            return True
        caller = Caller(client_id=connection.client_id, certificate_id=connection.identity.certificate_id)
        reply = await self.service.handle(request, bytes(message.data or b""), caller)
        self._send_reply(connection, client_session, reply)
        return True

    async def _deliver_as_amqtt(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """Ordinary topics: amqtt's own checks and broadcast (with _topic_filtering as the policy gate)."""
        delivered: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return delivered

    def _send_reply(self, connection: Connection, session: Session, reply: Reply) -> None:
        """Publish a reply to the requesting connection alone, if it subscribed to the reply topic (as AWS)."""
        qos = self._subscribed_qos(session, reply.topic)
        if qos is None:
            log.info("%r did not subscribe to %s: reply dropped", connection.client_id, reply.topic)
            return
        if not connection.allows("iot:Receive", reply.topic):
            log.info("%r may not receive %s: reply dropped", connection.client_id, reply.topic)
            return
        # Not awaited: a client that never acknowledges must not stall its own message loop.
        task = asyncio.ensure_future(connection.handler.mqtt_publish(reply.topic, reply.payload, qos, retain=False))
        connection.pending.add(task)
        task.add_done_callback(connection.pending.discard)

    def _subscribed_qos(self, session: Session, topic: str) -> Optional[int]:
        granted = [
            qos
            for topic_filter, subscribers in self.subscriptions.items()
            if topic_matches(topic_filter, topic)
            for subscriber, qos in subscribers
            if subscriber is session
        ]
        return max(granted) if granted else None
