"""The fault matrix: one case per way a primary can misbehave, through the real Postfix
backup MX with callahead attached. Each case checks the reply the sender gets and that
every message Postfix accepted reaches a mailbox."""

from __future__ import annotations

from functools import partial

import pytest

from tests.harness.client import make_message, send
from tests.harness.waiting import wait_for

from .conftest import PROBE_TIMEOUT, SENDER, MetricsDelta, Stack

DELIVERY_TIMEOUT = 30.0


def delivered(stack: Stack, addr: str, token: str) -> bool:
    return any(token.encode() in message for message in stack.primary.mailbox(addr))


# fault -> the decision reason; the sender always gets 250 and the mail is delivered
ACCEPTED = {
    "refused": "probe_tempfail",
    "silent": "probe_tempfail",
    "banner421": "probe_tempfail",
    "banner554": "prober_refused",
    "ehlo5xx": "prober_refused",
    "mail5xx": "prober_refused",
    "rcpt450": "probe_tempfail",
    "rcpt451": "probe_tempfail",
    "rcpt452": "probe_tempfail",
    "disconnect": "probe_tempfail",
    "slow": "probe_tempfail",
    "tlsbroken": "probe_tempfail",
    "tlsok": "probe_valid",
    "garbage": "probe_tempfail",
    "oversized": "probe_tempfail",
}
REJECTED = ("rcpt550", "rcpt551", "rcpt553")


@pytest.mark.parametrize("fault", sorted(ACCEPTED))
def test_undecided_probe_accepts_and_delivers(
    stack: Stack, delta: MetricsDelta, fault: str
) -> None:
    addr = stack.new_user(f"{fault}.fault.test")  # known where Postfix delivers it
    token, body = make_message(SENDER, [addr])
    server = stack.faults.get(fault)
    rcpts_before = len(server.rcpts()) if server else 0

    tx = send(stack.port, SENDER, [addr], body)

    assert tx.code(addr) == 250, tx.rcpt
    assert tx.data is not None and tx.data[0] == 250
    assert tx.rcpt_seconds[addr] < PROBE_TIMEOUT + 1.5
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason=ACCEPTED[fault]) == 1
    wait_for(partial(delivered, stack, addr, token), DELIVERY_TIMEOUT, what="delivery")
    if fault in ("banner421", "banner554", "ehlo5xx", "mail5xx", "silent", "tlsbroken"):
        assert server is not None and len(server.rcpts()) == rcpts_before  # never got to RCPT
    if fault in ("garbage", "oversized"):
        # The primary really got the RCPT; its unreadable answer is a primary fault,
        # not an internal error of callahead.
        assert server is not None and addr in server.rcpts()
        assert delta("callahead_errors_total") == 0
    if fault == "tlsok":
        assert server is not None
        lines = [c.line.upper() for c in server.commands]
        assert "STARTTLS" in lines
        assert lines.index("STARTTLS") < max(
            i for i, line in enumerate(lines) if line.startswith("RCPT")
        )


@pytest.mark.parametrize("fault", REJECTED)
def test_unknown_at_rcpt_is_rejected(stack: Stack, delta: MetricsDelta, fault: str) -> None:
    addr = stack.new_address(f"{fault}.fault.test")

    tx = send(stack.port, SENDER, [addr])

    code, text = tx.rcpt[addr]
    assert (code, text.split()[0]) == (550, "5.1.1")
    assert addr in stack.faults[fault].rcpts()
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1


def test_defer_action_answers_451(stack: Stack) -> None:
    addr = stack.new_user("rcpt451.fault.test")
    tx = send(stack.profiles["defer"].port, SENDER, [addr])
    code, text = tx.rcpt[addr]
    assert code == 451 and text.startswith("4.4.3 ")
    assert "fault" not in text and "127.0.0.1" not in text


def test_primary_restart_with_idle_pooled_sessions(stack: Stack, delta: MetricsDelta) -> None:
    first, second = stack.new_user(), stack.new_user()
    assert send(stack.port, SENDER, [first]).code(first) == 250  # leaves a pooled session
    connections = stack.primary.connections

    stack.primary.restart()  # closes every open session, as a restarted MTA does
    token, body = make_message(SENDER, [second])
    tx = send(stack.port, SENDER, [second], body)

    assert tx.code(second) == 250
    assert stack.primary.probes_for(second) == 1
    assert stack.primary.connections > connections  # a fresh session was opened
    # The lost session was retried, not reported as a tempfail.
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_valid") == 2
    assert delta("callahead_probes_total", outcome="tempfail") == 0
    wait_for(partial(delivered, stack, second, token), DELIVERY_TIMEOUT, what="delivery")


def test_first_route_down_second_up(stack: Stack, delta: MetricsDelta) -> None:
    known = stack.new_user("failover.test")
    unknown = stack.new_address("failover.test")
    token, body = make_message(SENDER, [known, unknown])

    tx = send(stack.port, SENDER, [known, unknown], body)

    assert tx.code(known) == 250
    assert tx.code(unknown) == 550  # a definite answer from the second route
    assert stack.primary.probes_for(known) == 1
    assert stack.primary.probes_for(unknown) == 1
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_valid") == 1
    wait_for(partial(delivered, stack, known, token), DELIVERY_TIMEOUT, what="delivery")
