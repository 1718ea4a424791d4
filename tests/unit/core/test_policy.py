"""The per-recipient decision, driven with a fake prober."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from callahead.base.address import Recipient, normalize_recipient
from callahead.caching.cache import PositiveCache
from callahead.core.guard import ClientGuard
from callahead.core.policy import (
    NO_DOMAIN_REPLY,
    REJECT_REPLY,
    Action,
    Policy,
    Reason,
    TempfailAction,
)
from callahead.routing.routes import Nexthop, RouteUnavailable, parse_routes
from callahead.smtp.verdict import Basis, ProbeResult, Skip, Stage, Verdict
from tests.unit.clock import Clock
from tests.unit.probers import SyncProber, no_domain_result

ROUTES = parse_routes("example.com=[mx1.example.com]:2525 example.com=[mx2.example.com]")
HOPS = (Nexthop("mx1.example.com", 2525), Nexthop("mx2.example.com", 25))


def result(verdict: Verdict, code: int | None = None) -> ProbeResult:
    stage = Stage.CONNECT if code is None else Stage.RCPT
    return ProbeResult(verdict, stage, code, f"scripted {verdict.value}", 0.01, str(HOPS[0]))


VALID = result(Verdict.VALID, 250)
UNKNOWN = result(Verdict.UNKNOWN, 550)
TEMPFAIL = result(Verdict.TEMPFAIL, 451)
REFUSED = result(Verdict.TEMPFAIL)


class FakeProber(SyncProber):
    """Records every probe and answers from a script: per address, a list of results
    handed out in order (the last one repeats)."""

    def __init__(self, script: dict[str, list[ProbeResult]] | None = None) -> None:
        self.script = script if script is not None else {}
        self.calls: list[tuple[str, tuple[Nexthop, ...]]] = []

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        self.calls.append((address, tuple(hops)))
        answers = self.script[address]
        return answers.pop(0) if len(answers) > 1 else answers[0]


def make_policy(
    prober: FakeProber,
    action: TempfailAction = TempfailAction.ACCEPT,
    cache: PositiveCache | None = None,
    **options: Any,
) -> tuple[Policy, PositiveCache]:
    """A policy over ``ROUTES``; ``options``: the rest of ``Policy``'s arguments."""
    cache = cache if cache is not None else PositiveCache(ttl=3600, maxsize=100)
    policy = Policy(routes=ROUTES, cache=cache, prober=prober, tempfail_action=action, **options)
    return policy, cache


def test_valid_is_accepted_and_cached() -> None:
    prober = FakeProber({"alice@example.com": [VALID]})
    policy, cache = make_policy(prober)
    decision = policy.decide("<alice@example.com>")
    assert decision.action is Action.ACCEPT
    assert decision.reason is Reason.PROBE_VALID
    assert decision.address == "alice@example.com"
    assert decision.probe is VALID
    assert prober.calls == [("alice@example.com", HOPS)]
    assert "alice@example.com" in cache


def test_second_valid_is_a_cache_hit_without_probe() -> None:
    prober = FakeProber({"alice@example.com": [VALID]})
    policy, _ = make_policy(prober)
    policy.decide("<alice@example.com>")
    decision = policy.decide("<alice@example.com>")
    assert decision.action is Action.ACCEPT
    assert decision.reason is Reason.CACHE_HIT
    assert decision.probe is None
    assert len(prober.calls) == 1


def test_unknown_is_rejected_and_not_cached() -> None:
    prober = FakeProber({"bob@example.com": [UNKNOWN, VALID]})
    policy, cache = make_policy(prober)
    decision = policy.decide("<bob@example.com>")
    assert decision.action is Action.REJECT
    assert decision.reason is Reason.PROBE_UNKNOWN
    assert decision.probe is UNKNOWN
    assert "bob@example.com" not in cache
    # The user is created on the primary: the next attempt probes again and is accepted.
    decision = policy.decide("<bob@example.com>")
    assert decision.action is Action.ACCEPT
    assert decision.reason is Reason.PROBE_VALID
    assert len(prober.calls) == 2


