"""The policy service front end: Postfix's policy delegation protocol over real
sockets, served on a real probe loop, with the decision core driven by a fake prober;
and a fuzz of the request parser."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callahead.cache import PositiveCache
from callahead.judge import Judge
from callahead.loop import ProbeLoop
from callahead.metrics import Metrics
from callahead.policy import Action, Decision, Policy, Reason, TempfailAction
from callahead.policyservice import (
    MAX_ATTRIBUTES,
    MAX_LINE,
    PolicyService,
    action_for,
)
from callahead.routes import parse_routes
from callahead.verdict import ProbeResult, Stage, Verdict
from tests.unit.probers import SyncProber

ROUTES = parse_routes("example.com=[192.0.2.10]:25")
ACTION = re.compile(rb"action=(DUNNO|[45]\d\d [45]\.\d{1,3}\.\d{1,3} [^\n]+)\n\n")


class Prober(SyncProber):
    def probe(self, address: str, hops: object) -> ProbeResult:
        verdict = Verdict.VALID if address.startswith("known") else Verdict.UNKNOWN
        if address.startswith("busy"):
            verdict = Verdict.TEMPFAIL
        code = {Verdict.VALID: 250, Verdict.UNKNOWN: 550, Verdict.TEMPFAIL: 451}[verdict]
        return ProbeResult(verdict, Stage.RCPT, code, "scripted", 0.001, "[192.0.2.10]:25")


def request(**attributes: str) -> bytes:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT"}
    return b"".join(f"{k}={v}\n".encode() for k, v in {**base, **attributes}.items()) + b"\n"


class Served:
    def __init__(self, action: TempfailAction = TempfailAction.DEFER) -> None:
        self.metrics = Metrics()
        policy = Policy(
            routes=ROUTES,
            cache=PositiveCache(ttl=60, maxsize=100),
            prober=Prober(),
            tempfail_action=action,
        )
        self.service = PolicyService(Judge(policy, self.metrics), self.metrics)
        self.loop = ProbeLoop()
        self.loop.start()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.loop.run(self.service.start("inet", "127.0.0.1", self.port, ""), timeout=5)

    def connect(self) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return conn

    def ask(self, conn: socket.socket, data: bytes) -> bytes:
        conn.sendall(data)
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.loop.run(self.service.aclose(), timeout=5)
        self.loop.stop()


@pytest.fixture
def served() -> Iterator[Served]:
    server = Served()
    yield server
    server.close()


def test_rcpt_requests_get_the_decision_on_one_kept_connection(served: Served) -> None:
    with served.connect() as conn:
        assert served.ask(conn, request(recipient="known@example.com")) == b"action=DUNNO\n\n"
        assert served.ask(conn, request(recipient="ghost@example.com")) == (
            b"action=550 5.1.1 Recipient address rejected: User unknown\n\n"
        )
        assert served.ask(conn, request(recipient="busy@example.com")) == (
            b"action=451 4.4.3 Recipient address verification temporarily unavailable, "
            b"try again later\n\n"
        )
        assert served.ask(conn, request(recipient="x@unrouted.org")) == b"action=DUNNO\n\n"
    assert served.sample("callahead_policy_requests_total", state="rcpt") == 4


def test_a_recipient_domain_that_does_not_exist_gets_550_512() -> None:
    decision = Decision(Action.REJECT, Reason.NO_DOMAIN, "anyone@zq7x.example.com")
    assert action_for(decision) == "550 5.1.2 Recipient address rejected: Domain not found"


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
