"""callahead's life as a service: SIGTERM with a recipient in flight through a real
Postfix backup, a second signal, and the sd_notify protocol with its watchdog (the
systemd unit itself is checked in tests/deploy)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import Transaction, make_message, send
from tests.harness.fixtures import make_workdir
from tests.harness.ports import accepts
from tests.harness.waiting import wait_for

from .conftest import SENDER, Stack

DELIVERY_TIMEOUT = 30.0
ANSWER_BOUND = 7.0
"""libmilter stops listening within about 5 s of SIGTERM, then waiting recipients get
their answer within SHUTDOWN_GRACE (2 s)."""
EXIT_BOUND = 12.0
"""... and the probe sessions close within 5 s more (deploy/callahead.service)."""


def test_sigterm_with_a_recipient_in_flight_never_rejects_or_loses_it(stack: Stack) -> None:
    profile = stack.profiles["shutdown"]
    process = profile.process
    addr = stack.new_user("held.test")  # the stand-in primary takes the delivery
    token, body = make_message(SENDER, [addr])
    done: list[Transaction] = []

    client = threading.Thread(target=lambda: done.append(send(profile.port, SENDER, [addr], body)))
    client.start()
    wait_for(lambda: addr in stack.held.rcpts(), 10.0, what="the probe at the primary")
    assert process.pid is not None
    signalled = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    client.join(ANSWER_BOUND + 5)
    answered = time.monotonic() - signalled
    wait_for(process.exited, EXIT_BOUND, what="callahead to exit")
    exited = time.monotonic() - signalled

    [tx] = done
    assert tx.code(addr) == 250  # never rejected
    assert tx.data is not None and tx.data[0] == 250
    assert answered < ANSWER_BOUND  # not the primary's 15 s, nor the 20 s timeout
    assert exited < EXIT_BOUND
    assert process.returncode == 0
    log = process.log()
    assert "reason=shutdown" in log, log
    assert "callahead stopped" in log
    wait_for(
        lambda: any(token.encode() in m for m in stack.primary.mailbox(addr)),
        DELIVERY_TIMEOUT,
        what="delivery of the message accepted during the shutdown",
    )


def term_pending(pid: int) -> bool:
    """Whether a SIGTERM is pending for the process (ShdPnd in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.fixture
def workdir() -> Iterator[Path]:
    with make_workdir() as path:
        yield path


def test_a_second_signal_exits_at_once(workdir: Path) -> None:
    process = CallaheadProcess(workdir, {"CALLAHEAD_ROUTES": "example.test=[127.0.0.1]:9"})
    process.start()
    try:
        assert process.pid is not None
        pid = process.pid
        os.kill(pid, signal.SIGTERM)  # libmilter takes up to 5 s to wind down
        # Signals do not queue: send the second once libmilter has taken the first.
        wait_for(lambda: not term_pending(pid), 5.0, what="libmilter to take SIGTERM")
        os.kill(pid, signal.SIGTERM)
        second = time.monotonic()
        wait_for(process.exited, EXIT_BOUND, what="callahead to exit")
        assert time.monotonic() - second < 1.0
        assert process.returncode == 128 + signal.SIGTERM
        assert "second stop signal (SIGTERM): exiting at once" in process.log()
    finally:
        process.stop()


def test_service_manager_protocol_and_watchdog(workdir: Path) -> None:
    path = workdir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        process = CallaheadProcess(
            workdir,
            {
                "CALLAHEAD_ROUTES": "example.test=[127.0.0.1]:9",
                "NOTIFY_SOCKET": str(path),
                "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
            },
        )
        process.start()
        try:
            states = [sock.recv(100) for _ in range(4)]
            assert states[0] == b"READY=1"
            assert states[1:] == [b"WATCHDOG=1"] * 3
            assert process.pid is not None
            os.kill(process.pid, signal.SIGTERM)
            while (state := sock.recv(100)) == b"WATCHDOG=1":
                pass
            assert state == b"STOPPING=1"
            wait_for(process.exited, EXIT_BOUND, what="callahead to exit")
            assert process.returncode == 0
        finally:
            process.stop()


def _policy_ask(port: int, recipient: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
            + f"recipient={recipient}\nclient_address=192.0.2.9\n\n".encode()
        )
        return conn.recv(4096)


def test_the_policy_service_alone_answers_and_stops_cleanly(stack: Stack, workdir: Path) -> None:
    """CALLAHEAD_SOCKET empty: no milter, no libmilter thread; the policy service alone
    answers, and SIGTERM stops it at once (no libmilter wind-down)."""
    process = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_SOCKET": "",
            "CALLAHEAD_ROUTES": f"example.test=[127.0.0.1]:{stack.primary.port}",
        },
        name="policy-only",
    )
    process.start()
    try:
        stranger = stack.new_address()
        assert _policy_ask(process.policy_port, stranger) == b"action=550 5.1.1 User unknown\n\n"
        assert stack.primary.probes_for(stranger) == 1
        assert "milter off" in process.log()
        assert not accepts(process.milter_port)
        assert process.pid is not None
        # SIGHUP reloads (the main thread waits in sigwait for the stop signals).
        os.kill(process.pid, signal.SIGHUP)
        wait_for(lambda: "SIGHUP: routes reloaded" in process.log(), 10, what="the reload")
        assert not process.exited()
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        wait_for(process.exited, EXIT_BOUND, what="callahead to exit")
        assert time.monotonic() - signalled < 5.0
        assert process.returncode == 0
        assert "callahead stopped" in process.log()
    finally:
        process.stop()


