"""MX selection (resolve.py) with scripted DNS answers: preference order, this host's
entries and everything after them dropped, the most-preferred group as the primaries
(every other MX host secondary), a recipient domain that does not exist (NXDOMAIN, null
MX) as ``NoSuchDomain``, and every other DNS failure undecided; then the engine with a
fake resolver: a secondary's answer is undecided and never cached, a domain that does
not exist is unknown. This host kept current (``LiveThisHost``, with an injected
interface reader and clock): an address that comes makes its MX host skipped, one that
goes makes it probed again, a failed read keeps what was known, and SIGHUP's reload puts
the new identity in force."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import dns.resolver
import pytest

from callahead.caching.cache import PositiveCache
from callahead.caching.catchall import LoopCatchAll
from callahead.core.guard import ClientGuard
from callahead.core.policy import NO_DOMAIN_REPLY, Action, Policy, Reason, TempfailAction
from callahead.probing.engine import ProbeEngine
from callahead.probing.loop import ProbeLoop
from callahead.process import assembly
from callahead.process.config import load_config
from callahead.routing import thishost
from callahead.routing.resolve import (
    MAX_ADDRESSES,
    DnsFailure,
    DnsPython,
    MxResolver,
    NameNotFound,
    NoRecords,
    parse_resolver,
)
from callahead.routing.routes import (
    RECIPIENT_DOMAIN,
    Expansion,
    Nexthop,
    NoSuchDomain,
    RouteUnavailable,
    parse_nexthop,
    parse_routes,
)
from callahead.routing.thishost import (
    HostIdentity,
    HostView,
    InterfaceReadError,
    LiveThisHost,
    ThisHost,
    read_interface_addresses,
)
from callahead.smtp.verdict import Basis, ProbeResult, Skip, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.ports import free_port
from tests.harness.scripted import Script
from tests.harness.waiting import wait_for
from tests.unit.clock import Clock
from tests.unit.probers import SyncProber
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


def expansion(
    dns: FakeDns, hops: Sequence[Nexthop], domain: str = "example.com", host: HostView = SELF
) -> Expansion:
    resolver = MxResolver(dns, host, shuffle=False)
    return asyncio.run(resolver.expand(hops, domain))


def expand(
    dns: FakeDns, hops: Sequence[Nexthop], domain: str = "example.com", host: HostView = SELF
) -> list[Nexthop]:
    return list(expansion(dns, hops, domain, host).hops)


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


# --- only the primary's word counts: the most-preferred group ------------------------------


def test_the_most_preferred_group_is_primary_and_every_other_mx_host_secondary() -> None:
    dns = FakeDns(
        {
            "example.com": [
                (30, "backup.example.net"),
                (20, "other.example.com"),
                (10, "primary.example.com"),
                (10, "primary2.example.com"),
            ]
        },
        {
            "primary.example.com": ["192.0.2.1"],
            "primary2.example.com": ["192.0.2.11"],
            "other.example.com": ["192.0.2.2", "2001:db8::2"],
            "backup.example.net": ["192.0.2.20"],
        },
    )
    out = expansion(dns, [RECIPIENT_DOMAIN])
    assert out.hops == tuple(addrs("192.0.2.1", "192.0.2.11", "192.0.2.2", "2001:db8::2"))
    assert out.secondary == frozenset(addrs("192.0.2.2", "2001:db8::2"))


def test_the_group_is_the_lowest_preference_of_all_records_even_ones_that_do_not_resolve() -> None:
    """The primary's name does not resolve (or answers nothing): what is left is the
    other backup, still secondary."""
    for failure in (NoRecords("none"), NameNotFound("NXDOMAIN"), DnsFailure("SERVFAIL")):
        dns = FakeDns(
            {"example.com": [(10, "primary.example.com"), (20, "other.example.com")]},
            {"primary.example.com": failure, "other.example.com": ["192.0.2.2"]},
        )
        out = expansion(dns, [RECIPIENT_DOMAIN])
        assert out.hops == tuple(addrs("192.0.2.2"))
        assert out.secondary == frozenset(out.hops)


def test_a_single_mx_and_an_implicit_mx_are_primaries() -> None:
    single = FakeDns({"example.com": [(50, "mx.example.com")]}, {"mx.example.com": ["192.0.2.5"]})
    assert expansion(single, [RECIPIENT_DOMAIN]).secondary == frozenset()
    implicit = FakeDns({"example.com": NoRecords("no MX")}, {"example.com": ["192.0.2.7"]})
    out = expansion(implicit, [RECIPIENT_DOMAIN])
    assert (out.hops, out.secondary) == (tuple(addrs("192.0.2.7")), frozenset())


def test_each_address_is_named_by_its_mx_host_for_the_engines_state() -> None:
    """The engine keys a primary's state by the MX host, not by the addresses it
    resolved to this time; a literal hop is its own primary, even at an MX host's
    address; an implicit MX is named by the domain itself."""
    dns = FakeDns(
        {
            "example.com": [(10, "MX1.example.com."), (20, "mx2.example.com")],
            "example.net": NoRecords("no MX"),
        },
        {
            "mx1.example.com": ["192.0.2.1", "2001:db8::1"],
            "mx2.example.com": ["192.0.2.2"],
            "example.net": ["192.0.2.9"],
        },
    )
    literal = Nexthop("192.0.2.2", 25)
    out = expansion(dns, [RECIPIENT_DOMAIN, literal])
    assert [out.primary_of(h) for h in out.hops] == [
        "mx1.example.com:25",
        "mx1.example.com:25",
        "[192.0.2.2]:25",
    ]
    implicit = expansion(dns, [Nexthop("example.net", 2525, mx=True)], domain="example.net")
    assert [implicit.primary_of(h) for h in implicit.hops] == ["example.net:2525"]


def test_literal_hops_are_never_secondary_nor_a_named_hosts_primary() -> None:
    """A literal hop is a primary even when an MX lookup lists the same address lower; a
    named nexthop's most-preferred group is primary too (its own lookup)."""
    dns = FakeDns(
        {
            "example.com": [(10, "mx1.example.com"), (20, "mx2.example.com")],
            "relay.example.org": [(5, "r1.example.org"), (9, "r2.example.org")],
        },
        {
            "mx1.example.com": ["192.0.2.1"],
            "mx2.example.com": ["192.0.2.2"],
            "r1.example.org": ["192.0.2.31"],
            "r2.example.org": ["192.0.2.32"],
        },
    )
    literal = Nexthop("192.0.2.2", 25)
    out = expansion(dns, [RECIPIENT_DOMAIN, literal])
    assert out.hops == tuple(addrs("192.0.2.1", "192.0.2.2"))
    assert out.secondary == frozenset()
    named = expansion(dns, [parse_nexthop("smtp:relay.example.org")])
    assert named.hops == tuple(addrs("192.0.2.31", "192.0.2.32"))
    assert named.secondary == frozenset(addrs("192.0.2.32"))


