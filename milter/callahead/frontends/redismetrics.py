"""The metrics of the shared cache (Redis) and of the site budget: a part of
``metrics.Metrics``, which is the stores' observer (redisstore.SharedObserver,
sitebudget's outcomes). Names are part of the product: docs/reference.md lists them."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from .redisgauges import RedisMasterCollector

REDIS_LOCK_WAIT_OUTCOMES = ("shared", "released", "timeout", "error")
REDIS_INVALID_KINDS = ("entry", "lock", "control", "flush", "budget")
"""caching.untrusted.INVALID_KINDS"""
SITE_BUDGET_OUTCOMES = ("granted", "waited", "refused", "unavailable")
"""caching.sitebudget.OUTCOMES"""


class RedisMetrics:
    """Redis's round trips, hits, lock waits, invalid values and master, and the site
    budget's outcomes."""

    def _init_redis(self, r: CollectorRegistry) -> None:
        self.redis_hits = Counter(
            "callahead_redis_hits",
            "Local cache misses found valid in the shared cache (Redis): no probe",
            registry=r,
        )
        self.redis_misses = Counter(
            "callahead_redis_misses",
            "Local cache misses not found in the shared cache (Redis)",
            registry=r,
        )
        self.redis_errors = Counter(
            "callahead_redis_errors",
            "Redis calls that failed or timed out (the recipient was handled as without Redis)",
            registry=r,
        )
        self.redis_round_trips = Counter(
            "callahead_redis_round_trips",
            "Redis commands or scripts sent (each one network round trip), failed ones too",
            registry=r,
        )
        self.redis_breaker_open = Gauge(
            "callahead_redis_breaker_open",
            "1 while Redis is treated as down (every backup goes on with its local cache "
            "alone); 0 when it is used, or not configured",
            registry=r,
        )
        self.redis_lock_waits = Counter(
            "callahead_redis_lock_waits",
            "Waits for another backup's probe of the same address, by outcome (shared: it "
            "found it valid; released: it did not, so this backup probed; timeout; error)",
            ["outcome"],
            registry=r,
        )
        for outcome in REDIS_LOCK_WAIT_OUTCOMES:
            self.redis_lock_waits.labels(outcome)
        self.redis_invalid_values = Counter(
            "callahead_redis_invalid",
            "Values read from Redis that callahead does not write, by kind (entry, lock, "
            "control, flush, budget); logged and ignored (a TTL over the cap is cut to it)",
            ["kind"],
            registry=r,
        )
        for kind in REDIS_INVALID_KINDS:
            self.redis_invalid_values.labels(kind)
        self.site_budget_outcomes = Counter(
            "callahead_site_budget",
            "Asks of a primary's site probe budget (CALLAHEAD_SITE_PRIMARY_RATE) by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in SITE_BUDGET_OUTCOMES:
            self.site_budget_outcomes.labels(outcome)
        self.redis_master = RedisMasterCollector(r)  # its .info: set behind Sentinel

    # -- the shared cache's observer (sharedcache.SharedObserver) ----------------------

    def watch_redis(self, breaker_open: Callable[[], bool]) -> None:
        self.redis_breaker_open.set_function(lambda: 1.0 if breaker_open() else 0.0)

    def redis_round_trip(self, ok: bool) -> None:
        self.redis_round_trips.inc()
        if not ok:
            self.redis_errors.inc()

    def redis_lookup(self, hit: bool) -> None:
        (self.redis_hits if hit else self.redis_misses).inc()

    def redis_lock_wait(self, outcome: str) -> None:
        self.redis_lock_waits.labels(outcome).inc()

    def redis_invalid(self, kind: str) -> None:
        self.redis_invalid_values.labels(kind).inc()

    def site_budget(self, outcome: str) -> None:
        self.site_budget_outcomes.labels(outcome).inc()
