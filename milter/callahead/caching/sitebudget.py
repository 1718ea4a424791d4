"""The probe budget of a primary over every backup MX of a site
(``CALLAHEAD_SITE_PRIMARY_RATE``), kept in the Redis the backups share.

With N backups each allowed R probes per second (``CALLAHEAD_PRIMARY_RATE``), a primary
can get N * R; a dictionary attack spread over every MX of a domain gets just that. The
site budget is one token bucket per primary for all of them, asked after the local one
(probing/budget.py's ``SiteBudget``).

**A token bucket in one Lua script, not an INCR/PEXPIRE window.** A fixed window of one
second lets 2R probes through across its edge (R at the end of one window, R at the
start of the next), and a waiter cannot be told when its turn comes; the bucket gives
the bound the local budget gives, at most ``burst + rate * t`` probes in any ``t``
seconds, and reserves tokens, so a probe that finds none is told how long until its own
and owns it from then on: waiters over every backup are served in order, and one whose
token would come later than it may wait is refused at once, nothing taken. The bucket is
kept as GCRA keeps it: one number, the time at which it would be full again (in µs of
Redis's own ``TIME``, so the backups' clocks do not matter), under
``callahead:v1:budget:<sha256(primary)>``, with an expiry at that time (a full bucket and
no key are the same: an idle primary leaves nothing behind). One round trip per token
(``EVALSHA``; redis-py loads the script again after a Redis restart).

**Never a reject because of Redis.** Redis down, slow (past ``CALLAHEAD_REDIS_TIMEOUT``),
its breaker open, or an answer of the wrong shape: the site budget is skipped (outcome
``unavailable``, one warning line per outage) and the local ``CALLAHEAD_PRIMARY_RATE``
stays the floor. What is read in Redis is checked (untrusted.py): a value that is not a
time is replaced, and one further ahead than a full burst plus ``CALLAHEAD_PROBE_WAIT``
(forged, or a backup with a longer wait) is cut to that, so a forged value costs at most
that long of over-budget answers (the tempfail action, never a reject).

A wait cancelled (the recipient's client went away, shutdown) gives its token back in
the background: one more round trip, not awaited. Not given back: a token whose round
trip was cancelled in flight (whether the script ran is unknown: refunding one never
taken would let a probe over the budget), and one taken and then not used for another
reason (it was reserved for that moment, and by then it is spent). Both err on the
primary's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..base.logfmt import escape
from ..probing.budget import burst_for
from .redisstore import PREFIX, RedisStore, SharedUnavailable

log = logging.getLogger("callahead.sitebudget")

BUDGET_PREFIX = PREFIX + "budget:"
OUTCOMES = ("granted", "waited", "refused", "unavailable")
"""``callahead_site_budget_total{outcome}``: a token there, a token waited for, none in
time (the tempfail action), the site budget skipped (Redis)."""
WARN_EVERY = 60.0
"""Seconds between two warnings that the site budget cannot be used, at least."""

_REFUSED = -1
# KEYS[1]: the bucket, the µs (Redis TIME) at which it is full again. ARGV: a token's
# interval, the burst's span, the longest wait and the cap of how far ahead the bucket
# may be (all µs). Returns {µs until the token taken (-1: refused, nothing taken),
# problem (0; 1: not a time, replaced; 2: too far ahead, cut to the cap)}.
_EFFECTS = """
-- Redis 3.2 to 4 replicate a script verbatim, which a write after TIME forbids; 5 and
-- later replicate its effects (this is then a no-op).
if redis.replicate_commands then redis.replicate_commands() end
"""
TAKE = (
    _EFFECTS
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval, span = tonumber(ARGV[1]), tonumber(ARGV[2])
local longest, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local full, problem = now, 0
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' then
  local value = nil
  if kind == 'string' then value = tonumber(redis.call('GET', KEYS[1])) end
  if value == nil or value ~= value then
    problem = 1
    redis.call('DEL', KEYS[1])
  elseif value > now + cap then
    problem = 2
    full = now + cap
  elseif value > now then
    full = value
  end
end
local after = full + interval
local wait = after - span - now
if wait > longest then
  if problem == 2 then
    redis.call('SET', KEYS[1], string.format('%.0f', full), 'PX', math.ceil(cap / 1000))
  end
  return {-1, problem}
end
if wait < 0 then wait = 0 end
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', math.ceil((after - now) / 1000))
return {math.floor(wait), problem}
"""
)
# Give one token back to KEYS[1] (ARGV[1]: its interval, µs): 1 if there was a bucket.
REFUND = (
    _EFFECTS
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then return 0 end
local value = tonumber(redis.call('GET', KEYS[1]))
if value == nil or value ~= value then return 0 end
local full = value - tonumber(ARGV[1])
if full <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', full), 'PX', math.ceil((full - now) / 1000))
end
return 1
"""
)


def budget_key(primary: str) -> str:
    """The key of ``primary``'s site budget (a primary's name, as the engine names it)."""
    return BUDGET_PREFIX + hashlib.sha256(primary.encode("utf-8", "surrogateescape")).hexdigest()


class SiteBudgetObserver(Protocol):
    def site_budget(self, outcome: str) -> None:
        """One ask of the site budget ended with ``outcome`` (``OUTCOMES``)."""


class _Unobserved:
    def site_budget(self, outcome: str) -> None:
        pass


def parse_answer(answer: object, longest_us: int) -> tuple[int, int] | None:
    """(µs to wait, or -1: refused; the problem found) from the script's answer, or None
    when it is not one the script gives (whatever answered was not that script)."""
    if not isinstance(answer, list | tuple) or len(answer) != 2:
        return None
    wait, problem = answer
    if type(wait) is not int or type(problem) is not int or problem not in (0, 1, 2):
        return None
    if wait != _REFUSED and not 0 <= wait <= longest_us:
        return None
    return wait, problem


class RedisSiteBudget:
    """``probing.budget.SiteBudget`` in Redis. Lives on the probe loop, as its store."""

    def __init__(
        self,
        store: RedisStore,
        rate: float,
        *,
        longest_wait: float,
        observer: SiteBudgetObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate``: probes per second per primary over every backup; ``longest_wait``:
        the longest a probe waits for a token here (``CALLAHEAD_PROBE_WAIT``)."""
        if rate <= 0:
            raise ValueError(f"rate must be > 0, not {rate!r}")
        self.rate = rate
        self._store = store
        self._observer: SiteBudgetObserver = observer if observer is not None else _Unobserved()
        self._clock = clock
        self._interval = max(1, round(1e6 / rate))
        self._span = round(burst_for(rate) * self._interval)
        self._cap = self._span + round(longest_wait * 1e6)
        self._client: object = None
        self._take: Any = None
        self._refund: Any = None
        self._refunds: set[asyncio.Task[None]] = set()
        self._down = False
        self._warned_at = float("-inf")

    def _scripts(self) -> tuple[Any, Any]:
        """The scripts, registered with the store's client (again if it has a new one)."""
        client = self._store.client
        if self._take is None or self._refund is None or client is not self._client:
            self._client = client
            self._take = client.register_script(TAKE)
            self._refund = client.register_script(REFUND)
        return self._take, self._refund

    async def take(self, primary: str, max_wait: float) -> bool:
        key = budget_key(primary)
        longest = min(self._cap, max(0, int(max_wait * 1e6)))
        script, _ = self._scripts()
        args = [self._interval, self._span, longest, self._cap]
        try:
            answer = await self._store.call("budget", lambda: script(keys=[key], args=args))
        except SharedUnavailable as exc:
            return self._unavailable(str(exc))
        parsed = parse_answer(answer, longest)
        if parsed is None:
            return self._unavailable(f'an answer that is not the script\'s: "{answer!r:.80}"')
        wait, problem = parsed
        if problem:
            self._distrusted(primary, problem)
        if self._down:
            self._down = False
            log.info("the site probe budget is used again (redis answers)")
        if wait == _REFUSED:
            self._observer.site_budget("refused")
            return False
        if wait == 0:
            self._observer.site_budget("granted")
            return True
        try:
            await asyncio.sleep(wait / 1e6)
        except BaseException:
            self._give_back(key)
            raise
        self._observer.site_budget("waited")
        return True

    def _unavailable(self, why: str) -> bool:
        self._observer.site_budget("unavailable")
        now = self._clock()
        if not self._down and now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(
                "the site probe budget (CALLAHEAD_SITE_PRIMARY_RATE=%g) cannot be used (%s): "
                "each backup keeps to its own CALLAHEAD_PRIMARY_RATE until redis answers",
                self.rate,
                escape(why, spaces=True),
            )
        self._down = True
        return True

    def _distrusted(self, primary: str, problem: int) -> None:
        what = (
            "held no time callahead writes: replaced"
            if problem == 1
            else "was further ahead than a burst and CALLAHEAD_PROBE_WAIT: cut to that "
            "(forged, or another backup has a longer CALLAHEAD_PROBE_WAIT)"
        )
        self._store.distrust.invalid(
            "budget", "the site probe budget of primary %s %s", escape(primary), what
        )

    def _give_back(self, key: str) -> None:
        """Refund a reserved token in the background (the caller is being cancelled)."""
        _, script = self._scripts()
        args = [self._interval]

        async def refund() -> None:
            # Redis down: the token stays spent (the bucket errs on the primary's side).
            with contextlib.suppress(SharedUnavailable):
                await self._store.call("budget", lambda: script(keys=[key], args=args))

        task = asyncio.get_running_loop().create_task(refund())
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)
