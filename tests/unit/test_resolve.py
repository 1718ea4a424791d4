"""MX selection (resolve.py) with scripted DNS answers: preference order, this host's
entries and everything after them dropped, and every DNS failure undecided."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from callahead.engine import ProbeEngine
from callahead.resolve import (
    MAX_ADDRESSES,
    DnsFailure,
    MxResolver,
    NoRecords,
    ThisHost,
    parse_resolver,
)
from callahead.routes import RECIPIENT_DOMAIN, Nexthop, RouteUnavailable, parse_nexthop
from callahead.verdict import Skip, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script
from tests.unit.settings import probe_settings

SELF = ThisHost(names=frozenset({"backup.example.net"}), addresses=frozenset({"192.0.2.99"}))


class FakeDns:
    """Answers from two dicts; a missing name is NXDOMAIN, an exception is raised."""

    def __init__(
        self,
        mx: dict[str, list[tuple[int, str]] | Exception],
        addresses: dict[str, list[str] | Exception],
    ) -> None:
        self._mx = mx
        self._addresses = addresses
        self.asked: list[tuple[str, str]] = []

    async def mx(self, name: str) -> list[tuple[int, str]]:
        self.asked.append(("MX", name))
        answer = self._mx.get(name, DnsFailure(f"{name}: NXDOMAIN"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def addresses(self, name: str) -> list[str]:
        self.asked.append(("A", name))
        answer = self._addresses.get(name, DnsFailure(f"{name}: NXDOMAIN"))
        if isinstance(answer, Exception):
            raise answer
        return answer


def expand(dns: FakeDns, hops: Sequence[Nexthop], domain: str = "example.com") -> list[Nexthop]:
    resolver = MxResolver(dns, SELF, shuffle=False)
    return list(asyncio.run(resolver.expand(hops, domain)))


def addrs(*hosts: str, port: int = 25) -> list[Nexthop]:
    return [Nexthop(h, port) for h in hosts]


def test_mx_hosts_in_preference_order_then_their_addresses() -> None:
    dns = FakeDns(
        {"example.com": [(20, "mx2.example.com."), (10, "mx1.example.com.")]},
        {"mx1.example.com": ["192.0.2.1", "2001:db8::1"], "mx2.example.com": ["192.0.2.2"]},
    )
    assert expand(dns, [RECIPIENT_DOMAIN]) == addrs("192.0.2.1", "2001:db8::1", "192.0.2.2")


def test_this_host_by_name_is_dropped_with_every_mx_of_equal_or_lower_preference() -> None:
    dns = FakeDns(
        {
            "example.com": [
                (30, "low.example.com"),
                (10, "primary.example.com"),
                (20, "other.example.com"),
                (20, "backup.example.net"),
            ]
        },
        {
            "primary.example.com": ["192.0.2.1"],
            "other.example.com": ["192.0.2.2"],
            "backup.example.net": ["192.0.2.20"],
            "low.example.com": ["192.0.2.3"],
        },
    )
    assert expand(dns, [RECIPIENT_DOMAIN]) == addrs("192.0.2.1")


def test_this_host_by_address_is_dropped_too() -> None:
    dns = FakeDns(
        {"example.com": [(10, "primary.example.com"), (20, "alias.example.org")]},
        {"primary.example.com": ["192.0.2.1"], "alias.example.org": ["192.0.2.99"]},
    )
    assert expand(dns, [RECIPIENT_DOMAIN]) == addrs("192.0.2.1")


def test_this_host_as_the_best_mx_leaves_nothing_to_probe() -> None:
    dns = FakeDns(
        {"example.com": [(10, "backup.example.net"), (20, "later.example.com")]},
        {"backup.example.net": ["192.0.2.20"], "later.example.com": ["192.0.2.5"]},
    )
    with pytest.raises(RouteUnavailable, match="this host is the best MX"):
        expand(dns, [RECIPIENT_DOMAIN])


def test_no_mx_records_is_an_implicit_mx_of_the_name_itself() -> None:
    dns = FakeDns({"example.com": NoRecords("no MX")}, {"example.com": ["192.0.2.7"]})
    assert expand(dns, [RECIPIENT_DOMAIN]) == addrs("192.0.2.7")


@pytest.mark.parametrize(
    "answer",
    [DnsFailure("NXDOMAIN"), DnsFailure("SERVFAIL"), DnsFailure("timed out")],
)
def test_dns_failures_are_route_unavailable(answer: Exception) -> None:
    with pytest.raises(RouteUnavailable):
        expand(FakeDns({"example.com": answer}, {}), [RECIPIENT_DOMAIN])


def test_null_mx_is_route_unavailable() -> None:
    dns = FakeDns({"example.com": [(0, ".")]}, {})
    with pytest.raises(RouteUnavailable, match="null MX"):
        expand(dns, [RECIPIENT_DOMAIN])


def test_an_mx_host_without_address_is_skipped_for_the_next() -> None:
    dns = FakeDns(
        {"example.com": [(10, "gone.example.com"), (20, "mx2.example.com")]},
        {"gone.example.com": NoRecords("none"), "mx2.example.com": ["192.0.2.2"]},
    )
    assert expand(dns, [RECIPIENT_DOMAIN]) == addrs("192.0.2.2")


def test_host_nexthop_looks_up_the_mx_of_that_host_and_keeps_its_port() -> None:
    dns = FakeDns(
        {"relay.example.org": NoRecords("no MX")},
        {"relay.example.org": ["192.0.2.8"]},
    )
    hops = [parse_nexthop("smtp:relay.example.org:2525")]
    assert expand(dns, hops) == addrs("192.0.2.8", port=2525)
    assert ("MX", "relay.example.org") in dns.asked


def test_literal_hops_pass_through_in_order_and_at_most_five_addresses() -> None:
    many = [f"192.0.2.{i}" for i in range(1, 9)]
    dns = FakeDns({"example.com": [(10, "mx.example.com")]}, {"mx.example.com": many})
    literal = Nexthop("198.51.100.1", 2525)
    out = expand(dns, [literal, RECIPIENT_DOMAIN])
    assert out[0] == literal
    assert out == [literal, *addrs(*many[: MAX_ADDRESSES - 1])]
    assert dns.asked[0] == ("MX", "example.com")


def test_this_host_from_postfix_settings() -> None:
    host = ThisHost.from_postfix(["Backup.Example.NET."], ["127.0.0.1", "[2001:db8::5]", "gw.lan"])
    assert host.is_self("backup.example.net", [])
    assert host.is_self("gw.lan", [])
    assert host.is_self("x.example.com", ["2001:db8:0::5"])
    assert not host.is_self("x.example.com", ["127.0.0.2"])


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("", None),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_resolver(text: str, server: tuple[str, int] | None) -> None:
    assert parse_resolver(text) == server


@pytest.mark.parametrize("text", ["ns.example.com", "127.0.0.1:0", "127.0.0.1:70000", "[::1]x"])
def test_bad_resolver(text: str) -> None:
    with pytest.raises(ValueError):
        parse_resolver(text)


def test_engine_probes_the_addresses_the_resolver_gives(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default="550 5.1.1 <user@example.com>: User unknown"))
    hop = Nexthop(server.host, server.port)

    async def go() -> None:
        dns = FakeDns({"example.com": [(10, "mx.example.com")]}, {"mx.example.com": []})
        resolver = MxResolver(dns, SELF)

        class Pointing:
            async def expand(self, hops: Sequence[Nexthop], domain: str) -> tuple[Nexthop, ...]:
                assert (list(hops), domain) == ([RECIPIENT_DOMAIN], "example.com")
                return (hop,)

        engine = ProbeEngine(probe_settings(), resolver=Pointing())
        result = await engine.probe("user@example.com", [RECIPIENT_DOMAIN])
        assert (result.verdict, result.code) == (Verdict.UNKNOWN, 550)
        await engine.aclose()
        # An MX host without addresses: nothing to probe, undecided.
        engine = ProbeEngine(probe_settings(), resolver=resolver)
        result = await engine.probe("other@example.com", [RECIPIENT_DOMAIN])
        assert (result.verdict, result.skipped) == (Verdict.TEMPFAIL, Skip.ROUTE_FAILED)
        await engine.aclose()

    asyncio.run(go())
    assert server.connections == 1


def test_engine_without_a_resolver_does_not_probe_mx_routes() -> None:
    async def go() -> None:
        engine = ProbeEngine(probe_settings())
        result = await engine.probe("user@example.com", [RECIPIENT_DOMAIN])
        assert (result.verdict, result.skipped) == (Verdict.TEMPFAIL, Skip.ROUTE_FAILED)

    asyncio.run(go())
