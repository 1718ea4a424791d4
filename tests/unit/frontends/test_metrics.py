"""Prometheus metrics: the counters each decision moves, and the exposition."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from callahead.caching.cache import PositiveCache
from callahead.core.policy import Action, Decision, Reason
from callahead.frontends.metrics import PROBE_BUCKETS, Metrics
from callahead.probing.engine import PrimaryState
from callahead.smtp.verdict import ProbeResult, Skip, Stage, Verdict

FIXED_NAMES = (
    "callahead_rcpt_decisions_total",
    "callahead_probes_total",
    "callahead_probe_duration_seconds",
    "callahead_cache_hits_total",
    "callahead_cache_misses_total",
    "callahead_cache_entries",
)


def probe(verdict: Verdict, duration: float = 0.2) -> ProbeResult:
    return ProbeResult(verdict, Stage.RCPT, 250, "", duration, "[mx]:25")


def skipped(skip: Skip) -> ProbeResult:
    return ProbeResult(Verdict.TEMPFAIL, Stage.CONNECT, None, "", 0.0, "[mx]:25", False, skip)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def snapshot(metrics: Metrics) -> dict[str, float]:
    decisions = {
        f"decision:{a.value}/{r.value}": value(
            metrics, "callahead_rcpt_decisions_total", decision=a.value, reason=r.value
        )
        for a in Action
        for r in Reason
    }
    probes = {
        f"probe:{v.value}": value(metrics, "callahead_probes_total", outcome=v.value)
        for v in Verdict
    }
    return {
        **decisions,
        **probes,
        "hits": value(metrics, "callahead_cache_hits_total"),
        "misses": value(metrics, "callahead_cache_misses_total"),
        "duration_count": value(metrics, "callahead_probe_duration_seconds_count"),
        "duration_sum": value(metrics, "callahead_probe_duration_seconds_sum"),
    }


CASES: list[tuple[Decision, dict[str, float]]] = [
    (
        Decision(Action.ACCEPT, Reason.CACHE_HIT, "a@x"),
        {"decision:accept/cache_hit": 1, "hits": 1},
    ),
    (
        Decision(Action.ACCEPT, Reason.PROBE_VALID, "a@x", probe(Verdict.VALID, 0.25)),
        {"decision:accept/probe_valid": 1, "misses": 1},
    ),
    (
        Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "a@x", probe(Verdict.UNKNOWN, 0.5)),
        {"decision:reject/probe_unknown": 1, "misses": 1},
    ),
    (
        Decision(Action.ACCEPT, Reason.PROBE_TEMPFAIL, "a@x", probe(Verdict.TEMPFAIL, 2.0)),
        {"decision:accept/probe_tempfail": 1, "misses": 1},
    ),
    (
        Decision(Action.DEFER, Reason.PROBE_TEMPFAIL, "a@x", probe(Verdict.TEMPFAIL, 1.0)),
        {"decision:defer/probe_tempfail": 1, "misses": 1},
    ),
    (
        Decision(Action.SKIP, Reason.UNROUTED, "a@x"),
        {"decision:skip/unrouted": 1},
    ),
    (
        Decision(Action.ACCEPT, Reason.BAD_ADDRESS, "a@x"),
        {"decision:accept/bad_address": 1, "misses": 1},
    ),
    (
        Decision(Action.DEFER, Reason.ERROR, "a@x"),
        {"decision:defer/error": 1},
    ),
    (
        Decision(Action.DEFER, Reason.CLIENT_LIMIT, "a@x"),
        {"decision:defer/client_limit": 1, "misses": 1},
    ),
    (
        Decision(Action.ACCEPT, Reason.OVERLOAD, "a@x", skipped(Skip.OVERLOAD)),
        {"decision:accept/overload": 1, "misses": 1},
    ),
    (
        Decision(Action.DEFER, Reason.PRIMARY_DOWN, "a@x", skipped(Skip.PRIMARY_DOWN)),
        {"decision:defer/primary_down": 1, "misses": 1},
    ),
]


@pytest.mark.parametrize(
    ("decision", "moved"), CASES, ids=[f"{d.action.value}-{d.reason.value}" for d, _ in CASES]
)
def test_observe_moves_exactly_the_right_counters(
    decision: Decision, moved: dict[str, float]
) -> None:
    # Probes are counted by the engine where they are made (one probe can serve several
    # coalesced decisions): observe never moves the probe counters or the histogram.
    metrics = Metrics()
    before = snapshot(metrics)
    assert all(v == 0 for v in before.values())
    metrics.observe(decision)
    after = snapshot(metrics)
    changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert changed == pytest.approx(moved)
    assert set(changed) == set(moved)


def test_observe_accumulates() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.observe(Decision(Action.ACCEPT, Reason.CACHE_HIT, "a@x"))
    metrics.observe(Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "b@x", probe(Verdict.UNKNOWN)))
    assert value(metrics, "callahead_cache_hits_total") == 3
    assert value(metrics, "callahead_cache_misses_total") == 1
    assert (
        value(metrics, "callahead_rcpt_decisions_total", decision="accept", reason="cache_hit") == 3
    )


def test_probe_duration_buckets() -> None:
    metrics = Metrics()
    metrics.probe_duration.observe(0.03)
    assert value(metrics, "callahead_probe_duration_seconds_bucket", le="0.025") == 0
    assert value(metrics, "callahead_probe_duration_seconds_bucket", le="0.05") == 1
    assert value(metrics, "callahead_probe_duration_seconds_bucket", le="+Inf") == 1
    assert list(PROBE_BUCKETS) == sorted(PROBE_BUCKETS)
    assert PROBE_BUCKETS[-1] >= 10  # the default probe timeout fits in a finite bucket


def test_cache_entries_tracks_the_cache() -> None:
    metrics = Metrics()
    cache = PositiveCache(ttl=60, maxsize=10)
    metrics.track_cache_size(cache.__len__)
    assert value(metrics, "callahead_cache_entries") == 0
    cache.add("a@x")
    cache.add("b@x")
    assert value(metrics, "callahead_cache_entries") == 2


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe(Decision(Action.ACCEPT, Reason.CACHE_HIT, "a@x"))
    assert value(a, "callahead_cache_hits_total") == 1
    assert value(b, "callahead_cache_hits_total") == 0


def test_exposition_parses_and_has_the_fixed_names() -> None:
    metrics = Metrics()
    cache = PositiveCache(ttl=60, maxsize=10)
    cache.add("a@x")
    metrics.track_cache_size(cache.__len__)
    metrics.observe(Decision(Action.ACCEPT, Reason.PROBE_VALID, "a@x", probe(Verdict.VALID)))
    metrics.observe(Decision(Action.SKIP, Reason.UNROUTED, "b@y"))
    text = generate_latest(metrics.registry).decode("utf-8")
    families = list(text_string_to_metric_families(text))
    samples = {s.name: s for f in families for s in f.samples}
    sample_names = set(samples)
    for name in FIXED_NAMES:
        assert any(n == name or n.startswith(name + "_") for n in sample_names), name
    types = {f.name: f.type for f in families}
    assert types["callahead_rcpt_decisions"] == "counter"
    assert types["callahead_probes"] == "counter"
    assert types["callahead_probe_duration_seconds"] == "histogram"
    assert types["callahead_cache_hits"] == "counter"
    assert types["callahead_cache_misses"] == "counter"
    assert types["callahead_cache_entries"] == "gauge"
    assert samples["callahead_cache_entries"].value == 1
    decisions = {
        (s.labels["decision"], s.labels["reason"]): s.value
        for f in families
        for s in f.samples
        if s.name == "callahead_rcpt_decisions_total"
    }
    assert decisions == {("accept", "probe_valid"): 1, ("skip", "unrouted"): 1}
    outcomes = {
        s.labels["outcome"]: s.value
        for f in families
        for s in f.samples
        if s.name == "callahead_probes_total"
    }
    # Every outcome exists from the first scrape; decisions do not count probes.
    assert outcomes == {"valid": 0, "unknown": 0, "tempfail": 0}


NEW_NAMES = {
    "callahead_probes_in_flight": "gauge",
    "callahead_probe_connections": "counter",
    "callahead_pool_sessions": "gauge",
    "callahead_coalesced_waits": "counter",
    "callahead_primary_reached": "gauge",
    "callahead_breaker_open": "gauge",
    "callahead_primary_refuses_prober": "gauge",
    "callahead_errors": "counter",
}


def test_exposition_has_the_engine_metrics() -> None:
    metrics = Metrics()
    primary = "[mx.example.com]:25"
    metrics.probe_started()
    metrics.connection_opened(primary)
    metrics.coalesced_wait()
    metrics.coalesced_wait()
    # The per-primary gauges are read from the engine's state at scrape time.
    metrics.watch_primaries(
        lambda: [
            PrimaryState(
                name=primary,
                open_sessions=3,
                breaker_open=False,
                reached=True,
                refuses_prober=True,
            )
        ]
    )
    metrics.observe(Decision(Action.DEFER, Reason.CLIENT_LIMIT, "a@x"))
    metrics.observe(Decision(Action.ACCEPT, Reason.OVERLOAD, "b@x", skipped(Skip.OVERLOAD)))
    text = generate_latest(metrics.registry).decode("utf-8")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in NEW_NAMES.items():
        assert families[name].type == kind, name
    assert value(metrics, "callahead_probes_in_flight") == 1
    assert value(metrics, "callahead_probe_connections_total", primary=primary) == 1
    assert value(metrics, "callahead_pool_sessions", primary=primary) == 3
    assert value(metrics, "callahead_coalesced_waits_total") == 2
    assert value(metrics, "callahead_primary_reached", primary=primary) == 1
    assert value(metrics, "callahead_breaker_open", primary=primary) == 0
    assert value(metrics, "callahead_primary_refuses_prober", primary=primary) == 1
    assert (
        value(metrics, "callahead_rcpt_decisions_total", decision="defer", reason="client_limit")
        == 1
    )
    assert (
        value(metrics, "callahead_rcpt_decisions_total", decision="accept", reason="overload") == 1
    )
