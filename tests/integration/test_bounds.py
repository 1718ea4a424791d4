"""Bounds of a real ``callahead serve`` under a flood (issue 26, items 4 to 6): idle
connections past the file descriptor limit, idle policy connections past the cap,
half-sent ``/metrics`` requests, milter connections past the cap, and a 64 KiB
recipient sent straight to the milter. Each time the process answers real requests
afterwards (or meanwhile), and its log keeps its decision lines instead of a traceback
per retry.

The descriptor limit is lowered for the process alone (``RLIMIT_NOFILE`` set before it
execs), so a few hundred connections from the test exhaust it."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import POLICY_REQUEST, ask_policy
from tests.harness.milterclient import MAX_DATA, MilterClient, MilterClosed
from tests.harness.ports import free_port, read_until
from tests.harness.primary import Primary
from tests.harness.waiting import wait_for
from tests.integration.conftest import ONE_USER

KNOWN = ONE_USER
RCPT_REQUEST = POLICY_REQUEST


def serve(
    workdir: Path, primary: Primary, nofile: int | None = None, **env: str
) -> CallaheadProcess:
    """``callahead serve`` routing example.test to ``primary``, with at most ``nofile``
    file descriptors when given, and ``env`` besides."""
    process = CallaheadProcess(
        workdir, {"CALLAHEAD_ROUTES": "example.test=[{}]:{}".format(*primary.address), **env}
    )
    if nofile is not None:
        process.argv = [
            sys.executable,
            "-c",
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
            "os.execv(sys.executable, [sys.executable, '-m', 'callahead', 'serve'])",
        ]
    return process


@contextlib.contextmanager
def running(process: CallaheadProcess) -> Iterator[CallaheadProcess]:
    process.start()
    try:
        yield process
    finally:
        process.stop()


def ask_milter(process: CallaheadProcess, argument: bytes) -> tuple[bytes, str]:
    """The milter's answer to one RCPT on a new connection: command and text."""
    with MilterClient("127.0.0.1", process.milter_port) as client:
        assert client.negotiate().command == b"O"
        reply = client.rcpt(argument)
        client.quit()
        return reply.command, reply.text


def tracebacks(log: str) -> int:
    return log.count("Traceback (most recent call last)")


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def descriptors_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to ``port`` that send nothing (queued in the listen
    backlog when the process can accept no more)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def test_idle_connections_past_the_descriptor_limit_are_survived_with_one_log_line(
    tmp_path: Path, known_primary: Primary
) -> None:
    """About 1,000 idle milter connections ran a default process (1024 descriptors) out:
    asyncio then logged ``socket.accept() out of system resource`` with a traceback each
    second for the policy port, thousands of lines that journald rate-limited, losing
    the decision lines with them."""
    with running(serve(tmp_path, known_primary, nofile=128)) as process:
        assert process.pid is not None
        flood = idle_connections(process.milter_port, 150)  # past the 128 descriptors
        try:
            wait_for(lambda: descriptors_of(process.pid or 0) >= 127, 10, what="fds used up")
            waiting = idle_connections(process.policy_port, 5)  # accept() fails: EMFILE
            flood += waiting
            wait_for(lambda: "out of system resource" in process.log(), 10, what="the accept error")
            # asyncio tries again each second: a few seconds of retries, one line.
            time.sleep(4)
            log = process.log()
            assert log.count("out of system resource") == 1
            assert tracebacks(log) == 0
            for conn in flood[:100]:  # the flood ebbs: descriptors come free
                conn.close()
            wait_for(lambda: descriptors_of(process.pid or 0) < 100, 10, what="fds freed")
            assert ask_policy(process.policy_port, "ghost@example.test") == (
                b"action=550 5.1.1 User unknown\n\n"
            )
            assert ask_milter(process, b"<ghost2@example.test>")[0] == b"y"
            assert ask_policy(process.policy_port, KNOWN) == b"action=DUNNO\n\n"
        finally:
            for conn in flood:
                conn.close()
        log = process.log()
        assert "POLICYQID: client=192.0.2.7 rcpt=<ghost@example.test> decision=reject" in log
        assert "TESTQID: client=192.0.2.7 rcpt=<ghost2@example.test> decision=reject" in log
        assert tracebacks(log) == 0
        assert log.count("out of system resource") <= 2  # the second a minute later at most


def test_an_idle_policy_flood_at_the_cap_displaces_itself_and_postfix_is_answered(
    tmp_path: Path, known_primary: Primary
) -> None:
    """Idle connections that never send a request held every allowed policy connection,
    and Postfix's own was refused: it applied smtpd_policy_service_default_action
    (DUNNO), and an unknown recipient got 250. A new connection now takes the place of
    the oldest silent one; a connection that has asked is kept."""
    cap = 50
    process = serve(tmp_path, known_primary, CALLAHEAD_POLICY_MAX_CONNECTIONS=str(cap))
    with running(process):
        kept = socket.create_connection(("127.0.0.1", process.policy_port), timeout=10)
        flood: list[socket.socket] = []
        try:
            kept.sendall(RCPT_REQUEST.format(KNOWN).encode())  # an smtpd's connection
            assert read_until(kept, lambda answer: answer.endswith(b"\n\n")) == (
                b"action=DUNNO\n\n"
            )
            flood = idle_connections(process.policy_port, 300)
            assert ask_policy(process.policy_port, "ghost@example.test") == (
                b"action=550 5.1.1 User unknown\n\n"
            )
            kept.sendall(RCPT_REQUEST.format("ghost4@example.test").encode())
            assert read_until(kept, lambda answer: answer.endswith(b"\n\n")) == (
                b"action=550 5.1.1 User unknown\n\n"
            )
            samples = process.samples()
            # 300 silent and the asking one into cap - 1 places: the oldest silent ones out.
            assert samples[("callahead_policy_displaced_connections_total", ())] == 300 + 1 - (
                cap - 1
            )
            refused = ("callahead_policy_refused_connections_total", (("reason", "limit"),))
            assert samples.get(refused, 0) == 0
            for conn in flood[:200]:
                conn.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert conn.recv(4096) == b""  # closed by the service
        finally:
            kept.close()
            for conn in flood:
                conn.close()
        log = process.log()
        assert "POLICYQID: client=192.0.2.7 rcpt=<ghost@example.test> decision=reject" in log
        assert "rcpt=<ghost4@example.test> decision=reject" in log
        assert log.count("closed to make room for newer ones") == 1
        assert tracebacks(log) == 0


