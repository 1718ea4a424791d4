"""Verdicts against real primaries configured as real sites configure them: a primary
that refuses the prober (its HELO, its null sender, its address: all delayed to RCPT TO
by Postfix's default smtpd_delay_reject = yes) never makes callahead reject a real
user; a user added on the primary is accepted at the next RCPT; a cache entry that
expires is verified again on a current view; Microsoft 365's replies."""

from __future__ import annotations

import re
import uuid
from functools import partial

import pytest

from tests.harness.client import make_message, send
from tests.harness.waiting import wait_for

from .conftest import FALLBACK_SENDER, SENDER, MetricsDelta, Stack, hop

DELIVERY_TIMEOUT = 30.0


def strict_log_lines(stack: Stack, addr: str) -> list[str]:
    """The strict primary's log lines about RCPT TO:<addr>."""
    return [line for line in stack.strict.maillog().splitlines() if f"to=<{addr}>" in line]


def strict_logged(stack: Stack, addr: str, *words: str) -> list[str]:
    """The strict primary's log lines about RCPT TO:<addr>, once one has all ``words``
    (postlogd writes the log a moment after smtpd answered)."""
    return wait_for(
        lambda: [line for line in strict_log_lines(stack, addr) if all(w in line for w in words)],
        10.0,
        what=f"the primary's log line for {addr} with {words}",
    )


def delivered_to_stand_in(stack: Stack, addr: str, token: str) -> bool:
    return any(token.encode() in message for message in stack.primary.mailbox(addr))


def delivered(stack: Stack, addr: str, token: str) -> bool:
    return any(token.encode() in message for message in stack.strict.mailbox(addr))


def new_connections(delta: MetricsDelta, port: int) -> float:
    return delta("callahead_probe_connections_total", primary=f"[127.0.0.1]:{port}")


@pytest.mark.parametrize(
    ("kind", "basis", "refusal"),
    [
        ("helo", "prober", "504 5.5.2 <localhost>: Helo command rejected"),
        ("sender", "sender", "554 5.7.1 <>: Sender address rejected"),
        ("client", "prober", "Client host rejected"),
    ],
)
def test_a_primary_refusing_the_prober_never_rejects_a_known_user(
    stack: Stack, kind: str, basis: str, refusal: str, front_end: str
) -> None:
    profile = stack.profiles["strict"]
    port = profile.port_for(front_end)
    delta = MetricsDelta(profile.process)
    known = f"u1@{kind}.strict.test"
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@{kind}.strict.test"
    token, body = make_message(SENDER, [known])

    tx = send(port, SENDER, [known], body)
    tx_unknown = send(port, SENDER, [unknown])

    assert tx.code(known) == 250
    assert tx.data is not None and tx.data[0] == 250
    # Undecided, so the unknown user is not rejected either: callahead cannot tell.
    assert tx_unknown.code(unknown) == 250
    # The primary really saw both probes and refused the prober, at RCPT TO.
    for addr in (known, unknown):
        assert strict_logged(stack, addr, refusal, "from=<>")
    # The message is kept: the backup delivers it (its own delivery passes the
    # restriction that refused the prober, on another listener of the primary).
    wait_for(lambda: delivered(stack, known, token), DELIVERY_TIMEOUT, what="delivery")
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="prober_refused") == 2
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 0
    primary = f"[127.0.0.1]:{stack.strict_ports[kind]}"
    assert delta("callahead_prober_refused_total", primary=primary, basis=basis) == 2
    samples = profile.process.samples()
    assert samples[("callahead_primary_refuses_prober", (("primary", primary),))] == 1
    # Logged once with the reason, not once per recipient.
    warnings = re.findall(
        rf"primary \[127\.0\.0\.1\]:{stack.strict_ports[kind]} refuses", profile.process.log()
    )
    assert len(warnings) == 1


def test_a_primary_without_postmaster_is_protected(stack: Stack, front_end: str) -> None:
    """A real Postfix primary with virtual_mailbox_maps and no postmaster@ (the usual
    database-backed virtual setup): its 550 5.1.1 is believed on its own, a known user
    is accepted and delivered, and postmaster@ is never asked."""
    profile = stack.profiles["strict"]
    port = profile.port_for(front_end)
    delta = MetricsDelta(profile.process)
    known = "u1@nopm.strict.test"
    unknown = [f"nobody-{uuid.uuid4().hex[:8]}@nopm.strict.test" for _ in range(2)]
    token, body = make_message(SENDER, [known])

    tx = send(port, SENDER, [known, *unknown], body)

    assert [tx.code(a) for a in (known, *unknown)] == [250, 550, 550]
    assert tx.data is not None and tx.data[0] == 250
    for addr in unknown:
        assert strict_logged(stack, addr, "User unknown", "from=<>")
    wait_for(lambda: delivered(stack, known, token), DELIVERY_TIMEOUT, what="delivery")
    assert not strict_log_lines(stack, "postmaster@nopm.strict.test")
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 2
    assert (
        delta(
            "callahead_prober_refused_total",
            primary=hop(stack.strict_ports["deliver"]),
            basis="unproven",
        )
        == 0
    )


