"""The probe budget's token bucket, on a fake clock (and on asyncio's, for ``take``)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callahead.probing.budget import TokenBucket, burst_for
from tests.unit.clock import Clock


def test_the_burst_is_a_second_worth_and_at_least_one() -> None:
    assert burst_for(5) == 5
    assert burst_for(0.2) == 1
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_a_full_bucket_gives_its_burst_at_once_then_one_token_per_interval() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, clock=clock)
    assert [bucket.reserve(0.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.reserve(0.0) is None  # nothing taken: a refusal costs no token
    assert bucket.reserve(0.0) is None
    clock.now += 0.5
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) is None


def test_waiters_are_served_in_order_and_refused_at_once_beyond_the_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, clock=clock)
    bucket.reserve(0.0)
    bucket.reserve(0.0)
    assert bucket.reserve(1.0) == pytest.approx(0.5)
    assert bucket.reserve(1.0) == pytest.approx(1.0)
    assert bucket.reserve(1.0) is None  # its token would come at 1.5 s
    clock.now += 0.25
    assert bucket.reserve(1.0) is None
    assert bucket.reserve(2.0) == pytest.approx(1.25)


def test_a_refund_gives_the_reserved_token_to_the_next_caller() -> None:
    clock = Clock()
    bucket = TokenBucket(1.0, clock=clock)
    bucket.reserve(0.0)
    assert bucket.reserve(5.0) == pytest.approx(1.0)
    bucket.refund()
    assert bucket.reserve(5.0) == pytest.approx(1.0)
    bucket.refund()
    bucket.refund()  # never more than the burst
    assert bucket.tokens == 1.0


@given(
    rate=st.floats(0.5, 50),
    steps=st.lists(st.tuples(st.floats(0, 2), st.floats(0, 3)), min_size=1, max_size=60),
)
def test_no_stretch_of_time_gets_more_than_the_burst_plus_the_rate(
    rate: float, steps: list[tuple[float, float]]
) -> None:
    """Whatever the callers ask, the moments at which their tokens are there (and their
    probes may go) never exceed ``burst + rate * t`` within any ``t``."""
    clock = Clock()
    bucket = TokenBucket(rate, clock=clock)
    uses: list[float] = []
    for advance, max_wait in steps:
        clock.now += advance
        wait = bucket.reserve(max_wait)
        if wait is not None:
            uses.append(clock.now + wait)
    uses.sort()
    for i in range(len(uses)):
        for j in range(i, len(uses)):
            assert j - i + 1 <= bucket.burst + rate * (uses[j] - uses[i]) + 1e-6


def test_take_waits_for_its_token_and_refuses_without_waiting() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(10.0, burst=1, clock=loop.time)
        assert await bucket.take(0.0)
        started = loop.time()
        assert await bucket.take(1.0)
        assert loop.time() - started >= 0.09
        started = loop.time()
        bucket.reserve(1.0)  # the next token is someone else's: 0.1 s, then ours at 0.2 s
        assert not await bucket.take(0.15)
        assert loop.time() - started < 0.05

    asyncio.run(go())


def test_a_cancelled_take_gives_its_token_back() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(1.0, clock=loop.time)
        assert await bucket.take(0.0)
        waiter = asyncio.create_task(bucket.take(5.0))
        await asyncio.sleep(0.01)
        assert bucket.tokens < 0
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert 0 <= bucket.tokens < 0.1

    asyncio.run(go())
