"""The dictionary-attack guard: unknown recipients counted per client address.

A client that has sent ``limit`` unknown recipients within the last ``window`` seconds
gets a 4xx for every further recipient that is not in the positive cache, without a
probe, so an attack cannot turn the backup into a probe cannon against the primary.
Valid cached recipients still pass.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from cachetools import TTLCache

MAX_TRACKED_CLIENTS = 100_000


class ClientGuard:
    """Thread-safe. ``limit`` or ``window`` of 0 disables it."""

    def __init__(
        self, *, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self.enabled = limit > 0 and window > 0
        self._unknowns: TTLCache[str, deque[float]] = TTLCache(
            maxsize=MAX_TRACKED_CLIENTS, ttl=max(window, 1e-9), timer=clock
        )
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._unknowns.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self._window:
            times.popleft()
        return times

    def blocked(self, client: str | None) -> bool:
        if not self.enabled or not client:
            return False
        with self._lock:
            times = self._recent(client, self._clock())
            return times is not None and len(times) >= self._limit

    def record_unknown(self, client: str | None) -> None:
        if not self.enabled or not client:
            return
        now = self._clock()
        with self._lock:
            times = self._recent(client, now)
            if times is None:
                times = deque(maxlen=self._limit)
            times.append(now)
            self._unknowns[client] = times  # re-inserting renews the entry's TTL
