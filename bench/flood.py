"""A dictionary attack as a backup MX sees it (``python -m bench.flood``, as root).

The benchmark's stack (bench/stack.py: one real Postfix backup with a listener per case,
real Postfix primaries, smtp-sink for deliveries), and a load of ``--concurrency``
concurrent SMTP sessions from ``--clients`` distinct client addresses (127.1.x.y: all of
127/8 is loopback, so the backup sees each as a client of its own), each session one
transaction of ``--rcpts`` recipients, each recipient a real user of the primary with
probability ``--real`` (from 200 users, so most are cached after their first contact)
and otherwise a made-up address never used before. The primary is ``b.test``'s: a real
Postfix with Postfix's default limits (``in_flow_delay = 1s``, error limits...).

Cases, interleaved in a rotating order within each run: **1** plain Postfix (no
verification), **2g** callahead's milter with every default (its per-client guard on),
**2** callahead's milter with the guard off, **2p** its policy service (guard off, the
same process as 2), **3** ``reject_unverified_recipient`` as the seeds set it up.

Reported per case (median over runs, and the totals): messages (sessions whose message
was accepted) and sessions per second; the RCPT reply's p50 and p99; the replies to the
made-up recipients (550, 4xx, 250) and to the real users; probes and new connections to
the primary per recipient and per 50 probes; callahead's RSS at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.fixtures import make_workdir
from tests.harness.waiting import wait_for

from .report import percentile
from .smtpclient import Job, LoadResult, message_body, run_load
from .stack import CALLAHEAD, GUARD, PLAIN, POLICY, PRIMARIES, VERIFY, Case, Stack, build_stack
from .tools import CLOCK_TICKS, LogCursor, cpu_seconds, rss_bytes

SPEC = PRIMARIES[1]
"""b.test: the primary with Postfix's default in_flow_delay."""
USERS = [f"user{i}@{SPEC.domain}" for i in range(200)]
SENDER = "sender@remote.test"
CASES = (PLAIN, GUARD, CALLAHEAD, POLICY, VERIFY)
SLOW = 0.5


@dataclass
class Figures:
    case: Case
    runs: list[dict[str, float]] = field(default_factory=list)
    rcpt_seconds: list[float] = field(default_factory=list)
    slow: Counter[str] = field(default_factory=Counter)
    """Replies over SLOW seconds, by the recipient's place in its session and kind."""
    unknown_codes: Counter[int] = field(default_factory=Counter)
    real_codes: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    probes: float = 0.0
    connections: int = 0
    recipients: int = 0
    rss: int = 0
    split: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    """CPU seconds over the runs, by process group."""
    seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        def med(key: str) -> float:
            return round(statistics.median(r[key] for r in self.runs), 1)

        seconds = self.rcpt_seconds

        def pct(p: float) -> float:
            return round(percentile(seconds, p) * 1000, 1)

        unknowns = sum(self.unknown_codes.values())
        return {
            "case": self.case.name,
            "messages_per_s": med("messages_per_s"),
            "sessions_per_s": med("sessions_per_s"),
            "rcpt_p50_ms": pct(50) if seconds else None,
            "rcpt_p99_ms": pct(99) if seconds else None,
            "unknown_replies": dict(sorted(self.unknown_codes.items())),
            "unknown_550_share": round(self.unknown_codes[550] / unknowns, 3) if unknowns else None,
            "real_replies": dict(sorted(self.real_codes.items())),
            "errors": dict(self.errors),
            f"replies_over_{SLOW:g}s": dict(self.slow.most_common()),
            "recipients": self.recipients,
            "probes_per_recipient": round(self.probes / self.recipients, 3),
            "primary_connections_per_recipient": round(self.connections / self.recipients, 3),
            "primary_connections_per_50_probes": (
                round(50 * self.connections / self.probes, 2) if self.probes else None
            ),
            "callahead_cpu_us_per_recipient": (
                round(self.split["callahead"] / self.recipients * 1e6)
                if "callahead" in self.split
                else None
            ),
            "callahead_rss_mib": round(self.rss / 2**20, 1) if self.rss else None,
            "cpu_cores_used": {
                who: round(spent / self.seconds, 2) for who, spent in self.split.items()
            },
        }


