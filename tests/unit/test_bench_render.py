"""The benchmark's report (bench/render.py), rendered from a made-up ``Report``: every
table is well formed, and each target is judged against its threshold."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
from bench.plan import Settings
from bench.render import TARGETS, render, table
from bench.report import Delta, Latency, Report, RunFigure, Throughput
from bench.stack import (
    CALLAHEAD,
    GUARD,
    NULL_POLICY,
    PLAIN,
    POLICY,
    PRIMARIES,
    TRIVIAL,
    VERIFY,
    Case,
    PrimarySpec,
)

ENV = ["date: 2000-01-01 00:00 UTC", "machine: test", "versions: test"]


def settings() -> Settings:
    return Settings(
        runs=2,
        messages=100,
        slow_messages=5,
        slow_attack_messages=3,
        sessions=10,
        run_deadline=15.0,
        latency_samples=20,
        latency_sessions=10,
        verify_latency_samples=10,
        verify_latency_sessions=4,
        budget=480.0,
        output=None,
        callahead_env={"CALLAHEAD_POOL_SIZE": "8"},
        extras=("flood",),
        quick_extras=False,
    )


def throughput(
    workload: str, spec: PrimarySpec, case: Case, rates: list[float], connects: int = 3
) -> Throughput:
    runs = [RunFigure(int(rate * 10), 10.0, timed_out=rate < 10) for rate in rates]
    delta = Delta(cpu=1.5, primary_connects=connects, verify_probes=30)
    delta.probes.update({"valid": 600})
    return Throughput(workload, spec, case, "load", 100, runs, delta, Counter({"RCPT 250": 200}))


def latency(spec: PrimarySpec, case: Case, kind: str, sessions: int, p: float) -> Latency:
    seconds = [p * (i + 1) / 100 for i in range(100)]
    delta = Delta(primary_connects=2, verify_probes=40)
    delta.probes.update({kind: 100})
    return Latency(spec, case, kind, sessions, seconds, Counter({250: 99, 451: 1}), 1, 100, delta)


def sample_report(*, fast: bool) -> Report:
    """Every kind of row the renderer writes; ``fast``: every target met, else none."""
    good = 1.0 if fast else 0.5
    report = Report(settings(), started=time.monotonic() - 300)
    report.load_start, report.load_end = "0.1 0.2 0.3", "1.0 2.0 3.0"
    a, b = PRIMARIES
    report.throughput += [
        throughput("warm", a, PLAIN, [500, 480]),
        throughput("warm", a, CALLAHEAD, [500 * good, 470 * good]),
        throughput("warm", a, VERIFY, [520, 510]),
        throughput("warm", a, TRIVIAL, [300, 310]),
        throughput("warm", a, POLICY, [500 * good, 490 * good]),
        throughput("warm", a, NULL_POLICY, [505, 495]),
    ]
    for spec in (a, b):
        report.throughput += [
            throughput("cold", spec, PLAIN, [550, 560]),
            throughput(
                "cold", spec, CALLAHEAD, [550 * good, 540 * good], connects=3 if fast else 9
            ),
            throughput("cold", spec, POLICY, [550 * good, 545 * good], connects=3 if fast else 9),
            throughput("cold", spec, VERIFY, [3.3, 3.31]),
            throughput("attack", spec, PLAIN, [530, 520]),
            throughput("attack", spec, CALLAHEAD, [480, 470]),
            throughput("attack", spec, VERIFY, [1.66, 1.65]),
        ]
    for item in report.throughput:
        # CPU seconds of the process behind the case over its runs: callahead's cold
        # figures against 0.6 and 0.3 ms per message, its warm ones against the floors'.
        if item.case in (CALLAHEAD, POLICY) and item.workload in ("cold", "warm"):
            item.delta.cpu = (0.2 if fast else 1.0) * item.messages / 1000
        elif item.case in (TRIVIAL, NULL_POLICY):
            item.delta.cpu = 0.3 * item.messages / 1000
    report.throughput.append(throughput("attack", a, GUARD, [760, 780]))
    report.throughput.append(Throughput("attack", b, GUARD, "load", 100))  # skipped: no runs
    p99 = 0.005 if fast else 0.030
    report.latency += [
        latency(a, PLAIN, "valid", 10, 0.01),
        latency(a, PLAIN, "unknown", 10, 0.01),
        latency(a, CALLAHEAD, "valid", 10, p99),
        latency(a, CALLAHEAD, "unknown", 10, p99),
        latency(a, CALLAHEAD, "valid", 1, p99 * 0.8),
        latency(a, POLICY, "valid", 10, p99),
        latency(a, POLICY, "unknown", 10, p99),
        latency(a, VERIFY, "valid", 4, 3.0),
        latency(a, VERIFY, "unknown", 4, 6.0),
        latency(b, CALLAHEAD, "valid", 10, p99),
        Latency(b, CALLAHEAD, "unknown", 10, [], Counter(), 5, 100),
    ]
    report.memory += [
        {
            "entries": 1000,
            "mean_address_length": 20.5,
            "rss_before": 3e7,
            "rss_after": 3.1e7,
            "bytes_per_address": None,
            "fill_seconds": 0.1,
        },
        {
            "entries": 1_000_000,
            "mean_address_length": 20.5,
            "rss_before": 3e7,
            "rss_after": 3e7 + (300 if fast else 450) * 1e6,
            "bytes_per_address": 300 if fast else 450,
            "fill_seconds": 4.2,
        },
    ]
    report.live_memory = {"rss": 5e7, "entries": 1234}
    report.notes.append("something happened")
    report.skipped.append("latency b.test verify")
    report.extras["policycpu"] = [
        {
            "server": "callahead",
            "cpu_us_per_request": 35.0 if fast else 70.0,
            "cpu_us_range": [30.0, 80.0],
            "requests_per_s": 14000,
            "rate_of_trivial": 0.6,
            "cpu_of_trivial": 1.5,
        },
        {
            "server": "trivial",
            "cpu_us_per_request": 40.0,
            "cpu_us_range": [36.0, 50.0],
            "requests_per_s": 23000,
            "rate_of_trivial": 1.0,
            "cpu_of_trivial": 1.0,
        },
    ]
    report.extras["flood"] = {
        "settings": {
            "runs": 3,
            "sessions": 1000,
            "concurrency": 50,
            "clients": 500,
            "rcpts": 4,
            "real": 0.1,
        },
        "cases": [flood_case(name, fast) for name in FLOOD_CASES],
    }
    report.extras["livememory"] = {
        "addresses": 1000000,
        "rss_empty": 44 * 2**20,
        "rss_full": 350 * 2**20,
        "bytes_per_address": 320.0 if fast else 420.0,
        "load_seconds": 7.6,
    }
    report.extras["livememory_live"] = {
        "addresses": 100000,
        "rss_empty": 44 * 2**20,
        "rss_half": 60 * 2**20,
        "rss_full": 80 * 2**20,
        "bytes_per_address": 380.0 if fast else 472.0,
        "marginal": 350.0,
        "load_seconds": 90.1,
    }
    report.extras["firstcontact"] = {
        "settings": {"rounds": 3, "samples": 100},
        "primary": "a.test",
        "cases": [
            {
                "case": name,
                "sessions": sessions,
                "kind": kind,
                "samples": 300,
                "p50_ms": 3.0,
                "p99_ms": 8.0 if fast or name.startswith("1 ") else 20.0,
                "p99_ms_rounds": [7.0, 8.0, 9.0],
                "replies": {"250": 300} if kind == "valid" else {"550": 300},
                "primary_connections_per_100_probes": None if name.startswith("1 ") else 5.5,
            }
            for name in FIRST_CONTACT_CASES
            for sessions in (1, 10, 50)
            for kind in ("valid", "unknown")
        ],
        "cpu_ms_per_session": {
            f"{name.split(' ')[0]} {sessions}": {"callahead": 0.8, "backup Postfix": 1.1}
            for name in FIRST_CONTACT_CASES
            for sessions in (1, 10, 50)
        },
    }
    return report


FIRST_CONTACT_CASES = (
    "1 plain Postfix",
    "2 callahead",
    "2p callahead policy service",
    "2n callahead, no pipelining",
)


FLOOD_CASES = (
    "1 plain Postfix",
    "2g callahead, default client guard",
    "2 callahead",
    "2p callahead policy service",
    "3 reject_unverified_recipient",
)


def flood_case(name: str, fast: bool) -> dict[str, object]:
    verified = name.split(" ")[0] in ("2g", "2", "2p")
    return {
        "case": name,
        "sessions_per_s": 400.0,
        "sessions_of_plain": 1.0 if name.startswith("1 ") or fast else 0.4,
        "rcpt_p50_ms": 50.0,
        "rcpt_p99_ms": 100.0,
        "unknown_replies": {"550": 900} if fast or not verified else {"550": 899, "250": 1},
        "real_replies": {"250": 100},
        "probes_per_recipient": 0.9 if verified else 0.0,
        "primary_connections_per_50_probes": (0.5 if fast else 5.5) if verified else None,
        "callahead_cpu_us_per_recipient": 600 if verified else None,
        "cpu_cores_used": {"backup Postfix": 0.7, "load generator": 0.2},
    }


def tables(text: str) -> list[list[str]]:
    """Each Markdown table of the text, as its lines."""
    found: list[list[str]] = []
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def targets_rows(text: str) -> dict[str, str]:
    section = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = tables(section)[0][2:]
    return {cells(row)[0]: cells(row)[2] for row in rows}


@pytest.mark.parametrize("fast", [True, False])
def test_every_table_is_well_formed(fast: bool) -> None:
    text = render(sample_report(fast=fast), ENV)
    found = tables(text)
    assert len(found) == 11
    for lines in found:
        width = len(cells(lines[0]))
        assert lines[1] == "|" + "---|" * width
        for line in lines[2:]:
            assert len(cells(line)) == width, line


@pytest.mark.parametrize("fast", [True, False])
def test_targets_are_judged(fast: bool) -> None:
    rows = targets_rows(render(sample_report(fast=fast), ENV))
    judged = {name: met for name, met in rows.items() if not name.startswith("(for comparison)")}
    assert len(judged) == 34, judged
    assert set(judged.values()) == {"yes" if fast else "**no**"}, judged
    context = [met for name, met in rows.items() if name.startswith("(for comparison)")]
    assert len(context) == 22 and set(context) == {""}


def issue_30_rows(text: str) -> list[list[str]]:
    section = text.split("## The cold path (issue 30)", 1)[1].split("\n## ", 1)[0]
    return [cells(row) for row in tables(section)[0][2:]]


@pytest.mark.parametrize("fast", [True, False])
def test_issue_30_table_has_each_figure_before_measured_and_target(fast: bool) -> None:
    rows = issue_30_rows(render(sample_report(fast=fast), ENV))
    # cold rate and cold CPU: 2 front ends x 2 primaries; warm CPU: 2; flood rate and
    # made-up 250s: 3 cases each; first contact: 2 front ends x 2 kinds; memory: 2.
    assert len(rows) == 8 + 2 + 6 + 4 + 2, rows
    judged = [row for row in rows if row[3] != "(for comparison)"]
    assert {row[4] for row in judged} == {"yes" if fast else "**no**"}
    before = {row[0]: row[1] for row in rows}
    assert before["cold msg/s / plain Postfix, milter (2), primary 0s"] == "0.64"
    live = "memory per address probed live through serve (bench.livememory --live)"
    assert before[f"{live}, 100,000 addresses"] == "472 B"
    warm = next(row for row in rows if row[0].startswith("callahead CPU per warm message, milter"))
    assert warm[2] == ("0.20" if fast else "1.00") + " ms against 2t's 0.30 ms: " + (
        "0.67" if fast else "3.33"
    )
    assert warm[3] == "≤ 1.10 x the floor's"


def test_issue_30_table_says_what_was_not_measured() -> None:
    report = sample_report(fast=True)
    del report.extras["flood"], report.extras["livememory_live"]
    rows = issue_30_rows(render(report, ENV))
    missing = [row for row in rows if row[2] == "not measured"]
    assert [row[0] for row in missing] == [
        "the flood (bench.flood) sessions/s / plain Postfix",
        "the flood: made-up recipients answered 250",
        "memory per address probed live through serve (bench.livememory --live)",
        "(for comparison) the same, the second half's growth per address (marginal)",
    ]
    assert {row[4] for row in missing} == {"-"}


def test_every_target_is_in_the_report() -> None:
    rows = targets_rows(render(sample_report(fast=True), ENV))
    for target in TARGETS:
        if target.comparison is not None:
            bound = f"{target.comparison} {target.figure.bound(target.threshold)}"
            assert any(bound in name for name in rows), bound


def test_table_checks_its_rows() -> None:
    assert table(["a", "b"], [["1", "x|y"]]) == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    with pytest.raises(ValueError):
        table(["a", "b"], [["1"]])
