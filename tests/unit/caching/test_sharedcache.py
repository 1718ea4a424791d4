"""The shared cache (sharedcache.py) against a real redis-server on loopback: two gates
stand for two backup MXes, each with its own local cache; ``run`` stands for each
one's own probe, and the test counts how often it is called (gates.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from callahead.base.logfmt import redact_url
from callahead.caching.cache import PositiveCache
from callahead.caching.catchall import CHECK_PREFIX
from callahead.caching.controls import Controls
from callahead.caching.redisstore import (
    CHANNEL,
    LOCK_PREFIX,
    VALID_PREFIX,
    control_key,
    domain_pattern,
    lock_key,
    valid_key,
)
from callahead.core.policy import Action, Policy, Reason, TempfailAction
from callahead.probing.breaker import Breaker
from callahead.process.config import ConfigError, load_config
from callahead.routing.routes import Nexthop, parse_routes
from callahead.smtp.verdict import Basis, ProbeResult, Stage, Verdict
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.primary import SilentServer
from tests.harness.redis import RedisServer
from tests.harness.waiting import wait_until
from tests.unit.caching.gates import TTL, Backup, backup, closed, new_address, settle

# -- keys ---------------------------------------------------------------------------------


def test_keys_are_namespaced_hashes_that_no_address_can_steer() -> None:
    crafted = "a*b:c@example.test"
    key = valid_key(crafted)
    assert key.startswith(VALID_PREFIX)
    domain_hash, address_hash = key[len(VALID_PREFIX) :].split(":")
    assert len(domain_hash) == len(address_hash) == 64
    assert all(c in "0123456789abcdef" for c in domain_hash + address_hash)
    assert valid_key("a@example.test") != valid_key("b@example.test")
    assert valid_key("a@b.example.test") != valid_key("a@example.test")
    # "a@b" at c and "a" at "b@c" are different addresses: the whole address is hashed.
    assert valid_key("a@b@c.test") != valid_key("a@c.test")
    assert lock_key(crafted).startswith(LOCK_PREFIX)
    assert domain_pattern("example.test") == f"{VALID_PREFIX}{domain_hash}:*"


def test_redis_url_is_validated_and_its_password_never_shown() -> None:
    config = load_config({"CALLAHEAD_REDIS_URL": "redis://cache:s3cret@10.0.0.7:6379/2"})
    shown = dict(config.describe())["CALLAHEAD_REDIS_URL"]
    assert "s3cret" not in shown
    assert shown == "redis://cache:***@10.0.0.7:6379/2"
    assert redact_url("unix:///run/redis/redis.sock") == "unix:///run/redis/redis.sock"
    for good in ("rediss://:pw@h.example:6380", "unix:///run/redis.sock", ""):
        load_config({"CALLAHEAD_REDIS_URL": good})
    for bad in ("http://h", "redis://", "unix://relative", "redis://h:99999", "h:6379"):
        with pytest.raises(ConfigError, match="CALLAHEAD_REDIS_URL"):
            load_config({"CALLAHEAD_REDIS_URL": bad})


# -- sharing ------------------------------------------------------------------------------


def test_a_valid_answer_of_one_backup_is_a_hit_for_the_other(redis: RedisServer) -> None:
    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url)
        address = new_address()
        first = await a.ask(address)
        assert first.verdict is Verdict.VALID and first.basis is not Basis.SHARED
        await settle(a)
        ttl = int(redis.command("PTTL", valid_key(address))[1:])
        assert TTL * 1000 - 5000 < ttl <= TTL * 1000
        assert redis.command("EXISTS", lock_key(address)) == ":0"  # released
        second = await b.ask(address)
        assert second.verdict is Verdict.VALID and second.basis is Basis.SHARED
        assert b.probes == []
        # B keeps it locally, for at most its local TTL.
        left = b.local.remaining(address)
        assert left is not None and 55 < left <= 60
        assert b.counted("callahead_redis_hits_total") == 1
        assert a.counted("callahead_redis_misses_total") == 1
        await closed(a, b)

    asyncio.run(scenario())


@pytest.mark.parametrize("verdict", [Verdict.UNKNOWN, Verdict.TEMPFAIL])
def test_unknown_and_undecided_are_never_stored(redis: RedisServer, verdict: Verdict) -> None:
    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url)
        address = new_address()
        assert (await a.ask(address, verdict)).verdict is verdict
        await settle(a)
        assert redis.keys("callahead:*") == 0  # no entry, and the lock is released
        assert (await b.ask(address, verdict)).verdict is verdict
        assert b.probes == [address]
        await closed(a, b)

    asyncio.run(scenario())


async def held_at(
    a: Backup, address: str, verdict: Verdict = Verdict.VALID
) -> tuple[asyncio.Task[ProbeResult], asyncio.Event]:
    """A's probe of ``address``, started and held until the event is set."""
    go = asyncio.Event()

    async def held() -> None:
        await go.wait()

    probing = asyncio.create_task(a.ask(address, verdict, before=held))
    await wait_until(lambda: a.probes, what="A's probe")
    return probing, go


