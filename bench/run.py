"""Run the benchmark and print (and write) the Markdown report.

``python -m bench.run [--runs 3] [--messages 2000] [--output bench/RESULTS.md]``, as root,
from the repository root, in the venv (``./dev bench`` does all of that).

Everything runs on 127.0.0.1 in one machine state (see ``bench.stack``): one Postfix
backup MX with a listener per case, two Postfix primaries (``in_flow_delay`` 0s and the
default 1s), callahead, smtp-sink. Every run is bounded by a message count and a
deadline; the whole benchmark keeps to a time budget; everything it starts is stopped
when it ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tests.harness.fixtures import make_workdir
from tests.harness.postfix import POSTCONF, postfix_available
from tests.harness.waiting import wait_for

from .smtpclient import Job, message_body, run_load
from .stack import (
    CALLAHEAD,
    CASES,
    GUARD,
    PLAIN,
    PRIMARIES,
    REPO,
    TRIVIAL,
    VERIFY,
    Case,
    PrimarySpec,
    Stack,
    build_stack,
)
from .tools import LogCursor, SourceResult, cpu_seconds, rss_bytes, smtp_source

SENDER = "sender@remote.test"
MESSAGE_SIZE = 512
DRAIN_TIMEOUT = 60.0
PROBE_LINE = "relay=127.0.0.1[127.0.0.1]:{port},"


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


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


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="callahead vs plain Postfix vs reject_unverified_recipient, on loopback",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
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
        "--budget", type=float, default=480.0, help="seconds; no measurement starts later"
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
    args = parser.parse_args(argv)
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
    return Settings(
        runs=args.runs,
        messages=args.messages,
        slow_messages=args.slow_messages,
        slow_attack_messages=args.slow_attack_messages,
        sessions=args.sessions,
        run_deadline=args.run_deadline,
        latency_samples=args.latency_samples,
        latency_sessions=args.latency_sessions,
        verify_latency_samples=args.verify_latency_samples,
        verify_latency_sessions=args.verify_latency_sessions,
        budget=args.budget,
        output=None if args.no_write else args.output,
        callahead_env=callahead_env,
    )


# --------------------------------------------------------------------------------------
# addresses: smtp-source -N sends message n to "<n><base>"
# --------------------------------------------------------------------------------------


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
    plan = [(CALLAHEAD, "s", settings.latency_samples, settings.latency_sessions)]
    if spec is PRIMARIES[0]:
        # The same client and concurrency without any check: what Postfix and the
        # client take anyway; and callahead alone on the line.
        plan.insert(0, (PLAIN, "s", settings.latency_samples, settings.latency_sessions))
        plan.append((CALLAHEAD, "one", settings.latency_samples, 1))
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


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------


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


class Meter:
    """Snapshots before a run; ``finish`` returns the ``Delta`` once the backup is idle."""

    def __init__(self, stack: Stack, spec: PrimarySpec, case: Case) -> None:
        self._stack = stack
        self._process, self._pid = stack.process(case)
        self._primary_port = stack.primary_port(spec.domain)
        self._cpu = cpu_seconds(self._pid)
        self._samples = self._process.samples()
        self._primary_log = LogCursor(stack.primaries[spec.domain].maillog_path)
        self._backup_log = LogCursor(stack.backup.maillog_path)

    def finish(self) -> Delta:
        drain(self._stack)
        time.sleep(0.3)  # postlogd writes a moment after the fact
        after = self._process.samples()

        def moved(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - self._samples.get(key, 0.0)

        probes: Counter[str] = Counter()
        for outcome in ("valid", "unknown", "tempfail"):
            value = round(moved("callahead_probes_total", outcome=outcome))
            if value:
                probes[outcome] = value
        backup_text = self._backup_log.read_new()
        return Delta(
            cpu=cpu_seconds(self._pid) - self._cpu,
            probes=probes,
            cache_hits=moved("callahead_cache_hits_total"),
            primary_connects=self._primary_log.read_new().count(" connect from "),
            verify_probes=backup_text.count(PROBE_LINE.format(port=self._primary_port)),
        )


def drain(stack: Stack) -> None:
    """Wait until the backup's queue is empty (deliveries to smtp-sink, verify probes)."""
    try:
        wait_for(lambda: stack.backup_queue_size() == 0, DRAIN_TIMEOUT, 0.05, "queue")
    except TimeoutError:
        current_report().note(
            f"the backup's queue did not drain within {DRAIN_TIMEOUT:g}s "
            f"({stack.backup_queue_size()} files left); later runs overlap with it"
        )


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


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def source_run(
    stack: Stack, settings: Settings, case: Case, base: str, count: int, *, warm: bool = False
) -> SourceResult:
    """One smtp-source run of ``count`` messages with ``settings.sessions`` sessions. Warm:
    that many single-session smtp-source processes instead, each sending its share to
    the same ``count / sessions`` addresses (see ``warm_count``)."""
    processes = settings.sessions if warm else 1
    result = smtp_source(
        stack.port(case),
        count=count // processes,
        sessions=1 if warm else settings.sessions,
        rcpt_base=base,
        sender=SENDER,
        size=MESSAGE_SIZE,
        deadline=settings.run_deadline,
        workdir=stack.workdir,
        processes=processes,
    )
    if not result.ok:
        current_report().note(
            f"smtp-source on {case.key} ({base}) exited {result.returncode}: {result.stderr[-300:]}"
        )
    return result