def test_a_recipient_domain_that_does_not_exist_is_rejected_550_512_and_counted() -> None:
    no_domain = no_domain_result("smtp:")
    prober = FakeProber({"bob@example.com": [no_domain]})
    guard = ClientGuard(limit=2, window=60)
    policy, cache = make_policy(prober, guard=guard)
    decision = policy.decide("<bob@example.com>", "192.0.2.9")
    assert (decision.action, decision.reason) == (Action.REJECT, Reason.NO_DOMAIN)
    assert decision.reply == NO_DOMAIN_REPLY
    assert (decision.reply.code, decision.reply.xcode) == ("550", "5.1.2")
    assert "bob@example.com" not in cache
    assert not guard.blocked("192.0.2.9")
    policy.decide("<bob@example.com>", "192.0.2.9")
    assert guard.blocked("192.0.2.9")  # each one counted as an unknown
    assert len(prober.calls) == 2  # never remembered


def test_a_secondary_answer_is_accepted_undecided_and_not_cached() -> None:
    secondary = ProbeResult(
        Verdict.TEMPFAIL, Stage.RCPT, 250, "2.1.5 Ok", 0.01, "[192.0.2.2]:25", basis=Basis.SECONDARY
    )
    policy, cache = make_policy(FakeProber({"bob@example.com": [secondary]}))
    decision = policy.decide("<bob@example.com>")
    assert (decision.action, decision.reason) == (Action.ACCEPT, Reason.PROBE_TEMPFAIL)
    assert "bob@example.com" not in cache
    deferring, _ = make_policy(FakeProber({"bob@example.com": [secondary]}), TempfailAction.DEFER)
    assert deferring.decide("<bob@example.com>").action is Action.DEFER


def test_a_user_unknown_reject_keeps_its_5_1_1_reply() -> None:
    policy, _ = make_policy(FakeProber({"ghost@example.com": [UNKNOWN]}))
    assert policy.decide("<ghost@example.com>").reply == REJECT_REPLY


def test_unknown_is_probed_every_time() -> None:
    prober = FakeProber({"bob@example.com": [UNKNOWN]})
    policy, _ = make_policy(prober)
    for _ in range(3):
        assert policy.decide("<bob@example.com>").action is Action.REJECT
    assert len(prober.calls) == 3


@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Action.ACCEPT), (TempfailAction.DEFER, Action.DEFER)],
)
@pytest.mark.parametrize("answer", [TEMPFAIL, REFUSED], ids=["451", "refused"])
def test_tempfail_follows_the_action_and_is_never_cached(
    action: TempfailAction, expected: Action, answer: ProbeResult
) -> None:
    prober = FakeProber({"carol@example.com": [answer, answer, UNKNOWN]})
    policy, cache = make_policy(prober, action)
    for _ in range(2):
        decision = policy.decide("<carol@example.com>")
        assert decision.action is expected
        assert decision.reason is Reason.PROBE_TEMPFAIL
        assert decision.probe is answer
        assert "carol@example.com" not in cache
    assert policy.decide("<carol@example.com>").action is Action.REJECT
    assert len(prober.calls) == 3


def test_unrouted_is_skipped_without_probe() -> None:
    prober = FakeProber()
    policy, cache = make_policy(prober)
    for rcpt in ("<dave@example.org>", "<dave@sub.example.com>", "<postmaster>", "<>", "x"):
        decision = policy.decide(rcpt)
        assert decision.action is Action.SKIP, rcpt
        assert decision.reason is Reason.UNROUTED
        assert decision.probe is None
    assert prober.calls == []
    assert len(cache) == 0


@pytest.mark.parametrize(
    "recipient",
    ["<alice@example.com>", "alice@example.com", " <alice@example.com> ", "<alice@EXAMPLE.COM>"],
)
def test_recipient_forms(recipient: str) -> None:
    prober = FakeProber({"alice@example.com": [VALID]})
    policy, _ = make_policy(prober)
    decision = policy.decide(recipient)
    assert decision.action is Action.ACCEPT
    assert decision.address == "alice@example.com"
    assert prober.calls == [("alice@example.com", HOPS)]


