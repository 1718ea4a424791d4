"""The shared cache: positive answers shared by every backup MX of a site through Redis
(``CALLAHEAD_REDIS_URL``), and probes coalesced across them.

Each backup keeps its own local ``PositiveCache`` in front, with a short TTL
(``CALLAHEAD_REDIS_LOCAL_TTL``, at most ``CALLAHEAD_CACHE_TTL``): a hit there costs no
network round trip. A local miss goes to the probe engine, which hands it to
``SharedGate.probe`` on the probe loop:

1. One Redis round trip (the ``CLAIM`` script) looks the address up and, when it is not
   there, takes the address's lock (``SET NX PX``) in the same step. Found: the answer is
   valid (reason ``shared_cache_hit``), with no probe; the entry goes into the local
   cache for its remaining time, at most the local TTL.
2. Locked by another backup: its probe is waited for (polling, backing off from 10 to
   100 ms) up to ``CALLAHEAD_REDIS_LOCK_WAIT`` seconds (``CALLAHEAD_REDIS_TIMEOUT`` for
   a minute after a long wait on a lock that ran out, or went without the valid answer
   this backup's probe then found: untrusted.LockTrust). If it finds the address valid,
   that is the answer; if the lock goes without a valid entry (the address was unknown
   or undecided there, which is never stored) or the wait runs out, this backup probes
   itself.
3. After its own probe, a valid answer is written with the full ``CALLAHEAD_CACHE_TTL``
   (``SET ... PX``) and the lock released (the ``PUBLISH_VALID`` script), in the
   background: the recipient is not kept waiting for it. Unknown and undecided answers
   are never written; the lock is just released.

Redis is never in the way: every call is bounded by ``CALLAHEAD_REDIS_TIMEOUT``; any
error, refusal or timeout counts toward a breaker (``breaker.py``): after
``BREAKER_FAILURES`` in a row Redis is left alone for ``BREAKER_COOLDOWN`` seconds
(then one trial call), so an outage does not cost a timeout per recipient. Whenever
Redis cannot answer, the gate does exactly what callahead does without it: probe.
One log line when Redis goes, one when it comes back.

Keys (no address can collide with another key, or reach outside the namespace: both
parts are SHA-256 digests in hex):

* ``callahead:v1:valid:<sha256(domain)>:<sha256(address)>``: a valid address, with the
  TTL it has left. The domain's digest comes first so that ``cache flush @DOMAIN`` can
  find a domain's keys with ``SCAN MATCH`` (no per-domain index to keep in step; the cost
  is a SCAN of the key space, for an operator's command).
* ``callahead:v1:control:<sha256(domain)>``: the address of that domain verified valid
  most recently (in plain text), with the same TTL: the control address a probe session
  of any backup asks when the primary rejects a recipient (session.py), so that a domain
  without postmaster@ has a control on a backup that has verified none of its users.
  Flushes remove it with the address or the domain.
* ``callahead:v1:lock:<sha256(address)>``: the probe of that address in flight, with a
  random token, expiring by itself after the probe timeout plus a second if its holder
  dies.
* channel ``callahead:v1:flush``: ``cache flush`` on any backup publishes what it
  removed, and every backup drops it from its local cache. A backup whose subscription
  was lost clears its local cache when it subscribes again (it may have missed a flush).

What is read from Redis is checked, and what a forged value can cost is bounded (a
forged entry is believed for one ``CALLAHEAD_CACHE_TTL`` at most, a flush drops local
copies only, at a bounded rate): untrusted.py.

Refresh ahead, with Redis: a lookup that finds an entry in the last
``CALLAHEAD_CACHE_REFRESH`` share of its TTL takes the lock in the same round trip; the
backup that gets it verifies the address again in the background on a free probe slot
(valid: written for a new TTL; unknown: removed everywhere; undecided: left to expire).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

from ..base.logfmt import escape
from ..routing.routes import Nexthop
from ..smtp.verdict import Basis, ProbeResult, Stage, Verdict
from .cache import PositiveCache
from .redisstore import (
    CONTROL_PREFIX,
    LOCK_MARGIN,
    POLL_FIRST,
    POLL_MAX,
    RESUBSCRIBE_AFTER,
    VALID_PREFIX,
    RedisStore,
    SharedObserver,
    SharedUnavailable,
    _Unobserved,
    control_key,
    domain_pattern,
)
from .untrusted import FlushBudget, LockTrust, parse_flush, shown

log = logging.getLogger("callahead.sharedcache")


def _shared_hit(hops: tuple[Nexthop, ...], left: float, started: float) -> ProbeResult:
    return ProbeResult.no_reply(
        Verdict.VALID,
        Stage.RCPT,
        f"valid: in the shared cache, {left:.0f} s left",
        started,
        str(hops[0]) if hops else "",
        basis=Basis.SHARED,
        why="a backup MX of this site found it valid (shared through Redis)",
    )


class SharedGate:
    """The engine's ``ClusterGate``: Redis in front of every probe (see the module's
    docstring). Runs on the probe loop."""

    def __init__(
        self,
        store: RedisStore,
        local: PositiveCache,
        *,
        ttl: float,
        lock_wait: float,
        probe_timeout: float,
        refresh_within: float = 0.0,
        refresh_limit: int = 1,
        free_slot: Callable[[], bool] = lambda: True,
        observer: SharedObserver | None = None,
    ) -> None:
        """``ttl``: seconds a valid answer is kept in Redis (``CALLAHEAD_CACHE_TTL``);
        ``refresh_within``: an entry found with less than this left is verified again
        in the background (0: never) when ``free_slot()`` says a probe slot is free."""
        self.store = store
        self.local = local
        self._ttl_ms = max(1, int(ttl * 1000))
        self._lock_trust = LockTrust(lock_wait, store.timeout)
        self._lock_ms = int((probe_timeout + LOCK_MARGIN) * 1000)
        self._refresh_ms = int(refresh_within * 1000)
        self._refresh_limit = refresh_limit
        self._free_slot = free_slot
        self._observer: SharedObserver = observer if observer is not None else _Unobserved()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refreshing: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        self._flushes = FlushBudget()

    @property
    def enabled(self) -> bool:
        return self._ttl_ms > 0 and self.local.enabled

    @property
    def longest_delay(self) -> float:
        """The longest the gate can add to a probe request: a lookup, the wait for
        another backup's probe with its polls, and a second lookup."""
        return self._lock_trust.full + 3 * self.store.timeout

    # -- the probe path ---------------------------------------------------------------

    async def probe(
        self,
        address: str,
        hops: tuple[Nexthop, ...],
        recheck: bool,
        run: Callable[[], Awaitable[ProbeResult]],
    ) -> ProbeResult:
        """The answer for ``address``: from Redis, from another backup's probe, or from
        ``run()`` (this backup's probe), never worse than ``run()`` alone."""
        if recheck:  # a refresh this backup decided on: probe, then share a valid answer
            result = await run()
            self._after(address, result, "")
            return result
        started = time.monotonic()
        token = secrets.token_hex(16)
        released: float | None = None  # seconds waited on a lock gone with no answer
        try:
            left, holding = await self.store.claim(
                address, token, self._lock_ms, self._refresh_ms, self._ttl_ms
            )
            if left > 0:
                self._observer.redis_lookup(True)
                if holding:
                    self._refresh(address, hops, token, run)
                return self._hit(address, hops, left, started)
            self._observer.redis_lookup(False)
            if not holding:
                left, released = await self._wait(address)
                if left > 0:
                    return self._hit(address, hops, left, started)
                # Its probe did not find it valid, or took too long: ours, under the
                # lock if it is free now, so that a third backup waits for us.
                left, holding = await self.store.claim(
                    address, token, self._lock_ms, 0, self._ttl_ms
                )
                if left > 0:
                    return self._hit(address, hops, left, started)
        except SharedUnavailable:
            # As without Redis: probe, and share nothing (it would most likely fail too).
            return await run()
        try:
            result = await run()
        except BaseException:
            if holding:
                self._background(self.store.release(address, token))
            raise
        if released is not None:
            self._lock_trust.probed_after_release(result.verdict is Verdict.VALID, released)
        self._after(address, result, token if holding else "")
        return result

    def _hit(
        self, address: str, hops: tuple[Nexthop, ...], left_ms: int, started: float
    ) -> ProbeResult:
        left = left_ms / 1000
        # For what it has left in Redis, at most the local TTL (restore caps it).
        self.local.restore([(address, left)])
        return _shared_hit(hops, left, started)

    async def _wait(self, address: str) -> tuple[int, float | None]:
        """Wait for another backup's probe of ``address``: ms left of the valid entry it
        wrote, or 0 (none); the seconds waited if the lock went without one, else None."""
        started = time.monotonic()
        deadline = started + self._lock_trust.limit()
        interval = POLL_FIRST
        while True:
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, POLL_MAX)
            try:
                left, locked = await self.store.poll(address, self._lock_ms, self._ttl_ms)
            except SharedUnavailable:
                return self._waited("error", started, 0), None
            if left > 0:
                return self._waited("shared", started, left), None
            if not locked:
                self._waited("released", started, 0)
                return 0, time.monotonic() - started
            if time.monotonic() >= deadline:
                return self._waited("timeout", started, 0), None

    def _waited(self, outcome: str, started: float, left: int) -> int:
        self._observer.redis_lock_wait(outcome)
        self._lock_trust.ended(outcome, time.monotonic() - started)
        return left

    def _after(self, address: str, result: ProbeResult, token: str) -> None:
        """Share a valid answer, release the lock; in the background."""
        if result.verdict is Verdict.VALID:
            self._background(self.store.store_valid(address, self._ttl_ms, token))
        elif token:
            self._background(self.store.release(address, token))

    def _refresh(
        self,
        address: str,
        hops: tuple[Nexthop, ...],
        token: str,
        run: Callable[[], Awaitable[ProbeResult]],
    ) -> None:
        """This backup took the lock to verify ``address`` again: do it in the
        background on a free probe slot, or give the lock back."""
        if (
            address in self._refreshing
            or len(self._refreshing) >= self._refresh_limit
            or not self._free_slot()
        ):
            self._observer.refreshed("skipped")
            self._background(self.store.release(address, token))
            return
        self._refreshing.add(address)

        async def refresh() -> None:
            try:
                result = await run()
            except BaseException:
                await self.store.release(address, token)
                raise
            finally:
                self._refreshing.discard(address)
            self._observer.refreshed(result.verdict.value)
            if result.verdict is Verdict.UNKNOWN:
                log.info(
                    "refresh: rcpt=<%s> is no longer known to %s (%s): removed from the "
                    "shared cache",
                    escape(address),
                    result.primary,
                    escape(result.detail, spaces=True),
                )
                self.local.discard(address)
                await self.store.release(address, token)
                await self.store.forget(address)
            else:
                self._after(address, result, token)

        self._background(refresh())

    def _background(self, work: Awaitable[object]) -> None:
        async def quietly() -> None:
            with contextlib.suppress(SharedUnavailable):
                await work

        task = asyncio.get_running_loop().create_task(quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- flushes ----------------------------------------------------------------------

    def start(self) -> None:
        """On the loop: follow the flushes of every backup (the flush channel)."""
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._follow_flushes())

    async def _follow_flushes(self) -> None:
        lost = False
        while True:
            try:
                pubsub = await self.store.invalidations()
            except Exception:  # noqa: BLE001 -- Redis down: the breaker logs it; try later
                lost = True
                await asyncio.sleep(RESUBSCRIBE_AFTER)
                continue
            if lost:
                # Flushes may have been missed meanwhile: trust Redis again, not the
                # local copies.
                self.local.clear()
                lost = False
            try:
                async for message in pubsub.listen():
                    self.apply_flush(message.get("data"))
            except Exception:  # noqa: BLE001 -- the connection went: subscribe again
                lost = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 5.x
            await asyncio.sleep(RESUBSCRIBE_AFTER)

    def apply_flush(self, data: object) -> int:
        """Drop from the local cache what another backup's flush names (past the rate
        that ``FlushBudget`` allows: everything, once per message)."""
        if not self._flushes.take():
            self.store.distrust.invalid(
                "flush", "flush messages come too fast: the local cache is cleared instead"
            )
            return self.local.clear()
        flush = parse_flush(data)
        if flush is None:
            self.store.distrust.invalid(
                "flush",
                'a flush message that callahead does not send: "%s": ignored',
                shown(data) if isinstance(data, bytes | str) else type(data).__name__,
            )
            return 0
        what, name = flush
        if what == "all":
            return self.local.clear()
        if what == "domain":
            return self.local.discard_domain(name)
        return int(self.local.discard(name))

    async def flush_address(self, address: str) -> int | None:
        """Remove ``address`` everywhere; keys removed from Redis, None if Redis did not
        answer (then only this backup's local copy went)."""
        self.local.discard(address)
        try:
            return await self.store.forget(address)
        except SharedUnavailable:
            return None

    async def flush_domain(self, domain: str) -> int | None:
        self.local.discard_domain(domain)
        try:
            await self.store.call("flush", lambda: self.store.client.delete(control_key(domain)))
            return await self.store.forget_matching(domain_pattern(domain), {"domain": domain})
        except SharedUnavailable:
            return None

    async def flush_all(self) -> int | None:
        self.local.clear()
        try:
            await self.store.forget_matching(CONTROL_PREFIX + "*", {})
            return await self.store.forget_matching(VALID_PREFIX + "*", {"all": True})
        except SharedUnavailable:
            return None

    async def recent_valid(self, domain: str) -> str | None:
        """A control address of ``domain`` from Redis; None when there is none or Redis
        does not answer."""
        try:
            return await self.store.control(domain)
        except SharedUnavailable:
            return None

    async def remaining(self, address: str) -> float | None:
        """Seconds ``address`` has left in Redis; raises ``SharedUnavailable``."""
        return await self.store.remaining(address, self._ttl_ms)

    async def aclose(self) -> None:
        """Stop following flushes, let the background writes finish (bounded by the
        Redis timeout), close the connections."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        pending: Iterable[asyncio.Task[None]] = list(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=self.store.timeout * 3)
            for task in pending:
                task.cancel()
        await self.store.aclose()
