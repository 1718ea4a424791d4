"""Where the parts are put together: configuration in, a policy and its engine out.

The probe engine knows nothing of configuration parsing; this module turns a ``Config``
into the engine's settings and builds the decision core (cache, guard, engine behind a
``LoopProber``), for ``callahead serve`` (server.py) and ``callahead probe`` (cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import PositiveCache
from .catchall import LoopCatchAll
from .config import Config
from .engine import EngineSettings, ProbeEngine
from .guard import ClientGuard
from .loop import LoopProber, ProbeLoop
from .metrics import Metrics
from .policy import Policy
from .refresh import LoopRefresher, refresh_limit


def engine_settings(config: Config, *, transcript: bool = False) -> EngineSettings:
    return EngineSettings(
        helo_name=config.helo_name,
        sender=config.probe_sender,
        timeout=config.probe_timeout,
        tls=config.probe_tls,
        pool_size=config.pool_size,
        pool_idle=config.pool_idle,
        max_probes=config.max_probes,
        probe_wait=config.probe_wait,
        breaker_failures=config.breaker_failures,
        breaker_cooldown=config.breaker_cooldown,
        pool_max_age=config.pool_max_age,
        fallback_sender=config.probe_fallback_sender,
        transcript=transcript,
        primary_rate=config.primary_rate,
    )


@dataclass(frozen=True, slots=True)
class Parts:
    """The decision core and what it is built on, for the server to run and stop."""

    policy: Policy
    cache: PositiveCache
    engine: ProbeEngine
    prober: LoopProber
    refresher: LoopRefresher
    catchall: LoopCatchAll | None = None
    """None when CALLAHEAD_CATCHALL_CHECK is 0."""


def build_policy(config: Config, loop: ProbeLoop, metrics: Metrics) -> Parts:
    cache = PositiveCache(ttl=config.cache_ttl, maxsize=config.cache_size)
    engine = ProbeEngine(engine_settings(config), metrics, known_valid=cache)
    prober = LoopProber(loop, engine)
    refresher = LoopRefresher(
        loop,
        engine,
        cache,
        limit=refresh_limit(config.max_probes),
        on_outcome=metrics.refreshed,
    )
    catchall = None
    if config.catchall_check > 0:
        catchall = LoopCatchAll(
            loop,
            engine,
            cache,
            interval=config.catchall_check,
            on_check=metrics.catchall_checked,
            on_state=metrics.domain_state,
        )
    policy = Policy(
        routes=config.routes,
        cache=cache,
        prober=prober,
        tempfail_action=config.tempfail_action,
        guard=ClientGuard(
            limit=config.client_unknown_limit,
            window=config.client_window,
            ipv6_prefix=config.client_ipv6_prefix,
        ),
        dry_run=config.dry_run,
        refresher=refresher,
        refresh_within=config.cache_ttl * config.cache_refresh,
        catchall=catchall,
    )
    return Parts(policy, cache, engine, prober, refresher, catchall)
