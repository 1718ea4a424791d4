"""End to end: a sender talks SMTP to a real Postfix backup MX with callahead attached
through ``smtpd_milters`` or through ``check_policy_service`` (the tests taking
``front_end`` or ``port`` run through both); callahead probes a real SMTP primary; accepted mail is
relayed on to the primary's mailbox."""

from __future__ import annotations

import re
import time
from functools import partial

import pytest

from tests.harness.client import make_message, send
from tests.harness.waiting import wait_for

from .conftest import PROBE_TIMEOUT, SENDER, MetricsDelta, Stack

DELIVERY_TIMEOUT = 30.0


@pytest.fixture
def port(stack: Stack, front_end: str) -> int:
    """The main profile's port for the front end under test (each test taking it runs
    through both)."""
    return stack.profiles["main"].port_for(front_end)


def delivered(stack: Stack, addr: str, token: str, primary: str = "primary") -> bool:
    box = getattr(stack, primary).mailbox(addr)
    return any(token.encode() in message for message in box)


def test_known_user_is_accepted_and_delivered(stack: Stack, delta: MetricsDelta, port: int) -> None:
    addr = stack.new_user()
    token, body = make_message(SENDER, [addr])

    tx = send(port, SENDER, [addr], body)

    assert tx.code(addr) == 250
    assert tx.data is not None and tx.data[0] == 250
    # The primary really saw the probe, with the null sender.
    assert stack.primary.probes_for(addr) == 1
    assert "" in stack.primary.mail_froms
    wait_for(lambda: delivered(stack, addr, token), DELIVERY_TIMEOUT, what="delivery")
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_valid") == 1
    assert delta("callahead_probes_total", outcome="valid") == 1
    assert delta("callahead_cache_misses_total") == 1
    assert delta("callahead_probe_duration_seconds_count") == 1


def test_unknown_user_is_rejected_at_rcpt(
    stack: Stack, delta: MetricsDelta, front_end: str, port: int
) -> None:
    addr = stack.new_address()

    tx = send(port, SENDER, [addr])

    code, text = tx.rcpt[addr]
    assert code == 550
    # Exactly what a Postfix of its own would say. The milter's reply goes out as it is;
    # the policy service's action gets Postfix's "<rcpt>: Recipient address rejected: "
    # in front of it, so it must not carry those words itself.
    expected = {
        "milter": "5.1.1 Recipient address rejected: User unknown",
        "policy": f"5.1.1 <{addr}>: Recipient address rejected: User unknown",
    }
    assert text == expected[front_end]
    # Nothing of the primary leaks to the sender: not its name, address, port or words.
    for secret in ("primary.test", "127.0.0.1", str(stack.primary.port), "virtual mailbox"):
        assert secret not in text
    assert stack.primary.probes_for(addr) == 1
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1
    assert delta("callahead_probes_total", outcome="unknown") == 1
    # Asked through the front end under test only.
    assert delta("callahead_policy_requests_total", state="rcpt") == (front_end == "policy")


def test_primary_down_mail_is_queued_then_delivered(
    stack: Stack, delta: MetricsDelta, port: int
) -> None:
    addr = stack.new_user()
    token, body = make_message(SENDER, [addr])
    stack.primary.stop()
    try:
        tx = send(port, SENDER, [addr], body)

        assert tx.code(addr) == 250
        assert tx.data is not None and tx.data[0] == 250
        queued = re.search(r"queued as (\w+)", tx.data[1])
        assert queued is not None, tx.data
        queue_id = queued.group(1)

        def kept_after_a_deferral() -> bool:
            """Postfix tried the primary, deferred the message and still holds it. Which
            queue it is in at a given moment does not matter: with the harness's 1 s
            retry timers it cycles through deferred, incoming and active, and once (in
            about 20 full runs) qmgr left it in incoming ("skipped, still being
            delivered") until the flush below."""
            deferred = any(
                f"{queue_id}: to=<{addr}>" in line and "status=deferred" in line
                for line in stack.backup.maillog().splitlines()
            )
            return deferred and queue_id in stack.backup.queue_ids()

        try:
            wait_for(kept_after_a_deferral, DELIVERY_TIMEOUT, what="a deferral, message kept")
        except TimeoutError as exc:  # say where the message went
            lines = [line for line in stack.backup.maillog().splitlines() if queue_id in line]
            raise AssertionError(
                f"{exc}\nqueue: {stack.backup.queue_entries()}\nlog:\n" + "\n".join(lines)
            ) from exc
        assert not delivered(stack, addr, token)
    finally:
        stack.primary.start()
    stack.backup.flush()
    wait_for(lambda: delivered(stack, addr, token), DELIVERY_TIMEOUT, what="delivery")
    wait_for(lambda: queue_id not in stack.backup.queue_ids(), 10, what="the queue to empty")
    assert len([m for m in stack.primary.mailbox(addr) if token.encode() in m]) == 1
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_tempfail") == 1
    assert delta("callahead_probes_total", outcome="tempfail") == 1