_REPORT: Report | None = None


def current_report() -> Report:
    assert _REPORT is not None
    return _REPORT


def fill_verify_cache(stack: Stack, addresses: Sequence[str], deadline: float) -> int:
    """Have Postfix verify ``addresses`` through the ``verify-fill`` listener (poll count
    1: it answers 450 at once and probes in the background), again and again until it
    answers 250 for each of them or ``deadline`` passes. Returns how many are left."""
    port = stack.ports["verify-fill"]
    todo = list(addresses)
    stop = time.monotonic() + deadline
    while todo and time.monotonic() < stop:
        # Paced: thousands of probes at once overrun the verify daemon's connections to
        # cleanup ("Resource temporarily unavailable"), and the lost probes come back.
        jobs = [Job(SENDER, tuple(todo[i : i + 100])) for i in range(0, len(todo), 100)]
        result = run_load(port, jobs, concurrency=1, deadline=max(1.0, stop - time.monotonic()))
        accepted = {
            rcpt
            for s in result.sessions
            for rcpt, code in zip(s.job.rcpts, s.rcpt_codes, strict=False)
            if code == 250
        }
        todo = [a for a in todo if a not in accepted]
        if todo:
            time.sleep(0.5)
    return len(todo)


def rotated(cases: Sequence[Case], run: int) -> list[Case]:
    """The cases in a different order each run, so that none always follows another."""
    shift = (run - 1) % len(cases)
    return [*cases[shift:], *cases[:shift]]


def load_name(settings: Settings, tool: str) -> str:
    return f"{tool}, {settings.sessions} sessions"


def phase_warm(stack: Stack, settings: Settings, report: Report, spec: PrimarySpec) -> None:
    base = warm_base(spec)
    addresses = numbered(base, warm_count(settings))
    total = warm_count(settings) * settings.sessions
    log(f"warm ({spec.domain}): filling Postfix's verify cache with {len(addresses)} users")
    left = fill_verify_cache(stack, addresses, 60.0)
    if left:
        report.note(f"warm: Postfix's verify cache still lacked {left} addresses after 60 s")
    drain(stack)
    log("warm: one unmeasured pass over the warm addresses for callahead (fills its cache)")
    cases = (*CASES, TRIVIAL)
    for case in (CALLAHEAD, VERIFY):
        source_run(stack, settings, case, base, len(addresses))
        drain(stack)
    entries = stack.callahead.samples().get(("callahead_cache_entries", ()), 0.0)
    if entries < len(addresses):
        report.note(f"warm: callahead's cache holds {entries:.0f} < {len(addresses)} entries")
    load = f"{settings.sessions} smtp-source, 1 session each"
    items = {case: Throughput("warm", spec, case, load, total) for case in cases}
    report.throughput.extend(items.values())
    for run in range(1, settings.runs + 1):
        for case in rotated(cases, run):
            if not report.within_budget(f"warm run {run} {case.key}"):
                return
            meter = Meter(stack, spec, case)
            result = source_run(stack, settings, case, base, total, warm=True)
            items[case].delta.add(meter.finish())
            items[case].runs.append(RunFigure(result.messages, result.seconds, result.timed_out))
            log(f"warm run {run} {case.key}: {result.messages} msgs, {result.rate:.0f} msg/s")
    probes = sum(items[CALLAHEAD].delta.probes.values())
    if probes:
        report.note(f"warm: callahead probed {probes} times during the measured warm runs")


