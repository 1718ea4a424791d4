"""The engine's state per primary: one primary per MX host however its addresses rotate
(one breaker, one budget, one pool, one metric label), and a bounded table of them
(idle primaries forgotten, at most ``primary_limit`` kept). Against scripted SMTP servers
on loopback addresses (127.0.3.x) behind a fake DNS and the real ``MxResolver``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

from callahead.frontends.metrics import Metrics
from callahead.probing.breaker import State
from callahead.probing.engine import ProbeEngine
from callahead.routing.resolve import MxResolver
from callahead.routing.routes import RECIPIENT_DOMAIN, Nexthop
from callahead.routing.thishost import ThisHost
from callahead.smtp.verdict import Skip, Verdict
from tests.harness.ports import free_port
from tests.harness.rotatingdns import RotatingDns as Rotating
from tests.harness.scripted import Script, ScriptedServer
from tests.harness.waiting import wait_until
from tests.unit.settings import probe_settings

DOMAIN = "rotating.test"
MX_HOST = "mx.rotating.test"
OK = "250 2.1.5 Ok"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
NOBODY = ThisHost(frozenset(), frozenset())
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
"""The primaries here are on loopback: an MX target there is let through
(CALLAHEAD_MX_ALLOW_NETWORKS)."""


def addresses(count: int) -> list[str]:
    return [f"127.0.3.{n}" for n in range(1, count + 1)]


def RotatingDns(pool: list[str], per_lookup: int = 1) -> Rotating:
    return Rotating(pool, DOMAIN, MX_HOST, per_lookup=per_lookup)


@contextlib.contextmanager
def servers(script: Script, hosts: list[str], port: int) -> Iterator[list[ScriptedServer]]:
    """One scripted server on each of ``hosts``, all on ``port``."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ScriptedServer(script, port=port, host=h)) for h in hosts]


@contextlib.asynccontextmanager
async def engine_for(
    dns: Rotating, metrics: Metrics | None = None, **changes: Any
) -> AsyncIterator[ProbeEngine]:
    engine = ProbeEngine(
        probe_settings(**changes), metrics, resolver=MxResolver(dns, NOBODY, allowed=LOOPBACK)
    )
    try:
        yield engine
    finally:
        await engine.aclose()


def route(port: int) -> list[Nexthop]:
    """``smtp:`` on ``port``: the MX hosts of the recipient domain."""
    return [replace(RECIPIENT_DOMAIN, port=port)]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def series(metrics: Metrics, name: str) -> list[dict[str, str]]:
    """The label sets of every series of ``name``."""
    return [
        s.labels for family in metrics.registry.collect() for s in family.samples if s.name == name
    ]


# --- one primary per MX host --------------------------------------------------------------


def test_rotating_addresses_of_an_mx_host_share_one_pool_and_one_label() -> None:
    port = free_port()
    hosts = addresses(6)
    metrics = Metrics()
    name = f"{MX_HOST}:{port}"

    async def go() -> None:
        async with engine_for(RotatingDns(hosts), metrics) as engine:
            for n in range(6):
                result = await engine.probe(f"u{n}@{DOMAIN}", route(port))
                assert result.verdict is Verdict.VALID
            assert [s.name for s in engine.primary_states()] == [name]
            assert series(metrics, "callahead_pool_sessions") == [{"primary": name}]
            assert series(metrics, "callahead_probe_connections_total") == [{"primary": name}]
            # The session opened to the first address is reused for the next probes, as
            # Postfix's connection cache is looked up by destination first.
            assert sample(metrics, "callahead_probe_connections_total", primary=name) == 1

    with servers(Script(rcpt_default=OK), hosts, port) as up:
        asyncio.run(go())
    assert [s.connections for s in up] == [1, 0, 0, 0, 0, 0]
    assert up[0].count("RCPT") == 6


def test_rotating_addresses_of_an_mx_host_share_one_breaker() -> None:
    # Nothing listens on any of them: the host is down, whichever address DNS gives.
    port = free_port()
    metrics = Metrics()
    name = f"{MX_HOST}:{port}"

    async def go() -> None:
        async with engine_for(RotatingDns(addresses(50)), metrics, breaker_failures=3) as engine:
            for n in range(3):
                result = await engine.probe(f"u{n}@{DOMAIN}", route(port))
                assert (result.verdict, result.skipped, result.reached) == (
                    Verdict.TEMPFAIL,
                    None,
                    False,
                )
            assert engine.breaker_state(name) is State.OPEN
            for n in range(3, 20):
                result = await engine.probe(f"u{n}@{DOMAIN}", route(port))
                assert result.skipped is Skip.PRIMARY_DOWN
            assert sample(metrics, "callahead_breaker_open", primary=name) == 1
            assert sample(metrics, "callahead_probe_connections_total", primary=name) == 3

    asyncio.run(go())


def test_rotating_addresses_of_an_mx_host_share_one_budget() -> None:
    port = free_port()
    hosts = addresses(3)

    async def go() -> list[Any]:
        async with engine_for(RotatingDns(hosts), primary_rate=0.5, probe_wait=0) as engine:
            return [await engine.probe(f"u{n}@{DOMAIN}", route(port)) for n in range(3)]

    with servers(Script(rcpt_default=OK), hosts, port) as up:
        first, second, third = asyncio.run(go())
    assert first.verdict is Verdict.VALID
    assert second.skipped is Skip.PRIMARY_BUDGET
    assert third.skipped is Skip.PRIMARY_BUDGET
    assert sum(len(s.rcpts()) for s in up) == 1


