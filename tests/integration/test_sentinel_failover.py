"""Several backup MXes sharing a Redis behind Sentinel, all real parts: a master, a replica
and three sentinels (Debian's redis-server and redis-sentinel, passwords on both), two
real Postfix backups (A and B) each with its own ``callahead serve``, and one primary
(the harness's stand-in, which records every probe).

A known address verified through A is a shared hit at B. Then the master is killed
(SIGKILL) while mail flows through both backups: every known user still gets 250, every
unknown 550, nothing is refused because of Redis, and sharing resumes through the
promoted replica within the sentinels' failover time plus CALLAHEAD_REDIS_TIMEOUT (and
the watch's 0.1 s). The figures are printed (``-s``): the failover time, the time with
no sharing, the recipients decided locally meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from callahead.caching.redisstore import valid_key
from tests.harness.fixtures import make_workdir
from tests.harness.primary import Primary
from tests.harness.sentinel import SentinelSet
from tests.harness.waiting import wait_for
from tests.integration import sites
from tests.integration.sites import shared_hits, site_env, two_backups

REDIS_TIMEOUT = 0.2  # the default
WATCH_DOWN = 0.1  # redismaster.WATCH_DOWN
ITERATION_SLACK = 0.5
"""Seconds one round of mail through both backups may add to when sharing is seen."""


Site = sites.Site[SentinelSet]


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with make_workdir() as workdir, SentinelSet(workdir) as redis, Primary([]) as primary:
        env = {
            **site_env(primary, 2.0),
            "CALLAHEAD_REDIS_TIMEOUT": str(REDIS_TIMEOUT),
            **redis.env(),
        }
        with two_backups(workdir, env, primary.port) as (a, b):
            yield Site(redis, primary, a, b, tag="s")


def test_a_known_address_verified_through_a_is_a_shared_hit_at_b(site: Site) -> None:
    user = site.new_user()
    hits = shared_hits(site.b)
    assert site.a.rcpt(user).code(user) == 250
    wait_for(lambda: site.redis.has_key(valid_key(user)), 5, what="the shared entry")
    assert site.b.rcpt(user).code(user) == 250
    assert site.primary.probes_for(user) == 1  # B did not probe
    assert shared_hits(site.b) == hits + 1
    master = f"127.0.0.1:{site.redis.master.port}"
    status = site.a.callahead.cli("status")
    assert f"redis: up, master {master} (Sentinel) since " in status.stdout, status
    assert f'callahead_redis_master_info{{address="{master}"}} 1.0' in site.b.callahead.scrape()
    for secret in (site.redis.data_password, site.redis.sentinel_password):
        assert secret not in site.a.callahead.log() + status.stdout


def _round(site: Site, veteran: str) -> tuple[bool, int, float]:
    """One round of mail through both backups: a new user and an unknown through A, then
    the same user, a veteran (verified long ago) and another unknown through B. Whether B
    took the user from Redis, the recipients, and the slowest RCPT reply."""
    user, unknown_a, unknown_b = site.new_user(), site.new_address(), site.new_address()
    tx = site.a.rcpt(user, unknown_a)
    slowest = max(tx.rcpt_seconds.values())
    assert (tx.code(user), tx.code(unknown_a)) == (250, 550), tx
    # A writes the entry right after answering: give it a moment, not more (Redis may be
    # gone, then B probes itself).
    deadline = time.monotonic() + 0.15
    while time.monotonic() < deadline and not site.redis.has_key(valid_key(user)):
        time.sleep(0.005)
    tx = site.b.rcpt(user, veteran, unknown_b)
    slowest = max(slowest, *tx.rcpt_seconds.values())
    assert (tx.code(user), tx.code(veteran), tx.code(unknown_b)) == (250, 250, 550), tx
    # The primary may see the user again, as the control of an unknown's probe: B's own
    # word says whether it took the user from Redis.
    hit = f"rcpt=<{user}> decision=accept reason=shared_cache_hit" in site.b.callahead.log()
    return hit, 5, slowest


def test_a_sigkill_of_the_master_under_mail_refuses_nothing_and_sharing_resumes(
    site: Site,
) -> None:
    veteran = site.new_user()
    assert site.a.rcpt(veteran).code(veteran) == 250
    old, new = site.redis.master.port, site.redis.replica.port
    for _ in range(3):  # sharing works before the kill
        shared, _count, _slowest = _round(site, veteran)
        assert shared
    site.redis.kill_master()
    killed = time.monotonic()
    switched = 0.0
    unshared_rounds = recipients = 0
    slowest = 0.0
    while True:
        if not switched and site.redis.sentinel_view(site.redis.sentinels[0]) == new:
            switched = time.monotonic()
        shared, count, slowest_now = _round(site, veteran)
        slowest = max(slowest, slowest_now)
        if shared:
            break
        unshared_rounds += 1
        recipients += count
        assert time.monotonic() - killed < 30, "sharing never resumed"
    resumed = time.monotonic()
    failover = (switched or resumed) - killed
    figures = {
        "failover_s": round(failover, 2),
        "no_sharing_s": round(resumed - killed, 2),
        "rounds_unshared": unshared_rounds,
        "recipients_decided_locally": recipients,
        "false_rejects": 0,  # every round asserted 250 for each known user
        "slowest_rcpt_s": round(slowest, 3),
    }
    print(f"sentinel failover figures: {figures}")
    assert unshared_rounds > 0  # the kill did cut sharing for a while
    # No recipient waited on Redis past its timeout (a local probe here takes ms).
    assert slowest < REDIS_TIMEOUT + 1.0
    assert resumed - killed <= failover + REDIS_TIMEOUT + WATCH_DOWN + ITERATION_SLACK
    for _ in range(3):  # and it goes on through the promoted replica
        shared, _count, _slowest = _round(site, veteran)
        assert shared
    promoted = f"127.0.0.1:{new}"
    for backup in (site.a, site.b):
        assert f"changed from 127.0.0.1:{old} to {promoted}" in backup.callahead.log()
        status = backup.callahead.cli("status").stdout
        assert f"redis: up, master {promoted} (Sentinel) since " in status, status
