"""The join: each recipient callahead accepted, by (queue id, recipient), with its reason
at RCPT, until the mail log says what became of it.

Bounded: an entry is kept at most ``window`` seconds and at most ``limit`` entries are
kept, the oldest forgotten first (counted: ``callahead_maillog_evictions_total``). Every
call takes one lock for a few dictionary operations and does no I/O, so the front ends
call ``accepted`` from libmilter's threads and the probe loop without waiting on the
reader's thread.

A recipient is counted once per fate: ``sent`` and ``expired`` end its entry;
``deferred`` is counted at the first deferral only (a retry says nothing new);
``bounced`` is counted at once, and as backscatter when the bounce daemon logs the
sender's non-delivery notification for its queue id (none when the sender was ``<>``).
Each delivery line of an accepted recipient is also told to ``on_fate`` (the cache that
learns, learning.py), after the lock is let go.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ...base.address import normalize_recipient
from ...core.policy import Action, Decision
from .lines import Event, Fate, Kind
from .meter import MaillogMetrics
from .tally import DomainTally, domain_of

WINDOW = 6 * 86400.0
"""Seconds an accepted recipient is kept: Postfix's ``maximal_queue_lifetime`` (5 days)
and a day, so that mail deferred until it expires still meets its fate."""
LIMIT = 100_000
"""Accepted recipients kept at most (about 200 bytes each)."""
MAX_HELD = 1000
"""Recipients of one transaction held until its queue id is known: Postfix's default
``smtpd_recipient_limit``."""


@dataclass(slots=True)
class _Entry:
    reason: str
    since: float
    fate: Fate | None = None
    address: str = ""
    """As callahead judged it (its cache's key)."""


OnFate = Callable[[str, str, Event], None]
"""Told each delivery line of an accepted recipient, outside the lock: its address as
judged, callahead's reason at RCPT, the event (learning.Learner)."""


def recipient_key(address: str) -> str:
    """The form both sides are compared in: the domain normalized, all lower case."""
    normalized = normalize_recipient(address)
    return (normalized.address if normalized else address).lower()


def accepted_here(decision: Decision) -> bool:
    """Whether Postfix goes on with this recipient for callahead: no reply (valid,
    undecided and accepted, or a dry run), and the recipient was callahead's to judge."""
    return decision.reply is None and decision.action is not Action.SKIP


class Ledger:
    def __init__(
        self,
        metrics: MaillogMetrics,
        *,
        window: float = WINDOW,
        limit: int = LIMIT,
        clock: Callable[[], float] = time.monotonic,
        on_fate: OnFate | None = None,
        tally: DomainTally | None = None,
    ) -> None:
        self._metrics = metrics
        self.tally = tally
        """``callahead report``'s counts per domain (tally.py); None: not kept."""
        self._on_fate = on_fate
        self._window = window
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._messages: OrderedDict[str, dict[str, _Entry]] = OrderedDict()
        self._size = 0
        metrics.track(lambda: self._size)

    def __len__(self) -> int:
        return self._size

    def accepted(self, queue_id: str, address: str, reason: str) -> None:
        """Postfix queued ``address`` under ``queue_id``, accepted by callahead for
        ``reason``."""
        now = self._clock()
        with self._lock:
            message = self._messages.get(queue_id)
            if message is None:
                message = self._messages[queue_id] = {}
            key = recipient_key(address)
            if key not in message:
                self._size += 1
            message[key] = _Entry(reason, now, address=address)
            self._evict(now)

    def reason_of(self, queue_id: str, address: str) -> str | None:
        with self._lock:
            entry = self._messages.get(queue_id, {}).get(recipient_key(address))
            return None if entry is None else entry.reason

    def read(self, event: Event) -> None:
        """One event from the mail log."""
        told: tuple[str, str] | None = None
        with self._lock:
            message = self._messages.get(event.queue_id)
            if message is None:
                return
            if event.kind is Kind.DELIVERY:
                told = self._delivered(message, event)
            elif event.kind is Kind.NOTIFICATION:
                for key, entry in list(message.items()):
                    if entry.fate is Fate.BOUNCED:
                        self._metrics.backscatter.labels(entry.reason).inc()
                        if self.tally is not None:
                            self.tally.backscatter(domain_of(entry.address), entry.reason)
                        self._forget(message, key)
            elif event.kind is Kind.EXPIRED:
                for key, entry in list(message.items()):
                    if entry.fate in (None, Fate.DEFERRED):
                        self._count(entry, Fate.EXPIRED)
                        self._forget(message, key)
            else:  # REMOVED: whatever is left has no fate to come
                self._size -= len(message)
                message.clear()
            if not message:
                del self._messages[event.queue_id]
        if told is not None and self._on_fate is not None:
            self._on_fate(*told, event)

    def _delivered(self, message: dict[str, _Entry], event: Event) -> tuple[str, str] | None:
        """Counts the fate; the recipient's (address, reason) for ``on_fate``."""
        key = recipient_key(event.recipient)
        entry = message.get(key)
        if entry is None and event.original:
            key = recipient_key(event.original)
            entry = message.get(key)
        if entry is None or event.fate is None or entry.fate is Fate.BOUNCED:
            return None
        told = (entry.address or key, entry.reason)
        if event.fate is Fate.DEFERRED:
            if entry.fate is None:
                self._count(entry, Fate.DEFERRED)
                entry.fate = Fate.DEFERRED
            return told
        self._count(entry, event.fate)
        if event.fate is Fate.BOUNCED:
            entry.fate = Fate.BOUNCED  # kept until the notification, or the removal
        else:
            self._forget(message, key)
        return told

    def _count(self, entry: _Entry, fate: Fate) -> None:
        self._metrics.outcomes.labels(entry.reason, fate.value).inc()
        if self.tally is not None:
            self.tally.fate(domain_of(entry.address), entry.reason, fate, entry.fate)

    def _forget(self, message: dict[str, _Entry], key: str) -> None:
        del message[key]
        self._size -= 1

    def _evict(self, now: float) -> None:
        """Forget the oldest messages while too many recipients are kept or the oldest
        is older than the window (a message's entries go together: amortized O(1))."""
        while self._messages:
            queue_id, message = next(iter(self._messages.items()))
            oldest = next(iter(message.values())).since if message else now
            if self._size <= self._limit and now - oldest <= self._window:
                return
            del self._messages[queue_id]
            self._size -= len(message)
            self._metrics.evictions.inc(len(message))


class Held:
    """The recipients of one SMTP transaction callahead accepted before Postfix had a
    queue id for it (``smtpd_delay_open_until_valid_rcpt = yes``, Postfix's default,
    opens the queue file after the first recipient is accepted, and a milter or policy
    service is asked before that): handed to the ledger once a later RCPT, DATA or the
    end of the message brings the queue id."""

    __slots__ = ("_held", "_ledger")

    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger
        self._held: list[tuple[str, str]] = []

    def note(self, decision: Decision, queue_id: str) -> None:
        """The hook: one call per decision, no I/O."""
        if self._ledger is None or not accepted_here(decision):
            return
        if len(self._held) < MAX_HELD:
            self._held.append((decision.address, decision.reason.value))
        if _known(queue_id):
            self.bind(queue_id)

    def bind(self, queue_id: str | None) -> None:
        """The transaction's queue id is known: every recipient held goes to the ledger."""
        if self._ledger is None or not self._held or not _known(queue_id):
            return
        assert queue_id is not None
        for address, reason in self._held:
            self._ledger.accepted(queue_id, address, reason)
        self._held.clear()

    def clear(self) -> None:
        """The transaction ended without a message (RSET, or the connection closed)."""
        self._held.clear()


def _known(queue_id: str | None) -> bool:
    return bool(queue_id) and queue_id != "NOQUEUE"


MAX_TRANSACTIONS = 4096
"""Policy-service transactions whose recipients are held at once, at most; the oldest is
dropped (a transaction whose DATA is never asked about ends up there)."""


class Transactions:
    """The policy service's ``Held`` recipients, by the request's ``instance`` (Postfix's
    id of one SMTP transaction, the same in its RCPT, DATA and END-OF-MESSAGE requests)."""

    def __init__(self, ledger: Ledger | None, limit: int = MAX_TRANSACTIONS) -> None:
        self._ledger = ledger
        self._limit = limit
        self._held: OrderedDict[str, Held] = OrderedDict()

    def note(self, instance: str, decision: Decision, queue_id: str) -> None:
        """The hook for one RCPT request's decision: one call, no I/O."""
        if self._ledger is None or not accepted_here(decision):
            return
        held = self._held.get(instance)
        if held is None:
            held = self._held[instance] = Held(self._ledger)
            if len(self._held) > self._limit:
                self._held.popitem(last=False)
        held.note(decision, queue_id)

    def bind(self, instance: str, queue_id: str) -> None:
        """A later request of the transaction (DATA, END-OF-MESSAGE) with its queue id."""
        if _known(queue_id) and (held := self._held.pop(instance, None)) is not None:
            held.bind(queue_id)
