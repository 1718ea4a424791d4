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
   100 ms) up to ``CALLAHEAD_REDIS_LOCK_WAIT`` seconds. If it finds the address valid,
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

Refresh ahead, with Redis: a lookup that finds an entry in the last
``CALLAHEAD_CACHE_REFRESH`` share of its TTL takes the lock in the same round trip; the
backup that gets it verifies the address again in the background on a free probe slot
(valid: written for a new TTL; unknown: removed everywhere; undecided: left to expire).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..base.errors import CallaheadError
from ..base.logfmt import escape, redact_url
from ..probing.breaker import Breaker, State
from ..probing.verdict import Basis, ProbeResult, Stage, Verdict
from ..routing.routes import Nexthop
from .cache import PositiveCache

log = logging.getLogger("callahead.sharedcache")

T = TypeVar("T")

PREFIX = "callahead:v1:"
VALID_PREFIX = PREFIX + "valid:"
LOCK_PREFIX = PREFIX + "lock:"
CONTROL_PREFIX = PREFIX + "control:"
MAX_CONTROL_LENGTH = 600
"""Bytes of a control address read from Redis at most (anything longer is ignored)."""
CHANNEL = PREFIX + "flush"

BREAKER_FAILURES = 3
"""Redis errors in a row after which it is left alone for ``BREAKER_COOLDOWN``."""
BREAKER_COOLDOWN = 5.0
"""Seconds without Redis calls after it failed; then one trial call."""
LOCK_MARGIN = 1.0
"""Seconds a cluster lock outlives the probe timeout (if its holder dies)."""
POLL_FIRST = 0.01
POLL_MAX = 0.1
"""Seconds between two looks at another backup's probe: from the first, doubling."""
RESUBSCRIBE_AFTER = 1.0
"""Seconds before the flush subscription is tried again after it failed."""
ADMIN_TIMEOUT = 5.0
"""Seconds for one step (a SCAN page and its deletion) of an admin command."""
SCAN_COUNT = 1000

# Look up KEYS[1] (valid); when it is missing, or has less than ARGV[3] ms left (refresh
# ahead), take KEYS[2] (lock) with token ARGV[1] for ARGV[2] ms. Returns {ms left (-2:
# missing), 1 if the lock was taken}.
_CLAIM = """
local left = redis.call('PTTL', KEYS[1])
if left > 0 and left >= tonumber(ARGV[3]) then return {left, 0} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {left, 1} end
return {left, 0}
"""
# Another backup's probe: {ms left of KEYS[1] (valid), 1 if KEYS[2] (lock) is held}.
_POLL = """
return {redis.call('PTTL', KEYS[1]), redis.call('EXISTS', KEYS[2])}
"""
# Store KEYS[1] (valid) for ARGV[1] ms and the address ARGV[3] as its domain's control
# KEYS[3], then release KEYS[2] (lock) if it holds ARGV[2]: in this order, so that
# whoever takes the lock next finds the entry.
_PUBLISH_VALID = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[1])
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""
# Release KEYS[1] (lock) if it still holds ARGV[1] (not a later holder's).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def valid_key(address: str) -> str:
    """The key of a valid ``address`` (normalized: domain lower-case, A-labels)."""
    domain = address.rpartition("@")[2]
    return f"{VALID_PREFIX}{_digest(domain)}:{_digest(address)}"


def domain_pattern(domain: str) -> str:
    """A ``SCAN MATCH`` pattern for every valid key of ``domain`` (normalized)."""
    return f"{VALID_PREFIX}{_digest(domain)}:*"


def control_key(domain: str) -> str:
    """The key holding a recently verified address of ``domain`` (normalized)."""
    return f"{CONTROL_PREFIX}{_digest(domain)}"


def lock_key(address: str) -> str:
    return f"{LOCK_PREFIX}{_digest(address)}"


class SharedUnavailable(CallaheadError):
    """Redis did not answer (error, timeout, or the breaker is open)."""


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


