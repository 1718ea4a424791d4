"""Assemble the running milter: probe loop, cache, policy, metrics, libmilter."""

from __future__ import annotations

import logging

import Milter

from .adapter import CallaheadMilter
from .cache import PositiveCache
from .config import Config
from .engine import EngineSettings, ProbeEngine
from .guard import ClientGuard
from .loop import HANDOFF_MARGIN, LoopProber, ProbeLoop
from .metrics import Metrics
from .policy import Policy

log = logging.getLogger(__name__)

EX_UNAVAILABLE = 69
MILTER_COMMAND_TIMEOUT = 30
"""Postfix's default milter_command_timeout, in seconds."""


def build_policy(
    config: Config, loop: ProbeLoop, metrics: Metrics
) -> tuple[Policy, PositiveCache, ProbeEngine]:
    cache = PositiveCache(ttl=config.cache_ttl, maxsize=config.cache_size)
    engine = ProbeEngine(EngineSettings.from_config(config), metrics, known_valid=cache)
    policy = Policy(
        routes=config.routes,
        cache=cache,
        prober=LoopProber(loop, engine),
        tempfail_action=config.tempfail_action,
        guard=ClientGuard(
            limit=config.client_unknown_limit,
            window=config.client_window,
            ipv6_prefix=config.client_ipv6_prefix,
        ),
    )
    return policy, cache, engine


def serve(config: Config) -> int:
    """Run until libmilter stops (SIGTERM, SIGINT). Returns the exit status."""
    loop = ProbeLoop()
    metrics = Metrics()
    policy, cache, engine = build_policy(config, loop, metrics)
    longest = engine.settings.longest_answer + HANDOFF_MARGIN
    if longest >= MILTER_COMMAND_TIMEOUT:
        log.warning(
            "CALLAHEAD_PROBE_WAIT + CALLAHEAD_PROBE_TIMEOUT allow answers of up to %.0f s: "
            "set Postfix's milter_command_timeout above that (its default is %d s)",
            longest,
            MILTER_COMMAND_TIMEOUT,
        )
    metrics.track_cache_size(cache.__len__)
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        try:
            metrics.serve(host, port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
            return EX_UNAVAILABLE
    loop.start()
    Milter.factory = lambda: CallaheadMilter(policy, metrics)
    # callahead changes nothing in a message; it only asks for its macros and replies.
    Milter.set_flags(Milter.SETSYMLIST)
    log.info(
        "callahead listening on %s; routes: %s; metrics: %s",
        config.socket,
        " ".join(f"{d}={h}" for d, h in config.routes.entries()),
        "off" if config.metrics_listen is None else "{}:{}".format(*config.metrics_listen),
    )
    try:
        Milter.runmilter("callahead", config.milter_socket, timeout=300)
    except Milter.milter.error as exc:
        log.error("milter stopped: %s (socket %s)", exc, config.socket)
        return EX_UNAVAILABLE
    finally:
        try:
            loop.run(engine.aclose(), timeout=5)
        except TimeoutError:
            log.warning("probe sessions did not close in time")
        loop.stop()
    log.info("callahead stopped")
    return 0
