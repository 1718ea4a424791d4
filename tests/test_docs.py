"""The reference (docs/reference.md), the env example and the metrics table stay in step
with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from callahead.frontends.metrics import Metrics
from callahead.process.variables import VARIABLES

REPO = Path(__file__).resolve().parents[1]
REFERENCE = (REPO / "docs" / "reference.md").read_text()
ENV_EXAMPLE = (REPO / "deploy" / "callahead.env.example").read_text()


@pytest.mark.parametrize("name", [v.name for v in VARIABLES])
def test_every_variable_is_documented(name: str) -> None:
    assert f"| `{name}` |" in REFERENCE
    assert re.search(rf"^#?{name}=", ENV_EXAMPLE, re.MULTILINE), name


def test_every_metric_is_documented() -> None:
    exposition = generate_latest(Metrics().registry).decode()
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\w+) (\w+)", exposition, re.MULTILINE)}
    assert names
    for name in names:
        assert f"`{name}" in REFERENCE, name
