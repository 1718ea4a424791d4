"""Redis as untrusted input (untrusted.py, redisscripts.py): values that callahead does
not write, put into a real redis-server with plain commands, are counted, logged and
ignored, and what a forged one can cost is bounded."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import operator
import time

import pytest

from callahead.caching.redisstore import CHANNEL, control_key, lock_key, valid_key
from callahead.caching.untrusted import (
    FLUSH_BURST,
    WARY_FOR,
    Distrust,
    FlushBudget,
    LockTrust,
    parse_flush,
)
from callahead.smtp.verdict import Basis, ProbeResult, Verdict
from tests.harness.redis import RedisServer
from tests.harness.waiting import wait_until
from tests.unit.caching.gates import TTL, Backup, backup, closed, new_address, settle

TEN_YEARS_MS = str(10 * 365 * 86400 * 1000)
INVALID = "callahead_redis_invalid_total"


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- entries ------------------------------------------------------------------------------


def test_a_forged_ten_year_entry_is_believed_for_one_cache_ttl_at_most(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        b = backup(redis.url, ttl=1.5, local_ttl=1.5)
        address = new_address()
        assert redis.command("SET", valid_key(address), "1", "PX", TEN_YEARS_MS) == "+OK"
        assert (await b.ask(address)).basis is Basis.SHARED
        assert 0 < int(redis.command("PTTL", valid_key(address))[1:]) <= 1500  # cut in Redis
        left = b.local.remaining(address)
        assert left is not None and left <= 1.5
        assert b.counted(INVALID, kind="entry") == 1
        # Past the cache TTL it is gone everywhere: this backup verifies it again.
        await wait_until(lambda: redis.command("EXISTS", valid_key(address)) == ":0", 5.0)
        assert (await b.ask(address)).basis is not Basis.SHARED
        assert b.probes == [address]
        await closed(b)

    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        asyncio.run(scenario())
    [line] = warnings(caplog, "more than CALLAHEAD_CACHE_TTL")
    assert "s left" in line and "cut to it" in line


def test_an_entry_without_expiry_is_cut_to_the_cache_ttl(redis: RedisServer) -> None:
    async def scenario() -> None:
        b = backup(redis.url)
        address = new_address()
        redis.command("SET", valid_key(address), "1")
        assert (await b.ask(address)).basis is Basis.SHARED
        assert 0 < int(redis.command("PTTL", valid_key(address))[1:]) <= TTL * 1000
        assert await b.gate.remaining(address) is not None
        assert b.counted(INVALID, kind="entry") == 1
        await closed(b)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "forge",
    [("SET", "yes"), ("SET", "1 "), ("HSET", "f", "1"), ("LPUSH", "1"), ("SADD", "1")],
    ids=["other-value", "padded", "hash", "list", "set"],
)
def test_an_entry_that_callahead_does_not_write_is_ignored(
    redis: RedisServer, forge: tuple[str, ...]
) -> None:
    async def scenario() -> None:
        b = backup(redis.url)
        address = new_address()
        redis.command(forge[0], valid_key(address), *forge[1:])
        result = await b.ask(address)
        assert result.verdict is Verdict.VALID and result.basis is not Basis.SHARED
        assert b.probes == [address]  # probed, as if nothing were there
        assert b.counted(INVALID, kind="entry") == 1
        # A key of another type is no Redis failure: the breaker stays closed.
        assert b.counted("callahead_redis_errors_total") == 0
        await settle(b)
        assert redis.command("GET", valid_key(address)) == "$1"  # written right now
        await closed(b)

    asyncio.run(scenario())


# -- locks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "forge", [("SET", "x"), ("SET", "Z" * 32), ("HSET", "f", "v")], ids=["short", "hex", "hash"]
)
def test_a_lock_that_callahead_does_not_write_is_removed_and_costs_nothing(
    redis: RedisServer, forge: tuple[str, ...]
) -> None:
    async def scenario() -> None:
        b = backup(redis.url, lock_wait=2.0)
        address = new_address()
        redis.command(forge[0], lock_key(address), *forge[1:])
        started = time.monotonic()
        assert (await b.ask(address)).verdict is Verdict.VALID
        assert time.monotonic() - started < 1.0  # not the 2 s wait
        assert b.probes == [address]
        assert b.counted(INVALID, kind="lock") == 1
        assert b.counted("callahead_redis_errors_total") == 0
        await closed(b)

    asyncio.run(scenario())


def test_a_forged_lock_costs_one_redis_timeout_after_the_first(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock of the right shape, for a day: the first recipient waits the whole lock
    wait (then the lock's TTL is cut to a probe's), the next ones the Redis timeout."""

    async def scenario() -> None:
        b = backup(redis.url, lock_wait=2.0, timeout=0.1, probe_timeout=3.0)
        addresses = [new_address() for _ in range(6)]
        for address in addresses:
            redis.command("SET", lock_key(address), "ab" * 16, "PX", "86400000")
        took = []
        for address in addresses:
            started = time.monotonic()
            assert (await b.ask(address)).verdict is Verdict.VALID
            took.append(time.monotonic() - started)
        assert 2.0 <= took[0] < 3.0
        assert all(t < 0.5 for t in took[1:]), took  # was 2 s each
        assert b.probes == addresses
        assert 0 < int(redis.command("PTTL", lock_key(addresses[0]))[1:]) <= 4000
        assert b.counted(INVALID, kind="lock") == 6  # each one's TTL cut
        await closed(b)

    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        asyncio.run(scenario())
    # Logged, at most LOG_BURST lines a minute, then how many were left out.
    assert len(warnings(caplog, "was set to outlive a probe here")) == 5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_waits_are_short_for_a_while_after_a_lock_showed_no_answer_behind_it() -> None:
    clock = Clock()
    trust = LockTrust(2.0, 0.2, clock)
    assert trust.limit() == 2.0
    trust.ended("released", 1.5)  # the other backup's probe found it unknown:
    trust.probed_after_release(False, 1.5)  # so did this one's: nothing wrong
    assert trust.limit() == 2.0
    trust.ended("timeout", 2.0)  # held past the whole wait
    assert trust.limit() == 0.2
    trust.ended("timeout", 0.2)  # short waits do not prolong it
    clock.now += WARY_FOR
    assert trust.limit() == 2.0
    trust.ended("released", 1.5)  # a lock that ran out by itself looks like this, and
    assert trust.limit() == 2.0
    trust.probed_after_release(True, 1.5)  # then the address is valid: no answer behind it
    assert trust.limit() == 0.2
    trust.ended("shared", 0.05)  # a backup's answer came: waiting pays again
    assert trust.limit() == 2.0
    trust.probed_after_release(True, 0.1)  # a short wait cost nothing
    assert trust.limit() == 2.0
    assert LockTrust(0.1, 0.2).limit() == 0.1  # never longer than the lock wait