# --- no such domain ------------------------------------------------------------------------


def test_nxdomain_of_the_recipient_domain_is_no_such_domain() -> None:
    dns = FakeDns({"zq7x.example.com": NameNotFound("zq7x.example.com: NXDOMAIN")}, {})
    with pytest.raises(NoSuchDomain, match="NXDOMAIN"):
        expand(dns, [RECIPIENT_DOMAIN], "zq7x.example.com")


def test_a_null_mx_of_the_recipient_domain_is_no_such_domain() -> None:
    dns = FakeDns({"example.com": [(0, ".")]}, {})
    with pytest.raises(NoSuchDomain, match="null MX"):
        expand(dns, [RECIPIENT_DOMAIN])


def test_a_null_mx_among_other_records_breaks_rfc_7505_and_is_undecided() -> None:
    dns = FakeDns({"example.com": [(0, "."), (10, "mx.example.com")]}, {})
    with pytest.raises(RouteUnavailable, match="null MX"):
        expand(dns, [RECIPIENT_DOMAIN])


@pytest.mark.parametrize(
    "answer", [NameNotFound("mx.example.org: NXDOMAIN"), [(0, ".")]], ids=["nxdomain", "null"]
)
def test_nxdomain_or_null_mx_of_a_named_nexthop_host_is_undecided(
    answer: list[tuple[int, str]] | Exception,
) -> None:
    """``smtp:mx.example.org`` that does not exist is the configuration's problem."""
    dns = FakeDns({"mx.example.org": answer}, {})
    with pytest.raises(RouteUnavailable) as raised:
        expand(dns, [parse_nexthop("smtp:mx.example.org")])
    assert not isinstance(raised.value, NoSuchDomain)