def test_a_probe_in_flight_at_one_backup_answers_the_other(redis: RedisServer) -> None:
    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url)
        address = new_address()
        probing, go = await held_at(a, address)
        waiting = asyncio.create_task(b.ask(address))
        await asyncio.sleep(0.1)  # B polls meanwhile
        assert not waiting.done()
        go.set()
        assert (await probing).basis is not Basis.SHARED
        result = await waiting
        assert result.verdict is Verdict.VALID and result.basis is Basis.SHARED
        assert b.probes == []
        assert b.counted("callahead_redis_lock_waits_total", outcome="shared") == 1
        await closed(a, b)

    asyncio.run(scenario())


def test_when_the_other_backup_finds_no_valid_answer_this_one_probes(redis: RedisServer) -> None:
    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url)
        address = new_address()
        probing, go = await held_at(a, address, Verdict.UNKNOWN)
        waiting = asyncio.create_task(b.ask(address, Verdict.UNKNOWN))
        await asyncio.sleep(0.05)
        go.set()
        assert (await probing).verdict is Verdict.UNKNOWN
        assert (await waiting).verdict is Verdict.UNKNOWN
        assert b.probes == [address]
        assert b.counted("callahead_redis_lock_waits_total", outcome="released") == 1
        await closed(a, b)

    asyncio.run(scenario())


def test_the_wait_for_another_backup_is_bounded(redis: RedisServer) -> None:
    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url, lock_wait=0.3)
        address = new_address()
        probing, go = await held_at(a, address)
        started = time.monotonic()
        result = await b.ask(address)
        took = time.monotonic() - started
        assert result.verdict is Verdict.VALID and b.probes == [address]
        assert 0.3 <= took < 1.0
        assert b.counted("callahead_redis_lock_waits_total", outcome="timeout") == 1
        go.set()
        await probing
        await closed(a, b)

    asyncio.run(scenario())


# -- Redis in trouble ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_redis_refusing_costs_nothing_but_a_probe_and_opens_the_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def scenario() -> None:
        b = backup(url, breaker=Breaker(failures=3, cooldown=5.0, clock=clock))
        for _ in range(10):
            result = await b.ask(new_address())
            assert result.verdict is Verdict.VALID and result.basis is not Basis.SHARED
        assert len(b.probes) == 10
        # Three failures opened the breaker: no more calls until the cooldown ends.
        assert b.counted("callahead_redis_errors_total") == 3
        assert b.counted("callahead_redis_round_trips_total") == 3
        assert b.counted("callahead_redis_breaker_open") == 1
        await closed(b)

    with caplog.at_level(logging.INFO, logger="callahead.sharedcache"):
        asyncio.run(scenario())
    down = [r for r in caplog.records if "is not answering" in r.getMessage()]
    assert len(down) == 1


