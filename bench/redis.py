"""The shared cache (``CALLAHEAD_REDIS_URL``): what the Redis path costs, and what it
saves across two backup MXes (``python -m bench.redis``, prints a Markdown table).

A real ``redis-server`` on loopback (Debian's, started and stopped here) and a real
stand-in primary (aiosmtpd, ``tests.harness.primary``); two "backups" in one process,
each with callahead's own decision core, local cache, probe engine and shared-cache gate
as ``serve`` builds them, driven on one event loop through ``Policy.decide_async`` (the
policy service's path: no Postfix, no milter thread handoff, so the figures are
callahead's own cost).

* **Warm cost**: per recipient, a hit in the local cache against a local miss answered
  by Redis (the local copy dropped before each ask), p50 and p99.
* **Cold workload over two backups**: every request picks a backup at random and an
  address from a skewed set (some hot, most seen a few times; a fifth unknown); counted:
  probes at the primary with and without Redis, the share of local misses that Redis
  answered (the cross-backup hit ratio) and Redis round trips per recipient.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.utils import HIREDIS_AVAILABLE
from tests.harness.fixtures import make_workdir
from tests.harness.primary import Primary
from tests.harness.redis import RedisServer

from callahead.caching.cache import PositiveCache
from callahead.caching.redisstore import RedisStore
from callahead.caching.sharedcache import SharedGate
from callahead.core.policy import Policy, Reason
from callahead.frontends.metrics import Metrics
from callahead.probing.engine import ProbeEngine
from callahead.process.assembly import engine_settings, local_ttl
from callahead.process.config import load_config
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import ProbeResult

DOMAIN = "bench.test"


class EngineProber:
    """The policy's prober, on the loop the benchmark runs (the policy service's path)."""

    def __init__(self, engine: ProbeEngine) -> None:
        self.engine = engine

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        raise NotImplementedError("the benchmark runs on the loop")

    async def probe_async(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        return await self.engine.probe(address, hops)


@dataclass
class Backup:
    policy: Policy
    cache: PositiveCache
    engine: ProbeEngine
    gate: SharedGate | None
    metrics: Metrics

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def aclose(self) -> None:
        if self.gate is not None:
            await self.gate.aclose()
        await self.engine.aclose()


def build(primary_port: int, redis_url: str) -> Backup:
    env = {
        "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{primary_port}",
        "CALLAHEAD_HELO_NAME": "backup.bench.test",
        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
        "CALLAHEAD_REDIS_URL": redis_url,
    }
    config = load_config(env)
    metrics = Metrics()
    cache = PositiveCache(ttl=local_ttl(config), maxsize=config.cache_size)
    gate = None
    if redis_url:
        gate = SharedGate(
            RedisStore(redis_url, timeout=config.redis_timeout, observer=metrics),
            cache,
            ttl=config.cache_ttl,
            lock_wait=config.redis_lock_wait,
            probe_timeout=config.probe_timeout,
            observer=metrics,
        )
    engine = ProbeEngine(engine_settings(config), metrics, known_valid=cache, cluster=gate)
    policy = Policy(
        routes=config.routes,
        cache=cache,
        prober=EngineProber(engine),
        tempfail_action=config.tempfail_action,
    )
    return Backup(policy, cache, engine, gate, metrics)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def warm(primary: Primary, redis_url: str, asks: int) -> dict[str, float]:
    backup = build(primary.port, redis_url)
    address = f"hot@{DOMAIN}"
    primary.add_user(address)
    await backup.policy.decide_async(address)  # probed once, written to Redis
    await asyncio.sleep(0.05)  # the background write
    local: list[float] = []
    shared: list[float] = []
    trips_before = backup.count("callahead_redis_round_trips_total")
    for _ in range(asks):
        started = time.perf_counter()
        decision = await backup.policy.decide_async(address)
        local.append(time.perf_counter() - started)
        assert decision.reason is Reason.CACHE_HIT
    local_trips = backup.count("callahead_redis_round_trips_total") - trips_before
    for _ in range(asks):
        backup.cache.discard(address)
        started = time.perf_counter()
        decision = await backup.policy.decide_async(address)
        shared.append(time.perf_counter() - started)
        assert decision.reason is Reason.SHARED_CACHE_HIT, decision
    shared_trips = backup.count("callahead_redis_round_trips_total") - trips_before - local_trips
    await backup.aclose()
    return {
        "local_p50": statistics.median(local) * 1e6,
        "local_p99": percentile(local, 0.99) * 1e6,
        "shared_p50": statistics.median(shared) * 1e6,
        "shared_p99": percentile(shared, 0.99) * 1e6,
        "local_trips": local_trips / asks,
        "shared_trips": shared_trips / asks,
    }


async def cold(
    primary: Primary, redis_url: str, addresses: list[str], requests: list[tuple[int, int]]
) -> dict[str, float]:
    backups = [build(primary.port, redis_url), build(primary.port, redis_url)]
    before = len(primary.rcpts)
    local_misses = 0
    for which, index in requests:
        decision = await backups[which].policy.decide_async(addresses[index])
        if decision.reason is not Reason.CACHE_HIT:
            local_misses += 1
        # Let the background write land, as it has between two real SMTP sessions.
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    probed = [r for r in primary.rcpts[before:] if not r.address.startswith("postmaster@")]
    hits = sum(b.count("callahead_redis_hits_total") for b in backups)
    trips = sum(b.count("callahead_redis_round_trips_total") for b in backups)
    for b in backups:
        await b.aclose()
    return {
        "probes": len(probed),
        "valid_probes": sum(1 for r in probed if r.code == 250),
        "local_misses": local_misses,
        "redis_hits": hits,
        "trips_per_rcpt": trips / len(requests),
    }


def workload(size: int, requests: int, seed: int) -> tuple[list[str], list[tuple[int, int]]]:
    """``size`` addresses (a fifth unknown) asked ``requests`` times, skewed (Pareto):
    a few hot ones, many asked a few times; each request to backup 0 or 1 at random."""
    rng = random.Random(seed)
    addresses = [f"user{i}@{DOMAIN}" for i in range(size)]
    asks = [
        (rng.randrange(2), min(size - 1, int(rng.paretovariate(1.0)) - 1 + rng.randrange(size)))
        if rng.random() < 0.5
        else (rng.randrange(2), min(size - 1, int(rng.paretovariate(1.2)) - 1))
        for _ in range(requests)
    ]
    return addresses, asks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis", description=__doc__)
    parser.add_argument("--asks", type=int, default=2000, help="warm asks per path")
    parser.add_argument("--addresses", type=int, default=2000, help="cold workload addresses")
    parser.add_argument("--requests", type=int, default=6000, help="cold workload requests")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    addresses, requests = workload(args.addresses, args.requests, args.seed)
    with make_workdir() as workdir, RedisServer(workdir) as redis:
        primary = Primary([a for i, a in enumerate(addresses) if i % 5 != 4])
        with primary:
            w = asyncio.run(warm(primary, redis.url, args.asks))
            redis.command("FLUSHALL")
            shared = asyncio.run(cold(primary, redis.url, addresses, requests))
            alone = asyncio.run(cold(primary, "", addresses, requests))
    distinct = len({index for _, index in requests})
    ratio = shared["redis_hits"] / shared["local_misses"] if shared["local_misses"] else 0.0
    parser_name = "hiredis" if HIREDIS_AVAILABLE else "redis-py's own (no hiredis)"
    print(f"Redis reply parser: {parser_name}\n")
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| warm, local cache hit, per recipient | p50 {w['local_p50']:.0f} µs, "
        f"p99 {w['local_p99']:.0f} µs, {w['local_trips']:.2f} Redis round trips |"
    )
    print(
        f"| warm, local miss answered by Redis, per recipient | p50 {w['shared_p50']:.0f} µs, "
        f"p99 {w['shared_p99']:.0f} µs, {w['shared_trips']:.2f} Redis round trips |"
    )
    print(
        f"| cold workload: {len(requests)} recipients, {distinct} distinct addresses "
        "(a fifth unknown), random backup of two | |"
    )
    for label, figures in (("two backups alone", alone), ("two backups sharing Redis", shared)):
        print(
            f"| probes at the primary, {label} | {figures['probes']:.0f} "
            f"({figures['valid_probes']:.0f} of valid addresses) |"
        )
    print(
        f"| cross-backup hit ratio (local misses answered by Redis) | {ratio:.2f} "
        f"({shared['redis_hits']:.0f} of {shared['local_misses']:.0f}) |"
    )
    valid_misses = shared["redis_hits"] + shared["valid_probes"]
    print(
        f"| the same, valid addresses only | {shared['redis_hits'] / valid_misses:.2f} "
        f"({shared['redis_hits']:.0f} of {valid_misses:.0f}) |"
    )
    print(f"| Redis round trips per recipient, cold workload | {shared['trips_per_rcpt']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
