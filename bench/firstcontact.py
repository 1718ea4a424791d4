"""First contact under concurrency (``python -m bench.firstcontact``, as root).

The benchmark's stack (bench/stack.py), and a load of ``S`` concurrent SMTP sessions
(``--levels``, default 1, 10 and 50), each one transaction with one recipient never
asked before: half real users of the primary, half made-up. Every RCPT of cases 2 and 2p
is a first contact, so its reply waits for a probe. The cases, interleaved in a rotating
order within each round: **1** plain Postfix (no verification: what Postfix and the
client take anyway), **2** callahead's milter (per-client guard off: all load comes from
127.0.0.1), **2p** its policy service (the same process), **2n** the milter of a second
callahead with ``CALLAHEAD_PROBE_PIPELINING=no`` (guard off too): what pipelining gains.

Reported per case, level and kind (median over rounds, and over all samples): the RCPT
reply's p50 and p99, the replies, and the new connections to the primary per 100 probes.
``--callahead-env VAR=VALUE`` changes case 2's callahead.

Each measured run comes right after an unmeasured warm-up of ``--warmup`` sessions per
concurrent session (new valid users of the primary) on the same listener: what is
measured is a stream of first contacts, as in a flood, not the opening of the
processes and connections that a quiet minute lets go (the backup's smtpd processes,
the primary's, callahead's pooled sessions). Without it the p99 of a run at 10
sessions was the first few RCPTs, each waiting for a new smtpd process on the primary
(``--warmup 0`` measures that).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

from tests.harness.fixtures import make_workdir

from .flood import cpu_snapshot
from .report import percentile
from .smtpclient import Job, run_load
from .stack import (
    CALLAHEAD,
    GUARD,
    GUARD_OFF,
    PLAIN,
    POLICY,
    PRIMARIES,
    Case,
    Stack,
    build_stack,
    supported,
)
from .tools import LogCursor

SENDER = "sender@remote.test"
UNPIPELINED = Case(GUARD.number, GUARD.key, "2n", "callahead, no pipelining")
"""The milter of the stack's second callahead (case 2g's listener and process), run
with pipelining off and the guard off."""
UNPIPELINED_ENV = {**GUARD_OFF, "CALLAHEAD_PROBE_PIPELINING": "no"}
CASES = (PLAIN, CALLAHEAD, POLICY, UNPIPELINED)


def addresses(domain: str, round_: int, case: Case, level: int, n: int) -> tuple[list[str], ...]:
    tag = f"f{round_}c{case.number}s{level}"
    return (
        [f"{tag}v{i}@{domain}" for i in range(n)],
        [f"{tag}x{i}@{domain}" for i in range(n)],
    )


def warmup_addresses(domain: str, round_: int, case: Case, level: int, n: int) -> list[str]:
    """Valid users for the warm-up before a run (a made-up one would retire sessions)."""
    return [f"f{round_}c{case.number}s{level}w{i}@{domain}" for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.firstcontact", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", default="1,10,50", help="concurrent sessions")
    parser.add_argument("--samples", type=int, default=100, help="per kind, round and level")
    parser.add_argument("--primary", choices=[p.key for p in PRIMARIES], default="a")
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured sessions per concurrent session"
    )
    parser.add_argument("--callahead-env", action="append", default=[], metavar="VAR=VALUE")
    args = parser.parse_args(argv)
    spec = next(p for p in PRIMARIES if p.key == args.primary)
    levels = [int(x) for x in args.levels.split(",")]
    users = [
        a
        for r in range(args.rounds)
        for case in CASES
        for level in levels
        for a in [
            *addresses(spec.domain, r, case, level, args.samples)[0],
            *warmup_addresses(spec.domain, r, case, level, args.warmup * level),
        ]
    ]
    seconds: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    p99s: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    replies: dict[tuple[str, int, str], Counter[int]] = defaultdict(Counter)
    connections: Counter[tuple[str, int]] = Counter()
    cpu: defaultdict[tuple[str, int, str], float] = defaultdict(float)
    started = time.monotonic()
    with (
        make_workdir() as workdir,
        build_stack(
            workdir,
            {spec.domain: users},
            dict(x.split("=", 1) for x in args.callahead_env),
            guard_env=supported(UNPIPELINED_ENV),
        ) as stack,
    ):
        for r in range(args.rounds):
            for level in levels:
                shift = (r + level) % len(CASES)
                for case in CASES[shift:] + CASES[:shift]:
                    one(
                        stack,
                        spec.domain,
                        r,
                        case,
                        level,
                        args.samples,
                        args.warmup,
                        seconds,
                        p99s,
                        replies,
                        connections,
                        cpu,
                    )
    cases = []
    for (key, level, kind), values in sorted(seconds.items()):
        cases.append(
            {
                "case": next(c.name for c in CASES if c.key == key),
                "sessions": level,
                "kind": kind,
                "samples": len(values),
                "p50_ms": round(1000 * percentile(values, 50), 2),
                "p99_ms": round(1000 * percentile(values, 99), 2),
                "p99_ms_rounds": [round(1000 * x, 2) for x in p99s[(key, level, kind)]],
                "replies": dict(replies[(key, level, kind)]),
                "primary_connections_per_100_probes": (
                    round(100 * connections[(key, level)] / (2 * args.samples * args.rounds), 2)
                    if key != PLAIN.key
                    else None
                ),
            }
        )
    out = {
        "settings": {k: v for k, v in vars(args).items()},
        "primary": spec.domain,
        "seconds": round(time.monotonic() - started),
        "cases": cases,
        "cpu_ms_per_session": {
            f"{next(c.label for c in CASES if c.key == key)} {level}": {
                who: round(1000 * spent / args.rounds, 3)
                for (k, lv, who), spent in cpu.items()
                if (k, lv) == (key, level)
            }
            for key, level in sorted({(k, lv) for k, lv, _ in cpu})
        },
    }
    print(json.dumps(out, indent=1))
    return 0


def one(
    stack: Stack,
    domain: str,
    round_: int,
    case: Case,
    level: int,
    samples: int,
    warmup: int,
    seconds: dict[tuple[str, int, str], list[float]],
    p99s: dict[tuple[str, int, str], list[float]],
    replies: dict[tuple[str, int, str], Counter[int]],
    connections: Counter[tuple[str, int]],
    cpu: defaultdict[tuple[str, int, str], float],
) -> None:
    valid, unknown = addresses(domain, round_, case, level, samples)
    jobs = [Job(SENDER, (a,)) for pair in zip(valid, unknown, strict=True) for a in pair]
    warm = [
        Job(SENDER, (a,)) for a in warmup_addresses(domain, round_, case, level, warmup * level)
    ]
    if warm:
        run_load(stack.port(case), warm, concurrency=level, deadline=60.0)
    primary_log = LogCursor(stack.primaries[domain].maillog_path)
    before = cpu_snapshot(stack, case, domain)
    result = run_load(stack.port(case), jobs, concurrency=level, deadline=60.0)
    after = cpu_snapshot(stack, case, domain)
    for who, spent in after.items():
        if who != "callahead" or case is not PLAIN:
            cpu[(case.key, level, who)] += (spent - before[who]) / len(result.sessions)
    time.sleep(0.3)  # postlogd writes a moment after the fact
    connections[(case.key, level)] += primary_log.read_new().count(" connect from ")
    valid_set = set(valid)
    for kind in ("valid", "unknown"):
        done = [
            s
            for s in result.sessions
            if s.error is None and (s.job.rcpts[0] in valid_set) == (kind == "valid")
        ]
        values = [s.rcpt_seconds[0] for s in done]
        seconds[(case.key, level, kind)] += values
        if values:
            p99s[(case.key, level, kind)].append(percentile(values, 99))
        replies[(case.key, level, kind)].update(s.rcpt_codes[0] for s in done)
    print(
        f"[{time.strftime('%H:%M:%S')}] round {round_ + 1} {case.name} {level} sessions: "
        f"{len(result.sessions)} in {result.seconds:.1f}s, "
        f"replies {dict(result.rcpt_code_counts())}, errors {dict(result.errors())}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
