"""Summarise py-spy's raw stacks (``py-spy record --gil -f raw``) as tables of µs per request.

``python -m bench.profilesummary FILE RATE REQUESTS [--top N]`` prints, for a recording
at RATE samples per second over a run of REQUESTS requests, each function's cumulative
time (samples with it anywhere on the stack) and self time (samples with it on top), as
µs per request (a sample is 1/RATE s of the GIL held), and the self time per source
file. Samples whose top frame is a wait (a lock, ``select``: py-spy may sample a
thread that holds the GIL in the instant it releases it) are counted apart. A function
is ``name (file)``: its line numbers are merged, and a file is shown from its package
(``callahead/smtp/wire.py``, ``asyncio/base_events.py``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence

FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
ROOTS = ("/callahead/", "/site-packages/", "/lib/python3.11/", "/lib/python3/")


def short(path: str) -> str:
    for root in ROOTS:
        if root in path:
            tail = path.split(root, 1)[1]
            return f"callahead/{tail}" if root == "/callahead/" else tail
    return path


def frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = FRAME.match(part)
        if m is None:
            continue  # "process ...", "thread (...)"
        out.append((m["name"], short(m["file"])))
    return out


WAITS = ("Condition.wait", "EpollSelector.select", "Event.wait", "Thread._wait_for_tstate_lock")


def summarise(raw: str, rate: int, requests: int, cpu_us: float, top: int = 30) -> str:
    """``cpu_us``: the process's CPU per request over the run, from /proc."""
    us_per_sample = 1e6 / rate / requests
    total = 0
    waits = 0
    cumulative: Counter[str] = Counter()
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        stack_frames = frames(stack)
        if not stack_frames:
            continue
        if stack_frames[-1][0] in WAITS:
            waits += count
            continue
        total += count
        for name in {f"{n} ({f})" for n, f in stack_frames}:
            cumulative[name] += count
        name, file = stack_frames[-1]
        own[f"{name} ({file})"] += count
        files[file] += count
    if not total:
        return "no samples\n"

    def table(title: str, counts: Counter[str]) -> list[str]:
        rows = [f"## {title}", "", "| µs/request | share | where |", "|---:|---:|---|"]
        for key, count in counts.most_common(top):
            rows.append(f"| {count * us_per_sample:.1f} | {100 * count / total:.1f} % | `{key}` |")
        return [*rows, ""]

    head = [
        f"{total} samples with the GIL held ({total * us_per_sample:.1f} µs per request; "
        f"{waits * us_per_sample:.1f} more on a wait's top frame, left out); "
        f"the process's CPU over the run (/proc, all threads): {cpu_us:.1f} µs per request",
        "",
    ]
    return "\n".join(
        head
        + table("Cumulative", cumulative)
        + table("Self, by function", own)
        + table("Self, by file", files)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profilesummary", description=__doc__)
    parser.add_argument("file")
    parser.add_argument("rate", type=int)
    parser.add_argument("requests", type=int)
    parser.add_argument("--cpu-us", type=float, default=0.0, help="CPU per request, from /proc")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    with open(args.file, encoding="utf-8") as f:
        print(summarise(f.read(), args.rate, args.requests, args.cpu_us, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
