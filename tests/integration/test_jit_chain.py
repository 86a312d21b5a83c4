"""A JIT identity's certificate.pem is the device certificate followed by its CA: awscrt must send both in the TLS
handshake (AWS IoT needs the chain unless it already knows the CA). `openssl s_server`, which trusts only the
root, tells what the client sent: with the chain (device <- intermediate <- root) it verifies at depth 2, with the
device certificate alone it cannot find the issuer."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fleetprov.errors import FleetprovError
from fleetprov.session import Endpoint, Identity, connect


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _certificate(directory: Path, name: str, subject: str, issuer: str | None, extensions: str) -> None:
    key, csr, cert = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "pem"))
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
             "-subj", f"/CN={subject}", "-out", str(csr))  # fmt: skip
    ext = directory / f"{name}.ext"
    ext.write_text(extensions + "\n")
    signer = ["-signkey", str(key)] if issuer is None else ["-CA", str(directory / f"{issuer}.pem"),
                                                             "-CAkey", str(directory / f"{issuer}.key")]  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), *signer, "-days", "2", "-out", str(cert), "-extfile", str(ext))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _what_the_server_saw(directory: Path, certificate: Path) -> str:
    port = _free_port()
    log = directory / f"s_server-{certificate.stem}.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(directory / "server.pem"),
             "-key", str(directory / "server.key"), "-CAfile", str(directory / "root.pem"), "-Verify", "3",
             "-verify_return_error"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while "ACCEPT" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and server.poll() is None, log.read_text(errors="replace")
            time.sleep(0.05)
        endpoint = Endpoint(host="127.0.0.1", port=port, root_ca=directory / "root.pem", timeout=3)
        identity = Identity(certificate, directory / "device.key")
        # s_server speaks no MQTT: the connection ends without CONNACK; what matters is the handshake before.
        with pytest.raises(FleetprovError):
            asyncio.run(connect(endpoint, identity, "chain-test"))
    finally:
        server.kill()
        server.wait()
    return log.read_text(errors="replace")


def test_awscrt_sends_the_ca_certificate_after_the_device_certificate(tmp_path: Path) -> None:
    ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign"
    _certificate(tmp_path, "root", "chain root", None, ca)
    _certificate(tmp_path, "inter", "chain intermediate", "root", ca)
    _certificate(tmp_path, "device", "chain device", "inter", "extendedKeyUsage=clientAuth")
    _certificate(tmp_path, "server", "localhost", "root", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    chain = tmp_path / "chain.pem"
    chain.write_text((tmp_path / "device.pem").read_text() + (tmp_path / "inter.pem").read_text())

    with_chain = _what_the_server_saw(tmp_path, chain)
    assert "depth=1 CN = chain intermediate" in with_chain and "verify error" not in with_chain, with_chain
    assert "subject=CN = chain device" in with_chain

    alone = _what_the_server_saw(tmp_path, tmp_path / "device.pem")
    assert "unable to get local issuer certificate" in alone, alone
