"""caching/controls.py: where a session's controls come from (the local cache, then
Redis, then the operator's CALLAHEAD_CONTROLS), and what the evidence rules make of an
operator's control behind a primary that answers with bare codes and has no postmaster@
(issue 27, item 6). The session's ``ask`` is a fake (no SMTP); the replies are Exim's
(``550 Unrouteable address``: exim src/verify.c, ``acl_check_rcpt``'s verify failure
for a local domain without the user) and Postfix's."""

from __future__ import annotations

import asyncio
import logging

import aiosmtplib
import pytest

from callahead.caching.cache import PositiveCache
from callahead.caching.catchall import check_address
from callahead.caching.controls import Controls
from callahead.smtp.classify import classify
from callahead.smtp.evidence import EvidenceBook
from callahead.smtp.verdict import Basis, Stage, Verdict

BARE_UNKNOWN = (550, "Unrouteable address")
EXIM_ACCEPT = (250, "Accepted")
"""Exim's RCPT accept (src/smtp_in.c: ``250 Accepted``)."""


class Shared:
    def __init__(self, address: str | None) -> None:
        self.address = address
        self.asked: list[str] = []

    async def recent_valid(self, domain: str) -> str | None:
        self.asked.append(domain)
        return self.address


def cache(*addresses: str) -> PositiveCache:
    positive = PositiveCache(ttl=3600, maxsize=100)
    for address in addresses:
        positive.add(address)
    return positive


def test_the_local_cache_comes_first_then_redis_then_the_operators() -> None:
    asyncio.run(_sources())


async def _sources() -> None:
    configured = ("it@example.com", "abuse@example.com", "ops@example.net")
    local = Controls(cache("anna@example.com"), Shared("bob@example.com"), configured)
    assert await local.controls("example.com") == ("anna@example.com",)
    shared = Controls(cache(), Shared("bob@example.com"), configured)
    assert await shared.controls("example.com") == ("bob@example.com",)
    none_verified = Controls(cache(), Shared(None), configured)
    assert await none_verified.controls("example.com") == ("it@example.com", "abuse@example.com")
    assert await none_verified.controls("example.net") == ("ops@example.net",)
    assert await none_verified.controls("example.org") == ()
    assert await Controls(cache(), None, configured).controls("example.com") == (
        "it@example.com",
        "abuse@example.com",
    )


def test_a_catchall_check_address_in_redis_gives_way_to_the_operators() -> None:
    made_up = check_address("example.com")
    controls = Controls(cache(), Shared(made_up), ("it@example.com",))
    assert asyncio.run(controls.controls("example.com")) == ("it@example.com",)


def test_a_refused_operators_control_is_kept_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    local = cache("anna@example.com")
    controls = Controls(local, None, ("it@example.com",))
    with caplog.at_level(logging.WARNING, logger="callahead.controls"):
        controls.stale("it@example.com")
        controls.stale("it@example.com")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1
    assert "CALLAHEAD_CONTROLS names <it@example.com>" in said[0]
    controls.stale("anna@example.com")
    assert local.recent("example.com") == ()


class Primary:
    """Answers control RCPTs by address, and records them."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def ask(self, path: bytes) -> tuple[Stage, aiosmtplib.SMTPResponse]:
        self.asked.append(path.decode())
        return Stage.RCPT, aiosmtplib.SMTPResponse(*self.answers[path.decode()])


NO_POSTMASTER = {"postmaster@example.com": BARE_UNKNOWN}


def judge(controls: Controls, primary: Primary, address: str) -> tuple[Verdict, Basis]:
    return asyncio.run(_judge(controls, primary, address))


async def _judge(controls: Controls, primary: Primary, address: str) -> tuple[Verdict, Basis]:
    book = EvidenceBook(controls, primary.ask, lambda: True, lambda line: None)
    found = await book.judge_unknown(address, classify(Stage.RCPT, *BARE_UNKNOWN))
    return found.verdict, found.basis


def test_without_a_control_a_bare_rejection_is_undecided() -> None:
    """The protection gap item 6 names: no user verified yet, no postmaster@."""
    primary = Primary(NO_POSTMASTER)
    verdict, _ = judge(Controls(cache(), None), primary, "nobody@example.com")
    assert verdict is Verdict.TEMPFAIL
    assert primary.asked == ["postmaster@example.com"]


def test_an_operators_control_accepted_makes_a_bare_rejection_unknown() -> None:
    primary = Primary({"it@example.com": EXIM_ACCEPT, **NO_POSTMASTER})
    controls = Controls(cache(), Shared(None), ("it@example.com",))
    verdict, _ = judge(controls, primary, "nobody@example.com")
    assert verdict is Verdict.UNKNOWN
    assert primary.asked == ["it@example.com"]


def test_an_operators_control_refused_is_drift_not_unknown() -> None:
    """A primary refusing the operator's known user too is not judging recipients."""
    primary = Primary({"it@example.com": BARE_UNKNOWN, **NO_POSTMASTER})
    controls = Controls(cache(), None, ("it@example.com",))
    verdict, basis = judge(controls, primary, "nobody@example.com")
    assert verdict is Verdict.TEMPFAIL
    assert basis is Basis.DRIFT


def test_a_probe_of_the_operators_control_itself_is_not_vouched_for_by_it() -> None:
    primary = Primary(NO_POSTMASTER)
    controls = Controls(cache(), None, ("it@example.com",))
    verdict, _ = judge(controls, primary, "it@example.com")
    assert verdict is Verdict.TEMPFAIL
    assert "it@example.com" not in primary.asked
