"""The measurements: one phase per workload (warm, cold, attack, first-contact latency,
memory), each filling the ``Report``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from tests.harness.waiting import wait_for

from .plan import (
    DRAIN_TIMEOUT,
    EXTRAS,
    MESSAGE_SIZE,
    PROBE_LINE,
    SENDER,
    Settings,
    attack_addresses,
    case_messages,
    cold_base,
    latency_addresses,
    latency_plan,
    load_name,
    numbered,
    rotated,
    warm_base,
    warm_count,
)
from .report import Delta, Latency, Report, RunFigure, Throughput
from .smtpclient import Job, message_body, run_load
from .stack import (
    CALLAHEAD,
    CASES,
    GUARD,
    NULL_POLICY,
    PRIMARIES,
    REPO,
    TRIVIAL,
    VERIFY,
    Case,
    PrimarySpec,
    Stack,
)
from .tools import LogCursor, SourceResult, cpu_seconds, smtp_source


class Meter:
    """Snapshots before a run; ``finish`` returns the ``Delta`` once the backup is idle.

    A Meter spans one case's run and the drain after it, and the runs of a phase follow
    one another, so ``Delta.cpu`` is what the process behind that case (``Stack.cpu_pid``:
    the callahead, or the floor's own process for 2t and 2pt) spent in that run alone,
    plus whatever it does in the background meanwhile (case 1's runs show that amount,
    measured on case 2's idle callahead)."""

    def __init__(self, stack: Stack, spec: PrimarySpec, case: Case, report: Report) -> None:
        self._stack = stack
        self._report = report
        self._process, _ = stack.process(case)
        self._pid = stack.cpu_pid(case)
        self._primary_port = stack.primary_port(spec.domain)
        self._cpu = cpu_seconds(self._pid)
        self._samples = self._process.samples()
        self._primary_log = LogCursor(stack.primaries[spec.domain].maillog_path)
        self._backup_log = LogCursor(stack.backup.maillog_path)

    def finish(self) -> Delta:
        drain(self._stack, self._report)
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


def drain(stack: Stack, report: Report) -> None:
    """Wait until the backup's queue is empty (deliveries to smtp-sink, verify probes)."""
    try:
        wait_for(lambda: stack.backup_queue_size() == 0, DRAIN_TIMEOUT, 0.05, "queue")
    except TimeoutError:
        report.note(
            f"the backup's queue did not drain within {DRAIN_TIMEOUT:g}s "
            f"({stack.backup_queue_size()} files left); later runs overlap with it"
        )


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def source_run(
    stack: Stack,
    settings: Settings,
    report: Report,
    case: Case,
    base: str,
    count: int,
    *,
    warm: bool = False,
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
        report.note(
            f"smtp-source on {case.key} ({base}) exited {result.returncode}: {result.stderr[-300:]}"
        )
    return result


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


def phase_warm(stack: Stack, settings: Settings, report: Report, spec: PrimarySpec) -> None:
    base = warm_base(spec)
    addresses = numbered(base, warm_count(settings))
    total = warm_count(settings) * settings.sessions
    log(f"warm ({spec.domain}): filling Postfix's verify cache with {len(addresses)} users")
    left = fill_verify_cache(stack, addresses, 60.0)
    if left:
        report.note(f"warm: Postfix's verify cache still lacked {left} addresses after 60 s")
    drain(stack, report)
    log("warm: one unmeasured pass over the warm addresses for callahead (fills its cache)")
    cases = (*CASES, TRIVIAL, NULL_POLICY)
    for case in (CALLAHEAD, VERIFY):
        source_run(stack, settings, report, case, base, len(addresses))
        drain(stack, report)
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
            meter = Meter(stack, spec, case, report)
            result = source_run(stack, settings, report, case, base, total, warm=True)
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
            meter = Meter(stack, spec, case, report)
            count = case_messages(settings, case)
            result = source_run(stack, settings, report, case, cold_base(spec, case, run), count)
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
            meter = Meter(stack, spec, case, report)
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
        meter = Meter(stack, spec, case, report)
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


def _run_json(report: Report, what: str, argv: list[str], timeout: float) -> object | None:
    """``python -m ARGV`` from the repository root: the JSON document it prints, or None
    (noted in the report) when it fails."""
    log(f"{what}: python -m {' '.join(argv)}")
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        report.note(f"{' '.join(argv)} failed: {proc.stderr.strip()[-400:]}")
        return None
    found: object = json.loads(proc.stdout)
    return found


def phase_memory(report: Report) -> None:
    for n in (100_000, 1_000_000):
        if not report.within_budget(f"memory with {n} addresses"):
            return
        found = _run_json(report, "memory: positive cache", ["bench.memory", str(n)], 180)
        if isinstance(found, dict):
            report.memory.append(found)


def phase_extras(report: Report) -> None:
    """The drivers of ``EXTRAS`` that the settings ask for, in their order."""
    settings = report.settings
    for extra in EXTRAS:
        if extra.name not in settings.extras or not report.within_budget(extra.name):
            continue
        argv = extra.quick if settings.quick_extras else extra.argv
        found = _run_json(report, extra.name, argv, extra.timeout)
        if found is not None:
            report.extras[extra.name] = found


PHASES: tuple[tuple[str, Callable[[Stack, Settings, Report, PrimarySpec], None], str], ...] = (
    ("warm", phase_warm, "a"),
    ("cold", phase_cold, "a"),
    ("attack", phase_attack, "a"),
    ("latency", phase_latency, "a"),
    ("cold", phase_cold, "b"),
    ("attack", phase_attack, "b"),
    ("latency", phase_latency, "b"),
)
