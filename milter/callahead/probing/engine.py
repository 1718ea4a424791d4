"""The probe engine: every probe callahead makes goes through here, on the probe loop.

* **Coalescing**: concurrent requests for the same address share one probe.
* **Bounds**: at most ``max_probes`` probes in flight over all primaries; a request that
  cannot get a slot within ``probe_wait`` seconds is answered at once (``overload``).
* **A primary** is a literal nexthop (``[host]:port``) or an MX host with its port
  (``mx.example.com:25``), never one of the addresses it resolved to: large MX pools
  (Microsoft 365's) hand out other addresses at every lookup, and state kept per
  address would grow without bound, never see a primary go down and multiply its
  budget by its addresses. The breaker, the budget, the pool, what was learnt of the
  primary (sender, transaction shape, refusals) and the metric labels are per primary.
* **Breaker** per primary (see breaker.py): a primary that keeps failing at the
  connection level is skipped for a cooldown (``primary_down``). A probe counts once
  for a primary, however many of its addresses it tried: a failure when none of them
  answered, a success when one did; so one dead address of an MX host whose other
  addresses answer never marks the host down.
* **Failover**: a domain's nexthops are tried in order within one probe deadline; a
  tempfail tries the next, a definite answer ends the search. Among the addresses of one
  primary, those that failed at the connection level within ``breaker_cooldown`` come
  last (at most ``FAILING_LIMIT`` remembered per primary), so a dead or black-holed
  address costs one probe its timeout, not every probe.
* **Pooled sessions** per primary (see pool.py and session.py), to any of its addresses;
  a reused session that the primary has closed is detected and the probe retried once
  on a fresh session.
* **Bounded state**: a primary with no probe for ``PRIMARY_IDLE`` seconds (at least
  the breaker's cooldown, the pool's idle time and a budget token's refill) is
  forgotten, and at most ``PRIMARY_LIMIT`` are kept (the least recently probed one
  without a probe in flight goes first; its idle sessions are closed with QUIT), its
  metric series with it.
* **A current view** (see freshness.py): a probe runs on a session opened after its
  address was last judged, and sessions live at most ``pool_max_age`` seconds.
* **Fallback sender**: a primary that refuses the probe's sender (at MAIL FROM, or at
  RCPT TO when Postfix delays the rejection) is asked again once with
  ``fallback_sender``, which its later sessions keep using.
* **A probe budget** per primary (see budget.py, ``primary_rate``): a probe waits for a
  token within what is left of ``probe_wait``, or is skipped (``primary_budget``);
  background probes (refresh, catch-all checks) take a token only if one is there. A
  probe takes one token of a primary however many of its addresses it tries.
* **Refusals of the prober** are counted per primary and logged once, so the operator
  learns that callahead cannot protect a domain (and why).
* **MX routes**: nexthops that need a DNS lookup are expanded by the injected
  ``HopResolver`` (resolve.py) within the probe's deadline; a failure is undecided.
  Only the primary's word counts: a valid or unknown answer of a *secondary* hop (an
  MX host outside the most-preferred group: another backup MX, which accepts every
  address while the primary is down) is undecided (``Basis.SECONDARY``) and ends the
  failover; being undecided, it is never cached, shared, judged or used by a
  catch-all check. A recipient domain that does not exist or has a null MX
  (``NoSuchDomain``) is unknown (``Basis.NO_DOMAIN``) without a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..base.errors import CallaheadError
from ..base.logfmt import escape
from ..routing.routes import Expansion, Nexthop, NoSuchDomain, RouteUnavailable
from .breaker import Admission, Breaker, State
from .budget import TokenBucket, burst_for
from .freshness import LastJudged
from .pool import SessionPool
from .session import (
    ControlSource,
    Session,
    SessionFailed,
    SessionLost,
    SessionSettings,
    TransactionShape,
)
from .tls import TlsMode, unverified_tls_context
from .validcache import ValidCache
from .verdict import Basis, ProbeResult, Skip, Stage, Verdict

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


@dataclass(frozen=True, slots=True)
class EngineSettings:
    helo_name: str
    sender: str
    timeout: float
    tls: TlsMode
    pool_size: int
    pool_idle: float
    max_probes: int
    probe_wait: float
    breaker_failures: int
    breaker_cooldown: float
    pool_max_age: float
    fallback_sender: str
    transcript: bool = False
    """Record the SMTP dialogue (``callahead probe --explain`` only)."""
    primary_rate: float = 0.0
    """Probes per second each primary may get (a token bucket); 0: unlimited."""

    @property
    def longest_answer(self) -> float:
        """The longest a probe request can take: a wait for a slot, then the probe."""
        return self.probe_wait + self.timeout


@dataclass(frozen=True, slots=True)
class PrimaryState:
    """One primary as the engine sees it now (read at scrape time by metrics.py)."""

    name: str
    open_sessions: int
    breaker_open: bool
    reached: bool
    """The last probe reached the primary at the SMTP level."""
    refuses_prober: bool
    """The last answer of the primary refused the prober."""
    last_verdict: Verdict | None = None
    """The verdict of the last probe that tried this primary; None: none yet."""
    last_detail: str = ""
    """What the primary answered (or what went wrong) on that probe."""
    last_age: float | None = None
    """Seconds since that probe ended."""


class EngineObserver(Protocol):
    """What the engine reports as it goes (metrics.Metrics is the real one); the engine
    knows nothing of Prometheus."""

    def watch_primaries(self, states: Callable[[], Iterable[PrimaryState]]) -> None: ...

    def probe_started(self) -> None: ...

    def probe_ended(self, result: ProbeResult | None) -> None:
        """``result`` is None for a probe cancelled or skipped before it began."""

    def coalesced_wait(self) -> None: ...

    def connection_opened(self, primary: str) -> None: ...

    def prober_refused_by(self, primary: str, basis: Basis) -> None: ...

    def drift_seen(self, primary: str) -> None:
        """A verified control was refused on a session of ``primary`` (Basis.DRIFT)."""

    def primary_dropped(self, primary: str) -> None:
        """The engine forgot ``primary`` (idle, or over ``PRIMARY_LIMIT``): its series
        may go."""


class ClusterGate(Protocol):
    """Other backup MXes in front of a probe (sharedcache.SharedGate, with Redis): their
    cached answers and their probes in flight. ``run()`` is this engine's own probe."""

    async def probe(
        self,
        address: str,
        hops: tuple[Nexthop, ...],
        recheck: bool,
        run: Callable[[], Awaitable[ProbeResult]],
    ) -> ProbeResult: ...


