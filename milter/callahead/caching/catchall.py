"""Catch-all detection: a routed domain whose primary accepts any address.

Some primaries accept every recipient of a domain (a catch-all alias, or a server that
accepts now and bounces later). A probe of such a domain always says "valid", so it
carries no information: callahead cannot verify that domain's recipients. Now and then
(``CALLAHEAD_CATCHALL_CHECK`` seconds) each routed domain in use is checked with one
probe of an address made up at random (``callahead-check-`` and 24 hex digits): if the
primary accepts it, the domain *accepts all*, which is logged once and shown as
``callahead_domain_accepts_all{domain}``, and its recipients are accepted without a
probe (reason ``accepts_all``) until a later check finds the primary rejecting made-up
addresses again. An undecided check keeps what was known and is tried again sooner.

**What a check decides.** Accepted: the domain accepts all. Refused as unknown: it
does not, also when the evidence rules withheld the 550 (``REFUSED_UNPROVEN``: a
verified control of the domain refused too, which reads as drift, or a bare reply with
no control accepted): a primary that refuses an address made up at random is not
accepting everything, and the domain's recipients are then probed and judged as usual.
Anything else decides nothing.

**Nothing kept, nothing shared.** The check's answer is its own (the engine's
``keep=False``): the made-up address is never cached, so never a control, and nothing
of the check reaches Redis (no lookup, lock, valid entry or control), so no backup
takes it as a control. Were it one, the primary refusing it once its catch-all goes
would read as drift: the domain's unknowns undecided, and the next check undecided
too, keeping ``accepts_all`` for a ``CALLAHEAD_CACHE_TTL``.

**What the catch-all said before.** When a check finds a domain accepting all, the
addresses of it this backup cached as valid are forgotten (``discard_domain``): the
primary would have said "valid" to anyone, so they prove nothing, and none of them is
later offered as a control. They are accepted without a probe while the catch-all
lasts, and probed again once it goes. (Redis entries are left to their TTL: the other
backups find the catch-all themselves.)

**What is checked.** The state is kept per route entry (``CALLAHEAD_ROUTES`` key), never
per recipient domain, so it is bounded by the configuration whatever senders make up,
and so are the metric's labels. An exact entry ``example.com`` is checked at
``example.com``. A parent entry ``.example.com`` is checked at ``example.com`` itself,
the one domain the operator wrote (its subdomains are the senders' choice: checking
them would let a sender pick which answer stands for the entry); list a subdomain
whose primary treats it differently as an exact entry.

**When.** A domain is checked at its first recipient, then again at the first recipient
after ``interval`` seconds: lazily, in the background on the probe loop, on a probe
slot free at that moment and with a budget token there at that moment (see budget.py),
never making a recipient wait. A domain nobody sends to is never probed.

``CatchAllBook`` is the state machine (no I/O, a clock handed in); ``LoopCatchAll`` runs
the checks on the probe loop, through the same engine as every probe (sessions, slots,
breaker, budget).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..base.logfmt import escape
from ..probing.engine import ProbeEngine
from ..probing.loop import ProbeLoop
from ..probing.validcache import ValidCache
from ..routing.routes import Nexthop
from ..smtp.verdict import Basis, ProbeResult, Verdict

log = logging.getLogger("callahead.catchall")

CHECK_PREFIX = "callahead-check-"
"""The start of every made-up local part, so that the primary's admin sees what it is."""
RETRY_AFTER = 60.0
"""Seconds after an undecided or skipped check before the next one (at most the
interval): a primary that was busy or down at the first check is not left unchecked
for an hour."""
SKIPPED = "skipped"
OUTCOMES = (*(v.value for v in Verdict), SKIPPED)
"""The outcomes of a check, as ``callahead_catchall_checks_total`` counts them."""


def check_address(domain: str) -> str:
    """A made-up address at ``domain`` that no real mailbox has."""
    return f"{CHECK_PREFIX}{secrets.token_hex(12)}@{domain}"


def is_check_address(address: str) -> bool:
    """Is ``address`` one that a catch-all check made up?"""
    return address[: len(CHECK_PREFIX)].lower() == CHECK_PREFIX and "@" in address


def check_domain(route: str) -> str:
    """Where a route entry is checked: the domain itself, or a parent entry's parent."""
    return route.lstrip(".")


REFUSED_UNPROVEN = frozenset({Basis.DRIFT, Basis.UNPROVEN})
"""Undecided answers that are still a refusal of the made-up address as unknown: the
evidence rules withheld the 550 (a verified control refused too, or a bare reply with
no control accepted), but a primary that refuses an address made up at random does not
accept all."""


def check_verdict(result: ProbeResult) -> Verdict | None:
    """What a check's answer says of its domain: valid (accepts all), unknown (rejects
    made-up addresses), tempfail (nothing either way), None (skipped)."""
    if result.skipped is not None:
        return None
    if result.verdict is Verdict.TEMPFAIL and result.basis in REFUSED_UNPROVEN:
        return Verdict.UNKNOWN
    return result.verdict


@dataclass(slots=True)
class _Entry:
    accepts_all: bool | None = None
    """None until a check has decided."""
    next_check: float = 0.0
    checking: bool = False