def test_a_silent_redis_is_bounded_by_the_timeout() -> None:
    with SilentServer() as silent:

        async def scenario() -> None:
            b = backup(f"redis://127.0.0.1:{silent.port}/0", timeout=0.2)
            started = time.monotonic()
            for _ in range(5):
                assert (await b.ask(new_address())).verdict is Verdict.VALID
            # Three timeouts, then the breaker: not a timeout per recipient.
            assert time.monotonic() - started < 3 * 0.2 + 0.5
            assert b.counted("callahead_redis_errors_total") == 3
            await closed(b)

        asyncio.run(scenario())


def test_redis_back_after_the_cooldown_is_used_again(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    port = free_port()

    async def scenario(workdir: Path) -> None:
        b = backup(
            f"redis://127.0.0.1:{port}/0", breaker=Breaker(failures=3, cooldown=5.0, clock=clock)
        )
        for _ in range(3):
            await b.ask(new_address())
        assert b.counted("callahead_redis_breaker_open") == 1
        with RedisServer(workdir, port=port) as server:
            address = new_address()
            await b.ask(address)  # breaker still open: not written
            assert server.keys("callahead:*") == 0
            clock.now += 5.0
            await b.ask(address)  # the trial call: Redis answers, the breaker closes
            await settle(b)
            assert server.command("EXISTS", valid_key(address)) == ":1"
            assert b.counted("callahead_redis_breaker_open") == 0
            await closed(b)

    with caplog.at_level(logging.INFO, logger="callahead.sharedcache"), make_workdir() as wd:
        asyncio.run(scenario(wd))
    assert [r for r in caplog.records if "answers again" in r.getMessage()]


# -- flushes ------------------------------------------------------------------------------


def test_a_flush_on_one_backup_reaches_every_backup(redis: RedisServer) -> None:
    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url)
        a.gate.start()
        b.gate.start()
        kept, gone = new_address("keep.test"), new_address("example.test")
        other = new_address("example.test")
        for address in (kept, gone, other):
            await a.ask(address)
        await settle(a)
        for address in (kept, gone, other):
            assert (await b.ask(address)).basis is Basis.SHARED
        await wait_until(lambda: redis.command("PUBSUB", "NUMSUB", CHANNEL) != "", what="subs")
        assert await a.gate.flush_address(gone) == 1
        await wait_until(lambda: b.local.remaining(gone) is None, what="B drops it")
        assert await a.gate.remaining(gone) is None
        assert b.local.remaining(other) is not None
        assert await a.gate.flush_domain("example.test") == 1  # other
        await wait_until(lambda: b.local.remaining(other) is None, what="B drops the domain")
        assert b.local.remaining(kept) is not None
        assert redis.command("EXISTS", valid_key(kept)) == ":1"
        assert await b.gate.flush_all() == 1
        await wait_until(lambda: a.local.remaining(kept) is None, what="A drops everything")
        assert redis.keys("callahead:*") == 0
        await closed(a, b)

    asyncio.run(scenario())


def test_a_valid_answer_is_every_backups_control_until_flushed(redis: RedisServer) -> None:
    """A backup that verified no user of a domain gets one from Redis as its control
    (sessions ask it when the primary rejects a recipient); flushes take it away."""

    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url)
        first, second = new_address(), new_address()
        assert await b.gate.recent_valid("example.test") is None
        await a.ask(first)
        await settle(a)
        assert await b.gate.recent_valid("example.test") == first
        await a.ask(second)
        await settle(a)
        assert await b.gate.recent_valid("example.test") == second  # the newest
        assert await b.gate.recent_valid("other.test") is None
        assert await a.gate.flush_address(first) == 1
        assert await b.gate.recent_valid("example.test") == second  # not the flushed one
        assert await a.gate.flush_address(second) == 1
        assert await b.gate.recent_valid("example.test") is None
        await a.ask(first)
        await settle(a)
        assert await a.gate.flush_domain("example.test") == 1  # the control is no entry
        assert await b.gate.recent_valid("example.test") is None
        await a.ask(first)
        await settle(a)
        assert await a.gate.flush_all() == 1
        assert redis.keys("callahead:*") == 0
        # What Redis holds is checked: a value of another domain is no control.
        redis.command("SET", control_key("example.test"), "x@evil.test")
        assert await b.gate.recent_valid("example.test") is None
        await closed(a, b)

    asyncio.run(scenario())