def test_half_sent_metrics_requests_hold_no_threads_and_a_scrape_goes_on(
    tmp_path: Path, known_primary: Primary
) -> None:
    """prometheus-client's server made a thread per connection with no timeout: 300
    half-sent ``GET /metrics`` left 300 threads alive after 60 s."""
    with running(serve(tmp_path, known_primary)) as process:
        pid = process.pid
        assert pid is not None
        threads = threads_of(pid)
        flood = []
        try:
            for _ in range(300):
                conn = socket.create_connection(("127.0.0.1", process.metrics_port), timeout=10)
                conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: backup-mx\r\n")
                flood.append(conn)
            assert "callahead_probe_loop_up 1.0" in process.scrape()
            assert threads_of(pid) <= threads
            assert descriptors_of(pid) < 100  # at most 16 kept: no pile-up
            started = time.monotonic()
            for conn in flood:
                conn.settimeout(15)
                with contextlib.suppress(ConnectionResetError):
                    assert conn.recv(4096) == b""  # closed by the server
            assert time.monotonic() - started < 10  # within the 5 s timeout and a margin
        finally:
            for conn in flood:
                conn.close()
        assert ask_policy(process.policy_port, KNOWN) == b"action=DUNNO\n\n"
        log = process.log()
        assert log.count("metrics: connections:") == 1
        assert tracebacks(log) == 0


def test_milter_connections_past_the_cap_are_handed_back_at_negotiation(
    tmp_path: Path, known_primary: Primary
) -> None:
    """libmilter has no cap: a connection beyond callahead's (half the descriptors, 64
    here) fails its negotiation, libmilter closes it at once, and Postfix would apply
    milter_default_action to that session."""
    with running(serve(tmp_path, known_primary, nofile=128)) as process:
        held: list[MilterClient] = []
        try:
            for _ in range(64):
                client = MilterClient("127.0.0.1", process.milter_port)
                held.append(client)
                assert client.negotiate().command == b"O"
            with (
                MilterClient("127.0.0.1", process.milter_port) as over,
                pytest.raises(MilterClosed),
            ):
                over.negotiate()
            samples = process.samples()
            assert samples[("callahead_milter_connections", ())] == 64
            assert samples[("callahead_milter_refused_connections_total", ())] == 1
            # The held ones still judge; one closed makes room for a new one.
            assert held[0].rcpt(b"<ghost@example.test>").command == b"y"
            held.pop().close()
            wait_for(
                lambda: process.samples()[("callahead_milter_connections", ())] == 63,
                10,
                what="the closed connection counted out",
            )
            assert ask_milter(process, b"<ghost3@example.test>")[0] == b"y"
        finally:
            for client in held:
                client.close()
        log = process.log()
        assert log.count("milter connection(s) refused") == 1
        assert tracebacks(log) == 0


def test_a_64_kib_recipient_straight_to_the_milter_is_answered_at_once(
    tmp_path: Path, known_primary: Primary
) -> None:
    """The old parsing took 17 s over a 60 KB argument holding the GIL, and the policy
    service and the watchdog stalled with it. Such an argument is garbage: never probed,
    never a reject."""
    size = MAX_DATA - 100  # as long as libmilter takes a command (64 KiB)
    blanks = b"<bob" + b" " * size + b"@example.test>"
    brackets = b"<bob@example.test" + b">" * size + b"x>"
    with running(serve(tmp_path, known_primary)) as process:
        for argument in (blanks, brackets):
            started = time.monotonic()
            command, _ = ask_milter(process, argument)
            assert time.monotonic() - started < 0.5
            assert command == b"c"  # the tempfail action (accept) or no opinion
        assert ask_policy(process.policy_port, "ghost@example.test").startswith(b"action=550")
        long_domain = "bob@" + "a." * 6000 + "example.test"  # a 12 KB policy request
        started = time.monotonic()
        assert ask_policy(process.policy_port, long_domain) == b"action=DUNNO\n\n"
        assert time.monotonic() - started < 0.5
        log = process.log()
        asked = [r.address for r in known_primary.rcpts]
        assert "ghost@example.test" in asked
        assert not [a for a in asked if "bob" in a]  # the garbage was never probed
        assert "rcpt_chars=" in log
        assert max(len(line) for line in log.splitlines()) < 4096
        assert tracebacks(log) == 0


def test_metrics_off_loopback_are_warned_of_once_and_in_the_start_line(
    tmp_path: Path, known_primary: Primary
) -> None:
    port = free_port()
    process = serve(tmp_path, known_primary, CALLAHEAD_METRICS_LISTEN=f"0.0.0.0:{port}")
    process.metrics_port = port  # scraped on 127.0.0.1, which 0.0.0.0 takes in
    with running(process):
        log = process.log()
    assert log.count("not a loopback address: any host that reaches it reads them") == 1
    assert f"metrics: 0.0.0.0:{port} (not loopback);" in log
