"""Group py-spy's raw stacks of a cold recipient by stage, before against after
(``python -m bench.profilestages DIR RECIPIENTS [--rate 1000]``).

Reads the recordings ``bench/coldpath.py --profile DIR`` wrote for the cases ``before``
and ``after`` (``DIR/<case>-<front>-<kind>.txt``) and prints, per front end and kind,
a Markdown table of the stages of bench/RESULTS-coldpath.md: the GIL-held µs per
recipient in which each stage is anywhere on the stack (cumulative: the rows overlap),
and its share. Samples whose top frame is a wait are left out (profilesummary.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .profilesummary import WAITS, frames

Frames = list[tuple[str, str]]

DIALOGUE = ("session.py", "transaction.py", "dialogue.py", "wire.py", "handshake.py")
HANDOFF_FILES = ("concurrent/futures/_base.py",)
LOOP_FILES = ("asyncio/base_events.py", "asyncio/events.py", "asyncio/selector_events.py")


def _any(fr: Frames, test: Callable[[str, str], bool]) -> bool:
    return any(test(name, file) for name, file in fr)


def _parsing(fr: Frames) -> bool:
    parsing = _any(fr, lambda n, f: n in ("RequestReader.next", "Base.envrcpt_bytes"))
    return parsing and not _any(fr, lambda n, f: n.startswith("Judge."))


def _handoff(fr: Frames) -> bool:
    return _any(
        fr,
        lambda n, f: (
            n.startswith("_chain_future")
            or n == "run_coroutine_threadsafe.<locals>.callback"
            or f in HANDOFF_FILES
            or n.startswith(("LoopProber._start", "LoopProber._finish"))
        ),
    )


STAGES: tuple[tuple[str, Callable[[Frames], bool]], ...] = (
    ("front end: request parsing (policy RequestReader / pymilter+adapter)", _parsing),
    (
        "Judge (decision, incl. probe on the policy path)",
        lambda fr: _any(fr, lambda n, f: n.startswith("Judge.judge")),
    ),
    (
        "probe engine (ProbeEngine.probe, on the loop)",
        lambda fr: _any(fr, lambda n, f: n == "ProbeEngine.probe"),
    ),
    (
        "SMTP dialogue: session/transaction/dialogue/wire",
        lambda fr: _any(
            fr, lambda n, f: f.startswith("callahead/smtp/") and f.rsplit("/", 1)[-1] in DIALOGUE
        ),
    ),
    ("aiosmtplib", lambda fr: _any(fr, lambda n, f: f.startswith("aiosmtplib"))),
    ("classify.py", lambda fr: _any(fr, lambda n, f: f == "callahead/smtp/classify.py")),
    ("evidence.py", lambda fr: _any(fr, lambda n, f: f == "callahead/smtp/evidence.py")),
    (
        "cache (caching/cache.py, expiring.py, cachetools)",
        lambda fr: _any(
            fr,
            lambda n, f: (
                f in ("callahead/caching/cache.py", "callahead/caching/expiring.py")
                or f.startswith("cachetools")
            ),
        ),
    ),
    (
        "metrics (frontends/metrics.py, prometheus_client)",
        lambda fr: _any(
            fr,
            lambda n, f: f == "callahead/frontends/metrics.py" or f.startswith("prometheus_client"),
        ),
    ),
    ("logging (Logger.*)", lambda fr: _any(fr, lambda n, f: n.startswith("Logger."))),
    (
        "base/address.py + base/logfmt.py",
        lambda fr: _any(
            fr, lambda n, f: f in ("callahead/base/address.py", "callahead/base/logfmt.py")
        ),
    ),
    ("thread hand-off (run_coroutine_threadsafe, concurrent Future)", _handoff),
    (
        "asyncio timeouts (asyncio/timeouts.py)",
        lambda fr: _any(fr, lambda n, f: f == "asyncio/timeouts.py"),
    ),
    (
        "event loop's own frames, self (base_events, events, selector_events, selectors)",
        lambda fr: fr[-1][1] in (*LOOP_FILES, "selectors.py"),
    ),
)


def stages(path: Path, recipients: int, rate: int) -> tuple[float, list[float]]:
    """GIL-held µs per recipient in all, and in each stage."""
    per_sample = 1e6 / rate / recipients
    total = 0
    counts = [0] * len(STAGES)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        fr = frames(stack)
        if not fr or fr[-1][0] in WAITS:
            continue
        total += int(count)
        for i, (_, test) in enumerate(STAGES):
            if test(fr):
                counts[i] += int(count)
    return total * per_sample, [c * per_sample for c in counts]


def table(directory: Path, front: str, kind: str, recipients: int, rate: int) -> list[str]:
    before_total, before = stages(directory / f"before-{front}-{kind}.txt", recipients, rate)
    after_total, after = stages(directory / f"after-{front}-{kind}.txt", recipients, rate)
    lines = [
        f"### {front} {kind}: GIL-held {before_total:.0f} -> {after_total:.0f} µs/recipient",
        "| stage (cumulative) | before µs (share) | after µs (share) |",
        "|---|---:|---:|",
    ]
    for (name, _), b, a in zip(STAGES, before, after, strict=True):
        b_share = 100 * b / before_total if before_total else 0.0
        a_share = 100 * a / after_total if after_total else 0.0
        lines.append(f"| {name} | {b:.0f} ({b_share:.0f} %) | {a:.0f} ({a_share:.0f} %) |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profilestages", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("recipients", type=int, help="recipients of each profiled run")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy's samples per second")
    args = parser.parse_args(argv)
    for front in ("milter", "policy"):
        for kind in ("valid", "unknown"):
            print("\n".join(table(args.directory, front, kind, args.recipients, args.rate)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