@pytest.mark.parametrize("stop", ["one signal", "two signals"])
def test_at_info_the_decision_lines_come_in_batches_and_none_is_lost_at_exit(
    stack: Stack, workdir: Path, stop: str
) -> None:
    """At the operator's level (INFO) lines are written in batches (logoutput.py): a
    line shows within the flush delay while running, and the lines still waiting when
    callahead stops, by the clean path or by the second signal's immediate exit, are
    written before it exits."""
    process = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_LOG_LEVEL": "INFO",
            "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
            "CALLAHEAD_ROUTES": f"example.test=[127.0.0.1]:{stack.primary.port}",
        },
        name=f"info-{stop.replace(' ', '-')}",
    )
    process.start()
    try:
        first = stack.new_address()
        assert _policy_ask(process.policy_port, first) == b"action=550 5.1.1 User unknown\n\n"
        wait_for(lambda: f"rcpt=<{first}> decision=reject" in process.log(), 5, what="the line")
        assert process.pid is not None
        # The stop signal right after the answers: their lines are still waiting.
        last = [stack.new_address() for _ in range(20)]
        for address in last:
            assert _policy_ask(process.policy_port, address).startswith(b"action=550 ")
        pid = process.pid
        os.kill(pid, signal.SIGTERM)  # libmilter takes up to 5 s to wind down
        if stop == "two signals":
            wait_for(lambda: not term_pending(pid), 5.0, what="libmilter to take SIGTERM")
            os.kill(pid, signal.SIGTERM)
        wait_for(process.exited, EXIT_BOUND, what="callahead to exit")
        log = process.log()
        for address in last:
            assert f"rcpt=<{address}> decision=reject reason=probe_unknown" in log, address
        if stop == "one signal":
            assert process.returncode == 0
            assert log.rstrip().endswith("callahead stopped")
        else:
            assert process.returncode == 128 + signal.SIGTERM
    finally:
        process.stop()


def test_uvloop_when_chosen_serves_and_is_named_at_start(stack: Stack, workdir: Path) -> None:
    pytest.importorskip("uvloop", reason="uvloop is optional (not in Debian's run)")
    process = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_EVENT_LOOP": "uvloop",
            "CALLAHEAD_ROUTES": f"example.test=[127.0.0.1]:{stack.primary.port}",
        },
        name="uvloop",
    )
    process.start()
    try:
        stranger = stack.new_address()
        assert _policy_ask(process.policy_port, stranger) == b"action=550 5.1.1 User unknown\n\n"
        assert stack.primary.probes_for(stranger) == 1
        assert "event loop: uvloop " in process.log()
    finally:
        process.stop()


def test_uvloop_chosen_but_missing_stops_the_start(workdir: Path) -> None:
    blocker = workdir / "no-uvloop"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('not here')\n")
    done = subprocess.run(
        [sys.executable, "-m", "callahead", "serve"],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(blocker), *sys.path]),
            "CALLAHEAD_EVENT_LOOP": "uvloop",
            "CALLAHEAD_ROUTES": "example.test=[127.0.0.1]:9",
            "CALLAHEAD_SOCKET": "inet:127.0.0.1:9",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 78
    assert "CALLAHEAD_EVENT_LOOP=uvloop, but uvloop is not installed" in done.stderr
