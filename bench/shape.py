"""What one recipient per transaction costs on a default Postfix primary.

``python -m bench.shape [--probes 100] [--runs 3] [--output FILE]``, as root, from the
repository root, in the venv. Not part of ``./dev bench`` nor of the test suite.

One throwaway Postfix primary (Debian's package, ``tests.harness.postfix``, default
limits, **default ``in_flow_delay = 1s``**) that knows its users through
``virtual_mailbox_maps``, with two smtpd listeners of the same instance:

* ``A``: default restrictions: callahead keeps one transaction with many RCPTs;
* ``B``: ``smtpd_recipient_restrictions = reject_multi_recipient_bounce``: callahead
  switches to one RCPT per transaction (RSET, ``MAIL FROM:<>``, RCPT) after the first
  ``5.5.3``;
* ``B0``: listener B once more, after ``postconf in_flow_delay=0s`` and a reload (one
  run, to tell the inflow throttle from the cost of the RSETs).

The primary keeps Postfix's default ``queue_run_delay`` and backoff times (see
``DEFAULT_TIMERS``), and nothing is delivered: the worst case, an idle primary.

callahead's real probe engine (``ProbeEngine`` with the settings ``callahead serve``
uses: its positive cache and the control addresses it feeds) probes, per run and
listener, a fresh set of valid users and then of unknown ones, one at a time and then 10
at a time (one engine per run and listener, closed between phases so that every
session's counts are in the primary's log; what it learnt of the primary's transaction
shape stays). Runs alternate A and B.

Measured per phase: the time of each probe (the engine call); from the primary's
maillog the connections, the queue files smtpd opened (its ``QUEUEID: client=`` line,
one per transaction with an accepted RCPT: each asks for an inflow token) and, from
each session's ``disconnect from`` line, the MAIL, RCPT and RSET commands it got; the
inflow tokens left in the instance's flow pipe (``FIONREAD`` on the pipe every Postfix
daemon has as fd 3) before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import fcntl
import os
import platform
import re
import struct
import sys
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import (
    POSTCONF,
    Listener,
    PostfixInstance,
    primary_main_cf,
)
from tests.harness.waiting import wait_for

from callahead.caching.cache import PositiveCache
from callahead.caching.controls import Controls
from callahead.probing.engine import EngineSettings, ProbeEngine
from callahead.probing.enginetypes import Unobserved
from callahead.process.assembly import engine_settings
from callahead.process.config import load_config
from callahead.routing.routes import Nexthop

from .report import percentile
from .tools import LogCursor, ready_to_run

DOMAIN = "shape.test"
HELO = "backup.shape.test"
CONCURRENCY = (1, 10)
KINDS = ("valid", "unknown")
INFLOW_WAIT = 0.9
"""A probe this slow waited on the primary's inflow throttle (``in_flow_delay = 1s``)."""
MULTI_BOUNCE = {"smtpd_recipient_restrictions": "reject_multi_recipient_bounce"}


@dataclass(frozen=True)
class Target:
    key: str
    title: str
    overrides: dict[str, str]


TARGETS = {
    "A": Target("A", "default restrictions", {}),
    "B": Target("B", "reject_multi_recipient_bounce", MULTI_BOUNCE),
    "B0": Target("B0", "B with in_flow_delay = 0s in main.cf", MULTI_BOUNCE),
}
LISTENERS = ("A", "B")
"""B0 is listener B once main.cf says ``in_flow_delay = 0s`` (postconf and reload):
Postfix takes the inflow tokens and sleeps in cleanup(8), not in smtpd, so an smtpd
``-o in_flow_delay=0s`` changes nothing (measured)."""
DEFAULT_TIMERS = ("queue_run_delay", "minimal_backoff_time", "maximal_backoff_time")
"""Settings of the harness's throwaway instances that this primary leaves at Postfix's
defaults: an idle qmgr refills the flow pipe to ``default_process_limit`` (100) tokens
each time it wakes, and the harness's ``queue_run_delay = 1s`` would wake it every
second, hiding the throttle that an idle primary (qmgr woken every 300 s) shows."""


# --------------------------------------------------------------------------------------
# the primary's log
# --------------------------------------------------------------------------------------

