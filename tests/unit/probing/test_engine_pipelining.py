"""Concurrent probes sharing pipelined sessions (smtp/session.py, smtp/wire.py,
probing/pool.py) against the scripted server: each probe gets its own address's answer,
RCPTs really go out before the replies before them (``Command.pipelined``, seen at the
server), and every rule of an unshared session holds: the error budget, MAIL FROM alone
until the sender is accepted, one recipient per transaction, a slow primary not marked
down. Counts are taken at the server."""

from __future__ import annotations

import asyncio

from callahead.caching.cache import PositiveCache
from callahead.frontends.metrics import Metrics
from callahead.probing.breaker import State
from callahead.probing.pool import PIPELINE_DEPTH
from callahead.smtp.session import ERROR_BUDGET
from callahead.smtp.verdict import Basis, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Command, Script, ScriptedServer
from tests.unit.probing.test_engine import (
    NO_SMTPUTF8,
    OK,
    SENDER_REFUSED,
    UNKNOWN,
    engine_with,
    hop,
    run,
    settings,
)
from tests.unit.probing.test_engine_verdicts import multi_recipient_bounce

USERS = frozenset(f"u{n}@example.test" for n in range(0, 40, 3))


def addresses(n: int) -> list[str]:
    return [f"u{i}@example.test" for i in range(n)]


def probe_all(
    server: ScriptedServer,
    targets: list[str],
    metrics: Metrics | None = None,
    **overrides: object,
) -> list[Verdict]:
    async def go() -> list[Verdict]:
        async with engine_with(settings(**overrides), metrics) as engine:
            results = await asyncio.gather(*(engine.probe(a, [hop(server)]) for a in targets))
            return [r.verdict for r in results]

    return run(go)


def expected(targets: list[str]) -> list[Verdict]:
    return [Verdict.VALID if a in USERS else Verdict.UNKNOWN for a in targets]


def rcpts(server: ScriptedServer) -> list[Command]:
    return [c for c in server.commands if c.verb == "RCPT"]


def test_concurrent_probes_share_one_session_each_with_its_own_answer(
    scripted: StartScripted,
) -> None:
    # The RCPT delay keeps the replies pending while the other probes join.
    server = scripted(Script(users=USERS, rcpt_default=UNKNOWN, delay={"RCPT": 0.02}))
    targets = addresses(PIPELINE_DEPTH)
    metrics = Metrics()
    assert probe_all(server, targets, metrics, pool_size=1) == expected(targets)
    assert len(server.sessions) == 1
    assert server.count("MAIL") == 1
    shared = metrics.registry.get_sample_value(
        "callahead_probe_shared_sessions_total", {"primary": str(hop(server))}
    )
    assert shared == PIPELINE_DEPTH - 1  # all but the one that opened it
    sent = rcpts(server)
    assert sorted(c.line for c in sent) == sorted(f"RCPT TO:<{a}>" for a in targets)
    # Every reply went to the RCPT it answers (the server's record of it).
    for command in sent:
        address = command.line.removeprefix("RCPT TO:<").removesuffix(">")
        assert (command.reply or "")[:3] == ("250" if address in USERS else "550")
    # The joiners' RCPTs were on the wire before the reply to the one before them.
    assert sum(c.pipelined for c in sent) >= PIPELINE_DEPTH // 2
    # MAIL FROM went alone: no RCPT before the primary had accepted the sender.
    assert not sent[0].pipelined


def test_more_probes_than_a_session_carries_wait_and_go_on_the_same_session(
    scripted: StartScripted,
) -> None:
    server = scripted(Script(users=USERS, rcpt_default=UNKNOWN, delay={"RCPT": 0.01}))
    targets = [a for a in addresses(40) if a in USERS] + [f"x{n}@example.test" for n in range(4)]
    assert probe_all(server, targets, pool_size=1) == expected(targets)
    assert len(server.sessions) == 1
    assert len(rcpts(server)) == len(targets)