def test_domain_case_normalized_for_cache_and_probe() -> None:
    prober = FakeProber({"Alice@example.com": [VALID]})
    policy, cache = make_policy(prober)
    assert policy.decide("<Alice@Example.COM>").reason is Reason.PROBE_VALID
    assert policy.decide("<Alice@EXAMPLE.com.>").reason is Reason.CACHE_HIT
    assert prober.calls == [("Alice@example.com", HOPS)]
    assert "Alice@example.com" in cache


@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Action.ACCEPT), (TempfailAction.DEFER, Action.DEFER)],
)
@pytest.mark.parametrize(
    "recipient",
    [
        "<a b@example.com>",
        "<" + "x" * 500 + "@example.com>",  # does not fit one SMTP command line
        "<a>b@example.com>",
    ],
)
def test_unsendable_address_gets_tempfail_action_without_probe(
    action: TempfailAction, expected: Action, recipient: str
) -> None:
    prober = FakeProber()
    policy, _ = make_policy(prober, action)
    decision = policy.decide(recipient)
    assert decision.action is expected
    assert decision.reason is Reason.BAD_ADDRESS
    assert prober.calls == []


def test_a_local_part_over_64_octets_is_probed() -> None:
    """RFC 5321's 64-octet limit is not for servers to enforce; skipping such addresses
    let a padded spam recipient through unverified (and the primary bounced it)."""
    padded = "x" * 65 + "@example.com"
    prober = FakeProber({padded: [UNKNOWN]})
    policy, _ = make_policy(prober, TempfailAction.ACCEPT)
    decision = policy.decide(f"<{padded}>")
    assert (decision.action, decision.reason) == (Action.REJECT, Reason.PROBE_UNKNOWN)
    assert prober.calls == [(padded, HOPS)]


@pytest.mark.parametrize("action", list(TempfailAction))
def test_non_ascii_local_part_is_probed(action: TempfailAction) -> None:
    # Not bad_address any more: the engine probes it with SMTPUTF8 when the primary
    # offers it (and answers tempfail when it does not).
    prober = FakeProber({"jörg@example.com": [VALID]})
    policy, cache = make_policy(prober, action)
    decision = policy.decide("<jörg@Example.com>")
    assert decision.action is Action.ACCEPT
    assert decision.reason is Reason.PROBE_VALID
    assert decision.address == "jörg@example.com"
    assert prober.calls == [("jörg@example.com", HOPS)]
    assert "jörg@example.com" in cache


@pytest.mark.parametrize("route", ["bücher.example", "xn--bcher-kva.example"])
@pytest.mark.parametrize(
    "recipient", ["<jörg@bücher.example>", "<jörg@BÜCHER.example>", "<jörg@xn--bcher-kva.example>"]
)
def test_idn_domain_matches_its_route_in_both_forms(route: str, recipient: str) -> None:
    hop = Nexthop("mx.xn--bcher-kva.example", 25)
    prober = FakeProber({"jörg@xn--bcher-kva.example": [UNKNOWN]})
    policy = Policy(
        routes=parse_routes(f"{route}=[{hop.host}]"),
        cache=PositiveCache(ttl=60, maxsize=10),
        prober=prober,
        tempfail_action=TempfailAction.ACCEPT,
    )
    decision = policy.decide(recipient)
    assert decision.action is Action.REJECT
    # The probe carries the A-label: a non-ASCII domain can never go on the wire.
    assert prober.calls == [("jörg@xn--bcher-kva.example", (hop,))]


