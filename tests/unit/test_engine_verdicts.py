"""The engine's verdict rules against SMTP servers on loopback: postmaster@ evidence for
an unknown, refusals of the prober counted and logged once, a current view of the
primary, the fallback sender, and unreadable replies."""

from __future__ import annotations

import logging

import pytest

from callahead.cache import PositiveCache
from callahead.metrics import Metrics
from callahead.verdict import Basis, Stage, Verdict
from tests.unit.fakesmtp import Conn, FakeSmtpServer, Script
from tests.unit.test_engine import engine_with, run, sample, serving, settings

HELO_REJECT = "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
SENDER_REJECT = "554 5.7.1 <>: Sender address rejected: Access denied"


def test_unknown_needs_postmaster_accepted_on_the_same_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = FakeSmtpServer(Script(rcpt=550, postmaster=550))
    metrics = Metrics()
    label = "[127.0.0.1]:{}"

    async def go() -> None:
        async with serving(server), engine_with(settings(), metrics) as engine:
            for n in range(3):
                result = await engine.probe(f"nobody{n}@example.test", [server.hop])
                assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.UNPROVEN)
                assert result.code == 550
            primary = label.format(server.port)
            assert (
                sample(metrics, "callahead_prober_refused_total", primary=primary, basis="unproven")
                == 3
            )
            assert sample(metrics, "callahead_primary_refuses_prober", primary=primary) == 1
            # The primary starts accepting postmaster@: now a 550 is believed.
            server.script.postmaster = 250
            result = await engine.probe("nobody9@example.test", [server.hop])
            assert result.verdict is Verdict.UNKNOWN
            assert sample(metrics, "callahead_primary_refuses_prober", primary=primary) == 0

    with caplog.at_level(logging.INFO, logger="callahead.engine"):
        run(go)
    warnings = [r for r in caplog.records if "refuses postmaster@example.test" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per recipient
    assert any("judges callahead's probes again" in r.getMessage() for r in caplog.records)


def test_postmaster_is_asked_once_per_session_and_domain() -> None:
    server = FakeSmtpServer(Script(rcpt=550))

    async def go() -> None:
        async with serving(server), engine_with(settings()) as engine:
            for n in range(3):
                result = await engine.probe(f"nobody{n}@example.test", [server.hop])
                assert result.verdict is Verdict.UNKNOWN
                assert "postmaster@example.test was accepted" in result.why
            result = await engine.probe("nobody@other.test", [server.hop])
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


def test_postmaster_itself_refused_is_never_unknown() -> None:
    server = FakeSmtpServer(Script(rcpt=550, postmaster=550))

    async def go() -> None:
        async with serving(server), engine_with(settings()) as engine:
            result = await engine.probe("postmaster@example.test", [server.hop])
            assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.UNPROVEN)

    run(go)
    assert server.count("RCPT") == 1


@pytest.mark.parametrize(
    ("reply", "basis"), [(HELO_REJECT, Basis.PROBER), (SENDER_REJECT, Basis.SENDER)]
)
def test_a_delayed_rejection_of_the_prober_is_undecided(reply: str, basis: Basis) -> None:
    server = FakeSmtpServer(Script(rcpt_hook=lambda conn, address: reply))

    async def go() -> None:
        async with serving(server), engine_with(settings()) as engine:
            result = await engine.probe("u1@example.test", [server.hop])
            assert (result.verdict, result.basis, result.stage) == (
                Verdict.TEMPFAIL,
                basis,
                Stage.RCPT,
            )
            assert result.reached  # the primary answered: the breaker is not moved

    run(go)
    assert server.count("RCPT") == 1  # no postmaster@ check: it was never "unknown"


def test_an_address_judged_on_a_session_is_asked_again_on_a_newer_one() -> None:
    """Like Postfix, the server reads its user table when a connection begins. A user
    added after a 550 is accepted at the next probe, on a new connection; addresses
    never judged keep using the pooled session."""
    users = {"u1@example.test"}
    tables: dict[int, frozenset[str]] = {}

    def as_postfix(conn: Conn, address: str) -> int:
        table = tables.setdefault(conn.number, frozenset(users))
        return 250 if address in table or address.startswith("postmaster@") else 550

    server = FakeSmtpServer(Script(rcpt_hook=as_postfix))

    async def go() -> None:
        async with serving(server), engine_with(settings()) as engine:
            assert (await engine.probe("u1@example.test", [server.hop])).verdict is Verdict.VALID
            late = await engine.probe("late@example.test", [server.hop])
            assert late.verdict is Verdict.UNKNOWN
            assert server.connections == 1
            users.add("late@example.test")
            late = await engine.probe("late@example.test", [server.hop])
            assert late.verdict is Verdict.VALID
            assert server.connections == 2
            # A valid answer is a judgment too: its re-verification needs a newer session.
            again = await engine.probe("late@example.test", [server.hop])
            assert again.verdict is Verdict.VALID
            assert server.connections == 3
            other = await engine.probe("other@example.test", [server.hop])
            assert other.verdict is Verdict.UNKNOWN
            assert server.connections == 3

    run(go)


