"""Where the parts are put together: configuration in, a policy and its engine out.

The probe engine knows nothing of configuration parsing; this module turns a ``Config``
into the engine's settings and builds the decision core (cache, guard, engine behind a
``LoopProber``, and the shared cache in front of the engine when Redis is configured),
for ``callahead serve`` (server.py) and ``callahead probe`` (cli.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..caching.cache import PositiveCache
from ..caching.catchall import LoopCatchAll
from ..caching.controls import Controls
from ..caching.redisstore import RedisStore
from ..caching.refresh import LoopRefresher, refresh_limit
from ..caching.sharedcache import SharedGate
from ..caching.sitebudget import RedisSiteBudget
from ..core.guard import ClientGuard
from ..core.policy import Policy
from ..frontends.maillog.learning import Learner, RelayCheck
from ..frontends.metrics import Metrics
from ..probing.engine import EngineSettings, ProbeEngine
from ..probing.loop import HANDOFF_MARGIN, LoopProber, ProbeLoop
from ..routing.postfixmaps import PostfixRoutes
from ..routing.postfixsettings import PostfixSettings
from ..routing.resolve import DnsPython, MxResolver
from ..routing.router import LOOKUP_WAIT, Router
from ..routing.thishost import HostIdentity, LiveThisHost
from .config import Config
from .postfixconf import postfix_myhostname

log = logging.getLogger("callahead.sharedcache")

_SAME_NAMES = (
    "helo_name",
    "pool_size",
    "pool_idle",
    "max_probes",
    "probe_wait",
    "breaker_failures",
    "breaker_cooldown",
    "pool_max_age",
    "primary_rate",
)
"""EngineSettings fields that Config names the same (tests/unit/process checks them)."""


def engine_settings(config: Config, *, transcript: bool = False) -> EngineSettings:
    # The engine's settings named as the configuration names them, and the others.
    same = {name: getattr(config, name) for name in _SAME_NAMES}
    return EngineSettings(
        **same,
        sender=config.probe_sender,
        timeout=config.probe_timeout,
        tls=config.probe_tls,
        pipelining=config.probe_pipelining,
        fallback_sender=config.probe_fallback_sender,
        transcript=transcript,
    )


def host_identity(
    config: Config, postfix: PostfixSettings | None, previous: HostIdentity | None = None
) -> HostIdentity:
    """What this host is among MX hosts (resolve.py): ``postfix``'s myhostname, its
    inet_interfaces and proxy_interfaces, and the EHLO name; without ``postfix``, the
    local Postfix's myhostname (``postconf``), the EHLO name and every address of this
    host (Postfix's default ``inet_interfaces = all``). When that ``postconf`` gives no
    name, the names of ``previous`` (the identity in force) stay."""
    if postfix is not None:
        return HostIdentity.from_postfix([postfix.myhostname, config.helo_name], postfix.interfaces)
    myhostname = postfix_myhostname()
    if myhostname is None and previous is not None:
        return HostIdentity(previous.names, frozenset(), all_interfaces=True)
    return HostIdentity.from_postfix([myhostname or "", config.helo_name], ["all"])


def this_host(config: Config) -> LiveThisHost:
    """This host as it is now: ``host_identity``, with the interfaces' addresses
    re-read every ``thishost.INTERFACE_REFRESH`` seconds at an MX lookup."""
    return LiveThisHost(host_identity(config, config.postfix))


def build_resolver(
    config: Config, host: LiveThisHost | None = None
) -> tuple[MxResolver, DnsPython]:
    """The MX resolver of the engine (on ``host``, else a new ``this_host``), and its
    DNS client (whose cache SIGHUP flushes)."""
    dns_client = DnsPython(config.resolver)
    resolver = MxResolver(dns_client, host or this_host(config), allowed=config.mx_allow_networks)
    return resolver, dns_client


def build_router(
    config: Config, loop: ProbeLoop, dns_client: DnsPython, host: LiveThisHost
) -> Router:
    """The routes; a reload (SIGHUP) that reads the new Postfix settings also empties
    the DNS cache and puts this host as those settings say in force (``host``: the
    resolver's), its interfaces re-read."""
    postfix = None if config.postfix is None else PostfixRoutes(config.postfix)

    def reloaded() -> None:
        dns_client.flush()
        host.replace(host_identity(config, router.postfix_settings, host.identity))

    router = Router(config.routes, postfix, loop.run, on_reload=reloaded)
    return router


@dataclass(frozen=True, slots=True)
class Parts:
    """The decision core and what it is built on, for the server to run and stop."""

    policy: Policy
    cache: PositiveCache
    engine: ProbeEngine
    prober: LoopProber
    refresher: LoopRefresher
    router: Router
    catchall: LoopCatchAll | None = None
    """None when CALLAHEAD_CATCHALL_CHECK is 0."""
    shared: SharedGate | None = None
    """The shared cache (``CALLAHEAD_REDIS_URL``), if configured and not refused."""
    resolver: MxResolver | None = None
    """The engine's MX resolver (the cache that learns checks relays against it)."""


def local_ttl(config: Config) -> float:
    """Seconds a positive answer stays in this backup's own cache: with Redis, a short
    while in front of it (``CALLAHEAD_REDIS_LOCAL_TTL``)."""
    if config.shared_redis:
        return min(config.cache_ttl, config.redis_local_ttl)
    return config.cache_ttl


def shared_delay(config: Config) -> float:
    """The longest the shared cache can add to an answer (0 without it)."""
    if not config.shared_redis:
        return 0.0
    return config.redis_lock_wait + 3 * config.redis_timeout


def route_wait(config: Config) -> float:
    """The longest a recipient can wait for its route before the probe: the Postfix map
    lookups (``LOOKUP_WAIT``) with ``CALLAHEAD_POSTFIX_CONFIG``, else nothing
    (``CALLAHEAD_ROUTES`` is in memory)."""
    return LOOKUP_WAIT if config.postfix is not None else 0.0


def answer_time(config: Config) -> float:
    """The longest an answer to one recipient can take: its route lookup, a wait for a
    probe slot, the probe, the shared cache's waits and the thread handoff. What must
    stay below Postfix's ``milter_command_timeout``."""
    return (
        route_wait(config)
        + engine_settings(config).longest_answer
        + shared_delay(config)
        + HANDOFF_MARGIN
    )


def site_budget(
    config: Config, shared: SharedGate | None, metrics: Metrics
) -> RedisSiteBudget | None:
    """Each primary's probe budget over every backup (``CALLAHEAD_SITE_PRIMARY_RATE``),
    kept in the shared cache's Redis; None when it is off, or there is no Redis."""
    if config.site_primary_rate <= 0:
        return None
    if shared is None:
        log.warning(
            "CALLAHEAD_SITE_PRIMARY_RATE=%g is not used: it is kept in the shared Redis, "
            "and there is none (CALLAHEAD_REDIS_URL); CALLAHEAD_PRIMARY_RATE alone applies",
            config.site_primary_rate,
        )
        return None
    return RedisSiteBudget(
        shared.store, config.site_primary_rate, longest_wait=config.probe_wait, observer=metrics
    )


def build_policy(config: Config, loop: ProbeLoop, metrics: Metrics) -> Parts:
    host = this_host(config)
    resolver, dns_client = build_resolver(config, host)
    router = build_router(config, loop, dns_client, host)
    cache = PositiveCache(ttl=local_ttl(config), maxsize=config.cache_size)
    refresh_within = config.cache_ttl * config.cache_refresh
    shared: SharedGate | None = None
    engine: ProbeEngine | None = None
    if config.redis_refused:
        log.error(
            "%s is not used: %s; the shared cache is off, and this "
            "backup verifies every recipient alone (as while Redis is down)",
            config.redis_shown,
            config.redis_refused,
        )
    if config.shared_redis:
        store = RedisStore(config.shared_redis, timeout=config.redis_timeout, observer=metrics)
        metrics.redis_master.info = lambda: store.master_info
        shared = SharedGate(
            store,
            cache,
            ttl=config.cache_ttl,
            lock_wait=config.redis_lock_wait,
            probe_timeout=config.probe_timeout,
            refresh_within=refresh_within,
            refresh_limit=refresh_limit(config.max_probes),
            free_slot=lambda: engine is not None and engine.has_free_slot,
            observer=metrics,
        )
        # Refresh ahead is the shared cache's: local entries live too short for it.
        refresh_within = 0.0
    engine = ProbeEngine(
        engine_settings(config),
        metrics,
        known_valid=cache,
        resolver=resolver,
        cluster=shared,
        controls=Controls(cache, shared, config.controls),
        site_budget=site_budget(config, shared, metrics),
    )
    prober = LoopProber(
        loop, engine, wait=engine.settings.longest_answer + shared_delay(config) + HANDOFF_MARGIN
    )
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
        routes=router,
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
        refresh_within=refresh_within,
        catchall=catchall,
    )
    return Parts(policy, cache, engine, prober, refresher, router, catchall, shared, resolver)


def build_learner(config: Config, parts: Parts, loop: ProbeLoop, metrics: Metrics) -> Learner:
    """The cache that learns from the mail log (frontends/maillog/learning.py)."""
    check = RelayCheck(parts.router, parts.resolver)
    return Learner(
        parts.cache,
        check,
        loop.submit,
        metrics.maillog,
        shared=parts.shared,
        shared_ttl=config.cache_ttl,
    )
