"""The probe loop's heartbeat, the health monitor and the sd_notify protocol."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from callahead.probing.engine import ProbeEngine
from callahead.probing.loop import LoopProber, ProbeLoop
from callahead.process.watchdog import HealthMonitor, notify, watchdog_interval
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import Skip, Verdict
from tests.harness.waiting import wait_for
from tests.unit.settings import probe_settings

HOP = Nexthop("127.0.0.1", 9)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def test_notify_sends_one_datagram(notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = notify_socket
    assert notify("READY=1", env)
    assert sock.recv(100) == b"READY=1"


def test_notify_without_a_service_manager_does_nothing() -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify.sock"}) is False


def test_notify_abstract_socket() -> None:
    name = f"callahead-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(env) == interval


def test_a_stuck_loop_is_noticed_answered_at_once_and_stops_the_pings(
    notify_socket: tuple[socket.socket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    sock, env = notify_socket
    sock.settimeout(0.2)
    loop = ProbeLoop(stall_limit=1.5)  # three missed beats
    loop.start()
    engine = ProbeEngine(probe_settings(helo_name="b.example", sender="", timeout=5.0))
    prober = LoopProber(loop, engine)
    monitor = HealthMonitor(lambda: loop.healthy, env={**env, "WATCHDOG_USEC": "1000000"})
    release = threading.Event()

    async def stuck() -> None:
        release.wait(10)  # blocks the whole loop, as a stuck callback would

    try:
        assert monitor.pinging
        assert monitor.check()
        assert sock.recv(100) == b"WATCHDOG=1"
        loop.submit(stuck())
        wait_for(lambda: not loop.healthy, 5.0, what="the stall to show")
        started = time.monotonic()
        result = prober.probe("u1@example.test", [HOP])
        assert time.monotonic() - started < 0.1  # not the whole handoff time
        assert (result.verdict, result.skipped) == (Verdict.TEMPFAIL, Skip.LOOP_STALLED)
        with caplog.at_level(logging.INFO, logger="callahead.watchdog"):
            assert not monitor.check()
            assert not monitor.check()
            with pytest.raises(TimeoutError):
                sock.recv(100)  # no ping while the loop is stuck
            release.set()
            wait_for(lambda: loop.healthy, 5.0, what="the loop to beat again")
            assert monitor.check()
        assert sock.recv(100) == b"WATCHDOG=1"
        messages = [r.getMessage() for r in caplog.records]
        assert sum("not answering" in m for m in messages) == 1  # said once
        assert sum("answers again" in m for m in messages) == 1
    finally:
        release.set()
        loop.stop()


def test_stop_answers_the_waiting_threads_at_once() -> None:
    loop = ProbeLoop()
    loop.start()
    engine = ProbeEngine(probe_settings(helo_name="b.example", sender="", timeout=5.0))
    prober = LoopProber(loop, engine)
    results = []
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)  # accepts TCP (backlog) and never greets
    hop = Nexthop("127.0.0.1", blackhole.getsockname()[1])

    def wait_on_probe() -> None:
        results.append(prober.probe("u1@example.test", [hop]))

    try:
        thread = threading.Thread(target=wait_on_probe)
        thread.start()
        wait_for(lambda: prober.in_flight == 1, 5.0, what="the probe to be in flight")
        started = time.monotonic()
        assert prober.stop(grace=2.0) == 0
        thread.join(5)
        assert time.monotonic() - started < 1.0
        assert [(r.verdict, r.skipped) for r in results] == [(Verdict.TEMPFAIL, Skip.SHUTDOWN)]
        later = prober.probe("u2@example.test", [hop])  # refused at once from now on
        assert later.skipped is Skip.SHUTDOWN
        loop.run(engine.aclose(), timeout=5)
    finally:
        blackhole.close()
        loop.stop()
        asyncio.set_event_loop(None)
