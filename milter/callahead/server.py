"""Assemble the running milter: probe loop, cache, policy, metrics, libmilter."""

from __future__ import annotations

import logging

import Milter

from .adapter import CallaheadMilter
from .cache import PositiveCache
from .config import Config
from .loop import LoopProber, ProbeLoop
from .metrics import Metrics
from .policy import Policy
from .probe import SmtpProber

log = logging.getLogger(__name__)

EX_UNAVAILABLE = 69


def build_policy(config: Config, loop: ProbeLoop) -> tuple[Policy, PositiveCache]:
    cache = PositiveCache(ttl=config.cache_ttl, maxsize=config.cache_size)
    prober = SmtpProber(
        helo_name=config.helo_name, sender=config.probe_sender, timeout=config.probe_timeout
    )
    policy = Policy(
        routes=config.routes,
        cache=cache,
        prober=LoopProber(loop, prober, config.probe_timeout),
        tempfail_action=config.tempfail_action,
    )
    return policy, cache


def serve(config: Config) -> int:
    """Run until libmilter stops (SIGTERM, SIGINT). Returns the exit status."""
    loop = ProbeLoop()
    policy, cache = build_policy(config, loop)
    metrics = Metrics()
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
        loop.stop()
    log.info("callahead stopped")
    return 0
