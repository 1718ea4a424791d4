"""The evidence rules of smtp/evidence.py with a fake ``ask`` (no SMTP): a control
counts only once it has been answered, and postmaster@ never overrules a recently
verified control refused on the same session (issue 27, items 3 and 4)."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from callahead.smtp.classify import Classification, classify
from callahead.smtp.evidence import EvidenceBook
from callahead.smtp.transaction import SessionLost
from callahead.smtp.verdict import Basis, Stage, Verdict

EXPLICIT = (550, "5.1.1 Recipient address rejected: User unknown in virtual mailbox table")
BARE = (550, "Unrouteable address")
OK = (250, "2.1.5 Ok")
Answer = tuple[int, str] | BaseException | None
"""A reply, an exception the ask raises, or None: the ask never ends."""


class Controls:
    def __init__(self, *verified: str) -> None:
        self.verified = verified
        self.stales: list[str] = []

    async def controls(self, domain: str) -> tuple[str, ...]:
        return tuple(a for a in self.verified if a.endswith("@" + domain))

    def stale(self, address: str) -> None:
        self.stales.append(address)


class Primary:
    """Answers each control RCPT from ``answers`` (by address) and records it."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.started = asyncio.Event()

    async def ask(self, path: bytes) -> tuple[Stage, aiosmtplib.SMTPResponse]:
        address = path.decode()
        self.asked.append(address)
        self.started.set()
        answer = self.answers[address]
        if answer is None:
            await asyncio.Event().wait()  # no reply, ever
            raise AssertionError("unreachable")
        if isinstance(answer, BaseException):
            raise answer
        return Stage.RCPT, aiosmtplib.SMTPResponse(*answer)


def book(primary: Primary, controls: Controls) -> EvidenceBook:
    return EvidenceBook(controls, primary.ask, lambda: True, lambda line: None)


def rejected(reply: tuple[int, str]) -> Classification:
    found = classify(Stage.RCPT, *reply)
    assert found.verdict is Verdict.UNKNOWN
    return found


DEAD_ENDS: list[tuple[str, Answer]] = [
    ("421", SessionLost("421 4.3.2 Service shutting down")),
    ("hang-up", aiosmtplib.SMTPServerDisconnected("Connection lost")),
    ("retired", SessionLost("the session was retired")),
    ("4xx", (451, "4.7.500 Server busy. Please try again later")),
]


@pytest.mark.parametrize(("why", "answer"), DEAD_ENDS, ids=[d[0] for d in DEAD_ENDS])
def test_a_control_without_an_answer_leaves_the_domains_rejections_undecided(
    why: str, answer: Answer
) -> None:
    """Probe A's control gets no answer; probe B's 5.1.1 on the same session, judged
    after it, finds nothing left to ask: it must not be taken for unknown (a primary in
    drift refuses everyone)."""
    primary = Primary({"known@example.test": answer, "postmaster@example.test": OK})
    evidence = book(primary, Controls("known@example.test"))

    async def go() -> Classification:
        try:
            first = await evidence.judge_unknown("a@example.test", rejected(EXPLICIT))
        except (SessionLost, aiosmtplib.SMTPServerDisconnected):
            pass
        else:
            assert first.verdict is Verdict.TEMPFAIL, first
        return await evidence.judge_unknown("b@example.test", rejected(EXPLICIT))

    second = asyncio.run(go())
    assert second.verdict is Verdict.TEMPFAIL, second
    assert "known@example.test" in second.why
    assert primary.asked == ["known@example.test"]


def test_a_control_whose_ask_was_given_up_leaves_the_domains_rejections_undecided() -> None:
    """Probe A ran out of time while its control was asked (the reply is slower than the
    probe timeout): probe B, judged next, is undecided."""
    primary = Primary({"known@example.test": None})
    evidence = book(primary, Controls("known@example.test"))

    async def go() -> Classification:
        first = asyncio.create_task(evidence.judge_unknown("a@example.test", rejected(EXPLICIT)))
        second = asyncio.create_task(evidence.judge_unknown("b@example.test", rejected(EXPLICIT)))
        await primary.started.wait()
        first.cancel()  # the probe timeout
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    second = asyncio.run(go())
    assert second.verdict is Verdict.TEMPFAIL, second
    assert primary.asked == ["known@example.test"]


def test_an_answered_control_still_vouches_after_another_went_unanswered() -> None:
    primary = Primary({"u1@example.test": (450, "4.2.0 Try again"), "u2@example.test": OK})
    evidence = book(primary, Controls("u1@example.test", "u2@example.test"))
    found = asyncio.run(evidence.judge_unknown("nobody@example.test", rejected(EXPLICIT)))
    assert (found.verdict, found.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT), found
    assert "u2@example.test was accepted" in found.why


