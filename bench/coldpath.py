"""Where callahead's CPU goes on a cold recipient (``python -m bench.coldpath``, as root).

A real Postfix primary (``tests/harness/postfix.py``: Postfix's own EHLO, PIPELINING and
replies) that knows the run's users, and ``callahead serve`` with both front ends (log
level INFO, as operators run it; the per-client guard off, since every request comes
from a few addresses). The driver plays the backup Postfix: it sends each front end
RCPT requests for recipients never asked before, over ``--connections`` kept
connections with one request outstanding on each (as smtpd does): the milter over
libmilter's protocol (``tests/harness/milterclient.py``, one OPTNEG per connection), the
policy service the attributes Postfix 3.7's smtpd writes (``bench/policycpu.py``). Each
run is ``--recipients`` new valid users, or as many made-up ones; the runs rotate
between ``--case`` (several callaheads side by side: another checkout with
``before:PYTHONPATH=DIR/milter``, or other settings), front end and kind, round by round.

Reported per front end and kind: callahead's CPU (utime + stime of all its threads, from
/proc) per recipient, median and range over the rounds, and the replies. With
``--profile DIR`` (py-spy on PATH or ``--py-spy``), one more run of each is recorded
(``py-spy record --gil -f raw``: the thread holding the GIL) into
``DIR/<case>-<front>-<kind>.txt`` and summarised by ``bench/profilesummary.py`` into
``DIR/<case>-<front>-<kind>.summary.txt``: each function's cumulative and self time
with the GIL held, in µs per recipient.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.milterclient import MilterClient
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, primary_main_cf

from .policycpu import parse_case, request
from .profilesummary import summarise
from .tools import cpu_seconds

DOMAIN = "a.test"
FRONTS = ("milter", "policy")
KINDS = ("valid", "unknown")
Sender = Callable[[int, list[str]], Counter[str]]


def addresses(tag: str, kind: str, n: int) -> list[str]:
    return [f"{tag}{kind[0]}{i}@{DOMAIN}" for i in range(n)]


def split(items: list[str], parts: int) -> list[list[str]]:
    return [items[i::parts] for i in range(parts)]


def send_milter(port: int, connections: int, recipients: list[str]) -> Counter[str]:
    """Each share of ``recipients`` on its own libmilter connection (a thread each)."""
    replies: Counter[str] = Counter()
    lock = threading.Lock()

    def one(share: list[str]) -> None:
        seen: Counter[str] = Counter()
        with MilterClient("127.0.0.1", port, timeout=30.0) as client:
            client.negotiate()
            for n, rcpt in enumerate(share):
                reply = client.rcpt(f"<{rcpt}>".encode(), queue_id=f"Q{n:X}")
                seen[reply.command.decode() + reply.text[:3]] += 1
            client.quit()
        with lock:
            replies.update(seen)

    threads = [threading.Thread(target=one, args=(s,)) for s in split(recipients, connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def send_policy(port: int, connections: int, recipients: list[str]) -> Counter[str]:
    async def run() -> Counter[str]:
        replies: Counter[str] = Counter()

        async def one(share: list[str]) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for n, rcpt in enumerate(share):
                writer.write(request(rcpt, n))
                answer = await reader.readuntil(b"\n\n")
                replies[answer.decode().split("=", 1)[1].split()[0]] += 1
            writer.close()

        await asyncio.gather(*(one(s) for s in split(recipients, connections)))
        return replies

    return asyncio.run(run())


def measure(
    pid: int, send: Sender, connections: int, recipients: list[str]
) -> tuple[float, dict[str, int]]:
    before = cpu_seconds(pid)
    replies = send(connections, recipients)
    return (cpu_seconds(pid) - before) / len(recipients), dict(replies)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.coldpath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recipients", type=int, default=1000, help="per run")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--profile", type=Path, help="a dir for py-spy's raw stacks")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy binary")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="a callahead with these settings (repeatable; e.g. an older checkout with "
        "before:PYTHONPATH=DIR/milter; default: one with the defaults); runs interleave",
    )
    args = parser.parse_args(argv)
    cases = dict(parse_case(text) for text in args.case) or {"callahead": {}}
    runs = [(c, f, k) for c in cases for f in FRONTS for k in KINDS]
    tags = [f"r{r}{c}{f[0]}" for r in range(args.rounds + 1) for c in cases for f in FRONTS]
    users = [a for tag in tags for a in addresses(tag, "valid", args.recipients)]
    cpu: dict[tuple[str, str, str], list[float]] = {run: [] for run in runs}
    replies: dict[tuple[str, str, str], Counter[str]] = {run: Counter() for run in runs}
    profiles: dict[str, object] = {}
    with make_workdir() as workdir, contextlib.ExitStack() as stack:
        pdir = workdir / "primary"
        pdir.mkdir(mode=0o755)
        main_cf = primary_main_cf(workdir=pdir, users=users, domains=[DOMAIN])
        primary = stack.enter_context(PostfixInstance(pdir, main_cf, [Listener(free_port())]))
        servers = {
            name: stack.enter_context(
                CallaheadProcess(
                    workdir,
                    {
                        "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{primary.port}",
                        "CALLAHEAD_LOG_LEVEL": "INFO",
                        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
                        **env,
                    },
                    name=name,
                )
            )
            for name, env in cases.items()
        }

        def sender(case: str, front: str) -> Sender:
            server = servers[case]
            if front == "milter":
                return lambda c, r: send_milter(server.milter_port, c, r)
            return lambda c, r: send_policy(server.policy_port, c, r)

        def pid_of(case: str) -> int:
            pid = servers[case].pid
            assert pid is not None
            return pid

        # One warm-up recipient per front end: the primary's connection pool opens.
        for case in cases:
            for front in FRONTS:
                sender(case, front)(1, [f"warmup-{case}-{front}@{DOMAIN}"])
        for r in range(args.rounds):
            # A rotating order: no run always first, or always right after another.
            shift = r % len(runs)
            for case, front, kind in runs[shift:] + runs[:shift]:
                recipients = addresses(f"r{r}{case}{front[0]}", kind, args.recipients)
                spent, seen = measure(
                    pid_of(case), sender(case, front), args.connections, recipients
                )
                cpu[(case, front, kind)].append(spent)
                replies[(case, front, kind)].update(seen)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for case, front, kind in runs:
                recipients = addresses(f"r{args.rounds}{case}{front[0]}", kind, args.recipients)
                name = f"{case}-{front}-{kind}"
                out = args.profile / f"{name}.txt"
                spent = record(
                    args,
                    pid_of(case),
                    out,
                    functools.partial(sender(case, front), args.connections, recipients),
                )
                per = spent / len(recipients)
                profiles[name] = {"cpu_us_per_recipient": round(per * 1e6, 1), "file": str(out)}
                (args.profile / f"{name}.summary.txt").write_text(
                    summarise(out.read_text(), args.rate, len(recipients), per * 1e6, top=40)
                )
    first = next(iter(cases))
    result = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "runs": [
            {
                "case": case,
                "front": front,
                "kind": kind,
                "cpu_us_per_recipient": round(statistics.median(cpu[(case, front, kind)]) * 1e6, 1),
                "cpu_us_range": [
                    round(min(cpu[(case, front, kind)]) * 1e6, 1),
                    round(max(cpu[(case, front, kind)]) * 1e6, 1),
                ],
                f"of_{first}": round(
                    statistics.median(cpu[(case, front, kind)])
                    / statistics.median(cpu[(first, front, kind)]),
                    3,
                ),
                "replies": dict(replies[(case, front, kind)]),
            }
            for case, front, kind in runs
        ],
        "profiles": profiles,
    }
    print(json.dumps(result, indent=1))
    return 0


def record(args: argparse.Namespace, pid: int, out: Path, send: Callable[[], object]) -> float:
    """py-spy over one run of ``send``; callahead's CPU in that run."""
    spy = shutil.which(args.py_spy) or args.py_spy
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--gil",
            "--nonblocking",
            "-p",
            str(pid),
            "-f",
            "raw",
            "-r",
            str(args.rate),
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaching
    before = cpu_seconds(pid)
    send()
    spent = cpu_seconds(pid) - before
    proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
    proc.wait(60)
    return spent


if __name__ == "__main__":
    sys.exit(main())
