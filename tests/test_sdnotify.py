"""Tests for agentd.sdnotify: the pure helpers, then the real protocol over real sockets.

The socket tests bind a real ``AF_UNIX``/``SOCK_DGRAM`` socket, once in the abstract
namespace and once on the filesystem, and assert the exact datagrams. Nothing waits by
sleeping. A receive has a timeout. "Nothing was sent" is proved in one of two ways. Either
a sentinel datagram is sent afterwards and must be the next one to arrive (a Unix datagram
socket keeps order), or the health check is counted and the queue is drained once it has
been called enough times.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentd import sdnotify
from agentd.sdnotify import (
    Notifier,
    ProgressStamp,
    format_message,
    monotonic_usec,
    notify_address,
    watchdog_loop,
    watchdog_usec_for,
)

RECV_TIMEOUT_S = 5.0  # a generous upper bound on a single receive; never a synchronisation sleep
MAX_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL terminator

# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/run/systemd/notify", b"/run/systemd/notify"),
        ("@agentd-notify", b"\0agentd-notify"),
        (None, None),
        ("", None),
        ("@", None),
        ("run/systemd/notify", None),  # relative: rejected, as libsystemd does
        ("vsock:2:1234", None),  # systemd >= 254 only; not supported here
    ],
)
def test_notify_address(value: str | None, expected: bytes | None) -> None:
    assert notify_address(value) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
    ],
)
def test_watchdog_usec_for(env: dict[str, str], expected: int | None) -> None:
    assert watchdog_usec_for(env, pid=4242) == expected


def test_format_message_joins_assignments_without_trailing_newline() -> None:
    assert format_message("READY=1", "STATUS=up") == b"READY=1\nSTATUS=up"
    assert format_message("WATCHDOG=1") == b"WATCHDOG=1"


def test_format_message_cannot_be_split_by_a_value() -> None:
    # A newline would let a STATUS text inject e.g. "READY=1"; NUL would truncate the message.
    assert format_message("STATUS=a\nREADY=1\r\0b") == b"STATUS=a READY=1  b"
    assert format_message("STATUS=caf\u00e9") == "STATUS=caf\u00e9".encode()


@pytest.mark.parametrize("bad", [(), ("READY",), ("=1",)])
def test_format_message_rejects_malformed_assignments(bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        format_message(*bad)


def test_monotonic_usec_is_clock_monotonic_in_microseconds() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = monotonic_usec()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= value <= after


def test_notifier_from_env_watchdog_properties() -> None:
    n = Notifier.from_env(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert n.enabled
    assert n.watchdog_usec == 30_000_000
    assert n.watchdog_interval_s == 15.0


def test_watchdog_without_notify_socket_is_off() -> None:
    # Nothing to send the pings to, so there is no watchdog to feed.
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@agentd-from-os-environ")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier.from_env()
    assert n.enabled
    assert n.watchdog_interval_s == 1.0


def test_progress_stamp_with_injected_clock() -> None:
    now = [100.0]
    stamp = ProgressStamp(clock=lambda: now[0])
    healthy = stamp.fresh_within(10.0)
    assert healthy()  # a new stamp counts as fresh
    now[0] = 110.0
    assert healthy()
    now[0] = 110.5
    assert not healthy()
    assert stamp.age_s() == 10.5
    stamp.mark()
    assert healthy()
    assert stamp.age_s() == 0.0
    with pytest.raises(ValueError):
        stamp.fresh_within(0)


# ------------------------------------------------------------------------ real sockets


class Receiver:
    """The systemd side: a bound, non-blocking datagram socket read through the event loop."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}

    async def recv(self) -> bytes:
        """The next datagram, failing the test if none arrives within RECV_TIMEOUT_S."""
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 4096), RECV_TIMEOUT_S)

    def drain(self) -> list[bytes]:
        """Everything queued right now, without waiting."""
        out: list[bytes] = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture(params=["abstract", "filesystem"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    if request.param == "abstract":
        name = f"agentd-test-{secrets.token_hex(8)}"
        sock = _bind("\0" + name)
        notify_socket = "@" + name
    else:
        path = tmp_path / "notify.sock"
        if len(os.fsencode(path)) > MAX_SUN_PATH:
            pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
        sock = _bind(str(path))
        notify_socket = str(path)
    try:
        yield Receiver(sock, notify_socket)
    finally:
        sock.close()


async def test_ready_with_status(receiver: Receiver) -> None:
    n = Notifier.from_env(receiver.env())
    assert n.enabled
    assert n.ready(status="connected to VoIPBIN")
    assert await receiver.recv() == b"READY=1\nSTATUS=connected to VoIPBIN"


async def test_each_message_is_one_exact_datagram(receiver: Receiver) -> None:
    n = Notifier.from_env(receiver.env())
    assert n.ready()
    assert n.status("2 calls in progress")
    assert n.stopping()
    assert await receiver.recv() == b"READY=1"
    assert await receiver.recv() == b"STATUS=2 calls in progress"
    assert await receiver.recv() == b"STOPPING=1"


async def test_reloading_sends_monotonic_usec(receiver: Receiver) -> None:
    n = Notifier.from_env(receiver.env())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = (await receiver.recv()).split(b"\n")
    assert lines[0] == b"RELOADING=1"
    key, _, value = lines[1].partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


async def test_watchdog_sends_watchdog_1(receiver: Receiver) -> None:
    n = Notifier.from_env(receiver.env(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())))
    assert n.watchdog()
    assert await receiver.recv() == b"WATCHDOG=1"


async def test_watchdog_pid_of_another_process_disables_watchdog(receiver: Receiver) -> None:
    other_pid = os.getppid()  # a live process that is not us
    assert other_pid != os.getpid()
    n = Notifier.from_env(receiver.env(WATCHDOG_USEC="20000", WATCHDOG_PID=str(other_pid)))
    assert n.enabled  # READY/STATUS still go out; only the watchdog is not ours
    assert n.watchdog_interval_s is None
    assert not n.watchdog()
    # The loop has nothing to do: it must return at once, not run forever.
    await asyncio.wait_for(watchdog_loop(n, lambda: True), RECV_TIMEOUT_S)
    assert n.status("sentinel")
    assert await receiver.recv() == b"STATUS=sentinel"  # first datagram: no WATCHDOG=1 before it


async def test_unset_notify_socket_is_a_noop() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "20000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert not n.ready(status="x")
    assert not n.status("x")
    assert not n.reloading()
    assert not n.stopping()
    assert not n.watchdog()
    await asyncio.wait_for(watchdog_loop(n, lambda: True), RECV_TIMEOUT_S)


@pytest.mark.parametrize(
    "notify_socket",
    [
        "/nonexistent/agentd/notify.sock",  # ENOENT
        "@agentd-test-nobody-listens-" + secrets.token_hex(8),  # ECONNREFUSED
    ],
)
def test_missing_socket_is_swallowed(notify_socket: str, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "20000"})
    assert n.enabled
    with caplog.at_level("DEBUG", logger=sdnotify.__name__):
        assert not n.ready(status="x")
        assert not n.watchdog()
        assert not n.reloading()
        assert not n.stopping()
    assert any("could not send" in r.getMessage() for r in caplog.records)


