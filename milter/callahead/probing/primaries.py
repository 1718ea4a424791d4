"""What the probe engine keeps and learns per primary, and the table that bounds it.

A primary is a literal nexthop (``[host]:port``) or an MX host with its port
(``mx.example.com:25``), never one of the addresses it resolved to (see engine.py). Per
primary: its breaker, its budget, its pool of sessions to any of its addresses, the
addresses that failed recently (tried last), and what was learnt of it: the sender it
takes, its transaction shape, its refusals of the prober and its drift, each logged
once. The table forgets a primary idle for ``PRIMARY_IDLE`` seconds and keeps at most
``PRIMARY_LIMIT``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..base.logfmt import escape
from ..routing.routes import Expansion, Nexthop
from ..smtp.evidence import ControlSource
from ..smtp.session import Session, SessionSettings, TransactionShape
from ..smtp.verdict import Basis, ProbeResult, Verdict
from .breaker import Admission, Breaker, State
from .budget import TokenBucket, burst_for
from .enginetypes import EngineObserver, EngineSettings, PrimaryState
from .pool import SessionPool

WARNED_LIMIT = 1000
"""Refusals remembered per primary for logging them once (bounded: subdomain routes let
senders pick domains)."""
PRIMARY_LIMIT = 2000
"""Primaries whose state the engine keeps at most. Each costs about a kilobyte and four
metric series; a backup for many domains hosted by one provider (each domain with an MX
host of its own) has as many primaries as active domains. Past the limit the least
recently probed primary without a probe in flight is forgotten: its breaker, budget and
what was learnt of it start afresh at its next probe."""
PRIMARY_IDLE = 3600.0
"""Seconds a primary without a probe keeps its state (made longer by the breaker's
cooldown, the pool's idle time or a budget token's refill when one is longer)."""
FAILING_LIMIT = 16
"""Addresses of one primary remembered as failing at most (the most recent ones)."""

log = logging.getLogger("callahead.engine")


class Primaries:
    """Every primary probed lately, least recently probed first."""

    def __init__(
        self,
        settings: EngineSettings,
        session_settings: SessionSettings,
        observer: EngineObserver,
        controls: ControlSource | None,
        *,
        limit: int = PRIMARY_LIMIT,
        idle: float = PRIMARY_IDLE,
    ) -> None:
        self._settings = settings
        self._session_settings = session_settings
        self._observer = observer
        self._controls = controls
        self._table: OrderedDict[str, Primary] = OrderedDict()
        self._primary_limit = max(1, limit)
        # Forgetting a primary must not cut its breaker's cooldown short, close its
        # sessions before the pool would, or give back budget tokens before their time.
        rate = settings.primary_rate
        self._primary_idle = max(
            idle,
            settings.breaker_cooldown,
            settings.pool_idle,
            burst_for(rate) / rate if rate > 0 else 0.0,
        )
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._table)

    def values(self) -> list[Primary]:
        return list(self._table.values())

    def get(self, name: str) -> Primary:
        """The state of the primary ``name`` (``Expansion.primary_of``), made the most
        recently used and counted as in use (``active``) until the caller's ``Visit``
        settles."""
        now = time.monotonic()
        primary = self._table.get(name)
        if primary is not None:
            self._table.move_to_end(name)
        else:
            breaker = Breaker(
                failures=self._settings.breaker_failures, cooldown=self._settings.breaker_cooldown
            )
            rate = self._settings.primary_rate
            primary = Primary(
                name=name,
                breaker=breaker,
                sender=self._settings.sender,
                budget=TokenBucket(rate) if rate > 0 else None,
                used_at=now,
            )
            settings = self._session_settings
            observer = self._observer
            controls = self._controls
            primary.pool = SessionPool(
                lambda hop: Session(
                    hop, settings, sender=primary.sender, shape=primary.shape, controls=controls
                ),
                size=self._settings.pool_size,
                idle=self._settings.pool_idle,
                max_age=self._settings.pool_max_age,
                on_open=lambda: observer.connection_opened(name),
                on_share=lambda: observer.session_shared(name),
            )
            self._table[name] = primary
        primary.used_at = now
        primary.active += 1
        # After the count: the primary asked for is never the one forgotten. Primaries
        # kept over the limit while in use go at a later call.
        self.make_room(self._primary_limit)
        return primary

    def make_room(self, limit: int) -> None:
        """Forget the least recently probed primaries without a probe in flight until
        at most ``limit`` are left."""
        excess = len(self._table) - limit
        if excess <= 0:
            return
        victims: list[str] = []
        for name, primary in self._table.items():
            if len(victims) >= excess:
                break
            if not primary.active:
                victims.append(name)
        for name in victims:
            self.drop(name)

    def prune(self, now: float) -> None:
        """Forget the primaries without a probe for ``primary_idle`` seconds."""
        victims: list[str] = []
        for name, primary in self._table.items():
            if now - primary.used_at < self._primary_idle:
                break  # least recently probed first: the rest are younger
            if not primary.active:
                victims.append(name)
        for name in victims:
            self.drop(name)

    def drop(self, name: str) -> None:
        primary = self._table.pop(name)
        self._observer.primary_dropped(name)
        if primary.pool.open_sessions:
            # Only idle sessions (no probe in flight): QUIT them, as aclose() would.
            task = asyncio.get_running_loop().create_task(primary.pool.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def states(self) -> list[PrimaryState]:
        """Every primary probed so far, as it is now."""
        return [
            PrimaryState(
                name=p.name,
                open_sessions=p.pool.open_sessions,
                breaker_open=p.breaker.state is State.OPEN,
                reached=p.reached,
                refuses_prober=p.refusing,
                last_verdict=p.last_verdict,
                last_detail=p.last_detail,
                last_age=None if p.last_at is None else time.monotonic() - p.last_at,
            )
            for p in self._table.values()
        ]

    def breaker_state(self, primary: Nexthop | str) -> State:
        """The breaker of a primary: a literal nexthop, or a name (``mx.example.com:25``)."""
        state = self._table.get(str(primary))
        return State.CLOSED if state is None else state.breaker.state

    def in_order(self, expansion: Expansion) -> list[Nexthop]:
        """The hops in failover order: as given (the MX preference, the operator's
        order), except that among the addresses of one primary those that failed at the
        connection level recently come after the others, in the places of that
        primary's addresses (never before another primary's)."""
        hops = list(expansion.hops)
        places: dict[str, list[int]] = {}
        for index, hop in enumerate(hops):
            places.setdefault(expansion.primary_of(hop), []).append(index)
        now = time.monotonic()
        recent = self._settings.breaker_cooldown
        for name, indexes in places.items():
            primary = self._table.get(name)
            if len(indexes) < 2 or primary is None or not primary.failing:
                continue
            mine = [hops[i] for i in indexes]
            late = [h for h in mine if now - primary.failing.get(h, float("-inf")) < recent]
            if not late:
                continue
            mine = [h for h in mine if h not in late] + late
            for index, hop in zip(indexes, mine, strict=True):
                hops[index] = hop
        return hops

    def fall_back(self, primary: Primary, result: ProbeResult) -> bool:
        """Switch ``primary`` to the fallback sender; False if there is none to switch to."""
        fallback = self._settings.fallback_sender
        if not fallback or primary.sender == fallback:
            return False
        log.warning(
            'primary %s refuses the probe sender <%s> (%s "%s" at %s): probing it with the '
            "fallback sender <%s> from now on",
            escape(primary.name),
            escape(primary.sender),
            result.code,
            escape(result.detail, spaces=True),
            result.stage.value.upper(),
            fallback,
        )
        primary.sender = fallback
        primary.pool.reap(drop_all=True)
        return True

    def note_shape(self, primary: Primary) -> None:
        """A session of ``primary`` had a later RCPT of a transaction refused with
        ``5.5.3``: one recipient per transaction from now on, or the fallback sender
        (with a real sender, multi-recipient transactions are no bounces)."""
        if primary.shape_noted:
            return
        primary.shape_noted = True
        fallback = self._settings.fallback_sender
        if fallback and not primary.sender:
            primary.sender = fallback
            primary.shape.single_rcpt = False
            primary.pool.reap(drop_all=True)
            how = f"probing it with the fallback sender <{fallback}> from now on"
        else:
            how = "one recipient per transaction from now on (RSET and MAIL FROM before each)"
        log.warning(
            "primary %s refuses a later RCPT of a transaction (5.5.3, as Postfix's "
            "reject_multi_recipient_bounce does with MAIL FROM:<>): %s",
            escape(primary.name),
            how,
        )

    def note_drift(self, primary: Primary, address: str, result: ProbeResult) -> None:
        self._observer.drift_seen(primary.name)
        domain = address.rpartition("@")[2]
        if domain in primary.drift_warned or len(primary.drift_warned) >= WARNED_LIMIT:
            return
        primary.drift_warned.add(domain)
        log.warning(
            "primary %s refused an address of %s that it had accepted recently (%s): it "
            "may have stopped judging recipients (a broken directory lookup, the wrong "
            "host), so its rejections on that session were answered as undecided; if "
            "that user was removed, run callahead cache flush for it",
            escape(primary.name),
            escape(domain),
            escape(result.why, spaces=True),
        )

    def note_refusal(self, primary: Primary, address: str, result: ProbeResult) -> None:
        """Count a refusal of the prober and log it once per primary and kind (and per
        domain for an unproven one); note when the primary judges recipients again."""
        basis = result.basis
        if basis is Basis.DRIFT:
            self.note_drift(primary, address, result)
            return
        if basis.refuses_prober:
            self._observer.prober_refused_by(primary.name, basis)
            primary.refusing = True
            domain = address.rpartition("@")[2]
            key = (basis, domain if basis is Basis.UNPROVEN else "")
            if key in primary.warned or len(primary.warned) >= WARNED_LIMIT:
                return
            primary.warned.add(key)
            log.warning(
                'primary %s refuses callahead\'s probes, not the recipients: %s "%s" at %s '
                '("%s"); recipients of %s are accepted unverified while it does. %s',
                escape(primary.name),
                result.code,
                escape(result.detail, spaces=True),
                result.stage.value.upper(),
                escape(result.why, spaces=True),
                escape(domain),
                _ADVICE[basis].format(domain=escape(domain), helo=self._settings.helo_name),
            )
        elif result.verdict is not Verdict.TEMPFAIL:
            primary.refusing = False
            if primary.warned:
                primary.warned.clear()
                log.info("primary %s judges callahead's probes again", escape(primary.name))

    def reap(self) -> None:
        """Close the sessions idle too long, and forget the primaries idle too long."""
        for primary in self._table.values():
            primary.pool.reap()
        self.prune(time.monotonic())

    async def aclose(self) -> None:
        """Close every pooled session (QUIT where polite)."""
        for primary in self._table.values():
            await primary.pool.aclose()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=3)


_ADVICE = {
    Basis.PROBER: "Let the backup's address and its HELO name {helo!r} through the "
    "primary's client, HELO and blocklist restrictions (or set CALLAHEAD_HELO_NAME).",
    Basis.SENDER: "Let the probe sender through the primary's sender restrictions, or set "
    "CALLAHEAD_PROBE_FALLBACK_SENDER.",
    Basis.UNPROVEN: "It refuses postmaster@{domain} too, which RFC 5321 4.5.1 requires "
    "every domain to accept: accept postmaster@{domain} there, and let the backup through "
    "its restrictions.",
}


@dataclass(slots=True, kw_only=True)
class Primary:
    """What the engine keeps per primary."""

    name: str
    breaker: Breaker
    sender: str
    """MAIL FROM of new sessions: the probe sender, or the fallback once it was refused."""
    budget: TokenBucket | None
    """Probes this primary may still get (``CALLAHEAD_PRIMARY_RATE``); None: unlimited."""
    reached: bool = False
    """The last probe reached the primary at the SMTP level."""
    refusing: bool = False
    """The last answer of the primary refused the prober."""
    warned: set[tuple[Basis, str]] = field(default_factory=set)
    drift_warned: set[str] = field(default_factory=set)
    """Domains whose drift was logged (once each, bounded)."""
    shape: TransactionShape = field(default_factory=TransactionShape)
    """How this primary wants its transactions; shared by its sessions."""
    shape_noted: bool = False
    last_verdict: Verdict | None = None
    last_detail: str = ""
    last_at: float | None = None
    used_at: float
    """When a probe last asked for this primary (monotonic): forgotten when idle."""
    active: int = 0
    """Probes using this primary now: never forgotten meanwhile."""
    failing: OrderedDict[Nexthop, float] = field(default_factory=OrderedDict)
    """Addresses of this primary that failed at the connection level, and when (the
    last ``FAILING_LIMIT``): tried after the others until ``breaker_cooldown`` passed."""
    pool: SessionPool = field(init=False)

    def note_failing(self, hop: Nexthop) -> None:
        self.failing[hop] = time.monotonic()
        self.failing.move_to_end(hop)
        while len(self.failing) > FAILING_LIMIT:
            self.failing.popitem(last=False)


@dataclass(slots=True)
class Visit:
    """One probe at one primary, over every address of it the probe tries."""

    primary: Primary
    admission: Admission | None = None
    """What the primary's breaker let through; None: it is marked down (skipped)."""
    over_budget: bool = False
    tried: set[Nexthop] = field(default_factory=set)
    """The addresses that gave an answer (or failed) in this probe."""
    reached: bool = False
    failed: bool = False

    def settle(self) -> None:
        """Tell the breaker what this probe found: reached when any address answered at
        the SMTP level, a failure when every one tried failed at the connection level,
        nothing when none was tried (over budget, a busy pool, out of time, cancelled)."""
        self.primary.active -= 1
        if self.admission is None:
            return
        if self.reached or self.failed:
            self.primary.breaker.record(self.reached, self.admission)
        else:
            self.primary.breaker.release(self.admission)