def phase_cold(stack: Stack, settings: Settings, report: Report, spec: PrimarySpec) -> None:
    items = {
        case: Throughput(
            "cold", spec, case, load_name(settings, "smtp-source"), case_messages(settings, case)
        )
        for case in CASES
    }
    report.throughput.extend(items.values())
    for run in range(1, settings.runs + 1):
        for case in rotated(CASES, run):
            if not report.within_budget(f"cold {spec.domain} run {run} {case.key}"):
                return
            meter = Meter(stack, spec, case)
            count = case_messages(settings, case)
            result = source_run(stack, settings, case, cold_base(spec, case, run), count)
            delta = meter.finish()
            items[case].delta.add(delta)
            items[case].runs.append(RunFigure(result.messages, result.seconds, result.timed_out))
            extra = f", probes {dict(delta.probes)}" if case is CALLAHEAD else ""
            bounded = " (cut at the deadline)" if result.timed_out else ""
            log(
                f"cold {spec.domain} run {run} {case.key}: {result.messages} msgs, "
                f"{result.rate:.1f} msg/s{bounded}{extra}"
            )
    tempfails = items[CALLAHEAD].delta.probes.get("tempfail", 0)
    if tempfails:
        report.note(
            f"cold {spec.domain}: {tempfails} callahead probes ended in tempfail (accepted "
            "without a verdict)"
        )


def phase_attack(stack: Stack, settings: Settings, report: Report, spec: PrimarySpec) -> None:
    body = message_body(MESSAGE_SIZE, SENDER)
    # The guard remembers 127.0.0.1 for its window: from its second run on, it answers
    # every recipient at once, as it would a persistent attacker. One primary is enough.
    cases: tuple[Case, ...] = (*CASES, GUARD) if spec is PRIMARIES[0] else CASES
    counts = {
        case: settings.slow_attack_messages if case is VERIFY else settings.messages
        for case in cases
    }
    items = {
        case: Throughput("attack", spec, case, load_name(settings, "bench client"), counts[case])
        for case in cases
    }
    report.throughput.extend(items.values())
    for run in range(1, settings.runs + 1):
        for case in rotated(cases, run):
            if not report.within_budget(f"attack {spec.domain} run {run} {case.key}"):
                return
            jobs = [
                Job(SENDER, (a,), body) for a in attack_addresses(spec, case, run, counts[case])
            ]
            meter = Meter(stack, spec, case)
            result = run_load(
                stack.port(case),
                jobs,
                concurrency=settings.sessions,
                deadline=settings.run_deadline,
            )
            items[case].delta.add(meter.finish())
            figure = RunFigure(result.completed, result.seconds, result.timed_out)
            items[case].runs.append(figure)
            for code, n in result.rcpt_code_counts().items():
                items[case].replies[f"RCPT {code}"] += n
            for error, n in result.errors().items():
                items[case].replies[f"error: {error[:60]}"] += n
            log(
                f"attack {spec.domain} run {run} {case.key}: {figure.rate:.1f} msg/s, "
                f"replies {dict(result.rcpt_code_counts())}"
            )


