"""A bounded map of keys to their expiry, lean enough for a million addresses.

The positive cache holds up to ``CALLAHEAD_CACHE_SIZE`` addresses, each with its own
expiry. cachetools' ``TLRUCache`` kept, per entry, three dicts' slots (its data, its
sizes, an ``OrderedDict`` of items), an item object and a heap slot: about 250 bytes
beside the address itself (bench/RESULTS-coldpath.md). Here an entry is one dict slot
(the key to its expiry, a float) and two slots of two deques (the key, and that same
float object) that keep the entries in the order they expire:

* **Expiry** pops the front of the deques while it has expired. An entry whose float
  is no longer the dict's value for its key (added again since, discarded) is stale and
  is dropped as it comes to the front: ``is``, not ``==``, since an entry added again
  within the clock's resolution has an equal but new float.
* **When full**, the live entry nearest its expiry goes: with one TTL for every entry
  added, that is the one verified longest ago.
* **Out of order**: an entry put with less time left than the newest one's (an address
  restored from the shared cache with its remaining TTL) waits in the deques behind
  later ones: it is never *answered* after its expiry (``get`` checks), but it is
  counted and holds its slot until the front reaches it, at most one TTL later.
* **Bounded**: when the deques hold more than twice the live entries (many added
  again or discarded within a TTL), they are rebuilt from the dict in expiry order,
  which also puts the out-of-order entries in their place.

Not thread-safe: the caller locks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

COMPACT_SLACK = 1024
"""Stale deque entries tolerated beyond as many as the live ones before a rebuild."""


class ExpiringMap:
    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        self._maxsize = max(1, maxsize)
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._keys: deque[str] = deque()
        self._times: deque[float] = deque()
        """Parallel to ``_keys``: the float object each was put with."""

    def __len__(self) -> int:
        """The entries held (expired ones at the front dropped first)."""
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
        self._keys.append(key)
        self._times.append(expires)
        while len(self._expiry) > self._maxsize:
            self._pop_front()
        if len(self._keys) > 2 * len(self._expiry) + COMPACT_SLACK:
            self._compact()

    def pop(self, key: str) -> bool:
        """Remove ``key``; whether it was there and not expired."""
        expires = self._expiry.pop(key, None)
        return expires is not None and self._clock() < expires

    def clear(self) -> None:
        self._expiry.clear()
        self._keys.clear()
        self._times.clear()

    def expire(self, now: float | None = None) -> None:
        """Drop the entries at the front that have expired or are stale."""
        if now is None:
            now = self._clock()
        times, keys, expiry = self._times, self._keys, self._expiry
        while times:
            key, expires = keys[0], times[0]
            if expiry.get(key) is expires and now < expires:
                return
            keys.popleft()
            times.popleft()
            if expiry.get(key) is expires:
                del expiry[key]

    def _compact(self) -> None:
        """The deques rebuilt from the dict, in expiry order, without stale entries."""
        order = sorted(self._expiry.items(), key=lambda entry: entry[1])
        self._keys = deque(key for key, _ in order)
        self._times = deque(expires for _, expires in order)

    def _pop_front(self) -> None:
        """Remove the front entry (live or stale)."""
        key, expires = self._keys.popleft(), self._times.popleft()
        if self._expiry.get(key) is expires:
            del self._expiry[key]
