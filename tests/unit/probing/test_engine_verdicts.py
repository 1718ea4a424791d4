"""The engine's verdict rules against SMTP servers on loopback: postmaster@ evidence for
an unknown, refusals of the prober counted and logged once, a current view of the
primary, the fallback sender, and unreadable replies."""

from __future__ import annotations

import asyncio
import logging

import pytest

from callahead.caching.cache import PositiveCache
from callahead.frontends.metrics import Metrics
from callahead.smtp.verdict import Basis, ProbeResult, Stage, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import RcptHook, Script, ScriptedServer, Session
from tests.unit.probing.test_engine import (
    NO_SMTPUTF8,
    OK,
    UNKNOWN,
    engine_with,
    hop,
    run,
    sample,
    settings,
)

HELO_REJECT = "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
SENDER_REJECT = "554 5.7.1 <>: Sender address rejected: Access denied"
NULL_SENDER_REFUSED = "553 5.7.1 <>: Sender address rejected: null sender not accepted"
BARE_UNKNOWN = "550 Unrouteable address"
"""Exim's reply for an unknown user: no enhanced status code."""


def test_an_explicit_rejection_is_unknown_without_any_control(scripted: StartScripted) -> None:
    """A primary without postmaster@ (a database-backed virtual domain): its 5.1.1 is
    believed on its own, and no control is asked when none is known."""
    server = scripted(Script(rcpt_default=UNKNOWN))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(3):
                result = await engine.probe(f"nobody{n}@example.test", [hop(server)])
                assert (result.verdict, result.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT)
                assert "unknown on its own" in result.why

    run(go)
    assert server.rcpts() == [f"nobody{n}@example.test" for n in range(3)]


def test_a_bare_rejection_needs_a_control_on_the_same_session(
    scripted: StartScripted,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = scripted(Script(rcpt_default=BARE_UNKNOWN))
    metrics = Metrics()
    label = "[127.0.0.1]:{}"

    async def go() -> None:
        async with engine_with(settings(), metrics) as engine:
            for n in range(3):
                result = await engine.probe(f"nobody{n}@example.test", [hop(server)])
                assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.UNPROVEN)
                assert result.code == 550
            primary = label.format(server.port)
            assert (
                sample(metrics, "callahead_prober_refused_total", primary=primary, basis="unproven")
                == 3
            )
            assert sample(metrics, "callahead_primary_refuses_prober", primary=primary) == 1
        # The primary starts accepting postmaster@: on a new session (a primary's view
        # of its tables is its session's), a bare 550 is believed.
        server.update(postmaster=OK)
        async with engine_with(settings()) as engine:
            result = await engine.probe("nobody9@example.test", [hop(server)])
            assert result.verdict is Verdict.UNKNOWN

    with caplog.at_level(logging.INFO, logger="callahead.engine"):
        run(go)
    warnings = [r for r in caplog.records if "postmaster@example.test" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per recipient
    # postmaster@ was asked once on the first session, not once per recipient.
    assert server.sessions[0].rcpts().count("postmaster@example.test") == 1


def test_a_bare_rejection_that_does_not_say_unknown_is_never_unknown(
    scripted: StartScripted,
) -> None:
    """Debian's Exim accepts postmaster@ before its rate limit denies the prober: a
    bare 550 with another text is undecided, on a vouched session too."""
    server = scripted(
        Script(rcpt_default=BARE_UNKNOWN, postmaster=OK, users=frozenset({"u1@example.test"}))
    )

    async def go() -> None:
        async with engine_with(settings()) as engine:
            first = await engine.probe("nobody@example.test", [hop(server)])
            assert first.verdict is Verdict.UNKNOWN  # vouched for by postmaster@
            server.update(
                rcpt_ok="550 Sender rate overlimit", rcpt_default="550 Sender rate overlimit"
            )
            for address in ("u1@example.test", "nobody2@example.test"):
                result = await engine.probe(address, [hop(server)])
                assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.PROBER)

    run(go)


