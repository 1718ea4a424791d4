"""The probe engine against scripted SMTP servers on loopback: pooled sessions and their
dialogue, session loss and retry, coalescing, bounds, the breaker, failover, STARTTLS,
SMTPUTF8 and idle reaping. Counts are taken at the server, not from the engine."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from hypothesis import example, given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from callahead.base.address import normalize_recipient, wire_address
from callahead.caching.cache import PositiveCache
from callahead.caching.controls import Controls
from callahead.core.policy import Action, Policy, Reason, TempfailAction
from callahead.frontends.metrics import Metrics
from callahead.probing.breaker import State
from callahead.probing.engine import EngineSettings, ProbeEngine
from callahead.probing.loop import LoopProber, ProbeLoop
from callahead.routing.routes import Nexthop, parse_routes
from callahead.smtp import session as session_module
from callahead.smtp.evidence import CONTROLS_PER_DOMAIN
from callahead.smtp.session import ERROR_BUDGET
from callahead.smtp.tls import TlsMode
from callahead.smtp.verdict import ProbeResult, Skip, Stage, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.ports import free_port
from tests.harness.scripted import Script, ScriptedServer, Session
from tests.harness.waiting import wait_until
from tests.unit.settings import probe_settings

HELO = "backup.example.net"
T = TypeVar("T")

OK = "250 2.1.5 Ok"
UNKNOWN = "550 5.1.1 Recipient address rejected: User unknown in virtual mailbox table"
MAILBOX_BUSY = "450 4.2.1 Mailbox temporarily unavailable"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
SENDER_REFUSED = "553 5.7.1 <>: Sender address rejected: Access denied"
NO_SMTPUTF8 = ("8BITMIME",)
"""Extensions of a primary that does not offer SMTPUTF8: the engine offers it in MAIL FROM
when the primary does, so a test that reads the exact ``MAIL FROM:<>`` line uses these."""


def settings(**overrides: Any) -> EngineSettings:
    return probe_settings(helo_name=HELO, **overrides)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await fn()

    return asyncio.run(wrapper())


def hop(server: ScriptedServer) -> Nexthop:
    """The nexthop that routes to ``server``."""
    return Nexthop(server.host, server.port)


@asynccontextmanager
async def engine_with(
    engine_settings: EngineSettings,
    metrics: Metrics | None = None,
    known_valid: PositiveCache | None = None,
) -> AsyncIterator[ProbeEngine]:
    """An engine; with ``known_valid``, its recently verified addresses are the
    controls, as in ``callahead serve``."""
    controls = None if known_valid is None else Controls(known_valid)
    engine = ProbeEngine(engine_settings, metrics, known_valid, controls=controls)
    try:
        yield engine
    finally:
        await engine.aclose()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def timed(coro: Awaitable[ProbeResult]) -> tuple[ProbeResult, float]:
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


# --- connection reuse and the dialogue on a session ------------------------------------


def test_500_sequential_valid_probes_share_a_handful_of_connections(
    scripted: StartScripted,
) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=NO_SMTPUTF8))
    metrics = Metrics()

    async def go() -> None:
        async with engine_with(settings(), metrics) as engine:
            for n in range(500):
                result = await engine.probe(f"user{n}@example.test", [hop(server)])
                assert result.verdict is Verdict.VALID, result
            assert server.count("RCPT") == 500
            label = str(hop(server))
            assert sample(metrics, "callahead_probe_connections_total", primary=label) == (
                server.connections
            )
            assert sample(metrics, "callahead_probes_total", outcome="valid") == 500
            assert sample(metrics, "callahead_probe_duration_seconds_count") == 500
            assert sample(metrics, "callahead_probes_in_flight") == 0

    run(go)
    assert 1 <= server.connections <= 3
    assert server.count("RSET") == 0
    for conn in server.sessions:
        verbs = conn.verbs()
        # One transaction per session: EHLO, one MAIL FROM:<>, then only RCPTs.
        assert verbs[:2] == ["EHLO", "MAIL"]
        assert conn.lines[1] == "MAIL FROM:<>"
        assert verbs.count("MAIL") == 1
        assert set(verbs[2:]) <= {"RCPT", "QUIT"}
        assert len(conn.rcpts()) <= session_module.MAX_RCPTS_PER_SESSION


def test_session_rolls_over_after_max_rcpts(
    scripted: StartScripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "MAX_RCPTS_PER_SESSION", 10)
    server = scripted(Script(rcpt_default=OK))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(25):
                result = await engine.probe(f"user{n}@example.test", [hop(server)])
                assert result.verdict is Verdict.VALID
            await wait_until(lambda: server.sessions[0].closed and server.sessions[1].closed)

    run(go)
    assert [len(c.rcpts()) for c in server.sessions] == [10, 10, 5]
    for conn in server.sessions:
        assert conn.verbs() == ["EHLO", "MAIL", *["RCPT"] * len(conn.rcpts()), "QUIT"]


def test_session_retired_after_the_error_budget_without_another_command(
    scripted: StartScripted,
) -> None:
    """A domain with a verified user: the first rejection asks it (accepted: it
    vouches for the session), then the session takes the domain's probes up to the
    error budget, and hangs up without QUIT."""
    server = scripted(Script(rcpt_default=UNKNOWN, users=frozenset({"alice@example.test"})))
    known_valid = PositiveCache(ttl=3600, maxsize=100)
    known_valid.add("alice@example.test")
    probes = 100

    async def go() -> None:
        async with engine_with(settings(), known_valid=known_valid) as engine:
            for n in range(probes):
                result = await engine.probe(f"nobody{n}@example.test", [hop(server)])
                assert result.verdict is Verdict.UNKNOWN, result
                assert result.code == 550
            full = [c.number for c in server.sessions if len(c.rcpts()) == ERROR_BUDGET + 1]
            await wait_until(lambda: all(server.session(n).closed for n in full))

    run(go)
    assert ERROR_BUDGET == 9
    vouch = 1  # alice@, asked once per session, accepted
    assert server.connections == math.ceil(probes / ERROR_BUDGET)
    assert server.count("RCPT") == probes + vouch * server.connections
    full = [c for c in server.sessions if len(c.rcpts()) == ERROR_BUDGET + vouch]
    assert len(full) == probes // ERROR_BUDGET
    for conn in full:
        # Hung up after the 9th reject: not even QUIT (a Postfix primary would make a
        # QUIT after its 10th error wait a second).
        assert conn.verbs() == ["EHLO", "MAIL", *["RCPT"] * (ERROR_BUDGET + vouch)]
        assert conn.closed


@pytest.mark.parametrize("code", [550, 450])
def test_a_reused_session_keeps_room_for_the_controls_it_may_still_ask(
    scripted: StartScripted, code: int
) -> None:
    """No verified user: every rejection may still ask the domain's controls (two
    verified addresses, once verified meanwhile, and postmaster@), all of which a
    primary in drift refuses. An idle session is taken only while even that would keep
    it within the error budget (issue 27, item 5): 6 refusals, not 9, and never one
    over the budget."""
    server = scripted(Script(rcpt_default={550: UNKNOWN, 450: MAILBOX_BUSY}[code]))
    expected = Verdict.UNKNOWN if code == 550 else Verdict.TEMPFAIL
    probes = 30

    async def go() -> None:
        async with engine_with(settings(pool_size=1)) as engine:
            for n in range(probes):
                result = await engine.probe(f"nobody{n}@example.test", [hop(server)])
                assert result.verdict is expected, result

    run(go)
    per_session = ERROR_BUDGET - CONTROLS_PER_DOMAIN
    assert per_session == 6
    assert [len(c.rcpts()) for c in server.sessions] == [per_session] * (probes // per_session)
    for conn in server.sessions:
        assert conn.verbs() == ["EHLO", "MAIL", *["RCPT"] * per_session, "QUIT"]


def test_mail_from_refused_retires_the_session(scripted: StartScripted) -> None:
    server = scripted(Script(mail=SENDER_REFUSED, rcpt_default=UNKNOWN))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(3):
                result = await engine.probe(f"u{n}@example.test", [hop(server)])
                assert (result.verdict, result.stage, result.code) == (
                    Verdict.TEMPFAIL,
                    Stage.MAIL,
                    553,
                )

    run(go)
    assert server.count("RCPT") == 0
    assert server.connections == 3  # never a second MAIL on a session


# --- sessions the primary closed ---------------------------------------------------------


def test_server_closing_after_each_probe_never_shows_as_tempfail(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, hang_up_after="RCPT"))
    metrics = Metrics()

    async def go() -> None:
        async with engine_with(settings(), metrics) as engine:
            for n in range(20):
                result = await engine.probe(f"user{n}@example.test", [hop(server)])
                assert result.verdict is Verdict.VALID, result

    run(go)
    assert server.connections == 20
    assert sample(metrics, "callahead_probes_total", outcome="tempfail") == 0


def test_hang_up_at_rcpt_on_a_reused_session_is_retried_on_a_fresh_one(
    scripted: StartScripted,
) -> None:
    # The primary drops the session when it gets the second RCPT of a session, with no
    # reply: the engine cannot know beforehand and must retry on a fresh session.
    def hook(session: Session, address: str) -> str | None:
        return None if len(session.rcpts()) >= 2 else OK

    server = scripted(Script(rcpt_hook=hook))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(5):
                result = await engine.probe(f"user{n}@example.test", [hop(server)])
                assert result.verdict is Verdict.VALID, result

    run(go)
    assert server.connections == 5
    assert server.count("RCPT") == 9  # each probe but the first was sent twice
    assert [len(c.rcpts()) for c in server.sessions] == [2, 2, 2, 2, 1]


def test_452_on_a_reused_session_is_a_full_transaction_not_the_address(
    scripted: StartScripted,
) -> None:
    # "452 too many recipients" from a transaction that already has recipients: the
    # engine opens a fresh session (a fresh transaction) and asks again.
    def hook(session: Session, address: str) -> str | None:
        return TOO_MANY_RECIPIENTS if len(session.rcpts()) >= 3 else OK

    server = scripted(Script(rcpt_hook=hook))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for n in range(4):
                result = await engine.probe(f"user{n}@example.test", [hop(server)])
                assert (result.verdict, result.code) == (Verdict.VALID, 250), result

    run(go)
    assert [len(c.rcpts()) for c in server.sessions] == [3, 2]
    assert server.sessions[0].lines[-1] == "QUIT"  # retired politely


def test_452_on_a_fresh_session_is_tempfail(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=TOO_MANY_RECIPIENTS))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("user@example.test", [hop(server)])
            assert (result.verdict, result.stage, result.code) == (
                Verdict.TEMPFAIL,
                Stage.RCPT,
                452,
            )

    run(go)
    assert server.count("RCPT") == 1


def test_primary_restart_between_probes(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            for round_ in range(3):
                for n in range(3):
                    result = await engine.probe(f"u{round_}.{n}@example.test", [hop(server)])
                    assert result.verdict is Verdict.VALID, result
                server.restart()  # hangs up on every session

    run(go)
    assert server.connections == 3


def test_421_at_rcpt_on_a_reused_session_retries_and_gives_the_real_answer(
    scripted: StartScripted,
) -> None:
    fired: list[int] = []

    def hook(session: Session, address: str) -> str | None:
        if len(session.rcpts()) == 2 and not fired:
            fired.append(session.number)
            return SHUTTING_DOWN  # and the server hangs up, as Postfix does
        return OK if address.startswith(("valid", "postmaster")) else UNKNOWN

    server = scripted(Script(rcpt_hook=hook, extensions=NO_SMTPUTF8))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            first = await engine.probe("valid@example.test", [hop(server)])
            assert first.verdict is Verdict.VALID
            second = await engine.probe("nobody@example.test", [hop(server)])
            assert (second.verdict, second.stage, second.code) == (
                Verdict.UNKNOWN,
                Stage.RCPT,
                550,
            )
            assert engine.breaker_state(hop(server)) is State.CLOSED

    run(go)
    assert fired == [1]
    assert server.connections == 2
    assert server.sessions[1].lines == [
        f"EHLO {HELO}",
        "MAIL FROM:<>",
        "RCPT TO:<nobody@example.test>",  # 5.1.1: unknown on its own, no control asked
        "QUIT",  # at aclose
    ]


def test_421_at_rcpt_on_a_fresh_session_is_tempfail_not_retried(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=SHUTTING_DOWN))

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("user@example.test", [hop(server)])
            assert result.verdict is Verdict.TEMPFAIL
            assert not result.reached

    run(go)
    assert server.count("RCPT") == 1


# --- coalescing and bounds ---------------------------------------------------------------


def test_concurrent_requests_for_one_address_share_one_probe(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 0.01}, extensions=NO_SMTPUTF8))
    metrics = Metrics()
    addresses = [f"user{n % 50}@example.test" for n in range(200)]

    async def go() -> None:
        async with engine_with(settings(), metrics) as engine:
            results = await asyncio.gather(*(engine.probe(a, [hop(server)]) for a in addresses))
            assert all(r.verdict is Verdict.VALID for r in results)

    run(go)
    rcpts = server.count("RCPT")
    assert rcpts <= 50
    assert sorted(set(server.lines) - {f"EHLO {HELO}", "MAIL FROM:<>", "QUIT"}) == sorted(
        {f"RCPT TO:<{a}>" for a in addresses}
    )
    assert sample(metrics, "callahead_probes_total", outcome="valid") == rcpts
    assert sample(metrics, "callahead_coalesced_waits_total") == 200 - rcpts


@pytest.mark.parametrize("probe_wait", [0.2, 0.0])
def test_excess_requests_get_overload_within_the_probe_wait(
    scripted: StartScripted, probe_wait: float
) -> None:
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 1.0}))
    metrics = Metrics()
    engine_settings = settings(max_probes=2, probe_wait=probe_wait, timeout=3.0)

    async def go() -> list[tuple[ProbeResult, float]]:
        async with engine_with(engine_settings, metrics) as engine:
            return await asyncio.gather(
                *(timed(engine.probe(f"u{n}@example.test", [hop(server)])) for n in range(6))
            )

    outcomes = run(go)
    valid = [(r, t) for r, t in outcomes if r.verdict is Verdict.VALID]
    skipped = [(r, t) for r, t in outcomes if r.skipped is not None]
    assert len(valid) == 2
    assert len(skipped) == 4
    for result, elapsed in skipped:
        assert result.skipped is Skip.OVERLOAD
        assert result.verdict is Verdict.TEMPFAIL
        assert probe_wait * 0.9 <= elapsed < probe_wait + 0.15
    for _, elapsed in valid:
        assert elapsed >= 0.9
    assert server.count("RCPT") == 2
    assert sample(metrics, "callahead_probes_total", outcome="valid") == 2
    assert sample(metrics, "callahead_probes_total", outcome="tempfail") == 0
    assert sample(metrics, "callahead_probes_in_flight") == 0


def test_a_slot_freed_within_the_probe_wait_is_used(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 0.05}))

    async def go() -> list[ProbeResult]:
        async with engine_with(settings(max_probes=1, probe_wait=2)) as engine:
            return await asyncio.gather(
                *(engine.probe(f"u{n}@example.test", [hop(server)]) for n in range(4))
            )

    assert [r.verdict for r in run(go)] == [Verdict.VALID] * 4
    assert server.count("RCPT") == 4


# --- the breaker -------------------------------------------------------------------------


def test_breaker_skips_a_silent_primary_and_one_trial_closes_it(scripted: StartScripted) -> None:
    silent = scripted(Script(banner=None))
    metrics = Metrics()
    engine_settings = settings(timeout=0.3, breaker_failures=3, breaker_cooldown=0.5)

    async def go() -> None:
        primary = hop(silent)
        label = str(primary)
        async with engine_with(engine_settings, metrics) as engine:
            try:
                for n in range(3):
                    result, elapsed = await timed(engine.probe(f"u{n}@example.test", [primary]))
                    assert result.verdict is Verdict.TEMPFAIL
                    assert result.skipped is None
                    assert not result.reached
                    assert 0.25 <= elapsed < 0.6
                assert engine.breaker_state(primary) is State.OPEN
                assert sample(metrics, "callahead_breaker_open", primary=label) == 1
                assert sample(metrics, "callahead_primary_reached", primary=label) == 0
                for n in range(100):
                    result, elapsed = await timed(engine.probe(f"v{n}@example.test", [primary]))
                    assert result.skipped is Skip.PRIMARY_DOWN
                    assert result.verdict is Verdict.TEMPFAIL
                    assert elapsed < 0.05
                assert silent.connections == 3
            finally:
                silent.stop()
            # The primary comes back on the same port.
            working = scripted(Script(rcpt_default=UNKNOWN), port=silent.port)
            try:
                await wait_until(lambda: engine.breaker_state(primary) is State.HALF_OPEN, 2.0)
                results = await asyncio.gather(
                    *(engine.probe(f"w{n}@example.test", [primary]) for n in range(5))
                )
                trials = [r for r in results if r.skipped is None]
                assert len(trials) == 1  # exactly one trial probe
                assert trials[0].verdict is Verdict.UNKNOWN
                assert all(r.skipped is Skip.PRIMARY_DOWN for r in results if r.skipped)
                assert working.count("RCPT") == 1  # the trial (5.1.1 needs no control)
                assert engine.breaker_state(primary) is State.CLOSED
                assert sample(metrics, "callahead_breaker_open", primary=label) == 0
                assert sample(metrics, "callahead_primary_reached", primary=label) == 1
                result = await engine.probe("x@example.test", [primary])
                assert result.verdict is Verdict.UNKNOWN
            finally:
                await engine.aclose()
        # Skipped requests are no probes.
        assert sample(metrics, "callahead_probes_total", outcome="tempfail") == 3
        assert sample(metrics, "callahead_probes_total", outcome="unknown") == 2

    run(go)


def test_breaker_opens_for_a_silent_primary_under_concurrent_load(scripted: StartScripted) -> None:
    # The outage case the breaker exists for: many recipients at once, more than the
    # pool has sessions. The queued probes never touched the primary.
    silent = scripted(Script(banner=None))
    engine_settings = settings(timeout=0.3, pool_size=2, breaker_failures=3)

    async def go() -> None:
        async with engine_with(engine_settings) as engine:
            for batch in range(3):
                await asyncio.gather(
                    *(engine.probe(f"u{batch}.{n}@example.test", [hop(silent)]) for n in range(10))
                )
            assert engine.breaker_state(hop(silent)) is State.OPEN
            for n in range(100):
                result, elapsed = await timed(engine.probe(f"v{n}@example.test", [hop(silent)]))
                assert result.skipped is Skip.PRIMARY_DOWN
                assert elapsed < 0.05

    run(go)


def test_slow_primary_with_a_saturated_pool_does_not_trip_the_breaker(
    scripted: StartScripted,
) -> None:
    # The other side of the same coin: a primary that answers, only slowly, while
    # recipients queue for its few sessions, is not down.
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 0.2}))
    engine_settings = settings(timeout=0.5, pool_size=1, breaker_failures=3)

    async def go() -> None:
        async with engine_with(engine_settings) as engine:
            for batch in range(3):
                results = await asyncio.gather(
                    *(engine.probe(f"u{batch}.{n}@example.test", [hop(server)]) for n in range(8))
                )
                assert sum(r.verdict is Verdict.VALID for r in results) >= 2
                assert engine.breaker_state(hop(server)) is State.CLOSED
            result = await engine.probe("last@example.test", [hop(server)])
            assert result.verdict is Verdict.VALID

    run(go)


def test_failed_trial_reopens_the_breaker() -> None:
    refused = Nexthop("127.0.0.1", free_port())

    async def go() -> None:
        async with engine_with(
            settings(timeout=1.0, breaker_failures=2, breaker_cooldown=0.3)
        ) as engine:
            for _ in range(2):
                result = await engine.probe("u@example.test", [refused])
                assert (result.skipped, result.stage) == (None, Stage.CONNECT)
            assert engine.breaker_state(refused) is State.OPEN
            await wait_until(lambda: engine.breaker_state(refused) is State.HALF_OPEN, 2.0)
            trial = await engine.probe("u@example.test", [refused])
            assert trial.skipped is None  # tried, refused again
            assert engine.breaker_state(refused) is State.OPEN
            skipped = await engine.probe("u@example.test", [refused])
            assert skipped.skipped is Skip.PRIMARY_DOWN

    run(go)


# --- failover ----------------------------------------------------------------------------


def test_failover_refused_first_hop_then_second_answers(scripted: StartScripted) -> None:
    second = scripted(Script(rcpt_default=UNKNOWN))
    refused = Nexthop("127.0.0.1", free_port())

    async def go() -> None:
        async with engine_with(settings()) as engine:
            result = await engine.probe("user@example.test", [refused, hop(second)])
            assert (result.verdict, result.code) == (Verdict.UNKNOWN, 550)
            assert result.primary == str(hop(second))

    run(go)
    assert second.connections == 1


def test_failover_goes_straight_to_the_second_when_the_first_is_down(
    scripted: StartScripted,
) -> None:
    first = scripted(Script(banner=SHUTTING_DOWN))
    second = scripted(Script(rcpt_default=OK))

    async def go() -> None:
        async with engine_with(settings(breaker_failures=2)) as engine:
            hops = [hop(first), hop(second)]
            for n in range(2):
                result = await engine.probe(f"u{n}@example.test", hops)
                assert result.verdict is Verdict.VALID
                assert result.primary == str(hop(second))
            assert engine.breaker_state(hop(first)) is State.OPEN
            for n in range(2, 6):
                result = await engine.probe(f"u{n}@example.test", hops)
                assert result.verdict is Verdict.VALID
                assert result.primary == str(hop(second))
            assert engine.breaker_state(hop(second)) is State.CLOSED

    run(go)
    assert first.connections == 2  # not contacted while its breaker is open
    assert second.count("RCPT") == 6


def test_every_hop_down_is_primary_down() -> None:
    hops = [Nexthop("127.0.0.1", free_port()), Nexthop("127.0.0.1", free_port())]

    async def go() -> None:
        async with engine_with(settings(breaker_failures=1)) as engine:
            first = await engine.probe("u@example.test", hops)
            assert first.skipped is None
            assert first.verdict is Verdict.TEMPFAIL
            assert first.primary == str(hops[1])
            second = await engine.probe("u@example.test", hops)
            assert second.skipped is Skip.PRIMARY_DOWN
            assert second.verdict is Verdict.TEMPFAIL

    run(go)


# --- STARTTLS ----------------------------------------------------------------------------


TLS_EXTENSIONS = ("8BITMIME", "STARTTLS")


def probe_twice(
    server: ScriptedServer, tls: TlsMode, addresses: Sequence[str] = ("a@example.test",)
) -> list[ProbeResult]:
    async def go() -> list[ProbeResult]:
        async with engine_with(settings(tls=tls, timeout=3.0)) as engine:
            return [await engine.probe(a, [hop(server)]) for a in addresses]

    return run(go)


@pytest.mark.parametrize("tls", [TlsMode.MAY, TlsMode.ENCRYPT])
def test_starttls_probe_goes_over_tls(scripted: StartScripted, tls: TlsMode) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=TLS_EXTENSIONS))
    results = probe_twice(server, tls, ["a@example.test", "b@example.test"])
    assert [r.verdict for r in results] == [Verdict.VALID, Verdict.VALID]
    assert server.connections == 1  # the TLS session is pooled too
    conn = server.sessions[0]
    assert conn.verbs()[:5] == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT"]
    assert conn.over_tls[:2] == [False, False]
    rcpt_indexes = [i for i, v in enumerate(conn.verbs()) if v in ("MAIL", "RCPT")]
    assert len(rcpt_indexes) == 3
    assert all(conn.over_tls[i] for i in rcpt_indexes)


@pytest.mark.parametrize("tls", [TlsMode.MAY, TlsMode.ENCRYPT])
def test_failed_tls_handshake_is_tempfail_not_reached(
    scripted: StartScripted, tls: TlsMode
) -> None:
    server = scripted(
        Script(rcpt_default=UNKNOWN, extensions=TLS_EXTENSIONS, tls="broken"),
    )
    [result] = probe_twice(server, tls)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.stage is Stage.STARTTLS
    assert not result.reached
    assert server.count("RCPT") == 0
    assert server.count("MAIL") == 0


def test_tls_none_never_sends_starttls(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=TLS_EXTENSIONS))
    [result] = probe_twice(server, TlsMode.NONE)
    assert result.verdict is Verdict.VALID
    assert "STARTTLS" not in server.verbs()
    assert not any(server.sessions[0].over_tls)


def test_tls_encrypt_without_starttls_offered_never_sends_rcpt(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=UNKNOWN))
    [result] = probe_twice(server, TlsMode.ENCRYPT)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.stage is Stage.STARTTLS
    assert server.count("RCPT") == 0
    assert server.count("MAIL") == 0
    assert server.count("STARTTLS") == 0


@pytest.mark.parametrize(
    ("tls", "verdict"), [(TlsMode.MAY, Verdict.UNKNOWN), (TlsMode.ENCRYPT, Verdict.TEMPFAIL)]
)
def test_starttls_refused(scripted: StartScripted, tls: TlsMode, verdict: Verdict) -> None:
    # 454 to STARTTLS: "may" goes on in plaintext, as Postfix does; "encrypt" stops.
    server = scripted(
        Script(
            rcpt_default=UNKNOWN,
            extensions=TLS_EXTENSIONS,
            starttls="454 4.7.0 TLS not available due to local problem",
        ),
    )
    [result] = probe_twice(server, tls)
    assert result.verdict is verdict
    # "may": the probe (its 5.1.1 needs no control).
    assert server.count("RCPT") == (1 if tls is TlsMode.MAY else 0)


# --- SMTPUTF8 ----------------------------------------------------------------------------


def test_non_ascii_local_part_with_smtputf8(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=("8BITMIME", "SMTPUTF8")))
    [result] = probe_twice(server, TlsMode.MAY, ["jörg@example.test"])
    assert result.verdict is Verdict.VALID
    assert server.lines[1] == "MAIL FROM:<> SMTPUTF8"
    assert server.sessions[0].raw[2] == "RCPT TO:<jörg@example.test>\r\n".encode()


def test_non_ascii_local_part_without_smtputf8_is_tempfail_and_never_sent(
    scripted: StartScripted,
) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=NO_SMTPUTF8))
    results = probe_twice(server, TlsMode.MAY, ["jörg@example.test", "joerg@example.test"])
    assert results[0].verdict is Verdict.TEMPFAIL
    assert results[0].code is None
    assert results[1].verdict is Verdict.VALID
    assert server.count("RCPT") == 1
    assert "RCPT TO:<joerg@example.test>" in server.lines
    assert server.connections == 1  # the session was kept for the next probe


def test_unsendable_address_never_reaches_the_wire(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=("SMTPUTF8",)))
    addresses = ["a@example.test", "x\r\nRSET@example.test", "b c@example.test", "b@example.test"]
    results = probe_twice(server, TlsMode.NONE, addresses)
    assert [r.verdict for r in results] == [
        Verdict.VALID,
        Verdict.TEMPFAIL,
        Verdict.TEMPFAIL,
        Verdict.VALID,
    ]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "QUIT"]
    assert server.connections == 1


# --- idle sessions -----------------------------------------------------------------------


def test_idle_session_is_closed_before_the_primary_would(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK))
    metrics = Metrics()

    async def go() -> None:
        async with engine_with(settings(pool_idle=0.3), metrics) as engine:
            result = await engine.probe("a@example.test", [hop(server)])
            assert result.verdict is Verdict.VALID
            label = str(hop(server))
            assert sample(metrics, "callahead_pool_sessions", primary=label) == 1
            waited = await wait_until(lambda: server.sessions[0].closed, 3.0)
            assert waited >= 0.2  # not closed right after the probe
            assert server.sessions[0].verbs()[-1] == "QUIT"
            assert sample(metrics, "callahead_pool_sessions", primary=label) == 0
            result = await engine.probe("b@example.test", [hop(server)])
            assert result.verdict is Verdict.VALID

    run(go)
    assert server.connections == 2


def test_aclose_quits_every_pooled_session(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 0.05}))

    async def go() -> None:
        engine = ProbeEngine(settings(pool_size=3))
        results = await asyncio.gather(
            *(engine.probe(f"u{n}@example.test", [hop(server)]) for n in range(6))
        )
        assert all(r.verdict is Verdict.VALID for r in results)
        assert server.open_connections == 3
        await engine.aclose()
        await wait_until(lambda: server.open_connections == 0)

    run(go)
    assert server.connections == 3
    assert all(c.verbs()[-1] == "QUIT" for c in server.sessions)


# --- fuzz: no crafted recipient adds a command on the wire --------------------------------

ALLOWED_VERBS = {"EHLO", "HELO", "MAIL", "RCPT", "QUIT", "STARTTLS"}

_NASTY = st.sampled_from(
    ["\n", "\r", "\x00", "<", ">", '"', "\\", " ", "@", "ö", "\u2028", "\x85", ":"]
)
_INJECTIONS = st.sampled_from(
    [
        "\r\nRSET",
        "\r\nDATA\r\n",
        "\nMAIL FROM:<x@y>",
        ">\r\nRCPT TO:<victim@example.test",
        "\x00QUIT",
        "> SMTPUTF8\r\nVRFY root",
    ]
)
_LOCAL = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.one_of(_NASTY, st.sampled_from(list("abcXYZ.+-_"))), max_size=40),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=8), _INJECTIONS, st.text(max_size=8)),
)
_FUZZ_RECIPIENTS = st.builds(
    lambda local, domain, wrap: f"<{local}@{domain}>" if wrap else f"{local}@{domain}",
    _LOCAL,
    st.sampled_from(["example.test", "EXAMPLE.test", "example.test\r\nRSET", "example.test."]),
    st.booleans(),
).filter(lambda r: normalize_recipient(r) is not None)


def test_fuzz_no_recipient_adds_a_command_on_the_wire(scripted: StartScripted) -> None:
    server = scripted(
        Script(
            rcpt_default=UNKNOWN,
            users=frozenset({"valid@example.test"}),
            extensions=("8BITMIME", "SMTPUTF8"),
        )
    )
    probe_loop = ProbeLoop()
    probe_loop.start()
    engine = ProbeEngine(settings(tls=TlsMode.NONE, timeout=3.0))
    try:
        policy = Policy(
            routes=parse_routes(f"example.test=[127.0.0.1]:{server.port}"),
            cache=PositiveCache(ttl=0, maxsize=0),
            prober=LoopProber(probe_loop, engine),
            tempfail_action=TempfailAction.DEFER,
        )
        probed: list[str] = []

        @settings_(max_examples=80, deadline=None)
        @given(_FUZZ_RECIPIENTS)
        @example("<valid@example.test>")
        @example("<a\r\nRSET@example.test>")
        @example('<"a\r\nDATA"@example.test>')
        @example("<jörg@example.test>")
        def one(recipient: str) -> None:
            before = len(server.commands)
            decision = policy.decide(recipient)
            new = server.commands[before:]
            for command in new:
                # One command per line: CRLF at the end and nowhere else, no NUL.
                raw = command.raw
                assert raw.endswith(b"\r\n"), raw
                body = raw[:-2]
                assert b"\r" not in body and b"\n" not in body and b"\x00" not in body, raw
                assert command.verb in ALLOWED_VERBS, raw
            rcpts = [c.raw for c in new if c.raw.startswith(b"RCPT")]
            assert len(rcpts) <= 1  # 5.1.1 is unknown on its own: no control RCPT
            result = decision.probe
            if rcpts:
                assert decision.reason in (Reason.PROBE_VALID, Reason.PROBE_UNKNOWN)
                wire = wire_address(decision.address, allow_utf8=True)
                assert rcpts[0] == b"RCPT TO:<" + wire + b">\r\n"
                probed.append(decision.address)
            elif result is not None:
                assert result.verdict is Verdict.TEMPFAIL
            if decision.action is Action.REJECT:
                assert rcpts  # a 550 only ever comes from the primary's own answer

        one()
        assert "valid@example.test" in probed
    finally:
        probe_loop.run(engine.aclose(), 5)
        probe_loop.stop()
    # Whatever was sent, every line on the wire was one of ours.
    assert set(server.verbs()) <= ALLOWED_VERBS


# --- the probe budget per primary (CALLAHEAD_PRIMARY_RATE) -----------------------------


def timed_rcpts(times: list[float]) -> Script:
    """A primary that accepts every recipient and notes when each RCPT arrived."""

    def hook(session: Session, address: str) -> str:
        if not address.lower().startswith("postmaster@"):
            times.append(time.monotonic())
        return OK

    return Script(rcpt_hook=hook)


def test_a_burst_over_the_rate_waits_within_probe_wait_then_is_skipped(
    scripted: StartScripted,
) -> None:
    times: list[float] = []
    server = scripted(timed_rcpts(times))
    rate = 5.0  # a burst of 5 at once, then one every 0.2 s

    async def go() -> list[tuple[ProbeResult, float]]:
        async with engine_with(settings(primary_rate=rate, probe_wait=0.5)) as engine:
            return list(
                await asyncio.gather(
                    *(timed(engine.probe(f"u{n}@x.test", [hop(server)])) for n in range(12))
                )
            )

    outcomes = run(go)
    probed = [(r, t) for r, t in outcomes if r.skipped is None]
    over = [(r, t) for r, t in outcomes if r.skipped is not None]
    # 5 at once, then the tokens due at 0.2 s and 0.4 s; the one at 0.6 s is too late.
    assert len(probed) == 7
    assert all(r.verdict is Verdict.VALID for r, _ in probed)
    assert sorted(t for _, t in probed)[-1] >= 0.38  # the last one waited for its token
    assert len(over) == 5
    for result, seconds in over:
        assert result.skipped is Skip.PRIMARY_BUDGET
        assert result.verdict is Verdict.TEMPFAIL
        assert result.primary == str(hop(server))
        # Refused at once (its token would come after probe_wait): well under the 0.5 s
        # a wait would take, with room for a loaded machine.
        assert seconds < 0.45
    # The primary's own count and times: never more than the burst plus the rate. The
    # times are arrivals at the server, so a probe sent on time may arrive late and
    # close to the next one: JITTER seconds of slack (unthrottled, all 12 would arrive
    # within milliseconds, over 5 + 5 * JITTER).
    assert len(times) == 7 == len(server.rcpts()) - server.count("RCPT TO:<postmaster@")
    times.sort()
    jitter = 0.15
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= rate + rate * (times[j] - times[i] + jitter)


def test_coalesced_requests_and_known_valid_addresses_take_no_token(
    scripted: StartScripted,
) -> None:
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 0.2}))
    cache = PositiveCache(ttl=60, maxsize=10)

    async def go() -> None:
        async with engine_with(settings(primary_rate=0.5, probe_wait=0), None, cache) as engine:
            shared = await asyncio.gather(
                *(engine.probe("a@x.test", [hop(server)]) for _ in range(4))
            )
            assert [r.verdict for r in shared] == [Verdict.VALID] * 4
            again = await engine.probe("a@x.test", [hop(server)])  # known valid now
            assert again.verdict is Verdict.VALID and again.skipped is None
            # The one token went to the one probe of a@: b@ finds the bucket empty.
            other = await engine.probe("b@x.test", [hop(server)])
            assert other.skipped is Skip.PRIMARY_BUDGET

    run(go)
    assert server.rcpts() == ["a@x.test"]


def test_each_failover_hop_has_its_own_budget(scripted: StartScripted) -> None:
    first = scripted(Script(rcpt_default=OK))
    second = scripted(Script(rcpt_default=OK))
    hops = [hop(first), hop(second)]

    async def go() -> list[ProbeResult]:
        async with engine_with(settings(primary_rate=0.5, probe_wait=0)) as engine:
            return [await engine.probe(f"u{n}@x.test", hops) for n in range(3)]

    one, two, three = run(go)
    assert (one.verdict, one.primary) == (Verdict.VALID, str(hops[0]))
    assert (two.verdict, two.primary) == (Verdict.VALID, str(hops[1]))
    assert three.skipped is Skip.PRIMARY_BUDGET
    assert first.rcpts() == ["u0@x.test"]
    assert second.rcpts() == ["u1@x.test"]


def test_a_background_probe_never_waits_for_a_token(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK))
    metrics = Metrics()

    async def go() -> None:
        async with engine_with(settings(primary_rate=1, probe_wait=5), metrics) as engine:
            assert (await engine.probe("a@x.test", [hop(server)])).verdict is Verdict.VALID
            result, seconds = await timed(
                engine.probe("b@x.test", [hop(server)], recheck=True, background=True)
            )
            assert result.skipped is Skip.PRIMARY_BUDGET
            assert seconds < 0.1
            # A recipient, though, waits for the next token (1 s) within probe_wait.
            result, seconds = await timed(engine.probe("c@x.test", [hop(server)]))
            assert result.verdict is Verdict.VALID
            assert seconds >= 0.5

    run(go)
    assert server.rcpts() == ["a@x.test", "c@x.test"]
    # Skipped probes are not probes: the counter has the two made.
    assert sample(metrics, "callahead_probes_total", outcome="valid") == 2
    assert sample(metrics, "callahead_probes_in_flight") == 0
