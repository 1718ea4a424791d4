"""What the probe engine is configured with, and what it tells and asks of its
neighbours: its settings, the state of a primary as it reports it, its observer (the
metrics), the cluster gate in front of it (the shared cache) and the resolver of MX
routes. Types only, so that the engine's parts and the layers above share them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..routing.routes import Expansion, Nexthop
from ..smtp.tls import TlsMode
from ..smtp.verdict import Basis, ProbeResult, Verdict


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
    pipelining: bool = True
    """Pipeline where the primary offers PIPELINING (session.py, pool.py)."""

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

    def session_shared(self, primary: str) -> None:
        """A probe joined a busy (pipelined) session of ``primary``."""

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


class Unobserved:
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

    def session_shared(self, primary: str) -> None:
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
