"""The cache that learns from the mail log: a relayed recipient the primary accepted is
added to the positive cache; a cached one the primary refused as unknown is evicted.

What teaches (``lesson``, on the meter's thread, from the ledger's join):

- **learnt**: an *authentic* ``status=sent`` line (``Event.authentic``: from the
  journal, logged by Postfix's own user; never from a file, where any local user can
  write a line that reads as Postfix's and so make a made-up address valid for a day,
  on every backup) of a recipient callahead accepted, whose ``relay=``
  is one of the hosts callahead itself probes for the domain as its *primary* (a literal
  nexthop of its route, or an address of the most-preferred MX hosts; checked on the
  probe loop against the route and its MX lookup, ``RelayCheck``). The primary said 2xx
  to ``RCPT TO`` for real mail: the same evidence a probe's 250 is. The ``relay=`` is
  compared, not trusted to be right because the reason was: Postfix may relay to a
  secondary MX (another backup, which takes anything), deliver locally, or go through a
  relayhost or content filter that callahead never probes; none of those says the user
  exists, so none teaches. The reason at RCPT must also be one where callahead had a
  route and no answer against the recipient (``LEARNING_REASONS``): never
  ``accepts_all`` (a catch-all primary's 250 says nothing), never a dry run's
  ``probe_unknown``/``no_domain`` (the primary or DNS said no: the next probe decides).
  What is learnt goes to the local cache and, with Redis, through the shared cache's
  own publish path (``RedisStore.store_valid``, for ``CALLAHEAD_CACHE_TTL``, with the
  domain's control key), so it is also a control address of its domain (controls.py).
- **evicted**: a ``status=bounced`` line whose text is the remote server's reply ``in
  reply to RCPT TO command`` that callahead's own table (smtp/classify.py, at RCPT)
  calls *unknown* with an enhanced code (``5.1.1`` and the other recipient codes). The
  log has no control evidence, so a *bare* unknown (no enhanced code, which a probe
  trusts only after a control was accepted) evicts nothing, nor does a policy, sender,
  prober or mailbox refusal, nor a bounce Postfix made itself (``relay=none``). Eviction
  is from the local cache and from Redis (``SharedGate.flush_address``, as ``callahead
  cache flush`` does, telling every backup), counted in
  ``callahead_cache_evictions_total{cause="relay_bounce"}``. It refuses nothing: the
  next RCPT of the address is probed as any address not cached. So any line may evict,
  from a file too: a forged one costs a probe, never a verdict.

Everything that touches the caches runs on the probe loop (handed over with
``run_coroutine_threadsafe``, never waited for: the meter's thread reads on), at most
``MAX_PENDING`` at a time (past it, lessons are dropped: a cache that learns less is
still right).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from ...base.errors import CallaheadError
from ...base.logfmt import escape
from ...caching.cache import PositiveCache
from ...caching.redisstore import SharedUnavailable
from ...caching.sharedcache import SharedGate
from ...routing.routes import Expansion, Nexthop
from ...smtp.classify import classify
from ...smtp.verdict import Stage, Verdict
from .lines import Event, Fate, Kind
from .meter import MaillogMetrics

log = logging.getLogger("callahead.learning")

LEARNING_REASONS = frozenset(
    {
        "cache_hit",
        "shared_cache_hit",
        "probe_valid",
        "probe_tempfail",
        "prober_refused",
        "primary_down",
        "overload",
        "primary_budget",
        "route_failed",
        "loop_stalled",
        "shutdown",
        "error",
    }
)
"""Reasons at RCPT whose recipient a ``sent`` to the primary may teach: valid already,
or undecided for want of an answer (``core.policy.Reason`` values)."""
MAX_PENDING = 256
"""Lessons handed to the probe loop and not yet done, at most."""
CHECK_TIMEOUT = 30.0
"""Seconds a lesson's route check may take on the probe loop."""

_RELAY = re.compile(r"(?P<name>[^\s\[\]]+)\[(?P<addr>[^\s\[\]]+)\]:(?P<port>\d{1,5})")
"""``relay=`` of an SMTP or LMTP delivery over TCP: ``name[address]:port``."""
_REMOTE_REPLY = re.compile(
    r"host \S+ said: (?P<code>[2-5]\d\d)[ -](?P<text>.*) \(in reply to RCPT TO command\)"
)
"""A bounce's text when the remote server refused ``RCPT TO`` (Postfix 3.7,
``src/smtp/smtp_proto.c``: ``host %s said: %s (in reply to %s command)``)."""


class Lesson(enum.Enum):
    LEARN = "learn"
    EVICT = "evict"


def relay_hop(relay: str) -> tuple[str, str, int] | None:
    """``relay=``'s host name, address and port; None when it is not a TCP peer
    (``none``, ``local``, ``virtual``, a UNIX socket)."""
    found = _RELAY.fullmatch(relay)
    if found is None:
        return None
    return found["name"], found["addr"], int(found["port"])


def rcpt_refusal(text: str) -> tuple[int, str] | None:
    """The remote server's reply to ``RCPT TO`` quoted in a delivery's text."""
    found = _REMOTE_REPLY.fullmatch(text)
    return None if found is None else (int(found["code"]), found["text"])