class _Unobserved:
    """The observer of an engine nobody watches (``callahead probe``)."""

    def watch_primaries(self, states: Callable[[], Iterable[PrimaryState]]) -> None:
        pass

    def probe_started(self) -> None:
        pass

    def probe_ended(self, result: ProbeResult | None) -> None:
        pass

    def coalesced_wait(self) -> None:
        pass

    def connection_opened(self, primary: str) -> None:
        pass

    def prober_refused_by(self, primary: str, basis: Basis) -> None:
        pass

    def drift_seen(self, primary: str) -> None:
        pass

    def primary_dropped(self, primary: str) -> None:
        pass


class HopResolver(Protocol):
    """Turns a route's nexthops into literal ones (resolve.MxResolver is the real one)."""

    async def expand(self, hops: Sequence[Nexthop], domain: str) -> Expansion:
        """The literal hops in order, the secondary ones marked. Raises ``NoSuchDomain``
        when the recipient domain does not exist (nothing else to probe), else
        ``RouteUnavailable`` when there is nothing to probe."""
        ...


class ProbeEngine:
    def __init__(
        self,
        settings: EngineSettings,
        observer: EngineObserver | None = None,
        known_valid: ValidCache | None = None,
        resolver: HopResolver | None = None,
        cluster: ClusterGate | None = None,
        controls: ControlSource | None = None,
        *,
        primary_limit: int = PRIMARY_LIMIT,
        primary_idle: float = PRIMARY_IDLE,
    ) -> None:
        """``controls``: recently verified addresses per domain, asked as controls when
        a primary rejects a recipient (session.py); None: postmaster@ only.
        ``primary_limit``, ``primary_idle``: see ``PRIMARY_LIMIT``, ``PRIMARY_IDLE``."""
        self.settings = settings
        self._controls = controls
        self._resolver = resolver
        self._known_valid = known_valid
        self._cluster = cluster
        self._observer: EngineObserver = observer if observer is not None else _Unobserved()
        tls_context = unverified_tls_context() if settings.tls is not TlsMode.NONE else None
        self._session_settings = SessionSettings(
            settings.helo_name, settings.sender, settings.tls, tls_context, settings.transcript
        )
        self._judged = LastJudged(settings.pool_max_age)
        self._slots = asyncio.Semaphore(settings.max_probes)
        self._inflight: dict[str, asyncio.Future[ProbeResult]] = {}
        # Least recently probed first.
        self._primaries: OrderedDict[str, _Primary] = OrderedDict()
        self._primary_limit = max(1, primary_limit)
        # Forgetting a primary must not cut its breaker's cooldown short, close its
        # sessions before the pool would, or give back budget tokens before their time.
        rate = settings.primary_rate
        self._primary_idle = max(
            primary_idle,
            settings.breaker_cooldown,
            settings.pool_idle,
            burst_for(rate) / rate if rate > 0 else 0.0,
        )
        self._closing: set[asyncio.Task[None]] = set()
        self._janitor: asyncio.Task[None] | None = None
        self._observer.watch_primaries(self.primary_states)

    # -- per primary --------------------------------------------------------------------

    def _primary(self, name: str) -> _Primary:
        """The state of the primary ``name`` (``Expansion.primary_of``), made the most
        recently used and counted as in use (``active``) until the caller's ``_Visit``
        settles."""
        now = time.monotonic()
        primary = self._primaries.get(name)
        if primary is not None:
            self._primaries.move_to_end(name)
        else:
            breaker = Breaker(
                failures=self.settings.breaker_failures, cooldown=self.settings.breaker_cooldown
            )
            rate = self.settings.primary_rate
            primary = _Primary(
                name=name,
                breaker=breaker,
                sender=self.settings.sender,
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
                size=self.settings.pool_size,
                idle=self.settings.pool_idle,
                max_age=self.settings.pool_max_age,
                on_open=lambda: observer.connection_opened(name),
            )
            self._primaries[name] = primary
        primary.used_at = now
        primary.active += 1
        # After the count: the primary asked for is never the one forgotten. Primaries
        # kept over the limit while in use go at a later call.
        self._make_room(self._primary_limit)
        return primary

    def _make_room(self, limit: int) -> None:
        """Forget the least recently probed primaries without a probe in flight until
        at most ``limit`` are left."""
        excess = len(self._primaries) - limit
        if excess <= 0:
            return
        victims: list[str] = []
        for name, primary in self._primaries.items():
            if len(victims) >= excess:
                break
            if not primary.active:
                victims.append(name)
        for name in victims:
            self._drop(name)

    def _prune(self, now: float) -> None:
        """Forget the primaries without a probe for ``primary_idle`` seconds."""
        victims: list[str] = []
        for name, primary in self._primaries.items():
            if now - primary.used_at < self._primary_idle:
                break  # least recently probed first: the rest are younger
            if not primary.active:
                victims.append(name)
        for name in victims:
            self._drop(name)

    def _drop(self, name: str) -> None:
        primary = self._primaries.pop(name)
        self._observer.primary_dropped(name)
        if primary.pool.open_sessions:
            # Only idle sessions (no probe in flight): QUIT them, as aclose() would.
            task = asyncio.get_running_loop().create_task(primary.pool.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def primary_states(self) -> list[PrimaryState]:
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
            for p in self._primaries.values()
        ]

    @property
    def has_free_slot(self) -> bool:
        """A probe started now would not wait for a slot."""
        return not self._slots.locked()

    def breaker_state(self, primary: Nexthop | str) -> State:
        """The breaker of a primary: a literal nexthop, or a name (``mx.example.com:25``)."""
        state = self._primaries.get(str(primary))
        return State.CLOSED if state is None else state.breaker.state

    # -- probing --------------------------------------------------------------------

    async def probe(
        self,
        address: str,
        hops: Sequence[Nexthop],
        *,
        recheck: bool = False,
        background: bool = False,
    ) -> ProbeResult:
        """Probe ``address`` (already normalized), sharing a probe already in flight.

        The first request runs the probe itself (no extra task: this is the hot path);
        the ones that arrive meanwhile wait on a future that it fills. ``recheck``: probe
        even when the address is in the cache (a refresh near the end of its TTL).
        ``background``: nobody waits for the answer (a refresh, a catch-all check): it
        takes a primary's budget token only if one is there now, never waits for one."""
        shared = self._inflight.get(address)
        if shared is not None:
            self._observer.coalesced_wait()
            return await asyncio.shield(shared)
        if not recheck and self._known_valid is not None and address in self._known_valid:
            # A probe of this address ended after the caller missed the cache.
            self._observer.coalesced_wait()
            return self._already_valid(hops)
        shared = asyncio.get_running_loop().create_future()
        self._inflight[address] = shared
        try:
            if self._cluster is None:
                result = await self._within_slots(address, tuple(hops), background)
            else:
                result = await self._cluster.probe(
                    address,
                    tuple(hops),
                    recheck,
                    lambda: self._within_slots(address, tuple(hops), background),
                )
        except BaseException as exc:
            del self._inflight[address]
            # The waiters get an undecided answer; the error goes to this caller only.
            shared.set_result(ProbeResult.not_probed(None, hops, f"probe abandoned: {exc!r}"))
            raise
        # The answer is in the cache before the in-flight entry goes: a request arriving
        # in between finds one or the other, never neither.
        # (A shared hit is already cached, for the time it has left.)
        if (
            result.verdict is Verdict.VALID
            and result.basis is not Basis.SHARED
            and self._known_valid is not None
        ):
            self._known_valid.add(address)
        del self._inflight[address]
        shared.set_result(result)
        return result

    def _already_valid(self, hops: Sequence[Nexthop]) -> ProbeResult:
        return ProbeResult(
            Verdict.VALID,
            Stage.RCPT,
            None,
            "valid: a probe of this address ended a moment ago",
            0.0,
            str(hops[0]) if hops else "",
            basis=Basis.ACCEPTED,
            why="a probe of the same address that ended a moment ago found it valid",
        )

    async def _within_slots(
        self, address: str, hops: tuple[Nexthop, ...], background: bool
    ) -> ProbeResult:
        self._ensure_janitor()
        # What is left of probe_wait after the wait for a slot may go to a primary's
        # budget; a background probe may not wait for it at all.
        wait_until = time.monotonic() + (0.0 if background else self.settings.probe_wait)
        if self._slots.locked():
            wait = self.settings.probe_wait
            try:
                if wait <= 0:
                    raise TimeoutError
                # asyncio.timeout, not wait_for: a slot acquired just as the wait ends
                # must not be lost.
                async with asyncio.timeout(wait):
                    await self._slots.acquire()
            except TimeoutError:
                return ProbeResult.not_probed(
                    Skip.OVERLOAD, hops, f"no probe slot within {wait:g}s"
                )
        else:
            await self._slots.acquire()
        self._observer.probe_started()
        result: ProbeResult | None = None
        try:
            result = await self._with_failover(address, hops, wait_until)
        finally:
            self._observer.probe_ended(result)
            self._slots.release()
        return result

    async def _with_failover(
        self, address: str, hops: tuple[Nexthop, ...], wait_until: float
    ) -> ProbeResult:
        """Failover: each nexthop in order, all within one deadline. A nexthop over its
        budget (no token by ``wait_until``) is skipped like one marked down."""
        started = time.monotonic()
        deadline = started + self.settings.timeout
        expansion = Expansion(hops)
        if any(hop.mx for hop in hops):
            try:
                expansion = await self._expand(hops, address.rpartition("@")[2], deadline)
            except NoSuchDomain as exc:
                log.info(
                    "no such domain for %s: %s", escape(address), escape(str(exc), spaces=True)
                )
                return _no_domain(hops, exc, time.monotonic() - started)
            except RouteUnavailable as exc:
                log.info(
                    "no host to probe for %s: %s", escape(address), escape(str(exc), spaces=True)
                )
                return ProbeResult.not_probed(Skip.ROUTE_FAILED, hops, f"route: {exc}")
        hops, secondary = expansion.hops, expansion.secondary
        result: ProbeResult | None = None
        visits: dict[str, _Visit] = {}
        try:
            for hop in self._in_order(expansion):
                name = expansion.primary_of(hop)
                visit = visits.get(name)
                if visit is None:
                    # The first address of a primary in this probe: its breaker and its
                    # budget are asked once for all of its addresses.
                    visit = visits[name] = _Visit(self._primary(name))
                    visit.admission = visit.primary.breaker.allow()
                    if visit.admission is not None:
                        skipped = await self._spend(visit, hop, wait_until, deadline)
                        if skipped is not None:
                            result = skipped
                if visit.admission is None or visit.over_budget:
                    continue
                primary = visit.primary
                # A reused session may be to another address of the primary: a tempfail
                # there still leaves this address to try.
                while hop not in visit.tried:
                    budget = deadline - time.monotonic()
                    if budget <= 0:
                        if result is None:
                            return ProbeResult.not_probed(
                                Skip.PRIMARY_DOWN, hops, "every primary is marked down"
                            )
                        return result
                    try:
                        result, used = await self._at_primary(
                            primary, hop, visit.tried, address, started, budget
                        )
                    except _Queued as queued:
                        # Every session to this primary was busy for the whole budget:
                        # that says nothing about whether it is down, so the breaker is
                        # not moved.
                        result = queued.result
                        break
                    visit.tried.add(used)
                    if result.reached:
                        visit.reached = True
                        primary.failing.pop(used, None)
                    else:
                        visit.failed = True
                        primary.note_failing(used)
                    primary.reached = result.reached
                    if hop in secondary and result.verdict is not Verdict.TEMPFAIL:
                        result = _secondary(result)
                    primary.last_verdict = result.verdict
                    primary.last_detail = result.detail
                    primary.last_at = time.monotonic()
                    self._note_refusal(primary, address, result)
                    if result.basis is Basis.SECONDARY:
                        # Another backup MX answered: only the primary's word counts, and
                        # the hops after it are no better. Not judged: undecided.
                        return result
                    if result.verdict is not Verdict.TEMPFAIL:
                        self._judged.record(address)
                        return result
        finally:
            for visit in visits.values():
                visit.settle()
        if result is None:
            return ProbeResult.not_probed(Skip.PRIMARY_DOWN, hops, "every primary is marked down")
        return result

    async def _spend(
        self, visit: _Visit, hop: Nexthop, wait_until: float, deadline: float
    ) -> ProbeResult | None:
        """Take a token of the visited primary's budget; the skipped result when there is
        none by ``wait_until`` (the primary's addresses are then all skipped)."""
        primary = visit.primary
        if primary.budget is None:
            return None
        spent = await primary.budget.take(min(wait_until, deadline) - time.monotonic())
        if spent:
            return None
        visit.over_budget = True
        return ProbeResult.not_probed(
            Skip.PRIMARY_BUDGET,
            (hop,),
            f"over the probe budget of {primary.name} ({primary.budget.rate:g} probes per second)",
        )

    def _in_order(self, expansion: Expansion) -> list[Nexthop]:
        """The hops in failover order: as given (the MX preference, the operator's
        order), except that among the addresses of one primary those that failed at the
        connection level recently come after the others, in the places of that
        primary's addresses (never before another primary's)."""
        hops = list(expansion.hops)
        places: dict[str, list[int]] = {}
        for index, hop in enumerate(hops):
            places.setdefault(expansion.primary_of(hop), []).append(index)
        now = time.monotonic()
        recent = self.settings.breaker_cooldown
        for name, indexes in places.items():
            primary = self._primaries.get(name)
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

    async def _expand(self, hops: tuple[Nexthop, ...], domain: str, deadline: float) -> Expansion:
        if self._resolver is None:
            raise RouteUnavailable("MX routes need a resolver")
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self._resolver.expand(hops, domain)
        except TimeoutError:
            raise RouteUnavailable("the DNS did not answer within the probe timeout") from None

    async def _at_primary(
        self,
        primary: _Primary,
        hop: Nexthop,
        tried: set[Nexthop],
        address: str,
        started: float,
        budget: float,
    ) -> tuple[ProbeResult, Nexthop]:
        """One primary: a pooled session opened after ``address`` was last judged, to an
        address of the primary not ``tried`` in this probe (a new one to ``hop``);
        retried once on a fresh session if a reused one was lost, and once with the
        fallback sender if the primary refused the sender. Returns the result and the
        address that gave it."""
        result, session = await self._on_session(primary, hop, tried, address, started, budget)
        return result, hop if session is None else session.hop

    async def _on_session(
        self,
        primary: _Primary,
        hop: Nexthop,
        tried: set[Nexthop],
        address: str,
        started: float,
        budget: float,
    ) -> tuple[ProbeResult, Session | None]:
        pool = primary.pool
        session: Session | None = None
        lost_retry = sender_retry = False
        try:
            async with asyncio.timeout(budget):
                while True:
                    session = None
                    session = await pool.acquire(
                        hop, opened_after=self._judged.since(address), avoid=tried
                    )
                    try:
                        reused = session.opened
                        if not reused:
                            await session.open()
                        result = await session.rcpt(address, started)
                    except SessionLost as exc:
                        if not reused or lost_retry:
                            return ProbeResult(
                                Verdict.TEMPFAIL,
                                session.stage,
                                None,
                                f"session lost: {exc}",
                                time.monotonic() - started,
                                str(session.hop),
                                reached=False,
                                why="the primary closed the session before it answered",
                                transcript=session.transcript,
                            ), session
                        # The primary closed an idle session (timeout, restart): the
                        # other idle ones are likely stale too; retry on a fresh one.
                        log.debug(
                            "pooled session to %s lost (%s); retrying", escape(primary.name), exc
                        )
                        lost_retry = True
                        pool.reap(drop_all=True)
                        continue
                    except BaseException:
                        session.close()
                        raise
                    finally:
                        pool.release(session)
                    if session.refused_multi_recipient:
                        self._note_shape(primary)
                    if result.basis is Basis.SENDER and not sender_retry:
                        sender_retry = self._fall_back(primary, result)
                        if sender_retry:
                            continue
                    return result, session
        except SessionFailed as exc:
            return exc.result, session
        except TimeoutError:
            if session is None:  # waited for a free session the whole time
                raise _Queued(
                    ProbeResult(
                        Verdict.TEMPFAIL,
                        Stage.CONNECT,
                        None,
                        "no free session in time",
                        time.monotonic() - started,
                        str(hop),
                    )
                ) from None
            return session.timed_out(budget, started), session

    def _fall_back(self, primary: _Primary, result: ProbeResult) -> bool:
        """Switch ``primary`` to the fallback sender; False if there is none to switch to."""
        fallback = self.settings.fallback_sender
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

    def _note_shape(self, primary: _Primary) -> None:
        """A session of ``primary`` had a later RCPT of a transaction refused with
        ``5.5.3``: one recipient per transaction from now on, or the fallback sender
        (with a real sender, multi-recipient transactions are no bounces)."""
        if primary.shape_noted:
            return
        primary.shape_noted = True
        fallback = self.settings.fallback_sender
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

    def _note_drift(self, primary: _Primary, address: str, result: ProbeResult) -> None:
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

    def _note_refusal(self, primary: _Primary, address: str, result: ProbeResult) -> None:
        """Count a refusal of the prober and log it once per primary and kind (and per
        domain for an unproven one); note when the primary judges recipients again."""
        basis = result.basis
        if basis is Basis.DRIFT:
            self._note_drift(primary, address, result)
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
                _ADVICE[basis].format(domain=escape(domain), helo=self.settings.helo_name),
            )
        elif result.verdict is not Verdict.TEMPFAIL:
            primary.refusing = False
            if primary.warned:
                primary.warned.clear()
                log.info("primary %s judges callahead's probes again", escape(primary.name))

    # -- housekeeping -------------------------------------------------------------------

    def _ensure_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        interval = max(0.2, min(self.settings.pool_idle / 2, 5.0))
        while True:
            await asyncio.sleep(interval)
            for primary in self._primaries.values():
                primary.pool.reap()
            self._prune(time.monotonic())

    async def aclose(self) -> None:
        """Close every pooled session (QUIT where polite)."""
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
            self._janitor = None
        for primary in self._primaries.values():
            await primary.pool.aclose()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=3)