@pytest.mark.parametrize("answer", [DnsFailure("SERVFAIL"), DnsFailure("timed out")])
def test_servfail_or_a_timeout_of_the_recipient_domain_is_undecided(answer: Exception) -> None:
    with pytest.raises(RouteUnavailable):
        expand(FakeDns({"example.com": answer}, {}), [RECIPIENT_DOMAIN])


def test_no_such_domain_only_when_no_other_hop_is_left() -> None:
    dns = FakeDns({"example.com": NameNotFound("NXDOMAIN")}, {})
    literal = Nexthop("198.51.100.1", 2525)
    assert expand(dns, [RECIPIENT_DOMAIN, literal]) == [literal]


def test_dnspython_nxdomain_is_name_not_found_and_servfail_a_plain_failure() -> None:
    client = DnsPython(("127.0.0.1", 53))

    async def nxdomain(*args: object, **kwargs: object) -> object:
        raise dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]

    async def servfail(*args: object, **kwargs: object) -> object:
        raise dns.resolver.NoNameservers()  # type: ignore[no-untyped-call]

    client._resolver.resolve = nxdomain  # type: ignore[method-assign,assignment]
    with pytest.raises(NameNotFound):
        asyncio.run(client.mx("zq7x.example.com"))
    client._resolver.resolve = servfail  # type: ignore[method-assign,assignment]
    with pytest.raises(DnsFailure) as raised:
        asyncio.run(client.mx("example.com"))
    assert not isinstance(raised.value, NameNotFound)


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


class Interfaces:
    """An interface reader the test sets: the addresses, or an error; counts reads."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = set(addresses)
        self.error: InterfaceReadError | None = None
        self.reads = 0

    def __call__(self) -> frozenset[str]:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return frozenset(self.addresses)


VRRP = "192.0.2.50"
"""The address keepalived moves between the backups; mx2.example.com's."""
EVERY_INTERFACE = HostIdentity.from_postfix(["backup.example.net"], ["all"])


