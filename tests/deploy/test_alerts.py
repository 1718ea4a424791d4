"""deploy/alerts.yml: promtool accepts it, its unit tests (deploy/alerts.test.yml) pass,
and every alert is written and tested the way an operator needs it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from .promql import ALERTS, ALERTS_TEST, DEPLOY, alert_rules
from .tools import run, tool

ALERT_RULES = [rule for rule in alert_rules() if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    done = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout, done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = run([tool("promtool"), "test", "rules", ALERTS_TEST.name], cwd=DEPLOY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_the_issue_s_alerts_are_there() -> None:
    names = {rule["alert"] for rule in ALERT_RULES}
    assert {
        "CallaheadDown",
        "CallaheadPrimaryDown",
        "CallaheadUndecidedShareHigh",
        "CallaheadProberRefused",
        "CallaheadOverload",
        "CallaheadCacheHitRatioCollapse",
    } <= names


@pytest.mark.parametrize("rule", ALERT_RULES, ids=lambda rule: str(rule["alert"]))
def test_each_alert_waits_has_a_severity_and_says_what_to_check(rule: dict[str, Any]) -> None:
    assert rule.get("for"), "a for: duration, so that one bad scrape does not page"
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert len(annotations["description"].split()) >= 20, "say what to check"


def _expectations() -> dict[str, set[bool]]:
    """alertname -> {True if some check expects it to fire, False if some expects quiet}."""
    seen: dict[str, set[bool]] = {}
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            seen.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    return seen


@pytest.mark.parametrize("rule", ALERT_RULES, ids=lambda rule: str(rule["alert"]))
def test_each_alert_is_tested_firing_and_quiet(rule: dict[str, Any]) -> None:
    assert _expectations().get(rule["alert"]) == {True, False}
