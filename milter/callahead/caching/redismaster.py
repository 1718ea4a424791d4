"""Which Redis master the shared cache uses behind Sentinel, and since when: the sentinels
are asked every ``WATCH_EVERY`` seconds (every ``WATCH_DOWN`` s, or the Redis timeout if
shorter, while Redis is treated as down, so that sharing resumes as soon as they name a
promoted replica, not only after the breaker's cooldown). One log line when the master
changes; the status command, the metrics and ``doctor`` show it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..base.logfmt import escape
from .redisclient import host_port

log = logging.getLogger("callahead.sharedcache")

WATCH_EVERY = 1.0
"""Seconds between two questions to the sentinels while Redis answers."""
WATCH_DOWN = 0.1
"""Seconds between two questions to the sentinels while Redis is treated as down."""


@dataclass(frozen=True, slots=True)
class MasterInfo:
    """The master in use (``host:port``) and the wall-clock time it was first named or
    last changed."""

    address: str
    since: float


class MasterWatch:
    """What the sentinels last said about the master of ``service``."""

    def __init__(self, service: str, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self._clock = clock
        self.info: MasterInfo | None = None
        self.changes = 0

    def seen(self, address: tuple[str, int] | None) -> bool:
        """The sentinels name ``address`` (None: no master now, e.g. during a failover,
        or no sentinel answered); True if it differs from the master named before."""
        if address is None:
            return False
        shown = host_port(*address)
        before = self.info
        if before is not None and before.address == shown:
            return False
        self.info = MasterInfo(shown, self._clock())
        if before is None:
            log.info(
                "redis master of service %s is %s, as the sentinels say",
                escape(self.service),
                escape(shown),
            )
            return False
        self.changes += 1
        log.warning(
            "redis master of service %s changed from %s to %s, as the sentinels say "
            "(a failover): the shared cache follows it",
            escape(self.service),
            escape(before.address),
            escape(shown),
        )
        return True


async def follow_master(
    watch: MasterWatch,
    ask: Callable[[], Awaitable[tuple[str, int]]],
    changed: Callable[[], Awaitable[None]],
    *,
    timeout: float,
    every: Callable[[], float],
) -> None:
    """Ask the sentinels (``ask``, bounded by ``timeout``) every ``every()`` seconds,
    forever; ``changed()`` runs when they name a new master. No errors escape: no
    sentinel answering, or no master named, leaves the last known one in place; a new
    master that does not answer yet is tried again at the next round."""
    pending = quiet = False
    while True:
        try:
            address: tuple[str, int] | None = await asyncio.wait_for(ask(), timeout)
            quiet = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- failing over, or sentinels away: ask later
            if not quiet:  # once, not every round
                log.debug("redis sentinels name no master now: %s", escape(str(exc), spaces=True))
            quiet = True
            address = None
        if watch.seen(address) or pending:
            try:
                await asyncio.wait_for(changed(), timeout)
                pending = False
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 -- tried again at the next round
                log.debug("redis: the new master does not answer yet")
                pending = True
        await asyncio.sleep(every())
