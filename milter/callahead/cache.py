"""The positive cache: addresses a primary recently said it accepts, and nothing else.

An unknown or undecided address is never stored, so a user created on the primary is
accepted at the next attempt. libmilter calls us from many threads: every access takes
the lock.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from cachetools import TTLCache


class ValidCache(Protocol):
    """Valid addresses as the decision core and the engine see them: the local TTL cache
    here, a shared one later; neither cares which."""

    def __contains__(self, address: object) -> bool: ...

    def add(self, address: str) -> None: ...


class PositiveCache:
    """A bounded TTL set of valid addresses. ``ttl`` or ``maxsize`` of 0 disables it."""

    def __init__(self, *, ttl: float, maxsize: int) -> None:
        self._enabled = ttl > 0 and maxsize > 0
        self._entries: TTLCache[str, bool] = TTLCache(
            maxsize=max(maxsize, 1), ttl=max(ttl, 1e-9), timer=time.monotonic
        )
        self._lock = threading.Lock()

    def __contains__(self, address: object) -> bool:
        if not self._enabled:
            return False
        with self._lock:
            return address in self._entries

    def add(self, address: str) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._entries[address] = True

    def __len__(self) -> int:
        with self._lock:
            self._entries.expire()
            return len(self._entries)
