"""AWS IoT Core's message broker limits in the emulator (fleetprov/emulator/mqtt_limits.py): the packet size cap
on amqtt's own fixed-header decoder, fed by a real asyncio stream, and the subscription quotas."""

from __future__ import annotations

import asyncio
from typing import Optional

import pytest
from amqtt.adapters import StreamReaderAdapter
from amqtt.mqtt.packet import MQTTFixedHeader

from fleetprov.emulator.mqtt_limits import (
    MAX_FILTERS_PER_SUBSCRIBE,
    MAX_REMAINING_LENGTH,
    MAX_SUBSCRIPTIONS_PER_CONNECTION,
    CappedStreamReader,
    PacketTooLarge,
    install_packet_size_cap,
    subscribe_problem,
)
from tests.support import remaining_length


def decode_header(data: bytes, *, capped: bool) -> Optional[MQTTFixedHeader]:
    """amqtt's fixed-header decoder on ``data`` (only the header is there: nothing reads a body)."""

    async def decode() -> Optional[MQTTFixedHeader]:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        reader = CappedStreamReader(stream) if capped else StreamReaderAdapter(stream)
        header: Optional[MQTTFixedHeader] = await MQTTFixedHeader.from_stream(reader)
        return header

    install_packet_size_cap()
    return asyncio.run(decode())


@pytest.mark.parametrize("first_byte", [0x10, 0x30, 0x82], ids=["CONNECT", "PUBLISH", "SUBSCRIBE"])
def test_a_header_announcing_more_than_the_cap_is_refused(first_byte: int) -> None:
    with pytest.raises(PacketTooLarge, match=r"of 67108864 bytes: AWS IoT accepts messages of at most 131072"):
        decode_header(bytes([first_byte]) + remaining_length(64 * 1024 * 1024), capped=True)
    with pytest.raises(PacketTooLarge):
        decode_header(bytes([first_byte]) + remaining_length(MAX_REMAINING_LENGTH + 1), capped=True)


def test_the_largest_packet_aws_accepts_passes() -> None:
    header = decode_header(b"\x30" + remaining_length(MAX_REMAINING_LENGTH), capped=True)
    assert header is not None and header.remaining_length == MAX_REMAINING_LENGTH
    assert MAX_REMAINING_LENGTH == 2 + 256 + 2 + 128 * 1024  # topic length, longest topic, packet id, payload


def test_readers_that_are_not_the_emulators_are_not_capped() -> None:
    header = decode_header(b"\x30" + remaining_length(64 * 1024 * 1024), capped=False)
    assert header is not None and header.remaining_length == 64 * 1024 * 1024


def test_installing_twice_caps_once() -> None:
    install_packet_size_cap()
    installed = MQTTFixedHeader.from_stream.__func__
    install_packet_size_cap()
    assert MQTTFixedHeader.from_stream.__func__ is installed


def test_subscriptions_within_the_quotas_pass() -> None:
    held = [f"held/{index}" for index in range(MAX_SUBSCRIPTIONS_PER_CONNECTION - MAX_FILTERS_PER_SUBSCRIBE)]
    assert subscribe_problem(held, [f"new/{index}" for index in range(MAX_FILTERS_PER_SUBSCRIBE)]) is None
    full = [f"held/{index}" for index in range(MAX_SUBSCRIPTIONS_PER_CONNECTION)]
    assert subscribe_problem(full, full[:MAX_FILTERS_PER_SUBSCRIBE]) is None  # subscribing again adds none


def test_more_than_8_filters_in_one_subscribe_is_a_problem() -> None:
    problem = subscribe_problem([], [f"topic/{index}" for index in range(MAX_FILTERS_PER_SUBSCRIBE + 1)])
    assert problem == "SUBSCRIBE with 9 topic filters (AWS IoT allows 8)"


def test_more_than_50_subscriptions_on_a_connection_is_a_problem() -> None:
    held = [f"held/{index}" for index in range(MAX_SUBSCRIPTIONS_PER_CONNECTION)]
    assert subscribe_problem(held, ["one/more"]) == "51 subscriptions on one connection (AWS IoT allows 50)"