async def _held(a: Backup, address: str, verdict: Verdict, go: asyncio.Event) -> ProbeResult:
    """A's probe of ``address`` (under its lock), answered once ``go`` is set."""

    async def held() -> None:
        await go.wait()

    return await a.ask(address, verdict, before=held)


def test_unknown_recipients_probed_elsewhere_leave_the_lock_wait_in_full(
    redis: RedisServer,
) -> None:
    """A dictionary run: backup A probes unknown recipients (never stored), B waits on
    A's locks and probes each itself when A lets go without an answer. That is no sign
    of a forged lock: B still waits in full for A's probe of a valid address, and takes
    its answer instead of probing it a second time (it was short waits, and two probes,
    for a minute)."""

    async def scenario() -> None:
        a = backup(redis.url, lock_wait=2.0, timeout=0.1)
        b = backup(redis.url, lock_wait=2.0, timeout=0.1)
        for verdict in (Verdict.UNKNOWN, Verdict.UNKNOWN, Verdict.VALID):
            address = new_address()
            go = asyncio.Event()
            probing = asyncio.create_task(_held(a, address, verdict, go))
            await wait_until(functools.partial(operator.contains, a.probes, address), what="A")
            waiting = asyncio.create_task(b.ask(address, verdict))
            await asyncio.sleep(0.4)  # B waits on A's lock, longer than the Redis timeout
            go.set()
            assert (await probing).verdict is verdict
            assert (await waiting).verdict is verdict
        assert len(b.probes) == 2  # the unknown ones only
        assert address not in b.probes
        assert b.counted("callahead_redis_lock_waits_total", outcome="released") == 2
        assert b.counted("callahead_redis_lock_waits_total", outcome="shared") == 1
        await settle(a, b)
        await closed(a, b)

    asyncio.run(scenario())


def test_a_forged_lock_that_runs_out_within_the_wait_costs_one_redis_timeout_after_the_first(
    redis: RedisServer,
) -> None:
    """A lock of the right shape that runs out before the lock wait does (each one set
    for 1.5 s just before its recipient comes) ends in a release with no answer; the
    address then proves valid, so the next waits are short."""

    async def scenario() -> None:
        b = backup(redis.url, lock_wait=2.0, timeout=0.1)
        took = []
        for _ in range(4):
            address = new_address()
            redis.command("SET", lock_key(address), "cd" * 16, "PX", "1500")
            started = time.monotonic()
            assert (await b.ask(address)).verdict is Verdict.VALID
            took.append(time.monotonic() - started)
        assert 1.0 <= took[0] < 2.0
        assert all(t < 0.75 for t in took[1:]), took  # not 1.5 s each
        assert b.counted("callahead_redis_lock_waits_total", outcome="released") == 1
        assert b.counted("callahead_redis_lock_waits_total", outcome="timeout") == 3
        await closed(b)

    asyncio.run(scenario())


