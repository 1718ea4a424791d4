"""The cache that learns from the mail log: which delivery lines teach a recipient, which
evict one, the relay's check against callahead's own route, and the caches it changes
(the local one, and a real redis-server's).

The lines, as Postfix 3.7 writes them (github.com/vdukhovni/postfix, tag v3.7.22):
``to=<...>, relay=..., dsn=..., status=...`` is ``src/global/log_adhoc.c``; the bounce
text ``host NAME[ADDR] said: REPLY (in reply to RCPT TO command)`` is
``src/smtp/smtp_proto.c`` (``smtp_rcpt_fail``, via ``smtp_mesg_fail``'s format);
``relay=local``/``virtual`` are the local and virtual delivery agents'
(``src/local/``, ``src/virtual/``); ``relay=none`` is a bounce the smtp client made
itself (``src/smtp/smtp_connect.c``). ``SENT`` and ``BOUNCED`` are copied from a real
Postfix 3.7 backup's ``maillog_file`` (test_maillog_lines.py); the others are written
to the source's format.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from callahead.caching.cache import PositiveCache
from callahead.frontends.maillog import learning
from callahead.frontends.maillog.learning import (
    Learner,
    Lesson,
    RelayCheck,
    lesson,
    rcpt_refusal,
    relay_hop,
)
from callahead.frontends.maillog.ledger import Ledger
from callahead.frontends.maillog.lines import Event, parse_line
from callahead.frontends.maillog.meter import MaillogMetrics
from callahead.routing.routes import Expansion, Nexthop, RouteUnavailable
from tests.harness.fixtures import make_workdir
from tests.harness.redis import RedisServer
from tests.unit.caching.gates import backup

from .test_maillog_lines import BOUNCED, SENT

PRIMARY = Nexthop("127.0.0.1", 43353)
HEAD = "Dec 07 12:42:47 backup postfix-backup/smtp[17807]: 3EFFD2201A9: "
TIMES = "delay=2.6, delays=2.5/0.03/0.03/0.05"


def bounced(reply: str, command: str = "RCPT TO", dsn: str = "5.1.1") -> str:
    return (
        f"{HEAD}to=<gone-milter@meter.test>, relay=127.0.0.1[127.0.0.1]:43353, {TIMES}, "
        f"dsn={dsn}, status=bounced (host 127.0.0.1[127.0.0.1] said: {reply} "
        f"(in reply to {command} command))"
    )


SENT_LOCAL = (
    "Dec 07 12:42:47 backup postfix/local[17900]: 3EFFD2201A9: to=<known-milter@meter.test>, "
    f"relay=local, {TIMES}, dsn=2.0.0, status=sent (delivered to mailbox)"
)
SENT_VIRTUAL = (
    "Dec 07 12:42:47 backup postfix/virtual[17901]: 3EFFD2201A9: "
    f"to=<known-milter@meter.test>, relay=virtual, {TIMES}, dsn=2.0.0, "
    "status=sent (delivered to maildir)"
)
BOUNCED_HERE = (
    f"{HEAD}to=<gone-milter@meter.test>, relay=none, {TIMES}, dsn=5.4.4, status=bounced "
    "(Host or domain name not found. Name service error for name=meter.test type=MX: "
    "Host not found)"
)


def event(line: str, *, authentic: bool = True) -> Event:
    """``line`` as the journal hands it (``authentic``: logged by Postfix's own user), or
    as a file's line (never authentic)."""
    parsed = parse_line(line)[1]
    assert parsed is not None, line
    return dataclasses.replace(parsed, authentic=authentic)


# -- which lines teach ----------------------------------------------------------------


def test_parsed_lines_keep_the_relay_and_the_reply() -> None:
    e = event(BOUNCED)
    assert e.relay == "127.0.0.1[127.0.0.1]:43353"
    assert relay_hop(e.relay) == ("127.0.0.1", "127.0.0.1", 43353)
    assert rcpt_refusal(e.text) == (
        550,
        "5.1.1 <gone-milter@meter.test>: Recipient address rejected: User unknown in "
        "virtual mailbox table",
    )


@pytest.mark.parametrize("reason", ["primary_down", "probe_tempfail", "cache_hit", "probe_valid"])
def test_a_recipient_sent_to_a_relay_teaches(reason: str) -> None:
    assert lesson(reason, event(SENT)) is Lesson.LEARN


def test_a_line_postfix_may_not_have_written_teaches_nothing_but_still_evicts() -> None:
    """A file's line (or a journal entry of another uid) may be anyone's: ``logger -t
    postfix/smtp`` or ``postlog -t postfix/smtp`` write one. A forged ``sent`` would make
    a made-up address valid for a day on every backup; a forged bounce costs a probe."""
    assert lesson("primary_down", event(SENT, authentic=False)) is None
    assert lesson("cache_hit", event(BOUNCED, authentic=False)) is Lesson.EVICT


@pytest.mark.parametrize("reason", ["accepts_all", "probe_unknown", "no_domain", "bad_address"])
def test_not_after_a_catch_all_or_a_dry_run_refusal(reason: str) -> None:
    assert lesson(reason, event(SENT)) is None


@pytest.mark.parametrize("line", [SENT_LOCAL, SENT_VIRTUAL])
def test_a_local_delivery_teaches_nothing(line: str) -> None:
    assert lesson("primary_down", event(line)) is None


def test_an_explicit_unknown_at_rcpt_evicts() -> None:
    assert lesson("cache_hit", event(BOUNCED)) is Lesson.EVICT
    assert lesson("primary_down", event(bounced("550 5.1.1 User unknown"))) is Lesson.EVICT
    assert lesson("cache_hit", event(bounced("550 5.1.2 Bad destination"))) is Lesson.EVICT


@pytest.mark.parametrize(
    "line",
    [
        # A bare 5xx: a probe trusts it only after a control was accepted; the log has none.
        bounced("550 No such user here", dsn="5.0.0"),
        # Policy and prober refusals, a sender refusal, a full mailbox.
        bounced("554 5.7.1 <gone-milter@meter.test>: Relay access denied", dsn="5.7.1"),
        bounced("550 5.7.1 Client host rejected: cannot find your hostname", dsn="5.7.1"),
        bounced(
            "550 5.1.0 <s@remote.test>: Sender address rejected: User unknown in local "
            "recipient table",
            dsn="5.1.0",
        ),
        bounced("552 5.2.2 <gone-milter@meter.test>: Mailbox full", dsn="5.2.2"),
        # Not the reply to RCPT TO (content, or the whole message).
        bounced("550 5.1.1 User unknown", command="end of DATA"),
        # Postfix bounced it itself.
        BOUNCED_HERE,
    ],
)
def test_other_bounces_evict_nothing(line: str) -> None:
    assert lesson("cache_hit", event(line)) is None


def test_a_deferral_teaches_nothing() -> None:
    deferred = bounced("450 4.1.1 User unknown", dsn="4.1.1").replace("bounced", "deferred")
    assert lesson("cache_hit", event(deferred)) is None


# -- the relay against callahead's route ----------------------------------------------


class Routes:
    def __init__(self, hops: tuple[Nexthop, ...] | None) -> None:
        self.hops = hops

    async def lookup_async(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        if self.hops is None:
            raise RouteUnavailable("no route now")
        return self.hops


class Resolver:
    async def expand(self, hops: Sequence[Nexthop], domain: str) -> Expansion:
        first, second = Nexthop("192.0.2.1", 25), Nexthop("192.0.2.2", 25)
        return Expansion((first, second), frozenset({second}), {first: "mx1.meter.test:25"}, ())


def is_primary(routes: Routes, relay: str, resolver: Resolver | None = None) -> bool:
    return asyncio.run(RelayCheck(routes, resolver).is_primary("u@meter.test", relay))


def test_the_relay_must_be_a_primary_callahead_probes() -> None:
    literal = Routes((PRIMARY,))
    assert is_primary(literal, "127.0.0.1[127.0.0.1]:43353")
    assert not is_primary(literal, "127.0.0.1[127.0.0.1]:25"), "another port"
    assert not is_primary(literal, "relay.test[192.0.2.9]:43353"), "another host"
    assert not is_primary(literal, "none")
    assert not is_primary(Routes(None), "127.0.0.1[127.0.0.1]:43353"), "no route now"
    by_name = Routes((Nexthop("mx.meter.test", 25),))
    assert is_primary(by_name, "mx.meter.test[192.0.2.7]:25")
    mx = Routes((Nexthop("", 25, mx=True),))
    assert is_primary(mx, "mx1.meter.test[192.0.2.1]:25", Resolver())
    assert not is_primary(mx, "mx2.meter.test[192.0.2.2]:25", Resolver()), "a secondary MX"
    assert not is_primary(mx, "mx1.meter.test[192.0.2.1]:25"), "no resolver: no MX lookup"


# -- the caches ------------------------------------------------------------------------


class Loop:
    """Collects what the learner hands to the probe loop, runs it on demand."""

    def __init__(self) -> None:
        self.work: list[Coroutine[Any, Any, None]] = []

    def submit(self, coro: Coroutine[Any, Any, None]) -> None:
        self.work.append(coro)

    def run(self) -> None:
        async def all_of_it() -> None:
            while self.work:
                await self.work.pop(0)

        asyncio.run(all_of_it())


def local_rig(
    routes: Routes | None = None,
) -> tuple[Ledger, PositiveCache, MaillogMetrics, Loop]:
    metrics = MaillogMetrics(CollectorRegistry())
    cache = PositiveCache(ttl=3600, maxsize=100)
    loop = Loop()
    check = RelayCheck(routes or Routes((PRIMARY,)), None)
    learner = Learner(cache, check, loop.submit, metrics)
    return Ledger(metrics, on_fate=learner), cache, metrics, loop


def evictions(metrics: MaillogMetrics) -> float:
    return float(metrics.cache_evictions.labels("relay_bounce")._value.get())


def test_sent_to_the_primary_is_cached_and_becomes_a_control() -> None:
    ledger, cache, metrics, loop = local_rig()
    ledger.accepted("3EFFD2201A9", "known-milter@meter.test", "primary_down")
    ledger.read(event(SENT))
    assert "known-milter@meter.test" not in cache, "not on the meter's thread"
    loop.run()
    assert "known-milter@meter.test" in cache
    assert cache.recent("meter.test") == ("known-milter@meter.test",)
    assert metrics.cache_learned._value.get() == 1


def test_sent_elsewhere_is_not_cached() -> None:
    ledger, cache, metrics, loop = local_rig(Routes((Nexthop("127.0.0.1", 2525),)))
    ledger.accepted("3EFFD2201A9", "known-milter@meter.test", "primary_down")
    ledger.read(event(SENT))
    loop.run()
    assert "known-milter@meter.test" not in cache
    assert metrics.cache_learned._value.get() == 0


def test_a_recipient_callahead_did_not_accept_teaches_nothing() -> None:
    ledger, cache, _, loop = local_rig()
    ledger.read(event(SENT))
    assert loop.work == []
    assert "known-milter@meter.test" not in cache


def test_an_unknown_at_relay_evicts_the_cached_address() -> None:
    ledger, cache, metrics, loop = local_rig()
    cache.add("gone-milter@meter.test")
    ledger.accepted("3EFFD2201A9", "gone-milter@meter.test", "cache_hit")
    ledger.read(event(BOUNCED))
    loop.run()
    assert "gone-milter@meter.test" not in cache
    assert cache.recent("meter.test") == ()
    assert evictions(metrics) == 1


def test_nothing_cached_nothing_counted() -> None:
    ledger, _, metrics, loop = local_rig()
    ledger.accepted("3EFFD2201A9", "gone-milter@meter.test", "primary_down")
    ledger.read(event(BOUNCED))
    loop.run()
    assert evictions(metrics) == 0


def test_lessons_past_the_limit_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(learning, "MAX_PENDING", 2)
    metrics = MaillogMetrics(CollectorRegistry())
    cache = PositiveCache(ttl=3600, maxsize=100)
    loop = Loop()
    learner = Learner(cache, RelayCheck(Routes((PRIMARY,)), None), loop.submit, metrics)
    for n in range(3):
        learner(f"u{n}@meter.test", "primary_down", event(SENT))
    assert len(loop.work) == 2
    loop.run()
    learner("u3@meter.test", "primary_down", event(SENT))
    assert len(loop.work) == 1, "room again once the work is done"
    loop.run()
    assert {"u0@meter.test", "u1@meter.test", "u3@meter.test"} == {a for a, _ in cache.snapshot()}


# -- with Redis ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with make_workdir() as workdir, RedisServer(workdir) as server:
        yield server


def test_learnt_and_evicted_in_redis_too(redis: RedisServer) -> None:
    async def scenario() -> None:
        site = backup(redis.url)
        other = backup(redis.url)
        metrics = MaillogMetrics(CollectorRegistry())
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        learner = Learner(
            site.local,
            RelayCheck(Routes((PRIMARY,)), None),
            lambda coro: tasks.append(loop.create_task(coro)),
            metrics,
            shared=site.gate,
            shared_ttl=3600,
        )
        known, gone = "known-milter@meter.test", "gone-milter@meter.test"
        learner(known, "primary_down", event(SENT))
        await asyncio.gather(*tasks)
        assert known in site.local
        assert (await site.gate.remaining(known) or 0) > 3000
        assert await other.gate.recent_valid("meter.test") == known, "a control everywhere"

        await site.gate.store.store_valid(gone, 3_600_000)
        site.local.add(gone)
        learner(gone, "cache_hit", event(BOUNCED))
        await asyncio.gather(*tasks)
        assert gone not in site.local
        assert await site.gate.remaining(gone) is None
        assert evictions(metrics) == 1
        await site.gate.aclose()
        await other.gate.aclose()

    asyncio.run(scenario())
