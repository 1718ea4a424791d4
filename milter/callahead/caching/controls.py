"""Control addresses: which addresses of a domain a probe session may ask to learn
whether the primary is judging recipients at all (session.py's evidence rules).

An address verified valid recently is the best control: the primary said it exists,
so refusing it now means the primary stopped judging (drift), or the user was removed.
They come from the local positive cache (the few addresses of each domain verified
last) and, when it has none, from Redis (the address any backup of the site verified
last). postmaster@ is the session's own last resort and is not listed here.

A catch-all check's made-up address is never a control: the primary accepted it only
because it accepted everything, and refuses it once it stops, which would read as drift.
The checks keep and share nothing (catchall.py); the filter here also covers what an
earlier version published to Redis.
"""

from __future__ import annotations

from typing import Protocol

from .cache import PositiveCache
from .catchall import is_check_address


class SharedControls(Protocol):
    """Controls shared by the site's backups (sharedcache.SharedGate)."""

    async def recent_valid(self, domain: str) -> str | None: ...


class Controls:
    """The session's ``ControlSource``: the local cache first, then Redis."""

    def __init__(self, local: PositiveCache, shared: SharedControls | None = None) -> None:
        self._local = local
        self._shared = shared

    async def controls(self, domain: str) -> tuple[str, ...]:
        found = tuple(a for a in self._local.recent(domain) if not is_check_address(a))
        if found or self._shared is None:
            return found
        shared = await self._shared.recent_valid(domain)
        return () if shared is None or is_check_address(shared) else (shared,)

    def stale(self, address: str) -> None:
        self._local.forget_recent(address)
