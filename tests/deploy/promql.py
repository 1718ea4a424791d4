"""The PromQL of deploy/alerts.yml and deploy/grafana-dashboard.json, and the metric
names and label matchers in it (for checking them against what /metrics exposes)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"

GRAFANA_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "instance": ".+",
}
"""What the dashboard's template variables stand for when an expression is checked:
Grafana's interval variables become durations, ``$instance`` a regex (it only appears
in ``=~`` matchers). A variable not listed here fails the check."""

KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)")
IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])")


def alert_rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of deploy/alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in alert_rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel, rows included."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in _panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def expand_variables(expr: str) -> str:
    """The expression with Grafana's ``$var`` and ``${var}`` replaced (GRAFANA_VARIABLES)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise ValueError(f"unknown dashboard variable ${name} in {expr}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions,
    keywords, label names (in matchers and grouping lists) or inside strings."""
    text = STRING.sub('""', expr)
    text = GROUPING.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names: set[str] = set()
    for match in IDENTIFIER.finditer(text):
        name = match.group(1)
        if name.lower() in KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every selector with braces."""
    text = STRING.sub('""', expr)
    return [
        (m.group(1) or "", {label.group(1) for label in MATCHER.finditer(m.group(2))})
        for m in SELECTOR.finditer(text)
    ]


def grouping_labels(expr: str) -> set[str]:
    """Label names of every ``by (...)``, ``without (...)``, ``on (...)`` list."""
    return {
        label.strip()
        for m in GROUPING.finditer(STRING.sub('""', expr))
        for label in m.group(2).split(",")
        if label.strip()
    }