CONNECT = re.compile(r"/smtpd\[\d+\]: connect from ")
DISCONNECT = re.compile(r"/smtpd\[\d+\]: disconnect from \S+(?P<stats>.*)$", re.MULTILINE)
QUEUE_FILE = re.compile(r"/smtpd\[\d+\]: [0-9A-Za-z]+: client=")
"""smtpd's line for each queue file it opens (at a transaction's first accepted RCPT):
each one asks cleanup(8) for an inflow token."""
STAT = re.compile(r"(\w+)=(\d+)(?:/(\d+))?")


@dataclass
class Commands:
    """Commands the primary saw, from its ``disconnect from`` lines (Postfix 3.0+: each
    command's accepted/total count; a bare number: all accepted)."""

    sessions: int = 0
    mail: int = 0
    rcpt: int = 0
    rcpt_accepted: int = 0
    rset: int = 0
    queue_files: int = 0

    def add(self, other: Commands) -> None:
        for name in ("sessions", "mail", "rcpt", "rcpt_accepted", "rset", "queue_files"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def parse_commands(log: str) -> Commands:
    """Sum the command counts of every ``disconnect from`` line in ``log``."""
    found = Commands(queue_files=len(QUEUE_FILE.findall(log)))
    for match in DISCONNECT.finditer(log):
        found.sessions += 1
        for name, first, second in STAT.findall(match.group("stats")):
            total = int(second or first)
            if name == "mail":
                found.mail += total
            elif name == "rcpt":
                found.rcpt += total
                found.rcpt_accepted += int(first)
            elif name == "rset":
                found.rset += total
    return found


def connects(log: str) -> int:
    return len(CONNECT.findall(log))


# --------------------------------------------------------------------------------------
# the inflow tokens
# --------------------------------------------------------------------------------------


def _master_children(master: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != master:
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = Path(f"/proc/{entry}/stat").read_text()
                if int(text[text.rindex(")") + 2 :].split()[1]) == master:
                    pids.append(int(entry))
    return pids


def inflow_tokens(instance: PostfixInstance) -> int | None:
    """The tokens in the instance's flow pipe (Postfix's ``mail_flow``: fd 3 of every
    daemon the master started, one byte a token), or None if it cannot be read."""
    master = instance.master_pid
    if master is None:
        return None
    for pid in _master_children(master):
        link = f"/proc/{pid}/fd/3"
        with contextlib.suppress(OSError):
            if not os.readlink(link).startswith("pipe:"):
                continue
            fd = os.open(link, os.O_RDONLY | os.O_NONBLOCK)
            try:
                buf = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
                return int(struct.unpack("i", buf)[0])
            finally:
                os.close(fd)
    return None


# --------------------------------------------------------------------------------------
# probing
# --------------------------------------------------------------------------------------


class Counting(Unobserved):
    """The engine's observer: only the connections it opens (the rest it ignores, as
    the engine's own observer of nobody does)."""

    def __init__(self) -> None:
        self.opened = 0

    def connection_opened(self, primary: str) -> None:
        self.opened += 1


@dataclass
class Phase:
    """One phase of one run: ``kind`` addresses probed ``concurrency`` at a time."""

    target: str
    run: int
    kind: str
    concurrency: int
    times: list[float] = field(default_factory=list)
    verdicts: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    opened: int = 0
    """Connections the engine opened."""
    connects: int = 0
    """``connect from`` lines at the primary."""
    commands: Commands = field(default_factory=Commands)
    tokens_before: int | None = None
    tokens_after: int | None = None

    @property
    def probes(self) -> int:
        return len(self.times)

    @property
    def slow(self) -> int:
        return sum(t >= INFLOW_WAIT for t in self.times)


def settings() -> EngineSettings:
    """What ``callahead serve`` would use by default, with sender ``<>``."""
    base = engine_settings(load_config({"CALLAHEAD_HELO_NAME": HELO}))
    return dataclasses.replace(base, sender="", fallback_sender="")


def addresses(target: str, run: int, kind: str, concurrency: int, count: int) -> list[str]:
    prefix = "v" if kind == "valid" else "u"
    return [f"{prefix}{target.lower()}{run}c{concurrency}-{n}@{DOMAIN}" for n in range(count)]


async def probe_all(
    engine: ProbeEngine, hop: Nexthop, targets: Sequence[str], concurrency: int, phase: Phase
) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(address: str) -> None:
        async with gate:
            started = time.monotonic()
            result = await engine.probe(address, [hop])
            phase.times.append(time.monotonic() - started)
            name = result.verdict.value
            phase.verdicts[name] = phase.verdicts.get(name, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(one(address) for address in targets))
    phase.wall = time.monotonic() - started


def log(text: str) -> None:
    print(f"[shape {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run_target(
    primary: PostfixInstance, port: int, target: str, run: int, count: int
) -> list[Phase]:
    """One run against one listener: valid then unknown, sequential then concurrent."""
    observer = Counting()
    cache = PositiveCache(ttl=86400, maxsize=100_000)
    engine = ProbeEngine(settings(), observer, cache, controls=Controls(cache))
    hop = Nexthop("127.0.0.1", port)
    cursor = LogCursor(primary.maillog_path)
    phases = []
    try:
        for concurrency in CONCURRENCY:
            for kind in KINDS:
                phase = Phase(target, run, kind, concurrency)
                phase.tokens_before = inflow_tokens(primary)
                opened = observer.opened
                await probe_all(
                    engine,
                    hop,
                    addresses(target, run, kind, concurrency, count),
                    concurrency,
                    phase,
                )
                await engine.aclose()  # every session's counts into the log
                phase.opened = observer.opened - opened
                text = await asyncio.to_thread(_settled_log, cursor)
                phase.connects = connects(text)
                phase.commands = parse_commands(text)
                phase.tokens_after = inflow_tokens(primary)
                phases.append(phase)
                log(
                    f"{target} run {run} {kind} x{concurrency}: {phase.wall:.1f}s, "
                    f"{phase.verdicts}, conns {phase.connects}, rset {phase.commands.rset}, "
                    f"tokens {phase.tokens_before}->{phase.tokens_after}, slow {phase.slow}"
                )
    finally:
        await engine.aclose()
    return phases


def _settled_log(cursor: LogCursor) -> str:
    """What the log gained, once every session in it has its ``disconnect`` line
    (postlogd writes a moment after smtpd)."""
    text = ""

    def settled() -> bool:
        nonlocal text
        text += cursor.read_new()
        return connects(text) == len(DISCONNECT.findall(text))

    with contextlib.suppress(TimeoutError):
        wait_for(settled, 15.0, interval=0.05, what="disconnect lines")
    return text


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------


def fmt_time(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summary_rows(phases: Sequence[Phase]) -> list[list[str]]:
    rows = []
    for target in TARGETS:
        for concurrency in CONCURRENCY:
            for kind in KINDS:
                group = [
                    p
                    for p in phases
                    if p.target == target and p.kind == kind and p.concurrency == concurrency
                ]
                if not group:
                    continue
                times = [t for p in group for t in p.times]
                probes = sum(p.probes for p in group)
                commands = Commands()
                for p in group:
                    commands.add(p.commands)
                walls = [p.wall for p in group]
                rates = [p.probes / p.wall for p in group if p.wall > 0]
                verdicts: dict[str, int] = {}
                for p in group:
                    for name, n in p.verdicts.items():
                        verdicts[name] = verdicts.get(name, 0) + n
                rows.append(
                    [
                        target,
                        kind,
                        str(concurrency),
                        str(len(group)),
                        fmt_time(median(times)),
                        fmt_time(percentile(times, 99)),
                        f"{median(walls):.1f} s [{min(walls):.1f}-{max(walls):.1f}]",
                        f"{median(rates):.1f}",
                        f"{100 * sum(p.connects for p in group) / probes:.1f}",
                        f"{commands.rset / probes:.2f}",
                        f"{commands.mail / probes:.2f}",
                        f"{commands.rcpt / probes:.2f}",
                        f"{commands.queue_files / probes:.2f}",
                        f"{sum(p.slow for p in group)}/{probes}",
                        ", ".join(f"{n} {name}" for name, n in sorted(verdicts.items())),
                    ]
                )
    return rows


SUMMARY_HEADER = [
    "listener",
    "addresses",
    "at once",
    "runs",
    "median",
    "p99",
    "total (median [min-max])",
    "probes/s",
    "conns/100 probes",
    "RSET/probe",
    "MAIL/probe",
    "RCPT/probe",
    "queue files (tokens asked)/probe",
    "probes >= 0.9 s",
    "verdicts",
]

RUN_HEADER = [
    "order",
    "listener",
    "run",
    "addresses",
    "at once",
    "total",
    "median",
    "p99",
    "conns (engine/primary)",
    "MAIL",
    "RCPT (accepted/all)",
    "RSET",
    "queue files",
    "tokens before -> after",
    "probes >= 0.9 s",
]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def render(phases: Sequence[Phase], env: Sequence[str], count: int, runs: int) -> str:
    out = [
        "# One recipient per transaction on a default Postfix primary: figures",
        "",
        "Written by `python -m bench.shape` (method: its docstring and RESULTS-shape.md).",
        "",
        *(f"- {line}" for line in env),
        f"- {count} addresses per phase; {runs} runs of A and B, alternating (A, B, A, B, "
        "...), then one of B0; each run: valid one at a time, unknown one at a time, "
        "valid 10 at a time, unknown 10 at a time, all new addresses",
        "",
        "## Per case (all runs together)",
        "",
        *table(SUMMARY_HEADER, summary_rows(phases)),
        "",
        "## Every phase, in the order run",
        "",
    ]
    rows = []
    for n, p in enumerate(phases, 1):
        c = p.commands
        rows.append(
            [
                str(n),
                p.target,
                str(p.run),
                p.kind,
                str(p.concurrency),
                f"{p.wall:.2f} s",
                fmt_time(median(p.times)),
                fmt_time(percentile(p.times, 99)),
                f"{p.opened}/{p.connects}",
                str(c.mail),
                f"{c.rcpt_accepted}/{c.rcpt}",
                str(c.rset),
                str(c.queue_files),
                f"{p.tokens_before} -> {p.tokens_after}",
                str(p.slow),
            ]
        )
    out += table(RUN_HEADER, rows)
    return "\n".join(out) + "\n"


def environment(started: float) -> list[str]:
    import subprocess

    proc = subprocess.run(
        [POSTCONF, "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    )
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return [
        "date: "
        + datetime.datetime.fromtimestamp(started, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        f"machine: {len(os.sched_getaffinity(0))} cores, Linux {platform.release()}, "
        f"load average at the end {load}",
        f"Postfix {proc.stdout.strip() or '?'}, Python {platform.python_version()}",
    ]


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.shape", description="One recipient per transaction: the cost."
    )
    parser.add_argument("--probes", type=int, default=100, help="addresses per phase")
    parser.add_argument("--runs", type=int, default=3, help="runs of A and of B (alternating)")
    parser.add_argument("--budget", type=float, default=1200, help="no new run after this (s)")
    parser.add_argument("--output", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def all_valid(count: int, runs: int) -> list[str]:
    users = []
    for target, target_runs in (("A", runs), ("B", runs), ("B0", 1)):
        for run in range(1, target_runs + 1):
            for concurrency in CONCURRENCY:
                users += addresses(target, run, "valid", concurrency, count)
    return users


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not ready_to_run("bench.shape"):
        return 69
    started = time.time()
    phases: list[Phase] = []
    order = [(t, r) for r in range(1, args.runs + 1) for t in ("A", "B")] + [("B0", 1)]
    try:
        with make_workdir("callahead-shape-") as workdir, contextlib.ExitStack() as stack:
            pdir = workdir / "primary"
            pdir.mkdir(mode=0o755)
            main_cf = primary_main_cf(
                workdir=pdir,
                users=all_valid(args.probes, args.runs),
                domains=[DOMAIN],
                in_flow_delay="1s",
            )
            for key in DEFAULT_TIMERS:
                main_cf.pop(key, None)
            ports = {key: free_port() for key in LISTENERS}
            ports["B0"] = ports["B"]
            listeners = [Listener(ports[key], TARGETS[key].overrides) for key in LISTENERS]
            primary = stack.enter_context(PostfixInstance(pdir, main_cf, listeners))
            log(f"primary up, ports {ports}, inflow tokens {inflow_tokens(primary)}")
            for target, run in order:
                if target == "B0":
                    primary.postconf(in_flow_delay="0s")
                    log(f"in_flow_delay = 0s, reloaded; tokens {inflow_tokens(primary)}")
                if time.time() - started > args.budget:
                    log(f"budget spent: {target} run {run} skipped")
                    continue
                phases += asyncio.run(run_target(primary, ports[target], target, run, args.probes))
            log("stopping the primary")
    except KeyboardInterrupt:
        print("bench.shape: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    text = render(phases, environment(started), args.probes, args.runs)
    print(text)
    if args.output is not None:
        args.output.write_text(text)
        log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
