"""The site probe budget (sitebudget.py, CALLAHEAD_SITE_PRIMARY_RATE) in a real
redis-server: the bucket's burst, refill, reservations in order, two backups sharing it,
its expiry, Redis down or slow (skipped at once: never a refusal because of Redis), and
values and answers that callahead does not write."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis as redispy

from callahead.caching.redisstore import RedisStore
from callahead.caching.sitebudget import BUDGET_PREFIX, RedisSiteBudget, budget_key, parse_answer
from callahead.frontends.metrics import Metrics
from callahead.probing.breaker import Breaker
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.primary import SilentServer
from tests.harness.redis import RedisServer
from tests.harness.waiting import wait_until

PRIMARY = "[192.0.2.1]:25"
RATE = 10.0
"""A burst of 10, then a token every 0.1 s."""
WAIT = 0.5
"""CALLAHEAD_PROBE_WAIT of the budgets here."""
TOTAL = "callahead_site_budget_total"
INVALID = "callahead_redis_invalid_total"


class Site:
    """One backup's view: its store, its site budget and its metrics."""

    def __init__(self, url: str, *, timeout: float = 0.2, breaker: Breaker | None = None) -> None:
        self.metrics = Metrics()
        self.store = RedisStore(url, timeout=timeout, observer=self.metrics, breaker=breaker)
        self.budget = RedisSiteBudget(self.store, RATE, longest_wait=WAIT, observer=self.metrics)

    def counted(self, name: str = TOTAL, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def takes(self, n: int, max_wait: float = 0.0) -> list[bool]:
        return [await self.budget.take(PRIMARY, max_wait) for _ in range(n)]


@asynccontextmanager
async def site(url: str, **options: Any) -> AsyncIterator[Site]:
    backup = Site(url, **options)
    try:
        yield backup
    finally:
        await backup.store.aclose()


def bucket(redis: RedisServer) -> int | None:
    """The bucket's value in Redis: the µs (Redis's clock) when it is full again."""
    with redispy.Redis(port=redis.port) as client:
        value = client.get(budget_key(PRIMARY))
    return None if value is None else int(value)


def moved(redis: RedisServer, before: int | None) -> bool:
    return bucket(redis) != before


def test_a_burst_then_refusals_then_a_token_at_the_rate(redis: RedisServer) -> None:
    async def scenario() -> None:
        async with site(redis.url) as a:
            assert await a.takes(10) == [True] * 10  # the burst: a second's worth
            assert await a.takes(3) == [False] * 3  # a background probe never waits
            started = time.monotonic()
            assert await a.budget.take(PRIMARY, WAIT)  # a recipient waits for its token
            waited = time.monotonic() - started
            assert 0.02 < waited < WAIT + 0.2
            assert (a.counted(outcome="granted"), a.counted(outcome="refused")) == (10, 3)
            assert a.counted(outcome="waited") == 1
            # A token that would come later than the caller may wait: refused at once.
            started = time.monotonic()
            reserved = [asyncio.create_task(a.budget.take(PRIMARY, WAIT)) for _ in range(8)]
            outcomes = await asyncio.gather(*reserved)
            # 0.5 s of waiting holds about 5 tokens (one every 0.1 s); never the 8.
            assert 3 <= outcomes.count(True) <= 6
            assert time.monotonic() - started < WAIT + 0.3
            assert a.counted(outcome="unavailable") == 0

    asyncio.run(scenario())


def test_waiters_are_served_in_the_order_they_came(redis: RedisServer) -> None:
    async def scenario() -> None:
        async with site(redis.url) as a:
            await a.takes(10)
            done: list[int] = []

            async def waiter(n: int) -> None:
                assert await a.budget.take(PRIMARY, 2.0)
                done.append(n)

            tasks = []
            for n in range(4):
                before = bucket(redis)
                tasks.append(asyncio.create_task(waiter(n)))
                # Its token is reserved (the bucket moved on) before the next one asks.
                await wait_until(functools.partial(moved, redis, before), what="a reservation")
            await asyncio.gather(*tasks)
            assert done == [0, 1, 2, 3]
            assert a.counted(outcome="waited") == 4

    asyncio.run(scenario())


def test_two_backups_share_one_bucket(redis: RedisServer) -> None:
    async def scenario() -> None:
        async with site(redis.url) as a, site(redis.url) as b:
            assert await a.takes(6) == [True] * 6
            assert await b.takes(6) == [True] * 4 + [False] * 2
            assert await a.takes(1) == [False]
            assert a.counted(outcome="granted") + b.counted(outcome="granted") == 10

    asyncio.run(scenario())


def test_an_idle_primary_leaves_nothing_behind(redis: RedisServer) -> None:
    async def scenario() -> None:
        async with site(redis.url) as a:
            await a.takes(3)
            left = int(redis.command("PTTL", budget_key(PRIMARY))[1:])
            assert 0 < left <= 300  # three tokens of 0.1 s to come back
            await wait_until(
                lambda: redis.keys(BUDGET_PREFIX + "*") == 0, 2.0, what="the key to expire"
            )
            # Gone is full again: the whole burst.
            assert await a.takes(10) == [True] * 10

    asyncio.run(scenario())


def test_a_cancelled_wait_gives_its_token_back(redis: RedisServer) -> None:
    async def scenario() -> None:
        async with site(redis.url) as a:
            await a.takes(10)
            before = bucket(redis)
            waiting = asyncio.create_task(a.budget.take(PRIMARY, 2.0))
            await wait_until(lambda: bucket(redis) != before, what="the reservation")
            reserved = bucket(redis)
            assert before is not None and reserved is not None
            assert reserved - before == 100_000  # one interval, µs
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await wait_until(lambda: (bucket(redis) or 0) <= reserved - 100_000, what="the refund")
            assert a.counted(outcome="waited") == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("where", ["nothing listening", "silent"])
def test_redis_down_or_silent_skips_the_site_budget_at_once(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(url: str) -> None:
        async with site(url, timeout=0.2) as a:
            started = time.monotonic()
            assert await a.takes(5, max_wait=WAIT) == [True] * 5  # never a refusal
            # 0.2 s per call at most, and none once the breaker opened (3 failures).
            assert time.monotonic() - started < 5 * 0.2 + 0.5
            assert a.counted(outcome="unavailable") == 5
            assert a.counted(outcome="granted") == 0

    with caplog.at_level(logging.WARNING, logger="callahead.sitebudget"):
        if where == "silent":
            with SilentServer() as silent:
                asyncio.run(scenario(f"redis://127.0.0.1:{silent.port}/0"))
        else:
            asyncio.run(scenario(f"redis://127.0.0.1:{free_port()}/0"))
    lines = [r.getMessage() for r in caplog.records if r.name == "callahead.sitebudget"]
    assert len(lines) == 1  # one warning for the outage, not one per probe
    assert "(CALLAHEAD_SITE_PRIMARY_RATE=10) cannot be used" in lines[0]
    assert "CALLAHEAD_PRIMARY_RATE" in lines[0]


def test_redis_back_is_used_again(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()

    async def scenario(workdir: Any) -> None:
        async with site(
            f"redis://127.0.0.1:{port}/0", breaker=Breaker(failures=100, cooldown=1.0)
        ) as a:
            assert await a.takes(1) == [True]
            assert a.counted(outcome="unavailable") == 1
            with RedisServer(workdir, port=port):
                assert await a.takes(10) == [True] * 10
                assert await a.takes(1) == [False]  # counted in Redis again
            assert a.counted(outcome="granted") == 10

    with caplog.at_level(logging.INFO, logger="callahead.sitebudget"), make_workdir() as workdir:
        asyncio.run(scenario(workdir))
    lines = [r.getMessage() for r in caplog.records if r.name == "callahead.sitebudget"]
    assert len(lines) == 2 and "used again" in lines[1]


# -- what callahead does not write --------------------------------------------------------


@pytest.mark.parametrize("forged", [("SET", "lots"), ("SET", "nan"), ("HSET", "f", "1")])
def test_a_value_that_is_no_time_is_replaced(redis: RedisServer, forged: tuple[str, ...]) -> None:
    async def scenario() -> None:
        async with site(redis.url) as a:
            command, *args = forged
            redis.command(command, budget_key(PRIMARY), *args)
            assert await a.takes(10) == [True] * 10  # a full bucket, as with no key
            assert await a.takes(1) == [False]
            assert bucket(redis) is not None
            assert a.counted(INVALID, kind="budget") == 1

    asyncio.run(scenario())


def test_a_bucket_forged_ten_years_ahead_costs_a_burst_and_the_wait_at_most(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with site(redis.url) as a:
            ahead = (time.time() + 10 * 365 * 86400) * 1e6
            redis.command("SET", budget_key(PRIMARY), f"{ahead:.0f}")
            assert await a.takes(1) == [False]  # refused, never a reject: the tempfail action
            assert a.counted(INVALID, kind="budget") == 1
            # Cut to a burst's span (1 s) and the wait (0.5 s): tokens again within that.
            waited = await wait_until(lambda: redis.keys(BUDGET_PREFIX + "*") == 0, 3.0)
            assert waited < 1.5 + 0.3
            assert await a.takes(1) == [True]

    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        asyncio.run(scenario())
    assert any("further ahead than a burst" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "answer",
    [None, b"OK", [1], [1, 2, 3], [b"0", 0], [0, 7], [-2, 0], [500_001, 0], [True, 0], "x"],
)
def test_an_answer_that_is_not_the_script_s_is_not_believed(answer: object) -> None:
    assert parse_answer(answer, 500_000) is None


def test_an_answer_of_the_right_shape_is(redis: RedisServer) -> None:
    assert parse_answer([0, 0], 0) == (0, 0)
    assert parse_answer([-1, 2], 0) == (-1, 2)
    assert parse_answer([500_000, 1], 500_000) == (500_000, 1)


def test_a_lying_answer_skips_the_site_budget(redis: RedisServer) -> None:
    async def lie(**_: object) -> object:
        return [10**12, 0]  # "wait eleven days": not an answer the script gives

    async def scenario() -> None:
        async with site(redis.url) as a:
            a.budget._scripts = lambda: (lie, lie)  # type: ignore[method-assign]
            started = time.monotonic()
            assert await a.takes(1, max_wait=WAIT) == [True]
            assert time.monotonic() - started < 0.2
            assert a.counted(outcome="unavailable") == 1

    asyncio.run(scenario())
