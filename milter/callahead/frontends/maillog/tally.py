"""What ``callahead report`` shows, per recipient domain: what callahead refused at RCPT
(the backscatter it prevented), what it accepted by its reason, and what became of that
in the mail log. The metrics carry no domain label (a label per domain is unbounded);
this tally is bounded instead: at most ``MAX_DOMAINS`` domains, the rest under
``OTHER``. A domain that callahead only refused or deferred (a made-up subdomain under a
parent route, a dictionary attack's) gives its place to one where it accepted a
recipient, its counts moved to ``OTHER``: random names refused by the thousand never
push the relay domains out of the report.

Fed by the front ends' ``Judge`` (one ``decided`` per decision) and by the ledger (one
``fate`` per fate read, ``backscatter`` per non-delivery notification); read by the
admin socket's ``report`` op, or filled from the logs alone by ``replay.py``. A
recipient's last fate is what is shown: one deferred and then sent is ``sent``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ...core.policy import Action, Decision
from .lines import Fate

MAX_DOMAINS = 1000
"""Domains tallied one by one, at most; the others go together under ``OTHER``."""
OTHER = "other"
"""The bucket of the domains beyond ``MAX_DOMAINS`` (a name without a dot: no relay
domain's)."""
FATES = ("sent", "bounced", "backscatter", "deferred", "expired")
"""The columns of an accepted reason (``backscatter``: of the bounced, those whose
sender got a non-delivery notification; ``deferred``: deferred last, no fate yet)."""


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class _Domain:
    __slots__ = ("accepted", "deferred", "refused")

    def __init__(self) -> None:
        self.refused: dict[str, int] = {}
        """550 at RCPT, by reason."""
        self.deferred: dict[str, int] = {}
        """4xx at RCPT (the sender retries), by reason."""
        self.accepted: dict[str, dict[str, int]] = {}
        """By reason: ``accepted`` and the ``FATES``."""

    def row(self, reason: str) -> dict[str, int]:
        row = self.accepted.get(reason)
        if row is None:
            row = self.accepted[reason] = dict.fromkeys(("accepted", *FATES), 0)
        return row

    def add_to(self, other: _Domain) -> None:
        for reason, count in self.refused.items():
            other.refused[reason] = other.refused.get(reason, 0) + count
        for reason, count in self.deferred.items():
            other.deferred[reason] = other.deferred.get(reason, 0) + count
        for reason, row in self.accepted.items():
            into = other.row(reason)
            for column, count in row.items():
                into[column] += count

    def snapshot(self) -> dict[str, Any]:
        return {
            "refused": dict(self.refused),
            "deferred": dict(self.deferred),
            "accepted": {reason: dict(row) for reason, row in self.accepted.items()},
        }


class DomainTally:
    def __init__(
        self, max_domains: int = MAX_DOMAINS, clock: Callable[[], float] = time.time
    ) -> None:
        self._max = max_domains
        self._lock = threading.Lock()
        self._domains: dict[str, _Domain] = {}
        self._refusals_only: dict[str, None] = {}
        """The tallied domains with nothing accepted yet, the oldest first: the places
        that a domain with an accepted recipient may take."""
        self.since = clock()
        """Unix time the counts start at."""

    def _domain(self, name: str, *, accepted: bool) -> _Domain:
        """The counts of ``name`` (or ``OTHER``); ``accepted``: for a recipient
        callahead accepted (or its fate)."""
        found = self._domains.get(name)
        if found is not None:
            if accepted:
                self._refusals_only.pop(name, None)
            return found
        if len(self._domains) - (OTHER in self._domains) >= self._max:
            if not accepted or not self._refusals_only:
                return self._other()
            gone = next(iter(self._refusals_only))
            del self._refusals_only[gone]
            self._domains.pop(gone).add_to(self._other())
        found = self._domains[name] = _Domain()
        if not accepted:
            self._refusals_only[name] = None
        return found

    def _other(self) -> _Domain:
        found = self._domains.get(OTHER)
        if found is None:
            found = self._domains[OTHER] = _Domain()
        return found

    def decided(self, decision: Decision) -> None:
        """One decision of a front end (no I/O: a lock and a few dictionary operations);
        accepted as the ledger takes it (``ledger.accepted_here``: no reply, a dry run's
        included), skipped recipients (not callahead's) not at all."""
        accepted = decision.reply is None
        self.count(
            domain_of(decision.address), decision.action, decision.reason.value, accepted=accepted
        )

    def count(self, domain: str, action: Action, reason: str, *, accepted: bool) -> None:
        """``accepted``: the decision had no reply (Postfix goes on with the recipient)."""
        if action is Action.SKIP:
            return
        with self._lock:
            counts = self._domain(domain, accepted=accepted)
            if accepted:
                counts.row(reason)["accepted"] += 1
            elif action is Action.REJECT:
                counts.refused[reason] = counts.refused.get(reason, 0) + 1
            else:
                counts.deferred[reason] = counts.deferred.get(reason, 0) + 1

    def fate(self, domain: str, reason: str, fate: Fate, before: Fate | None) -> None:
        """A recipient accepted for ``reason`` met ``fate``; ``before``: the fate it had
        (None, or deferred)."""
        with self._lock:
            row = self._domain(domain, accepted=True).row(reason)
            if before is Fate.DEFERRED and fate is not Fate.DEFERRED:
                row["deferred"] -= 1
            row[fate.value] += 1

    def backscatter(self, domain: str, reason: str) -> None:
        with self._lock:
            self._domain(domain, accepted=True).row(reason)["backscatter"] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per domain: ``refused`` and ``deferred`` by reason, ``accepted`` by reason
        with its fates (JSON as it is: the admin socket's answer)."""
        with self._lock:
            return {name: counts.snapshot() for name, counts in sorted(self._domains.items())}

    def __contains__(self, domain: str) -> bool:
        return domain in self._domains