def test_a_recently_verified_address_is_the_control(scripted: StartScripted) -> None:
    """No postmaster@: once a user of the domain is verified, it vouches for the bare
    rejections of its own session and, asked as the control, of later sessions."""
    server = scripted(Script(rcpt_default=BARE_UNKNOWN, users=frozenset({"u1@example.test"})))
    cache = PositiveCache(ttl=60, maxsize=100)

    async def go() -> None:
        async with engine_with(settings(), None, cache) as engine:
            before = await engine.probe("nobody0@example.test", [hop(server)])
            assert before.basis is Basis.UNPROVEN  # nothing verified yet, no postmaster@
            assert (await engine.probe("u1@example.test", [hop(server)])).verdict is Verdict.VALID
            same = await engine.probe("nobody1@example.test", [hop(server)])
            assert same.verdict is Verdict.UNKNOWN  # u1 was accepted on this session
            # Judged on the first session: asked again on a new one, where u1 is asked.
            again = await engine.probe("nobody1@example.test", [hop(server)])
            assert again.verdict is Verdict.UNKNOWN, again
            assert "the control u1@example.test was accepted" in again.why
            last = await engine.probe("nobody2@example.test", [hop(server)])
            assert last.verdict is Verdict.UNKNOWN

    run(go)
    assert server.connections == 2
    assert [s.rcpts() for s in server.sessions] == [
        [
            "nobody0@example.test",
            "postmaster@example.test",
            "u1@example.test",
            "nobody1@example.test",
        ],
        ["nobody1@example.test", "u1@example.test", "nobody2@example.test"],
    ]


def test_controls_are_asked_once_per_session_and_domain(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=BARE_UNKNOWN, postmaster=OK))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(3):
                result = await engine.probe(f"nobody{n}@example.test", [hop(server)])
                assert result.verdict is Verdict.UNKNOWN
                assert "the control postmaster@example.test was accepted" in result.why
            result = await engine.probe("nobody@other.test", [hop(server)])
            assert result.verdict is Verdict.UNKNOWN

    run(go)
    assert server.connections == 1
    rcpts = [line for line in server.lines if line.startswith("RCPT")]
    assert rcpts == [
        "RCPT TO:<nobody0@example.test>",
        "RCPT TO:<postmaster@example.test>",
        "RCPT TO:<nobody1@example.test>",
        "RCPT TO:<nobody2@example.test>",
        "RCPT TO:<nobody@other.test>",
        "RCPT TO:<postmaster@other.test>",
    ]


def test_postmaster_itself(scripted: StartScripted) -> None:
    """postmaster@ refused with a bare 550 cannot vouch for itself; with 5.1.1 it is
    unknown like any address (many domains have no such mailbox)."""
    bare = scripted(Script(rcpt_default=BARE_UNKNOWN))
    explicit = scripted(Script(rcpt_default=UNKNOWN))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("postmaster@example.test", [hop(bare)])
            assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.UNPROVEN)
            result = await engine.probe("postmaster@example.test", [hop(explicit)])
            assert (result.verdict, result.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT)

    run(go)
    assert bare.count("RCPT") == explicit.count("RCPT") == 1


def test_drift_a_verified_control_refused_makes_the_session_undecided(
    scripted: StartScripted, caplog: pytest.LogCaptureFixture
) -> None:
    """u1 was verified; then the primary stops judging (its directory lookup broke) and
    answers 5.1.1 to everyone: the control u1 is refused too, so nothing is rejected."""
    server = scripted(Script(rcpt_default=UNKNOWN, users=frozenset({"u1@example.test"})))
    cache = PositiveCache(ttl=60, maxsize=100)
    metrics = Metrics()
    primary = f"[127.0.0.1]:{server.port}"

    async def go() -> None:
        async with engine_with(settings(), metrics, cache) as engine:
            assert (await engine.probe("u1@example.test", [hop(server)])).verdict is Verdict.VALID
            assert (await engine.probe("nobody@example.test", [hop(server)])).verdict is (
                Verdict.UNKNOWN
            )
            server.update(users=frozenset())  # the directory is gone
            # Judged on the first session: asked again on a new one (a current view).
            again = await engine.probe("nobody@example.test", [hop(server)])
            assert (again.verdict, again.basis) == (Verdict.TEMPFAIL, Basis.DRIFT), again
            for n in range(3):
                result = await engine.probe(f"real{n}@example.test", [hop(server)])
                assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.DRIFT), result
                assert "u1@example.test" in result.why
            assert sample(metrics, "callahead_drift_total", primary=primary) == 4
            assert (
                sample(metrics, "callahead_prober_refused_total", primary=primary, basis="drift")
                == 0
            )

    with caplog.at_level(logging.WARNING, logger="callahead.engine"):
        run(go)
    second = server.sessions[-1].rcpts()
    # The control u1, once; never postmaster@, which proves nothing once a verified
    # control was refused (it is often an alias that never reaches the user table).
    assert second == [
        "nobody@example.test",
        "u1@example.test",
        "real0@example.test",
        "real1@example.test",
        "real2@example.test",
    ]
    assert sum("may have stopped judging" in r.getMessage() for r in caplog.records) == 1


