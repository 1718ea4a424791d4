"""The site probe budget (``CALLAHEAD_SITE_PRIMARY_RATE``): what it adds to each probe
(``python -m bench.sitebudget``, prints a Markdown table).

A real ``redis-server`` on loopback (Debian's, started and stopped here) and a real
stand-in primary (aiosmtpd, ``tests.harness.primary``), on one event loop:

* **the token**: one ``RedisSiteBudget.take`` with a token there (a rate so high that it
  never runs out): the script's round trip, which is all a probe pays when it does not
  have to wait; beside it a bare ``PING`` through the same store, and the local bucket;
* **a probe**: a whole probe of a known user by callahead's engine (a pooled session,
  one RCPT), with and without the site budget, in alternating rounds so that the
  machine's load falls on both alike; the difference of the medians is the added cost.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

from tests.harness.fixtures import make_workdir
from tests.harness.primary import Primary
from tests.harness.redis import RedisServer

from callahead.caching.redisstore import RedisStore
from callahead.caching.sitebudget import RedisSiteBudget
from callahead.probing.budget import TokenBucket
from callahead.probing.engine import ProbeEngine
from callahead.process.assembly import engine_settings
from callahead.process.config import load_config
from callahead.routing.routes import Nexthop

DOMAIN = "bench.test"
RATE = 100_000.0
"""The highest CALLAHEAD_SITE_PRIMARY_RATE: never out of tokens here."""


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def row(name: str, seconds: list[float]) -> str:
    return (
        f"| {name} | p50 {statistics.median(seconds) * 1e6:.0f} µs, "
        f"p99 {percentile(seconds, 0.99) * 1e6:.0f} µs |"
    )


async def timed(samples: list[float], work: Callable[[], Awaitable[object]]) -> None:
    started = time.perf_counter()
    await work()
    samples.append(time.perf_counter() - started)


async def measure(redis_url: str, primary: Primary, asks: int, rounds: int) -> list[str]:
    store = RedisStore(redis_url, timeout=0.2)
    site = RedisSiteBudget(store, RATE, longest_wait=2.0)
    local = TokenBucket(RATE)
    primary_name = f"[127.0.0.1]:{primary.port}"
    token: list[float] = []
    ping: list[float] = []
    bucket: list[float] = []
    await site.take(primary_name, 0.0)  # the script loaded
    for _ in range(asks):
        await timed(token, lambda: site.take(primary_name, 0.0))
        await timed(ping, lambda: store.call("ping", store.client.ping))
        await timed(bucket, lambda: local.take(0.0))

    config = load_config(
        {
            "CALLAHEAD_ROUTES": f"{DOMAIN}={primary_name}",
            "CALLAHEAD_HELO_NAME": "backup.bench.test",
            "CALLAHEAD_PROBE_PIPELINING": "no",
        }
    )
    hops = [Nexthop("127.0.0.1", primary.port)]
    engines = {
        "without": ProbeEngine(engine_settings(config)),
        "with": ProbeEngine(engine_settings(config), site_budget=site),
    }
    probes: dict[str, list[float]] = {name: [] for name in engines}
    users = [f"u{n}@{DOMAIN}" for n in range(rounds * 20 * 2)]
    for user in users:
        primary.add_user(user)
    n = 0
    for _ in range(rounds):
        for name, engine in engines.items():  # alternating rounds of 20 probes
            for _ in range(20):
                address = users[n]
                n += 1
                await timed(probes[name], functools.partial(engine.probe, address, hops))
    for engine in engines.values():
        await engine.aclose()
    await store.aclose()
    added = statistics.median(probes["with"]) - statistics.median(probes["without"])
    return [
        "| measure | value |",
        "|---|---|",
        row("site budget token (one Lua script, `EVALSHA`)", token),
        row("bare `PING` through the same store", ping),
        row("local budget token (`CALLAHEAD_PRIMARY_RATE`)", bucket),
        row("a probe of a known user, no site budget", probes["without"]),
        row("a probe of a known user, with the site budget", probes["with"]),
        f"| added per probe (difference of the medians) | {added * 1e6:.0f} µs |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sitebudget", description=__doc__)
    parser.add_argument("--asks", type=int, default=2000, help="token asks per path")
    parser.add_argument("--rounds", type=int, default=25, help="rounds of 20 probes per side")
    args = parser.parse_args(argv)
    with make_workdir() as workdir, RedisServer(workdir) as redis, Primary([]) as primary:
        lines = asyncio.run(measure(redis.url, primary, args.asks, args.rounds))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
