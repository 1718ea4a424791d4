"""What the benchmark measured: one ``Report`` for the whole run, filled by the phases
and rendered by ``bench.render``."""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan import Settings
from .stack import (
    Case,
    PrimarySpec,
)


@dataclass
class Delta:
    """What moved during one run, seen from callahead, the backup and the primary."""

    cpu: float = 0.0
    probes: Counter[str] = field(default_factory=Counter)
    cache_hits: float = 0.0
    primary_connects: int = 0
    verify_probes: int = 0
    """Postfix's own probes to the primary (delivery attempts in the backup's log)."""

    def add(self, other: Delta) -> None:
        self.cpu += other.cpu
        self.probes.update(other.probes)
        self.cache_hits += other.cache_hits
        self.primary_connects += other.primary_connects
        self.verify_probes += other.verify_probes


@dataclass
class RunFigure:
    messages: int
    seconds: float
    timed_out: bool

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Throughput:
    workload: str
    spec: PrimarySpec
    case: Case
    load: str
    planned: int
    runs: list[RunFigure] = field(default_factory=list)
    delta: Delta = field(default_factory=Delta)
    replies: Counter[str] = field(default_factory=Counter)

    @property
    def median(self) -> float | None:
        return statistics.median(r.rate for r in self.runs) if self.runs else None

    @property
    def messages(self) -> int:
        return sum(r.messages for r in self.runs)

    @property
    def bounded(self) -> bool:
        return any(r.timed_out for r in self.runs)


@dataclass
class Latency:
    spec: PrimarySpec
    case: Case
    kind: str
    sessions: int
    seconds: list[float]
    replies: Counter[int]
    errors: int
    planned: int
    delta: Delta | None = None


@dataclass
class Report:
    settings: Settings
    started: float = field(default_factory=time.monotonic)
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    memory: list[dict[str, object]] = field(default_factory=list)
    live_memory: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    """The separate drivers' JSON, by name: ``policycpu``, ``livememory``, ``flood``."""
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    setup_seconds: float = 0.0
    load_start: str = field(default_factory=lambda: loadavg())
    load_end: str = ""

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def within_budget(self, what: str) -> bool:
        if self.elapsed() < self.settings.budget:
            return True
        self.skipped.append(what)
        print(f"  skipped (time budget): {what}", flush=True)
        return False

    def find(self, workload: str, spec: PrimarySpec, case: Case) -> Throughput | None:
        for item in self.throughput:
            if item.workload == workload and item.spec == spec and item.case == case:
                return item
        return None


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
