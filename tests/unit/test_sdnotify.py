from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprov.sdnotify import Notifier, watchdog_loop


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's end: a datagram socket bound in tmp_path, and the NOTIFY_SOCKET that names it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield sock, str(path)


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` (sendto on AF_UNIX has queued it by the time it returns)."""
    sock.setblocking(False)
    datagrams = []
    try:
        while True:
            datagrams.append(sock.recv(4096))
    except BlockingIOError:
        return datagrams
    finally:
        sock.settimeout(2)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_each_message_arrives_as_sent(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": address}) as notifier:
        notifier.ready()
        notifier.status("waiting for the claim certificate")
        notifier.watchdog()
        notifier.stopping()
        notifier.send("STATUS=a", "ERRNO=5")
    assert received(sock) == [
        b"READY=1",
        b"STATUS=waiting for the claim certificate",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STATUS=a\nERRNO=5",
    ]


def test_reloading_carries_the_monotonic_clock(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": address}) as notifier:
        before = time.monotonic_ns() // 1000
        notifier.reloading()
        after = time.monotonic_ns() // 1000
    reloading, monotonic = sock.recv(4096).decode().split("\n")
    assert reloading == "RELOADING=1"
    key, _, usec = monotonic.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


def test_status_is_one_line(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": address}) as notifier:
        notifier.status("connect failed:\nconnection refused\r\nretrying\x1b[31m")
        notifier.status("x" * 10_000)
    multi_line, long = received(sock)
    assert multi_line == b"STATUS=connect failed: connection refused retrying\\x1b[31m"
    assert long.startswith(b"STATUS=xxx") and long.endswith(b"...") and len(long) < 300


@pytest.mark.skipif(sys.platform != "linux", reason="the abstract socket namespace is Linux only")
def test_abstract_socket() -> None:
    name = f"fleetprov-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        with Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}) as notifier:
            notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_happens() -> None:
    fds = open_fds()
    for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        with Notifier.from_environ(environ) as notifier:
            notifier.ready()
            notifier.status("hello")
            notifier.watchdog()
            notifier.reloading()
            notifier.stopping()
            assert open_fds() == fds  # not even a socket was created


@pytest.mark.parametrize("closed", [False, True], ids=["missing path", "closed socket"])
def test_unreachable_socket_never_raises(tmp_path: Path, closed: bool, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "notify"
    if closed:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(str(path))  # the file stays, nobody reads: ECONNREFUSED
    caplog.set_level(logging.DEBUG, logger="fleetprov.sdnotify")
    with Notifier.from_environ({"NOTIFY_SOCKET": str(path)}) as notifier:
        for _ in range(3):
            notifier.ready()
            notifier.watchdog()
    assert len([record for record in caplog.records if "cannot notify systemd" in record.getMessage()]) == 1


def test_full_queue_neither_blocks_nor_raises(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": address}) as notifier:
        for _ in range(1000):  # nobody reads: the queue fills, then EAGAIN
            notifier.watchdog()
    assert 0 < len(received(sock)) < 1000


def test_one_socket_for_the_life_of_the_notifier(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    notifier.watchdog()
    fds = open_fds()
    for _ in range(100):
        notifier.watchdog()
        received(sock)  # keep the queue from filling
    assert open_fds() == fds
    notifier.close()
    assert open_fds() == fds - 1
    notifier.ready()  # after close: nothing, and no new socket
    assert open_fds() == fds - 1
    assert received(sock) == []


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "two seconds"}, None),
        ({"WATCHDOG_USEC": "-2000000"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}).watchdog_interval == interval


def test_no_watchdog_without_notify_socket() -> None:
    assert Notifier.from_environ({"WATCHDOG_USEC": "2000000"}).watchdog_interval is None


def run_watchdog_loop(notifier: Notifier, answers: list[bool]) -> None:
    """Run watchdog_loop until healthy() has given every one of ``answers``, then cancel it. No timing: the
    loop pings (or not) right after each answer, before it sleeps, which is when the cancel lands."""
    remaining = list(answers)

    async def main() -> None:
        asked_all = asyncio.Event()

        def healthy() -> bool:
            answer = remaining.pop(0)
            if not remaining:
                asked_all.set()
            return answer

        task = asyncio.create_task(watchdog_loop(notifier, healthy))
        await asked_all.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_watchdog_loop_pings_every_interval(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}) as notifier:
        assert notifier.watchdog_interval == 0.1
        run_watchdog_loop(notifier, [True] * 5)
        assert received(sock) == [b"WATCHDOG=1"] * 5  # one per healthy tick, none after the cancel


def test_watchdog_loop_skips_pings_while_unhealthy(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, address = receiver
    caplog.set_level(logging.INFO, logger="fleetprov.sdnotify")
    with Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}) as notifier:
        run_watchdog_loop(notifier, [False] * 3)
        assert received(sock) == []
        assert [record.levelname for record in caplog.records] == ["WARNING"]  # said once, not at every tick

        caplog.clear()
        run_watchdog_loop(notifier, [True, False, False, True])  # healthy, unhealthy twice, healthy again
        assert received(sock) == [b"WATCHDOG=1"] * 2
        assert [record.levelname for record in caplog.records] == ["WARNING", "INFO"]


def test_watchdog_loop_returns_at_once_without_watchdog(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    for environ in ({"NOTIFY_SOCKET": address}, {"WATCHDOG_USEC": "200000"}):
        with Notifier.from_environ(environ) as notifier:
            asyncio.run(asyncio.wait_for(watchdog_loop(notifier, lambda: True), timeout=5))
    assert received(sock) == []