def test_a_catch_all_checks_made_up_address_is_never_a_control(redis: RedisServer) -> None:
    """As an earlier version published it (valid, and the domain's control, for a
    CALLAHEAD_CACHE_TTL): neither that nor a local entry is offered as a control, so a
    primary that stops accepting everything is not taken for one in drift."""

    async def scenario() -> None:
        a = backup(redis.url)
        made_up = f"{CHECK_PREFIX}0123456789abcdef01234567@example.test"
        await a.gate.store.store_valid(made_up, int(TTL * 1000))
        assert await a.gate.recent_valid("example.test") == made_up  # there, in Redis
        cache = PositiveCache(ttl=60, maxsize=10)
        controls = Controls(cache, a.gate)
        assert await controls.controls("example.test") == ()
        cache.add(made_up)
        assert await controls.controls("example.test") == ()
        cache.add("u1@example.test")
        assert await controls.controls("example.test") == ("u1@example.test",)
        await closed(a)

    asyncio.run(scenario())


def test_a_backup_without_redis_has_only_its_own_controls() -> None:
    async def scenario() -> None:
        cache = PositiveCache(ttl=60, maxsize=10)
        down = backup("redis://127.0.0.1:9", timeout=0.2)
        controls = Controls(cache, down.gate)
        assert await controls.controls("example.test") == ()  # Redis down: none, at once
        cache.add("u1@example.test")
        assert await controls.controls("example.test") == ("u1@example.test",)
        await closed(down)

    asyncio.run(scenario())


def test_refresh_ahead_is_done_by_one_backup(redis: RedisServer) -> None:
    async def scenario() -> None:
        a = backup(redis.url, refresh_within=TTL / 2)
        address = new_address()
        # An entry in the last half of its TTL.
        assert redis.command("SET", valid_key(address), "1", "PX", str(int(TTL * 400))) == "+OK"
        result = await a.ask(address)
        assert result.basis is Basis.SHARED  # answered at once from Redis
        await wait_until(lambda: a.probes == [address], what="the background refresh")
        await settle(a)
        left = int(redis.command("PTTL", valid_key(address))[1:])
        assert left > TTL * 1000 - 5000  # a new whole TTL
        assert a.counted("callahead_cache_refreshes_total", outcome="valid") == 1
        await closed(a)

    asyncio.run(scenario())


# -- the decision core --------------------------------------------------------------------


class SharedHitProber:
    """Answers every probe as a hit in the shared cache."""

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        return ProbeResult(
            Verdict.VALID, Stage.RCPT, None, "shared", 0.001, str(hops[0]), basis=Basis.SHARED
        )

    async def probe_async(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        return self.probe(address, hops)


def test_a_shared_hit_is_accepted_with_its_own_reason_and_its_own_time_left() -> None:
    cache = PositiveCache(ttl=60, maxsize=10)
    policy = Policy(
        routes=parse_routes("example.test=[127.0.0.1]:2525"),
        cache=cache,
        prober=SharedHitProber(),
        tempfail_action=TempfailAction.ACCEPT,
    )
    cache.restore([("other@example.test", 5.0)])
    decision = policy.decide("<u1@example.test>")
    assert decision.action is Action.ACCEPT and decision.reason is Reason.SHARED_CACHE_HIT
    # The gate caches a hit itself, for the time it has left in Redis: the core does not
    # add it for a whole local TTL.
    assert cache.remaining("u1@example.test") is None
