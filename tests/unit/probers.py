"""A base for the fake probers of the unit tests: each answers ``probe`` (the milter
path); ``probe_async`` (the policy service's path) gives the same answer."""

from __future__ import annotations

from collections.abc import Sequence

from callahead.routes import Nexthop
from callahead.verdict import ProbeResult


class SyncProber:
    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        raise NotImplementedError

    async def probe_async(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        return self.probe(address, hops)
