"""The backscatter meter's join: accepted recipients met with their fates, bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from callahead.core.policy import Action, Decision, Reason
from callahead.frontends.maillog.ledger import Held, Ledger, Transactions
from callahead.frontends.maillog.lines import Event, Fate, Kind
from callahead.frontends.maillog.meter import MaillogMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(window: float = 60.0, limit: int = 100) -> tuple[Ledger, MaillogMetrics, Clock]:
    metrics = MaillogMetrics(CollectorRegistry())
    clock = Clock()
    return Ledger(metrics, window=window, limit=limit, clock=clock), metrics, clock


def _sample(metrics: MaillogMetrics, name: str, labels: dict[str, str]) -> float:
    for family in (metrics.outcomes, metrics.backscatter, metrics.evictions, metrics.tracked):
        for metric in family.collect():
            for sample in metric.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
    return 0.0


def outcome(metrics: MaillogMetrics, reason: str, fate: str) -> float:
    return _sample(metrics, "callahead_relay_outcomes_total", {"reason": reason, "outcome": fate})


def backscatter(metrics: MaillogMetrics, reason: str) -> float:
    return _sample(metrics, "callahead_backscatter_total", {"reason": reason})


def delivery(qid: str, rcpt: str, fate: Fate, orig: str = "") -> Event:
    return Event(Kind.DELIVERY, qid, rcpt, orig, fate, "x.y.z")


def test_sent_and_bounced_with_its_notification() -> None:
    ledger, metrics, _ = setup()
    ledger.accepted("Q1", "known@example.test", "primary_down")
    ledger.accepted("Q1", "unknown@Example.TEST", "primary_down")
    assert len(ledger) == 2
    ledger.read(delivery("Q1", "known@example.test", Fate.SENT))
    ledger.read(delivery("Q1", "unknown@example.test", Fate.BOUNCED))
    assert outcome(metrics, "primary_down", "sent") == 1
    assert outcome(metrics, "primary_down", "bounced") == 1
    assert backscatter(metrics, "primary_down") == 0, "no DSN yet"
    ledger.read(Event(Kind.NOTIFICATION, "Q1"))
    assert backscatter(metrics, "primary_down") == 1
    assert len(ledger) == 0
    # Another message's lines, or this one's again, count nothing more.
    ledger.read(delivery("Q2", "known@example.test", Fate.SENT))
    ledger.read(Event(Kind.NOTIFICATION, "Q1"))
    assert outcome(metrics, "primary_down", "sent") == 1
    assert backscatter(metrics, "primary_down") == 1


def test_a_bounce_to_the_null_sender_is_no_backscatter() -> None:
    ledger, metrics, _ = setup()
    ledger.accepted("Q1", "unknown@example.test", "probe_tempfail")
    ledger.read(delivery("Q1", "unknown@example.test", Fate.BOUNCED))
    ledger.read(Event(Kind.REMOVED, "Q1"))  # no notification: the sender was <>
    assert outcome(metrics, "probe_tempfail", "bounced") == 1
    assert backscatter(metrics, "probe_tempfail") == 0
    assert len(ledger) == 0


def test_deferred_is_counted_once_then_the_fate() -> None:
    ledger, metrics, _ = setup()
    ledger.accepted("Q1", "a@example.test", "primary_down")
    ledger.accepted("Q1", "b@example.test", "primary_down")
    for _ in range(3):
        ledger.read(delivery("Q1", "a@example.test", Fate.DEFERRED))
        ledger.read(delivery("Q1", "b@example.test", Fate.DEFERRED))
    assert outcome(metrics, "primary_down", "deferred") == 2
    ledger.read(delivery("Q1", "a@example.test", Fate.SENT))
    ledger.read(Event(Kind.EXPIRED, "Q1"))
    assert outcome(metrics, "primary_down", "sent") == 1
    assert outcome(metrics, "primary_down", "expired") == 1
    assert len(ledger) == 0


def test_orig_to_matches_a_rewritten_recipient() -> None:
    ledger, metrics, _ = setup()
    ledger.accepted("Q1", "alias@example.test", "cache_hit")
    ledger.read(delivery("Q1", "real@example.test", Fate.SENT, orig="alias@example.test"))
    assert outcome(metrics, "cache_hit", "sent") == 1


def test_unknown_messages_and_recipients_are_not_counted() -> None:
    ledger, metrics, _ = setup()
    ledger.accepted("Q1", "a@example.test", "cache_hit")
    ledger.read(delivery("Q1", "other@example.test", Fate.BOUNCED))
    ledger.read(delivery("Q9", "a@example.test", Fate.BOUNCED))
    ledger.read(Event(Kind.NOTIFICATION, "Q1"))
    assert outcome(metrics, "cache_hit", "bounced") == 0
    assert backscatter(metrics, "cache_hit") == 0
    assert len(ledger) == 1


def test_the_window_evicts_the_oldest() -> None:
    ledger, metrics, clock = setup(window=60)
    ledger.accepted("Q1", "a@example.test", "cache_hit")
    clock.now += 30
    ledger.accepted("Q2", "b@example.test", "cache_hit")
    clock.now += 31
    ledger.accepted("Q3", "c@example.test", "cache_hit")
    assert len(ledger) == 2
    assert _sample(metrics, "callahead_maillog_evictions_total", {}) == 1
    ledger.read(delivery("Q1", "a@example.test", Fate.SENT))
    assert outcome(metrics, "cache_hit", "sent") == 0, "forgotten"
    ledger.read(delivery("Q2", "b@example.test", Fate.SENT))
    assert outcome(metrics, "cache_hit", "sent") == 1


def test_the_limit_evicts_the_oldest_first() -> None:
    ledger, metrics, _ = setup(limit=3)
    for n in range(5):
        ledger.accepted(f"Q{n}", f"u{n}@example.test", "probe_valid")
    assert len(ledger) == 3
    assert _sample(metrics, "callahead_maillog_evictions_total", {}) == 2
    assert ledger.reason_of("Q0", "u0@example.test") is None
    assert ledger.reason_of("Q1", "u1@example.test") is None
    assert ledger.reason_of("Q4", "u4@example.test") == "probe_valid"
    assert _sample(metrics, "callahead_maillog_tracked", {}) == 3


def accept(address: str, reason: Reason = Reason.PRIMARY_DOWN) -> Decision:
    return Decision(Action.ACCEPT, reason, address)


def test_held_until_the_queue_id_is_known() -> None:
    ledger, _, _ = setup()
    held = Held(ledger)
    held.note(accept("first@example.test"), "NOQUEUE")
    held.note(Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "no@example.test"), "NOQUEUE")
    held.note(Decision(Action.SKIP, Reason.UNROUTED, "else@other.test"), "NOQUEUE")
    assert len(ledger) == 0
    held.note(accept("second@example.test", Reason.CACHE_HIT), "Q1")
    assert ledger.reason_of("Q1", "first@example.test") == "primary_down"
    assert ledger.reason_of("Q1", "second@example.test") == "cache_hit"
    assert ledger.reason_of("Q1", "no@example.test") is None
    assert len(ledger) == 2
    held.note(accept("third@example.test"), "NOQUEUE")
    held.clear()  # RSET
    held.bind("Q2")
    assert len(ledger) == 2


def test_a_dry_run_reject_is_accepted_and_tracked() -> None:
    ledger, _, _ = setup()
    held = Held(ledger)
    dry = Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "no@example.test", dry_run=True)
    held.note(dry, "NOQUEUE")
    held.bind("Q1")
    assert ledger.reason_of("Q1", "no@example.test") == "probe_unknown"


def test_off_without_a_ledger() -> None:
    held = Held(None)
    held.note(accept("a@example.test"), "Q1")
    held.bind("Q1")
    Transactions(None).note("i1", accept("a@example.test"), "Q1")


def test_policy_transactions_by_instance() -> None:
    ledger, _, _ = setup()
    transactions = Transactions(ledger, limit=2)
    transactions.note("i1", accept("a@example.test"), "NOQUEUE")
    transactions.note("i2", accept("b@example.test"), "NOQUEUE")
    transactions.bind("i1", "NOQUEUE")  # DATA asked without a queue id: still held
    transactions.bind("i1", "Q1")
    assert ledger.reason_of("Q1", "a@example.test") == "primary_down"
    transactions.note("i3", accept("c@example.test"), "NOQUEUE")
    transactions.note("i4", accept("d@example.test"), "NOQUEUE")  # i2 dropped: the limit
    transactions.bind("i2", "Q2")
    assert ledger.reason_of("Q2", "b@example.test") is None
    transactions.bind("i4", "Q4")
    assert ledger.reason_of("Q4", "d@example.test") == "primary_down"