def test_multiple_recipients_judged_independently() -> None:
    prober = FakeProber(
        {
            "a@example.com": [VALID],
            "b@example.com": [UNKNOWN],
            "c@example.com": [TEMPFAIL],
            "d@example.com": [VALID],
        }
    )
    policy, cache = make_policy(prober, TempfailAction.DEFER)
    recipients = ["<a@example.com>", "<b@example.com>", "<c@example.com>", "<d@example.com>"]
    actions = [policy.decide(r).action for r in [*recipients, "<e@example.org>"]]
    assert actions == [Action.ACCEPT, Action.REJECT, Action.DEFER, Action.ACCEPT, Action.SKIP]
    assert [c[0] for c in prober.calls] == [f"{x}@example.com" for x in "abcd"]
    assert "a@example.com" in cache
    assert "d@example.com" in cache
    assert "b@example.com" not in cache
    assert "c@example.com" not in cache


def test_disabled_cache_probes_every_time() -> None:
    prober = FakeProber({"a@example.com": [VALID]})
    policy, _ = make_policy(prober, cache=PositiveCache(ttl=0, maxsize=100))
    for _ in range(2):
        assert policy.decide("<a@example.com>").reason is Reason.PROBE_VALID
    assert len(prober.calls) == 2


def test_parent_route_hops_are_passed_to_the_prober() -> None:
    prober = FakeProber({"a@x.sub.test": [VALID]})
    policy = Policy(
        routes=parse_routes(".sub.test=[mx.sub.test]:26"),
        cache=PositiveCache(ttl=60, maxsize=10),
        prober=prober,
        tempfail_action=TempfailAction.ACCEPT,
    )
    assert policy.decide("<a@X.sub.test>").action is Action.ACCEPT
    assert prober.calls == [("a@x.sub.test", (Nexthop("mx.sub.test", 26),))]


@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Action.ACCEPT), (TempfailAction.DEFER, Action.DEFER)],
)
def test_tempfail_decision(action: TempfailAction, expected: Action) -> None:
    policy, _ = make_policy(FakeProber(), action)
    decision = policy.tempfail_decision("a@example.com", Reason.ERROR)
    assert decision.action is expected
    assert decision.reason is Reason.ERROR
    assert decision.address == "a@example.com"


def test_normalize_recipient() -> None:
    assert normalize_recipient("<User@Example.COM.>") == Recipient(
        "User@example.com", "example.com"
    )
    assert normalize_recipient('<"a@b"@example.com>') == Recipient(
        '"a@b"@example.com', "example.com"
    )
    assert normalize_recipient("jörg@Bücher.example") == Recipient(
        "jörg@xn--bcher-kva.example", "xn--bcher-kva.example"
    )
    assert normalize_recipient("<postmaster>") is None
    assert normalize_recipient("<>") is None
    assert normalize_recipient("<@example.com>") is None


# --- the dictionary-attack guard and skipped probes ------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guarded_policy(
    prober: FakeProber,
    action: TempfailAction = TempfailAction.ACCEPT,
    *,
    limit: int = 3,
    window: float = 60.0,
) -> tuple[Policy, PositiveCache, FakeClock]:
    clock = FakeClock()
    cache = PositiveCache(ttl=3600, maxsize=100)
    policy = Policy(
        routes=ROUTES,
        cache=cache,
        prober=prober,
        tempfail_action=action,
        guard=ClientGuard(limit=limit, window=window, clock=clock),
    )
    return policy, cache, clock


ATTACKER = "198.51.100.66"
OTHER = "203.0.113.9"


