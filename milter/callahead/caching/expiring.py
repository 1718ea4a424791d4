"""A bounded map of keys to their expiry, lean enough for a million addresses.

The positive cache holds up to ``CALLAHEAD_CACHE_SIZE`` addresses, each with its own
expiry. cachetools' ``TLRUCache`` kept, per entry, three dicts' slots (its data, its
sizes, an ``OrderedDict`` of items), an item object and a heap slot: about 250 bytes
beside the address itself (bench/RESULTS-coldpath.md). Here an entry is one dict slot
(the key to its expiry, a float) and two slots of two deques (the key, and that same
float object) that keep the entries in the order they expire:

* **In order**: an entry put with at least as much time left as the newest one (every
  address verified here: one TTL for all) goes at the back of the deques.
* **Out of order**: one put with less (an address restored from the shared cache with
  the time Redis has left for it) goes into a small heap instead, ordered by expiry.
* **Expiry** drops the front of the deques and the top of the heap while they have
  expired, so every expired entry goes at once and ``len`` is exact. A slot whose
  float is no longer the dict's value for its key (added again since, or discarded) is
  stale: it is dropped when it comes to the front, and counts for nothing.
* **When full**, the live entry nearest its expiry goes (the sooner of the deques'
  front and the heap's top): with one TTL for all, the one verified longest ago.
  Looking an entry up does not keep it (``TLRUCache`` evicted the least recently looked
  up): an address in use is verified again before it expires
  (``CALLAHEAD_REFRESH_WITHIN``), which puts it at the back.
* **Bounded**: when stale slots outnumber the live entries by ``COMPACT_SLACK``, the
  deques and the heap are filtered (O(n), under the caller's lock: after a flush of a
  large domain, say, not in the course of probing).

Not thread-safe: the caller locks.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator

COMPACT_SLACK = 1024
"""Stale slots tolerated beyond as many as the live entries before they are filtered."""


class ExpiringMap:
    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        self._maxsize = max(1, maxsize)
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._keys: deque[str] = deque()
        self._times: deque[float] = deque()
        """Parallel to ``_keys``: the float object each was put with, in order."""
        self._late: list[tuple[float, str]] = []
        """A heap of the entries put out of order: (that float object, key)."""

    def __len__(self) -> int:
        """The entries held that have not expired."""
        self.expire()
        return len(self._expiry)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._expiry))

    def get(self, key: str) -> float | None:
        """The expiry of ``key``; None when absent or expired."""
        expires = self._expiry.get(key)
        if expires is None or not self._clock() < expires:
            return None
        return expires

    def items(self) -> list[tuple[str, float]]:
        """Every entry not yet expired, with its expiry."""
        now = self._clock()
        return [(key, expires) for key, expires in self._expiry.items() if now < expires]

    def put(self, key: str, expires: float) -> None:
        """Keep ``key`` until ``expires`` (on the clock); an entry already expired is
        removed instead. The entry nearest its expiry goes when more than ``maxsize``
        are held."""
        now = self._clock()
        self.expire(now)
        if not now < expires:
            self._expiry.pop(key, None)
            return
        self._expiry[key] = expires
        if self._times and expires < self._times[-1]:
            heapq.heappush(self._late, (expires, key))
        else:
            self._keys.append(key)
            self._times.append(expires)
        while len(self._expiry) > self._maxsize:
            self._evict()
        if len(self._keys) + len(self._late) > 2 * len(self._expiry) + COMPACT_SLACK:
            self._compact()

    def pop(self, key: str) -> bool:
        """Remove ``key``; whether it was there and not expired."""
        expires = self._expiry.pop(key, None)
        return expires is not None and self._clock() < expires

    def clear(self) -> None:
        self._expiry.clear()
        self._keys.clear()
        self._times.clear()
        self._late.clear()

    def expire(self, now: float | None = None) -> None:
        """Drop every entry that has expired, and the stale slots in front of them."""
        if now is None:
            now = self._clock()
        times, keys, late, expiry = self._times, self._keys, self._late, self._expiry
        while times:
            key, expires = keys[0], times[0]
            live = expiry.get(key) is expires
            if live and now < expires:
                break
            keys.popleft()
            times.popleft()
            if live:
                del expiry[key]
        while late:
            expires, key = late[0]
            live = expiry.get(key) is expires
            if live and now < expires:
                break
            heapq.heappop(late)
            if live:
                del expiry[key]

    def _evict(self) -> None:
        """Remove the live entry nearest its expiry (stale slots in front go first)."""
        times, keys, late, expiry = self._times, self._keys, self._late, self._expiry
        while times and expiry.get(keys[0]) is not times[0]:
            keys.popleft()
            times.popleft()
        while late and expiry.get(late[0][1]) is not late[0][0]:
            heapq.heappop(late)
        if late and (not times or late[0][0] < times[0]):
            del expiry[heapq.heappop(late)[1]]
        elif times:
            times.popleft()
            del expiry[keys.popleft()]

    def _compact(self) -> None:
        """Only the live slots kept, in their order (O(n), no sort)."""
        expiry = self._expiry
        pairs = [(k, t) for k, t in zip(self._keys, self._times, strict=True) if expiry.get(k) is t]
        self._keys = deque(key for key, _ in pairs)
        self._times = deque(expires for _, expires in pairs)
        self._late = [(t, k) for t, k in self._late if expiry.get(k) is t]
        heapq.heapify(self._late)
