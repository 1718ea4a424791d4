"""Prometheus metrics. Names are part of the product: docs/reference.md lists them all."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as _client_metrics

from ..core.policy import Action, Decision, Reason
from ..probing.engine import PrimaryState
from ..smtp.verdict import Basis, ProbeResult, Verdict
from .maillog.meter import MaillogMetrics
from .metricshttp import MetricsServer
from .primarygauges import PrimariesCollector
from .redismetrics import RedisMetrics


def _disable_created_series() -> None:
    """The *_created series double the size of a scrape and tell an operator nothing
    here. prometheus-client 0.17 has ``disable_created_metrics()``; 0.16 (Debian 12's)
    reads only a module flag, set from the environment at import."""
    disable: Callable[[], None] | None = getattr(_client_metrics, "disable_created_metrics", None)
    if disable is not None:
        disable()
    else:
        setattr(_client_metrics, "_use_created", False)  # noqa: B010 (0.16's own flag)


_disable_created_series()

REFRESH_OUTCOMES = (*(v.value for v in Verdict), "skipped")
CATCHALL_OUTCOMES = REFRESH_OUTCOMES

PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics(RedisMetrics):
    """Every metric callahead exports, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "callahead_rcpt_decisions",
            "Recipients judged, by decision and reason",
            ["decision", "reason"],
            registry=r,
        )
        self._decision_counters: dict[tuple[Action, Reason], Any] = {}
        self.probes = Counter(
            "callahead_probes", "Probes of a primary, by outcome", ["outcome"], registry=r
        )
        self.probe_duration = Histogram(
            "callahead_probe_duration_seconds",
            "Time for a whole probe",
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "callahead_cache_hits", "Routed recipients found in the positive cache", registry=r
        )
        self.cache_misses = Counter(
            "callahead_cache_misses", "Routed recipients not in the positive cache", registry=r
        )
        self.cache_entries = Gauge(
            "callahead_cache_entries", "Addresses in the positive cache", registry=r
        )
        self.errors = Counter(
            "callahead_errors",
            "Exceptions inside callahead, answered with the tempfail action",
            registry=r,
        )
        self.in_flight = Gauge(
            "callahead_probes_in_flight", "Probes running now, all primaries", registry=r
        )
        self.connections = Counter(
            "callahead_probe_connections",
            "New SMTP connections opened to a primary",
            ["primary"],
            registry=r,
        )
        self.shared = Counter(
            "callahead_probe_shared_sessions",
            "Probes that joined a busy pipelined session of a primary (its pool was full)",
            ["primary"],
            registry=r,
        )
        self.coalesced = Counter(
            "callahead_coalesced_waits",
            "Recipients that shared a probe already in flight for the same address",
            registry=r,
        )
        self.prober_refused = Counter(
            "callahead_prober_refused",
            "Probes a primary answered by refusing the prober rather than judging the "
            "recipient, by basis (prober, sender, unproven); answered as undecided",
            ["primary", "basis"],
            registry=r,
        )
        self.drift = Counter(
            "callahead_drift",
            "Probe sessions on which a recently verified address (the control) was refused "
            "as unknown with no other control accepted: the primary may have stopped "
            "judging recipients; that session's rejections were answered as undecided",
            ["primary"],
            registry=r,
        )
        self.client_address_missing = Counter(
            "callahead_client_address_missing",
            "Recipients judged without the client's address (no {client_addr} macro from "
            "Postfix): the dictionary-attack guard cannot count them",
            registry=r,
        )
        self.probe_loop_up = Gauge(
            "callahead_probe_loop_up",
            "1 while the probe loop's heartbeat is alive; 0: recipients get the tempfail "
            "action without a probe",
            registry=r,
        )
        self.postfix_hooked = Gauge(
            "callahead_postfix_hooked",
            "1 when an smtpd service of this host's Postfix names the front end where it "
            "listens, 0 when none does (read at start and on SIGHUP; no series when Postfix "
            "was not read): with every front end at 0 no recipient is verified",
            ["frontend"],
            registry=r,
        )
        self.dry_run_overrides = Counter(
            "callahead_dry_run_overrides",
            "Recipients a reject or defer was decided for but not given, by the decision "
            "that would have been given (CALLAHEAD_DRY_RUN=yes)",
            ["decision"],
            registry=r,
        )
        self.refreshes = Counter(
            "callahead_cache_refreshes",
            "Cached addresses verified again in the background near the end of their TTL, "
            "by outcome (valid: kept; unknown: forgotten; tempfail: kept until it expires; "
            "skipped: no spare probe slot or no budget token)",
            ["outcome"],
            registry=r,
        )
        self.policy_requests = Counter(
            "callahead_policy_requests",
            "Policy service requests, by protocol_state (only rcpt ones are judged)",
            ["state"],
            registry=r,
        )
        self.policy_bad_requests = Counter(
            "callahead_policy_bad_requests",
            "Policy service requests that were malformed, not access policy requests "
            "(answered DUNNO), or too long (connection closed)",
            registry=r,
        )
        self.policy_connections = Gauge(
            "callahead_policy_connections",
            "Open policy service connections (Postfix keeps one per smtpd process)",
            registry=r,
        )
        self.policy_refused = Counter(
            "callahead_policy_refused_connections",
            "Policy service connections disconnected at once, by reason: client (not in "
            "CALLAHEAD_POLICY_CLIENTS), limit (CALLAHEAD_POLICY_MAX_CONNECTIONS open)",
            ["reason"],
            registry=r,
        )
        self.policy_stalled = Counter(
            "callahead_policy_stalled_connections",
            "Policy service connections closed because the client left its answers unread "
            "for 10 s (one that sends requests and never reads cannot hold a connection)",
            registry=r,
        )
        self.policy_displaced = Counter(
            "callahead_policy_displaced_connections",
            "Policy service connections closed to make room for a new one at "
            "CALLAHEAD_POLICY_MAX_CONNECTIONS: the oldest that had not sent a whole request, "
            "else the one idle longest between requests",
            registry=r,
        )
        self.milter_connections = Gauge(
            "callahead_milter_connections",
            "Open milter connections that negotiated (Postfix keeps one per SMTP session)",
            registry=r,
        )
        self.milter_refused = Counter(
            "callahead_milter_refused_connections",
            "Milter connections closed at negotiation because the most allowed were open; "
            "Postfix applied milter_default_action to their SMTP sessions",
            registry=r,
        )
        self.domain_accepts_all = Gauge(
            "callahead_domain_accepts_all",
            "1 while the last check found the primary of a routed domain (a CALLAHEAD_ROUTES "
            "entry) accepting a made-up address: its recipients are accepted without a probe",
            ["domain"],
            registry=r,
        )
        self.catchall_checks = Counter(
            "callahead_catchall_checks",
            "Checks of whether a routed domain's primary accepts every address, by outcome "
            "(valid: it does; unknown: it does not; tempfail: undecided; skipped: no spare "
            "probe slot or budget token)",
            ["outcome"],
            registry=r,
        )
        self._init_redis(r)  # redismetrics.py
        self.maillog = MaillogMetrics(r)  # the backscatter meter (frontends/maillog)
        self._primaries = PrimariesCollector()
        r.register(self._primaries)
        # Pre-create the label sets so that every series exists from the first scrape.
        self._probe_counts = {v: self.probes.labels(v.value) for v in Verdict}
        for outcome in REFRESH_OUTCOMES:
            self.refreshes.labels(outcome)
        for outcome in CATCHALL_OUTCOMES:
            self.catchall_checks.labels(outcome)
        for action in (Action.REJECT, Action.DEFER):
            self.dry_run_overrides.labels(action.value)

    # -- the probe engine's observer (engine.EngineObserver) ---------------------------

    def watch_primaries(self, states: Callable[[], Iterable[PrimaryState]]) -> None:
        """The per-primary gauges are read from ``states`` at each scrape."""
        self._primaries.states = states

    def probe_started(self) -> None:
        self.in_flight.inc()

    def probe_ended(self, result: ProbeResult | None) -> None:
        self.in_flight.dec()
        if result is not None and result.skipped is None:
            self._probe_counts[result.verdict].inc()
            self.probe_duration.observe(result.duration)

    def coalesced_wait(self) -> None:
        self.coalesced.inc()

    def connection_opened(self, primary: str) -> None:
        self.connections.labels(primary).inc()

    def session_shared(self, primary: str) -> None:
        self.shared.labels(primary).inc()

    def prober_refused_by(self, primary: str, basis: Basis) -> None:
        self.prober_refused.labels(primary, basis.value).inc()

    def drift_seen(self, primary: str) -> None:
        self.drift.labels(primary).inc()

    def primary_dropped(self, primary: str) -> None:
        """The engine forgot ``primary``: its counters go with its gauges (read from the
        engine), so the series stay as many as the primaries the engine keeps. One that
        comes back starts its counters at zero, which rate() reads as a reset.

        A primary need not have every series (no drift seen, never refused): newer
        prometheus-client ignores removing one that was never made, 0.16 (Debian 12)
        raises KeyError, which means the same here."""
        with contextlib.suppress(KeyError):
            self.connections.remove(primary)
        with contextlib.suppress(KeyError):
            self.shared.remove(primary)
        with contextlib.suppress(KeyError):
            self.drift.remove(primary)
        for basis in Basis:
            if basis.refuses_prober:
                with contextlib.suppress(KeyError):
                    self.prober_refused.remove(primary, basis.value)

    def refreshed(self, outcome: str) -> None:
        """One background refresh ended: a verdict's value, or ``skipped``."""
        self.refreshes.labels(outcome).inc()

    def catchall_checked(self, outcome: str) -> None:
        """One catch-all check ended: a verdict's value, or ``skipped``."""
        self.catchall_checks.labels(outcome).inc()

    def domain_state(self, route: str, accepts_all: bool) -> None:
        """A catch-all check decided ``route`` (a route entry: the labels stay bounded)."""
        self.domain_accepts_all.labels(route).set(1.0 if accepts_all else 0.0)

    def cache_counters(self) -> dict[str, float]:
        """The cache's counters so far, for ``callahead cache stats``."""
        sample = self.registry.get_sample_value
        counters = {
            "hits": sample("callahead_cache_hits_total") or 0.0,
            "misses": sample("callahead_cache_misses_total") or 0.0,
        }
        for outcome in REFRESH_OUTCOMES:
            value = sample("callahead_cache_refreshes_total", {"outcome": outcome})
            counters[f"refreshes_{outcome}"] = value or 0.0
        return counters

    def track_cache_size(self, size: Callable[[], int]) -> None:
        self.cache_entries.set_function(lambda: float(size()))

    def observe(self, decision: Decision) -> None:
        """Count one decision. Probes are counted where they are made (the engine):
        with coalescing, one probe can serve several decisions."""
        key = (decision.action, decision.reason)
        counter = self._decision_counters.get(key)
        if counter is None:  # one child per (action, reason), looked up once
            counter = self._decision_counters[key] = self.decisions.labels(
                decision.action.value, decision.reason.value
            )
        counter.inc()
        if decision.dry_run:
            self.dry_run_overrides.labels(decision.action.value).inc()
        if decision.reason is Reason.CACHE_HIT:
            self.cache_hits.inc()
        elif decision.action is not Action.SKIP and decision.reason is not Reason.ERROR:
            self.cache_misses.inc()

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` over HTTP from a thread of its own (metricshttp.py);
        raises ``OSError`` when it cannot listen."""
        server = MetricsServer(self.registry)
        server.start(host, port)
        return server