def test_primary_that_never_greets_is_accepted_within_the_probe_timeout(
    stack: Stack, delta: MetricsDelta
) -> None:
    addr = stack.new_user("hang.test")
    token, body = make_message(SENDER, [addr])
    connections = stack.silent.connections

    tx = send(stack.port, SENDER, [addr], body)

    assert tx.code(addr) == 250
    assert stack.silent.connections == connections + 1  # it really was probed
    assert PROBE_TIMEOUT * 0.9 <= tx.rcpt_seconds[addr] < PROBE_TIMEOUT + 1.5
    wait_for(lambda: delivered(stack, addr, token), DELIVERY_TIMEOUT, what="delivery")
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_tempfail") == 1


def test_primary_refusing_the_null_sender_never_causes_a_reject(
    stack: Stack, delta: MetricsDelta, port: int
) -> None:
    addr = stack.new_user("nullsender.test", stack.null_primary)
    token, body = make_message(SENDER, [addr])
    null_senders = stack.null_primary.mail_froms.count("")

    tx = send(port, SENDER, [addr], body)

    assert tx.code(addr) == 250
    # The probe reached MAIL FROM:<>, was refused there and never asked about the user.
    assert stack.null_primary.mail_froms.count("") == null_senders + 1
    assert stack.null_primary.probes_for(addr) == 0
    wait_for(
        lambda: delivered(stack, addr, token, "null_primary"), DELIVERY_TIMEOUT, what="delivery"
    )
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="prober_refused") == 1


def test_each_recipient_is_judged_alone(stack: Stack, delta: MetricsDelta, port: int) -> None:
    first, second = stack.new_user(), stack.new_user()
    unknown = stack.new_address()
    token, body = make_message(SENDER, [first, unknown, second])

    tx = send(port, SENDER, [first, unknown, second], body)

    assert [tx.code(first), tx.code(unknown), tx.code(second)] == [250, 550, 250]
    assert tx.data is not None and tx.data[0] == 250
    for addr in (first, second):
        wait_for(partial(delivered, stack, addr, token), DELIVERY_TIMEOUT, what="delivery")
    assert stack.primary.mailbox(unknown) == []
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_valid") == 2
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1
    # Postfix hands callahead the queue id ({i}) once the queue file exists, and the
    # client address; both are in the decision log line.
    queue_id = re.search(r"queued as (\w+)", tx.data[1])
    assert queue_id is not None
    pattern = (
        rf"{queue_id.group(1)}: client=127\.0\.0\.1 rcpt=<{re.escape(second)}> "
        r"decision=accept reason=probe_valid"
    )
    lines = [line for line in stack.callahead.log().splitlines() if second in line]
    assert any(re.search(pattern, line) for line in lines), lines


def test_no_negative_cache(stack: Stack, delta: MetricsDelta, port: int) -> None:
    addr = stack.new_address()

    assert send(port, SENDER, [addr]).code(addr) == 550
    stack.primary.add_user(addr)
    assert send(port, SENDER, [addr]).code(addr) == 250

    assert stack.primary.probes_for(addr) == 2
    assert delta("callahead_probes_total", outcome="unknown") == 1
    assert delta("callahead_probes_total", outcome="valid") == 1


