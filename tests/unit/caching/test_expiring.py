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


def test_put_again_with_an_equal_expiry_is_still_the_live_entry() -> None:
    # Within the clock's resolution two puts have equal expiries: the stale one must
    # not be taken for the live one (identity, not equality).
    clock = Clock()
    entries = ExpiringMap(1, clock)
    entries.put("a", clock.now + 5)
    entries.put("a", clock.now + 5)
    entries.put("b", clock.now + 5)  # full: the live "a" goes, not a stale copy
    assert entries.get("a") is None
    assert entries.get("b") is not None
    assert len(entries) == 1


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


def test_an_out_of_order_entry_is_never_answered_after_its_expiry() -> None:
    clock = Clock()
    entries = ExpiringMap(10, clock)
    entries.put("late", clock.now + 100)
    entries.put("early", clock.now + 10)  # restored from Redis with 10 s left
    clock.now += 10
    assert entries.get("early") is None
    assert entries.get("late") is not None
    assert [key for key, _ in entries.items()] == ["late"]


def test_an_already_expired_put_removes_the_entry() -> None:
    clock = Clock()
    entries = ExpiringMap(10, clock)
    entries.put("a", clock.now + 10)
    entries.put("a", clock.now)
    assert entries.get("a") is None
    assert len(entries) == 0


def test_the_deques_stay_bounded_and_in_expiry_order_under_churn() -> None:
    clock = Clock()
    entries = ExpiringMap(100, clock)
    rng = random.Random(7)
    live: dict[str, float] = {}
    for step in range(20 * COMPACT_SLACK):
        key = f"k{rng.randrange(50)}"
        expires = clock.now + rng.uniform(1, 1000)  # in and out of order
        entries.put(key, expires)
        live[key] = expires
        if step % 7 == 0:
            gone = f"k{rng.randrange(50)}"
            entries.pop(gone)
            live.pop(gone, None)
        clock.now += 0.01
        live = {k: e for k, e in live.items() if clock.now < e}
        assert len(entries._keys) <= 2 * len(entries._expiry) + COMPACT_SLACK + 1
    assert dict(entries.items()) == live
