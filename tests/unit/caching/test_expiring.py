"""The positive cache's map of addresses to expiries (caching/expiring.py)."""

from __future__ import annotations

import random

from callahead.caching.expiring import COMPACT_SLACK, ExpiringMap
from tests.unit.clock import Clock


def test_an_entry_lives_until_its_expiry_and_no_longer() -> None:
    clock = Clock()
    entries = ExpiringMap(10, clock)
    entries.put("a", clock.now + 5)
    assert entries.get("a") == clock.now + 5
    clock.now += 4.999
    assert entries.get("a") is not None
    clock.now += 0.001
    assert entries.get("a") is None
    assert len(entries) == 0


def test_put_again_gives_a_new_expiry_and_the_old_one_never_removes_it() -> None:
    clock = Clock()
    entries = ExpiringMap(10, clock)
    entries.put("a", clock.now + 5)
    clock.now += 3
    entries.put("a", clock.now + 5)  # the old deque entry (expiry +5) is now stale
    clock.now += 3  # past the first expiry: its stale entry leaves the front
    assert len(entries) == 1
    assert entries.get("a") == clock.now + 2


def test_when_full_the_entry_nearest_its_expiry_goes() -> None:
    clock = Clock()
    entries = ExpiringMap(3, clock)
    for i, key in enumerate("abcd"):
        entries.put(key, clock.now + 10 + i)
    assert sorted(entries) == ["b", "c", "d"]


def test_a_discarded_entry_is_gone_and_its_stale_slot_does_not_count() -> None:
    clock = Clock()
    entries = ExpiringMap(2, clock)
    entries.put("a", clock.now + 10)
    assert entries.pop("a") is True
    assert entries.pop("a") is False
    entries.put("b", clock.now + 11)
    entries.put("c", clock.now + 12)
    assert sorted(entries) == ["b", "c"]  # a's stale slot took nobody's place


def test_an_out_of_order_entry_expires_on_time_and_is_not_counted_after() -> None:
    clock = Clock()
    entries = ExpiringMap(10, clock)
    entries.put("late", clock.now + 100)
    entries.put("early", clock.now + 10)  # restored from Redis with 10 s left
    assert len(entries) == 2
    clock.now += 10
    assert entries.get("early") is None
    assert entries.get("late") is not None
    assert [key for key, _ in entries.items()] == ["late"]
    assert len(entries) == 1  # the callahead_cache_entries gauge: exact


def test_when_full_an_out_of_order_entry_nearer_its_expiry_goes_first() -> None:
    clock = Clock()
    entries = ExpiringMap(2, clock)
    entries.put("a", clock.now + 100)
    entries.put("b", clock.now + 60)  # out of order, but live
    entries.put("c", clock.now + 100)
    assert sorted(entries) == ["a", "c"]


def test_an_expired_out_of_order_entry_never_costs_a_live_one_its_place() -> None:
    clock = Clock()
    entries = ExpiringMap(2, clock)
    entries.put("a", clock.now + 100)
    entries.put("b", clock.now + 10)
    clock.now += 50  # b has expired
    entries.put("c", clock.now + 100)
    assert sorted(entries) == ["a", "c"]
    assert len(entries) == 2


def test_slots_left_by_entries_put_again_are_compacted() -> None:
    # Live entries at the front of the deques and at the top of the heap keep the stale
    # slots behind them from being dropped as they come to the front.
    clock = Clock()
    entries = ExpiringMap(100, clock)
    entries.put("anchor", clock.now + 1000)
    entries.put("heap-anchor", clock.now + 400)  # out of order: the heap's top
    for step in range(5 * COMPACT_SLACK):
        entries.put(f"k{step % 10}", clock.now + 1000)  # in order, behind "anchor"
        entries.put(f"l{step % 10}", clock.now + 500)  # out of order, under "heap-anchor"
        clock.now += 0.001
        held = len(entries._keys) + len(entries._late)
        assert held <= 2 * len(entries._expiry) + COMPACT_SLACK
    assert len(entries) == 22


def test_under_churn_it_holds_what_a_plain_model_holds() -> None:
    """Random puts (in and out of order), discards and time against a dict that
    expires and evicts by scanning everything."""
    clock = Clock()
    maxsize = 20
    entries = ExpiringMap(maxsize, clock)
    rng = random.Random(7)
    model: dict[str, float] = {}
    for step in range(5000):
        model = {k: e for k, e in model.items() if clock.now < e}
        key = f"k{rng.randrange(50)}"
        expires = clock.now + rng.uniform(1, 100)
        entries.put(key, expires)
        model[key] = expires
        while len(model) > maxsize:
            del model[min(model, key=model.__getitem__)]
        if step % 7 == 0:
            gone = f"k{rng.randrange(50)}"
            assert entries.pop(gone) == (gone in model)
            model.pop(gone, None)
        clock.now += rng.uniform(0, 0.5)
        model = {k: e for k, e in model.items() if clock.now < e}
        assert dict(entries.items()) == model
        assert len(entries) == len(model)
