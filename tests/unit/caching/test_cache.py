"""The positive cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from callahead.caching.cache import PositiveCache
from tests.unit.clock import Clock


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def test_add_and_contains() -> None:
    cache = PositiveCache(ttl=60, maxsize=10)
    assert "a@example.com" not in cache
    assert len(cache) == 0
    cache.add("a@example.com")
    assert "a@example.com" in cache
    assert "b@example.com" not in cache
    assert len(cache) == 1
    cache.add("a@example.com")
    assert len(cache) == 1


def test_contains_is_exact() -> None:
    cache = PositiveCache(ttl=60, maxsize=10)
    cache.add("User@example.com")
    assert "User@example.com" in cache
    assert "user@example.com" not in cache
    assert 42 not in cache


def test_entry_expires_after_ttl() -> None:
    ttl = 0.05
    cache = PositiveCache(ttl=ttl, maxsize=10)
    added = time.monotonic()
    cache.add("a@example.com")
    assert "a@example.com" in cache
    assert wait_for(lambda: "a@example.com" not in cache)
    assert time.monotonic() - added >= ttl
    assert len(cache) == 0


def test_entry_survives_before_ttl() -> None:
    cache = PositiveCache(ttl=60, maxsize=10)
    cache.add("a@example.com")
    time.sleep(0.01)
    assert "a@example.com" in cache


def test_expiry_with_controlled_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache = PositiveCache(ttl=100, maxsize=10)
    cache.add("a@example.com")
    now[0] += 99
    assert "a@example.com" in cache
    cache.add("b@example.com")
    now[0] += 2
    assert "a@example.com" not in cache
    assert "b@example.com" in cache
    assert len(cache) == 1


def test_maxsize_bounds_the_entries() -> None:
    cache = PositiveCache(ttl=60, maxsize=3)
    for i in range(10):
        cache.add(f"u{i}@example.com")
    assert len(cache) == 3
    assert "u9@example.com" in cache  # the newest is kept
    assert "u0@example.com" not in cache  # the oldest is gone


@pytest.mark.parametrize(("ttl", "maxsize"), [(0, 10), (60, 0), (0, 0)])
def test_zero_disables(ttl: float, maxsize: int) -> None:
    cache = PositiveCache(ttl=ttl, maxsize=maxsize)
    cache.add("a@example.com")
    assert "a@example.com" not in cache
    assert len(cache) == 0


def test_thread_safety_smoke() -> None:
    cache = PositiveCache(ttl=60, maxsize=500)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(300):
                address = f"t{n}-{i}@example.com"
                cache.add(address)
                assert address in cache or len(cache) <= 500
                _ = f"t{(n + 1) % 8}-{i}@example.com" in cache
                assert len(cache) <= 500
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(cache) == 500
    cache.add("after@example.com")
    assert "after@example.com" in cache
    assert len(cache) == 500


def test_remaining_counts_down_and_ends_with_the_entry() -> None:
    clock = Clock()
    cache = PositiveCache(ttl=100, maxsize=10, clock=clock)
    assert cache.remaining("a@example.com") is None
    cache.add("a@example.com")
    assert cache.remaining("a@example.com") == 100
    clock.now += 40
    assert cache.remaining("a@example.com") == 60
    cache.add("a@example.com")  # a new verdict: a new TTL
    assert cache.remaining("a@example.com") == 100
    clock.now += 100
    assert cache.remaining("a@example.com") is None
    assert "a@example.com" not in cache


def test_discard_by_address_domain_and_all() -> None:
    cache = PositiveCache(ttl=100, maxsize=10)
    for address in ("a@example.com", "b@example.com", "a@sub.example.com", "c@example.org"):
        cache.add(address)
    assert cache.discard("a@example.com") is True
    assert cache.discard("a@example.com") is False
    assert cache.discard_domain("example.com") == 1  # b@; not the subdomain
    assert "a@sub.example.com" in cache
    assert cache.discard_domain("nothing.example") == 0
    assert cache.clear() == 2
    assert len(cache) == 0


def test_discard_of_an_expired_entry_says_it_was_not_there() -> None:
    clock = Clock()
    cache = PositiveCache(ttl=10, maxsize=10, clock=clock)
    cache.add("a@example.com")
    clock.now += 11
    assert cache.discard("a@example.com") is False
    assert cache.clear() == 0


def test_snapshot_and_restore_keep_the_time_left_capped_at_the_ttl() -> None:
    clock = Clock()
    cache = PositiveCache(ttl=100, maxsize=10, clock=clock)
    cache.add("old@example.com")
    clock.now += 70
    cache.add("new@example.com")
    assert cache.snapshot() == [("old@example.com", 30), ("new@example.com", 100)]

    other = PositiveCache(ttl=50, maxsize=10, clock=clock)
    taken = other.restore([*cache.snapshot(), ("gone@example.com", -1.0)])
    assert taken == 2
    assert other.remaining("old@example.com") == 30
    assert other.remaining("new@example.com") == 50  # a lowered TTL applies
    assert other.remaining("gone@example.com") is None


def test_restore_into_a_smaller_cache_keeps_the_longest_lived() -> None:
    cache = PositiveCache(ttl=100, maxsize=2)
    assert cache.restore([("a@x.test", 90.0), ("b@x.test", 10.0), ("c@x.test", 50.0)]) == 3
    assert sorted(a for a, _ in cache.snapshot()) == ["a@x.test", "c@x.test"]


def test_a_disabled_cache_keeps_and_restores_nothing() -> None:
    cache = PositiveCache(ttl=0, maxsize=10)
    cache.add("a@example.com")
    assert cache.remaining("a@example.com") is None
    assert cache.restore([("a@example.com", 10.0)]) == 0
    assert cache.stats().enabled is False


def test_recent_addresses_per_domain_are_the_controls() -> None:
    clock = Clock()
    cache = PositiveCache(ttl=60, maxsize=100, clock=clock)
    for local in ("a", "b", "c", "d"):
        cache.add(f"{local}@example.test")
        clock.now += 1
    cache.add("x@other.test")
    # The newest first, at most three, of that domain only.
    assert cache.recent("example.test") == ("d@example.test", "c@example.test", "b@example.test")
    cache.add("b@example.test")  # verified again: the newest now
    assert cache.recent("example.test")[0] == "b@example.test"
    cache.forget_recent("b@example.test")
    assert "b@example.test" in cache  # still trusted, only no control
    assert cache.recent("example.test") == ("d@example.test", "c@example.test")
    cache.discard("d@example.test")
    assert cache.recent("example.test") == ("c@example.test",)
    clock.now += 60  # expired entries are no controls
    assert cache.recent("example.test") == ()
    cache.add("y@other.test")
    assert cache.discard_domain("other.test") == 1
    assert cache.recent("other.test") == ()
    cache.add("z@third.test")
    cache.clear()
    assert cache.recent("third.test") == ()


def test_restored_entries_are_controls_newest_first() -> None:
    cache = PositiveCache(ttl=60, maxsize=100)
    cache.restore([("old@example.test", 10.0), ("new@example.test", 50.0)])
    assert cache.recent("example.test") == ("new@example.test", "old@example.test")
    disabled = PositiveCache(ttl=0, maxsize=100)
    disabled.add("a@example.test")
    assert disabled.recent("example.test") == ()