def test_a_dead_address_of_an_mx_host_goes_last_and_never_marks_the_host_down() -> None:
    # Two addresses in every answer: the first refuses every session (421), the second
    # answers. The host is up: its breaker stays closed even at one failure to open it,
    # and the dead address is tried after the live one from the second probe on.
    port = free_port()
    dead, live = addresses(2)
    metrics = Metrics()
    name = f"{MX_HOST}:{port}"

    async def go() -> None:
        dns = RotatingDns([dead, live], per_lookup=2)  # always dead, live
        async with engine_for(dns, metrics, breaker_failures=1) as engine:
            for n in range(4):
                result = await engine.probe(f"u{n}@{DOMAIN}", route(port))
                assert result.verdict is Verdict.VALID
                assert result.primary == f"[{live}]:{port}"
                assert engine.breaker_state(name) is State.CLOSED
            assert sample(metrics, "callahead_primary_reached", primary=name) == 1

    with (
        servers(Script(banner=SHUTTING_DOWN), [dead], port) as (refusing,),
        servers(Script(rcpt_default=OK), [live], port) as (answering,),
    ):
        asyncio.run(go())
    assert refusing.connections == 1
    assert answering.count("RCPT") == 4


def test_a_probe_that_finds_every_address_dead_counts_once() -> None:
    # Three dead addresses in one answer are one failed probe of the host, not three:
    # with two failures to open the breaker, the second probe still tries them all.
    port = free_port()
    metrics = Metrics()
    name = f"{MX_HOST}:{port}"

    async def go() -> None:
        dns = RotatingDns(addresses(3), per_lookup=3)
        async with engine_for(dns, metrics, breaker_failures=2) as engine:
            await engine.probe(f"u0@{DOMAIN}", route(port))
            assert engine.breaker_state(name) is State.CLOSED
            second = await engine.probe(f"u1@{DOMAIN}", route(port))
            assert second.skipped is None
            assert engine.breaker_state(name) is State.OPEN
            assert sample(metrics, "callahead_probe_connections_total", primary=name) == 6

    asyncio.run(go())


# --- a bounded table ----------------------------------------------------------------------


def literal(port: int) -> list[Nexthop]:
    return [Nexthop("127.0.0.1", port)]


def test_the_table_of_primaries_stays_under_its_limit_and_their_series_go() -> None:
    metrics = Metrics()
    ports = [free_port() for _ in range(6)]  # nothing listens: refused at once

    async def go() -> None:
        engine = ProbeEngine(probe_settings(), metrics, primary_limit=3)
        try:
            for n, port in enumerate(ports):
                await engine.probe(f"u{n}@x.test", literal(port))
                assert len(engine.primary_states()) <= 3
            kept = [f"[127.0.0.1]:{port}" for port in ports[3:]]
            assert [s.name for s in engine.primary_states()] == kept
            assert [s["primary"] for s in series(metrics, "callahead_pool_sessions")] == kept
            counted = series(metrics, "callahead_probe_connections_total")
            assert [s["primary"] for s in counted] == kept
        finally:
            await engine.aclose()

    asyncio.run(go())


def test_a_primary_with_a_probe_in_flight_is_kept_and_an_idle_one_quit() -> None:
    async def go(slow: ScriptedServer, fast: ScriptedServer) -> None:
        engine = ProbeEngine(probe_settings(), primary_limit=1)
        try:
            assert (await engine.probe("a@x.test", literal(fast.port))).verdict is Verdict.VALID
            waiting = asyncio.ensure_future(engine.probe("b@x.test", literal(slow.port)))
            # The fast primary, with an idle session, made room for the slow one: its
            # session got QUIT.
            await wait_until(lambda: slow.count("RCPT") == 1)
            await wait_until(lambda: fast.count("QUIT") == 1)
            # The slow one has a probe in flight: kept, over the limit, meanwhile.
            assert (await engine.probe("c@x.test", literal(fast.port))).verdict is Verdict.VALID
            names = {s.name for s in engine.primary_states()}
            assert names == {f"[127.0.0.1]:{slow.port}", f"[127.0.0.1]:{fast.port}"}
            assert (await waiting).verdict is Verdict.VALID
            await engine.probe("d@x.test", literal(fast.port))
            assert [s.name for s in engine.primary_states()] == [f"[127.0.0.1]:{fast.port}"]
        finally:
            await engine.aclose()

    with (
        ScriptedServer(Script(rcpt_default=OK, delay={"RCPT": 0.5})) as slow,
        ScriptedServer(Script(rcpt_default=OK)) as fast,
    ):
        asyncio.run(go(slow, fast))


def test_an_idle_primary_is_forgotten_with_its_series() -> None:
    metrics = Metrics()

    async def go(server: ScriptedServer) -> None:
        engine = ProbeEngine(
            probe_settings(pool_idle=0.2, breaker_cooldown=0.2), metrics, primary_idle=0.3
        )
        try:
            assert (await engine.probe("a@x.test", literal(server.port))).verdict is Verdict.VALID
            assert len(engine.primary_states()) == 1
            await wait_until(lambda: not engine.primary_states(), 5.0)
            assert series(metrics, "callahead_probe_connections_total") == []
            assert series(metrics, "callahead_pool_sessions") == []
            # A probe later starts it afresh.
            assert (await engine.probe("b@x.test", literal(server.port))).verdict is Verdict.VALID
            assert len(engine.primary_states()) == 1
        finally:
            await engine.aclose()

    with ScriptedServer(Script(rcpt_default=OK)) as server:
        asyncio.run(go(server))
    assert server.count("QUIT") >= 1  # the idle session was closed politely first