@pytest.mark.parametrize("action", list(TempfailAction))
def test_client_over_the_limit_is_deferred_without_probe(action: TempfailAction) -> None:
    script = {f"u{n}@example.com": [UNKNOWN] for n in range(10)}
    script["alice@example.com"] = [VALID]
    prober = FakeProber(script)
    policy, _, _ = guarded_policy(prober, action, limit=3)
    assert policy.decide("<alice@example.com>", ATTACKER).reason is Reason.PROBE_VALID
    for n in range(3):
        decision = policy.decide(f"<u{n}@example.com>", ATTACKER)
        assert decision.action is Action.REJECT
        assert decision.reason is Reason.PROBE_UNKNOWN
    probes = len(prober.calls)
    assert probes == 4
    for n in range(3, 10):
        decision = policy.decide(f"<u{n}@example.com>", ATTACKER)
        # DEFER (450 4.7.1 in the adapter) even when the tempfail action is accept.
        assert decision.action is Action.DEFER
        assert decision.reason is Reason.CLIENT_LIMIT
        assert decision.probe is None
        assert decision.address == f"u{n}@example.com"
    assert len(prober.calls) == probes
    # A valid cached recipient still passes, without a probe.
    decision = policy.decide("<alice@example.com>", ATTACKER)
    assert (decision.action, decision.reason) == (Action.ACCEPT, Reason.CACHE_HIT)
    # An address the backup does not relay for: still no opinion.
    assert policy.decide("<x@example.org>", ATTACKER).action is Action.SKIP
    assert len(prober.calls) == probes


def test_only_unknowns_feed_the_guard() -> None:
    prober = FakeProber(
        {
            "valid@example.com": [VALID],
            "busy@example.com": [TEMPFAIL],
            "down@example.com": [REFUSED],
            "nobody@example.com": [UNKNOWN],
        }
    )
    policy, _, _ = guarded_policy(prober, limit=2)
    for _ in range(5):
        policy.decide("<busy@example.com>", ATTACKER)
        policy.decide("<down@example.com>", ATTACKER)
    # Tempfails and refusals are not the client's fault: not counted.
    assert policy.decide("<nobody@example.com>", ATTACKER).reason is Reason.PROBE_UNKNOWN
    assert policy.decide("<nobody@example.com>", ATTACKER).reason is Reason.PROBE_UNKNOWN
    assert policy.decide("<busy@example.com>", ATTACKER).reason is Reason.CLIENT_LIMIT


def test_guard_is_per_client_and_needs_a_client() -> None:
    prober = FakeProber({"nobody@example.com": [UNKNOWN]})
    policy, _, _ = guarded_policy(prober, limit=2)
    for _ in range(2):
        policy.decide("<nobody@example.com>", ATTACKER)
    assert policy.decide("<nobody@example.com>", ATTACKER).reason is Reason.CLIENT_LIMIT
    assert policy.decide("<nobody@example.com>", OTHER).reason is Reason.PROBE_UNKNOWN
    # Without a client address (or with an empty one) there is nobody to count.
    for client in (None, ""):
        for _ in range(5):
            assert policy.decide("<nobody@example.com>", client).reason is Reason.PROBE_UNKNOWN


def test_guard_window_expires() -> None:
    prober = FakeProber({"nobody@example.com": [UNKNOWN]})
    policy, _, clock = guarded_policy(prober, limit=2, window=60)
    policy.decide("<nobody@example.com>", ATTACKER)
    clock.now += 30
    policy.decide("<nobody@example.com>", ATTACKER)
    assert policy.decide("<nobody@example.com>", ATTACKER).reason is Reason.CLIENT_LIMIT
    clock.now += 30  # the first unknown leaves the window
    assert policy.decide("<nobody@example.com>", ATTACKER).reason is Reason.PROBE_UNKNOWN
    assert policy.decide("<nobody@example.com>", ATTACKER).reason is Reason.CLIENT_LIMIT


def test_default_policy_has_no_guard() -> None:
    prober = FakeProber({"nobody@example.com": [UNKNOWN]})
    policy, _ = make_policy(prober)
    for _ in range(50):
        assert policy.decide("<nobody@example.com>", ATTACKER).reason is Reason.PROBE_UNKNOWN


def skipped(skip: Skip) -> ProbeResult:
    return ProbeResult(
        Verdict.TEMPFAIL, Stage.CONNECT, None, skip.value, 0.0, str(HOPS[0]), False, skip
    )


