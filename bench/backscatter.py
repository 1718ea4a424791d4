"""How much backscatter callahead prevents and lets through (``python -m bench.backscatter``,
as root).

A real Postfix primary for ``backscatter.test`` with ``--users`` users and no
postmaster@; a real Postfix backup relaying the domain to it with callahead's *milter*
attached (``smtpd_milters``, as deploy/postfix-main.cf), callahead with every default
but the route and ``CALLAHEAD_MAILLOG`` on the backup's ``maillog_file`` (the backscatter
meter); and, side by side, the same backup without callahead (plain Postfix). Both
backups get the same sessions, one after the other, from ``--clients`` client addresses
(127.1.x.y), ``--concurrency`` at a time, one transaction of ``--rcpts`` recipients each,
each recipient a real user (drawn from the users, so that repeats hit the cache) with
probability ``--real``, else a made-up address never used before, the forged sender a
new one per session (the backscatter's victim).

1. The primary up: ``--messages`` sessions.
2. The primary stopped for ``--down`` seconds: ``--messages`` sessions more (what
   callahead cannot decide it accepts and queues: reasons probe_tempfail, primary_down).
3. The primary started again, both backups' queues flushed (``postqueue -f``), until
   they are empty and the meter has read every line of the backup's mail log.

Printed (Markdown): the replies at RCPT per phase, what Postfix's own mail log says
became of each recipient (the truth, by kind), ``callahead report`` from the running
daemon and the meter's metrics, and a summary against plain Postfix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import (
    POSTCONF,
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    instance_paths,
    primary_main_cf,
)
from tests.harness.waiting import wait_for

from .flood import clients
from .smtpclient import Job, run_load
from .tools import ready_to_run

DOMAIN = "backscatter.test"
TIMEOUT = 180.0
PHASES = ("1 primary up", "2 primary down")
METRICS = (
    "callahead_rcpt_decisions_total",
    "callahead_relay_outcomes_total",
    "callahead_backscatter_total",
    "callahead_cache_evictions_total",
)
_DELIVERY = re.compile(r"\]: (\w+): to=<([^>]*)>,.* status=(\w+)")
_NOTIFICATION = re.compile(r"\]: (\w+): sender non-delivery notification")


@dataclass
class Rig:
    callahead: CallaheadProcess
    primary: PostfixInstance
    backups: dict[str, PostfixInstance]
    """``callahead`` (the milter attached) and, unless --no-plain, ``plain``."""


@contextlib.contextmanager
def build(workdir: Path, users: Sequence[str], plain: bool) -> Iterator[Rig]:
    primary_dir = workdir / "primary"
    primary_dir.mkdir(mode=0o755)
    primary_port = free_port()
    primary = PostfixInstance(
        primary_dir, primary_main_cf(workdir=primary_dir, users=users), [Listener(primary_port)]
    )
    names = ("callahead", "plain") if plain else ("callahead",)
    dirs = {name: workdir / f"backup-{name}" for name in names}
    for path in dirs.values():
        path.mkdir(mode=0o755)
    callahead = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{primary_port}",
            "CALLAHEAD_MAILLOG": str(instance_paths(dirs["callahead"]).maillog),
            "CALLAHEAD_LOG_LEVEL": "INFO",
        },
    )
    backups = {
        name: PostfixInstance(
            path,
            backup_mx_main_cf(
                workdir=path,
                relay_domains=[DOMAIN],
                transports={DOMAIN: f"[127.0.0.1]:{primary_port}"},
                milter=callahead.socket if name == "callahead" else None,
                hostname=f"backup-{name}.test",
            ),
            [Listener(free_port())],
        )
        for name, path in dirs.items()
    }
    callahead.start()
    try:
        primary.start()
        for backup in backups.values():
            backup.start()
        yield Rig(callahead, primary, backups)
    finally:
        try:
            for backup in backups.values():
                backup.stop()
            primary.stop()
        finally:
            callahead.stop()


@dataclass
class Replies:
    """RCPT replies by phase, kind (``real``/``made-up``) and code class."""

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def total(self, kind: str, code: str = "", phase: str = "") -> int:
        return sum(
            n
            for (p, k, c), n in self.counts.items()
            if k == kind and (not code or c == code) and (not phase or p == phase)
        )


def code_class(code: int) -> str:
    return "250" if code == 250 else "550" if code == 550 else f"{code // 100}xx"


def jobs_for(
    args: argparse.Namespace, rng: random.Random, users: Sequence[str], sources: Sequence[str]
) -> list[Job]:
    jobs = []
    for i in range(args.messages):
        sender = f"victim{uuid.uuid4().hex[:8]}@forged.test"
        rcpts = tuple(
            rng.choice(users) if rng.random() < args.real else f"{uuid.uuid4().hex[:10]}@{DOMAIN}"
            for _ in range(args.rcpts)
        )
        body = f"From: <{sender}>\r\nSubject: offer {i}\r\n\r\n{'x' * 400}\r\n".encode()
        jobs.append(Job(sender, rcpts, body, source=sources[i % len(sources)]))
    return jobs


def send_phase(
    rig: Rig, phase: str, jobs: Sequence[Job], users: set[str], replies: dict[str, Replies], c: int
) -> None:
    for name, backup in rig.backups.items():
        result = run_load(backup.port, jobs, concurrency=c, deadline=TIMEOUT)
        for session in result.sessions:
            if session.error is not None:
                replies[name].errors[session.error[:60]] += 1
            for rcpt, code in zip(session.job.rcpts, session.rcpt_codes, strict=False):
                kind = "real" if rcpt in users else "made-up"
                replies[name].counts[(phase, kind, code_class(code))] += 1
        log(f"phase {phase}, {name}: {result.completed} sessions in {result.seconds:.1f}s")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def empty(backup: PostfixInstance) -> bool:
    return not backup.queue_ids()


def settle(rig: Rig) -> None:
    """Until both queues are empty and the meter has read every line of the mail log."""
    for name, backup in rig.backups.items():
        wait_for(partial(empty, backup), TIMEOUT, 0.5, f"{name}'s queue empty")
    maillog = rig.backups["callahead"].maillog_path

    def read_up() -> bool:
        written = maillog.read_bytes().count(b"\n")
        read = sum(
            v
            for (name, _), v in rig.callahead.samples().items()
            if name == "callahead_maillog_lines_total"
        )
        return read == written

    time.sleep(1.0)  # postlogd writes the last lines (removed) a moment after the fact
    wait_for(read_up, TIMEOUT, 0.2, "the meter read every line of the mail log")


def fates(text: str, users: set[str]) -> dict[str, int]:
    """What the mail log says became of each recipient of DOMAIN (its last status), by
    kind, and the non-delivery notifications written (one per bounced message)."""
    last: dict[tuple[str, str], str] = {}
    for match in _DELIVERY.finditer(text):
        qid, rcpt, status = match.groups()
        if rcpt.endswith("@" + DOMAIN):
            last[(qid, rcpt)] = status
    out: Counter[str] = Counter()
    for (_, rcpt), status in last.items():
        out[f"{'real' if rcpt in users else 'made-up'} {status}"] += 1
    out["notifications"] = len(set(_NOTIFICATION.findall(text)))
    return dict(out)


def metrics(rig: Rig) -> list[str]:
    return [
        f"{name}{{{','.join(f'{k}={v!r}' for k, v in labels)}}} {value:g}"
        for (name, labels), value in sorted(rig.callahead.samples().items())
        if name in METRICS and value
    ]


def versions() -> str:
    postfix = subprocess.run(
        [POSTCONF, "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"Postfix {postfix}, Python {sys.version.split()[0]}"


def summary(
    args: argparse.Namespace,
    replies: dict[str, Replies],
    truth: dict[str, dict[str, int]],
    report: dict[str, Any],
) -> list[str]:
    counts = report["domains"].get(DOMAIN, {"refused": {}, "deferred": {}, "accepted": {}})
    rows = counts["accepted"]
    mine, out = replies["callahead"], []
    made_up = mine.total("made-up")

    def by_reason(column: str) -> str:
        parts = [f"{r} {row[column]}" for r, row in sorted(rows.items()) if row[column]]
        return ", ".join(parts) or "none"

    refused = sum(counts["refused"].values())
    prevented = mine.total("made-up", "550")
    per_phase = "; ".join(
        f"phase {p}: {mine.total('made-up', '550', p)} of {mine.total('made-up', phase=p)}"
        for p in PHASES
    )
    out += [
        f"- made-up recipients sent to each backup: {made_up} "
        f"({args.messages} sessions of {args.rcpts} recipients a phase, 2 phases)",
        f"- callahead refused at RCPT (550, backscatter prevented): {prevented} of the "
        f"made-up ({100 * prevented / max(made_up, 1):.1f} %; {per_phase}); by reason "
        "(the meter): "
        + (", ".join(f"{r} {n}" for r, n in sorted(counts["refused"].items())) or "none")
        + f" = {refused}",
        f"- deferred at RCPT (4xx): {mine.total('made-up', '4xx')} made-up, "
        f"{mine.total('real', '4xx')} real; by reason: {counts['deferred'] or 'none'}",
        f"- accepted at RCPT: {mine.total('made-up', '250')} made-up and "
        f"{mine.total('real', '250')} real recipients; by reason: {by_reason('accepted')}",
        f"- bounced (backscatter let through), by reason: {by_reason('bounced')}; of "
        f"those, with a non-delivery notification to the forged sender: "
        f"{by_reason('backscatter')} (the mail log: "
        f"{truth['callahead'].get('made-up bounced', 0)} made-up recipients bounced, "
        f"{truth['callahead'].get('notifications', 0)} notifications, one per message)",
        f"- real users delivered, by reason: {by_reason('sent')} (the mail log: "
        f"{truth['callahead'].get('real sent', 0)} sent, "
        f"{truth['callahead'].get('real bounced', 0)} bounced, of {mine.total('real')} "
        "sent by the clients)",
    ]
    if "plain" in replies:
        plain, bounced = replies["plain"], truth["plain"].get("made-up bounced", 0)
        ours = truth["callahead"].get("made-up bounced", 0)
        out += [
            f"- plain Postfix, same sessions: {plain.total('made-up', '250')} of {made_up} "
            f"made-up accepted, {bounced} bounced "
            f"({truth['plain'].get('notifications', 0)} non-delivery notifications); "
            f"{truth['plain'].get('real sent', 0)} real delivered",
            f"- backscatter with callahead: {ours} bounced recipients "
            f"({truth['callahead'].get('notifications', 0)} notifications) against "
            f"{bounced} without: {100 * (1 - ours / max(bounced, 1)):.1f} % prevented "
            "(the made-up refused, by phase, above)",
        ]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backscatter", description=__doc__)
    parser.add_argument("--messages", type=int, default=300, help="sessions per phase")
    parser.add_argument("--rcpts", type=int, default=2, help="recipients per session")
    parser.add_argument("--real", type=float, default=0.1, help="share of real users")
    parser.add_argument("--users", type=int, default=30, help="real users of the primary")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--down", type=float, default=20.0, help="seconds the primary is down")
    parser.add_argument("--no-plain", action="store_true", help="no plain Postfix backup")
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    if not ready_to_run(parser.prog):
        return 1
    rng = random.Random(args.seed)
    users = [f"user{i}@{DOMAIN}" for i in range(args.users)]
    user_set, sources = set(users), clients(args.clients)
    replies: dict[str, Replies] = {}
    started, load = time.monotonic(), os.getloadavg()[0]
    with (
        make_workdir("callahead-backscatter-") as workdir,
        build(workdir, users, not args.no_plain) as rig,
    ):
        replies = {name: Replies() for name in rig.backups}
        send_phase(
            rig,
            PHASES[0],
            jobs_for(args, rng, users, sources),
            user_set,
            replies,
            args.concurrency,
        )
        settle(rig)
        rig.primary.stop()
        down = time.monotonic()
        log("primary stopped")
        jobs = jobs_for(args, rng, users, sources)
        send_phase(rig, PHASES[1], jobs, user_set, replies, args.concurrency)
        time.sleep(max(0.0, args.down - (time.monotonic() - down)))
        rig.primary.start()
        log("primary started; flushing")
        for backup in rig.backups.values():
            backup.flush()
        settle(rig)
        table = rig.callahead.cli("report", "--from", "daemon", "--domain", DOMAIN)
        answer = rig.callahead.cli("report", "--from", "daemon", "--json", "--domain", DOMAIN)
        report: dict[str, Any] = json.loads(answer.stdout)
        shown = metrics(rig)
        truth = {n: fates(b.maillog(), user_set) for n, b in rig.backups.items()}
    text = render(args, replies, truth, report, table.stdout, shown, started, load)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


def render(
    args: argparse.Namespace,
    replies: dict[str, Replies],
    truth: dict[str, dict[str, int]],
    report: dict[str, Any],
    table: str,
    shown: list[str],
    started: float,
    load: float,
) -> str:
    settings = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("output",)
    )
    lines = [
        "## Run",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at the start; {versions()}",
        f"- settings: {settings}",
        f"- took {time.monotonic() - started:.0f} s",
        "",
        "## Summary",
        "",
        *summary(args, replies, truth, report),
        "",
        "## Replies at RCPT (the client's view)",
        "",
        "| backup | phase | kind | 550 | 4xx | 250 |",
        "|---|---|---|---|---|---|",
    ]
    for name, rep in replies.items():
        for phase in PHASES:
            for kind in ("made-up", "real"):
                cells = " | ".join(str(rep.total(kind, c, phase)) for c in ("550", "4xx", "250"))
                lines.append(f"| {name} | {phase} | {kind} | {cells} |")
        if rep.errors:
            lines.append(f"\n{name}: session errors {dict(rep.errors)}\n")
    lines += ["", "## What each backup's mail log says became of the recipients", ""]
    lines += [f"- {name}: {json.dumps(dict(sorted(t.items())))}" for name, t in truth.items()]
    lines += ["", "## `callahead report --domain backscatter.test` (from the daemon)", ""]
    lines += ["```", table.rstrip(), "```", "", "## The meter's metrics after it", ""]
    lines += ["```", *shown, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