class CatchAllBook:
    """Per route entry: does its primary accept all, and is a check due. Not thread-safe
    (``LoopCatchAll`` holds a lock around it)."""

    def __init__(
        self,
        interval: float,
        *,
        retry: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._retry = min(retry, interval)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def accepts_all(self, route: str) -> bool:
        entry = self._entries.get(route)
        return entry is not None and entry.accepts_all is True

    def claim(self, route: str) -> bool:
        """True when a check of ``route`` is due and none is running: the caller runs
        it and hands its verdict to ``settle``."""
        entry = self._entries.setdefault(route, _Entry())
        if entry.checking or self._clock() < entry.next_check:
            return False
        entry.checking = True
        return True

    def settle(self, route: str, verdict: Verdict | None) -> bool | None:
        """A check of ``route`` ended with ``verdict`` (None: it was skipped). Returns
        the state when a check decided it (True: accepts all, False: normal), else None."""
        entry = self._entries.setdefault(route, _Entry())
        entry.checking = False
        now = self._clock()
        if verdict is Verdict.VALID or verdict is Verdict.UNKNOWN:
            entry.accepts_all = verdict is Verdict.VALID
            entry.next_check = now + self._interval
            return entry.accepts_all
        entry.next_check = now + self._retry
        return None

    def states(self) -> dict[str, bool]:
        """Every route entry a check has decided, and its state."""
        return {
            route: entry.accepts_all
            for route, entry in self._entries.items()
            if entry.accepts_all is not None
        }


class CheckedCache(ValidCache, Protocol):
    """The local cache as the checks use it (cache.PositiveCache)."""

    def discard_domain(self, domain: str) -> int:
        """Forget every address at ``domain``; how many."""
        ...


class LoopCatchAll:
    """The policy's ``CatchAll``: answers from memory, runs checks on the probe loop.
    Thread-safe."""

    def __init__(
        self,
        loop: ProbeLoop,
        engine: ProbeEngine,
        cache: CheckedCache,
        *,
        interval: float,
        on_check: Callable[[str], None] = lambda outcome: None,
        on_state: Callable[[str, bool], None] = lambda route, accepts_all: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_check(outcome)`` after each check (an ``OUTCOMES`` value);
        ``on_state(route, accepts_all)`` after each check that decided."""
        self._loop = loop
        self._engine = engine
        self._cache = cache
        self._interval = interval
        self._on_check = on_check
        self._on_state = on_state
        self._lock = threading.Lock()
        self._book = CatchAllBook(interval, clock=clock)
        self._tasks: set[asyncio.Task[None]] = set()

    def accepts_all(self, route: str) -> bool:
        with self._lock:
            return self._book.accepts_all(route)

    def check_if_due(self, route: str, hops: Sequence[Nexthop]) -> None:
        """Start a check of ``route`` in the background when one is due; returns at once."""
        with self._lock:
            if not self._book.claim(route):
                return
        if not self._loop.healthy:
            self._settle(route, None, None, "")
            return
        self._loop.call_soon(self._start, route, tuple(hops))

    def _start(self, route: str, hops: tuple[Nexthop, ...]) -> None:
        """On the loop: check now if a probe slot is free, else skip (tried again later)."""
        if not self._engine.has_free_slot:
            self._settle(route, None, None, "")
            return
        task = asyncio.get_running_loop().create_task(self._run(route, hops))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, route: str, hops: tuple[Nexthop, ...]) -> None:
        address = check_address(check_domain(route))
        try:
            # keep=False: nothing of it is cached or reaches Redis (see the module).
            result = await self._engine.probe(
                address, hops, recheck=True, background=True, keep=False
            )
        except BaseException:  # cancelled (shutdown) or failed: no verdict
            self._settle(route, None, None, address)
            raise
        self._cache.discard(address)  # should an engine have kept it all the same
        self._settle(route, result, check_verdict(result), address)

    def _settle(
        self, route: str, result: ProbeResult | None, verdict: Verdict | None, address: str
    ) -> None:
        with self._lock:
            before = self._book.accepts_all(route)
            state = self._book.settle(route, verdict)
        if state is not None:
            self._report(route, before, state, result, address)
        elif result is not None:
            log.debug(
                "catch-all check of %s undecided (%s): tried again later",
                route,
                escape(result.detail, spaces=True),
            )
        # Last: the check has ended once this is counted.
        self._on_check(SKIPPED if verdict is None else verdict.value)

    def _report(
        self, route: str, before: bool, state: bool, result: ProbeResult | None, address: str
    ) -> None:
        primary = result.primary if result is not None else "?"
        if state and not before:
            # What the primary said "valid" to meanwhile proves nothing: no cached entry
            # outlives the catch-all as valid, and none is offered as a control (refused
            # once the catch-all goes, it would read as drift).
            forgotten = self._cache.discard_domain(check_domain(route))
            log.warning(
                "domain %s accepts all: its primary %s accepted <%s>, an address made up at "
                "random, so callahead cannot verify the recipients of %s (the primary "
                "probably has a catch-all, or accepts now and bounces later). They are "
                "accepted without a probe (reason accepts_all) until a check (every %gs) "
                "finds the primary rejecting made-up addresses again; %d of its addresses "
                "cached as valid are forgotten",
                route,
                primary,
                escape(address),
                route,
                self._interval,
                forgotten,
            )
        elif before and not state:
            log.warning(
                "domain %s no longer accepts all: its primary %s rejected <%s>; its "
                "recipients are verified again",
                route,
                primary,
                escape(address),
            )
        self._on_state(route, state)

    async def aclose(self) -> None:
        """Cancel the checks in flight (at shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