def test_a_removed_control_is_told_from_drift_by_another_control(scripted: StartScripted) -> None:
    """u1 and u2 were verified; u1 is removed on the primary. The session asks u1 (the
    newest), then u2, which is accepted: the rejection stands and u1 is no control now."""
    users = {"u1@example.test", "u2@example.test"}
    server = scripted(Script(rcpt_default=UNKNOWN, users=frozenset(users)))
    cache = PositiveCache(ttl=60, maxsize=100)

    async def go() -> None:
        async with engine_with(settings(), None, cache) as engine:
            for address in ("u2@example.test", "u1@example.test"):
                assert (await engine.probe(address, [hop(server)])).verdict is Verdict.VALID
            first = await engine.probe("nobody@example.test", [hop(server)])
            assert first.verdict is Verdict.UNKNOWN
            server.update(users=frozenset({"u2@example.test"}))
            # Judged on the first session: asked again on a new one (a current view).
            result = await engine.probe("nobody@example.test", [hop(server)])
            assert (result.verdict, result.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT)
            assert "the control u2@example.test was accepted" in result.why
            assert cache.recent("example.test") == ("u2@example.test",)
            assert "u1@example.test" in cache  # still cached: only no longer a control

    run(go)
    assert server.sessions[-1].rcpts() == [
        "nobody@example.test",
        "u1@example.test",
        "u2@example.test",
    ]


@pytest.mark.parametrize(
    ("reply", "basis"), [(HELO_REJECT, Basis.PROBER), (SENDER_REJECT, Basis.SENDER)]
)
def test_a_delayed_rejection_of_the_prober_is_undecided(
    scripted: StartScripted, reply: str, basis: Basis
) -> None:
    server = scripted(Script(rcpt_default=reply, postmaster=None))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("u1@example.test", [hop(server)])
            assert (result.verdict, result.basis, result.stage) == (
                Verdict.TEMPFAIL,
                basis,
                Stage.RCPT,
            )
            assert result.reached  # the primary answered: the breaker is not moved

    run(go)
    assert server.count("RCPT") == 1  # no postmaster@ check: it was never "unknown"


def test_an_address_judged_on_a_session_is_asked_again_on_a_newer_one(
    scripted: StartScripted,
) -> None:
    """Like Postfix, the server reads its user table when a connection begins. A user
    added after a 550 is accepted at the next probe, on a new connection; addresses
    never judged keep using the pooled session."""
    users = {"u1@example.test"}
    tables: dict[int, frozenset[str]] = {}

    def as_postfix(session: Session, address: str) -> str:
        table = tables.setdefault(session.number, frozenset(users))
        return OK if address in table or address.startswith("postmaster@") else UNKNOWN

    server = scripted(Script(rcpt_hook=as_postfix))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            assert (await engine.probe("u1@example.test", [hop(server)])).verdict is Verdict.VALID
            late = await engine.probe("late@example.test", [hop(server)])
            assert late.verdict is Verdict.UNKNOWN
            assert server.connections == 1
            users.add("late@example.test")
            late = await engine.probe("late@example.test", [hop(server)])
            assert late.verdict is Verdict.VALID
            assert server.connections == 2
            # A valid answer is a judgment too: its re-verification needs a newer session.
            again = await engine.probe("late@example.test", [hop(server)])
            assert again.verdict is Verdict.VALID
            assert server.connections == 3
            other = await engine.probe("other@example.test", [hop(server)])
            assert other.verdict is Verdict.UNKNOWN
            assert server.connections == 3

    run(go)


