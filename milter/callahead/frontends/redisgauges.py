"""The Redis master's gauges of ``/metrics`` (behind Sentinel): which master the shared
cache uses and since when, read from the store when Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..caching.redismaster import MasterInfo


class RedisMasterCollector(Collector):
    """``callahead_redis_master_info{address}`` and
    ``callahead_redis_master_changed_timestamp_seconds``; no samples without Sentinel,
    or before the sentinels first named a master."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.info: Callable[[], MasterInfo | None] = lambda: None
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        info = self.info()
        address = GaugeMetricFamily(
            "callahead_redis_master_info",
            "1 for the Redis master the shared cache uses, as the sentinels name it "
            "(CALLAHEAD_REDIS_SENTINELS)",
            labels=["address"],
        )
        since = GaugeMetricFamily(
            "callahead_redis_master_changed_timestamp_seconds",
            "Unix time the sentinels first named the Redis master in use, or last named a "
            "new one (a failover)",
        )
        if info is not None:
            address.add_metric([info.address], 1.0)
            since.add_metric([], info.since)
        yield address
        yield since
