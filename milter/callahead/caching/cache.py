"""The positive cache: addresses a primary recently said it accepts, and nothing else.

An unknown or undecided address is never stored, so a user created on the primary is
accepted at the next attempt. libmilter calls us from many threads: every access takes
the lock.

Each entry keeps its own expiry, so that entries loaded from ``CALLAHEAD_CACHE_FILE``
keep the time they had left, and so that the operator can see it (``callahead cache
show``). When the cache is full, the entry nearest its expiry goes: with one TTL for
all, the one verified longest ago (an address in use is verified again before it
expires, ``CALLAHEAD_REFRESH_WITHIN``). The entries live in an ``ExpiringMap``
(expiring.py), about 160 bytes each beside the address.

It also remembers, per domain, the few addresses verified most recently (``recent``):
they are the *control* addresses a probe session asks when the primary rejects a
recipient (session.py), so that a domain without postmaster@ still has a control.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .expiring import ExpiringMap


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    maxsize: int
    ttl: float
    enabled: bool


RECENT_PER_DOMAIN = 3
"""Recently verified addresses remembered per domain, as control addresses."""
RECENT_DOMAINS = 10_000
"""Domains whose recent addresses are remembered (the least recently verified go)."""


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


class PositiveCache:
    """A bounded TTL set of valid addresses. ``ttl`` or ``maxsize`` of 0 disables it."""

    def __init__(
        self, *, ttl: float, maxsize: int, clock: Callable[[], float] | None = None
    ) -> None:
        self.ttl = ttl
        self.maxsize = maxsize
        self._enabled = ttl > 0 and maxsize > 0
        self._clock = clock if clock is not None else time.monotonic
        # The value of an entry is its expiry on ``clock``.
        self._entries = ExpiringMap(maxsize, self._clock)
        self._recent: OrderedDict[str, list[str]] = OrderedDict()
        """Domain -> its most recently verified addresses, newest first."""
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def __contains__(self, address: object) -> bool:
        if not self._enabled:
            return False
        if not isinstance(address, str):
            return False
        with self._lock:
            return self._entries.get(address) is not None

    def add(self, address: str) -> None:
        """Trust ``address`` for the whole TTL from now."""
        if not self._enabled:
            return
        with self._lock:
            self._entries.put(address, self._clock() + self.ttl)
            self._remember(address)

    def _remember(self, address: str) -> None:
        domain = _domain(address)
        addresses = self._recent.pop(domain, [])
        if address in addresses:
            addresses.remove(address)
        addresses.insert(0, address)
        del addresses[RECENT_PER_DOMAIN:]
        self._recent[domain] = addresses
        if len(self._recent) > RECENT_DOMAINS:
            self._recent.popitem(last=False)

    def recent(self, domain: str) -> tuple[str, ...]:
        """The addresses of ``domain`` (normalized) verified most recently and still
        cached, newest first: control addresses for a probe session."""
        if not self._enabled:
            return ()
        with self._lock:
            addresses = self._recent.get(domain, ())
            return tuple(a for a in addresses if self._entries.get(a) is not None)

    def forget_recent(self, address: str) -> None:
        """Stop offering ``address`` as a control (its primary refused it while another
        control of the domain was accepted); its cache entry stays."""
        with self._lock:
            self._unremember(address)

    def _unremember(self, address: str) -> None:
        addresses = self._recent.get(_domain(address))
        if addresses is not None and address in addresses:
            addresses.remove(address)

    def remaining(self, address: str) -> float | None:
        if not self._enabled:
            return None
        with self._lock:
            expires = self._entries.get(address)
            if expires is None:
                return None
            left = expires - self._clock()
        return left if left > 0 else None

    def discard(self, address: str) -> bool:
        with self._lock:
            return self._pop(address)

    def _pop(self, address: str) -> bool:
        self._unremember(address)
        return self._entries.pop(address)

    def discard_domain(self, domain: str) -> int:
        """Forget every address at ``domain`` (already normalized); returns how many."""
        suffix = "@" + domain
        with self._lock:
            self._recent.pop(domain, None)
            doomed = [a for a in self._entries if a.endswith(suffix)]
            return sum(1 for a in doomed if self._pop(a))

    def clear(self) -> int:
        """Forget everything; returns how many entries went."""
        with self._lock:
            count = len(self._entries)  # the live ones: len expires the others first
            self._entries.clear()
            self._recent.clear()
            return count

    def snapshot(self) -> list[tuple[str, float]]:
        """Every live entry with the seconds it has left, soonest to expire first."""
        with self._lock:
            now = self._clock()
            entries = [(a, e - now) for a, e in self._entries.items()]
        entries.sort(key=lambda entry: entry[1])
        return entries

    def restore(self, entries: Iterable[tuple[str, float]]) -> int:
        """Add entries with the seconds they have left (capped at the TTL: a lowered TTL
        applies to saved entries too); returns how many were taken."""
        if not self._enabled:
            return 0
        taken = 0
        with self._lock:
            now = self._clock()
            for address, left in sorted(entries, key=lambda entry: entry[1]):
                if left <= 0:
                    continue
                self._entries.put(address, now + min(left, self.ttl))
                self._remember(address)
                taken += 1
        return taken

    def stats(self) -> CacheStats:
        return CacheStats(len(self), self.maxsize, self.ttl, self._enabled)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
