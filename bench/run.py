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

import sys
import time
from collections.abc import Sequence

from tests.harness.fixtures import make_workdir

from .phases import PHASES, drain, log, phase_extras, phase_memory
from .plan import parse_args, primary_users
from .render import environment, render
from .report import Report, loadavg
from .stack import (
    PRIMARIES,
    build_stack,
)
from .tools import ready_to_run, rss_bytes


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    if not ready_to_run("bench"):
        return 69
    report = Report(settings)
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
                    drain(stack, report)
                report.live_memory = {
                    "rss": float(rss_bytes(stack.callahead_pid)),
                    "entries": stack.callahead.samples().get(("callahead_cache_entries", ()), 0.0),
                }
                log("stopping the stack")
            phase_extras(report)
            report.load_end = loadavg()
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