def test_fallback_sender_after_a_delayed_sender_rejection(
    scripted: StartScripted, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse_null_sender(session: Session, address: str) -> str:
        if "MAIL FROM:<>" in session.lines:
            return SENDER_REJECT
        return OK if address in ("u1@example.test", "postmaster@example.test") else UNKNOWN

    server = scripted(Script(rcpt_hook=refuse_null_sender, extensions=NO_SMTPUTF8))

    async def go() -> None:
        async with (
            engine_with(settings(fallback_sender="probe@backup.example.net")) as engine,
        ):
            valid = await engine.probe("u1@example.test", [hop(server)])
            assert valid.verdict is Verdict.VALID
            unknown = await engine.probe("nobody@example.test", [hop(server)])
            assert unknown.verdict is Verdict.UNKNOWN

    with caplog.at_level(logging.WARNING, logger="callahead.engine"):
        run(go)
    mails = [line for line in server.lines if line.startswith("MAIL")]
    assert mails == ["MAIL FROM:<>", "MAIL FROM:<probe@backup.example.net>"]
    assert server.connections == 2
    assert sum("fallback sender" in r.getMessage() for r in caplog.records) == 1


def test_fallback_sender_after_a_refusal_at_mail_from(scripted: StartScripted) -> None:
    refused = {"": NULL_SENDER_REFUSED}
    server = scripted(Script(rcpt_default=UNKNOWN, mail_by_sender=refused, extensions=NO_SMTPUTF8))

    async def go() -> None:
        async with engine_with(settings(fallback_sender="probe@b.test")) as engine:
            result = await engine.probe("nobody@example.test", [hop(server)])
            assert result.verdict is Verdict.UNKNOWN

    run(go)
    assert [line for line in server.lines if line.startswith("MAIL")] == [
        "MAIL FROM:<>",
        "MAIL FROM:<probe@b.test>",
    ]


def test_without_a_fallback_a_refused_sender_is_undecided(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=UNKNOWN, mail_by_sender={"": NULL_SENDER_REFUSED}))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("nobody@example.test", [hop(server)])
            assert (result.verdict, result.basis, result.stage) == (
                Verdict.TEMPFAIL,
                Basis.SENDER,
                Stage.MAIL,
            )

    run(go)
    assert server.count("RCPT") == 0


@pytest.mark.parametrize("reply", ["xyz what", "550" + "x" * 40_000])
def test_an_unreadable_reply_at_rcpt_is_a_fault_of_the_primary(
    scripted: StartScripted, reply: str
) -> None:
    server = scripted(Script(rcpt_default=reply, postmaster=None))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("u1@example.test", [hop(server)])
            assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.NO_REPLY)
            assert "unreadable reply" in result.detail

    run(go)


def test_a_valid_answer_is_in_the_cache_before_its_in_flight_entry_goes(
    scripted: StartScripted,
) -> None:
    """A request that missed the cache while the probe ran, and reaches the engine just
    after it ended, must find the answer instead of probing again."""
    server = scripted(Script(rcpt_default=OK))
    cache = PositiveCache(ttl=60, maxsize=100)
    metrics = Metrics()

    async def go() -> None:
        async with engine_with(settings(), metrics, cache) as engine:
            first = await engine.probe("u1@example.test", [hop(server)])
            assert first.verdict is Verdict.VALID
            assert "u1@example.test" in cache  # written by the engine itself
            second = await engine.probe("u1@example.test", [hop(server)])
            assert second.verdict is Verdict.VALID

    run(go)
    assert server.count("RCPT") == 1
    assert sample(metrics, "callahead_coalesced_waits_total") == 1


