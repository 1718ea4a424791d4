"""Prometheus metrics: the counters each decision moves, and the exposition."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from callahead.cache import PositiveCache
from callahead.metrics import PROBE_BUCKETS, Metrics
from callahead.policy import Action, Decision, Reason
from callahead.probe import ProbeResult, Stage, Verdict

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
        {
            "decision:accept/probe_valid": 1,
            "probe:valid": 1,
            "misses": 1,
            "duration_count": 1,
            "duration_sum": 0.25,
        },
    ),
    (
        Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "a@x", probe(Verdict.UNKNOWN, 0.5)),
        {
            "decision:reject/probe_unknown": 1,
            "probe:unknown": 1,
            "misses": 1,
            "duration_count": 1,
            "duration_sum": 0.5,
        },
    ),
    (
        Decision(Action.ACCEPT, Reason.PROBE_TEMPFAIL, "a@x", probe(Verdict.TEMPFAIL, 2.0)),
        {
            "decision:accept/probe_tempfail": 1,
            "probe:tempfail": 1,
            "misses": 1,
            "duration_count": 1,
            "duration_sum": 2.0,
        },
    ),
    (
        Decision(Action.DEFER, Reason.PROBE_TEMPFAIL, "a@x", probe(Verdict.TEMPFAIL, 1.0)),
        {
            "decision:defer/probe_tempfail": 1,
            "probe:tempfail": 1,
            "misses": 1,
            "duration_count": 1,
            "duration_sum": 1.0,
        },
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
]


@pytest.mark.parametrize(
    ("decision", "moved"), CASES, ids=[f"{d.action.value}-{d.reason.value}" for d, _ in CASES]
)
def test_observe_moves_exactly_the_right_counters(
    decision: Decision, moved: dict[str, float]
) -> None:
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
    metrics.observe(Decision(Action.ACCEPT, Reason.PROBE_VALID, "a@x", probe(Verdict.VALID, 0.03)))
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
    # Every outcome exists from the first scrape.
    assert outcomes == {"valid": 1, "unknown": 0, "tempfail": 0}
