"""The decision for one recipient, with no I/O of its own.

The policy looks up the route, consults the positive cache, asks a ``Prober`` when it
must, and maps the verdict to an action. It never talks to the network itself: the
prober is handed in, so tests drive it with a fake one.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..base.address import (
    Recipient,
    UnsendableAddress,
    is_utf8,
    normalize_recipient,
    wire_address,
)
from ..probing.validcache import ValidCache
from ..routing.routes import Nexthop, Routes, RouteUnavailable
from ..smtp.verdict import Basis, ProbeResult, Skip, Verdict
from .guard import ClientGuard


class TempfailAction(enum.Enum):
    """What a recipient gets when the probe cannot decide."""

    ACCEPT = "accept"
    DEFER = "defer"


class Action(enum.Enum):
    """What the sender is told. The values are the ``decision`` metric label."""

    ACCEPT = "accept"
    REJECT = "reject"
    DEFER = "defer"
    SKIP = "skip"


class Reason(enum.Enum):
    """Why. The values are the ``reason`` metric label."""

    CACHE_HIT = "cache_hit"
    SHARED_CACHE_HIT = "shared_cache_hit"
    PROBE_VALID = "probe_valid"
    PROBE_UNKNOWN = "probe_unknown"
    NO_DOMAIN = "no_domain"
    """The recipient domain does not exist (NXDOMAIN) or accepts no mail (null MX)."""
    PROBE_TEMPFAIL = "probe_tempfail"
    PROBER_REFUSED = "prober_refused"
    UNROUTED = "unrouted"
    BAD_ADDRESS = "bad_address"
    OVERLOAD = "overload"
    PRIMARY_DOWN = "primary_down"
    CLIENT_LIMIT = "client_limit"
    SHUTDOWN = "shutdown"
    LOOP_STALLED = "loop_stalled"
    ROUTE_FAILED = "route_failed"
    PRIMARY_BUDGET = "primary_budget"
    ACCEPTS_ALL = "accepts_all"
    ERROR = "error"


_SKIPPED = {skip: Reason(skip.value) for skip in Skip}
"""Why no probe was made, as the reason of the decision: each ``Skip`` has the
``Reason`` of the same name (built at import, so a new one without it fails at once)."""


class Prober(Protocol):
    """Answers probes; the real one (loop.LoopProber) runs them on the probe loop."""

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        """From a thread that is not the probe loop's (a libmilter thread): waits."""

    async def probe_async(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        """On the probe loop (the policy service)."""


class Refresher(Protocol):
    """Verifies a cached address again in the background (refresh.py is the real one);
    returns at once, whether or not it takes the work."""

    def refresh(self, address: str, hops: Sequence[Nexthop]) -> None: ...


class _NoRefresh:
    def refresh(self, address: str, hops: Sequence[Nexthop]) -> None:
        pass


class CatchAll(Protocol):
    """Knows which route entries' primaries accept every address (catchall.py is the
    real one); both calls return at once."""

    def accepts_all(self, route: str) -> bool:
        """From memory: did the last check find ``route``'s primary accepting all?"""

    def check_if_due(self, route: str, hops: Sequence[Nexthop]) -> None:
        """Start a check of ``route`` in the background if one is due."""


class _NoCatchAll:
    def accepts_all(self, route: str) -> bool:
        return False

    def check_if_due(self, route: str, hops: Sequence[Nexthop]) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Reply:
    """What the sender is told, in every front end's protocol."""

    code: str
    xcode: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.code.startswith("5")


RECIPIENT_REJECTED = "Recipient address rejected: "
"""How Postfix's own recipient restrictions begin their text. A milter's reply goes out
as it is; Postfix puts ``<rcpt>: Recipient address rejected: `` in front of a policy
service's action text itself, so the policy service leaves it out."""

# No reply names the primary or repeats its words: the sender learns only the verdict.
REJECT_REPLY = Reply("550", "5.1.1", RECIPIENT_REJECTED + "User unknown")
NO_DOMAIN_REPLY = Reply("550", "5.1.2", RECIPIENT_REJECTED + "Domain not found")
DEFER_REPLY = Reply(
    "451", "4.4.3", "Recipient address verification temporarily unavailable, try again later"
)
CLIENT_LIMIT_REPLY = Reply("450", "4.7.1", "Too many unknown recipients, try again later")


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: Reason
    address: str
    """The recipient as it was judged (angle brackets removed, domain normalized)."""
    probe: ProbeResult | None = None
    dry_run: bool = False
    """``CALLAHEAD_DRY_RUN``: ``action`` is what would have happened; nothing is
    rejected or deferred."""

    @property
    def reply(self) -> Reply | None:
        """The reply the front end gives; None: no opinion (Postfix goes on)."""
        if self.dry_run:
            return None
        if self.action is Action.REJECT:
            return NO_DOMAIN_REPLY if self.reason is Reason.NO_DOMAIN else REJECT_REPLY
        if self.action is Action.DEFER:
            return CLIENT_LIMIT_REPLY if self.reason is Reason.CLIENT_LIMIT else DEFER_REPLY
        return None


@dataclass(frozen=True, slots=True)
class _ToProbe:
    address: str
    hops: tuple[Nexthop, ...]
    client: str | None


class Policy:
    """The decision core, shared by every front end."""

    def __init__(
        self,
        *,
        routes: Routes,
        cache: ValidCache,
        prober: Prober,
        tempfail_action: TempfailAction,
        guard: ClientGuard | None = None,
        dry_run: bool = False,
        refresher: Refresher | None = None,
        refresh_within: float = 0.0,
        catchall: CatchAll | None = None,
    ) -> None:
        """``refresh_within``: a cached address asked for with less than this many
        seconds left is handed to ``refresher`` (0: never). ``catchall``: which domains
        accept all (their recipients are accepted without a probe); None: no checks."""
        self._routes = routes
        self._cache = cache
        self._prober = prober
        self._guard = guard if guard is not None else ClientGuard(limit=0, window=0)
        self._undecided = (
            Action.ACCEPT if tempfail_action is TempfailAction.ACCEPT else Action.DEFER
        )
        self._dry_run = dry_run
        self._refresher: Refresher = refresher if refresher is not None else _NoRefresh()
        self._refresh_within = refresh_within
        self._catchall: CatchAll = catchall if catchall is not None else _NoCatchAll()

    @property
    def guard_enabled(self) -> bool:
        return self._guard.enabled

    def tempfail_decision(self, address: str, reason: Reason) -> Decision:
        """The answer when nothing can be decided: the configured tempfail action."""
        return self._final(Decision(self._undecided, reason, address))

    def decide(self, recipient: str, client: str | None = None) -> Decision:
        """Judge one recipient; ``client`` is the SMTP client's address, if known.
        From a thread other than the probe loop's: a route lookup or a probe on the
        loop is waited for."""
        normalized = self._screen(recipient)
        if isinstance(normalized, Decision):
            return self._final(normalized)
        try:
            hops = self._routes.lookup(normalized.domain, normalized.address)
        except RouteUnavailable:
            hops = None
        step = self._before_probe(normalized, hops, client)
        if isinstance(step, Decision):
            return self._final(step)
        return self._final(self._after_probe(step, self._prober.probe(step.address, step.hops)))

    async def decide_async(self, recipient: str, client: str | None = None) -> Decision:
        """``decide`` for a front end running on the probe loop itself."""
        normalized = self._screen(recipient)
        if isinstance(normalized, Decision):
            return self._final(normalized)
        try:
            hops = await self._routes.lookup_async(normalized.domain, normalized.address)
        except RouteUnavailable:
            hops = None
        step = self._before_probe(normalized, hops, client)
        if isinstance(step, Decision):
            return self._final(step)
        result = await self._prober.probe_async(step.address, step.hops)
        return self._final(self._after_probe(step, result))

    def _screen(self, recipient: str) -> Recipient | Decision:
        """The recipient normalized, or the decision when it cannot be routed at all
        (no local part or domain: skipped; not UTF-8: the tempfail action)."""
        normalized = normalize_recipient(recipient)
        if normalized is None:
            return Decision(Action.SKIP, Reason.UNROUTED, recipient)
        if not is_utf8(normalized.address):
            return self._not_utf8(normalized.address)
        return normalized

    def _not_utf8(self, address: str) -> Decision:
        """Bytes that are not UTF-8 (a real Postfix refuses them itself, 500 5.5.2 or
        501 5.1.3, but another client of the policy service or the milter may not): no
        route can be looked up for them (the Postfix maps take UTF-8), so they are judged
        before routing, with the tempfail action: never a reject, never an error."""
        return Decision(self._undecided, Reason.BAD_ADDRESS, address)

    def _final(self, decision: Decision) -> Decision:
        if self._dry_run and decision.action in (Action.REJECT, Action.DEFER):
            return dataclasses.replace(decision, dry_run=True)
        return decision

    def _before_probe(
        self, normalized: Recipient, hops: tuple[Nexthop, ...] | None, client: str | None
    ) -> Decision | _ToProbe:
        """Everything decided without a probe, or what to probe. ``hops`` None: the
        route could not be looked up now. ``route``: the route entry that routes the
        domain (for catch-all detection), empty when none is checked."""
        address = normalized.address
        route = self._routes.route_key(normalized.domain)
        if hops is None:
            return Decision(self._undecided, Reason.ROUTE_FAILED, address)
        if not hops:
            return Decision(Action.SKIP, Reason.UNROUTED, address)
        if route:
            self._catchall.check_if_due(route, hops)
        left = self._cache.remaining(address)
        if left is not None:
            if left < self._refresh_within:
                self._refresher.refresh(address, hops)
            return Decision(Action.ACCEPT, Reason.CACHE_HIT, address)
        if self._guard.blocked(client):
            return Decision(Action.DEFER, Reason.CLIENT_LIMIT, address)
        try:
            wire_address(address, allow_utf8=True)
        except UnsendableAddress:
            return Decision(self._undecided, Reason.BAD_ADDRESS, address)
        if route and self._catchall.accepts_all(route):
            # Its primary accepts any address: a probe would say nothing. Never a
            # tempfail either: the primary takes the mail.
            return Decision(Action.ACCEPT, Reason.ACCEPTS_ALL, address)
        return _ToProbe(address, hops, client)

    def _after_probe(self, step: _ToProbe, result: ProbeResult) -> Decision:
        address, client = step.address, step.client
        if result.verdict is Verdict.VALID and result.basis is Basis.SHARED:
            # Found in the shared cache (Redis), which cached it locally for its time left.
            return Decision(Action.ACCEPT, Reason.SHARED_CACHE_HIT, address, result)
        if result.verdict is Verdict.VALID:
            self._cache.add(address)
            return Decision(Action.ACCEPT, Reason.PROBE_VALID, address, result)
        if result.verdict is Verdict.UNKNOWN:
            self._guard.record_unknown(client)
            reason = Reason.NO_DOMAIN if result.basis is Basis.NO_DOMAIN else Reason.PROBE_UNKNOWN
            return Decision(Action.REJECT, reason, address, result)
        if result.basis.refuses_prober:
            reason = Reason.PROBER_REFUSED
        elif result.skipped is not None:
            reason = _SKIPPED[result.skipped]
        else:
            reason = Reason.PROBE_TEMPFAIL
        return Decision(self._undecided, reason, address, result)