def vrrp_dns() -> FakeDns:
    return FakeDns(
        {"example.com": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
        {"mx1.example.com": ["192.0.2.1"], "mx2.example.com": [VRRP]},
    )


def live(interfaces: Interfaces, clock: Clock) -> LiveThisHost:
    return LiveThisHost(EVERY_INTERFACE, read=interfaces, clock=clock, interval=30.0)


def test_an_address_that_comes_skips_its_mx_host_and_one_that_goes_brings_it_back() -> None:
    interfaces, clock = Interfaces("127.0.0.1"), Clock()
    host = live(interfaces, clock)
    dns = vrrp_dns()
    assert expand(dns, [RECIPIENT_DOMAIN], host=host) == addrs("192.0.2.1", VRRP)

    interfaces.addresses.add(VRRP)  # keepalived makes this backup the master
    clock.now += 29.0
    assert expand(dns, [RECIPIENT_DOMAIN], host=host) == addrs("192.0.2.1", VRRP)  # not yet
    clock.now += 1.0
    assert expand(dns, [RECIPIENT_DOMAIN], host=host) == addrs("192.0.2.1")

    interfaces.addresses.discard(VRRP)  # ... and takes the address away again
    clock.now += 30.0
    assert expand(dns, [RECIPIENT_DOMAIN], host=host) == addrs("192.0.2.1", VRRP)


def test_interfaces_are_read_at_most_once_an_interval_and_only_when_asked() -> None:
    interfaces, clock = Interfaces("127.0.0.1"), Clock()
    host = live(interfaces, clock)
    assert interfaces.reads == 1  # at start
    for _ in range(5):
        host.current()
        clock.now += 5.0
    assert interfaces.reads == 1
    clock.now += 1000.0  # idle: nothing read meanwhile
    assert interfaces.reads == 1
    host.current()
    host.current()
    assert interfaces.reads == 2


def test_a_failed_read_keeps_the_addresses_known_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    interfaces, clock = Interfaces("127.0.0.1", VRRP), Clock()
    host = live(interfaces, clock)
    interfaces.error = InterfaceReadError("/proc/net/fib_trie: Permission denied")
    interfaces.addresses.clear()
    with caplog.at_level(logging.INFO, logger="callahead.resolve"):
        for _ in range(3):
            clock.now += 30.0
            assert host.current().is_self("mx2.example.com", [VRRP])
        assert interfaces.reads == 4
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "keeping the 2 known" in warnings[0].getMessage()
        assert "Permission denied" in warnings[0].getMessage()

        interfaces.error = None
        clock.now += 30.0
        assert not host.current().is_self("mx2.example.com", [VRRP])
    messages = [r.getMessage() for r in caplog.records]
    assert "this host's interface addresses can be read again" in messages
    assert any("removed 127.0.0.1,192.0.2.50" in m for m in messages), messages


def test_a_failed_first_read_leaves_names_and_listed_addresses_then_recovers() -> None:
    interfaces, clock = Interfaces(VRRP), Clock()
    interfaces.error = InterfaceReadError("no address found")
    host = live(interfaces, clock)
    assert host.current().is_self("backup.example.net", [])
    assert not host.current().is_self("mx2.example.com", [VRRP])
    interfaces.error = None
    clock.now += 30.0
    assert host.current().is_self("mx2.example.com", [VRRP])


def test_listed_interfaces_are_never_read() -> None:
    interfaces, clock = Interfaces(VRRP), Clock()
    identity = HostIdentity.from_postfix(["backup.example.net"], ["127.0.0.1", "192.0.2.7"])
    host = LiveThisHost(identity, read=interfaces, clock=clock)
    clock.now += 3600.0
    assert host.current() == ThisHost(
        frozenset({"backup.example.net"}), frozenset({"127.0.0.1", "192.0.2.7"})
    )
    assert interfaces.reads == 0


def test_replace_puts_the_new_identity_in_force_and_rereads_the_interfaces_now(
    caplog: pytest.LogCaptureFixture,
) -> None:
    interfaces, clock = Interfaces("127.0.0.1"), Clock()
    host = live(interfaces, clock)
    dns = vrrp_dns()
    interfaces.addresses.add(VRRP)
    with caplog.at_level(logging.INFO, logger="callahead.resolve"):
        # Renamed mx1 (by name), within the interval: VRRP is read at once too.
        now = host.replace(HostIdentity.from_postfix(["mx1.example.com"], ["all"]))
    assert now.is_self("mx1.example.com", []) and now.is_self("x", [VRRP])
    assert interfaces.reads == 2
    with pytest.raises(RouteUnavailable, match="this host is the best MX"):
        expand(dns, [RECIPIENT_DOMAIN], host=host)
    assert any("is now: names mx1.example.com;" in r.getMessage() for r in caplog.records)

    host.replace(HostIdentity.from_postfix(["backup.example.net"], ["127.0.0.1"]))
    assert expand(dns, [RECIPIENT_DOMAIN], host=host) == addrs("192.0.2.1", VRRP)


def test_sighup_reload_rebuilds_this_host_and_keeps_the_names_when_postconf_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without CALLAHEAD_POSTFIX_CONFIG the name is the local Postfix's myhostname
    (postconf), re-read by the router's reload; a postconf that gives nothing keeps the
    names in force."""
    myhostname: list[str | None] = ["old.example.net"]
    monkeypatch.setattr(assembly, "postfix_myhostname", lambda: myhostname[0])
    config = load_config(
        {"CALLAHEAD_ROUTES": "example.com=relay", "CALLAHEAD_HELO_NAME": "helo.example.net"}
    )
    host = LiveThisHost(
        assembly.host_identity(config, None), read=Interfaces("127.0.0.1"), clock=Clock()
    )
    router = assembly.build_router(config, ProbeLoop(), DnsPython(("127.0.0.1", 53)), host)
    assert host.current().names == {"old.example.net", "helo.example.net"}

    myhostname[0] = "new.example.net"
    router.reload()
    assert host.current().names == {"new.example.net", "helo.example.net"}
    assert host.identity.all_interfaces

    myhostname[0] = None
    router.reload()
    assert host.current().names == {"new.example.net", "helo.example.net"}


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 192.0.2.50
        /32 host LOCAL
"""
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000005 02 40 00 80     eth0
"""


def proc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fib: str | None, inet6: str | None
) -> None:
    for name, text in (("FIB_TRIE", fib), ("IF_INET6", inet6)):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(thishost, name, str(path))


def test_read_interface_addresses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    proc(monkeypatch, tmp_path, FIB_TRIE, IF_INET6)
    assert read_interface_addresses() == {"127.0.0.1", "192.0.2.50", "::1", "2001:db8::5"}


def test_read_interface_addresses_without_ipv6(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    proc(monkeypatch, tmp_path, FIB_TRIE, None)
    assert read_interface_addresses() == {"127.0.0.1", "192.0.2.50"}


@pytest.mark.parametrize(
    ("fib", "inet6", "reason"),
    [
        (None, IF_INET6, "FIB_TRIE: No such file"),
        ("", "", "no address found"),
        (FIB_TRIE, "zz 01\n", "unreadable line"),
    ],
)
def test_read_interface_addresses_failures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fib: str | None, inet6: str, reason: str
) -> None:
    proc(monkeypatch, tmp_path, fib, inet6)
    with pytest.raises(InterfaceReadError, match=reason):
        read_interface_addresses()
    assert thishost.interface_addresses() == set()


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
            async def expand(self, hops: Sequence[Nexthop], domain: str) -> Expansion:
                assert (list(hops), domain) == ([RECIPIENT_DOMAIN], "example.com")
                return Expansion((hop,))

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


# --- the engine with a fake resolver ------------------------------------------------------


class Expanding:
    """A resolver that gives ``expansion`` (or raises it), and records what it was asked."""

    def __init__(self, expansion: Expansion | Exception) -> None:
        self.expansion = expansion
        self.asked: list[str] = []

    async def expand(self, hops: Sequence[Nexthop], domain: str) -> Expansion:
        self.asked.append(domain)
        if isinstance(self.expansion, Exception):
            raise self.expansion
        return self.expansion


def down_hop() -> Nexthop:
    """A primary that refuses connections (nothing listens on the port)."""
    return Nexthop("127.0.0.1", free_port())


@pytest.mark.parametrize("reply", ["250 2.1.5 Ok", "550 5.1.1 <u@example.com>: User unknown"])
def test_a_secondary_answer_is_undecided_ends_the_failover_and_is_never_cached(
    scripted: StartScripted, reply: str
) -> None:
    """The primary is down, the other backup answers: whatever it says, it is not the
    primary's word (a plain backup accepts everything). The hop after it is not tried."""
    other_backup = scripted(Script(rcpt_default=reply))
    after = scripted(Script(rcpt_default="250 2.1.5 Ok"))
    secondary = Nexthop(other_backup.host, other_backup.port)
    later = Nexthop(after.host, after.port)
    cache = PositiveCache(ttl=3600, maxsize=10)

    async def go() -> ProbeResult:
        expansion = Expansion((down_hop(), secondary, later), frozenset({secondary, later}))
        engine = ProbeEngine(probe_settings(), known_valid=cache, resolver=Expanding(expansion))
        try:
            result = await engine.probe("u@example.com", [RECIPIENT_DOMAIN])
            assert engine._judged.since("u@example.com") == float("-inf")  # never judged
            return result
        finally:
            await engine.aclose()

    result = asyncio.run(go())
    assert (result.verdict, result.basis, result.skipped) == (
        Verdict.TEMPFAIL,
        Basis.SECONDARY,
        None,
    )
    assert result.primary == str(secondary)
    assert "most-preferred" in result.why
    assert other_backup.rcpts() == ["u@example.com"]  # it really was probed
    assert after.connections == 0
    assert "u@example.com" not in cache
    # The policy accepts it undecided and caches nothing.
    policy = Policy(
        routes=parse_routes("example.com=relay"),
        cache=cache,
        prober=FixedProber(result),
        tempfail_action=TempfailAction.ACCEPT,
    )
    decision = policy.decide("<u@example.com>")
    assert (decision.action, decision.reason) == (Action.ACCEPT, Reason.PROBE_TEMPFAIL)
    assert "u@example.com" not in cache


def test_a_primary_answer_is_final_and_a_secondary_tempfail_goes_on(
    scripted: StartScripted,
) -> None:
    busy_primary = scripted(Script(rcpt_default="451 4.3.0 try later"))
    busy_backup = scripted(Script(rcpt_default="450 4.2.0 busy"))
    answering = scripted(Script(rcpt_default="550 5.1.1 <u@example.com>: User unknown"))
    hops = [Nexthop(s.host, s.port) for s in (busy_primary, busy_backup, answering)]

    async def go(expansion: Expansion) -> ProbeResult:
        engine = ProbeEngine(probe_settings(), resolver=Expanding(expansion))
        try:
            return await engine.probe("u@example.com", [RECIPIENT_DOMAIN])
        finally:
            await engine.aclose()

    primary_word = asyncio.run(go(Expansion(tuple(hops))))
    assert (primary_word.verdict, primary_word.basis) == (Verdict.UNKNOWN, Basis.RECIPIENT)
    secondary_word = asyncio.run(go(Expansion(tuple(hops), frozenset(hops[1:]))))
    assert (secondary_word.verdict, secondary_word.basis) == (Verdict.TEMPFAIL, Basis.SECONDARY)
    assert secondary_word.primary == str(hops[2])


def test_a_catch_all_check_answered_by_a_secondary_marks_nothing(
    scripted: StartScripted, probe_loop: ProbeLoop
) -> None:
    other_backup = scripted(Script(rcpt_default="250 2.1.5 Ok"))
    secondary = Nexthop(other_backup.host, other_backup.port)
    cache = PositiveCache(ttl=3600, maxsize=10)
    engine = ProbeEngine(
        probe_settings(),
        known_valid=cache,
        resolver=Expanding(Expansion((down_hop(), secondary), frozenset({secondary}))),
    )
    outcomes: list[str] = []
    states: list[tuple[str, bool]] = []
    catchall = LoopCatchAll(
        probe_loop,
        engine,
        cache,
        interval=3600,
        on_check=outcomes.append,
        on_state=lambda route, state: states.append((route, state)),
    )
    try:
        catchall.check_if_due("example.com", [RECIPIENT_DOMAIN])
        wait_for(lambda: outcomes, 5.0, what="the check")
        assert outcomes == ["tempfail"]
        assert states == []
        assert not catchall.accepts_all("example.com")
        assert len(other_backup.rcpts()) == 1  # the made-up address reached it
        assert len(cache) == 0
    finally:
        probe_loop.run(catchall.aclose(), timeout=5.0)
        probe_loop.run(engine.aclose(), timeout=5.0)


def test_no_such_domain_is_unknown_no_domain_never_cached_and_rejected_with_5_1_2() -> None:
    resolver = Expanding(NoSuchDomain("zq7x.example.com does not exist (NXDOMAIN)"))
    cache = PositiveCache(ttl=3600, maxsize=10)

    async def go() -> ProbeResult:
        engine = ProbeEngine(probe_settings(), known_valid=cache, resolver=resolver)
        try:
            return await engine.probe("anyone@zq7x.example.com", [RECIPIENT_DOMAIN])
        finally:
            await engine.aclose()

    result = asyncio.run(go())
    assert resolver.asked == ["zq7x.example.com"]
    assert (result.verdict, result.basis, result.code) == (Verdict.UNKNOWN, Basis.NO_DOMAIN, None)
    assert "NXDOMAIN" in result.detail
    assert len(cache) == 0
    guard = ClientGuard(limit=1, window=60)
    policy = Policy(
        routes=parse_routes(".example.com=relay"),
        cache=cache,
        prober=FixedProber(result),
        tempfail_action=TempfailAction.ACCEPT,
        guard=guard,
    )
    decision = policy.decide("<anyone@zq7x.example.com>", "192.0.2.50")
    assert (decision.action, decision.reason) == (Action.REJECT, Reason.NO_DOMAIN)
    assert decision.reply == NO_DOMAIN_REPLY
    assert len(cache) == 0
    assert guard.blocked("192.0.2.50")  # counted as an unknown


class FixedProber(SyncProber):
    """Answers every probe with one result."""

    def __init__(self, result: ProbeResult) -> None:
        self.result = result

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        return self.result
