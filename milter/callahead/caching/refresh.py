"""Refresh ahead: a cached address asked for near the end of its TTL is verified again
in the background, so that hot addresses never wait for a probe and users deleted on the
primary drop out of the cache.

The recipient that asks is answered from the cache at once; the probe runs on the probe
loop without anyone waiting for it. It is bounded: at most ``limit`` refreshes at once
(a small share of ``CALLAHEAD_MAX_PROBES``), and a refresh starts only on a probe slot
that is free at that moment, so it never makes a recipient wait for a slot; it takes a
token of the primary's budget (``CALLAHEAD_PRIMARY_RATE``) only if one is there, and is
skipped otherwise.

What a refresh finds: valid keeps the address for a new TTL (the engine adds it to the
cache), unknown forgets it (the next recipient is probed and refused), undecided leaves
the entry to expire as it would have.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from ..base.logfmt import escape
from ..probing.engine import ProbeEngine
from ..probing.loop import ProbeLoop
from ..probing.validcache import ValidCache
from ..routing.routes import Nexthop
from ..smtp.verdict import ProbeResult, Skip, Verdict

log = logging.getLogger("callahead.refresh")

REFRESH_SHARE = 0.1
"""The share of ``CALLAHEAD_MAX_PROBES`` that refreshes may take at most."""

SKIPPED = "skipped"


def refresh_limit(max_probes: int) -> int:
    return max(1, int(max_probes * REFRESH_SHARE))


class LoopRefresher:
    """The policy's ``Refresher``: runs refreshes on the probe loop. Thread-safe."""

    def __init__(
        self,
        loop: ProbeLoop,
        engine: ProbeEngine,
        cache: ValidCache,
        *,
        limit: int,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._loop = loop
        self._engine = engine
        self._cache = cache
        self._limit = limit
        self._on_outcome = on_outcome
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def refresh(self, address: str, hops: Sequence[Nexthop]) -> None:
        """Refresh ``address`` unless it already is being refreshed or the limit is
        reached (then it is asked again by a later recipient, if any)."""
        with self._lock:
            if address in self._pending:
                return
            if len(self._pending) >= self._limit or not self._loop.healthy:
                skip = True
            else:
                skip = False
                self._pending.add(address)
        if skip:
            self._on_outcome(SKIPPED)
            return
        self._loop.call_soon(self._start, address, tuple(hops))

    def _start(self, address: str, hops: tuple[Nexthop, ...]) -> None:
        """On the loop: start the probe if a slot is free right now."""
        if not self._engine.has_free_slot:
            self._done(address)
            self._on_outcome(SKIPPED)
            return
        task = asyncio.get_running_loop().create_task(self._run(address, hops))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, address: str, hops: tuple[Nexthop, ...]) -> None:
        try:
            result = await self._engine.probe(address, hops, recheck=True, background=True)
        finally:
            self._done(address)
        self._apply(address, result)

    def _apply(self, address: str, result: ProbeResult) -> None:
        if result.verdict is Verdict.UNKNOWN:
            self._cache.discard(address)
            log.info(
                "refresh: rcpt=<%s> is no longer known to %s (%s): removed from the cache",
                escape(address),
                result.primary,
                escape(result.detail, spaces=True),
            )
        self._on_outcome(SKIPPED if result.skipped is Skip.PRIMARY_BUDGET else result.verdict.value)

    async def aclose(self) -> None:
        """Cancel the refreshes in flight (at shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, address: str) -> None:
        with self._lock:
            self._pending.discard(address)