def test_positive_cache_answers_without_probing(
    stack: Stack, delta: MetricsDelta, port: int
) -> None:
    addr = stack.new_user()
    token1, body1 = make_message(SENDER, [addr])
    token2, body2 = make_message(SENDER, [addr])

    assert send(port, SENDER, [addr], body1).code(addr) == 250
    assert send(port, SENDER, [addr], body2).code(addr) == 250

    assert stack.primary.probes_for(addr) == 1
    for token in (token1, token2):
        wait_for(partial(delivered, stack, addr, token), DELIVERY_TIMEOUT, what="delivery")
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="cache_hit") == 1
    assert delta("callahead_cache_hits_total") == 1
    assert delta("callahead_probes_total", outcome="valid") == 1
    assert stack.callahead.samples()[("callahead_cache_entries", ())] >= 1


def test_cache_entry_expires_after_its_ttl(stack: Stack, front_end: str) -> None:
    port = stack.profiles["ttl1"].port_for(front_end)
    addr = stack.new_user()
    assert send(port, SENDER, [addr]).code(addr) == 250
    probed_at = time.monotonic()
    assert send(port, SENDER, [addr]).code(addr) == 250
    if time.monotonic() - probed_at < 1.0:  # still inside the TTL: must be a cache hit
        assert stack.primary.probes_for(addr) == 1

    def probed_again() -> bool:
        assert send(port, SENDER, [addr]).code(addr) == 250
        return stack.primary.probes_for(addr) == 2

    wait_for(probed_again, 5, interval=0.1, what="a new probe after the TTL")
    assert time.monotonic() - probed_at >= 0.9


def test_metrics_endpoint_parses_and_has_the_spec_names(stack: Stack) -> None:
    samples = stack.callahead.samples()  # parsed by prometheus-client's own parser
    names = {name for name, _ in samples}
    for name in (
        "callahead_rcpt_decisions_total",
        "callahead_probes_total",
        "callahead_probe_duration_seconds_bucket",
        "callahead_probe_duration_seconds_count",
        "callahead_cache_hits_total",
        "callahead_cache_misses_total",
        "callahead_cache_entries",
        "callahead_errors_total",
    ):
        assert name in names
    assert samples[("callahead_errors_total", ())] == 0


def test_domain_without_route_gets_no_opinion(stack: Stack, delta: MetricsDelta, port: int) -> None:
    addr = stack.new_user("unrouted.test")
    token, body = make_message(SENDER, [addr])
    rcpts_seen = len(stack.primary.rcpts)

    tx = send(port, SENDER, [addr], body)

    assert tx.code(addr) == 250
    wait_for(lambda: delivered(stack, addr, token), DELIVERY_TIMEOUT, what="delivery")
    assert stack.primary.probes_for(addr) == 0
    assert len(stack.primary.rcpts) == rcpts_seen + 1  # only the delivery itself
    assert delta("callahead_rcpt_decisions_total", decision="skip", reason="unrouted") == 1


def test_mail_flows_when_the_policy_service_is_not_running(stack: Stack) -> None:
    """smtpd_policy_service_default_action = DUNNO (deploy/postfix-policy-main.cf): with
    callahead down, recipients are accepted unverified and the mail is delivered."""
    known, stranger = stack.new_user(), stack.new_address()
    token, body = make_message(SENDER, [known, stranger])

    tx = send(stack.no_policy_port, SENDER, [known, stranger], body)

    assert [tx.code(known), tx.code(stranger)] == [250, 250]
    assert tx.data is not None and tx.data[0] == 250
    wait_for(lambda: delivered(stack, known, token), DELIVERY_TIMEOUT, what="delivery")
    assert stack.primary.probes_for(known) == 0  # nobody verified anything
    # Postfix really asked and found nobody there.
    assert f"problem talking to server 127.0.0.1:{stack.refused_port}" in stack.backup.maillog()
