"""The decision for one recipient, with no I/O of its own.

The policy looks up the route, consults the positive cache, asks a ``Prober`` when it
must, and maps the verdict to an action. It never talks to the network itself: the
prober is handed in, so tests drive it with a fake one.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .address import UnsendableAddress, normalize_recipient, wire_address
from .cache import ValidCache
from .guard import ClientGuard
from .routes import Nexthop, Routes, RouteUnavailable
from .verdict import ProbeResult, Skip, Verdict


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
    PROBE_VALID = "probe_valid"
    PROBE_UNKNOWN = "probe_unknown"
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
    ERROR = "error"


class Prober(Protocol):
    """Answers one probe synchronously; the real one runs it on the probe loop."""

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """What the sender is told, in every front end's protocol."""

    code: str
    xcode: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.code.startswith("5")


# No reply names the primary or repeats its words: the sender learns only the verdict.
REJECT_REPLY = Reply("550", "5.1.1", "Recipient address rejected: User unknown")
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

    @property
    def reply(self) -> Reply | None:
        """The reply the front end gives; None: no opinion (Postfix goes on)."""
        if self.action is Action.REJECT:
            return REJECT_REPLY
        if self.action is Action.DEFER:
            return CLIENT_LIMIT_REPLY if self.reason is Reason.CLIENT_LIMIT else DEFER_REPLY
        return None


class Policy:
    def __init__(
        self,
        *,
        routes: Routes,
        cache: ValidCache,
        prober: Prober,
        tempfail_action: TempfailAction,
        guard: ClientGuard | None = None,
    ) -> None:
        self._routes = routes
        self._cache = cache
        self._prober = prober
        self._guard = guard if guard is not None else ClientGuard(limit=0, window=0)
        self._undecided = (
            Action.ACCEPT if tempfail_action is TempfailAction.ACCEPT else Action.DEFER
        )

    @property
    def guard_enabled(self) -> bool:
        return self._guard.enabled

    def tempfail_decision(self, address: str, reason: Reason) -> Decision:
        """The answer when nothing can be decided: the configured tempfail action."""
        return Decision(self._undecided, reason, address)

    def decide(self, recipient: str, client: str | None = None) -> Decision:
        """Judge one recipient; ``client`` is the SMTP client's address, if known."""
        normalized = normalize_recipient(recipient)
        if normalized is None:
            return Decision(Action.SKIP, Reason.UNROUTED, recipient)
        address = normalized.address
        try:
            hops = self._routes.lookup(normalized.domain, address)
        except RouteUnavailable:
            return self.tempfail_decision(address, Reason.ROUTE_FAILED)
        if not hops:
            return Decision(Action.SKIP, Reason.UNROUTED, address)
        if address in self._cache:
            return Decision(Action.ACCEPT, Reason.CACHE_HIT, address)
        if self._guard.blocked(client):
            return Decision(Action.DEFER, Reason.CLIENT_LIMIT, address)
        try:
            wire_address(address, allow_utf8=True)
        except UnsendableAddress:
            return self.tempfail_decision(address, Reason.BAD_ADDRESS)
        result = self._prober.probe(address, hops)
        if result.verdict is Verdict.VALID:
            self._cache.add(address)
            return Decision(Action.ACCEPT, Reason.PROBE_VALID, address, result)
        if result.verdict is Verdict.UNKNOWN:
            self._guard.record_unknown(client)
            return Decision(Action.REJECT, Reason.PROBE_UNKNOWN, address, result)
        reason = Reason.PROBE_TEMPFAIL
        if result.basis.refuses_prober:
            reason = Reason.PROBER_REFUSED
        elif result.skipped is Skip.OVERLOAD:
            reason = Reason.OVERLOAD
        elif result.skipped is Skip.PRIMARY_DOWN:
            reason = Reason.PRIMARY_DOWN
        elif result.skipped is Skip.LOOP_STALLED:
            reason = Reason.LOOP_STALLED
        elif result.skipped is Skip.SHUTDOWN:
            reason = Reason.SHUTDOWN
        elif result.skipped is Skip.ROUTE_FAILED:
            reason = Reason.ROUTE_FAILED
        return Decision(self._undecided, reason, address, result)
