"""The engine's settings as assembly.py builds them from the configuration."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace
from typing import cast

import pytest

from callahead.caching.redisstore import RedisStore
from callahead.caching.sharedcache import SharedGate
from callahead.caching.sitebudget import RedisSiteBudget
from callahead.frontends.metrics import Metrics
from callahead.process.assembly import engine_settings, site_budget
from callahead.process.config import load_config


def test_every_engine_setting_comes_from_its_variable() -> None:
    config = load_config(
        {
            "CALLAHEAD_HELO_NAME": "backup.example.net",
            "CALLAHEAD_PROBE_SENDER": "probe@example.net",
            "CALLAHEAD_PROBE_FALLBACK_SENDER": "fallback@example.net",
            "CALLAHEAD_PROBE_TIMEOUT": "7",
            "CALLAHEAD_POOL_SIZE": "3",
            "CALLAHEAD_POOL_IDLE": "11",
            "CALLAHEAD_MAX_PROBES": "13",
            "CALLAHEAD_PROBE_WAIT": "1.5",
            "CALLAHEAD_BREAKER_FAILURES": "4",
            "CALLAHEAD_BREAKER_COOLDOWN": "17",
            "CALLAHEAD_POOL_MAX_AGE": "19",
            "CALLAHEAD_PRIMARY_RATE": "2.5",
            "CALLAHEAD_PROBE_PIPELINING": "no",
        }
    )
    settings = engine_settings(config, transcript=True)
    assert dataclasses.asdict(settings) == {
        "helo_name": "backup.example.net",
        "sender": "probe@example.net",
        "timeout": 7.0,
        "tls": config.probe_tls,
        "pool_size": 3,
        "pool_idle": 11.0,
        "max_probes": 13,
        "probe_wait": 1.5,
        "breaker_failures": 4,
        "breaker_cooldown": 17.0,
        "pool_max_age": 19.0,
        "fallback_sender": "fallback@example.net",
        "transcript": True,
        "primary_rate": 2.5,
        "pipelining": False,
    }


def test_the_site_budget_is_built_with_a_shared_redis_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    url = "redis://127.0.0.1:9/0"
    shared = cast(SharedGate, SimpleNamespace(store=RedisStore(url, timeout=0.2)))
    off = load_config({"CALLAHEAD_REDIS_URL": url})
    assert site_budget(off, shared, metrics) is None
    on = load_config({"CALLAHEAD_REDIS_URL": url, "CALLAHEAD_SITE_PRIMARY_RATE": "40"})
    built = site_budget(on, shared, metrics)
    assert isinstance(built, RedisSiteBudget) and built.rate == 40.0
    alone = load_config({"CALLAHEAD_SITE_PRIMARY_RATE": "40"})
    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        assert site_budget(alone, None, metrics) is None
    [line] = [r.getMessage() for r in caplog.records]
    assert "CALLAHEAD_SITE_PRIMARY_RATE=40 is not used" in line