def phase_latency(stack: Stack, settings: Settings, report: Report, spec: PrimarySpec) -> None:
    for case, tag, samples, sessions in latency_plan(settings, spec):
        if not report.within_budget(f"latency {spec.domain} {case.key} ({sessions} sessions)"):
            return
        valid, unknown = latency_addresses(spec, case, tag, samples)
        jobs = [Job(SENDER, (a,)) for pair in zip(valid, unknown, strict=True) for a in pair]
        meter = Meter(stack, spec, case)
        result = run_load(stack.port(case), jobs, concurrency=sessions, deadline=30.0)
        delta = meter.finish()
        valid_set = set(valid)
        for kind in ("valid", "unknown"):
            done = [
                s
                for s in result.sessions
                if s.error is None and (s.job.rcpts[0] in valid_set) == (kind == "valid")
            ]
            report.latency.append(
                Latency(
                    spec=spec,
                    case=case,
                    kind=kind,
                    sessions=sessions,
                    seconds=[s.rcpt_seconds[0] for s in done],
                    replies=Counter(s.rcpt_codes[0] for s in done),
                    errors=sum(
                        1
                        for s in result.sessions
                        if s.error is not None
                        and (s.job.rcpts[0] in valid_set) == (kind == "valid")
                    ),
                    planned=samples,
                    delta=delta if kind == "valid" else None,
                )
            )
        log(
            f"latency {spec.domain} {case.key} ({sessions} sessions): "
            f"{len(result.sessions)} samples in {result.seconds:.1f}s, "
            f"replies {dict(result.rcpt_code_counts())}"
        )


def phase_memory(report: Report) -> None:
    for n in (100_000, 1_000_000):
        if not report.within_budget(f"memory with {n} addresses"):
            return
        log(f"memory: positive cache with {n} addresses (python -m bench.memory {n})")
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memory", str(n)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if proc.returncode != 0:
            report.note(f"bench.memory {n} failed: {proc.stderr.strip()[-400:]}")
            continue
        report.memory.append(json.loads(proc.stdout))


PHASES: tuple[tuple[str, Callable[[Stack, Settings, Report, PrimarySpec], None], str], ...] = (
    ("warm", phase_warm, "a"),
    ("cold", phase_cold, "a"),
    ("attack", phase_attack, "a"),
    ("latency", phase_latency, "a"),
    ("cold", phase_cold, "b"),
    ("attack", phase_attack, "b"),
    ("latency", phase_latency, "b"),
)


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def sessions(n: int) -> str:
    return f"{n} session" if n == 1 else f"{n} sessions"


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def fmt_bytes(value: float) -> str:
    return f"{value / 1048576:.1f} MiB"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _cmd(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    return proc.stdout.strip()


def environment() -> list[str]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    head = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "?"
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "milter"])
    git = f"git {head}" + (" + uncommitted changes in milter/" if dirty else "")
    postfix = _cmd([POSTCONF, "-d", "-h", "mail_version"]) or "?"
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {len(os.sched_getaffinity(0))} cores (nproc), {model or 'unknown CPU'}, "
        f"{mem_kib / 1048576:.1f} GiB RAM, Linux {platform.release()}",
        f"versions: Postfix {postfix}, Python {platform.python_version()}, "
        f"pymilter {_version('pymilter')}, aiosmtplib {_version('aiosmtplib')}, "
        f"cachetools {_version('cachetools')}, prometheus-client "
        f"{_version('prometheus-client')}, callahead {_version('callahead')} ({git})",
    ]


def ratio(report: Report, item: Throughput) -> float | None:
    plain = report.find(item.workload, item.spec, PLAIN)
    if plain is None or not plain.median or item.median is None:
        return None
    return item.median / plain.median


