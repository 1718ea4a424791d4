"""Two backup MXes as the shared cache's gate sees them (sharedcache.SharedGate on a real
redis-server): each its own local cache, metrics and probe counter."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from callahead.caching.cache import PositiveCache
from callahead.caching.redisstore import RedisStore
from callahead.caching.sharedcache import SharedGate
from callahead.frontends.metrics import Metrics
from callahead.probing.breaker import Breaker
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import ProbeResult, Stage, Verdict
from tests.harness.waiting import wait_until

HOPS = (Nexthop("127.0.0.1", 2525),)
TTL = 3600.0


def new_address(domain: str = "example.test") -> str:
    return f"u{uuid.uuid4().hex[:10]}@{domain}"


@dataclass
class Backup:
    """One backup MX as the gate sees it: its own local cache and probe counter."""

    gate: SharedGate
    metrics: Metrics
    probes: list[str] = field(default_factory=list)

    @property
    def local(self) -> PositiveCache:
        return self.gate.local

    def counted(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def ask(
        self,
        address: str,
        verdict: Verdict = Verdict.VALID,
        *,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> ProbeResult:
        async def run() -> ProbeResult:
            self.probes.append(address)
            if before is not None:
                await before()
            code = {Verdict.VALID: 250, Verdict.UNKNOWN: 550, Verdict.TEMPFAIL: 451}[verdict]
            return ProbeResult(verdict, Stage.RCPT, code, "scripted", 0.001, str(HOPS[0]))

        return await self.gate.probe(address, HOPS, False, run)


def backup(
    url: str,
    *,
    lock_wait: float = 2.0,
    timeout: float = 0.5,
    refresh_within: float = 0.0,
    breaker: Breaker | None = None,
    local_ttl: float = 60.0,
    ttl: float = TTL,
    probe_timeout: float = 5.0,
) -> Backup:
    metrics = Metrics()
    store = RedisStore(url, timeout=timeout, observer=metrics, breaker=breaker)
    gate = SharedGate(
        store,
        PositiveCache(ttl=local_ttl, maxsize=1000),
        ttl=ttl,
        lock_wait=lock_wait,
        probe_timeout=probe_timeout,
        refresh_within=refresh_within,
        refresh_limit=4,
        observer=metrics,
    )
    return Backup(gate, metrics)


async def settle(*backups: Backup) -> None:
    """Let the background writes (store, release) finish."""
    for b in backups:
        await wait_until(lambda b=b: not b.gate._tasks, what="background writes")  # type: ignore[misc]


async def closed(*backups: Backup) -> None:
    for b in backups:
        await b.gate.aclose()
