"""Refresh ahead on a real probe loop, with an engine whose probes the test answers."""

from __future__ import annotations

from callahead.caching.cache import PositiveCache
from callahead.caching.refresh import SKIPPED, LoopRefresher, refresh_limit
from callahead.probing.loop import ProbeLoop
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import ProbeResult, Skip, Verdict
from tests.harness.waiting import wait_for
from tests.unit.engines import AnsweredEngine

HOPS = (Nexthop("127.0.0.1", 2525),)


def make(
    probe_loop: ProbeLoop, limit: int = 2
) -> tuple[LoopRefresher, AnsweredEngine, PositiveCache, list[str]]:
    engine = AnsweredEngine()
    cache = PositiveCache(ttl=100, maxsize=10)
    outcomes: list[str] = []
    refresher = LoopRefresher(probe_loop, engine, cache, limit=limit, on_outcome=outcomes.append)
    return refresher, engine, cache, outcomes


def test_unknown_forgets_the_address_and_valid_keeps_it(probe_loop: ProbeLoop) -> None:
    refresher, engine, cache, outcomes = make(probe_loop)
    cache.add("gone@x.test")
    cache.add("kept@x.test")
    refresher.refresh("gone@x.test", HOPS)
    refresher.refresh("kept@x.test", HOPS)
    wait_for(lambda: engine.waiting("gone@x.test") and engine.waiting("kept@x.test"), 5.0)
    assert sorted((a.address, a.recheck) for a in engine.asked) == [
        ("gone@x.test", True),
        ("kept@x.test", True),
    ]
    assert [a.background for a in engine.asked] == [True, True]  # never waits for a budget token

    engine.answer(probe_loop, "gone@x.test", Verdict.UNKNOWN)
    engine.answer(probe_loop, "kept@x.test", Verdict.VALID)
    wait_for(lambda: len(outcomes) == 2, 5.0)
    assert sorted(outcomes) == ["unknown", "valid"]
    assert "gone@x.test" not in cache
    assert "kept@x.test" in cache
    assert refresher.pending == 0


def test_an_undecided_refresh_leaves_the_entry_to_expire(probe_loop: ProbeLoop) -> None:
    refresher, engine, cache, outcomes = make(probe_loop)
    cache.add("a@x.test")
    refresher.refresh("a@x.test", HOPS)
    wait_for(lambda: engine.waiting("a@x.test"), 5.0)
    engine.answer(probe_loop, "a@x.test", Verdict.TEMPFAIL)
    wait_for(lambda: outcomes == ["tempfail"], 5.0)
    assert "a@x.test" in cache


def test_a_refresh_over_the_primary_budget_counts_as_skipped(probe_loop: ProbeLoop) -> None:
    refresher, engine, cache, outcomes = make(probe_loop)
    cache.add("a@x.test")
    refresher.refresh("a@x.test", HOPS)
    wait_for(lambda: engine.waiting("a@x.test"), 5.0)
    engine.give(probe_loop, "a@x.test", ProbeResult.not_probed(Skip.PRIMARY_BUDGET, HOPS, "budget"))
    wait_for(lambda: outcomes == [SKIPPED], 5.0)
    assert "a@x.test" in cache


def test_one_refresh_per_address_and_at_most_limit_at_once(probe_loop: ProbeLoop) -> None:
    refresher, engine, _, outcomes = make(probe_loop, limit=2)
    refresher.refresh("a@x.test", HOPS)
    refresher.refresh("a@x.test", HOPS)  # already in flight: nothing more
    refresher.refresh("b@x.test", HOPS)
    refresher.refresh("c@x.test", HOPS)  # over the limit
    assert outcomes == [SKIPPED]
    wait_for(lambda: engine.waiting("a@x.test") and engine.waiting("b@x.test"), 5.0)
    assert sorted(a.address for a in engine.asked) == ["a@x.test", "b@x.test"]
    engine.answer(probe_loop, "a@x.test", Verdict.VALID)
    wait_for(lambda: refresher.pending == 1, 5.0)
    refresher.refresh("c@x.test", HOPS)  # room again
    wait_for(lambda: engine.waiting("c@x.test"), 5.0)
    probe_loop.run(refresher.aclose(), timeout=5.0)  # the ones still waiting


def test_no_refresh_without_a_free_probe_slot(probe_loop: ProbeLoop) -> None:
    refresher, engine, _, outcomes = make(probe_loop)
    engine.free = False
    refresher.refresh("a@x.test", HOPS)
    wait_for(lambda: outcomes == [SKIPPED], 5.0)
    assert engine.asked == []
    assert refresher.pending == 0


def test_the_refreshes_in_flight_are_cancelled_at_shutdown(probe_loop: ProbeLoop) -> None:
    refresher, engine, _, _ = make(probe_loop)
    refresher.refresh("a@x.test", HOPS)
    wait_for(lambda: engine.waiting("a@x.test"), 5.0)
    probe_loop.run(refresher.aclose(), timeout=5.0)
    assert refresher.pending == 0


def test_the_limit_is_a_small_share_of_the_probe_budget() -> None:
    assert refresh_limit(64) == 6
    assert refresh_limit(1) == 1
