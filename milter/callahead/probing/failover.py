"""Failover: one probe over a domain's nexthops, in order, within one deadline.

MX routes are expanded first (a recipient domain that does not exist is unknown without
a probe). For each primary met on the way its breaker admits the probe once and its
budget gives one token (then its site budget, when several backups share one: see
budget.py), however many of its addresses are tried; each address is asked
on a pooled session opened after the recipient was last judged (a current view), again
on a fresh session when a reused one was lost, and once with the fallback sender when
the sender is refused; and again on new sessions while the primary's own verification
of the address is in progress (reask.py). A tempfail tries the next address, a definite
answer ends the search, and the answer of a secondary MX host is undecided (see
engine.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from ..base.errors import CallaheadError
from ..base.logfmt import escape
from ..routing.routes import Expansion, Nexthop, NoSuchDomain, RouteUnavailable
from ..smtp.session import Session, SessionFailed, SessionLost
from ..smtp.verdict import Basis, ProbeResult, Skip, Stage, Verdict
from ..smtp.verifying import verification_in_progress
from .budget import SiteBudget
from .enginetypes import EngineSettings, HopResolver
from .freshness import LastJudged
from .primaries import Primaries, Primary, Visit
from .reask import ask_while_verifying

log = logging.getLogger("callahead.engine")


class Failover:
    def __init__(
        self,
        settings: EngineSettings,
        primaries: Primaries,
        judged: LastJudged,
        resolver: HopResolver | None,
        site: SiteBudget | None = None,
    ) -> None:
        self._settings = settings
        self._primaries = primaries
        self._judged = judged
        self._resolver = resolver
        self._site = site

    async def run(self, address: str, hops: tuple[Nexthop, ...], wait_until: float) -> ProbeResult:
        """Failover: each nexthop in order, all within one deadline. A nexthop over its
        budget (no token by ``wait_until``) is skipped like one marked down."""
        started = time.monotonic()
        deadline = started + self._settings.timeout
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
        visits: dict[str, Visit] = {}
        try:
            for hop in self._primaries.in_order(expansion):
                name = expansion.primary_of(hop)
                visit = visits.get(name)
                if visit is None:
                    # The first address of a primary in this probe: its breaker and its
                    # budget are asked once for all of its addresses.
                    visit = visits[name] = Visit(self._primaries.get(name))
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
                        result, session = await self._on_session(
                            primary, hop, visit.tried, address, started, budget
                        )
                    except Queued as queued:
                        # Every session to this primary was busy for the whole budget:
                        # that says nothing about whether it is down, so the breaker is
                        # not moved.
                        result = queued.result
                        break
                    if verification_in_progress(result):
                        again = functools.partial(
                            self._again, primary, hop, visit.tried, address, started, deadline
                        )
                        result, session = await ask_while_verifying(
                            result, session, again, deadline, address
                        )
                    used = hop if session is None else session.hop
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
                    self._primaries.note_refusal(primary, address, result)
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
        self, visit: Visit, hop: Nexthop, wait_until: float, deadline: float
    ) -> ProbeResult | None:
        """Take a token of the visited primary's budget, then of its site budget (one
        wait in all, within ``wait_until``); the skipped result when either has none in
        time (the primary's addresses are then all skipped, and a local token taken is
        given back)."""
        primary = visit.primary
        local, site = primary.budget, self._site
        until = min(wait_until, deadline)
        if local is not None and not await local.take(until - time.monotonic()):
            return _over_budget(visit, hop, f"{local.rate:g} probes per second")
        if site is None:
            return None
        try:
            granted = await site.take(primary.name, max(0.0, until - time.monotonic()))
        except BaseException:
            if local is not None:
                local.refund()
            raise
        if granted:
            return None
        if local is not None:
            local.refund()
        return _over_budget(visit, hop, f"{site.rate:g} probes per second over every backup")

    async def _expand(self, hops: tuple[Nexthop, ...], domain: str, deadline: float) -> Expansion:
        if self._resolver is None:
            raise RouteUnavailable("MX routes need a resolver")
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self._resolver.expand(hops, domain)
        except TimeoutError:
            raise RouteUnavailable("the DNS did not answer within the probe timeout") from None

    async def _on_session(
        self,
        primary: Primary,
        hop: Nexthop,
        tried: set[Nexthop],
        address: str,
        started: float,
        budget: float,
        opened_after: float = float("-inf"),
    ) -> tuple[ProbeResult, Session | None]:
        """One primary: a pooled session opened after ``address`` was last judged (and
        after ``opened_after``), to an address of the primary not ``tried`` in this probe
        (a new one to ``hop``);
        retried once on a fresh session if a reused one was lost, and once with the
        fallback sender if the primary refused the sender. Returns the result and the
        session that gave it (None: no session was had)."""
        pool = primary.pool
        domain = address.rpartition("@")[2]
        session: Session | None = None
        lost_retry = sender_retry = queued = False
        try:
            async with asyncio.timeout(budget):
                while True:
                    session = None
                    session = await pool.acquire(
                        hop,
                        opened_after=max(self._judged.since(address), opened_after),
                        avoid=tried,
                        domain=domain,
                    )
                    mark: int | None = None
                    try:
                        reused = session.opened
                        if not reused:
                            await session.open()
                        mark = session.answered
                        result = await session.rcpt(address, started)
                    except SessionLost as exc:
                        if not reused or lost_retry:
                            return session.undecided(
                                session.stage,
                                f"session lost: {exc}",
                                started,
                                "the primary closed the session before it answered",
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
                        # Given up (the deadline, a cancellation). Behind other probes on
                        # a shared session that the primary keeps answering, only this
                        # probe waited too long: the others keep the session.
                        queued = mark is not None and session.queued_behind(mark)
                        if queued:
                            session.drain()
                        else:
                            session.close()
                        raise
                    finally:
                        pool.release(session, domain)
                    if session.refused_multi_recipient:
                        self._primaries.note_shape(primary)
                    if result.basis is Basis.SENDER and not sender_retry:
                        sender_retry = self._primaries.fall_back(primary, result)
                        if sender_retry:
                            continue
                    return result, session
        except SessionFailed as exc:
            return exc.result, session
        except TimeoutError:
            if session is None:  # waited for a free session the whole time
                raise Queued(Stage.CONNECT, "no free session in time", started, hop) from None
            if queued:
                # Slow, not down: the breaker is not moved.
                raise Queued(
                    Stage.RCPT,
                    f"no reply within {budget:.3g}s, behind other probes on a shared session",
                    started,
                    session.hop,
                ) from None
            return session.timed_out(budget, started), session

    async def _again(
        self,
        primary: Primary,
        hop: Nexthop,
        tried: set[Nexthop],
        address: str,
        started: float,
        deadline: float,
        opened_after: float,
    ) -> tuple[ProbeResult, Session | None]:
        """Ask again on a session opened after ``opened_after`` (reask.py); waiting for
        a free session all the time left is no reply."""
        try:
            return await self._on_session(
                primary, hop, tried, address, started, deadline - time.monotonic(), opened_after
            )
        except Queued as queued:
            return queued.result, None


def _over_budget(visit: Visit, hop: Nexthop, budget: str) -> ProbeResult:
    visit.over_budget = True
    return ProbeResult.not_probed(
        Skip.PRIMARY_BUDGET, (hop,), f"over the probe budget of {visit.primary.name} ({budget})"
    )


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


class Queued(CallaheadError):
    """Internal: a probe spent its whole budget waiting for other probes of a busy
    primary (for a free session, or behind them on a shared one), which says nothing
    about whether the primary is down; ``result`` is undecided."""

    def __init__(self, stage: Stage, detail: str, started: float, hop: Nexthop) -> None:
        super().__init__(detail)
        self.result = ProbeResult(
            Verdict.TEMPFAIL, stage, None, detail, time.monotonic() - started, str(hop)
        )
