"""The per-primary gauges of ``/metrics``, read from the probe engine when Prometheus
scrapes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..probing.engine import PrimaryState


class PrimariesCollector(Collector):
    """The per-primary gauges, read from the engine's state when Prometheus scrapes (the
    engine keeps plain fields; it knows nothing of Prometheus)."""

    GAUGES = (
        ("callahead_pool_sessions", "Open probe sessions to a primary", "open_sessions"),
        (
            "callahead_primary_reached",
            "1 if the last probe of a primary reached it at the SMTP level, else 0",
            "reached",
        ),
        (
            "callahead_breaker_open",
            "1 while a primary is treated as down (no probes until the cooldown ends)",
            "breaker_open",
        ),
        (
            "callahead_primary_refuses_prober",
            "1 while the last answer of a primary refused the prober: its domains are "
            "accepted unverified",
            "refuses_prober",
        ),
    )

    def __init__(self) -> None:
        self.states: Callable[[], Iterable[PrimaryState]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        states = list(self.states())
        for name, documentation, field in self.GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["primary"])
            for state in states:
                family.add_metric([state.name], float(getattr(state, field)))
            yield family
