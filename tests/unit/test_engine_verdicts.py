"""The engine's verdict rules against SMTP servers on loopback: postmaster@ evidence for
an unknown, refusals of the prober counted and logged once, a current view of the
primary, the fallback sender, and unreadable replies."""

from __future__ import annotations

import logging

import pytest

from callahead.cache import PositiveCache
from callahead.metrics import Metrics
from callahead.verdict import Basis, Stage, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script, Session
from tests.unit.test_engine import (
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


def test_unknown_needs_postmaster_accepted_on_the_same_session(
    scripted: StartScripted,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = scripted(Script(rcpt_default=UNKNOWN, postmaster=UNKNOWN))
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
            # The primary starts accepting postmaster@: now a 550 is believed.
            server.update(postmaster=OK)
            result = await engine.probe("nobody9@example.test", [hop(server)])
            assert result.verdict is Verdict.UNKNOWN
            assert sample(metrics, "callahead_primary_refuses_prober", primary=primary) == 0

    with caplog.at_level(logging.INFO, logger="callahead.engine"):
        run(go)
    warnings = [r for r in caplog.records if "refuses postmaster@example.test" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per recipient
    assert any("judges callahead's probes again" in r.getMessage() for r in caplog.records)


def test_postmaster_is_asked_once_per_session_and_domain(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=UNKNOWN))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(3):
                result = await engine.probe(f"nobody{n}@example.test", [hop(server)])
                assert result.verdict is Verdict.UNKNOWN
                assert "postmaster@example.test was accepted" in result.why
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


def test_postmaster_itself_refused_is_never_unknown(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=UNKNOWN, postmaster=UNKNOWN))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("postmaster@example.test", [hop(server)])
            assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.UNPROVEN)

    run(go)
    assert server.count("RCPT") == 1


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
