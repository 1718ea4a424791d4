"""What the engine and the decision core need of a cache of valid addresses. Declared
here, below both of them, so that the caches (``caching``, which probes through the
engine for refreshes and catch-all checks) can sit above the engine and still be
handed to it.
"""

from __future__ import annotations

from typing import Protocol


class ValidCache(Protocol):
    """Valid addresses as the decision core and the engine see them: the local TTL cache
    here, a shared one later; neither cares which."""

    def __contains__(self, address: object) -> bool: ...

    def add(self, address: str) -> None: ...

    def remaining(self, address: str) -> float | None:
        """Seconds ``address`` is still trusted; None when it is not cached."""

    def discard(self, address: str) -> bool:
        """Forget ``address``; True when it was cached."""
