"""A DNS for one domain whose one MX host hands out other addresses at every lookup, as a
large MX pool's (Microsoft 365's) does: for the engine's state per primary, in the unit
tests (tests/unit/probing/test_engine_primaries.py) and the benchmark (bench/rotating.py)."""

from __future__ import annotations

from callahead.routing.resolve import DnsFailure, NoRecords


class RotatingDns:
    """``domain`` has one MX host, ``mx_host``; each lookup of its addresses gives the
    next ``per_lookup`` of ``pool`` (round robin)."""

    def __init__(self, pool: list[str], domain: str, mx_host: str, *, per_lookup: int = 1) -> None:
        self._pool = pool
        self._domain = domain
        self._mx_host = mx_host
        self._per_lookup = per_lookup
        self.lookups = 0

    async def mx(self, name: str) -> list[tuple[int, str]]:
        if name == self._domain:
            return [(10, self._mx_host)]
        raise NoRecords(name)

    async def addresses(self, name: str) -> list[str]:
        if name != self._mx_host:
            raise DnsFailure(name)
        start = self.lookups * self._per_lookup
        self.lookups += 1
        return [self._pool[(start + i) % len(self._pool)] for i in range(self._per_lookup)]