# -- controls -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "forge",
    [
        ("SET", "x@evil.test"),
        ("SET", "a\r\nDATA\r\n@example.test"),
        ("SET", "<u1@example.test>"),
        ("SET", "u1@EXAMPLE.test"),
        ("SET", "@example.test"),
        ("SET", "u" * 600 + "@example.test"),
        ("HSET", "f", "u1@example.test"),
    ],
    ids=["other-domain", "crlf", "brackets", "not-normalized", "no-local", "long", "hash"],
)
def test_a_control_address_that_callahead_does_not_write_is_ignored(
    redis: RedisServer, forge: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        b = backup(redis.url)
        redis.command(forge[0], control_key("example.test"), *forge[1:])
        assert await b.gate.recent_valid("example.test") is None
        assert b.counted(INVALID, kind="control") == 1
        assert b.counted("callahead_redis_errors_total") == 0
        await closed(b)

    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        asyncio.run(scenario())
    [line] = warnings(caplog, "the control address of domain=example.test")
    assert "\r" not in line and "\n" not in line


# -- flush messages -----------------------------------------------------------------------


def test_only_the_flush_messages_callahead_sends_are_understood() -> None:
    assert parse_flush(json.dumps({"all": True})) == ("all", "")
    assert parse_flush(json.dumps({"domain": "example.test"}).encode()) == (
        "domain",
        "example.test",
    )
    assert parse_flush(json.dumps({"address": "a b@example.test"})) == (
        "address",
        "a b@example.test",
    )
    for bad in [
        b"",
        b"\xff",
        "[1]" * 2000,
        "[" * 5000,
        json.dumps({"all": 1}),
        json.dumps({"all": True, "domain": "example.test"}),
        json.dumps({"domain": "Example.TEST"}),
        json.dumps({"domain": "x y"}),
        json.dumps({"domain": ""}),
        json.dumps({"address": "nodomain"}),
        json.dumps({"address": "a\r\n@example.test"}),
        json.dumps({"address": "u" * 600 + "@example.test"}),
        json.dumps({"other": "x"}),
        None,
        42,
    ]:
        assert parse_flush(bad) is None, bad


def test_flush_messages_beyond_the_rate_clear_instead() -> None:
    clock = Clock()
    budget = FlushBudget(clock)
    assert all(budget.take() for _ in range(FLUSH_BURST))
    assert not budget.take()
    clock.now += 1.0
    assert sum(budget.take() for _ in range(100)) == 20


def test_forged_flush_messages_are_counted_ignored_and_bounded(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import redis as redispy

    async def scenario() -> None:
        a, b = backup(redis.url), backup(redis.url)
        b.gate.start()
        kept = new_address()
        await a.ask(kept)
        await settle(a)
        assert (await b.ask(kept)).basis is Basis.SHARED
        await wait_until(lambda: redis.command("PUBSUB", "NUMSUB", CHANNEL) != "", what="subs")
        publisher = redispy.Redis.from_url(redis.url)
        garbage = [b"\x00junk", b'{"all": 1}', b'{"domain": "a b"}', b"x" * 10000]
        for message in garbage:
            publisher.publish(CHANNEL, message)
        await wait_until(lambda: b.counted(INVALID, kind="flush") == len(garbage))
        assert b.local.remaining(kept) is not None  # nothing dropped
        # A well-formed one is applied, whoever sent it: it drops local copies only,
        # and the next lookup finds the entry in Redis again, without a probe.
        publisher.publish(CHANNEL, json.dumps({"all": True}))
        await wait_until(lambda: b.local.remaining(kept) is None, what="the local copy to go")
        assert (await b.ask(kept)).basis is Basis.SHARED
        assert b.probes == []
        # A flood is bounded: past the burst each message clears instead of being read.
        flood = FLUSH_BURST + 200
        pipe = publisher.pipeline(transaction=False)
        for _ in range(flood):
            pipe.publish(CHANNEL, json.dumps({"domain": "example.test"}))
        pipe.execute()
        await wait_until(lambda: b.counted(INVALID, kind="flush") >= len(garbage) + 100)
        publisher.close()
        await closed(a, b)

    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        asyncio.run(scenario())
    assert warnings(caplog, "a flush message that callahead does not send")
    assert len([r for r in caplog.records if "redis:" in r.getMessage()]) <= 10


def test_invalid_values_are_logged_a_few_times_a_minute_and_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Counted:
        def __init__(self) -> None:
            self.kinds: list[str] = []

        def redis_invalid(self, kind: str) -> None:
            self.kinds.append(kind)

    clock, counted = Clock(), Counted()
    distrust = Distrust(counted, clock)
    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        for n in range(8):
            distrust.invalid("lock", "lock %d", n)
        distrust.invalid("entry", "entry %d", 0)
        clock.now += 60.0
        distrust.invalid("lock", "lock %d", 8)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:5] == [f"redis: lock {n}" for n in range(5)]
    assert lines[5:] == ["redis: entry 0", "redis: lock 8 (3 more not logged before this one)"]
    assert counted.kinds == ["lock"] * 8 + ["entry", "lock"]