def tree_cpu(master: int | None) -> float:
    """CPU seconds of a Postfix instance: its master, the children it reaped (cutime,
    cstime) and the children still running."""
    if master is None:
        return 0.0
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        pid, ppid = int(entry.name), int(fields[1])
        if pid == master:
            total += sum(int(x) for x in fields[11:15]) / CLOCK_TICKS
        elif ppid == master:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def cpu_snapshot(stack: Stack, case: Case, domain: str = SPEC.domain) -> dict[str, float]:
    """CPU seconds so far, by who spent them (the primary: ``domain``'s)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "callahead": cpu_seconds(stack.process(case)[1]),
        "backup Postfix": tree_cpu(stack.backup.master_pid),
        "primary Postfix": tree_cpu(stack.primaries[domain].master_pid),
        "load generator": usage.ru_utime + usage.ru_stime,
    }


def clients(n: int) -> list[str]:
    return [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(n)]


def jobs_for(args: argparse.Namespace, rng: random.Random, sources: Sequence[str]) -> list[Job]:
    body = message_body(512, SENDER)
    jobs = []
    for i in range(args.sessions):
        rcpts = tuple(
            rng.choice(USERS)
            if rng.random() < args.real
            else f"x{uuid.uuid4().hex[:12]}@{SPEC.domain}"
            for _ in range(args.rcpts)
        )
        jobs.append(Job(SENDER, rcpts, body, source=sources[i % len(sources)]))
    return jobs


def probes_total(stack: Stack, case: Case) -> float:
    if case in (PLAIN, VERIFY):
        return 0.0
    process, _ = stack.process(case)
    return sum(
        value
        for (name, _labels), value in process.samples().items()
        if name == "callahead_probes_total"
    )


def one_run(
    stack: Stack, case: Case, jobs: Sequence[Job], figures: Figures, args: argparse.Namespace
) -> None:
    primary_log = LogCursor(stack.primaries[SPEC.domain].maillog_path)
    probes_before = probes_total(stack, case)
    split_before = cpu_snapshot(stack, case)
    result: LoadResult = run_load(
        stack.port(case), jobs, concurrency=args.concurrency, deadline=args.deadline
    )
    split_after = cpu_snapshot(stack, case)
    for who, spent in split_after.items():
        if who != "callahead" or case not in (PLAIN, VERIFY):
            figures.split[who] += spent - split_before[who]
    figures.seconds += result.seconds
    # The accepted messages delivered (to smtp-sink) and Postfix's own probes done.
    wait_for(lambda: stack.backup_queue_size() == 0, 120.0, 0.05, "the backup's queue")
    time.sleep(0.3)  # postlogd writes a moment after the fact
    figures.connections += primary_log.read_new().count(" connect from ")
    figures.probes += probes_total(stack, case) - probes_before
    messages = sum(1 for s in result.sessions if s.data_code == 250)
    figures.runs.append(
        {
            "messages_per_s": messages / result.seconds,
            "sessions_per_s": result.completed / result.seconds,
        }
    )
    for session in result.sessions:
        if session.error is not None:
            figures.errors[session.error[:60]] += 1
        for place, (rcpt, code, seconds) in enumerate(
            zip(session.job.rcpts, session.rcpt_codes, session.rcpt_seconds, strict=False)
        ):
            if seconds > SLOW:
                kind = "real" if rcpt in USERS else "made-up"
                figures.slow[f"RCPT {place + 1} of the session, {kind}, {code}"] += 1
            figures.recipients += 1
            figures.rcpt_seconds.append(seconds)
            (figures.real_codes if rcpt in USERS else figures.unknown_codes)[code] += 1
    print(
        f"[{time.strftime('%H:%M:%S')}] {case.name}: {messages} messages, "
        f"{result.completed} sessions in {result.seconds:.1f}s, "
        f"replies {dict(result.rcpt_code_counts())}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=400, help="per run and case")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rcpts", type=int, default=4, help="recipients per session")
    parser.add_argument("--real", type=float, default=0.1, help="share of real users")
    parser.add_argument("--deadline", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--callahead-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="a setting for the callahead of cases 2 and 2p",
    )
    parser.add_argument(
        "--case", action="append", choices=[c.key for c in CASES], help="only these cases"
    )
    args = parser.parse_args(argv)
    cases: tuple[Case, ...] = tuple(
        c for c in CASES if not args.case or c.key in args.case or c is PLAIN
    )
    rng = random.Random(20)
    sources = clients(args.clients)
    figures = {case: Figures(case) for case in cases}
    started = time.monotonic()
    with (
        make_workdir() as workdir,
        build_stack(
            workdir, {SPEC.domain: USERS}, dict(x.split("=", 1) for x in args.callahead_env)
        ) as stack,
    ):
        for run in range(args.runs):
            shift = run % len(cases)
            for case in cases[shift:] + cases[:shift]:
                one_run(stack, case, jobs_for(args, rng, sources), figures[case], args)
        for case, item in figures.items():
            if case is not PLAIN and case is not VERIFY:
                item.rss = rss_bytes(stack.process(case)[1])
                refused = {
                    key: value
                    for key, value in stack.process(case)[0].samples().items()
                    if key[0].startswith("callahead_policy_") and value
                }
                print(f"{case.name}: {refused}", file=sys.stderr)
    plain = statistics.median(r["sessions_per_s"] for r in figures[PLAIN].runs)
    entries = []
    for item in figures.values():
        entry = item.summary()
        sessions = statistics.median(r["sessions_per_s"] for r in item.runs)
        entry["sessions_of_plain"] = round(sessions / plain, 3)
        entries.append(entry)
    out = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "case")},
        "seconds": round(time.monotonic() - started),
        "cases": entries,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
