"""CPU per warm policy request: callahead's policy service against the do-nothing one.

``python -m bench.policycpu`` starts a stand-in primary that knows the bench's users,
``callahead serve`` with its policy service only (log level INFO, as operators run it)
and ``bench/trivial_policy.py``, verifies every user once (so each later request is
answered from the cache), then sends rounds of the requests Postfix 3.7's smtpd sends
(every attribute it writes, in its order) over ``--connections`` kept connections,
alternating the two servers round by round. For each it reports the server's CPU time
(utime + stime from /proc) per request, median and range over the rounds, and the
requests per second the driver saw.

Only the server's own CPU is counted, so the driver's cost (it shares the machine) does
not enter the figure; the rate does depend on it, and on whatever else runs.

``--profile FILE`` records callahead under py-spy (if installed) during one more round
and writes the flame graph's raw collapsed stacks to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.ports import accepts, free_port
from tests.harness.primary import Primary
from tests.harness.process import ManagedProcess
from tests.harness.waiting import wait_for

from .tools import cpu_seconds

DOMAIN = "a.test"
USERS = [f"user{i}@{DOMAIN}" for i in range(200)]


def request(recipient: str, n: int) -> bytes:
    """One RCPT-stage request as Postfix 3.7's smtpd writes it (smtpd_check.c)."""
    attrs = [
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("helo_name", "client.example.net"),
        ("queue_id", ""),
        ("sender", "someone@example.net"),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("client_address", f"192.0.2.{n % 250 + 1}"),
        ("client_name", "unknown"),
        ("reverse_client_name", "unknown"),
        ("instance", f"{n:x}.6571e1b2.a1b2c.0"),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("size", "0"),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", ""),
        ("encryption_cipher", ""),
        ("encryption_keysize", "0"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("ccert_subject", ""),
        ("client_port", str(40000 + n % 20000)),
        ("policy_context", ""),
        ("server_address", "127.0.0.1"),
        ("server_port", "25"),
        ("compatibility_level", "3.6"),
        ("mail_version", "3.7.11"),
    ]
    return "".join(f"{k}={v}\n" for k, v in attrs).encode() + b"\n"


async def drive(port: int, connections: int, per_connection: int) -> float:
    """Send ``per_connection`` requests on each of ``connections`` connections (one
    outstanding per connection, as smtpd does); the wall time."""
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    payloads = [request(USERS[i % len(USERS)], i) for i in range(len(USERS))]

    async def one(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(per_connection):
            writer.write(payloads[(index * per_connection + i) % len(payloads)])
            await reader.readuntil(b"\n\n")

    started = time.perf_counter()
    await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(streams)))
    took = time.perf_counter() - started
    for _, writer in streams:
        writer.close()
    return took


@dataclass
class Rounds:
    name: str
    cpu_per_request: list[float]
    rate: list[float]

    def summary(self) -> dict[str, object]:
        us = [c * 1e6 for c in self.cpu_per_request]
        return {
            "server": self.name,
            "cpu_us_per_request": round(statistics.median(us), 1),
            "cpu_us_range": [round(min(us), 1), round(max(us), 1)],
            "requests_per_s": round(statistics.median(self.rate)),
        }


def measure(pid: int, port: int, connections: int, per_connection: int) -> tuple[float, float]:
    before = cpu_seconds(pid)
    took = asyncio.run(drive(port, connections, per_connection))
    spent = cpu_seconds(pid) - before
    total = connections * per_connection
    return spent / total, total / took


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.policycpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000, help="per round and server")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of the first callahead")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="a callahead with these settings (repeatable; default: one with the defaults)",
    )
    args = parser.parse_args(argv)
    per_connection = max(1, args.requests // args.connections)
    cases = dict(parse_case(text) for text in args.case) or {"callahead": {}}
    with make_workdir() as workdir:
        primary = Primary(USERS, port=free_port())
        primary.start()
        trivial_port = free_port()
        trivial = ManagedProcess(
            [sys.executable, "-m", "bench.trivial_policy", str(trivial_port)],
            workdir / "trivial.log",
            what="trivial policy service",
            ready=lambda: accepts(trivial_port),
        )
        servers = {
            name: CallaheadProcess(
                workdir,
                {
                    "CALLAHEAD_SOCKET": "",
                    "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{primary.port}",
                    "CALLAHEAD_LOG_LEVEL": "INFO",
                    "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
                    **env,
                },
                name=name,
            )
            for name, env in cases.items()
        }
        results = {name: Rounds(name, [], []) for name in [*servers, "trivial"]}
        try:
            trivial.start()
            for server in servers.values():
                server.start()
                # Every user verified once: the measured requests are cache hits.
                asyncio.run(drive(server.policy_port, 10, len(USERS) // 10))
            wait_for(
                lambda: len(primary.rcpts) >= len(USERS) * len(servers),
                30.0,
                what="every user probed",
            )
            probes = len(primary.rcpts)
            ports = {name: (s.pid, s.policy_port) for name, s in servers.items()}
            ports["trivial"] = (trivial.pid, trivial_port)
            names = list(ports)
            for round_no in range(args.rounds):
                # A rotating order: no server always runs first (or right after another).
                shift = round_no % len(names)
                for name in names[shift:] + names[:shift]:
                    pid, port = ports[name]
                    assert pid is not None
                    cpu, rate = measure(pid, port, args.connections, per_connection)
                    results[name].cpu_per_request.append(cpu)
                    results[name].rate.append(rate)
            assert len(primary.rcpts) == probes, "a measured request was not a cache hit"
            first = next(iter(servers.values()))
            if args.profile and shutil.which("py-spy") and first.pid:
                profile(first, args.profile, args.connections, per_connection)
        except BaseException:
            for server in servers.values():
                print(server.log()[-3000:], file=sys.stderr)
            raise
        finally:
            for server in servers.values():
                server.stop()
            trivial.stop()
            primary.stop()
    floor = statistics.median(results["trivial"].rate)
    floor_cpu = statistics.median(results["trivial"].cpu_per_request)
    out = []
    for rounds in results.values():
        summary = rounds.summary()
        summary["rate_of_trivial"] = round(statistics.median(rounds.rate) / floor, 3)
        summary["cpu_of_trivial"] = round(statistics.median(rounds.cpu_per_request) / floor_cpu, 2)
        out.append(summary)
    print(json.dumps(out, indent=1))
    return 0


def parse_case(text: str) -> tuple[str, dict[str, str]]:
    name, _, settings = text.partition(":")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return name, env


def profile(server: CallaheadProcess, out: Path, connections: int, per_connection: int) -> None:
    """py-spy over 4 s of warm requests to ``server``."""
    assert server.pid is not None
    spy = subprocess.Popen(
        [
            *("py-spy", "record", "-p", str(server.pid), "-f", "raw", "-r", "500"),
            *("-o", str(out), "--nonblocking", "--duration", "4"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # py-spy attaching
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        measure(server.pid, server.policy_port, connections, per_connection)
    spy.wait(60)


if __name__ == "__main__":
    sys.exit(main())