@pytest.mark.parametrize("reply", [EXPLICIT, BARE], ids=["explicit", "bare"])
def test_an_accepted_postmaster_never_overrules_refused_verified_controls(
    reply: tuple[int, str],
) -> None:
    """postmaster@ is an alias on many primaries (virtual_alias_maps, /etc/aliases,
    Debian's Exim ACL): it is accepted while the user table is broken. Two verified
    users refused, postmaster@ accepted: drift, not unknown."""
    primary = Primary(
        {"u1@example.test": EXPLICIT, "u2@example.test": EXPLICIT, "postmaster@example.test": OK}
    )
    controls = Controls("u1@example.test", "u2@example.test")
    evidence = book(primary, controls)

    async def go() -> list[Classification]:
        return [
            await evidence.judge_unknown(f"real{n}@example.test", rejected(reply)) for n in range(2)
        ]

    for found in asyncio.run(go()):
        assert (found.verdict, found.basis) == (Verdict.TEMPFAIL, Basis.DRIFT), found
    assert controls.stales == []
    assert "postmaster@example.test" not in primary.asked  # it can prove nothing here


def test_one_verified_control_refused_and_postmaster_accepted_is_drift() -> None:
    primary = Primary({"u1@example.test": EXPLICIT, "postmaster@example.test": OK})
    controls = Controls("u1@example.test")
    found = asyncio.run(
        book(primary, controls).judge_unknown("real@example.test", rejected(EXPLICIT))
    )
    assert (found.verdict, found.basis) == (Verdict.TEMPFAIL, Basis.DRIFT), found
    assert controls.stales == []


def test_a_probe_of_postmaster_accepted_after_a_refused_control_vouches_for_nothing() -> None:
    primary = Primary({"u1@example.test": EXPLICIT, "postmaster@example.test": OK})
    evidence = book(primary, Controls("u1@example.test"))

    async def go() -> Classification:
        first = await evidence.judge_unknown("real@example.test", rejected(EXPLICIT))
        assert first.basis is Basis.DRIFT
        evidence.accepted("postmaster@example.test")
        return await evidence.judge_unknown("real2@example.test", rejected(EXPLICIT))

    found = asyncio.run(go())
    assert (found.verdict, found.basis) == (Verdict.TEMPFAIL, Basis.DRIFT), found


def test_another_verified_control_accepted_tells_a_removed_user_from_drift() -> None:
    primary = Primary({"u1@example.test": EXPLICIT, "u2@example.test": OK})
    controls = Controls("u1@example.test", "u2@example.test")
    found = asyncio.run(
        book(primary, controls).judge_unknown("nobody@example.test", rejected(EXPLICIT))
    )
    assert (found.verdict, found.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT), found
    assert controls.stales == ["u1@example.test"]


def test_postmaster_vouches_for_a_bare_rejection_when_no_verified_control_was_refused() -> None:
    primary = Primary({"postmaster@example.test": OK})
    found = asyncio.run(
        book(primary, Controls()).judge_unknown("nobody@example.test", rejected(BARE))
    )
    assert (found.verdict, found.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT), found
    assert primary.asked == ["postmaster@example.test"]


def test_postmaster_is_no_evidence_once_a_verified_control_was_refused_at_all() -> None:
    """A verified control refused with another 5xx (not as unknown): postmaster@
    accepted still proves nothing, so a bare rejection is undecided."""
    primary = Primary(
        {"u1@example.test": (550, "5.7.1 Access denied"), "postmaster@example.test": OK}
    )
    found = asyncio.run(
        book(primary, Controls("u1@example.test")).judge_unknown(
            "nobody@example.test", rejected(BARE)
        )
    )
    assert found.verdict is Verdict.TEMPFAIL, found
    assert "postmaster@example.test" not in primary.asked


def test_a_verified_postmaster_is_no_verified_control() -> None:
    """postmaster@ probed through the backup and accepted is in the cache like any
    verified address: offered as a control, it still proves only what postmaster@ does."""
    primary = Primary({"u1@example.test": EXPLICIT, "postmaster@example.test": OK})
    controls = Controls("postmaster@example.test", "u1@example.test")
    found = asyncio.run(
        book(primary, controls).judge_unknown("real@example.test", rejected(EXPLICIT))
    )
    assert (found.verdict, found.basis) == (Verdict.TEMPFAIL, Basis.DRIFT), found
    assert primary.asked == ["u1@example.test"]


CONTROLS_LEFT = [
    # (the controls' answers, the rejection judged, control RCPTs the session may still send)
    ({}, None, 3),  # the domain not judged yet: two verified ones and postmaster@
    ({"u1@example.test": OK}, EXPLICIT, 0),  # vouched: nothing more is asked
    ({"u1@example.test": (450, "4.2.0 Try again")}, EXPLICIT, 0),  # unanswered: none
    ({"u1@example.test": EXPLICIT}, EXPLICIT, 1),  # refused: one more verified, no postmaster@
    ({"postmaster@example.test": EXPLICIT}, BARE, 2),  # no verified yet, postmaster@ spent
]


@pytest.mark.parametrize(("answers", "reply", "left"), CONTROLS_LEFT)
def test_controls_left_bounds_what_a_session_may_still_ask(
    answers: dict[str, Answer], reply: tuple[int, str] | None, left: int
) -> None:
    """What the pool reserves in a reused session's error budget (pool.room_for_one)."""
    verified = [a for a in answers if not a.startswith("postmaster@")]
    evidence = book(Primary(answers), Controls(*verified))
    if reply is not None:
        asyncio.run(evidence.judge_unknown("nobody@example.test", rejected(reply)))
    assert evidence.controls_left("example.test") == left
