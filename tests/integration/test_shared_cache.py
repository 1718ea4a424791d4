"""Several backup MXes sharing one Redis (CALLAHEAD_REDIS_URL), all real parts: a real
redis-server on loopback, two real Postfix backups (A and B), each with its own
``callahead serve`` attached as a milter, and one primary (the harness's stand-in, which
records every probe it gets). Its own stack: it does not need the session ``stack``.

The last tests write into Redis what callahead does not (with redis-py, as anyone who
reaches Redis could): each backup counts, logs and ignores it, and a forged value costs
a bounded time."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis as redispy

from callahead.caching.catchall import CHECK_PREFIX
from callahead.caching.redisstore import CHANNEL, control_key, lock_key, valid_key
from callahead.caching.untrusted import FLUSH_BURST
from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import ask_policy
from tests.harness.fixtures import make_workdir
from tests.harness.primary import Primary
from tests.harness.redis import RedisServer
from tests.harness.scripted import Script, ScriptedServer
from tests.harness.waiting import wait_for
from tests.integration.conftest import MetricsDelta, hop
from tests.integration.sites import (
    DOMAIN,
    Site,
    shared_hits,
    site_env,
    two_backups,
)

PROBE_TIMEOUT = 2.0
CACHE_TTL = 86400  # the default
LOCK_WAIT = 2.0  # the default
REDIS_TIMEOUT = 0.2  # the default
INVALID = "callahead_redis_invalid_total"


Cluster = Site[RedisServer]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with make_workdir() as workdir, RedisServer(workdir) as redis, Primary([]) as primary:
        env = {**site_env(primary, PROBE_TIMEOUT), "CALLAHEAD_REDIS_URL": redis.url}
        with two_backups(workdir, env, primary.port) as (a, b):
            yield Cluster(redis, primary, a, b)


def test_an_address_verified_through_a_is_answered_by_b_from_redis(cluster: Cluster) -> None:
    user = cluster.new_user()
    hits_before = shared_hits(cluster.b)
    tx = cluster.a.rcpt(user)
    assert tx.code(user) == 250
    assert cluster.primary.probes_for(user) == 1
    # A writes the entry in the background, right after answering.
    wait_for(lambda: cluster.redis.keys("callahead:v1:valid:*") > 0, 5, what="the shared entry")
    tx = cluster.b.rcpt(user, body=True)
    assert tx.code(user) == 250
    assert tx.data is not None and tx.data[0] == 250
    assert cluster.primary.probes_for(user) == 1  # B did not probe
    assert shared_hits(cluster.b) == hits_before + 1
    # And the message accepted by B is delivered to the primary.
    wait_for(lambda: cluster.primary.mailbox(user), 30, what="delivery through B")
    # An unknown address is never shared: each backup asks the primary itself.
    unknown = cluster.new_address()
    assert cluster.a.rcpt(unknown).code(unknown) == 550
    assert cluster.b.rcpt(unknown).code(unknown) == 550
    assert cluster.primary.probes_for(unknown) == 2


def test_concurrent_rcpts_for_a_new_address_over_both_backups_make_one_probe(
    cluster: Cluster,
) -> None:
    user = cluster.new_user()
    # The primary takes its time, so that every RCPT arrives while the probe is in flight.
    cluster.primary.set_rcpt_reply(user, "250 2.1.5 OK", delay=0.5)
    waits_a = MetricsDelta(cluster.a.callahead)
    waits_b = MetricsDelta(cluster.b.callahead)
    backups = [cluster.a, cluster.b] * 10
    with ThreadPoolExecutor(len(backups)) as pool:
        codes = list(pool.map(lambda backup: backup.rcpt(user).code(user), backups))
    assert codes == [250] * 20
    assert cluster.primary.probes_for(user) == 1
    # One backup probed; the other waited on the cluster lock and took its answer.
    shared = waits_a("callahead_redis_lock_waits_total", outcome="shared") + waits_b(
        "callahead_redis_lock_waits_total", outcome="shared"
    )
    assert shared >= 1


def test_a_flush_through_a_is_seen_by_b(cluster: Cluster) -> None:
    user = cluster.new_user()
    assert cluster.a.rcpt(user).code(user) == 250
    wait_for(lambda: cluster.b.rcpt(user).code(user) == 250, 5, what="B to know it")
    assert cluster.primary.probes_for(user) == 1
    shown = cluster.b.callahead.cli("cache", "show", user)
    assert shown.returncode == 0 and "(shared: every backup)" in shown.stdout
    cluster.primary.remove_user(user)  # deleted on the primary
    flushed = cluster.a.callahead.cli("cache", "flush", user)
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.strip() == "flushed 1 entry (shared: every backup)"
    shown = cluster.b.callahead.cli("cache", "show", user)
    assert shown.returncode == 1, shown.stdout
    # B dropped its own copy too (the flush channel): it asks the primary again.
    assert cluster.b.rcpt(user).code(user) == 550
    assert cluster.primary.probes_for(user) == 2


def test_redis_down_and_back(cluster: Cluster) -> None:
    """Redis stopped: both backups answer right, each alone, within the probe timeout,
    and nothing accepted is lost; Redis back: sharing resumes."""
    known_before = cluster.new_user()
    assert cluster.a.rcpt(known_before).code(known_before) == 250
    cluster.redis.stop()
    try:
        for backup in (cluster.a, cluster.b):
            for _ in range(4):  # past the breaker's threshold
                known, unknown = cluster.new_user(), cluster.new_address()
                started = time.monotonic()
                tx = backup.rcpt(known, unknown, body=True)
                assert time.monotonic() - started < PROBE_TIMEOUT
                assert tx.code(known) == 250
                assert tx.code(unknown) == 550
                assert tx.data is not None and tx.data[0] == 250
                wait_for(functools.partial(cluster.primary.mailbox, known), 30, what="delivery")
            assert backup.counter("callahead_redis_breaker_open") == 1
        # A still knows what it verified before, from its own cache.
        assert cluster.a.rcpt(known_before).code(known_before) == 250
        assert cluster.primary.probes_for(known_before) == 1
    finally:
        cluster.redis.start()
    assert "is not answering" in cluster.a.callahead.log()

    def shared_again() -> bool:
        user = cluster.new_user()
        cluster.a.rcpt(user)
        cluster.b.rcpt(user)
        return cluster.primary.probes_for(user) == 1

    # The breaker lets a trial call through after its cooldown (5 s).
    wait_for(shared_again, 20, interval=0.5, what="sharing to resume")
    assert "answers again" in cluster.a.callahead.log()
    assert cluster.a.counter("callahead_redis_breaker_open") == 0


# -- Redis as untrusted input -------------------------------------------------------------


@contextlib.contextmanager
def writer(cluster: Cluster) -> Iterator[redispy.Redis]:
    """A client of that Redis that is no backup."""
    client = redispy.Redis.from_url(cluster.redis.url)
    try:
        yield client
    finally:
        client.close()


def test_a_forged_entry_is_believed_for_one_cache_ttl_at_most(cluster: Cluster) -> None:
    """An entry for 10 years: believed (whoever writes to Redis decides, README), but its
    TTL is cut to CALLAHEAD_CACHE_TTL at the first lookup, so it is verified again then
    (the expiry itself: tests/unit/caching/test_untrusted.py, with a short TTL)."""
    unknown = cluster.new_address()
    delta = MetricsDelta(cluster.b.callahead)
    with writer(cluster) as forger:
        forger.set(valid_key(unknown), "1", px=10 * 365 * 86400 * 1000)
        assert cluster.b.rcpt(unknown).code(unknown) == 250
        assert 0 < forger.pttl(valid_key(unknown)) <= CACHE_TTL * 1000
    assert cluster.primary.probes_for(unknown) == 0
    assert delta(INVALID, kind="entry") == 1
    assert "more than CALLAHEAD_CACHE_TTL" in cluster.b.callahead.log()


def test_garbage_entries_are_counted_and_ignored(cluster: Cluster) -> None:
    user, unknown = cluster.new_user(), cluster.new_address()
    delta = MetricsDelta(cluster.b.callahead)
    with writer(cluster) as forger:
        forger.set(valid_key(user), "garbage")
        forger.hset(valid_key(unknown), "valid", "1")  # a key of another type
        tx = cluster.b.rcpt(user, unknown)
    assert tx.code(user) == 250 and tx.code(unknown) == 550
    assert cluster.primary.probes_for(user) == 1  # as if nothing were there
    assert cluster.primary.probes_for(unknown) == 1
    assert delta(INVALID, kind="entry") == 2
    assert delta("callahead_redis_errors_total") == 0  # Redis is not "down" for it
    assert "is not one callahead writes: ignored" in cluster.b.callahead.log()


def test_a_forged_flush_costs_a_redis_round_trip_at_most(cluster: Cluster) -> None:
    """Flush messages are not authenticated (docs/design.md says why): a well-formed
    one drops local copies only, which Redis still holds; others are counted and
    ignored, and a flood past the rate clears instead of being read."""
    user = cluster.new_user()
    assert cluster.a.rcpt(user).code(user) == 250
    wait_for(lambda: cluster.b.rcpt(user).code(user) == 250, 5, what="B to know it")
    hits = shared_hits(cluster.b)
    delta = MetricsDelta(cluster.b.callahead)
    with writer(cluster) as forger:
        forger.publish(CHANNEL, b"\xff not json")
        forger.publish(CHANNEL, json.dumps({"all": True}))
        pipe = forger.pipeline(transaction=False)
        for _ in range(FLUSH_BURST + 100):
            pipe.publish(CHANNEL, json.dumps({"domain": DOMAIN}))
        pipe.execute()
    wait_for(lambda: delta(INVALID, kind="flush") >= 1 + 50, 10, what="the flood counted")
    assert cluster.b.rcpt(user).code(user) == 250
    assert shared_hits(cluster.b) == hits + 1  # from Redis, after the local copy went
    assert cluster.primary.probes_for(user) == 1
    assert "a flush message that callahead does not send" in cluster.b.callahead.log()


def test_a_forged_lock_costs_at_most_the_redis_timeout_after_the_first(cluster: Cluster) -> None:
    """A lock of the shape callahead writes, for a day, on each of 20 recipients: they
    cost 2 s each before (40 s); now the first one waits CALLAHEAD_REDIS_LOCK_WAIT, the
    others CALLAHEAD_REDIS_TIMEOUT. Last in this module: this backup stays wary of
    locks for a minute."""
    users = [cluster.new_user() for _ in range(20)]
    with writer(cluster) as forger:
        for user in users:
            forger.set(lock_key(user), "ab" * 16, px=86400 * 1000)
        started = time.monotonic()
        tx = cluster.b.rcpt(*users)
        took = time.monotonic() - started
        assert 0 < forger.pttl(lock_key(users[-1])) <= (PROBE_TIMEOUT + 1) * 1000
    assert [tx.code(user) for user in users] == [250] * 20
    assert all(cluster.primary.probes_for(user) == 1 for user in users)
    assert LOCK_WAIT <= took < LOCK_WAIT + 19 * REDIS_TIMEOUT + 8.0, took


# -- catch-all checks (issue 27, item 1) ---------------------------------------------------


def test_nothing_of_a_catch_all_check_reaches_redis() -> None:
    """Two backups (real ``callahead serve``, asked through the policy service) with
    catch-all checks on, one real redis-server, a primary that accepts every address:
    each backup's check finds it accepting all, and Redis holds the recipients' own
    entries and nothing of the checks (no entry, lock or control of a made-up address),
    so no backup takes a made-up address as its control."""
    domain = "catchall.test"
    with (
        make_workdir() as workdir,
        RedisServer(workdir) as redis,
        ScriptedServer(Script(rcpt_default="250 2.1.5 Ok")) as primary,
    ):
        env = {
            "CALLAHEAD_ROUTES": f"{domain}={hop(primary.port)}",
            "CALLAHEAD_PROBE_TIMEOUT": str(PROBE_TIMEOUT),
            "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
            "CALLAHEAD_CATCHALL_CHECK": "3600",
            "CALLAHEAD_REDIS_URL": redis.url,
        }
        backups = [CallaheadProcess(workdir, env, name=f"callahead-{n}") for n in "ab"]
        recipients = [f"first@{domain}", f"second@{domain}"]
        try:
            for callahead, rcpt in zip(backups, recipients, strict=True):
                callahead.start()
                assert b"action=" in ask_policy(callahead.policy_port, rcpt)
                wait_for(
                    lambda c=callahead: (
                        c.samples().get(  # type: ignore[misc]
                            ("callahead_domain_accepts_all", (("domain", domain),))
                        )
                        == 1.0
                    ),
                    10.0,
                    what="the check to find the primary accepting all",
                )
            made_up = [a for a in primary.rcpts() if a.startswith(CHECK_PREFIX)]
            assert len(made_up) == 2  # one check per backup
            # Every background write is done once the recipients' own entries are there.
            expected = {valid_key(r) for r in recipients} | {control_key(domain)}
            client = redispy.Redis.from_url(redis.url)
            try:
                wait_for(
                    lambda: {k.decode() for k in client.scan_iter("callahead:*")} == expected,
                    5.0,
                    what="only the recipients' entries in Redis",
                )
                control = client.get(control_key(domain))
                assert isinstance(control, bytes) and control.decode() in recipients
                for address in made_up:
                    assert client.exists(valid_key(address), lock_key(address)) == 0
            finally:
                client.close()
        finally:
            for callahead in backups:
                callahead.stop()
