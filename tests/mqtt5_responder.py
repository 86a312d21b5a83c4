"""Answer AWS IoT fleet-provisioning requests that arrive through a plain MQTT broker (mosquitto).

The emulator's broker speaks only MQTT 3.1.1; to test a device's MQTT 5 session, the tests run Debian's
mosquitto (which speaks 5) and this program next to it. It connects to mosquitto with a client certificate
(MQTT 3.1.1 is enough here), subscribes to the three request topics and answers each request with the
emulator's own ProvisioningService on the emulator's state directory (its CA and registry), publishing the
reply on the reply topic. A reply reaches every subscriber, not only the connection that asked: acceptable
because exactly one device is connected in these tests.

    python tests/mqtt5_responder.py --state-dir EMU_STATE --port PORT --cert C --key K

It prints ``ready`` on stdout once subscribed, and one line per request on stderr; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from awscrt import mqtt
from awsiot import mqtt_connection_builder
from cryptography import x509

from fleetprov.emulator.ca import certificate_id, ensure_ca_material
from fleetprov.emulator.faults import FaultConfig, Faults
from fleetprov.emulator.server import open_registry
from fleetprov.emulator.service import Caller, ProvisioningService, parse_request_topic

REQUEST_TOPICS = (
    "$aws/certificates/create/+",
    "$aws/certificates/create-from-csr/+",
    "$aws/provisioning-templates/+/provision/+",
)
TIMEOUT = 30

log = logging.getLogger("mqtt5_responder")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="the emulator's state directory")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, required=True, help="mosquitto's port")
    parser.add_argument("--cert", type=Path, required=True, help="this responder's client certificate")
    parser.add_argument("--key", type=Path, required=True, help="its private key")
    parser.add_argument("--client-id", default="fleetprov-test-responder")
    return parser.parse_args()


async def _serve(args: argparse.Namespace) -> None:
    material = ensure_ca_material(args.state_dir)
    registry = open_registry(args.state_dir)
    service = ProvisioningService(registry, material.issuing, Faults(FaultConfig()))
    # mosquitto does not tell who asked: the one device in these tests provisions with the fleet's claim.
    claim_pem = (args.state_dir / "claim" / "claim.pem").read_bytes()
    caller = Caller("mosquitto-device", certificate_id(x509.load_pem_x509_certificate(claim_pem)))

    loop = asyncio.get_running_loop()
    requests: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_message(topic: str, payload: bytes, **kwargs: Any) -> None:  # on an awscrt thread
        loop.call_soon_threadsafe(requests.put_nowait, (topic, bytes(payload)))

    def on_interrupted(connection: mqtt.Connection, error: Exception, **kwargs: Any) -> None:
        log.error("connection to mosquitto lost: %s", error)
        loop.call_soon_threadsafe(stop.set)

    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=args.host,
        port=args.port,
        cert_filepath=str(args.cert),
        pri_key_filepath=str(args.key),
        ca_filepath=str(material.paths.root_cert),
        client_id=args.client_id,
        clean_session=True,
        keep_alive_secs=30,
        on_connection_interrupted=on_interrupted,
    )
    connection.connect().result(TIMEOUT)
    for topic in REQUEST_TOPICS:
        future, _ = connection.subscribe(topic, mqtt.QoS.AT_LEAST_ONCE, callback=on_message)
        granted = future.result(TIMEOUT)
        if granted["qos"] is None:
            raise SystemExit(f"mosquitto refused the subscription to {topic}")
        log.info("subscribed to %s", topic)
    print("ready", flush=True)

    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            getting = asyncio.ensure_future(requests.get())
            await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                break
            topic, payload = getting.result()
            request = parse_request_topic(topic)
            if request is None:  # an .../accepted or .../rejected reply matched by the template filter
                continue
            reply = await service.handle(request, payload, caller)
            future, _ = connection.publish(reply.topic, reply.payload, mqtt.QoS.AT_LEAST_ONCE)
            await asyncio.wrap_future(future)
            log.info("%s on %s -> %s", request.operation, topic, reply.topic)
    finally:
        stopping.cancel()
        connection.disconnect().result(TIMEOUT)
        registry.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(_arguments()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
