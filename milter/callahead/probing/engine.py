"""The probe engine: every probe callahead makes goes through here, on the probe loop.

* **Coalescing**: concurrent requests for the same address share one probe.
* **What is kept**: a valid answer goes into the cache (``known_valid``), and through the
  cluster gate to Redis; a probe with ``keep=False`` (a catch-all check's made-up
  address) keeps and shares nothing, and never asks the gate.
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
* **A primary that verifies by itself** (a Postfix edge with
  ``reject_unverified_recipient``): "Address verification in progress" is asked again
  on new sessions, after short pauses, within the probe's deadline (see reask.py).
* **A probe budget** per primary (see budget.py, ``primary_rate``): a probe waits for a
  token within what is left of ``probe_wait``, or is skipped (``primary_budget``);
  background probes (refresh, catch-all checks) take a token only if one is there. A
  probe takes one token of a primary however many of its addresses it tries; then one
  of the primary's site budget (``site_budget``: every backup sharing a Redis), when
  there is one, within the same wait.
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
import time
from collections.abc import Sequence

from ..routing.routes import Nexthop
from ..smtp.evidence import ControlSource
from ..smtp.session import SessionSettings
from ..smtp.tls import TlsMode, unverified_tls_context
from ..smtp.verdict import Basis, ProbeResult, Skip, Stage, Verdict
from .breaker import State
from .budget import SiteBudget
from .enginetypes import (
    ClusterGate,
    EngineObserver,
    EngineSettings,
    HopResolver,
    PrimaryState,
    Unobserved,
)
from .failover import Failover
from .freshness import LastJudged
from .primaries import PRIMARY_IDLE, PRIMARY_LIMIT, Primaries
from .validcache import ValidCache

__all__ = [
    "ClusterGate",
    "EngineObserver",
    "EngineSettings",
    "HopResolver",
    "PrimaryState",
    "ProbeEngine",
]
"""The engine's public face: its settings and neighbours' types live in enginetypes.py,
and are named here too, where callers have always found them."""


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
        site_budget: SiteBudget | None = None,
        primary_limit: int = PRIMARY_LIMIT,
        primary_idle: float = PRIMARY_IDLE,
    ) -> None:
        """``controls``: recently verified addresses per domain, asked as controls when
        a primary rejects a recipient (session.py); None: postmaster@ only.
        ``site_budget``: each primary's budget over every backup of the site, asked
        after its own (budget.py); None: this callahead's budget alone.
        ``primary_limit``, ``primary_idle``: see ``PRIMARY_LIMIT``, ``PRIMARY_IDLE``."""
        self.settings = settings
        self._known_valid = known_valid
        self._cluster = cluster
        self._observer: EngineObserver = observer if observer is not None else Unobserved()
        tls_context = unverified_tls_context() if settings.tls is not TlsMode.NONE else None
        session_settings = SessionSettings(
            settings.helo_name,
            settings.sender,
            settings.tls,
            tls_context,
            settings.transcript,
            settings.pipelining,
        )
        self._judged = LastJudged(settings.pool_max_age)
        self._slots = asyncio.Semaphore(settings.max_probes)
        self._inflight: dict[str, asyncio.Future[ProbeResult]] = {}
        self._primaries = Primaries(
            settings,
            session_settings,
            self._observer,
            controls,
            limit=primary_limit,
            idle=primary_idle,
        )
        self._failover = Failover(settings, self._primaries, self._judged, resolver, site_budget)
        self._janitor: asyncio.Task[None] | None = None
        self._observer.watch_primaries(self.primary_states)

    # -- per primary --------------------------------------------------------------------

    def primary_states(self) -> list[PrimaryState]:
        """Every primary probed so far, as it is now."""
        return self._primaries.states()

    @property
    def has_free_slot(self) -> bool:
        """A probe started now would not wait for a slot."""
        return not self._slots.locked()

    def breaker_state(self, primary: Nexthop | str) -> State:
        """The breaker of a primary: a literal nexthop, or a name (``mx.example.com:25``)."""
        return self._primaries.breaker_state(primary)

    # -- probing --------------------------------------------------------------------

    async def probe(
        self,
        address: str,
        hops: Sequence[Nexthop],
        *,
        recheck: bool = False,
        background: bool = False,
        keep: bool = True,
    ) -> ProbeResult:
        """Probe ``address`` (already normalized), sharing a probe already in flight.

        The first request runs the probe itself (no extra task: this is the hot path);
        the ones that arrive meanwhile wait on a future that it fills. ``recheck``: probe
        even when the address is in the cache (a refresh near the end of its TTL).
        ``background``: nobody waits for the answer (a refresh, a catch-all check): it
        takes a primary's budget token only if one is there now, never waits for one.
        ``keep=False``: the answer is the caller's alone (a catch-all check's made-up
        address): never cached, so never a control, and the cluster gate is not asked,
        so nothing of the probe reaches Redis (no lookup, lock, entry or control)."""
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
            if self._cluster is None or not keep:
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
            keep
            and result.verdict is Verdict.VALID
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
            result = await self._failover.run(address, hops, wait_until)
        finally:
            self._observer.probe_ended(result)
            self._slots.release()
        return result

    # -- housekeeping -------------------------------------------------------------------

    def _ensure_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        interval = max(0.2, min(self.settings.pool_idle / 2, 5.0))
        while True:
            await asyncio.sleep(interval)
            self._primaries.reap()

    async def aclose(self) -> None:
        """Close every pooled session (QUIT where polite)."""
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
            self._janitor = None
        await self._primaries.aclose()
