"""The benchmark's settings (command line) and its plan: which addresses each case
and run uses, how many messages, in which order the cases run."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .stack import (
    CALLAHEAD,
    CASES,
    PLAIN,
    POLICY,
    PRIMARIES,
    REPO,
    VERIFY,
    Case,
    PrimarySpec,
)

SENDER = "sender@remote.test"


MESSAGE_SIZE = 512


DRAIN_TIMEOUT = 60.0


PROBE_LINE = "relay=127.0.0.1[127.0.0.1]:{port},"


@dataclass(frozen=True)
class Extra:
    """A driver that starts its own processes and prints one JSON document, run by
    ``python -m bench.run`` after its main stack is stopped (``Report.extras[name]``)."""

    name: str
    argv: list[str]
    """After ``python -m``: what ``./dev bench`` runs."""
    quick: list[str]
    """The same with small counts (``--quick-extras``): a smoke test of the report, whose
    figures mean little."""
    timeout: float


EXTRAS = (
    Extra(
        "policycpu",
        ["bench.policycpu", "--rounds", "6", "--requests", "20000", "--case", "callahead:"],
        ["bench.policycpu", "--rounds", "1", "--requests", "2000", "--case", "callahead:"],
        600,
    ),
    Extra("livememory", ["bench.livememory", "1000000"], ["bench.livememory", "20000"], 600),
    Extra(
        "livememory_live",
        ["bench.livememory", "100000", "--live"],
        ["bench.livememory", "4000", "--live"],
        600,
    ),
    Extra(
        "flood",
        ["bench.flood", "--runs", "3", "--sessions", "1000"],
        ["bench.flood", "--runs", "1", "--sessions", "100"],
        1500,
    ),
    Extra(
        "firstcontact",
        ["bench.firstcontact", "--rounds", "3"],
        # Level 1 too, first: the very first sessions pay the stack's warm-up.
        ["bench.firstcontact", "--rounds", "1", "--samples", "20", "--levels", "1,10"],
        600,
    ),
)
"""The drivers (bench/policycpu.py, livememory.py at 1,000,000 addresses loaded from a
file and at 100,000 probed live, flood.py, firstcontact.py), in the order they run."""


@dataclass(frozen=True)
class Settings:
    runs: int
    messages: int
    """Messages per run for cases 1 and 2 (and case 3 warm)."""
    slow_messages: int
    """Messages per run for case 3 cold (each takes 3 s there)."""
    slow_attack_messages: int
    """Messages per run for case 3 attack (each takes 6 s there)."""
    sessions: int
    run_deadline: float
    latency_samples: int
    latency_sessions: int
    verify_latency_samples: int
    verify_latency_sessions: int
    budget: float
    """Seconds after which no new measurement starts (the rest is reported as skipped)."""
    output: Path | None
    callahead_env: dict[str, str]
    extras: tuple[str, ...]
    """The ``EXTRAS`` to run, by name."""
    quick_extras: bool


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="callahead vs plain Postfix vs reject_unverified_recipient, on loopback",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median, min-max)")
    parser.add_argument(
        "--messages", type=int, default=2000, help="messages per run, cases 1 and 2"
    )
    parser.add_argument(
        "--slow-messages",
        type=int,
        default=20,
        help="messages per run for reject_unverified_recipient cold (3 s each)",
    )
    parser.add_argument(
        "--slow-attack-messages",
        type=int,
        default=10,
        help="messages per run for reject_unverified_recipient attack (6 s each)",
    )
    parser.add_argument("--sessions", type=int, default=10, help="concurrent SMTP sessions")
    parser.add_argument(
        "--run-deadline", type=float, default=15.0, help="seconds after which a run is cut"
    )
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--latency-sessions", type=int, default=10)
    parser.add_argument("--verify-latency-samples", type=int, default=100)
    parser.add_argument("--verify-latency-sessions", type=int, default=40)
    parser.add_argument(
        "--budget", type=float, default=1200.0, help="seconds; no measurement starts later"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "RESULTS.md",
        help="where to write the report too",
    )
    parser.add_argument("--no-write", action="store_true", help="only print the report")
    parser.add_argument(
        "--callahead-env",
        action="append",
        default=[],
        metavar="CALLAHEAD_X=VALUE",
        help="extra setting for case 2's callahead (repeatable), e.g. CALLAHEAD_POOL_SIZE=8",
    )
    names = [extra.name for extra in EXTRAS]
    parser.add_argument(
        "--extras",
        default=",".join(names),
        metavar="NAME,...",
        help=f"the separate drivers to run after the main stack (default all: "
        f"{','.join(names)}; 'none' for none)",
    )
    parser.add_argument(
        "--quick-extras",
        action="store_true",
        help="run the separate drivers with small counts (a smoke test of the report)",
    )
    args = parser.parse_args(argv)
    extras = tuple(x for x in args.extras.split(",") if x and x != "none")
    unknown = [x for x in extras if x not in names]
    if unknown:
        parser.error(f"--extras: unknown {', '.join(unknown)} (known: {', '.join(names)})")
    callahead_env: dict[str, str] = {}
    for item in args.callahead_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("CALLAHEAD_"):
            parser.error(f"--callahead-env: not CALLAHEAD_X=VALUE: {item!r}")
        callahead_env[key] = value
    if args.runs < 1 or args.messages < 1 or args.sessions < 1 or args.slow_messages < 1:
        parser.error("counts must be positive")
    if args.verify_latency_sessions > 45:
        parser.error("--verify-latency-sessions: Postfix allows 50 sessions per client")
    same_names = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Settings)
        if field.name not in ("output", "callahead_env", "extras")
    }
    return Settings(
        **same_names,
        output=None if args.no_write else args.output,
        callahead_env=callahead_env,
        extras=extras,
    )


def numbered(base: str, count: int) -> list[str]:
    return [f"{n}{base}" for n in range(1, count + 1)]


def warm_base(spec: PrimarySpec) -> str:
    return f"w@{spec.domain}"


def cold_base(spec: PrimarySpec, case: Case, run: int) -> str:
    return f"c{case.number}r{run}@{spec.domain}"


def latency_addresses(spec: PrimarySpec, case: Case, tag: str, n: int) -> tuple[list[str], ...]:
    valid = [f"l{case.number}{tag}v{i}@{spec.domain}" for i in range(n)]
    unknown = [f"l{case.number}{tag}x{i}@{spec.domain}" for i in range(n)]
    return valid, unknown


def attack_addresses(spec: PrimarySpec, case: Case, run: int, n: int) -> list[str]:
    return [f"x{case.number}r{run}n{i}@{spec.domain}" for i in range(n)]


def case_messages(settings: Settings, case: Case) -> int:
    return settings.slow_messages if case is VERIFY else settings.messages


def latency_plan(settings: Settings, spec: PrimarySpec) -> list[tuple[Case, str, int, int]]:
    """(case, tag, samples per address kind, sessions) for each latency measurement."""
    plan = [
        (CALLAHEAD, "s", settings.latency_samples, settings.latency_sessions),
        (POLICY, "s", settings.latency_samples, settings.latency_sessions),
    ]
    if spec is PRIMARIES[0]:
        # The same client and concurrency without any check: what Postfix and the
        # client take anyway; and callahead alone on the line.
        plan.insert(0, (PLAIN, "s", settings.latency_samples, settings.latency_sessions))
        plan.append((CALLAHEAD, "one", settings.latency_samples, 1))
        plan.append((POLICY, "one", settings.latency_samples, 1))
    plan.append((VERIFY, "s", settings.verify_latency_samples, settings.verify_latency_sessions))
    return plan


def warm_count(settings: Settings) -> int:
    """The warm addresses: each of the ``sessions`` smtp-source processes of a warm run
    sends one message to each of them (Postfix's verify cache fills at only ~100
    addresses/s here, so the warm set is kept small; a cache lookup does not depend on
    the number of entries)."""
    return max(1, settings.messages // settings.sessions)


def primary_users(settings: Settings, spec: PrimarySpec) -> list[str]:
    """Every valid address the benchmark will use at this primary."""
    users = numbered(warm_base(spec), warm_count(settings))
    for case in CASES:
        for run in range(1, settings.runs + 1):
            users += numbered(cold_base(spec, case, run), case_messages(settings, case))
    for case, tag, samples, _ in latency_plan(settings, spec):
        users += latency_addresses(spec, case, tag, samples)[0]
    return users


def rotated(cases: Sequence[Case], run: int) -> list[Case]:
    """The cases in a different order each run, so that none always follows another."""
    shift = (run - 1) % len(cases)
    return [*cases[shift:], *cases[:shift]]


def load_name(settings: Settings, tool: str) -> str:
    return f"{tool}, {settings.sessions} sessions"


def sessions(n: int) -> str:
    return f"{n} session" if n == 1 else f"{n} sessions"
