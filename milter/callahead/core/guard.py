"""The dictionary-attack guard: unknown recipients counted per client.

A client that has sent ``limit`` unknown recipients within the last ``window`` seconds
gets a 4xx for every further recipient that is not in the positive cache, without a
probe, so an attack cannot turn the backup into a probe cannon against the primary.
Valid cached recipients still pass.

Clients are counted by address, an IPv6 client by its network (``ipv6_prefix`` bits,
/64 by default: one host often holds a whole /64 and could rotate through it). Each
tracked client costs one dict entry and an array of at most ``limit`` timestamps. At
``max_clients`` the least recently active client that is *not* blocked makes room: a
flood of new clients cannot evict a blocked one and so unblock it.
"""

from __future__ import annotations

import bisect
import ipaddress
import threading
import time
from array import array
from collections.abc import Callable

MAX_TRACKED_CLIENTS = 100_000
EVICTION_SCAN = 64
"""Entries looked at, least recently active first, for one that is not blocked."""


def client_key(client: str, ipv6_prefix: int = 64) -> str:
    """What the guard counts a client as: an IPv4 address as it is, an IPv6 address as
    its ``/ipv6_prefix`` network (an IPv4-mapped one as its IPv4 address)."""
    if ":" not in client:
        return client
    text = client[5:] if client[:5].lower() == "ipv6:" else client
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return client
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    network = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
    return str(network)


class ClientGuard:
    """Thread-safe. ``limit`` or ``window`` of 0 disables it."""

    def __init__(
        self,
        *,
        limit: int,
        window: float,
        ipv6_prefix: int = 64,
        max_clients: int = MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window
        self._prefix = ipv6_prefix
        self._max_clients = max_clients
        self._clock = clock
        self.enabled = limit > 0 and window > 0
        self._clients: dict[str, array[float]] = {}
        """Client -> its unknowns' times, oldest first; least recently active first."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    def _count(self, times: array[float], now: float) -> int:
        return len(times) - bisect.bisect_right(times, now - self._window)

    def blocked(self, client: str | None) -> bool:
        if not self.enabled or not client:
            return False
        key = client_key(client, self._prefix)
        with self._lock:
            times = self._clients.get(key)
            return times is not None and self._count(times, self._clock()) >= self._limit

    def record_unknown(self, client: str | None) -> None:
        if not self.enabled or not client:
            return
        key = client_key(client, self._prefix)
        now = self._clock()
        with self._lock:
            self._expire(now)
            times = self._clients.pop(key, None)
            if times is None:
                if len(self._clients) >= self._max_clients and not self._make_room(now):
                    return  # every candidate is blocked: keep them, skip the newcomer
                times = array("d")
            del times[: bisect.bisect_right(times, now - self._window)]
            times.append(now)
            if len(times) > self._limit:
                del times[0]
            self._clients[key] = times  # re-inserted: now the most recently active

    def _expire(self, now: float) -> None:
        """Drop clients whose newest unknown has left the window (oldest first)."""
        horizon = now - self._window
        clients = self._clients
        while clients:
            key = next(iter(clients))
            if clients[key][-1] > horizon:
                return
            del clients[key]

    def _make_room(self, now: float) -> bool:
        for checked, (key, times) in enumerate(self._clients.items()):
            if checked >= EVICTION_SCAN:
                return False
            if self._count(times, now) < self._limit:
                del self._clients[key]
                return True
        return False