def multi_recipient_bounce(users: set[str]) -> RcptHook:
    """Postfix's ``reject_multi_recipient_bounce``: after ``MAIL FROM:<>``, every RCPT
    after the first accepted one of the transaction gets 5.5.3."""

    def decide(session: Session, address: str) -> str:
        commands = session.commands
        mails = [i for i, c in enumerate(commands) if c.verb == "MAIL"]
        since = commands[mails[-1] + 1 :]
        accepted = sum(
            1 for c in since if c.verb == "RCPT" and c.reply is not None and c.reply[0] == "2"
        )
        if commands[mails[-1]].line.startswith("MAIL FROM:<>") and accepted:
            return f"550 5.5.3 <{address}>: Recipient address rejected: Multi-recipient bounce"
        return OK if address in users else UNKNOWN

    return decide


def test_a_primary_refusing_multi_recipient_bounces_gets_one_recipient_per_transaction(
    scripted: StartScripted, caplog: pytest.LogCaptureFixture
) -> None:
    users = {f"u{n}@example.test" for n in range(10)}
    server = scripted(Script(rcpt_hook=multi_recipient_bounce(users)))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(10):
                known = await engine.probe(f"u{n}@example.test", [hop(server)])
                assert known.verdict is Verdict.VALID, known
                unknown = await engine.probe(f"nobody{n}@example.test", [hop(server)])
                assert (unknown.verdict, unknown.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT)

    with caplog.at_level(logging.WARNING, logger="callahead.engine"):
        run(go)
    replies = [c.reply or "" for c in server.commands if c.verb == "RCPT"]
    # One 5.5.3 taught the shape: the RCPT it refused was asked again, alone.
    assert sum(" 5.5.3 " in r for r in replies) == 1
    # After it, every transaction of every session carries one RCPT.
    transactions: list[list[str]] = []
    for session in server.sessions:
        for command in session.commands:
            if command.verb == "MAIL":
                transactions.append([])
            elif command.verb == "RCPT":
                transactions[-1].append(command.reply or "")
    assert len(transactions[0]) == 2 and " 5.5.3 " in transactions[0][1]
    assert all(len(rcpts) == 1 for rcpts in transactions[1:])
    assert len(transactions) == 20
    assert sum("reject_multi_recipient_bounce" in r.getMessage() for r in caplog.records) == 1


def test_with_a_fallback_sender_multi_recipient_bounces_switch_the_sender(
    scripted: StartScripted,
) -> None:
    users = {"u1@example.test", "u2@example.test"}
    server = scripted(Script(rcpt_hook=multi_recipient_bounce(users), extensions=NO_SMTPUTF8))

    async def go() -> None:
        async with engine_with(settings(fallback_sender="probe@b.test")) as engine:
            for address in ("u1@example.test", "u2@example.test", "nobody@example.test"):
                result = await engine.probe(address, [hop(server)])
                assert result.verdict is (
                    Verdict.UNKNOWN if address.startswith("nobody") else Verdict.VALID
                )
            result = await engine.probe("nobody2@example.test", [hop(server)])
            assert result.verdict is Verdict.UNKNOWN

    run(go)
    mails = [line for line in server.lines if line.startswith("MAIL")]
    assert mails[-1] == "MAIL FROM:<probe@b.test>"
    last = server.sessions[-1]
    assert last.count("MAIL") == 1 and last.count("RSET") == 0  # many RCPTs, one transaction


IN_DRIFT_CONTROL = "known@example.test"


def in_drift(control_reply: str | None) -> RcptHook:
    """A primary in drift (it refuses everyone with 5.1.1) that answers the verified
    control ``IN_DRIFT_CONTROL`` with ``control_reply`` (None: it hangs up instead) and
    ``throttled@other.test`` with Microsoft 365's throttle reply."""

    def decide(session: Session, address: str) -> str | None:
        if address == IN_DRIFT_CONTROL:
            return control_reply
        if address == "throttled@other.test":
            return "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77719)"
        return UNKNOWN

    return decide


def probe_together(server: ScriptedServer, addresses: list[str]) -> list[ProbeResult]:
    """Probe ``addresses`` at once on one pipelined session, with ``IN_DRIFT_CONTROL``
    recently verified."""
    known_valid = PositiveCache(ttl=3600, maxsize=100)
    known_valid.add(IN_DRIFT_CONTROL)

    async def go() -> list[ProbeResult]:
        async with engine_with(settings(pool_size=1), known_valid=known_valid) as engine:
            return list(await asyncio.gather(*(engine.probe(a, [hop(server)]) for a in addresses)))

    return run(go)


