"""Every metric name the alerts, their unit tests and the dashboard use is one that
callahead's /metrics really exposes (scraped from a real ``callahead serve``), and every
label they match or group by is one that metric has (from callahead's ``Metrics`` with
every series exercised)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import generate_latest

from callahead.caching.redismaster import MasterInfo
from callahead.core.policy import Action, Decision, Reason
from callahead.frontends.metrics import Metrics
from callahead.probing.engine import PrimaryState
from callahead.smtp.verdict import Basis, ProbeResult, Stage, Verdict
from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir

from .promql import (
    ALERTS_TEST,
    alert_rules,
    dashboard_exprs,
    expand_variables,
    grouping_labels,
    metric_names,
    recorded_names,
    selector_labels,
)

TARGET_LABELS = {"job", "instance"}
"""Added by Prometheus to every scraped series."""
PROMETHEUS_SERIES = {"up": TARGET_LABELS}
"""Series Prometheus itself makes for a scrape target."""
SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}


def sample_names(exposition: str) -> set[str]:
    """The names a PromQL query can select, from the ``# TYPE`` lines of an exposition
    (a family is declared even before its first sample: a primary not yet probed)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        names.update(name + suffix for suffix in SUFFIXES[kind])
    return names


@pytest.fixture(scope="module")
def exposed() -> Iterator[set[str]]:
    """What a real ``callahead serve`` answers at /metrics."""
    with make_workdir() as workdir:
        process = CallaheadProcess(workdir, {"CALLAHEAD_ROUTES": "example.test=[127.0.0.1]:9"})
        process.start()
        try:
            yield sample_names(process.scrape())
        finally:
            process.stop()


def exercised() -> Metrics:
    """callahead's Metrics with every series given a sample."""
    metrics = Metrics()
    for action in Action:
        for reason in Reason:
            metrics.observe(Decision(action, reason, "a@example.test"))
    for verdict in Verdict:
        metrics.probe_started()
        metrics.probe_ended(ProbeResult(verdict, Stage.RCPT, 250, "", 0.1, "[mx]:25"))
    metrics.connection_opened("[mx]:25")
    metrics.session_shared("[mx]:25")
    metrics.coalesced_wait()
    for basis in Basis:
        metrics.prober_refused_by("[mx]:25", basis)
    metrics.drift_seen("[mx]:25")
    metrics.track_cache_size(lambda: 3)
    metrics.errors.inc()
    metrics.client_address_missing.inc()
    metrics.probe_loop_up.set(1)
    metrics.postfix_hooked.labels("milter").set(1)
    metrics.policy_requests.labels("rcpt").inc()
    metrics.policy_bad_requests.inc()
    metrics.policy_connections.inc()
    for refusal in ("client", "limit"):
        metrics.policy_refused.labels(refusal).inc()
    metrics.refreshed("valid")
    metrics.catchall_checked("valid")
    metrics.domain_state("example.test", True)
    metrics.watch_primaries(lambda: [PrimaryState("[mx]:25", 1, False, True, False)])
    metrics.maillog.outcomes.labels("primary_down", "bounced").inc()
    metrics.maillog.backscatter.labels("primary_down").inc()
    metrics.maillog.evictions.inc()
    metrics.maillog.reopens.labels("rotated").inc()
    metrics.maillog.errors.inc()
    metrics.redis_master.info = lambda: MasterInfo("127.0.0.1:6379", 1.0)
    return metrics


def labels_of_series() -> dict[str, set[str]]:
    """Sample name -> its label names, over every sample of the exercised Metrics."""
    out: dict[str, set[str]] = {}
    for family in exercised().registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


LABELS = labels_of_series()


def uses() -> list[tuple[str, str]]:
    """(where, expression) of every PromQL expression deploy/ ships or tests with."""
    out = [(f"alerts.yml {r.get('alert') or r['record']}", r["expr"]) for r in alert_rules()]
    out += [(f"dashboard {title}", expand_variables(expr)) for title, expr in dashboard_exprs()]
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        out += [("alerts.test.yml series", s["series"]) for s in case["input_series"]]
    return out


USES = uses()


def test_the_exercise_covers_every_exposed_series(exposed: set[str]) -> None:
    assert exposed == set(LABELS)
    assert sample_names(generate_latest(exercised().registry).decode()) == exposed
    assert "callahead_rcpt_decisions_total" in exposed
    assert "callahead_probe_duration_seconds_bucket" in exposed
    assert "callahead_primary_refuses_prober" in exposed


@pytest.mark.parametrize(("where", "expr"), USES, ids=[w for w, _ in USES])
def test_every_name_is_exposed(where: str, expr: str, exposed: set[str]) -> None:
    names = metric_names(expr)
    assert names, expr
    allowed = exposed | set(PROMETHEUS_SERIES)
    if where.startswith("alerts"):
        allowed |= recorded_names()
    assert names <= allowed, f"{where}: not exposed: {names - allowed}"


@pytest.mark.parametrize(("where", "expr"), USES, ids=[w for w, _ in USES])
def test_every_label_is_the_metric_s(where: str, expr: str) -> None:
    known = {**{n: TARGET_LABELS for n in recorded_names()}, **PROMETHEUS_SERIES}
    known |= {name: labels | TARGET_LABELS for name, labels in LABELS.items()}
    in_expr: set[str] = set()
    for name, labels in selector_labels(expr):
        assert name in known, f"{where}: selector without a known metric name: {expr}"
        assert labels <= known[name], f"{where}: {name} has no {labels - known[name]}"
        in_expr |= known[name]
    for name in metric_names(expr):
        in_expr |= known.get(name, set())
    grouped = grouping_labels(expr)
    assert grouped <= in_expr, f"{where}: grouped by {grouped - in_expr}, not a label here"


def test_the_checks_see_names_and_labels() -> None:
    """The parsing above finds what it must, so a typo cannot slip through unseen."""
    expr = (
        'sum by (primary) (rate(callahead_probes_totl{outcome="valid", job=~"a|b"}[5m]))'
        ' / on (instance) up{job="callahead"} > 0.5 and callahead:x offset 1d'
    )
    assert metric_names(expr) == {"callahead_probes_totl", "up", "callahead:x"}
    assert selector_labels(expr) == [
        ("callahead_probes_totl", {"outcome", "job"}),
        ("up", {"job"}),
    ]
    assert grouping_labels(expr) == {"primary", "instance"}
    assert expand_variables('x{instance=~"$instance"}[$__rate_interval]') == 'x{instance=~".+"}[5m]'
    with pytest.raises(ValueError):
        expand_variables("x[$nope]")