def render_throughput(report: Report) -> list[str]:
    s = report.settings
    out = [
        "## Messages per second",
        "",
        f"Median of {s.runs} runs; in brackets the ratio of the medians to case 1 (plain "
        "Postfix) measured in this same benchmark, whose runs alternate the cases (in a "
        "rotating order). One message per SMTP "
        f"session, {MESSAGE_SIZE} bytes, one recipient, {s.sessions} concurrent sessions; "
        f"each run stops after its message count or {s.run_deadline:g} s (marked †: then "
        "the rate is the messages done over the deadline).",
        "",
    ]
    columns: tuple[Case, ...] = CASES + tuple(
        extra
        for extra in (GUARD, TRIVIAL)
        if any(item.case is extra and item.runs for item in report.throughput)
    )
    out += [
        "| workload | primary `in_flow_delay` | load | messages per run ("
        + " / ".join(case.label for case in columns)
        + ") | "
        + " | ".join(case.name for case in columns)
        + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    seen: list[tuple[str, PrimarySpec]] = []
    for item in report.throughput:
        if (item.workload, item.spec) not in seen:
            seen.append((item.workload, item.spec))
    for workload, spec in seen:
        cells = []
        planned = []
        load = ""
        for case in columns:
            found = report.find(workload, spec, case)
            if found is None or not found.runs:
                cells.append("-")
                planned.append("-")
                continue
            load = found.load
            planned.append(str(found.planned))
            text = fmt_rate(found.median) + (" †" if found.bounded else "")
            r = ratio(report, found)
            if case is not PLAIN and r is not None:
                text += f" ({r:.2f})"
            cells.append(text)
        primary = "- (no probes)" if workload == "warm" else spec.label
        out.append(
            f"| {workload} | {primary} | {load} | {' / '.join(planned)} | "
            + " | ".join(cells)
            + " |"
        )
    out += ["", "Every run (msg/s):", ""]
    for item in report.throughput:
        if item.runs:
            runs = ", ".join(
                fmt_rate(r.rate) + (f" († {r.messages} msgs)" if r.timed_out else "")
                for r in item.runs
            )
            replies = (
                "; replies " + ", ".join(f"{k}: {v}" for k, v in sorted(item.replies.items()))
                if item.replies
                else ""
            )
            out.append(
                f"- {item.workload}, primary {item.spec.label}, {item.case.name}: {runs}{replies}"
            )
    return out


def render_latency(report: Report) -> list[str]:
    out = [
        "## First-contact decision time",
        "",
        "Time from writing `RCPT TO` to the whole reply, for addresses the backup has never "
        "seen, one RCPT per SMTP session, valid and unknown addresses interleaved.",
        "",
        "| case | primary `in_flow_delay` | address | sessions | samples | p50 | p99 | max "
        "| replies |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for item in report.latency:
        if not item.seconds:
            out.append(
                f"| {item.case.name} | {item.spec.label} | {item.kind} | "
                f"{item.sessions} | 0 of {item.planned} | - | - | - | {item.errors} errors |"
            )
            continue
        replies = ", ".join(f"{code}: {n}" for code, n in sorted(item.replies.items()))
        if item.errors:
            replies += f", {item.errors} failed sessions"
        out.append(
            f"| {item.case.name} | {item.spec.label} | {item.kind} | "
            f"{item.sessions} | {len(item.seconds)} | {fmt_seconds(percentile(item.seconds, 50))} "
            f"| {fmt_seconds(percentile(item.seconds, 99))} | {fmt_seconds(max(item.seconds))} "
            f"| {replies} |"
        )
    return out


@dataclass
class ConnRow:
    case: Case
    spec: PrimarySpec
    workload: str
    probes: int
    connects: int

    @property
    def per100(self) -> float | None:
        return 100 * self.connects / self.probes if self.probes else None


def connection_rows(report: Report) -> list[ConnRow]:
    rows: list[ConnRow] = []

    def probes_of(case: Case, delta: Delta) -> int:
        return delta.verify_probes if case is VERIFY else sum(delta.probes.values())

    for item in report.throughput:
        if item.case is not PLAIN and item.workload != "warm" and item.runs:
            rows.append(
                ConnRow(
                    item.case,
                    item.spec,
                    item.workload,
                    probes_of(item.case, item.delta),
                    item.delta.primary_connects,
                )
            )
    for lat in report.latency:
        if lat.delta is not None and lat.case is not PLAIN:
            rows.append(
                ConnRow(
                    lat.case,
                    lat.spec,
                    f"first contact, {sessions(lat.sessions)}",
                    probes_of(lat.case, lat.delta),
                    lat.delta.primary_connects,
                )
            )
    return rows


def render_connections(report: Report) -> list[str]:
    out = [
        "## New connections to the primary per 100 probes",
        "",
        "Connections counted at the primary (`connect from` in its maillog); probes counted "
        "by callahead (`callahead_probes_total`) for case 2 and as the backup's delivery "
        "attempts to the primary for case 3 (Postfix probes an unknown address three times "
        "per RCPT).",
        "",
        "| case | primary `in_flow_delay` | workload | probes | new connections | per 100 probes |",
        "|---|---|---|---|---|---|",
    ]
    for row in connection_rows(report):
        per = "-" if row.per100 is None else f"{row.per100:.1f}"
        out.append(
            f"| {row.case.name} | {row.spec.label} | {row.workload} | "
            f"{row.probes} | {row.connects} | {per} |"
        )
    return out


def render_cpu(report: Report) -> list[str]:
    out = [
        "## callahead CPU time per message",
        "",
        "utime + stime of the callahead process (all threads, from /proc/PID/stat) over the "
        "case-2 runs, divided by the messages (sessions for attack) completed in them.",
        "",
        "| case | workload | primary `in_flow_delay` | messages | CPU seconds | CPU per message |",
        "|---|---|---|---|---|---|",
    ]
    for item in report.throughput:
        if item.case in (CALLAHEAD, GUARD) and item.messages:
            per = item.delta.cpu / item.messages
            primary = "- (no probes)" if item.workload == "warm" else item.spec.label
            out.append(
                f"| {item.case.name} | {item.workload} | {primary} | {item.messages} | "
                f"{item.delta.cpu:.2f} | "
                f"{per * 1e6:.0f} µs |"
            )
    return out


def render_memory(report: Report) -> list[str]:
    out = [
        "## Resident memory of the positive cache",
        "",
        "`python -m bench.memory N` in a fresh interpreter: imports callahead's serving "
        "modules, reads VmRSS, fills `callahead.cache.PositiveCache(ttl=86400, maxsize=N)` "
        "with N distinct addresses of typical length, reads VmRSS again.",
        "",
        "| cached addresses | mean address length | RSS before | RSS after | bytes per cached "
        "address | fill time |",
        "|---|---|---|---|---|---|",
    ]
    for m in report.memory:
        per = m["bytes_per_address"]
        out.append(
            f"| {int(str(m['entries'])):,} | {float(str(m['mean_address_length'])):.1f} | "
            f"{fmt_bytes(float(str(m['rss_before'])))} | {fmt_bytes(float(str(m['rss_after'])))} "
            f"| {'-' if per is None else f'{float(str(per)):.0f}'} "
            f"| {float(str(m['fill_seconds'])):.1f} s |"
        )
    if report.live_memory:
        live = report.live_memory
        out += [
            "",
            f"The running callahead at the end of the load: RSS "
            f"{fmt_bytes(live['rss'])} with {live['entries']:.0f} cached addresses.",
        ]
    return out


def render_targets(report: Report) -> list[str]:
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "**no**")

    for workload, minimum in (("warm", 0.90), ("cold", 0.70)):
        for spec in PRIMARIES:
            item = report.find(workload, spec, CALLAHEAD)
            if item is None or not item.runs:
                continue
            r = ratio(report, item)
            where = "" if workload == "warm" else f", primary {spec.label}"
            rows.append(
                (
                    f"{workload} msg/s ≥ {minimum:.2f} of plain Postfix{where}",
                    "-" if r is None else f"{r:.2f}",
                    verdict(None if r is None else r >= minimum),
                )
            )
    trivial = report.find("warm", PRIMARIES[0], TRIVIAL)
    if trivial is not None and trivial.runs:
        r = ratio(report, trivial)
        rows.append(
            (
                "(for comparison) warm msg/s of a trivial pymilter milter (2t), of plain Postfix",
                "-" if r is None else f"{r:.2f}",
                "",
            )
        )
    for lat in report.latency:
        if lat.seconds and lat.case is CALLAHEAD:
            p99 = percentile(lat.seconds, 99)
            rows.append(
                (
                    f"callahead first-contact p99 < 10 ms, {lat.kind}, primary {lat.spec.label}, "
                    f"{sessions(lat.sessions)}",
                    fmt_seconds(p99),
                    verdict(p99 < 0.010),
                )
            )
    for lat in report.latency:
        if lat.seconds and lat.case is PLAIN and lat.kind == "valid":
            rows.append(
                (
                    f"(for comparison) plain Postfix RCPT reply, {sessions(lat.sessions)}",
                    f"p50 {fmt_seconds(percentile(lat.seconds, 50))}, p99 "
                    f"{fmt_seconds(percentile(lat.seconds, 99))}",
                    "",
                )
            )
        if lat.seconds and lat.case is VERIFY:
            rows.append(
                (
                    f"(for comparison) reject_unverified_recipient first contact, {lat.kind}, "
                    f"primary {lat.spec.label}",
                    f"p50 {fmt_seconds(percentile(lat.seconds, 50))}, p99 "
                    f"{fmt_seconds(percentile(lat.seconds, 99))}",
                    "",
                )
            )
    for row in connection_rows(report):
        if row.case is CALLAHEAD and row.workload == "cold" and row.per100 is not None:
            rows.append(
                (
                    f"≤ 1 new connection to the primary per 100 probes (cold, primary "
                    f"{row.spec.label})",
                    f"{row.per100:.1f}",
                    verdict(row.per100 <= 1.0),
                )
            )
    for m in report.memory:
        if m["entries"] == 1_000_000 and m["bytes_per_address"] is not None:
            per = float(str(m["bytes_per_address"]))
            rows.append(
                (
                    "≤ 400 bytes RSS per cached address at 1,000,000",
                    f"{per:.0f}",
                    verdict(per <= 400),
                )
            )
    out = [
        "## Targets (measured, not asserted)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return out


def render(report: Report, env: list[str]) -> str:
    s = report.settings
    wall = report.elapsed()
    out = ["# callahead benchmark", ""]
    out += [f"- {line}" for line in env]
    out += [
        f"- command: `./dev bench` (`python -m bench.run`), runs {s.runs}, messages per run "
        f"{s.messages} (case 3 cold {s.slow_messages}, case 3 attack "
        f"{s.slow_attack_messages}), sessions {s.sessions}; wall time {wall / 60:.1f} min "
        f"({report.setup_seconds:.1f} s of it starting the stack)",
        "- case 2's callahead: defaults, except `CALLAHEAD_CLIENT_UNKNOWN_LIMIT=0` (see 2g)"
        + "".join(f", `{k}={v}`" for k, v in s.callahead_env.items()),
        f"- load average (1/5/15 min) at the start {report.load_start}, at the end "
        f"{report.load_end or loadavg()}: anything else running on the machine shows in "
        "every figure, so compare the cases of one run, not runs of different days",
        "",
        "Cases, all listeners of one Postfix backup MX (master.cf `-o` overrides) sharing one "
        "machine state: **1** plain Postfix, no recipient check; **2** callahead attached "
        "(`smtpd_milters`); **3** `reject_unverified_recipient` with "
        "`address_verify_negative_cache = no` and `unverified_recipient_reject_code = 550`. "
        "Probes (callahead's and Postfix's) go to a real Postfix primary that knows its users; "
        "deliveries go to smtp-sink. Workloads: **warm** every recipient valid and already "
        "cached (by callahead, and in Postfix's verify cache); **cold** every recipient valid "
        "and new; **attack** every recipient unknown. Two more listeners of the same backup "
        "give context: **2g** a second callahead with its per-client guard at the defaults "
        "(attack only; case 2 runs with `CALLAHEAD_CLIENT_UNKNOWN_LIMIT=0` because all load "
        "comes from 127.0.0.1), **2t** a pymilter milter that only says CONTINUE, negotiated "
        "like callahead (warm only): the floor of any pymilter milter.",
        "",
    ]
    out += [*render_targets(report), ""]
    out += [*render_throughput(report), ""]
    out += [*render_latency(report), ""]
    out += [*render_connections(report), ""]
    out += [*render_cpu(report), ""]
    out += [*render_memory(report), ""]
    out += [
        "## Method notes",
        "",
        "- cold: `smtp-source -c -N -s SESSIONS -m COUNT -l 512`; `-N` numbers the "
        "recipients, so message n goes to `<n>c<case>r<run>@domain`: new addresses every run, "
        "all known to the primary.",
        f"- warm: {s.sessions} `smtp-source -c -N -s 1 -m {warm_count(s)} -l 512` processes at "
        f"once, each sending one message to each of the same {warm_count(s)} addresses "
        "`<n>w@a.test`. Before the warm runs, Postfix's verify cache is filled through a "
        "fourth listener with `address_verify_poll_count = 1` (it answers 450 at once and "
        "verifies in the background), and one unmeasured pass over the addresses fills "
        "callahead's cache.",
        "- attack and first contact: the bench's own asyncio client (`bench/smtpclient.py`), "
        "because smtp-source aborts on a rejected RCPT. Attack sessions carry one unknown "
        "recipient each and send the message when it is accepted (case 1 relays it); the "
        "rate counts completed sessions.",
        "- warm makes no probes, so it runs against one primary only.",
        f"- reject_unverified_recipient: a first contact waits for Postfix's verify polling "
        f"(`address_verify_poll_delay` 3 s), so its cold and attack runs use fewer messages and "
        f"its first-contact figures {s.verify_latency_samples} samples per kind with "
        f"{s.verify_latency_sessions} concurrent sessions (Postfix allows 50 per client).",
        "- every figure comes from this one run of the benchmark; nothing is copied from "
        "elsewhere.",
    ]
    for text in report.notes:
        out.append(f"- observed: {text}")
    for what in report.skipped:
        out.append(f"- skipped because of the time budget: {what}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    global _REPORT
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    ok, why = postfix_available()
    if not ok:
        print(f"bench: cannot run Postfix here: {why}", file=sys.stderr)
        return 69
    signal.signal(signal.SIGTERM, _terminate)
    report = _REPORT = Report(settings)
    env = environment()
    users = {spec.domain: primary_users(settings, spec) for spec in PRIMARIES}
    specs = {spec.key: spec for spec in PRIMARIES}
    try:
        phase_memory(report)
        with make_workdir("callahead-bench-") as workdir:
            log(f"starting smtp-sink, 2 Postfix primaries, callahead, the backup in {workdir}")
            setup_start = time.monotonic()
            with build_stack(workdir, users, settings.callahead_env) as stack:
                report.setup_seconds = time.monotonic() - setup_start
                log(f"stack up in {report.setup_seconds:.1f}s; backup ports {stack.ports}")
                for name, phase, key in PHASES:
                    if not report.within_budget(f"{name} ({specs[key].domain})"):
                        continue
                    try:
                        phase(stack, settings, report, specs[key])
                    except Exception as exc:  # noqa: BLE001 -- report it, go on measuring
                        report.note(f"{name} ({specs[key].domain}) failed: {exc!r}")
                    drain(stack)
                report.live_memory = {
                    "rss": float(rss_bytes(stack.callahead_pid)),
                    "entries": stack.callahead.samples().get(("callahead_cache_entries", ()), 0.0),
                }
                report.load_end = loadavg()
                log("stopping the stack")
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    text = render(report, env)
    print()
    print(text)
    if settings.output is not None:
        settings.output.write_text(text)
        log(f"written to {settings.output}")
    log(f"wall time {report.elapsed():.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