def test_without_pipelining_offered_no_command_is_sent_before_the_reply_before_it(
    scripted: StartScripted,
) -> None:
    server = scripted(
        Script(users=USERS, rcpt_default=UNKNOWN, delay={"RCPT": 0.02}, extensions=NO_SMTPUTF8)
    )
    targets = addresses(PIPELINE_DEPTH)
    assert probe_all(server, targets, pool_size=2) == expected(targets)
    assert not any(c.pipelined for c in server.commands)
    # One probe per session: both sessions carried some.
    assert server.sessions_with_rcpt() == 2


def test_pipelining_switched_off_sends_one_command_at_a_time(scripted: StartScripted) -> None:
    server = scripted(Script(users=USERS, rcpt_default=UNKNOWN, delay={"RCPT": 0.02}))
    targets = addresses(PIPELINE_DEPTH)
    assert probe_all(server, targets, pool_size=2, pipelining=False) == expected(targets)
    assert not any(c.pipelined for c in server.commands)
    assert server.sessions_with_rcpt() == 2


def test_a_shared_session_stays_within_the_error_budget(scripted: StartScripted) -> None:
    # Every probe refused: even with probes in flight together, no session collects more
    # refusals than ERROR_BUDGET (a Postfix primary would slow down after 10).
    server = scripted(Script(rcpt_default=UNKNOWN, delay={"RCPT": 0.005}, max_errors=20))
    targets = [f"x{n}@example.test" for n in range(5 * ERROR_BUDGET)]
    assert probe_all(server, targets, pool_size=2) == [Verdict.UNKNOWN] * len(targets)
    for session in server.sessions:
        refused = [c for c in session.commands if (c.reply or " ")[0] in "45"]
        assert len(refused) <= ERROR_BUDGET
    assert sum(c.pipelined for c in rcpts(server)) > 0


def test_a_refused_sender_never_sees_a_recipient_on_a_shared_session(
    scripted: StartScripted,
) -> None:
    server = scripted(Script(users=USERS, mail=SENDER_REFUSED, delay={"MAIL": 0.02}))
    results = probe_all(server, addresses(PIPELINE_DEPTH), pool_size=1)
    assert results == [Verdict.TEMPFAIL] * PIPELINE_DEPTH
    assert server.count("RCPT") == 0


def test_one_recipient_per_transaction_is_pipelined_as_rset_mail_rcpt(
    scripted: StartScripted,
) -> None:
    users = {a for a in USERS}
    server = scripted(Script(rcpt_hook=multi_recipient_bounce(users), delay={"RCPT": 0.01}))
    targets = addresses(3 * PIPELINE_DEPTH)

    async def go() -> list[Verdict]:
        async with engine_with(settings(pool_size=1)) as engine:
            # The first two, one after the other, teach the shape (the second gets 5.5.3
            # and is asked again alone); then everything at once.
            first = [
                await engine.probe(a, [hop(server)]) for a in ("u0@example.test", "u3@example.test")
            ]
            rest = await asyncio.gather(*(engine.probe(a, [hop(server)]) for a in targets))
            return [r.verdict for r in first + list(rest)]

    verdicts = run(go)
    assert verdicts == expected(["u0@example.test", "u3@example.test", *targets])
    replies = [c.reply or "" for c in rcpts(server)]
    assert sum(" 5.5.3 " in r for r in replies) == 1
    # After the lesson every transaction has one RCPT, however many probes shared it.
    transactions: list[list[str]] = []
    for command in server.commands:
        if command.verb == "MAIL":
            transactions.append([])
        elif command.verb == "RCPT":
            transactions[-1].append(command.reply or "")
    assert len(transactions[0]) == 2
    assert all(len(t) == 1 for t in transactions[1:])
    assert any(c.pipelined for c in server.commands if c.verb in ("RSET", "MAIL"))