@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Action.ACCEPT), (TempfailAction.DEFER, Action.DEFER)],
)
@pytest.mark.parametrize(
    ("skip", "reason"),
    [
        (Skip.OVERLOAD, Reason.OVERLOAD),
        (Skip.PRIMARY_DOWN, Reason.PRIMARY_DOWN),
        (Skip.PRIMARY_BUDGET, Reason.PRIMARY_BUDGET),
    ],
)
def test_skipped_probe_maps_to_its_reason_with_the_tempfail_action(
    action: TempfailAction, expected: Action, skip: Skip, reason: Reason
) -> None:
    answer = skipped(skip)
    prober = FakeProber({"carol@example.com": [answer]})
    policy, cache, _ = guarded_policy(prober, action, limit=1)
    for _ in range(3):
        decision = policy.decide("<carol@example.com>", ATTACKER)
        assert decision.action is expected
        assert decision.reason is reason
        assert decision.probe is answer
    assert "carol@example.com" not in cache
    assert len(prober.calls) == 3  # never counted as unknowns of the client


def test_dry_run_decides_as_usual_but_gives_no_reject_or_defer() -> None:
    prober = FakeProber(
        {"ghost@example.com": [UNKNOWN], "busy@example.com": [TEMPFAIL], "a@example.com": [VALID]}
    )
    policy, cache = make_policy(prober, TempfailAction.DEFER, dry_run=True)
    rejected = policy.decide("<ghost@example.com>")
    assert (rejected.action, rejected.reason) == (Action.REJECT, Reason.PROBE_UNKNOWN)
    assert rejected.dry_run is True
    assert rejected.reply is None
    deferred = policy.decide("<busy@example.com>")
    assert (deferred.action, deferred.dry_run, deferred.reply) == (Action.DEFER, True, None)
    error = policy.tempfail_decision("x@example.com", Reason.ERROR)
    assert (error.action, error.dry_run, error.reply) == (Action.DEFER, True, None)
    accepted = policy.decide("<a@example.com>")
    assert (accepted.action, accepted.dry_run) == (Action.ACCEPT, False)
    assert "a@example.com" in cache  # the cache works as usual


def test_without_dry_run_a_reject_carries_its_reply() -> None:
    policy, _ = make_policy(FakeProber({"ghost@example.com": [UNKNOWN]}))
    decision = policy.decide("<ghost@example.com>")
    assert decision.dry_run is False
    assert decision.reply is not None and decision.reply.code == "550"


class RecordingRefresher:
    def __init__(self) -> None:
        self.asked: list[tuple[str, tuple[Nexthop, ...]]] = []

    def refresh(self, address: str, hops: Sequence[Nexthop]) -> None:
        self.asked.append((address, tuple(hops)))


def test_a_hit_in_the_last_part_of_the_ttl_is_refreshed_and_answered_at_once() -> None:
    clock = Clock(0.0)
    prober = FakeProber({"a@example.com": [VALID]})
    refresher = RecordingRefresher()
    policy, _ = make_policy(
        prober,
        cache=PositiveCache(ttl=100, maxsize=10, clock=clock),
        refresher=refresher,
        refresh_within=10,
    )
    policy.decide("<a@example.com>")
    clock.now = 89  # 11 s left: not yet
    assert policy.decide("<a@example.com>").reason is Reason.CACHE_HIT
    assert refresher.asked == []
    clock.now = 91  # 9 s left
    decision = policy.decide("<a@example.com>")
    assert (decision.action, decision.reason) == (Action.ACCEPT, Reason.CACHE_HIT)
    assert refresher.asked == [("a@example.com", HOPS)]
    assert len(prober.calls) == 1  # the recipient never waited for a probe


