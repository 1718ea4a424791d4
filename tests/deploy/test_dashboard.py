"""deploy/grafana-dashboard.json: every query parses as PromQL (promtool, through a
throwaway rule file), and the panels the issue asks for are there."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .promql import dashboard, dashboard_exprs, expand_variables
from .tools import run, tool

EXPRS = dashboard_exprs()


def test_the_dashboard_has_queries() -> None:
    assert len(EXPRS) >= 15
    board = dashboard()
    assert board["uid"] == "callahead"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "instance"}


@pytest.mark.parametrize(
    ("title", "expr"), EXPRS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(EXPRS)]
)
def test_each_query_parses(title: str, expr: str, tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": "dashboard:check", "expr": expand_variables(expr)}],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = run([tool("promtool"), "check", "rules", str(path)])
    assert done.returncode == 0, f"{title}: {expr}\n{done.stdout}{done.stderr}"


def test_a_broken_query_is_caught(tmp_path: Path) -> None:
    """The check above can fail: promtool refuses what is not PromQL."""
    rules = {
        "groups": [{"name": "d", "rules": [{"record": "d:c", "expr": "sum by (x (rate(y[5m]))"}]}]
    }
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(rules))
    assert run([tool("promtool"), "check", "rules", str(path)]).returncode != 0


def test_the_asked_for_panels_are_there() -> None:
    exprs = " ".join(expr for _, expr in EXPRS)
    for needle in (
        "sum by (decision, reason) (rate(callahead_rcpt_decisions_total",
        "sum by (outcome) (rate(callahead_probes_total",
        "histogram_quantile(0.99, sum by (le) (rate(callahead_probe_duration_seconds_bucket",
        "callahead_cache_hits_total",
        "callahead_cache_entries",
        "callahead_breaker_open",
        "callahead_pool_sessions",
        "callahead_primary_refuses_prober",
        'reason=~"overload',
        "client_limit",
    ):
        assert needle in exprs, needle