def _secondary(result: ProbeResult) -> ProbeResult:
    """A valid or unknown answer of a secondary hop, made undecided."""
    return replace(
        result,
        verdict=Verdict.TEMPFAIL,
        basis=Basis.SECONDARY,
        why=(
            f"{result.primary} is not in the most-preferred MX group of the domain: it is "
            "another backup MX, which accepts every address while the primary is down, so "
            f"its {result.verdict.value} answer ({result.why or result.basis.value}) is "
            "not the primary's word: undecided, not cached, not shared"
        ),
    )


def _no_domain(hops: Sequence[Nexthop], exc: NoSuchDomain, duration: float) -> ProbeResult:
    """The recipient domain of an MX route does not exist or accepts no mail."""
    return ProbeResult(
        Verdict.UNKNOWN,
        Stage.CONNECT,
        None,
        f"route: {exc}",
        duration,
        str(hops[0]) if hops else "",
        reached=False,
        basis=Basis.NO_DOMAIN,
        why=(
            "the DNS says the recipient domain does not exist (NXDOMAIN) or accepts no "
            "mail (RFC 7505 null MX): unknown (550 5.1.2), as Postfix's "
            "reject_unknown_recipient_domain answers"
        ),
    )


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
class _Primary:
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
class _Visit:
    """One probe at one primary, over every address of it the probe tries."""

    primary: _Primary
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


class _Queued(CallaheadError):
    """Internal: a probe timed out waiting for a free session of a busy primary."""

    def __init__(self, result: ProbeResult) -> None:
        super().__init__(result.detail)
        self.result = result
