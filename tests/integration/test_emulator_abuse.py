"""Clients that try to cost the emulator more than a request should: each is answered or closed within a second
(an idle one within the CONNECT timeout), the emulator stays under 200 MB, and a device provisions meanwhile.

The attackers speak MQTT 3.1.1 by hand over real mutual TLS with the claim certificate (awscrt would refuse to
send what they send); the device is the awscrt provisioning flow of the other tests."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from fleetprov.emulator.mqtt_limits import (
    CONNECT_TIMEOUT_SECONDS,
    MAX_FILTERS_PER_SUBSCRIBE,
    MAX_SUBSCRIPTIONS_PER_CONNECTION,
)
from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX
from tests.support import Emulator, provision_csr, raw_claim, remaining_length, start_emulator

ANSWER_SECONDS = 1.0  # the bound: each attacker is answered or closed within a second
MAX_RSS_BYTES = 200 * 1024 * 1024
OVERSIZED = 64 * 1024 * 1024  # what the review sent: read whole before the 128 KB check
CSR_CBOR_TOPIC = "$aws/certificates/create-from-csr/cbor"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """An emulator of this module's own: its peak memory is what these attacks made of it."""
    running = start_emulator(tmp_path_factory.mktemp("abuse") / "state")
    yield running
    assert running.stop() == 0, running.log()


def peak_rss(emulator: Emulator) -> int:
    """The emulator's peak resident set size so far (VmHWM: the high-water mark of VmRSS), in bytes."""
    status = Path(f"/proc/{emulator.process.pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in {status}")


def while_a_device_provisions(emulator: Emulator, serial: str, attack: Callable[[], None]) -> None:
    """Run ``attack`` while a device provisions through the awscrt flow; both must succeed."""
    outcome: dict[str, Any] = {}

    def device() -> None:
        try:
            registered, *_ = provision_csr(emulator, f"bystander-{serial}", {"SerialNumber": serial})
            outcome["thing"] = registered.thing_name
        except Exception as exc:  # reported by the assertion below, in the test's thread
            outcome["error"] = exc

    bystander = threading.Thread(target=device)
    bystander.start()
    try:
        attack()
    finally:
        bystander.join(60)
    assert outcome.get("thing") == f"fleetprov-{serial}", outcome
    assert peak_rss(emulator) < MAX_RSS_BYTES, f"emulator peak RSS {peak_rss(emulator)} bytes"
    assert emulator.process.poll() is None


# -- MQTT 3.1.1 by hand ------------------------------------------------------------------------------


def tls_connection(emulator: Emulator) -> ssl.SSLSocket:
    """A completed mutual-TLS handshake with the claim certificate, nothing sent over it yet."""
    context = ssl.create_default_context(cafile=str(emulator.root_ca))
    context.load_cert_chain(emulator.claim_cert, emulator.claim_key)
    raw = socket.create_connection((emulator.host, emulator.port), timeout=30)
    return context.wrap_socket(raw, server_hostname="localhost")


def mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def read_packet(connection: ssl.SSLSocket) -> tuple[int, bytes]:
    """(packet type, body) of the next packet from the emulator."""
    first = receive_exactly(connection, 1)[0]
    length, shift = 0, 0
    while True:
        digit = receive_exactly(connection, 1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    return first >> 4, receive_exactly(connection, length)


def receive_exactly(connection: ssl.SSLSocket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        assert chunk, "the emulator closed the connection"
        data += chunk
    return data


def connected_claim(emulator: Emulator, name: str) -> ssl.SSLSocket:
    """A claim connection past CONNACK (return code 0)."""
    connection = tls_connection(emulator)
    variable_header = mqtt_string("MQTT") + bytes([4, 0x02]) + (30).to_bytes(2, "big")  # 3.1.1, clean session
    connection.sendall(packet(0x10, variable_header + mqtt_string(CLAIM_CLIENT_ID_PREFIX + name)))
    assert read_packet(connection) == (2, b"\x00\x00")
    return connection


def subscribe(packet_id: int, topic_filters: list[str]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(mqtt_string(topic) + b"\x01" for topic in topic_filters)
    return packet(0x82, body)


def seconds_until_closed(connection: ssl.SSLSocket, since: float, limit: float) -> float:
    """How long after ``since`` the emulator closed the connection (whatever it sent before); fails the test if it
    is still open ``limit`` seconds after ``since``."""
    while True:
        left = since + limit - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the connection is still open {limit:g} s later")
        connection.settimeout(left)
        try:
            if not connection.recv(65536):
                return time.monotonic() - since
        except (ConnectionError, ssl.SSLError):
            return time.monotonic() - since
        except TimeoutError:
            continue


# -- the attacks ---------------------------------------------------------------------------------------------


def test_a_cbor_shared_value_bomb_is_rejected_at_once(target: Emulator) -> None:
    """226 bytes of CBOR whose arrays share their halves (tags 28/29): 2**25 leaves once expanded."""
    value: Any = "AAAAAAAA"
    for _ in range(25):
        value = [value, value]
    bomb = cbor2.dumps({"certificateSigningRequest": value}, value_sharing=True)

    def attack() -> None:
        client = raw_claim(target, "cbor-bomb")
        try:
            for suffix in ("accepted", "rejected"):
                client.subscribe(f"{CSR_CBOR_TOPIC}/{suffix}")
            sent = time.monotonic()
            client.publish(CSR_CBOR_TOPIC, bomb)
            topic, payload = client.next_message(timeout=30)
            answered = time.monotonic() - sent
        finally:
            client.close()
        assert answered <= ANSWER_SECONDS, f"answered after {answered:.2f} s"
        reply = cbor2.loads(payload)
        assert topic == f"{CSR_CBOR_TOPIC}/rejected", reply
        assert (reply["statusCode"], reply["errorCode"]) == (400, "InvalidPayload")
        assert "CBOR tags 28/29" in reply["errorMessage"]

    while_a_device_provisions(target, "cbor-bomb", attack)


@pytest.mark.parametrize("claimed_by", ["CONNECT", "PUBLISH"])
def test_a_packet_claiming_64_mb_closes_the_connection_at_its_header(target: Emulator, claimed_by: str) -> None:
    """The fixed header's remaining length says 64 MB: the emulator closes the connection instead of reading it.
    The PUBLISH attacker goes on sending its body for as long as the connection lets it."""

    def attack() -> None:
        if claimed_by == "CONNECT":
            connection = tls_connection(target)
            connection.sendall(b"\x10" + remaining_length(OVERSIZED))
            sent = time.monotonic()
        else:
            connection = connected_claim(target, "oversized")
            connection.sendall(b"\x30" + remaining_length(OVERSIZED) + mqtt_string(CSR_CBOR_TOPIC))
            sent = time.monotonic()
            chunk = b"\0" * (1024 * 1024)
            connection.settimeout(ANSWER_SECONDS)
            try:
                for _ in range(OVERSIZED // len(chunk)):
                    connection.sendall(chunk)
            except (ConnectionError, ssl.SSLError, TimeoutError):
                pass  # closed (or no longer read): seconds_until_closed says which
        with connection:
            closed = seconds_until_closed(connection, sent, ANSWER_SECONDS)
        assert closed <= ANSWER_SECONDS

    while_a_device_provisions(target, f"oversized-{claimed_by.lower()}", attack)


def test_a_tls_connection_without_connect_is_closed_at_the_connect_timeout(target: Emulator) -> None:
    def attack() -> None:
        with tls_connection(target) as connection:
            handshake_done = time.monotonic()
            seconds_until_closed(connection, handshake_done, CONNECT_TIMEOUT_SECONDS + ANSWER_SECONDS)
        assert "no CONNECT within" in target.log()

    while_a_device_provisions(target, "idle", attack)


def test_subscriptions_beyond_awss_quota_close_the_connection(target: Emulator) -> None:
    """Allowed filters (the claim policy allows any template's reply topics), 8 per SUBSCRIBE, until the one that
    would make more than 50: AWS closes the connection instead of answering it."""
    full_requests = MAX_SUBSCRIPTIONS_PER_CONNECTION // MAX_FILTERS_PER_SUBSCRIBE
    filters = [
        f"$aws/provisioning-templates/flood-{index}/provision/json/accepted"
        for index in range((full_requests + 1) * MAX_FILTERS_PER_SUBSCRIBE)
    ]

    def attack() -> None:
        with connected_claim(target, "subscription-flood") as connection:
            for request in range(full_requests):
                batch = filters[request * MAX_FILTERS_PER_SUBSCRIBE : (request + 1) * MAX_FILTERS_PER_SUBSCRIBE]
                connection.sendall(subscribe(request + 1, batch))
                assert read_packet(connection) == (9, (request + 1).to_bytes(2, "big") + b"\x01" * len(batch))
            connection.sendall(subscribe(full_requests + 1, filters[full_requests * MAX_FILTERS_PER_SUBSCRIBE :]))
            closed = seconds_until_closed(connection, time.monotonic(), ANSWER_SECONDS)
        assert closed <= ANSWER_SECONDS

    while_a_device_provisions(target, "subscription-flood", attack)


def test_a_subscribe_with_more_than_8_topic_filters_closes_the_connection(target: Emulator) -> None:
    filters = [f"$aws/provisioning-templates/wide-{index}/provision/json/accepted" for index in range(9)]

    def attack() -> None:
        with connected_claim(target, "wide-subscribe") as connection:
            connection.sendall(subscribe(1, filters))
            closed = seconds_until_closed(connection, time.monotonic(), ANSWER_SECONDS)
        assert closed <= ANSWER_SECONDS

    while_a_device_provisions(target, "wide-subscribe", attack)