def lesson(reason: str, event: Event) -> Lesson | None:
    """What a delivery line teaches about a recipient callahead accepted for ``reason``
    (the relay's check against the route comes after, on the probe loop)."""
    if event.kind is not Kind.DELIVERY:
        return None
    if event.fate is Fate.SENT:
        if event.authentic and reason in LEARNING_REASONS and relay_hop(event.relay) is not None:
            return Lesson.LEARN
        return None
    if event.fate is Fate.BOUNCED and relay_hop(event.relay) is not None:
        reply = rcpt_refusal(event.text)
        if reply is None or not 500 <= reply[0] < 600:
            return None
        said = classify(Stage.RCPT, *reply)
        if said.verdict is Verdict.UNKNOWN and not said.bare:
            return Lesson.EVICT
    return None


class Routes(Protocol):
    async def lookup_async(self, domain: str, address: str = "") -> tuple[Nexthop, ...]: ...


class Resolver(Protocol):
    async def expand(self, hops: Sequence[Nexthop], domain: str) -> Expansion: ...


def _same_host(hop_host: str, name: str, addr: str) -> bool:
    host = hop_host.removeprefix("ipv6:").removeprefix("IPv6:").rstrip(".").lower()
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(addr.removeprefix("IPv6:"))
    except ValueError:
        return host == name.rstrip(".").lower()


class RelayCheck:
    """Is a relay one of the primaries callahead probes for a domain? On the probe loop."""

    def __init__(self, routes: Routes, resolver: Resolver | None) -> None:
        self._routes = routes
        self._resolver = resolver

    async def is_primary(self, address: str, relay: str) -> bool:
        peer = relay_hop(relay)
        if peer is None:
            return False
        name, addr, port = peer
        domain = address.rpartition("@")[2]
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                hops = await self._routes.lookup_async(domain, address)
                if any(hop.mx for hop in hops):
                    if self._resolver is None:
                        return False
                    expansion = await self._resolver.expand(hops, domain)
                    hops, secondary = expansion.hops, expansion.secondary
                else:
                    secondary = frozenset()
        except (CallaheadError, TimeoutError):
            return False
        return any(
            hop.port == port and hop not in secondary and _same_host(hop.host, name, addr)
            for hop in hops
            if not hop.mx
        )


class Submit(Protocol):
    def __call__(self, coro: Coroutine[Any, Any, None]) -> object: ...


class Learner:
    """The ledger's ``on_fate`` hook (see the module's docstring)."""

    def __init__(
        self,
        cache: PositiveCache,
        check: RelayCheck,
        submit: Submit,
        metrics: MaillogMetrics,
        *,
        shared: SharedGate | None = None,
        shared_ttl: float = 0.0,
    ) -> None:
        """``submit``: runs a coroutine on the probe loop without waiting (ProbeLoop's);
        ``shared_ttl``: seconds a learnt address is kept in Redis (CALLAHEAD_CACHE_TTL)."""
        self._cache = cache
        self._check = check
        self._submit = submit
        self._metrics = metrics
        self._shared = shared
        self._shared_ms = max(1, int(shared_ttl * 1000))
        self._lock = threading.Lock()
        self._pending = 0

    def __call__(self, address: str, reason: str, event: Event) -> None:
        """On the meter's thread: no I/O, no wait."""
        taught = lesson(reason, event)
        if taught is None or not self._cache.enabled:
            return
        with self._lock:
            if self._pending >= MAX_PENDING:
                return
            self._pending += 1
        work = (
            self._learn(address, event) if taught is Lesson.LEARN else self._evict(address, event)
        )
        wrapped = self._done_after(work)
        try:
            self._submit(wrapped)
        except RuntimeError:  # the loop is closed: shutting down
            wrapped.close()
            work.close()
            self._finished()

    async def _done_after(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._lock:
            self._pending -= 1

    async def _learn(self, address: str, event: Event) -> None:
        if not await self._check.is_primary(address, event.relay):
            log.debug(
                "not learnt: rcpt=<%s> was sent to relay=%s, not a primary callahead probes",
                escape(address),
                escape(event.relay),
            )
            return
        self._cache.add(address)
        if self._shared is not None and self._shared.enabled:
            # Redis down: the breaker logs it; the local cache has it.
            with contextlib.suppress(SharedUnavailable):
                await self._shared.store.store_valid(address, self._shared_ms)
        self._metrics.cache_learned.inc()
        log.debug(
            "learnt: rcpt=<%s> was accepted by its primary %s for queue id %s: cached",
            escape(address),
            escape(event.relay),
            event.queue_id,
        )

    async def _evict(self, address: str, event: Event) -> None:
        evicted = self._cache.discard(address)
        if self._shared is not None:
            evicted = bool(await self._shared.flush_address(address)) or evicted
        if not evicted:
            return
        self._metrics.cache_evictions.labels("relay_bounce").inc()
        log.info(
            "evicted: rcpt=<%s> was refused as unknown by %s when queue id %s was relayed "
            '("%s"): removed from the cache, its next RCPT is probed',
            escape(address),
            escape(event.relay),
            event.queue_id,
            escape(event.text, spaces=True),
        )