def test_a_primary_refusing_multi_recipient_bounces_is_protected(stack: Stack) -> None:
    """reject_multi_recipient_bounce: after MAIL FROM:<>, every RCPT after the first
    accepted one gets 5.5.3. Ten known users and ten unknown ones, interleaved in one
    transaction at the backup: each gets its real answer."""
    profile = stack.profiles["strict"]
    delta = MetricsDelta(profile.process)
    known = [f"u{n}@mrb.strict.test" for n in range(1, 11)]
    unknown = [f"nobody-{uuid.uuid4().hex[:8]}@mrb.strict.test" for _ in range(10)]
    interleaved = [addr for pair in zip(known, unknown, strict=True) for addr in pair]

    tx = send(profile.port, SENDER, interleaved)

    assert [tx.code(a) for a in known] == [250] * 10
    assert [tx.code(a) for a in unknown] == [550] * 10
    for addr in unknown:
        assert strict_logged(stack, addr, "User unknown", "from=<>")
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 10
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_valid") == 10
    # The primary really refused a later RCPT as a multi-recipient bounce, once: from
    # then on each probe had a transaction of its own.
    bounces = [
        line
        for line in stack.strict.maillog().splitlines()
        if "Multi-recipient bounce" in line and "mrb.strict.test" in line
    ]
    assert len(bounces) == 1
    assert "one recipient per transaction" in profile.process.log()


def test_drift_a_verified_control_refused_rejects_nobody(stack: Stack) -> None:
    """u1 was verified; then the primary stops knowing the domain's users (a broken
    directory: it answers 5.1.1 to everyone). The control u1 is refused on the new
    session, so its rejections are undecided: nobody gets a 550; the drift is counted."""
    profile = stack.profiles["strict"]
    delta = MetricsDelta(profile.process)
    primary = hop(stack.strict_ports["deliver"])
    known = "u1@drift.strict.test"
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@drift.strict.test"
    users = list(stack.strict_users)

    assert send(profile.port, SENDER, [known]).code(known) == 250
    assert send(profile.port, SENDER, [unknown]).code(unknown) == 550  # u1 vouches
    try:
        stack.set_strict_users([u for u in users if not u.endswith("@drift.strict.test")])
        # Judged a moment ago: asked again on a new session, which sees the change.
        again = send(profile.port, SENDER, [unknown])
        assert again.code(unknown) == 250
        other = f"real-{uuid.uuid4().hex[:8]}@drift.strict.test"
        assert send(profile.port, SENDER, [other]).code(other) == 250
    finally:
        stack.set_strict_users(users)
    assert strict_logged(stack, known, "User unknown", "from=<>")  # the control, refused
    assert delta("callahead_drift_total", primary=primary) == 2
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1
    # Logged once for the domain, beside the decision lines.
    warning = r"refused an address of drift\.strict\.test that it had accepted recently"
    assert len(re.findall(warning, profile.process.log())) == 1


def test_fallback_sender_when_the_primary_refuses_the_null_sender(stack: Stack) -> None:
    profile = stack.profiles["fallback"]
    known, unknown = "u1@sender.strict.test", f"nobody-{uuid.uuid4().hex[:8]}@sender.strict.test"

    tx = send(profile.port, SENDER, [known, unknown])

    assert tx.code(known) == 250
    assert tx.code(unknown) == 550
    # The unknown verdict rests on the fallback sender's session.
    assert strict_logged(stack, unknown, f"from=<{FALLBACK_SENDER}>", "User unknown")


def test_a_user_added_on_the_primary_is_accepted_at_the_next_rcpt(stack: Stack) -> None:
    """A real Postfix primary with a hash map, the pool warm: unknown -> 550; the user
    is added (postmap, postfix reload); the next RCPT -> 250, on a new connection,
    because the pooled one still has the old table."""
    profile = stack.profiles["strict"]
    delta = MetricsDelta(profile.process)
    port = stack.strict_ports["deliver"]
    late = f"late-{uuid.uuid4().hex[:8]}@late.strict.test"

    warm = send(profile.port, SENDER, ["u1@late.strict.test"])
    assert warm.code("u1@late.strict.test") == 250
    opened = new_connections(delta, port)
    first = send(profile.port, SENDER, [late])
    assert first.code(late) == 550
    assert new_connections(delta, port) == opened  # answered on the warm pooled session

    stack.set_strict_users([*stack.strict_users, late])
    second = send(profile.port, SENDER, [late])

    assert second.code(late) == 250
    assert new_connections(delta, port) == opened + 1
    assert delta("callahead_probes_total", outcome="valid") == 2


