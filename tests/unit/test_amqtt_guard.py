"""Guards for the amqtt internals the emulator's broker relies on (fleetprov/emulator/broker.py).

amqtt is pinned exactly. If an upgrade changes any of these methods, the matching test fails: read the new
amqtt code, check the override in broker.py still holds, then update the fingerprint here.
"""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version

import pytest
from amqtt.broker import Broker
from amqtt.mqtt.packet import MQTTPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler

from fleetprov.emulator import mqtt_limits
from fleetprov.emulator.broker import EmulatorBroker

# method -> SHA-256 of its source in amqtt 0.12.1
FINGERPRINTS = {
    # overridden
    "Broker._create_ssl_context": "a08eef5bbc53bf9a8f867d1dfb9523a43fb821f249199f4a75b63437d48e470c",
    "Broker._handle_client_session": "8b1b52a03df9daf58a0e88ab15f4b65a778b6b2289e323f821ed5e42c77c1095",
    "Broker._authenticate": "4d7db8cc6fe2c3f64d607c8063f6b3158368039af89c554baf275543569f53f5",
    "Broker._topic_filtering": "9259ae5e1dd3e20d3d111950239847f4c77b57550878c09da538c2ad9ec25240",
    "Broker._handle_message_delivery": "89727723da550bed02e4fb95736cb0b4399e7752bd4799a78503c7f0feafd69b",
    # relied upon: add_subscription and _run_broadcast consult _topic_filtering; the message loop ends the
    # connection when the disconnect waiter fires, which handle_connection_closed triggers; listening_port
    # reads self._servers.
    "Broker.add_subscription": "07757b63113c395e2ed0176c270a48df46261b7ee196b079c568146b6d0f421c",
    "Broker._run_broadcast": "e852128b3e38e04a1b903cb9b44240d7cb8c50539a78472a48aa32544574b581",
    "Broker._client_message_loop": "916c4647c338991830c968a421012b5bc7fbb1cbffd8db6ad551ca91618502c2",
    "Broker._start_listeners": "5ac2d716d33babb4334ca4a82ec1908c254aa4f02331152aa8d39b64b25464a7",
    "BrokerProtocolHandler.handle_connection_closed": "e9c448557a8dab58d47f5844487af234a8694d4436bfbd05cdb8abad8c1c5f47",  # noqa: E501
    "BrokerProtocolHandler.handle_disconnect": "63b454d06eab58f8650bb6b62fd65845b1e1784753301524e86532bebc190cb5",
    # JITR: the registration event is published with internal_message_broadcast, which queues it for
    # _run_broadcast through _broadcast_message; shutdown is extended to stop running activation commands, and
    # _start_listeners calls _create_ssl_context on the instance (ours is an instance method).
    "Broker.internal_message_broadcast": "737942352c1c919dfdbc0e53e70e3118ba473b6b91bd6dcd25d993f7b3cca926",
    "Broker._broadcast_message": "78ad4edb7efb3b7276857d6c91c80da0377cf54b1e0856c84c6df3df6a54c225",
    "Broker.shutdown": "800adcdd80ded223282d12929cf2fe10e0009001cf488e1a4652794a0a715608",
    # AWS's broker limits (mqtt_limits.py). Overridden: stream_connected (the capped reader),
    # _initialize_client_session (CONNECT timeout), _handle_subscription (subscription quotas); patched:
    # MQTTFixedHeader.from_stream (amqtt's own, kept as mqtt_limits.amqtt_fixed_header_from_stream).
    "Broker.stream_connected": "d1c68240cb49f94a431455e63b0277a27c92a482c4512a8e2de975e13025720e",
    "Broker._initialize_client_session": "5dd89158bbe46266c62cc3ba6dedc0fcfbc197b6cfdd03d089ad3ba2a4422806",
    "Broker._handle_subscription": "3dae18afa195209e97109fa476120b0e403ac2d24ce6665214d3a2f85a3be5b1",
    "MQTTFixedHeader.from_stream": "3fc24bcecb654652685326de6af03880821ddbf91a28f3b2fd5998749fca039b",
    # Relied upon: the TCP listener calls self.stream_connected; _client_connected gives a connection up on
    # NoDataError from _initialize_client_session; init_from_connect reads the CONNECT with
    # ConnectPacket.from_stream, which decodes its header with FIXED_HEADER.from_stream; the reader loop decodes
    # later headers with MQTTFixedHeader.from_stream and ends the connection on any exception that is not
    # MQTTError or NoDataError (PacketTooLarge).
    "Broker._create_server_instance": "3925f482396800745fe3985cf826dccf0d9bbef7561cb1efb25affab44d8c3ea",
    "Broker._client_connected": "432b724bc4fb7946f1e4de2b71ba4cd0e94aa4959afc7cb5a146353308b833a5",
    "BrokerProtocolHandler.init_from_connect": "036dc04c1133a18fb5b5987a60c2e45d0250daf02d18ec797989c5d23d0876e2",
    "MQTTPacket.from_stream": "b9b086f8f94abe8cd9486cc51b03b3fed079647d5120b1a14f07fb1593dca3e1",
    "ProtocolHandler._reader_loop": "93f3b8e4483040d0babf0369e0e388414098241f52e399c4f67d16c02b158a5b",
}

_OWNERS = {
    "Broker": Broker,
    "BrokerProtocolHandler": BrokerProtocolHandler,
    "MQTTPacket": MQTTPacket,
    "ProtocolHandler": ProtocolHandler,
}


def _source(qualified: str) -> object:
    if qualified == "MQTTFixedHeader.from_stream":  # patched once the broker exists: amqtt's is kept aside
        return mqtt_limits.amqtt_fixed_header_from_stream
    owner, name = qualified.split(".")
    return getattr(_OWNERS[owner], name)


def _fingerprint(qualified: str) -> str:
    source = inspect.getsource(_source(qualified))  # type: ignore[arg-type]
    return hashlib.sha256(source.encode()).hexdigest()


def test_amqtt_is_the_pinned_version() -> None:
    assert version("amqtt") == "0.12.1"


@pytest.mark.parametrize("qualified", sorted(FINGERPRINTS))
def test_amqtt_internal_unchanged(qualified: str) -> None:
    assert _fingerprint(qualified) == FINGERPRINTS[qualified], (
        f"amqtt's {qualified} changed: review fleetprov/emulator/broker.py before updating the fingerprint"
    )


@pytest.mark.parametrize(
    "name",
    [
        "_create_ssl_context",
        "_handle_client_session",
        "_authenticate",
        "_topic_filtering",
        "_handle_message_delivery",
        "stream_connected",
        "_initialize_client_session",
        "_handle_subscription",
    ],
)
def test_overrides_keep_amqtt_signatures(name: str) -> None:
    ours = list(inspect.signature(getattr(EmulatorBroker, name)).parameters)
    theirs = list(inspect.signature(getattr(Broker, name)).parameters)
    if isinstance(inspect.getattr_static(Broker, name), staticmethod) and ours[:1] == ["self"]:
        ours = ours[1:]  # amqtt calls it as self._create_ssl_context(listener): an instance method fits
    assert ours == theirs


def test_servers_attribute_still_exists() -> None:
    assert "self._servers" in inspect.getsource(Broker.__init__)
