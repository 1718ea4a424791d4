"""The engine's state under an MX host whose addresses rotate (``python -m bench.rotating``).

Large MX pools (Microsoft 365's among them) hand out other addresses from one lookup to
the next. This drives one ``ProbeEngine`` with the real ``MxResolver`` over a fake DNS
whose one MX host, ``mx.rotating.example``, has a new loopback address (127.0.x.y) at
every lookup, and prints one JSON object per case:

* ``state``: ``--probes`` probes (distinct recipients, one at a time) answered 250 by a
  scripted SMTP server (tests/harness/scripted.py) listening on every one of those
  addresses, in a child process so that its records do not count: the engine's
  ``_primaries`` entries, its session pools, the ``callahead_pool_sessions`` and
  ``callahead_probe_connections_total`` series, and the growth of this process's RSS.
* ``hosts``: ``--probes`` probes, each to a domain with an MX host of its own (a
  backup for many domains of one provider): the ``_primaries`` entries and series.
* ``down``: ``--down-probes`` probes to rotating addresses where nothing listens: how
  many connections were tried, how many breakers opened, how many probes were skipped
  as ``primary_down``.
* ``budget``: ``--burst`` probes at once with ``CALLAHEAD_PRIMARY_RATE=--rate``: how many
  reached the primary within ``probe_wait``.

Not part of the test run; it needs about 3,000 file descriptors and a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import json
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast

from tests.harness.ports import free_port
from tests.harness.rotatingdns import RotatingDns
from tests.harness.scripted import Script, ScriptedServer

from callahead.frontends.metrics import Metrics
from callahead.probing.engine import EngineSettings, ProbeEngine
from callahead.routing.resolve import MxResolver
from callahead.routing.routes import RECIPIENT_DOMAIN
from callahead.routing.thishost import ThisHost
from callahead.smtp.verdict import Skip

from .tools import rss_bytes

MX_HOST = "mx.rotating.example"
DOMAIN = "rotating.example"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
"""The primaries here are on loopback: an MX target there is let through
(CALLAHEAD_MX_ALLOW_NETWORKS)."""


def rotating(addresses: list[str]) -> MxResolver:
    """MX resolution over a ``RotatingDns`` of ``addresses``, nothing being this host."""
    return MxResolver(
        RotatingDns(addresses, DOMAIN, MX_HOST),
        ThisHost(frozenset(), frozenset()),
        allowed=LOOPBACK,
    )


def loopback(count: int) -> list[str]:
    """``count`` distinct loopback addresses, 127.0.1.1 onwards."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(count)]


def engine_settings(**changes: Any) -> EngineSettings:
    # Imported here: tests.unit is a test package, only its settings helper is used.
    from tests.unit.settings import probe_settings

    return dataclasses.replace(probe_settings(), **changes)


def pools_of(engine: ProbeEngine) -> int:
    """Session pools the engine keeps: one per ``_Primary`` (per address before the
    primary was the MX host)."""
    return sum(1 for primary in engine._primaries.values() if primary.pool is not None)


def series(metrics: Metrics, name: str) -> int:
    return sum(1 for family in metrics.registry.collect() for s in family.samples if s.name == name)


def total(metrics: Metrics, name: str) -> int:
    """The sum of every series of ``name``."""
    return int(
        sum(
            s.value
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name == name
        )
    )


@contextlib.contextmanager
def server_process(count: int, port: int) -> Iterator[None]:
    """The scripted server on ``count`` loopback addresses, in a child process."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.rotating", "--serve", str(count), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the scripted server did not start")
        yield
    finally:
        child.terminate()
        child.wait(10)


def serve(count: int, port: int) -> None:
    # asyncio's create_server takes a sequence of hosts: one listener on each address.
    hosts = cast(str, loopback(count))
    server = ScriptedServer(Script(rcpt_default="250 2.1.5 Ok"), port=port, host=hosts)
    server.start()
    print("ready", flush=True)
    threading.Event().wait()  # until the parent terminates this process


async def state_case(probes: int) -> dict[str, Any]:
    port = free_port()
    addresses = loopback(probes)
    route = [dataclasses.replace(RECIPIENT_DOMAIN, port=port)]
    with server_process(probes, port):
        # One probe first, on an engine of its own: what the first probe costs once
        # (imports, the SSL context, the loop's own state) is not state per primary.
        warm = ProbeEngine(
            engine_settings(),
            Metrics(),
            resolver=MxResolver(
                RotatingDns(addresses, DOMAIN, MX_HOST),
                ThisHost(frozenset(), frozenset()),
                allowed=LOOPBACK,
            ),
        )
        await warm.probe(f"warm@{DOMAIN}", route)
        await warm.aclose()
        del warm
        gc.collect()
        before = rss_bytes()
        metrics = Metrics()
        resolver = MxResolver(
            RotatingDns(addresses, DOMAIN, MX_HOST),
            ThisHost(frozenset(), frozenset()),
            allowed=LOOPBACK,
        )
        engine = ProbeEngine(engine_settings(), metrics, resolver=resolver)
        verdicts: dict[str, int] = {}
        try:
            for i in range(probes):
                result = await engine.probe(f"user{i}@{DOMAIN}", route)
                verdicts[result.verdict.value] = verdicts.get(result.verdict.value, 0) + 1
            gc.collect()
            after = rss_bytes()
            return {
                "case": "state",
                "probes": probes,
                "addresses": probes,
                "verdicts": verdicts,
                "primaries": len(engine._primaries),
                "pools": pools_of(engine),
                "open_sessions": sum(s.open_sessions for s in engine.primary_states()),
                "pool_sessions_series": series(metrics, "callahead_pool_sessions"),
                "connections_series": series(metrics, "callahead_probe_connections_total"),
                "connections": total(metrics, "callahead_probe_connections_total"),
                "rss_growth_mb": round((after - before) / 1e6, 2),
            }
        finally:
            await engine.aclose()


class ManyDns:
    """``count`` domains ``dN.example``, each with an MX host of its own,
    ``mx.dN.example``, at the Nth of ``addresses``."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = addresses

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return [(10, f"mx.{name}")]

    async def addresses(self, name: str) -> list[str]:
        number = int(name.split(".")[1][1:])
        return [self._addresses[number]]


