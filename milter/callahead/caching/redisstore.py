"""The shared cache's store: Redis through redis-py with every call bounded and behind a
breaker, the key names (hashed addresses and domains) and the Lua scripts that claim,
poll, publish and release, and the flush channel. What the gate (sharedcache.py) and the
admin socket build on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from ..base.errors import CallaheadError
from ..base.logfmt import escape, redact_url
from ..probing.breaker import Breaker, State
from .redisclient import (
    SentinelTarget,
    close_client,
    master_client,
    sentinel_manager,
    tls_options,
    unchecked_tls,
    url_client,
)
from .redismaster import WATCH_DOWN, WATCH_EVERY, MasterInfo, MasterWatch, follow_master
from .redisobserver import SharedObserver, _Unobserved
from .redisscripts import CLAIM, CONTROL, ENTRY, POLL, PUBLISH_VALID, RELEASE
from .untrusted import Distrust, is_address, shown

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


__all__ = [
    "RedisStore",
    "SentinelTarget",
    "SharedObserver",
    "SharedUnavailable",
    "_Unobserved",
    "tls_options",
]


class RedisStore:
    """The Redis side: every call bounded, counted, and behind a breaker. Lives on the
    probe loop (the breaker is not thread-safe). ``url``: a Redis URL, or the sentinels
    that name the master (``SentinelTarget``)."""

    def __init__(
        self,
        url: str | SentinelTarget,
        *,
        timeout: float,
        observer: SharedObserver | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.url = url if isinstance(url, str) else ""
        self.target = url
        self.shown = redact_url(url) if isinstance(url, str) else url.shown
        self.timeout = timeout
        self._observer: SharedObserver = observer if observer is not None else _Unobserved()
        self._breaker = (
            breaker
            if breaker is not None
            else Breaker(failures=BREAKER_FAILURES, cooldown=BREAKER_COOLDOWN)
        )
        self._down = False
        self.distrust = Distrust(self._observer)
        self._sentinel = None if isinstance(url, str) else sentinel_manager(url, timeout)
        self.master = None if isinstance(url, str) else MasterWatch(url.service)
        self._watching: asyncio.Task[None] | None = None
        self._client = self._connect()
        self._claim = self._client.register_script(CLAIM)
        self._poll = self._client.register_script(POLL)
        self._entry = self._client.register_script(ENTRY)
        self._publish_valid = self._client.register_script(PUBLISH_VALID)
        self._release = self._client.register_script(RELEASE)
        self._control = self._client.register_script(CONTROL)
        self._observer.watch_redis(lambda: not self.up)
        unchecked = unchecked_tls(self.url)
        if unchecked:
            log.warning(
                "redis %s: %s, as the URL asks: whoever is on the path can pose as Redis",
                self.shown,
                unchecked,
            )

    def _connect(self, *, blocking: bool = False) -> aioredis.Redis:
        """A client with no retries of its own (the breaker decides) and every socket
        operation bounded; ``blocking``: for the subscription, which waits for messages
        as long as it takes. Behind Sentinel, each new connection asks the sentinels
        where the master is (inside the same bounds)."""
        if isinstance(self.target, str):
            return url_client(self.target, self.timeout, blocking=blocking)
        assert self._sentinel is not None
        return master_client(self._sentinel, self.target, self.timeout, blocking=blocking)

    @property
    def master_info(self) -> MasterInfo | None:
        """Behind Sentinel: the master the sentinels last named and since when."""
        return None if self.master is None else self.master.info

    def watch_master(self) -> None:
        """On the loop, behind Sentinel: start asking the sentinels where the master is
        (``redismaster.follow_master``); once."""
        if self.master is None or self._watching is not None or self._sentinel is None:
            return
        sentinel, service = self._sentinel, self.master.service
        self._watching = asyncio.get_running_loop().create_task(
            follow_master(
                self.master,
                lambda: sentinel.discover_master(service),
                self._new_master,
                timeout=self.timeout,
                every=lambda: WATCH_EVERY if self.up else min(self.timeout, WATCH_DOWN),
            )
        )

    async def _new_master(self) -> None:
        """The sentinels name a new master: drop idle connections to the old one; while
        Redis is treated as down, one PING to the new master closes the breaker if it
        answers (sharing resumes now, not after the cooldown)."""
        await self._client.connection_pool.disconnect(inuse_connections=False)
        if not self.up:
            await self._client.ping()
            self._breaker.record(True)

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
        self.watch_master()
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
                    self.shown,
                    what,
                    escape(str(exc) or type(exc).__name__, spaces=True),
                    BREAKER_COOLDOWN,
                )
            raise SharedUnavailable(f"{what}: {exc!r}") from None
        self._observer.redis_round_trip(True)
        self._breaker.record(True, admission)
        if self._down:
            self._down = False
            log.info("redis %s answers again: the cache is shared again", self.shown)
        return value

    # -- the probe path ---------------------------------------------------------------

    async def claim(
        self, address: str, token: str, lock_ms: int, refresh_ms: int, ttl_ms: int
    ) -> tuple[int, int]:
        """(ms left of the valid entry (<= 0: none), 1 if this token took the lock); an
        entry is believed for ``ttl_ms`` at most, a lock for ``lock_ms``."""
        keys = [valid_key(address), lock_key(address)]
        args: list[str | int] = [token, lock_ms, refresh_ms, ttl_ms]
        answer = await self.call("lookup", lambda: self._claim(keys=keys, args=args))
        self._checked(address, answer, ttl_ms, lock_ms)
        return int(answer[0]), int(answer[1])

    async def poll(self, address: str, lock_ms: int, ttl_ms: int) -> tuple[int, int]:
        """(ms left of the valid entry (<= 0: none), 1 if the lock is held)."""
        keys = [valid_key(address), lock_key(address)]
        answer = await self.call("poll", lambda: self._poll(keys=keys, args=[ttl_ms, lock_ms]))
        self._checked(address, answer, ttl_ms, lock_ms)
        return int(answer[0]), int(answer[1])

    def _checked(self, address: str, answer: list[int], ttl_ms: int, lock_ms: int) -> None:
        """Report what the script found wrong: ``answer[2:5]`` is the entry's problem, its
        ms left as found and the lock's problem (``_CHECKS``)."""
        entry, found, wrong = (int(n) for n in answer[2:5])
        rcpt = escape(address)
        if entry == 1:
            self.distrust.invalid(
                "entry", "the shared entry of rcpt=<%s> is not one callahead writes: ignored", rcpt
            )
        elif entry == 2:
            self.distrust.invalid(
                "entry",
                "the shared entry of rcpt=<%s> had %s left, more than CALLAHEAD_CACHE_TTL "
                "(%g s): cut to it (forged, or another backup has a longer TTL)",
                rcpt,
                "no expiry" if found < 0 else f"{found / 1000:.0f} s",
                ttl_ms / 1000,
            )
        if wrong == 1:
            self.distrust.invalid(
                "lock", "the probe lock of rcpt=<%s> holds no token callahead writes: removed", rcpt
            )
        elif wrong == 2:
            self.distrust.invalid(
                "lock",
                "the probe lock of rcpt=<%s> was set to outlive a probe here (%g s): cut to "
                "it (forged, or another backup has a longer CALLAHEAD_PROBE_TIMEOUT)",
                rcpt,
                lock_ms / 1000,
            )

    async def store_valid(self, address: str, ttl_ms: int, token: str = "") -> None:
        """Write ``address`` as valid for ``ttl_ms`` and release its lock if ``token``
        holds it."""
        keys = [valid_key(address), lock_key(address), control_key(address.rpartition("@")[2])]
        await self.call(
            "store", lambda: self._publish_valid(keys=keys, args=[ttl_ms, token, address])
        )

    async def control(self, domain: str) -> str | None:
        """The address of ``domain`` verified most recently by any backup, if any."""
        keys = [control_key(domain)]
        kind, value = await self.call("control", lambda: self._control(keys=keys, args=[]))
        if kind == b"none":
            return None
        address = value.decode("utf-8", "replace") if len(value) <= MAX_CONTROL_LENGTH else ""
        if kind == b"string" and is_address(address, domain):
            return address
        self.distrust.invalid(
            "control",
            'the control address of domain=%s is "%s" (a %s), no address of that domain: ignored',
            escape(domain),
            shown(value),
            escape(kind.decode("ascii", "replace")),
        )
        return None

    async def release(self, address: str, token: str) -> None:
        keys = [lock_key(address)]
        await self.call("release", lambda: self._release(keys=keys, args=[token]))

    # -- the admin commands -----------------------------------------------------------

    async def remaining(self, address: str, ttl_ms: int) -> float | None:
        """Seconds ``address`` has left in Redis (at most ``ttl_ms``); None when it is not
        there."""
        keys = [valid_key(address)]
        answer = await self.call("show", lambda: self._entry(keys=keys, args=[ttl_ms]))
        self._checked(address, [answer[0], 0, answer[1], answer[2], 0], ttl_ms, 0)
        left = int(answer[0])
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
        self.watch_master()
        client = self._connect(blocking=True)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self.timeout * 5):
                await pubsub.subscribe(CHANNEL)
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 5.x
            await close_client(client)
            raise
        return pubsub

    async def aclose(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        with contextlib.suppress(Exception):
            await close_client(self._client)
        for client in [] if self._sentinel is None else self._sentinel.sentinels:
            with contextlib.suppress(Exception):
                await close_client(client)