def test_fallback_sender_after_a_delayed_sender_rejection(caplog: pytest.LogCaptureFixture) -> None:
    def refuse_null_sender(conn: Conn, address: str) -> int | str:
        if "MAIL FROM:<>" in conn.lines:
            return SENDER_REJECT
        return 250 if address in ("u1@example.test", "postmaster@example.test") else 550

    server = FakeSmtpServer(Script(rcpt_hook=refuse_null_sender))

    async def go() -> None:
        async with (
            serving(server),
            engine_with(settings(fallback_sender="probe@backup.example.net")) as engine,
        ):
            valid = await engine.probe("u1@example.test", [server.hop])
            assert valid.verdict is Verdict.VALID
            unknown = await engine.probe("nobody@example.test", [server.hop])
            assert unknown.verdict is Verdict.UNKNOWN

    with caplog.at_level(logging.WARNING, logger="callahead.engine"):
        run(go)
    mails = [line for line in server.lines if line.startswith("MAIL")]
    assert mails == ["MAIL FROM:<>", "MAIL FROM:<probe@backup.example.net>"]
    assert server.connections == 2
    assert sum("fallback sender" in r.getMessage() for r in caplog.records) == 1


def test_fallback_sender_after_a_refusal_at_mail_from() -> None:
    server = FakeSmtpServer(Script(rcpt=550, mail_by_sender={"": 553}))

    async def go() -> None:
        async with serving(server), engine_with(settings(fallback_sender="probe@b.test")) as engine:
            result = await engine.probe("nobody@example.test", [server.hop])
            assert result.verdict is Verdict.UNKNOWN

    run(go)
    assert [line for line in server.lines if line.startswith("MAIL")] == [
        "MAIL FROM:<>",
        "MAIL FROM:<probe@b.test>",
    ]


def test_without_a_fallback_a_refused_sender_is_undecided() -> None:
    server = FakeSmtpServer(Script(rcpt=550, mail_by_sender={"": 553}))

    async def go() -> None:
        async with serving(server), engine_with(settings()) as engine:
            result = await engine.probe("nobody@example.test", [server.hop])
            assert (result.verdict, result.basis, result.stage) == (
                Verdict.TEMPFAIL,
                Basis.SENDER,
                Stage.MAIL,
            )

    run(go)
    assert server.count("RCPT") == 0


@pytest.mark.parametrize("reply", ["xyz what", "550" + "x" * 40_000])
def test_an_unreadable_reply_at_rcpt_is_a_fault_of_the_primary(reply: str) -> None:
    server = FakeSmtpServer(Script(rcpt_hook=lambda conn, address: reply))

    async def go() -> None:
        async with serving(server), engine_with(settings()) as engine:
            result = await engine.probe("u1@example.test", [server.hop])
            assert (result.verdict, result.basis) == (Verdict.TEMPFAIL, Basis.NO_REPLY)
            assert "unreadable reply" in result.detail

    run(go)


def test_a_valid_answer_is_in_the_cache_before_its_in_flight_entry_goes() -> None:
    """A request that missed the cache while the probe ran, and reaches the engine just
    after it ended, must find the answer instead of probing again."""
    server = FakeSmtpServer(Script(rcpt=250))
    cache = PositiveCache(ttl=60, maxsize=100)
    metrics = Metrics()

    async def go() -> None:
        async with serving(server), engine_with(settings(), metrics, cache) as engine:
            first = await engine.probe("u1@example.test", [server.hop])
            assert first.verdict is Verdict.VALID
            assert "u1@example.test" in cache  # written by the engine itself
            second = await engine.probe("u1@example.test", [server.hop])
            assert second.verdict is Verdict.VALID

    run(go)
    assert server.count("RCPT") == 1
    assert sample(metrics, "callahead_coalesced_waits_total") == 1
