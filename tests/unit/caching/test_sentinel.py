"""The shared cache behind Redis Sentinel, against real servers (tests/harness/sentinel.py:
a master, a replica and three sentinels, passwords on both): the store finds the master;
after a SIGKILL of the master every call fails fast while the sentinels fail over, and
reads and writes then go to the promoted replica, as soon as the sentinels name it (not
after the breaker's cooldown); a failover that demotes a live master (its clients get
READONLY or are cut) is followed too. The metrics, ``status`` and ``doctor`` name the
master, and no password is ever shown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from callahead.caching.redisclient import SentinelTarget
from callahead.caching.redisstore import RedisStore, SharedUnavailable, valid_key
from callahead.frontends.adminclient import redis_line
from callahead.frontends.metrics import Metrics
from callahead.process.config import load_config
from callahead.process.doctor.checkup import redis_findings
from tests.harness.fixtures import make_workdir
from tests.harness.sentinel import SERVICE, SentinelSet

TIMEOUT = 0.2  # CALLAHEAD_REDIS_TIMEOUT's default
TTL_MS = 600_000
ENV = {"CALLAHEAD_ROUTES": "example.com=[127.0.0.1]:2525", "CALLAHEAD_HELO_NAME": "b.example"}


@pytest.fixture
def site() -> Iterator[SentinelSet]:
    """A fresh set for each test: the failover tests kill or demote its master."""
    with make_workdir() as workdir, SentinelSet(workdir) as started:
        yield started


def target(site: SentinelSet, **changes: str) -> SentinelTarget:
    config = load_config({**ENV, **site.env(), **changes})
    assert isinstance(config.shared_redis, SentinelTarget)
    return config.shared_redis


def on(node_port: int) -> str:
    return f"127.0.0.1:{node_port}"


def test_the_store_finds_the_master_and_shows_it(
    site: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    metrics = Metrics()

    async def run() -> None:
        store = RedisStore(target(site), timeout=TIMEOUT, observer=metrics)
        metrics.redis_master.info = lambda: store.master_info
        try:
            await store.store_valid("a@example.com", TTL_MS)
            assert await store.remaining("a@example.com", TTL_MS) is not None
            assert store.master_info is not None
            assert store.master_info.address == on(site.master.port)
            assert time.time() - 60 < store.master_info.since <= time.time()
        finally:
            await store.aclose()

    asyncio.run(run())
    assert site.master.ask("EXISTS", valid_key("a@example.com")) == 1
    exposition = generate_latest(metrics.registry).decode()
    assert f'callahead_redis_master_info{{address="{on(site.master.port)}"}} 1.0' in exposition
    assert "callahead_redis_master_changed_timestamp_seconds " in exposition
    assert f"redis master of service {SERVICE} is {on(site.master.port)}" in caplog.text
    for secret in (site.data_password, site.sentinel_password):
        assert secret not in caplog.text and secret not in repr(target(site))


def test_after_a_sigkill_of_the_master_calls_fail_fast_then_follow_the_promoted_replica(
    site: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    figures: dict[str, float] = {}

    async def run() -> None:
        store = RedisStore(target(site), timeout=TIMEOUT)
        try:
            await store.store_valid("before@example.com", TTL_MS)
            assert site.master.ask("WAIT", "1", "2000") == 1  # on the replica too
            site.kill_master()
            killed = time.monotonic()
            switched = longest = 0.0
            failures = 0
            while True:
                if not switched and site.sentinel_view(site.sentinels[0]) == site.replica.port:
                    switched = time.monotonic()
                started = time.monotonic()
                try:
                    await store.store_valid("after@example.com", TTL_MS)
                    break
                except SharedUnavailable:
                    failures += 1
                longest = max(longest, time.monotonic() - started)
                assert time.monotonic() - killed < 30, "sharing never resumed"
                await asyncio.sleep(0.01)
            resumed = time.monotonic()
            figures.update(
                failover=(switched or resumed) - killed,
                resumed=resumed - killed,
                longest=longest,
                failures=failures,
            )
            # Written before the kill, read after it from the promoted replica.
            assert await store.remaining("before@example.com", TTL_MS) is not None
            assert store.master_info is not None
            assert store.master_info.address == on(site.replica.port)
        finally:
            await store.aclose()

    asyncio.run(run())
    print(f"failover figures: {figures}")
    # Every call during the failover failed within the Redis timeout (none hung)...
    assert figures["failures"] > 0
    assert figures["longest"] < TIMEOUT + 0.5
    # ...and sharing resumed once the sentinels named the replica, not at the trial
    # after the breaker's cooldown (BREAKER_COOLDOWN s after the kill opened it).
    assert figures["resumed"] - figures["failover"] < 1.0
    assert site.replica.ask("EXISTS", valid_key("after@example.com")) == 1
    assert (
        f"redis master of service {SERVICE} changed from {on(site.master.port)} to "
        f"{on(site.replica.port)}"
    ) in caplog.text


def test_a_demoted_master_is_left_for_the_new_one(site: SentinelSet) -> None:
    """A failover with the old master alive (SENTINEL FAILOVER): it turns replica (its
    clients get READONLY, or are cut by the sentinels), and writes follow the new one."""

    async def run() -> None:
        store = RedisStore(target(site), timeout=TIMEOUT)
        try:
            await store.store_valid("one@example.com", TTL_MS)
            assert site.sentinels[0].ask("SENTINEL", "FAILOVER", SERVICE) == "OK"
            started = time.monotonic()
            while site.replica.role() != "master" or site.master.role() != "slave":
                assert time.monotonic() - started < 30, "no failover"
                await asyncio.sleep(0.02)
            while site.replica.ask("EXISTS", valid_key("two@example.com")) != 1:
                with contextlib.suppress(SharedUnavailable):
                    await store.store_valid("two@example.com", TTL_MS)
                assert time.monotonic() - started < 30, "writes never reached the new master"
                await asyncio.sleep(0.02)
        finally:
            await store.aclose()

    asyncio.run(run())
    assert site.replica.role() == "master"


def test_doctor_names_the_master_and_finds_a_wrong_password(site: SentinelSet) -> None:
    config = load_config({**ENV, **site.env()})
    [finding] = redis_findings(config)
    assert finding.ok, finding.what
    assert f"names master {on(site.master.port)}" in finding.what
    assert "1 replicas, 2 other sentinels" in finding.what
    wrong = load_config({**ENV, **site.env(), "CALLAHEAD_REDIS_PASSWORD": "not-it"})
    [finding] = redis_findings(wrong)
    assert finding.ok is False and "does not answer" in finding.what
    unknown = load_config({**ENV, **site.env(), "CALLAHEAD_REDIS_SERVICE": "other"})
    [finding] = redis_findings(unknown)
    assert finding.ok is False and "no sentinel names the master" in finding.what
    for each in (finding.what, finding.fix):
        assert site.data_password not in each and site.sentinel_password not in each


def test_the_status_line_names_the_master_and_since_when() -> None:
    line = redis_line({"up": True, "sentinel": True, "master": "10.0.0.2:6379", "master_since": 0})
    assert line == "redis: up, master 10.0.0.2:6379 (Sentinel) since 1970-01-01 00:00:00 UTC"
    line = redis_line({"up": False, "sentinel": True, "master": None, "master_since": None})
    assert line.startswith("redis: DOWN") and "not named by the sentinels yet" in line
    assert redis_line({"up": True, "sentinel": False, "master": None}) == "redis: up"