def test_socket_path_in_tmp_path_that_does_not_exist(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready()


async def test_full_queue_neither_blocks_nor_raises(receiver: Receiver) -> None:
    # Nobody reads: the kernel queue fills (net.unix.max_dgram_qlen), after which a blocking
    # send would hang the event loop. Ours must return False (EAGAIN) instead.
    n = Notifier.from_env(receiver.env())
    sent = 0
    while n.status(f"{sent}"):
        sent += 1
        assert sent < 1_000_000, "the receive queue never filled"
    assert sent > 0
    queued = receiver.drain()
    assert len(queued) == sent
    assert queued[0] == b"STATUS=0"
    assert n.status("after draining")  # room again: sending works


# ------------------------------------------------------------------------ watchdog loop


class HealthCheck:
    """An ``is_healthy`` whose answer the test flips, and which counts its calls."""

    def __init__(self, inner: Callable[[], bool] | None = None) -> None:
        self.healthy = True
        self.inner = inner
        self.calls = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []

    def __call__(self) -> bool:
        self.calls += 1
        for target, event in self._waiters:
            if self.calls >= target:
                event.set()
        return self.inner() if self.inner is not None else self.healthy

    async def wait_for_calls(self, more: int) -> None:
        """Wait until the loop has made ``more`` further checks."""
        event = asyncio.Event()
        self._waiters.append((self.calls + more, event))
        await asyncio.wait_for(event.wait(), RECV_TIMEOUT_S)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_watchdog_loop_pings_only_while_healthy(receiver: Receiver) -> None:
    n = Notifier.from_env(receiver.env(WATCHDOG_USEC="20000"))  # ping every 10 ms
    assert n.watchdog_interval_s == 0.01
    check = HealthCheck()
    task = asyncio.create_task(watchdog_loop(n, check))
    try:
        for _ in range(3):
            assert await receiver.recv() == b"WATCHDOG=1"

        # Drain what is queued, then turn unhealthy with no await in between, so the loop
        # cannot run in the gap. Every datagram from now on would come from a check made
        # while unhealthy.
        assert set(receiver.drain()) <= {b"WATCHDOG=1"}
        check.healthy = False
        await check.wait_for_calls(3)
        assert receiver.drain() == []

        check.healthy = True
        assert await receiver.recv() == b"WATCHDOG=1"
    finally:
        await _cancel(task)


async def test_watchdog_loop_treats_a_raising_check_as_unhealthy(receiver: Receiver) -> None:
    n = Notifier.from_env(receiver.env(WATCHDOG_USEC="20000"))
    calls = 0
    done = asyncio.Event()

    def broken() -> bool:
        nonlocal calls
        calls += 1
        if calls >= 3:
            done.set()
        raise RuntimeError("bug in the health check")

    task = asyncio.create_task(watchdog_loop(n, broken))
    try:
        await asyncio.wait_for(done.wait(), RECV_TIMEOUT_S)
        assert not task.done()  # the loop survived the exceptions
        assert receiver.drain() == []
    finally:
        await _cancel(task)


async def test_watchdog_loop_with_progress_stamp(receiver: Receiver) -> None:
    now = [0.0]
    stamp = ProgressStamp(clock=lambda: now[0])
    n = Notifier.from_env(receiver.env(WATCHDOG_USEC="20000"))
    check = HealthCheck(stamp.fresh_within(5.0))
    task = asyncio.create_task(watchdog_loop(n, check))
    try:
        assert await receiver.recv() == b"WATCHDOG=1"
        receiver.drain()
        now[0] = 60.0  # the supervisor has not marked progress for a minute
        await check.wait_for_calls(3)
        assert receiver.drain() == []
        stamp.mark()
        assert await receiver.recv() == b"WATCHDOG=1"
    finally:
        await _cancel(task)
