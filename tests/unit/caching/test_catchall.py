"""Catch-all detection: the state machine on a fake clock, the checks on a real probe
loop (with an engine the test answers, then with a real engine against scripted
primaries), and what the decision core does with it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace

import pytest

from callahead.caching.cache import PositiveCache
from callahead.caching.catchall import (
    CHECK_PREFIX,
    REFUSED_UNPROVEN,
    SKIPPED,
    CatchAllBook,
    LoopCatchAll,
    check_domain,
)
from callahead.caching.controls import Controls
from callahead.caching.redisstore import RedisStore
from callahead.caching.sharedcache import SharedGate
from callahead.core.policy import Action, Policy, Reason, TempfailAction
from callahead.frontends.metrics import Metrics
from callahead.probing.engine import ProbeEngine
from callahead.probing.loop import LoopProber, ProbeLoop
from callahead.routing.routes import Nexthop, parse_routes
from callahead.smtp.verdict import Basis, ProbeResult, Skip, Stage, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.redis import RedisServer
from tests.harness.scripted import Script
from tests.harness.waiting import wait_for, wait_until
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
    made.cache.add("alice@example.com")  # said "valid" before the catch-all was known
    made.cache.add("bob@example.org")
    made.catchall.check_if_due(".example.com", HOPS)
    made.catchall.check_if_due(".example.com", HOPS)  # already running: nothing more
    address = made.engine.give_next(loop, answer_of(Verdict.VALID))
    match = CHECK.match(address)
    assert match is not None and match.group(1) == "example.com"
    # A recheck, in the background, whose answer the engine neither keeps nor shares.
    assert made.engine.asked == [Asked(address, HOPS, True, True, keep=False)]
    wait_for(lambda: made.outcomes == ["valid"], 5.0)
    assert made.catchall.accepts_all(".example.com")
    assert made.states == [(".example.com", True)]
    assert address not in made.cache  # a made-up address is never kept as valid
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "domain .example.com accepts all" in warnings[0]
    assert "cannot verify" in warnings[0]
    # What the catch-all said "valid" to is no evidence: no entry, no control left.
    assert "1 of its addresses cached as valid are forgotten" in warnings[0]
    assert "alice@example.com" not in made.cache
    assert made.cache.recent("example.com") == ()
    assert "bob@example.org" in made.cache

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


@pytest.mark.parametrize("basis", [Basis.DRIFT, Basis.UNPROVEN])
def test_a_refusal_that_the_evidence_rules_withheld_still_clears_accepts_all(
    made: Made, loop: ProbeLoop, basis: Basis
) -> None:
    """The made-up address refused as unknown, with drift or without a control: still a
    refusal, so the domain no longer accepts all (its recipients are probed again); any
    other undecided answer decides nothing."""
    made.catchall.check_if_due("a.test", HOPS)
    made.engine.give_next(loop, answer_of(Verdict.VALID))
    wait_for(lambda: made.outcomes == ["valid"], 5.0)
    kept = (Basis.TEMPORARY, Basis.PROBER, Basis.SECONDARY, Basis.NO_REPLY)
    for n, other in enumerate(kept, start=2):
        made.clock.now += 3600
        made.catchall.check_if_due("a.test", HOPS)
        made.engine.give_next(loop, replace(answer_of(Verdict.TEMPFAIL), basis=other))
        wait_for(lambda n=n: len(made.outcomes) == n, 5.0)  # type: ignore[misc]
        assert made.outcomes[-1] == "tempfail" and made.catchall.accepts_all("a.test"), other
    made.clock.now += 3600
    made.catchall.check_if_due("a.test", HOPS)
    made.engine.give_next(loop, replace(answer_of(Verdict.TEMPFAIL), basis=basis))
    wait_for(lambda: len(made.outcomes) == len(kept) + 2, 5.0)
    assert made.outcomes[-1] == "unknown"
    assert not made.catchall.accepts_all("a.test")
    assert made.states == [("a.test", True), ("a.test", False)]
    assert basis in REFUSED_UNPROVEN


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


# --- nothing of a check is kept or shared (issue 27, item 1) -----------------------------


class SharedBackup:
    """One backup MX as assembly.py builds it, on the probe loop: a local cache in front
    of a real Redis (SharedGate), controls from both, a real engine and catch-all checks
    on a clock the test moves."""

    def __init__(self, loop: ProbeLoop, redis_url: str) -> None:
        self.loop = loop
        self.clock = Clock()
        self.cache = PositiveCache(ttl=60, maxsize=100)
        self.gate = SharedGate(
            RedisStore(redis_url, timeout=1.0),
            self.cache,
            ttl=86400,
            lock_wait=2.0,
            probe_timeout=5.0,
        )
        self.controls = Controls(self.cache, self.gate)
        self.engine = ProbeEngine(
            probe_settings(), known_valid=self.cache, cluster=self.gate, controls=self.controls
        )
        self.outcomes: list[str] = []
        self.catchall = LoopCatchAll(
            loop,
            self.engine,
            self.cache,
            interval=3600,
            on_check=self.outcomes.append,
            clock=self.clock,
        )

    def check(self, route: str, hops: Sequence[Nexthop]) -> None:
        """Run one check of ``route`` (due now) to its end."""
        count = len(self.outcomes)
        self.catchall.check_if_due(route, hops)
        wait_for(lambda: len(self.outcomes) > count, 10.0)

    def shared_controls(self, domain: str) -> tuple[str, ...]:
        return self.loop.run(self.controls.controls(domain), timeout=5.0)

    def close(self) -> None:
        self.loop.run(self.catchall.aclose(), timeout=5.0)
        self.loop.run(self.engine.aclose(), timeout=5.0)
        self.loop.run(self.gate.aclose(), timeout=5.0)


def test_a_check_publishes_nothing_and_keeps_no_made_up_address(
    scripted: StartScripted, loop: ProbeLoop, redis: RedisServer
) -> None:
    """A primary accepting everything: the made-up address it accepted reaches neither
    Redis (no valid entry, no control, no lock), nor the local cache, nor the controls
    of this backup or of another one."""
    server = scripted(Script(rcpt_default="250 2.1.5 Ok"))
    hops = (Nexthop(server.host, server.port),)
    a, b = SharedBackup(loop, redis.url), SharedBackup(loop, redis.url)
    try:
        a.check("d.test", hops)
        assert a.outcomes == ["valid"] and a.catchall.accepts_all("d.test")
        made_up = [r for r in server.rcpts() if r.startswith(CHECK_PREFIX)]
        assert len(made_up) == 1
        loop.run(settle_gate(a.gate), timeout=5.0)
        assert redis.keys("callahead:*") == 0
        assert made_up[0] not in a.cache and a.cache.recent("d.test") == ()
        assert a.shared_controls("d.test") == ()
        assert b.shared_controls("d.test") == ()
    finally:
        a.close()
        b.close()


def test_a_recheck_clears_accepts_all_once_the_primary_refuses_made_up_addresses(
    scripted: StartScripted, loop: ProbeLoop, redis: RedisServer
) -> None:
    """The catch-all is switched off on a primary without postmaster@: the next check's
    made-up address gets 5.1.1 and, with no control of its own earlier check to refuse
    (which read as drift and kept accepts_all for a CALLAHEAD_CACHE_TTL), the domain is
    verified again at once, on this backup and on another one."""
    server = scripted(Script(rcpt_default="250 2.1.5 Ok"))
    hops = (Nexthop(server.host, server.port),)
    a, b = SharedBackup(loop, redis.url), SharedBackup(loop, redis.url)
    try:
        a.check("d.test", hops)
        b.check("d.test", hops)
        assert a.catchall.accepts_all("d.test") and b.catchall.accepts_all("d.test")
        checks = set(server.rcpts())
        # An hour later, on new sessions (the restart closes the pooled ones).
        server.update(rcpt_default="550 5.1.1 <x@d.test>: Recipient address rejected")
        server.restart()
        for backup in (a, b):
            backup.clock.now += 3600
            before = set(server.rcpts())
            backup.check("d.test", hops)
            assert backup.outcomes == ["valid", "unknown"]
            assert not backup.catchall.accepts_all("d.test")
            # Its own made-up address, and no earlier one asked as a control.
            (asked,) = set(server.rcpts()) - before
            assert CHECK.match(asked) and asked not in checks
        assert redis.keys("callahead:*") == 0
    finally:
        a.close()
        b.close()


def test_a_recheck_behind_a_control_of_the_catch_all_era_clears_accepts_all(
    scripted: StartScripted, loop: ProbeLoop, redis: RedisServer
) -> None:
    """A recipient verified while the primary accepted everything (before the first
    check decided) is every backup's control; once the catch-all goes, the primary
    refuses it, so the next check reads as drift. Its made-up address was refused all
    the same: the domain is verified again (and its unknowns stay undecided, drift)."""
    server = scripted(Script(rcpt_default="250 2.1.5 Ok"))
    hops = (Nexthop(server.host, server.port),)
    a, b = SharedBackup(loop, redis.url), SharedBackup(loop, redis.url)
    try:
        ghost = loop.run(b.engine.probe("ghost@d.test", hops), timeout=10.0)
        assert ghost.verdict is Verdict.VALID
        loop.run(settle_gate(b.gate), timeout=5.0)
        assert a.shared_controls("d.test") == ("ghost@d.test",)
        a.check("d.test", hops)
        assert a.catchall.accepts_all("d.test")
        server.update(rcpt_default="550 5.1.1 <x@d.test>: Recipient address rejected")
        server.restart()
        a.clock.now += 3600
        a.check("d.test", hops)
        assert "ghost@d.test" in server.rcpts()[-3:]  # asked as the control, refused
        assert a.outcomes == ["valid", "unknown"]
        assert not a.catchall.accepts_all("d.test")
    finally:
        a.close()
        b.close()


async def settle_gate(gate: SharedGate) -> None:
    """Let the gate's background writes to Redis (if any) finish."""
    await wait_until(lambda: not gate._tasks, what="background writes")
