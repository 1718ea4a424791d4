"""The probe budget of one primary (``CALLAHEAD_PRIMARY_RATE``): a token bucket.

A flood of new addresses spread over many clients must not turn the backup MXes into a
probe cannon against their primary (or get them listed by it). Each probe of an address
at a primary takes a token; tokens come back at ``rate`` per second, up to ``burst``
(a second's worth, at least one). So in any stretch of ``t`` seconds a primary gets at
most ``burst + rate * t`` probes from this callahead.

Tokens are *reserved*: a caller that finds the bucket empty is told when its token will
be there and owns it from then on, so waiters are served in the order they came, and a
caller whose token would come later than it may wait is refused at once (it would be
refused anyway after the wait, and meanwhile it would hold a probe slot and a Postfix
smtpd process for nothing). A reservation given up (a cancelled probe) is refunded.

``SiteBudget`` is the same budget over every backup of a site
(``CALLAHEAD_SITE_PRIMARY_RATE``), which the engine asks after the local one; the
caching layer keeps it in Redis (caching/sitebudget.py).

Lives on the probe event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


def burst_for(rate: float) -> float:
    """The bucket's size for ``rate`` probes per second: a second's worth, at least one."""
    return max(1.0, rate)


class TokenBucket:
    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, not {rate!r}")
        self.rate = rate
        self.burst = burst_for(rate) if burst is None else burst
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    @property
    def tokens(self) -> float:
        """Tokens now; below 0 while reservations wait for theirs."""
        self._refill()
        return self._tokens

    def reserve(self, max_wait: float) -> float | None:
        """Take a token: the seconds until it is there (0: now), or None (nothing taken)
        when it would come later than ``max_wait`` seconds from now."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        wait = (1 - self._tokens) / self.rate
        if wait > max_wait:
            return None
        self._tokens -= 1
        return wait

    def refund(self) -> None:
        """Give back a token reserved but not used."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + 1)

    async def take(self, max_wait: float) -> bool:
        """Take a token, waiting for it at most ``max_wait`` seconds; False (at once, with
        nothing taken) when it would come later."""
        wait = self.reserve(max_wait)
        if wait is None:
            return False
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except BaseException:
                self.refund()
                raise
        return True


class SiteBudget(Protocol):
    """The probe budget of a primary over every backup MX of a site
    (``CALLAHEAD_SITE_PRIMARY_RATE``, kept in the shared Redis: caching/sitebudget.py),
    asked after this callahead's own ``TokenBucket``, which stays the floor."""

    rate: float

    async def take(self, primary: str, max_wait: float) -> bool:
        """Take a token of ``primary``'s site budget, waiting for it at most
        ``max_wait`` seconds (0: only one there now); False (at once, nothing taken)
        when it would come later. True, too, when the site budget cannot be asked
        (Redis down, slow or lying): never a refusal because of it. A wait cancelled
        gives its token back."""
        ...