def test_an_expired_cache_entry_is_verified_again_on_a_current_view(stack: Stack) -> None:
    """TTL 1 s: a user verified (and the session left warm) is removed on the primary;
    once the entry expires the primary is really asked again, on a session opened after
    the first answer, and says unknown."""
    profile = stack.profiles["strict_ttl1"]
    delta = MetricsDelta(profile.process)
    gone = f"gone-{uuid.uuid4().hex[:8]}@ttl.strict.test"
    stack.set_strict_users([*stack.strict_users, gone])

    assert send(profile.port, SENDER, [gone]).code(gone) == 250
    stack.set_strict_users([u for u in stack.strict_users if u != gone])

    # Cache hits answer 250 until the entry expires (1 s); then the next probe must see
    # the removal, well before a pooled session would age out (10 s).
    wait_for(
        lambda: send(profile.port, SENDER, [gone]).code(gone) == 550,
        5.0,
        interval=0.2,
        what="the expired entry to be verified again",
    )
    assert len(strict_logged(stack, gone, "User unknown")) == 1
    assert delta("callahead_probes_total", outcome="valid") == 1
    assert delta("callahead_probes_total", outcome="unknown") == 1
    assert new_connections(delta, stack.strict_ports["deliver"]) == 2


def test_microsoft_365_replies(stack: Stack) -> None:
    profile = stack.profiles["strict"]
    delta = MetricsDelta(profile.process)
    stack.primary.add_user("known@m365.test")  # where the backup delivers m365.test
    token, body = make_message(SENDER, ["known@m365.test"])
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@m365.test"

    tx = send(profile.port, SENDER, ["known@m365.test"], body)
    assert tx.code("known@m365.test") == 250
    wait_for(
        lambda: any(token.encode() in m for m in stack.primary.mailbox("known@m365.test")),
        DELIVERY_TIMEOUT,
        what="delivery",
    )
    # Directory-based edge blocking (550 5.4.1) is about the recipient.
    assert send(profile.port, SENDER, [unknown]).code(unknown) == 550
    # A policy refusal of the backup's address (5.7.x) is not.
    assert send(profile.port, SENDER, ["policy@m365.test"]).code("policy@m365.test") == 250
    # Throttling is undecided, and a throttled session is not used again.
    for addr in ("throttled@m365.test", "busy@m365.test", "known2@m365.test"):
        assert send(profile.port, SENDER, [addr]).code(addr) == 250
    commands = stack.m365.commands
    throttled = {c.session for c in commands if c.reply and c.reply.startswith(("452", "451"))}
    assert throttled
    for session in throttled:
        rcpts = [c for c in commands if c.session == session and c.line.startswith("RCPT")]
        assert rcpts[-1].reply is not None and rcpts[-1].reply[:3] in ("451", "452")
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1
    # The tenant has no postmaster@ (it gets 5.4.1 like any address it lacks), and its
    # 5.4.1 needs no control: postmaster@ was never asked.
    assert not any("postmaster@" in c.line for c in commands)


def test_exim_refusing_the_prober_after_the_postmaster_accept_never_refuses_a_known_user(
    stack: Stack,
) -> None:
    """Debian's Exim configuration accepts postmaster@ before any deny; a rate limit on
    the backup's address then answers known users with a bare 550 Sender rate
    overlimit on a session that accepted postmaster@. Its text refuses the prober:
    known users are accepted (and delivered); unknown ones still get Exim's
    Unrouteable address, which the rate limit comes after."""
    profile = stack.profiles["peers"]
    delta = MetricsDelta(profile.process)
    known = [f"u{n}@eximrl.test" for n in (1, 2, 3)]
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@eximrl.test"
    for addr in known:
        stack.primary.add_user(addr)  # where the backup delivers eximrl.test
    token, body = make_message(SENDER, known)

    tx = send(profile.port, SENDER, [*known, unknown], body)

    assert [tx.code(a) for a in known] == [250, 250, 250]
    assert tx.code(unknown) == 550
    assert tx.data is not None and tx.data[0] == 250
    for addr in known:
        wait_for(partial(delivered_to_stand_in, stack, addr, token), DELIVERY_TIMEOUT, what=addr)
    log = stack.peers["eximrl"].log()
    assert "Sender rate overlimit" in log  # the primary really refused the prober
    primary = hop(stack.peers["eximrl"].port)
    assert delta("callahead_prober_refused_total", primary=primary, basis="prober") == 3
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1


@pytest.mark.parametrize("peer", ["exim", "opensmtpd"])
def test_peer_mta_primaries(stack: Stack, peer: str) -> None:
    """Exim answers an unknown user with a bare ``550 Unrouteable address``, OpenSMTPD
    with ``524 5.2.4``: both are unknown at the backup; a known user is delivered."""
    profile = stack.profiles["peers"]
    primary = stack.peers[peer]
    known, unknown = f"u1@{peer}.test", f"nobody-{uuid.uuid4().hex[:8]}@{peer}.test"
    before = primary.mailbox_count(known)
    token, body = make_message(SENDER, [known])

    tx = send(profile.port, SENDER, [known, unknown], body)

    assert tx.code(known) == 250
    assert tx.code(unknown) == 550
    assert tx.data is not None and tx.data[0] == 250
    wait_for(
        lambda: any(token.encode() in m for m in primary.mailbox(known)),
        DELIVERY_TIMEOUT,
        what=f"delivery by {peer}",
    )
    assert primary.mailbox_count(known) == before + 1