class RedisStore:
    """The Redis side: every call bounded, counted, and behind a breaker. Lives on the
    probe loop (the breaker is not thread-safe)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        observer: SharedObserver | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._observer: SharedObserver = observer if observer is not None else _Unobserved()
        self._breaker = (
            breaker
            if breaker is not None
            else Breaker(failures=BREAKER_FAILURES, cooldown=BREAKER_COOLDOWN)
        )
        self._down = False
        self._client = self._connect()
        self._claim = self._client.register_script(_CLAIM)
        self._poll = self._client.register_script(_POLL)
        self._publish_valid = self._client.register_script(_PUBLISH_VALID)
        self._release = self._client.register_script(_RELEASE)
        self._observer.watch_redis(lambda: not self.up)

    def _connect(self, *, blocking: bool = False) -> aioredis.Redis:
        """A client with no retries of its own (the breaker decides) and every socket
        operation bounded; ``blocking``: for the subscription, which waits for messages
        as long as it takes."""
        return aioredis.Redis.from_url(
            self.url,
            socket_timeout=None if blocking else self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=30 if blocking else 0,
        )

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @property
    def up(self) -> bool:
        """Redis is being used (the breaker is closed)."""
        return self._breaker.state is State.CLOSED

    async def call(
        self, what: str, make: Callable[[], Awaitable[T]], *, timeout: float | None = None
    ) -> T:
        """One bounded round trip; raises ``SharedUnavailable`` instead of any error."""
        admission = self._breaker.allow()
        if admission is None:
            raise SharedUnavailable("redis is treated as down")
        try:
            # wait_for, not asyncio.timeout: redis-py 4.3 (Debian 12) cancels the task it
            # runs in a second time when a command is cancelled, and Python 3.11's timeout
            # then leaves a CancelledError (forever after, in that task) where a
            # TimeoutError was due. wait_for runs the round trip in a task of its own.
            value = await asyncio.wait_for(make(), self.timeout if timeout is None else timeout)
        except asyncio.CancelledError:
            self._breaker.release(admission)
            raise
        except Exception as exc:  # noqa: BLE001 -- whatever Redis does, callahead goes on without it
            self._observer.redis_round_trip(False)
            self._breaker.record(False, admission)
            if not self._down and not self.up:
                self._down = True
                log.warning(
                    "redis %s is not answering (%s: %s): local cache only, probing as "
                    "without it; trying again every %g s",
                    redact_url(self.url),
                    what,
                    escape(str(exc) or type(exc).__name__, spaces=True),
                    BREAKER_COOLDOWN,
                )
            raise SharedUnavailable(f"{what}: {exc!r}") from None
        self._observer.redis_round_trip(True)
        self._breaker.record(True, admission)
        if self._down:
            self._down = False
            log.info("redis %s answers again: the cache is shared again", redact_url(self.url))
        return value

    # -- the probe path ---------------------------------------------------------------

    async def claim(self, address: str, token: str, lock_ms: int, refresh_ms: int) -> list[int]:
        """[ms left of the valid entry (<= 0: none), 1 if this token took the lock]."""
        keys = [valid_key(address), lock_key(address)]
        answer = await self.call(
            "lookup", lambda: self._claim(keys=keys, args=[token, lock_ms, refresh_ms])
        )
        return [int(answer[0]), int(answer[1])]

    async def poll(self, address: str) -> list[int]:
        """[ms left of the valid entry (<= 0: none), 1 if the lock is held]."""
        keys = [valid_key(address), lock_key(address)]
        answer = await self.call("poll", lambda: self._poll(keys=keys, args=[]))
        return [int(answer[0]), int(answer[1])]

    async def store_valid(self, address: str, ttl_ms: int, token: str = "") -> None:
        """Write ``address`` as valid for ``ttl_ms`` and release its lock if ``token``
        holds it."""
        keys = [valid_key(address), lock_key(address), control_key(address.rpartition("@")[2])]
        await self.call(
            "store", lambda: self._publish_valid(keys=keys, args=[ttl_ms, token, address])
        )

    async def control(self, domain: str) -> str | None:
        """The address of ``domain`` verified most recently by any backup, if any."""
        value = await self.call("control", lambda: self._client.get(control_key(domain)))
        if not isinstance(value, bytes) or len(value) > MAX_CONTROL_LENGTH:
            return None
        address = value.decode("utf-8", "replace")
        return address if address.endswith("@" + domain) else None

    async def release(self, address: str, token: str) -> None:
        keys = [lock_key(address)]
        await self.call("release", lambda: self._release(keys=keys, args=[token]))

    # -- the admin commands -----------------------------------------------------------

    async def remaining(self, address: str) -> float | None:
        """Seconds ``address`` has left in Redis; None when it is not there."""
        left = int(await self.call("show", lambda: self._client.pttl(valid_key(address))))
        return left / 1000 if left > 0 else None

    async def forget(self, address: str) -> int:
        """Remove ``address`` and tell every backup; how many keys went (0 or 1)."""
        removed = int(await self.call("flush", lambda: self._client.delete(valid_key(address))))
        control = [control_key(address.rpartition("@")[2])]
        await self.call("flush", lambda: self._release(keys=control, args=[address]))
        await self.announce({"address": address})
        return removed

    async def forget_matching(self, pattern: str, announcement: dict[str, Any]) -> int:
        """Remove every key matching ``pattern`` (SCAN pages, each bounded by
        ``ADMIN_TIMEOUT``) and tell every backup; how many went."""
        removed = 0
        cursor = 0
        while True:
            step = functools.partial(self._scan_and_unlink, cursor, pattern)
            cursor, removed_now = await self.call("flush", step, timeout=ADMIN_TIMEOUT)
            removed += removed_now
            if cursor == 0:
                break
        if announcement:
            await self.announce(announcement)
        return removed

    async def _scan_and_unlink(self, cursor: int, pattern: str) -> tuple[int, int]:
        """One SCAN page and the removal of its keys: (the next cursor, keys removed)."""
        following, keys = await self._client.scan(cursor, match=pattern, count=SCAN_COUNT)
        removed = int(await self._client.unlink(*keys)) if keys else 0
        return int(following), removed

    async def announce(self, message: dict[str, Any]) -> None:
        await self.call("flush", lambda: self._client.publish(CHANNEL, json.dumps(message)))

    async def invalidations(self) -> aioredis.client.PubSub:
        """A subscription to the flush channel, on a connection of its own."""
        client = self._connect(blocking=True)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self.timeout * 5):
                await pubsub.subscribe(CHANNEL)
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()
            raise
        return pubsub

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.aclose()


def _shared_hit(hops: tuple[Nexthop, ...], left: float, started: float) -> ProbeResult:
    return ProbeResult(
        Verdict.VALID,
        Stage.RCPT,
        None,
        f"valid: in the shared cache, {left:.0f} s left",
        time.monotonic() - started,
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
        self._lock_wait = lock_wait
        self._lock_ms = int((probe_timeout + LOCK_MARGIN) * 1000)
        self._refresh_ms = int(refresh_within * 1000)
        self._refresh_limit = refresh_limit
        self._free_slot = free_slot
        self._observer: SharedObserver = observer if observer is not None else _Unobserved()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refreshing: set[str] = set()
        self._listener: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._ttl_ms > 0 and self.local.enabled

    @property
    def longest_delay(self) -> float:
        """The longest the gate can add to a probe request: a lookup, the wait for
        another backup's probe with its polls, and a second lookup."""
        return self._lock_wait + 3 * self.store.timeout

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
        try:
            left, holding = await self.store.claim(address, token, self._lock_ms, self._refresh_ms)
            if left > 0:
                self._observer.redis_lookup(True)
                if holding:
                    self._refresh(address, hops, token, run)
                return self._hit(address, hops, left, started)
            self._observer.redis_lookup(False)
            if not holding:
                left = await self._wait(address)
                if left > 0:
                    return self._hit(address, hops, left, started)
                # Its probe did not find it valid, or took too long: ours, under the
                # lock if it is free now, so that a third backup waits for us.
                left, holding = await self.store.claim(address, token, self._lock_ms, 0)
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
        self._after(address, result, token if holding else "")
        return result

    def _hit(
        self, address: str, hops: tuple[Nexthop, ...], left_ms: int, started: float
    ) -> ProbeResult:
        left = left_ms / 1000
        # For what it has left in Redis, at most the local TTL (restore caps it).
        self.local.restore([(address, left)])
        return _shared_hit(hops, left, started)

    async def _wait(self, address: str) -> int:
        """Wait for another backup's probe of ``address``: ms left of the valid entry it
        wrote, or 0 when there is none (released, timed out, Redis failed)."""
        deadline = time.monotonic() + self._lock_wait
        interval = POLL_FIRST
        while True:
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, POLL_MAX)
            try:
                left, locked = await self.store.poll(address)
            except SharedUnavailable:
                self._observer.redis_lock_wait("error")
                return 0
            if left > 0:
                self._observer.redis_lock_wait("shared")
                return left
            if not locked:
                self._observer.redis_lock_wait("released")
                return 0
            if time.monotonic() >= deadline:
                self._observer.redis_lock_wait("timeout")
                return 0

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
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RESUBSCRIBE_AFTER)

    def apply_flush(self, data: object) -> int:
        """Drop from the local cache what another backup's flush names."""
        try:
            message = json.loads(data) if isinstance(data, bytes | str) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            message = None
        if not isinstance(message, dict):
            return 0
        if message.get("all") is True:
            return self.local.clear()
        if isinstance(message.get("domain"), str):
            return self.local.discard_domain(message["domain"])
        if isinstance(message.get("address"), str):
            return int(self.local.discard(message["address"]))
        return 0

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
        return await self.store.remaining(address)

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