@pytest.mark.parametrize(
    "control_reply", ["421 4.3.2 Service shutting down", None], ids=["421", "hang-up"]
)
def test_a_control_that_got_no_answer_lets_no_rejection_of_its_session_through(
    scripted: StartScripted, control_reply: str | None
) -> None:
    """The first rejection asks the verified control, which gets no answer; the other
    probes of the shared session already hold their 5.1.1. With nothing left to ask they
    were judged "unknown on its own", and behind a primary in drift a real user got 550."""
    server = scripted(Script(rcpt_hook=in_drift(control_reply), delay={"RCPT": 0.05}))
    addresses = [f"real{n}@example.test" for n in range(4)]
    results = probe_together(server, addresses)
    assert [r.verdict for r in results] == [Verdict.TEMPFAIL] * len(addresses), results
    first = server.sessions[0].rcpts()
    # The rejections shared the session the control was asked on, after them.
    assert first[-1] == IN_DRIFT_CONTROL and len(first) >= 3, first


def test_a_session_retired_by_a_throttle_before_the_control_lets_no_rejection_through(
    scripted: StartScripted,
) -> None:
    """Another probe's 451 4.7.500 retires the shared session: the control is never
    sent, and the rejections already read are undecided."""
    server = scripted(Script(rcpt_hook=in_drift(UNKNOWN), delay={"RCPT": 0.05}))
    addresses = ["throttled@other.test"] + [f"real{n}@example.test" for n in range(3)]
    results = probe_together(server, addresses)
    assert [r.verdict for r in results] == [Verdict.TEMPFAIL] * len(addresses), results
    first = server.sessions[0].rcpts()
    assert first[0] == "throttled@other.test" and len(first) >= 3, first
    assert IN_DRIFT_CONTROL not in first


def test_a_throttle_reply_to_a_control_retires_its_session(scripted: StartScripted) -> None:
    """Microsoft 365's throttle reply to the control (issue 27): undecided, and the
    session is retired as after a probe's own throttle reply; the next probe opens a
    new one instead of pressing on where the primary asked it to slow down."""
    throttle = "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77719)"
    server = scripted(Script(rcpt_hook=in_drift(throttle)))
    known_valid = PositiveCache(ttl=3600, maxsize=100)
    known_valid.add(IN_DRIFT_CONTROL)

    async def go() -> list[ProbeResult]:
        async with engine_with(settings(pool_size=1), known_valid=known_valid) as engine:
            return [await engine.probe(f"real{n}@example.test", [hop(server)]) for n in range(2)]

    results = run(go)
    assert [r.verdict for r in results] == [Verdict.TEMPFAIL] * 2, results
    assert [s.rcpts() for s in server.sessions] == [
        ["real0@example.test", IN_DRIFT_CONTROL],
        ["real1@example.test", IN_DRIFT_CONTROL],
    ]


def test_an_accepted_postmaster_never_overrules_refused_verified_controls(
    scripted: StartScripted,
) -> None:
    """postmaster@ is an alias (virtual_alias_maps, /etc/aliases; Debian's Exim ACL
    accepts it before any lookup) while the user table is broken: two recently verified
    users are refused with 5.1.1, postmaster@ is accepted. That is drift: no 550."""
    users = frozenset({"u1@example.test", "u2@example.test"})
    server = scripted(Script(rcpt_default=UNKNOWN, users=users, postmaster=OK))
    cache = PositiveCache(ttl=60, maxsize=100)

    async def go() -> None:
        async with engine_with(settings(), None, cache) as engine:
            for address in sorted(users):
                assert (await engine.probe(address, [hop(server)])).verdict is Verdict.VALID
            server.update(users=frozenset())  # the mailbox map broke; the alias did not
            await engine.aclose()  # a new session: the primary's new view
            for n in range(2):
                result = await engine.probe(f"real{n}@example.test", [hop(server)])
                assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.DRIFT), result
            assert cache.recent("example.test") == ("u2@example.test", "u1@example.test")

    run(go)
    assert "postmaster@example.test" not in server.sessions[-1].rcpts()
