"""A primary that verifies the address itself (a Postfix edge with
``reject_unverified_recipient``) and answers "Address verification in progress" until
its own probe is back: the engine asks again on new sessions within the probe's
deadline, judges the last reply by the ordinary rules, and never makes a 550 of "in
progress" (smtp/verifying.py, probing/reask.py). Replies are Postfix 3.7's own words,
as a real edge sent them (tests/integration/test_verifying_primary.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from callahead.probing import reask
from callahead.probing.breaker import State
from callahead.smtp.verdict import Basis, ProbeResult, Stage, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script, ScriptedServer, Session
from tests.unit.probing.test_engine import engine_with, hop, settings

ADDRESS = "someone@example.test"


def in_progress(address: str, code: str = "450 4.1.1") -> str:
    """smtpd_check.c's reply with verify(8)'s text for a probe not back yet."""
    return (
        f"{code} <{address}>: Recipient address rejected: unverified address: "
        "Address verification in progress"
    )


def undeliverable(address: str) -> str:
    """The edge's reply once its probe bounced (``unverified_recipient_reject_code =
    550``), quoting the mailbox server."""
    return (
        f"550 5.1.1 <{address}>: Recipient address rejected: undeliverable address: "
        f"host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <{address}>: Recipient address "
        "rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)"
    )


def first_session(then: str | None) -> Callable[[Session, str], str | None]:
    """In progress on the first connection, ``then`` (None: hang up) on later ones."""

    def hook(session: Session, address: str) -> str | None:
        return in_progress(address) if session.number == 1 else then

    return hook


@pytest.fixture
def quick_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short pauses between asks, so that a test is quick; the rules stay the same."""
    monkeypatch.setattr(reask, "PAUSES", (0.05, 0.05, 0.05))
    monkeypatch.setattr(reask, "ASK_RESERVE", 0.2)


def probe(server: ScriptedServer, timeout: float = 5.0) -> tuple[ProbeResult, float, State]:
    async def go() -> tuple[ProbeResult, float, State]:
        async with engine_with(settings(timeout=timeout)) as engine:
            started = time.monotonic()
            result = await engine.probe(ADDRESS, [hop(server)])
            return result, time.monotonic() - started, engine.breaker_state(hop(server))

    return asyncio.run(go())


def test_in_progress_then_user_unknown_on_a_new_session_is_unknown(
    scripted: StartScripted,
) -> None:
    # The real pauses: the second ask comes about 1 s after the first reply.
    server = scripted(Script(rcpt_hook=first_session(undeliverable(ADDRESS))))
    result, took, breaker = probe(server)
    assert (result.verdict, result.stage, result.code) == (Verdict.UNKNOWN, Stage.RCPT, 550)
    assert "User unknown in virtual mailbox table" in result.detail
    assert server.connections == 2
    assert [s.rcpts() for s in server.sessions] == [[ADDRESS], [ADDRESS]]
    first = next(c for c in server.sessions[0].commands if c.verb == "RCPT")
    assert first.reply == in_progress(ADDRESS)
    assert 0.9 < took < 5.0
    assert breaker is State.CLOSED


def test_in_progress_then_accepted_on_a_new_session_is_valid(
    scripted: StartScripted, quick_pauses: None
) -> None:
    server = scripted(Script(rcpt_hook=first_session("250 2.1.5 Ok")))
    result, _, _ = probe(server)
    assert (result.verdict, result.basis, result.code) == (Verdict.VALID, Basis.ACCEPTED, 250)
    assert server.connections == 2


def test_always_in_progress_is_undecided_after_a_bounded_number_of_sessions(
    scripted: StartScripted, quick_pauses: None
) -> None:
    server = scripted(Script(rcpt_hook=lambda session, address: in_progress(address)))
    result, took, breaker = probe(server, timeout=5.0)
    assert (result.verdict, result.basis, result.code) == (Verdict.TEMPFAIL, Basis.TEMPORARY, 450)
    assert result.reached
    assert "still in progress after 4 asks" in result.why
    assert server.connections == 1 + len(reask.PAUSES)  # each ask on a session of its own
    assert all(s.rcpts() == [ADDRESS] for s in server.sessions)
    assert took < 5.0
    assert breaker is State.CLOSED


def test_the_pauses_never_run_past_the_probe_timeout(scripted: StartScripted) -> None:
    # The real pauses (1 s, then 2 s) and a 3 s timeout: room for one more ask only.
    server = scripted(Script(rcpt_hook=lambda session, address: in_progress(address)))
    result, took, _ = probe(server, timeout=3.0)
    assert (result.verdict, result.code) == (Verdict.TEMPFAIL, 450)
    assert server.connections == 2
    assert took < 3.0


def test_in_progress_with_a_5xx_code_is_never_unknown(
    scripted: StartScripted, quick_pauses: None
) -> None:
    # unverified_recipient_defer_code = 550: a 5.1.1 that still says nothing of the user.
    def hook(session: Session, address: str) -> str:
        return in_progress(address, "550 5.1.1")

    server = scripted(Script(rcpt_hook=hook))
    result, _, _ = probe(server)
    assert (result.verdict, result.code) == (Verdict.TEMPFAIL, 550)
    assert server.connections == 1 + len(reask.PAUSES)


def test_a_new_ask_without_a_reply_leaves_the_reply_before_it(
    scripted: StartScripted, quick_pauses: None
) -> None:
    server = scripted(Script(rcpt_hook=first_session(None)))  # hangs up at RCPT
    result, _, breaker = probe(server)
    assert (result.verdict, result.code, result.reached) == (Verdict.TEMPFAIL, 450, True)
    assert "Address verification in progress" in result.detail
    assert server.connections == 2
    assert breaker is State.CLOSED


@pytest.mark.parametrize(
    "reply",
    [
        "450 4.2.1 Mailbox temporarily unavailable",
        "450 4.1.1 <x@example.test>: Recipient address rejected: unverified address: "
        "host 127.0.0.1[127.0.0.1] said: 451 4.3.0 Temporary lookup failure",
        "550 5.1.1 <x@example.test>: Recipient address rejected: User unknown",
    ],
)
def test_other_replies_are_asked_once(
    scripted: StartScripted, quick_pauses: None, reply: str
) -> None:
    # Only "in progress" is asked again; an edge's deferred probe (its mailbox server
    # answered 4xx) is a plain 450.
    server = scripted(Script(rcpt_default=reply))
    probe(server)
    assert server.connections == 1
    assert server.count("RCPT") == 1


def test_the_phrase_in_the_quoted_address_is_not_read(
    scripted: StartScripted, quick_pauses: None
) -> None:
    address = '"address verification in progress"@example.test'
    server = scripted(Script(rcpt_default=f"450 4.2.1 <{address}>: Mailbox busy"))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe(address, [hop(server)])
            assert result.verdict is Verdict.TEMPFAIL

    asyncio.run(go())
    assert server.connections == 1