async def hosts_case(count: int) -> dict[str, Any]:
    """``count`` primaries that are distinct MX hosts (a backup for many domains of one
    provider): the table's size and series after one probe each."""
    port = free_port()
    addresses = loopback(count)
    route = [dataclasses.replace(RECIPIENT_DOMAIN, port=port)]
    with server_process(count, port):
        metrics = Metrics()
        resolver = MxResolver(
            ManyDns(addresses), ThisHost(frozenset(), frozenset()), allowed=LOOPBACK
        )
        engine = ProbeEngine(engine_settings(), metrics, resolver=resolver)
        try:
            for i in range(count):
                await engine.probe(f"user@d{i}.example", route)
            return {
                "case": "hosts",
                "mx_hosts": count,
                "primaries": len(engine._primaries),
                "pool_sessions_series": series(metrics, "callahead_pool_sessions"),
                "connections_series": series(metrics, "callahead_probe_connections_total"),
            }
        finally:
            await engine.aclose()


async def down_case(probes: int) -> dict[str, Any]:
    port = free_port()
    metrics = Metrics()
    resolver = MxResolver(
        RotatingDns(loopback(probes), DOMAIN, MX_HOST),
        ThisHost(frozenset(), frozenset()),
        allowed=LOOPBACK,
    )
    engine = ProbeEngine(engine_settings(), metrics, resolver=resolver)
    route = [dataclasses.replace(RECIPIENT_DOMAIN, port=port)]
    skipped = 0
    try:
        for i in range(probes):
            result = await engine.probe(f"user{i}@{DOMAIN}", route)
            skipped += result.skipped is Skip.PRIMARY_DOWN
        states = engine.primary_states()
        return {
            "case": "down",
            "probes": probes,
            "connections_tried": total(metrics, "callahead_probe_connections_total"),
            "breakers_open": sum(s.breaker_open for s in states),
            "primaries": len(states),
            "skipped_primary_down": skipped,
        }
    finally:
        await engine.aclose()


async def budget_case(burst: int, rate: float) -> dict[str, Any]:
    port = free_port()
    addresses = loopback(burst)
    with server_process(burst, port):
        resolver = MxResolver(
            RotatingDns(addresses, DOMAIN, MX_HOST),
            ThisHost(frozenset(), frozenset()),
            allowed=LOOPBACK,
        )
        engine = ProbeEngine(
            engine_settings(primary_rate=rate, probe_wait=1.0, max_probes=burst),
            resolver=resolver,
        )
        route = [dataclasses.replace(RECIPIENT_DOMAIN, port=port)]
        try:
            results = await asyncio.gather(
                *(engine.probe(f"user{i}@{DOMAIN}", route) for i in range(burst))
            )
        finally:
            await engine.aclose()
    return {
        "case": "budget",
        "probes_at_once": burst,
        "primary_rate": rate,
        "probe_wait": 1.0,
        "reached": sum(r.reached for r in results),
        "skipped_primary_budget": sum(r.skipped is Skip.PRIMARY_BUDGET for r in results),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=3000)
    parser.add_argument("--down-probes", type=int, default=100)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--serve", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.serve:
        serve(*args.serve)
        return
    for case in (
        state_case(args.probes),
        hosts_case(args.probes),
        down_case(args.down_probes),
        budget_case(args.burst, args.rate),
    ):
        print(json.dumps(asyncio.run(case)), flush=True)


if __name__ == "__main__":
    main()
