"""When each address was last judged (freshness.py), with a fake clock."""

from __future__ import annotations

from callahead.probing.freshness import LastJudged
from tests.unit.clock import Clock


def test_unjudged_address_takes_any_session() -> None:
    judged = LastJudged(10, clock=Clock())
    assert judged.since("a@example.test") == float("-inf")


def test_judged_address_needs_a_session_opened_after_the_judgment() -> None:
    clock = Clock()
    judged = LastJudged(10, clock=clock)
    judged.record("a@example.test")
    clock.now += 3
    assert judged.since("a@example.test") == 1000.0
    assert judged.since("b@example.test") == float("-inf")
    judged.record("a@example.test")  # judged again: the newer moment counts
    assert judged.since("a@example.test") == 1003.0


def test_a_judgment_older_than_max_age_is_forgotten() -> None:
    """Every session is younger than max_age, so an older judgment constrains none."""
    clock = Clock()
    judged = LastJudged(10, clock=clock)
    judged.record("a@example.test")
    clock.now += 10.5
    assert judged.since("a@example.test") == float("-inf")
    assert len(judged) == 0


def test_overflow_never_makes_it_less_strict() -> None:
    """Addresses dropped for room leave a watermark that every unlisted address must
    beat: at worst a session is not reused, never a stale one used."""
    clock = Clock()
    judged = LastJudged(10, maxsize=3, clock=clock)
    for n in range(5):
        judged.record(f"a{n}@example.test")
        clock.now += 1
    assert len(judged) == 3
    # a0 and a1 were dropped; a1 was judged at 1001.
    assert judged.since("a0@example.test") == 1001.0
    assert judged.since("never@example.test") == 1001.0
    assert judged.since("a4@example.test") == 1004.0
    clock.now = 1001.0 + 10.5  # the watermark is older than max_age now
    assert judged.since("never@example.test") == float("-inf")
