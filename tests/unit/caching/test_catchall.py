"""Catch-all detection: the state machine on a fake clock, the checks on a real probe
loop (with an engine the test answers, then with a real engine against scripted
primaries), and what the decision core does with it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import pytest

from callahead.caching.cache import PositiveCache
from callahead.caching.catchall import (
    CHECK_PREFIX,
    SKIPPED,
    CatchAllBook,
    LoopCatchAll,
    check_domain,
)
from callahead.core.policy import Action, Policy, Reason, TempfailAction
from callahead.frontends.metrics import Metrics
from callahead.probing.engine import ProbeEngine
from callahead.probing.loop import LoopProber, ProbeLoop
from callahead.routing.routes import Nexthop, parse_routes
from callahead.smtp.verdict import ProbeResult, Skip, Stage, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script
from tests.harness.waiting import wait_for
from tests.unit.clock import Clock
from tests.unit.engines import AnsweredEngine, Asked, answer_of
from tests.unit.probers import SyncProber
from tests.unit.settings import probe_settings

HOPS = (Nexthop("127.0.0.1", 2525),)
CHECK = re.compile(rf"^{CHECK_PREFIX}[0-9a-f]{{24}}@(.+)$")


# --- the state machine ------------------------------------------------------------------


def test_a_domain_is_checked_at_first_use_then_once_per_interval() -> None:
    clock = Clock()
    book = CatchAllBook(3600, clock=clock)
    assert not book.accepts_all("example.com")
    assert book.claim("example.com")
    assert not book.claim("example.com")  # one check at a time
    assert book.settle("example.com", Verdict.VALID) is True
    assert book.accepts_all("example.com")
    assert not book.claim("example.com")
    clock.now += 3599
    assert not book.claim("example.com")
    clock.now += 1
    assert book.claim("example.com")
    assert book.accepts_all("example.com")  # still, while the new check runs
    assert book.settle("example.com", Verdict.UNKNOWN) is False
    assert not book.accepts_all("example.com")
    assert book.states() == {"example.com": False}


def test_an_undecided_or_skipped_check_keeps_the_state_and_comes_back_sooner() -> None:
    clock = Clock()
    book = CatchAllBook(3600, retry=60, clock=clock)
    assert book.claim("a.test")
    assert book.settle("a.test", None) is None  # skipped: nothing known yet
    assert book.states() == {}
    clock.now += 59
    assert not book.claim("a.test")
    clock.now += 1
    assert book.claim("a.test")
    book.settle("a.test", Verdict.VALID)
    clock.now += 3600
    assert book.claim("a.test")
    assert book.settle("a.test", Verdict.TEMPFAIL) is None
    assert book.accepts_all("a.test")  # a tempfail says nothing either way
    clock.now += 60
    assert book.claim("a.test")


def test_the_retry_is_never_later_than_the_interval() -> None:
    clock = Clock()
    book = CatchAllBook(10, retry=60, clock=clock)
    book.claim("a.test")
    book.settle("a.test", Verdict.TEMPFAIL)
    clock.now += 10
    assert book.claim("a.test")


def test_domains_are_independent() -> None:
    book = CatchAllBook(3600, clock=Clock())
    book.claim("a.test")
    book.settle("a.test", Verdict.VALID)
    assert book.claim(".b.test")
    assert not book.accepts_all(".b.test")
    assert book.states() == {"a.test": True}


def test_a_parent_entry_is_checked_at_the_parent_domain_itself() -> None:
    assert check_domain("example.com") == "example.com"
    assert check_domain(".example.com") == "example.com"


# --- the checks on a probe loop, with an engine the test answers -------------------------


@pytest.fixture
def loop(probe_loop: ProbeLoop) -> ProbeLoop:
    """The shared running probe loop (conftest.py), under the name these tests use."""
    return probe_loop


class Made:
    def __init__(self, loop: ProbeLoop) -> None:
        self.clock = Clock()
        self.cache = PositiveCache(ttl=100, maxsize=10)
        self.engine = AnsweredEngine(self.cache)
        self.outcomes: list[str] = []
        self.states: list[tuple[str, bool]] = []
        self.catchall = LoopCatchAll(
            loop,
            self.engine,
            self.cache,
            interval=3600,
            on_check=self.outcomes.append,
            on_state=lambda route, state: self.states.append((route, state)),
            clock=self.clock,
        )


@pytest.fixture
def made(loop: ProbeLoop) -> Made:
    """A catch-all checker on the shared loop, with an engine the test answers."""
    return Made(loop)


def test_an_accept_all_primary_is_detected_logged_once_and_rechecked(
    made: Made, loop: ProbeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="callahead.catchall")
    made.catchall.check_if_due(".example.com", HOPS)
    made.catchall.check_if_due(".example.com", HOPS)  # already running: nothing more
    address = made.engine.give_next(loop, answer_of(Verdict.VALID))
    match = CHECK.match(address)
    assert match is not None and match.group(1) == "example.com"
    assert made.engine.asked == [Asked(address, HOPS, True, True)]  # recheck, in the background
    wait_for(lambda: made.outcomes == ["valid"], 5.0)
    assert made.catchall.accepts_all(".example.com")
    assert made.states == [(".example.com", True)]
    assert address not in made.cache  # a made-up address is never kept as valid
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "domain .example.com accepts all" in warnings[0]
    assert "cannot verify" in warnings[0]

    # Not due again within the interval; then the same answer logs nothing new.
    made.catchall.check_if_due(".example.com", HOPS)
    assert len(made.engine.asked) == 1
    made.clock.now += 3600
    made.catchall.check_if_due(".example.com", HOPS)
    second = made.engine.give_next(loop, answer_of(Verdict.VALID))
    assert second != address
    wait_for(lambda: len(made.outcomes) == 2, 5.0)
    assert len(caplog.records) == 1

    # The catch-all goes: the next check says so, once.
    made.clock.now += 3600
    made.catchall.check_if_due(".example.com", HOPS)
    made.engine.give_next(loop, answer_of(Verdict.UNKNOWN))
    wait_for(lambda: len(made.outcomes) == 3, 5.0)
    assert not made.catchall.accepts_all(".example.com")
    assert made.states[-1] == (".example.com", False)
    assert "no longer accepts all" in caplog.records[-1].getMessage()


def test_a_normal_primary_is_not_flagged_and_a_tempfail_changes_nothing(
    made: Made, loop: ProbeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="callahead.catchall")
    made.catchall.check_if_due("a.test", HOPS)
    made.engine.give_next(loop, answer_of(Verdict.UNKNOWN))
    wait_for(lambda: made.outcomes == ["unknown"], 5.0)
    assert not made.catchall.accepts_all("a.test")
    assert made.states == [("a.test", False)]
    made.clock.now += 3600
    made.catchall.check_if_due("a.test", HOPS)
    made.engine.give_next(loop, answer_of(Verdict.TEMPFAIL))
    wait_for(lambda: made.outcomes == ["unknown", "tempfail"], 5.0)
    assert made.states == [("a.test", False)]
    assert caplog.records == []


def test_a_check_is_skipped_without_a_free_slot_or_a_budget_token(
    made: Made, loop: ProbeLoop
) -> None:
    made.engine.free = False
    made.catchall.check_if_due("a.test", HOPS)
    wait_for(lambda: made.outcomes == [SKIPPED], 5.0)
    assert made.engine.asked == []
    made.engine.free = True
    made.clock.now += 60  # tried again a minute later
    made.catchall.check_if_due("a.test", HOPS)
    made.engine.give_next(loop, ProbeResult.not_probed(Skip.PRIMARY_BUDGET, HOPS, "budget"))
    wait_for(lambda: made.outcomes == [SKIPPED, SKIPPED], 5.0)
    assert made.states == []


def test_the_checks_in_flight_are_cancelled_at_shutdown(made: Made, loop: ProbeLoop) -> None:
    made.catchall.check_if_due("a.test", HOPS)
    wait_for(made.engine.waiting, 5.0)
    loop.run(made.catchall.aclose(), timeout=5.0)
    assert made.outcomes == [SKIPPED]


# --- the decision core --------------------------------------------------------------------


class FakeCatchAll:
    def __init__(self, accepting: set[str]) -> None:
        self.accepting = accepting
        self.asked: list[str] = []

    def accepts_all(self, route: str) -> bool:
        return route in self.accepting

    def check_if_due(self, route: str, hops: Sequence[Nexthop]) -> None:
        self.asked.append(route)


class CountingProber(SyncProber):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        self.calls.append(address)
        return ProbeResult(Verdict.UNKNOWN, Stage.RCPT, 550, "5.1.1 unknown", 0.01, "mx")


@pytest.mark.parametrize("action", list(TempfailAction))
def test_recipients_of_an_accept_all_domain_are_accepted_without_a_probe(
    action: TempfailAction,
) -> None:
    prober = CountingProber()
    catchall = FakeCatchAll({"all.test", ".sub.test"})
    cache = PositiveCache(ttl=100, maxsize=10)
    cache.add("known@all.test")
    policy = Policy(
        routes=parse_routes("all.test=[mx] .sub.test=[mx] plain.test=[mx]"),
        cache=cache,
        prober=prober,
        tempfail_action=action,
        catchall=catchall,
    )
    for rcpt in ("<ghost@all.test>", "<ghost@x.sub.test>"):
        decision = policy.decide(rcpt)
        assert (decision.action, decision.reason) == (Action.ACCEPT, Reason.ACCEPTS_ALL)
        assert decision.reply is None and decision.probe is None
    assert policy.decide("<known@all.test>").reason is Reason.CACHE_HIT
    assert policy.decide("<ghost@plain.test>").reason is Reason.PROBE_UNKNOWN
    assert policy.decide("<ghost@unrouted.test>").reason is Reason.UNROUTED
    assert prober.calls == ["ghost@plain.test"]
    # Every routed recipient, cached or not, lets a due check start: by route entry.
    assert catchall.asked == ["all.test", ".sub.test", "all.test", "plain.test"]


# --- end to end on a real engine against scripted primaries --------------------------------


@pytest.mark.parametrize("accepts_all", [True, False])
def test_checks_through_the_engine_against_a_scripted_primary(
    scripted: StartScripted, loop: ProbeLoop, accepts_all: bool
) -> None:
    """A primary that accepts every address is detected, and then its recipients reach
    it no more; a normal one is not, and every recipient is probed."""
    server = scripted(
        Script(
            rcpt_default="250 2.1.5 Ok" if accepts_all else "550 5.1.1 User unknown",
            users=frozenset({"u1@d.test"}),
        )
    )
    metrics = Metrics()
    cache = PositiveCache(ttl=100, maxsize=10)
    engine = ProbeEngine(probe_settings(), metrics, known_valid=cache)
    catchall = LoopCatchAll(
        loop,
        engine,
        cache,
        interval=3600,
        on_check=metrics.catchall_checked,
        on_state=metrics.domain_state,
    )
    policy = Policy(
        routes=parse_routes(f"d.test=[{server.host}]:{server.port}"),
        cache=cache,
        prober=LoopProber(loop, engine),
        tempfail_action=TempfailAction.DEFER,
        catchall=catchall,
    )
    try:
        first = policy.decide("<u1@d.test>")  # probed; the check starts beside it
        assert first.reason is Reason.PROBE_VALID
        gauge = "callahead_domain_accepts_all"
        wait_for(
            lambda: metrics.registry.get_sample_value(gauge, {"domain": "d.test"}) is not None,
            5.0,
        )
        assert metrics.registry.get_sample_value(gauge, {"domain": "d.test"}) == float(accepts_all)
        checks = [a for a in server.rcpts() if a.startswith(CHECK_PREFIX)]
        assert len(checks) == 1 and CHECK.match(checks[0])
        assert checks[0] not in cache

        before = len(server.rcpts())
        later = [policy.decide(f"<ghost{n}@d.test>") for n in range(3)]
        if accepts_all:
            assert {(d.action, d.reason) for d in later} == {(Action.ACCEPT, Reason.ACCEPTS_ALL)}
            assert len(server.rcpts()) == before  # no per-address probe any more
        else:
            assert {(d.action, d.reason) for d in later} == {(Action.REJECT, Reason.PROBE_UNKNOWN)}
            assert len(server.rcpts()) > before
        outcome = "valid" if accepts_all else "unknown"
        assert (
            metrics.registry.get_sample_value(
                "callahead_catchall_checks_total", {"outcome": outcome}
            )
            == 1.0
        )
    finally:
        loop.run(catchall.aclose(), timeout=5.0)
        loop.run(engine.aclose(), timeout=5.0)
