"""A base for the fake probers of the unit tests: each answers ``probe`` (the milter
path); ``probe_async`` (the policy service's path) gives the same answer."""

from __future__ import annotations

from collections.abc import Sequence

from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import Basis, ProbeResult, Stage, Verdict


class SyncProber:
    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        raise NotImplementedError

    async def probe_async(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        return self.probe(address, hops)


def no_domain_result(primary: str) -> ProbeResult:
    """What the engine answers for a recipient domain that does not exist (NXDOMAIN)."""
    return ProbeResult(
        Verdict.UNKNOWN,
        Stage.CONNECT,
        None,
        "route: example.com does not exist (NXDOMAIN)",
        0.001,
        primary,
        reached=False,
        basis=Basis.NO_DOMAIN,
    )
