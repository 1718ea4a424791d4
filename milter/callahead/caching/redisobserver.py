"""What the shared cache reports as it goes (metrics.Metrics is the real observer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class SharedObserver(Protocol):
    """What the shared cache reports (metrics.Metrics is the real one)."""

    def watch_redis(self, breaker_open: Callable[[], bool]) -> None: ...

    def redis_round_trip(self, ok: bool) -> None:
        """One Redis command or script ran (``ok``) or failed."""

    def redis_lookup(self, hit: bool) -> None:
        """A local miss was looked up in Redis: found valid there, or not."""

    def redis_lock_wait(self, outcome: str) -> None:
        """A wait for another backup's probe ended: ``shared`` (it found the address
        valid), ``released`` (it did not), ``timeout`` or ``error``."""

    def refreshed(self, outcome: str) -> None: ...

    def redis_invalid(self, kind: str) -> None:
        """A value read from Redis was invalid and ignored (untrusted.INVALID_KINDS)."""


class _Unobserved:
    def watch_redis(self, breaker_open: Callable[[], bool]) -> None:
        pass

    def redis_round_trip(self, ok: bool) -> None:
        pass

    def redis_lookup(self, hit: bool) -> None:
        pass

    def redis_lock_wait(self, outcome: str) -> None:
        pass

    def refreshed(self, outcome: str) -> None:
        pass

    def redis_invalid(self, kind: str) -> None:
        pass