def test_drift_seen_by_one_probe_undoes_the_rejections_judged_with_it(
    scripted: StartScripted,
) -> None:
    # The primary stopped judging: it refuses everyone, the recently verified control
    # included. Concurrent rejections on the shared session wait for the control's
    # answer, so none of them is taken for unknown.
    server = scripted(Script(users=frozenset({"known@example.test"}), delay={"RCPT": 0.01}))
    known_valid = PositiveCache(ttl=3600, maxsize=100)

    async def go() -> list[tuple[Verdict, Basis]]:
        async with engine_with(settings(pool_size=1), known_valid=known_valid) as engine:
            assert (
                await engine.probe("known@example.test", [hop(server)])
            ).verdict is Verdict.VALID
            server.update(users=frozenset())
            await engine.aclose()  # a new session: the primary's new view
            results = await asyncio.gather(
                *(engine.probe(f"x{n}@example.test", [hop(server)]) for n in range(6))
            )
            return [(r.verdict, r.basis) for r in results]

    results = run(go)
    assert results == [(Verdict.TEMPFAIL, Basis.DRIFT)] * 6


def test_a_slow_primary_answering_a_long_queue_is_not_marked_down(
    scripted: StartScripted,
) -> None:
    # Probes that wait behind others on a shared session and run out of time are
    # undecided, and the breaker does not move: the primary answered all along.
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 0.15}))

    async def go() -> None:
        async with engine_with(settings(timeout=0.5, pool_size=1, breaker_failures=2)) as engine:
            for batch in range(3):
                results = await asyncio.gather(
                    *(engine.probe(f"s{batch}.{n}@example.test", [hop(server)]) for n in range(6))
                )
                assert sum(r.verdict is Verdict.VALID for r in results) >= 2
                assert engine.breaker_state(hop(server)) is State.CLOSED

    run(go)


def test_a_shared_session_stays_within_the_error_budget_when_rejections_ask_controls(
    scripted: StartScripted,
) -> None:
    # A primary in drift refuses everyone with 5.1.1, the controls included, and counts
    # errors as Postfix does by default: a 1 s sleep before each reply after the 10th
    # error, 421 at the 20th. Every probe is of its own domain, with verified controls, so
    # every rejection asks all the controls it may (the verified ones, then postmaster@),
    # and all of them are refused. No session collects more refusals than ERROR_BUDGET,
    # so the primary never slows down, and no rejection is taken for unknown.
    server = scripted(
        Script(
            rcpt_default=UNKNOWN,
            delay={"RCPT": 0.005},
            soft_error_limit=10,
            error_sleep=1.0,
            max_errors=20,
        )
    )
    domains = [f"d{n}.example.test" for n in range(12)]
    known_valid = PositiveCache(ttl=3600, maxsize=100)
    for domain in domains:
        for user in ("alice", "bob", "carol"):
            known_valid.add(f"{user}@{domain}")

    async def go() -> list[tuple[Verdict, Basis]]:
        async with engine_with(settings(pool_size=2), known_valid=known_valid) as engine:
            results = await asyncio.gather(
                *(engine.probe(f"x@{domain}", [hop(server)]) for domain in domains)
            )
            return [(r.verdict, r.basis) for r in results]

    results = run(go)
    refused = [
        sum((c.reply or " ")[0] in "45" for c in session.commands) for session in server.sessions
    ]
    assert max(refused) <= ERROR_BUDGET, refused
    assert results == [(Verdict.TEMPFAIL, Basis.DRIFT)] * len(domains)
    # Probes still shared sessions (each rejection asked two verified controls; never
    # postmaster@ once one of them was refused: evidence.py).
    assert server.count("RCPT") == 3 * len(domains)
    assert sum(c.pipelined for c in rcpts(server)) > 0


def test_sessions_are_shared_when_the_primary_accepts(scripted: StartScripted) -> None:
    # Counting the controls a rejection may ask leaves room for more than one probe per
    # session: a primary that accepts still sees pipelined RCPTs on one session.
    server = scripted(Script(rcpt_default=OK, delay={"RCPT": 0.02}))
    targets = addresses(PIPELINE_DEPTH)
    metrics = Metrics()
    assert probe_all(server, targets, metrics, pool_size=1) == [Verdict.VALID] * len(targets)
    assert len(server.sessions) == 1
    shared = metrics.registry.get_sample_value(
        "callahead_probe_shared_sessions_total", {"primary": str(hop(server))}
    )
    assert shared is not None and shared >= 1
    assert sum(c.pipelined for c in rcpts(server)) >= 1
