"""The policy service front end: Postfix's policy delegation protocol over real
sockets, served on a real probe loop, with the decision core driven by a fake prober;
and a fuzz of the request parser."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callahead.caching.cache import PositiveCache
from callahead.core.policy import Action, Decision, Policy, Reason, TempfailAction
from callahead.frontends.judge import Judge
from callahead.frontends.metrics import Metrics
from callahead.frontends.policyrequest import MAX_ATTRIBUTES, MAX_LINE, MAX_REQUEST
from callahead.frontends.policyservice import (
    IDLE_MARGIN,
    IDLE_TIMEOUT,
    PolicyService,
    action_for,
)
from callahead.frontends.unixsocket import UnixSocketError
from callahead.probing.loop import ProbeLoop
from callahead.routing.routes import Nexthop, parse_routes
from callahead.smtp.verdict import ProbeResult, Stage, Verdict
from tests.harness.ports import read_until
from tests.harness.waiting import wait_for
from tests.unit.probers import SyncProber

ROUTES = parse_routes("example.com=[192.0.2.10]:25")
ACTION = re.compile(rb"action=(DUNNO|[45]\d\d [45]\.\d{1,3}\.\d{1,3} [^\n]+)\n\n")


class Prober(SyncProber):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def probe(self, address: str, hops: object) -> ProbeResult:
        self.asked.append(address)
        verdict = Verdict.VALID if address.startswith("known") else Verdict.UNKNOWN
        if address.startswith("busy"):
            verdict = Verdict.TEMPFAIL
        code = {Verdict.VALID: 250, Verdict.UNKNOWN: 550, Verdict.TEMPFAIL: 451}[verdict]
        return ProbeResult(verdict, Stage.RCPT, code, "scripted", 0.001, "[192.0.2.10]:25")


def request(**attributes: str) -> bytes:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT"}
    return b"".join(f"{k}={v}\n".encode() for k, v in {**base, **attributes}.items()) + b"\n"


class Served:
    """The service on a real probe loop, on a free loopback port, or on the unix socket
    ``path`` when given (``start`` False: not listening yet)."""

    def __init__(
        self,
        action: TempfailAction = TempfailAction.DEFER,
        *,
        path: Path | None = None,
        start: bool = True,
        prober: Prober | None = None,
        **options: Any,
    ) -> None:
        self.metrics = Metrics()
        self.prober = prober or Prober()
        policy = Policy(
            routes=ROUTES,
            cache=PositiveCache(ttl=60, maxsize=100),
            prober=self.prober,
            tempfail_action=action,
        )
        self.service = PolicyService(Judge(policy, self.metrics), self.metrics, **options)
        self.loop = ProbeLoop()
        self.loop.start()
        self.path = path
        self.port = 0
        if start:
            self.start()

    def start(self) -> None:
        if self.path is not None:
            self.loop.run(self.service.start("unix", "", 0, str(self.path)), timeout=5)
            return
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.loop.run(self.service.start("inet", "127.0.0.1", self.port, ""), timeout=5)

    def connect(self) -> socket.socket:
        if self.path is not None:
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(10)
            conn.connect(str(self.path))
            return conn
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def ask(self, conn: socket.socket, data: bytes) -> bytes:
        conn.sendall(data)
        return read_until(conn, lambda answer: answer.endswith(b"\n\n"))

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.loop.run(self.service.aclose(), timeout=5)
        self.loop.stop()


def closed_at_once(conn: socket.socket) -> bool:
    """Whether the server closed ``conn`` without a word (within a second)."""
    conn.settimeout(1.0)
    try:
        return conn.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def served() -> Iterator[Served]:
    server = Served()
    yield server
    server.close()


def test_rcpt_requests_get_the_decision_on_one_kept_connection(served: Served) -> None:
    with served.connect() as conn:
        assert served.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
        assert served.ask(conn, request(recipient="ghost@example.com")) == (
            b"action=550 5.1.1 User unknown\n\n"
        )
        assert served.ask(conn, request(recipient="busy@example.com")) == (
            b"action=451 4.4.3 Recipient address verification temporarily unavailable, "
            b"try again later\n\n"
        )
        assert served.ask(conn, request(recipient="x@unrouted.org")) == b"action=DUNNO\n\n"
    assert served.sample("callahead_policy_requests_total", state="rcpt") == 4


def test_a_recipient_domain_that_does_not_exist_gets_550_512() -> None:
    decision = Decision(Action.REJECT, Reason.NO_DOMAIN, "anyone@zq7x.example.com")
    assert action_for(decision) == "550 5.1.2 Domain not found"


def test_the_action_text_leaves_postfixs_own_prefix_to_postfix() -> None:
    # Postfix answers "550 5.1.1 <rcpt>: Recipient address rejected: " + the action's text.
    decision = Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "ghost@example.com")
    assert decision.reply is not None
    assert decision.reply.text == "Recipient address rejected: User unknown"
    assert action_for(decision) == "550 5.1.1 User unknown"


@pytest.mark.parametrize(
    ("internal", "asked"),
    [
        ("a b@example.com", '"a b"@example.com'),
        ("@example.com", '""@example.com'),
        ('x"y@example.com', '"x\\"y"@example.com'),
        ("a@b@example.com", '"a@b"@example.com'),
        ("known.user@example.com", "known.user@example.com"),
    ],
)
def test_a_quoted_local_part_is_quoted_again_before_it_is_judged(
    served: Served, internal: str, asked: str
) -> None:
    # Postfix hands a policy service the internal form (the quotes taken off).
    with served.connect() as conn:
        served.ask(conn, request(recipient=internal))
    assert served.prober.asked == [asked]


def test_other_states_get_dunno_without_a_probe(served: Served) -> None:
    with served.connect() as conn:
        for state in ("CONNECT", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY", "whatever"):
            answer = served.ask(conn, request(protocol_state=state, recipient="ghost@example.com"))
            assert answer == b"action=DUNNO\n\n", state
    assert served.sample("callahead_policy_requests_total", state="mail") == 1
    assert served.sample("callahead_policy_requests_total", state="other") == 1
    assert served.sample("callahead_probes_total", outcome="unknown") == 0
    assert (
        served.sample("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown")
        == 0
    )


def test_the_decision_line_has_the_queue_id_and_the_client(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="callahead.decision"), served.connect() as conn:
        served.ask(
            conn,
            request(
                recipient="ghost@example.com", queue_id="4ABC123", client_address="198.51.100.7"
            ),
        )
    assert (
        "4ABC123: client=198.51.100.7 rcpt=<ghost@example.com> decision=reject "
        "reason=probe_unknown" in caplog.text
    )


def test_malformed_and_foreign_requests_get_dunno_and_a_log_line(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), served.connect() as conn:
        bad = b"request=smtpd_access_policy\nprotocol_state=RCPT\nno equals sign\n"
        assert served.ask(conn, bad + b"recipient=ghost@example.com\n\n") == b"action=DUNNO\n\n"
        assert served.ask(conn, request(request="junk", recipient="ghost@example.com")) == (
            b"action=DUNNO\n\n"
        )
        # Still in step: the next request is answered.
        assert served.ask(conn, request(recipient="ghost@example.com")).startswith(b"action=550")
    assert served.sample("callahead_policy_bad_requests_total") == 2
    assert "1 malformed line(s)" in caplog.text


@pytest.mark.parametrize(
    "data",
    [
        b"recipient=" + b"x" * (MAX_LINE + 10) + b"\n\n",
        b"".join(f"a{i}=b\n".encode() for i in range(MAX_ATTRIBUTES + 1)) + b"\n",
    ],
    ids=["long line", "too many attributes"],
)
def test_an_oversized_request_closes_the_connection(served: Served, data: bytes) -> None:
    with served.connect() as conn:
        conn.sendall(data)
        assert conn.recv(4096) == b""  # closed, no answer
    assert served.sample("callahead_policy_bad_requests_total") == 1
    with served.connect() as conn:  # the service goes on
        assert served.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"


def test_many_concurrent_connections_are_served(served: Served) -> None:
    def one(n: int) -> bytes:
        with served.connect() as conn:
            return served.ask(conn, request(recipient=f"known{n}@example.com"))

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(200)))
    assert answers == [b"action=DUNNO\n\n"] * 200


def test_a_request_cut_short_is_dropped_without_an_answer(served: Served) -> None:
    with served.connect() as conn:
        conn.sendall(b"request=smtpd_access_policy\nrecipient=ghost@exa")
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(4096) == b""


@pytest.fixture(scope="module")
def fuzz_served() -> Iterator[Served]:
    server = Served(TempfailAction.ACCEPT)
    yield server
    server.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from(
                [
                    b"request=smtpd_access_policy\n",
                    b"protocol_state=RCPT\n",
                    b"recipient=ghost@example.com\n",
                    b"recipient=known@example.com\n",
                    b"recipient=\xff\xfe@example.com\n",
                    b"\n",
                    b"\r\n",
                    b"=\n",
                    b"client_address=192.0.2.1\n",
                ]
            ),
        ),
        max_size=20,
    )
)
def test_fuzz_any_input_gets_well_formed_actions_or_a_close(
    fuzz_served: Served, chunks: list[bytes]
) -> None:
    served = fuzz_served
    data = b"".join(chunks)
    with served.connect() as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    # Only whole, well-formed actions, one per complete request at most.
    assert ACTION.sub(b"", received) == b""
    complete = data.count(b"\n\n") + data.count(b"\r\n\r\n") + data.count(b"\n\r\n")
    assert received.count(b"action=") <= complete
    # The service is still there.
    with served.connect() as conn:
        assert served.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"


# --- exposure and bounds ---------------------------------------------------------------


def test_a_client_outside_the_allowed_networks_is_disconnected_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = Served(clients=[ipaddress.ip_network("192.0.2.0/24")])
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                with served.connect() as conn:
                    conn.sendall(request(recipient="ghost@example.com"))
                    assert closed_at_once(conn)
        assert served.sample("callahead_policy_refused_connections_total", reason="client") == 3
        assert served.sample("callahead_probes_total", outcome="unknown") == 0
        assert served.service.connections == 0
        # One line, not one per connection: a scanner cannot flood the log.
        assert caplog.text.count("not in CALLAHEAD_POLICY_CLIENTS") == 1
        assert "[127.0.0.1]:" in caplog.text
    finally:
        served.close()


def test_the_default_networks_are_loopback_and_serve_loopback(served: Served) -> None:
    with served.connect() as conn:
        assert served.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
    assert served.sample("callahead_policy_refused_connections_total", reason="client") == 0


# --- the connection cap ----------------------------------------------------------------


class GatedProber(Prober):
    """Probes of ``slow...`` addresses wait until ``gate`` is set (their connections are
    busy meanwhile); the others answer at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting: list[str] = []

    async def probe_async(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        if address.startswith("slow"):
            self.waiting.append(address)
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 10)
            return self.probe(address, hops)
        return self.probe(address, hops)