@pytest.mark.parametrize(
    ("address", "answer", "action", "reason"),
    [
        ("a@example.com", VALID, Action.ACCEPT, Reason.PROBE_VALID),
        ("b@example.com", UNKNOWN, Action.REJECT, Reason.PROBE_UNKNOWN),
        ("c@example.com", TEMPFAIL, Action.DEFER, Reason.PROBE_TEMPFAIL),
        ("d@elsewhere.org", VALID, Action.SKIP, Reason.UNROUTED),
    ],
)
def test_the_async_path_decides_as_the_sync_one(
    address: str, answer: ProbeResult, action: Action, reason: Reason
) -> None:
    decisions = []
    for run in ("sync", "async"):
        prober = FakeProber({address: [answer]})
        policy, cache = make_policy(prober, TempfailAction.DEFER)
        if run == "sync":
            decision = policy.decide(f"<{address}>", "192.0.2.1")
        else:
            decision = asyncio.run(policy.decide_async(f"<{address}>", "192.0.2.1"))
        decisions.append(decision)
        assert (decision.action, decision.reason) == (action, reason)
        assert (address in cache) == (reason is Reason.PROBE_VALID)
    assert decisions[0] == decisions[1]


class FailingRoutes:
    def lookup(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        raise RouteUnavailable("postmap: fatal: open database /etc/postfix/transport.db")

    async def lookup_async(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        return self.lookup(domain, address)

    def route_key(self, domain: str) -> str:
        return ""


@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Action.ACCEPT), (TempfailAction.DEFER, Action.DEFER)],
)
def test_a_route_that_cannot_be_looked_up_is_undecided_never_rejected(
    action: TempfailAction, expected: Action
) -> None:
    prober = FakeProber()
    cache = PositiveCache(ttl=3600, maxsize=100)
    policy = Policy(routes=FailingRoutes(), cache=cache, prober=prober, tempfail_action=action)
    decision = policy.decide("<alice@example.com>")
    assert (decision.action, decision.reason) == (expected, Reason.ROUTE_FAILED)
    assert prober.calls == []


def test_a_probe_without_a_host_to_probe_is_route_failed() -> None:
    skipped = ProbeResult.not_probed(Skip.ROUTE_FAILED, HOPS, "route: NXDOMAIN")
    policy, _ = make_policy(FakeProber({"alice@example.com": [skipped]}))
    decision = policy.decide("<alice@example.com>")
    assert (decision.action, decision.reason) == (Action.ACCEPT, Reason.ROUTE_FAILED)


class EncodingRoutes:
    """Routes that hand the domain and address to a tool as UTF-8, as the Postfix maps
    do (postfixmaps.py): bytes that are not UTF-8 would raise UnicodeEncodeError."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def lookup(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        self.asked.append(address)
        (domain + address).encode("utf-8")
        return ROUTES.lookup(domain)

    async def lookup_async(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        return self.lookup(domain, address)

    def route_key(self, domain: str) -> str:
        return ""


NOT_UTF8 = [
    b"user@ex\xffample.com".decode("utf-8", "surrogateescape"),
    b"us\xffer@example.com".decode("utf-8", "surrogateescape"),
    b"<\xc3(@example.com>".decode("utf-8", "surrogateescape"),
]


@pytest.mark.parametrize("recipient", NOT_UTF8)
@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Action.ACCEPT), (TempfailAction.DEFER, Action.DEFER)],
)
def test_bytes_that_are_not_utf8_are_a_bad_address_before_routing(
    recipient: str, action: TempfailAction, expected: Action
) -> None:
    """What a front end decodes with surrogateescape: judged bad_address with the
    tempfail action (never a reject, never an internal error), from both entry points
    (the milter's decide, the policy service's decide_async), without a route lookup."""
    prober = FakeProber({"user@example.com": [result(Verdict.VALID, 250)]})
    routes = EncodingRoutes()
    policy = Policy(
        routes=routes,
        cache=PositiveCache(ttl=3600, maxsize=100),
        prober=prober,
        tempfail_action=action,
    )
    for decision in (policy.decide(recipient), asyncio.run(policy.decide_async(recipient))):
        assert decision.action is expected
        assert decision.reason is Reason.BAD_ADDRESS
        assert decision.reply is None or not decision.reply.permanent
    assert routes.asked == []
    assert prober.calls == []
    good = policy.decide("user@example.com")  # the same routes work for a good address
    assert routes.asked == ["user@example.com"]
    assert good.reason is not Reason.BAD_ADDRESS
