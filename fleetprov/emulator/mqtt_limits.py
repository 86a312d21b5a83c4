"""AWS IoT Core's message-broker limits that keep one client from costing the emulator more than it should.

Sources (cited where each is used):

* AWS General Reference, "AWS IoT Core endpoints and quotas", message broker and protocol limits
  (https://docs.aws.amazon.com/general/latest/gr/iot-core.html#message-broker-limits): PUBLISH payloads of at
  most 128 KB; 50 subscriptions per connection; 8 subscriptions (topic filters) per SUBSCRIBE; topics of at most
  256 bytes.
* AWS IoT Developer Guide, "Device Advisor test cases: MQTT": "AWS IoT Core rejects publish and connect requests
  larger than 128 KB".
* awscrt's Connection.resubscribe_existing_topics (aws-crt-python, awscrt/mqtt.py): "The client will be
  disconnected by AWS IoT Core if the resubscribe exceeds the subscriptions per subscribe request quota".
* MQTT 3.1.1, section 3.1 CONNECT: "If the Server does not receive a CONNECT Packet within a reasonable amount of
  time after the Network Connection is established, the Server SHOULD close the connection." AWS documents no
  value for its own; 10 s is what other MQTT services name (Cloudflare Pub/Sub's "Connect Interval").

The packet size is capped where amqtt decodes a fixed header (``install_packet_size_cap``): amqtt reads a packet's
whole remaining length before anything can look at it, so a 64 MB PUBLISH used to be buffered whole before the
128 KB check. Only connections read through ``CappedStreamReader`` (the emulator's listener) are capped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Any, Optional

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter
from amqtt.mqtt.packet import MQTTFixedHeader

# AWS IoT Core quotas: "Message size" 128 KB (the PUBLISH payload); topics of at most 256 bytes (UTF-8).
MAX_PAYLOAD_BYTES = 128 * 1024
MAX_TOPIC_BYTES = 256
# The largest packet that can carry a payload AWS accepts: topic length field, topic, packet id, payload. A
# PUBLISH just over 128 KB still gets its rejected reply from the service (400 InvalidPayload); a packet that
# cannot fit in this closes the connection at its fixed header, before its body is read.
MAX_REMAINING_LENGTH = 2 + MAX_TOPIC_BYTES + 2 + MAX_PAYLOAD_BYTES
# AWS IoT Core quotas: "Subscriptions per connection" 50; "Maximum subscriptions per subscribe request" 8.
# AWS closes a connection that goes over either (see the module docstring).
MAX_SUBSCRIPTIONS_PER_CONNECTION = 50
MAX_FILTERS_PER_SUBSCRIBE = 8
# MQTT 3.1.1 section 3.1: close a connection that sends no CONNECT "within a reasonable amount of time".
CONNECT_TIMEOUT_SECONDS = 10.0


class PacketTooLarge(Exception):
    """A packet whose fixed header announces more than MAX_REMAINING_LENGTH bytes. Deliberately not one of amqtt's
    MQTTError or NoDataError: amqtt's reader loop skips those and reads on (here: into the oversized body),
    while any other exception ends the connection."""


class CappedStreamReader(StreamReaderAdapter):  # type: ignore[misc]
    """amqtt's reader of a TCP/TLS stream, marked for the packet size cap."""

    def __init__(self, reader: asyncio.StreamReader, max_remaining_length: int = MAX_REMAINING_LENGTH) -> None:
        super().__init__(reader)
        self.max_remaining_length = max_remaining_length


# amqtt's own decoder: the cap calls it, and tests/unit/test_amqtt_guard.py fingerprints it.
amqtt_fixed_header_from_stream = MQTTFixedHeader.from_stream.__func__


async def _capped_fixed_header_from_stream(cls: type[MQTTFixedHeader], reader: ReaderAdapter) -> Optional[Any]:
    header = await amqtt_fixed_header_from_stream(cls, reader)
    limit = reader.max_remaining_length if isinstance(reader, CappedStreamReader) else None
    if limit is not None and header is not None and header.remaining_length > limit:
        raise PacketTooLarge(
            f"MQTT packet type {header.packet_type} of {header.remaining_length} bytes: AWS IoT accepts messages "
            f"of at most {MAX_PAYLOAD_BYTES} bytes"
        )
    return header


def install_packet_size_cap() -> None:
    """Make amqtt's fixed-header decoder check the remaining length of packets read by a CappedStreamReader.

    Both places amqtt reads a packet go through MQTTFixedHeader.from_stream: the CONNECT (MQTTPacket.from_stream,
    via FIXED_HEADER) and every later packet (ProtocolHandler._reader_loop). Idempotent; other readers (amqtt
    clients in the same process) are not affected."""
    if MQTTFixedHeader.from_stream.__func__ is not _capped_fixed_header_from_stream:
        MQTTFixedHeader.from_stream = classmethod(_capped_fixed_header_from_stream)


def subscribe_problem(held: Collection[str], requested: Sequence[str]) -> Optional[str]:
    """Why a SUBSCRIBE of ``requested`` filters on a connection that holds ``held`` goes over AWS's quotas, or
    None if it does not. Subscribing again to a held filter replaces it (MQTT 3.1.1 section 3.8.4): no new one."""
    if len(requested) > MAX_FILTERS_PER_SUBSCRIBE:
        return f"SUBSCRIBE with {len(requested)} topic filters (AWS IoT allows {MAX_FILTERS_PER_SUBSCRIBE})"
    total = len(set(held) | set(requested))
    if total > MAX_SUBSCRIPTIONS_PER_CONNECTION:
        return f"{total} subscriptions on one connection (AWS IoT allows {MAX_SUBSCRIPTIONS_PER_CONNECTION})"
    return None
