"""A provisioning request given up while awscrt still waits for its reply (a rotation cancelled by SIGTERM): the
reply that comes later is awscrt's to complete, and completing it breaks nothing in awscrt's thread."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from fleetprov.facts import CLAIM_CLIENT_ID_PREFIX
from fleetprov.provisioning import ProvisioningClient
from fleetprov.session import Endpoint, Identity, connect
from tests.support import make_csr

REPLY_DELAY = 2.0


def test_a_cancelled_request_leaves_awscrts_future_to_awscrt(
    emulator_with: Any, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = emulator_with("--reply-delay", str(REPLY_DELAY))

    async def cancelled_while_waiting() -> None:
        endpoint = Endpoint(host="localhost", port=emulator.port, root_ca=emulator.root_ca, timeout=30)
        claim = Identity(certificate=emulator.claim_cert, private_key=emulator.claim_key)
        session = await connect(endpoint, claim, CLAIM_CLIENT_ID_PREFIX + "cancelled-request")
        try:
            client = ProvisioningClient(session.protocol_client, timeout=30)
            request = asyncio.ensure_future(client.create_certificate_from_csr(make_csr()[0]))
            await asyncio.sleep(REPLY_DELAY / 2)  # sent; its reply is on its way
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            await asyncio.sleep(REPLY_DELAY * 1.5)  # the reply has come, and awscrt has completed the request
        finally:
            await session.close(10)

    asyncio.run(cancelled_while_waiting())
    assert f"CreateCertificateFromCsr for {CLAIM_CLIENT_ID_PREFIX}cancelled-request" in emulator.log()
    # awsiotsdk completes the request's future in a callback of awscrt's: what that raises, concurrent.futures
    # logs ("exception calling callback for <Future ...>": InvalidStateError, had the future been cancelled).
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