def displaced(served: Served) -> float:
    return served.sample("callahead_policy_displaced_connections_total")


def test_a_flood_of_silent_connections_at_the_cap_lets_a_real_client_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1,500 connections that never sent a request held the 200 allowed open, and
    Postfix's own was refused: it fell back to its default action (DUNNO), and an
    unknown recipient got 250. Each new one now takes the place of the oldest silent
    one, so the flood only pushes out itself."""
    served = Served(max_connections=5)
    flood: list[socket.socket] = []
    try:
        with caplog.at_level(logging.WARNING, logger="callahead.policyservice"):
            flood = [served.connect() for _ in range(40)]
            with served.connect() as client:  # Postfix: a request as soon as it connects
                answer = served.ask(client, request(recipient="ghost@example.com"))
                assert answer == b"action=550 5.1.1 User unknown\n\n"
                assert served.ask(client, request(recipient="known@example.com")) == (
                    b"action=DUNNO\n\n"
                )
                assert served.service.connections == 5  # with the last four of the flood
            assert all(closed_at_once(conn) for conn in flood[:36])  # the oldest
        assert displaced(served) == 41 - 5
        assert served.sample("callahead_policy_refused_connections_total", reason="limit") == 0
        assert served.sample("callahead_policy_bad_requests_total") == 0
        wait_for(lambda: served.service.connections == 4, 5, what="the client's slot freed")
        assert served.sample("callahead_policy_connections") == 4
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1, lines  # then counted, one line a minute
        assert "1 that never sent a request" in lines[0]
    finally:
        for conn in flood:
            conn.close()
        served.close()


def test_a_connection_that_has_asked_is_kept_over_silent_ones_then_idle_longest_goes() -> None:
    served = Served(max_connections=3)
    dunno = b"action=DUNNO\n\n"
    conns: list[socket.socket] = []
    try:
        first, second = served.connect(), served.connect()
        conns += [first, second]
        assert served.ask(first, request(recipient="known@example.com")) == dunno
        assert served.ask(second, request(recipient="known@example.com")) == dunno
        flood = [served.connect() for _ in range(10)]
        conns += flood
        # The flood displaced only itself: the two that asked are answered on, second
        # first (so first has been idle longest from now on).
        for conn in (first, second):
            assert served.ask(conn, request(recipient="ghost@example.com")).startswith(
                b"action=550"
            )
        assert all(closed_at_once(conn) for conn in flood[:9])
        assert displaced(served) == 9
        # A new one takes the last silent one's place...
        third = served.connect()
        conns.append(third)
        assert served.ask(third, request(recipient="known@example.com")) == dunno
        assert closed_at_once(flood[9])
        # ... and with none left, the place of the one idle longest.
        fourth = served.connect()
        conns.append(fourth)
        assert served.ask(fourth, request(recipient="known@example.com")) == dunno
        assert closed_at_once(first)
        for conn in (second, third, fourth):
            assert served.ask(conn, request(recipient="known@example.com")) == dunno
        assert displaced(served) == 11
        assert served.sample("callahead_policy_refused_connections_total", reason="limit") == 0
    finally:
        for conn in conns:
            conn.close()
        served.close()


def test_busy_connections_are_never_displaced_and_a_new_one_is_refused_then() -> None:
    """Neither a connection whose answer is being computed nor one in the middle of a
    request makes room: with every open one busy, the new one is disconnected."""
    prober = GatedProber()
    served = Served(max_connections=4, prober=prober)
    conns: list[socket.socket] = []
    try:
        slow = [served.connect(), served.connect()]
        conns += slow
        for n, conn in enumerate(slow):
            conn.sendall(request(recipient=f"slow{n}@example.com"))
        wait_for(lambda: len(prober.waiting) == 2, 5, what="both probes waiting")
        # One mid-request: answered once, then half of its next request sent.
        middle = served.connect()
        conns.append(middle)
        assert served.ask(middle, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
        middle.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
        # One idle (answered after the half request was sent, so read by then).
        with served.connect() as idle:
            assert served.ask(idle, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
            # A new one takes the idle one's place, not the mid-request one's.
            third = served.connect()
            conns.append(third)
            third.sendall(request(recipient="slow2@example.com"))
            assert closed_at_once(idle)
        wait_for(lambda: len(prober.waiting) == 3, 5, what="the third probe waiting")
        assert displaced(served) == 1
        # Every open one busy: the next is refused, and counted so.
        with served.connect() as refused:
            assert closed_at_once(refused)
        assert served.sample("callahead_policy_refused_connections_total", reason="limit") == 1
        prober.gate.set()
        for conn in (*slow, third):
            assert ACTION.fullmatch(read_until(conn, lambda a: a.endswith(b"\n\n")))
        middle.sendall(b"recipient=ghost@example.com\n\n")
        assert read_until(middle, lambda a: a.endswith(b"\n\n")).startswith(b"action=550")
        assert displaced(served) == 1
    finally:
        prober.gate.set()
        for conn in conns:
            conn.close()
        served.close()


def test_a_request_over_the_byte_cap_closes_the_connection(served: Served) -> None:
    # Short lines, far under the line and attribute limits, adding up past the cap.
    line = b"x" * 100
    count = MAX_REQUEST // (len(line) + 4) + 1
    assert count < MAX_ATTRIBUTES
    data = b"request=smtpd_access_policy\n" + b"".join(
        b"a%d=%s\n" % (i, line) for i in range(count)
    )
    with served.connect() as conn:
        conn.sendall(data)
        assert conn.recv(4096) == b""  # closed, no answer, before any end of request
    assert served.sample("callahead_policy_bad_requests_total") == 1
    # A real-sized request (with room to spare) is answered.
    with served.connect() as conn:
        padding = {f"pad{i}": "y" * 100 for i in range(60)}
        answer = served.ask(conn, request(recipient="ghost@example.com", **padding))
        assert answer.startswith(b"action=550")


def test_empty_lines_before_a_request_count_against_the_cap(served: Served) -> None:
    with served.connect() as conn:
        conn.sendall(b"\n" * (MAX_REQUEST + 1))
        assert conn.recv(4096) == b""


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    served = Served(idle_timeout=0.3)
    try:
        with served.connect() as conn:
            assert served.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
            started = time.monotonic()
            conn.settimeout(5)
            assert conn.recv(4096) == b""
            assert 0.2 < time.monotonic() - started < 3
        # A connection that keeps asking within the timeout stays open.
        with served.connect() as conn:
            for _ in range(4):
                time.sleep(0.15)
                answer = served.ask(conn, request(recipient="known@example.com"))
                assert answer == b"action=DUNNO\n\n"
        assert served.sample("callahead_policy_bad_requests_total") == 0
    finally:
        served.close()


def test_the_default_idle_timeout_is_postfix_max_idle_and_a_margin() -> None:
    assert IDLE_TIMEOUT == 300 + IDLE_MARGIN  # smtpd_policy_service_max_idle: 300 s
    assert 0 < IDLE_MARGIN <= 10


# --- the unix socket -------------------------------------------------------------------


def test_the_unix_socket_replaces_a_stale_one_and_is_removed_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    served = Served(path=path)
    try:
        with served.connect() as conn:
            assert served.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
    finally:
        served.close()
    assert not path.exists()


def test_the_unix_socket_never_deletes_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    path.write_text("precious")
    served = Served(path=path, start=False)
    try:
        with pytest.raises(UnixSocketError, match="is not a socket"):
            served.start()
    finally:
        served.close()
    assert path.read_text() == "precious"


def test_the_unix_socket_leaves_a_live_one_alone(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    first = Served(path=path)
    try:
        second = Served(path=path, start=False)
        try:
            with pytest.raises(UnixSocketError, match="another process answers"):
                second.start()
        finally:
            second.close()
        with first.connect() as conn:  # still the first one's
            assert first.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
    finally:
        first.close()


def test_at_stop_the_unix_socket_of_a_later_instance_is_left(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    first = Served(path=path)
    os.unlink(path)  # an operator cleaned up; a second instance starts
    second = Served(path=path)
    try:
        first.close()
        assert path.exists()
        with second.connect() as conn:
            assert second.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
    finally:
        second.close()
    assert not path.exists()


# --- a client that never reads ---------------------------------------------------------


def send_until_dropped(conn: socket.socket, data: bytes) -> None:
    """Send ``data``; the server dropping the connection ends it early."""
    with contextlib.suppress(OSError):
        conn.sendall(data)


def test_clients_that_never_read_are_dropped_and_others_served(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Requests sent without reading the answers fill the socket's buffers, and the
    answer waited on ``drain`` with no deadline: four such clients held every allowed
    connection past the idle and request deadlines, and real requests were refused.
    (On the unix socket, the default: over loopback TCP the kernel buffers grow to
    megabytes before a write waits, the same wait after more requests.)"""
    served = Served(path=tmp_path / "policy.sock", write_timeout=0.5, max_connections=4)
    pipelined = request(protocol_state="CONNECT") * 40_000  # 560 KB of answers
    stalled: list[socket.socket] = []
    senders: list[threading.Thread] = []
    try:
        with caplog.at_level(logging.WARNING, logger="callahead.policyservice"):
            for _ in range(3):
                conn = served.connect()
                conn.settimeout(20)
                stalled.append(conn)
                senders.append(threading.Thread(target=send_until_dropped, args=(conn, pipelined)))
            started = time.monotonic()
            for sender in senders:
                sender.start()
            # Meanwhile the fourth connection is answered: the loop is not held.
            with served.connect() as conn:
                answer = served.ask(conn, request(recipient="ghost@example.com"))
                assert answer.startswith(b"action=550")
            wait_for(
                lambda: served.sample("callahead_policy_stalled_connections_total") == 3,
                10,
                what="the three to be dropped",
            )
            assert time.monotonic() - started < 8
            wait_for(lambda: served.service.connections == 0, 5, what="their slots freed")
            with served.connect() as conn:
                answer = served.ask(conn, request(recipient="known@example.com"))
                assert answer == b"action=DUNNO\n\n"
        lines = [r for r in caplog.records if "read no answer" in r.getMessage()]
        assert len(lines) == 1  # then counted, one line a minute
    finally:
        for conn in stalled:
            conn.close()
        for sender in senders:
            sender.join(5)
        served.close()
