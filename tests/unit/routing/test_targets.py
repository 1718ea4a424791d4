"""MX-derived probe targets (targets.py, through resolve.py): an address that an MX
lookup gives is never probed when it is unspecified, loopback, link-local or multicast
(unless CALLAHEAD_MX_ALLOW_NETWORKS lets a loopback or link-local network in), private
ones are; what is left out is named (``Expansion.skipped``, ``RouteUnavailable.skipped``)
and logged once; with nothing left the recipient is undecided, nothing connected to."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence

import pytest

from callahead.caching.cache import PositiveCache
from callahead.core.policy import Action, Policy, Reason, TempfailAction
from callahead.probing.engine import ProbeEngine
from callahead.routing.resolve import MxResolver, NoRecords
from callahead.routing.routes import (
    RECIPIENT_DOMAIN,
    Expansion,
    Nexthop,
    RouteUnavailable,
    parse_routes,
)
from callahead.routing.targets import (
    AFTER_THIS_HOST,
    LINK_LOCAL,
    LOGGED_MAX,
    LOOPBACK,
    MULTICAST,
    THIS_HOST,
    UNSPECIFIED,
    Network,
    SkippedTarget,
    TargetLog,
    unsafe,
)
from callahead.routing.thishost import HostView
from callahead.smtp.verdict import ProbeResult, Skip, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script
from tests.unit.routing.test_resolve import SELF, FakeDns, FixedProber, addrs
from tests.unit.settings import probe_settings

LAB = (ipaddress.ip_network("127.0.53.0/24"), ipaddress.ip_network("fe80::/64"))


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("0.0.0.0", UNSPECIFIED),
        ("0.1.2.3", UNSPECIFIED),
        ("::", UNSPECIFIED),
        ("::ffff:0.0.0.0", UNSPECIFIED),
        ("127.0.0.1", LOOPBACK),
        ("127.9.9.9", LOOPBACK),
        ("::1", LOOPBACK),
        ("::ffff:127.0.0.1", LOOPBACK),
        ("169.254.10.1", LINK_LOCAL),
        ("fe80::1", LINK_LOCAL),
        ("::ffff:169.254.0.1", LINK_LOCAL),
        ("224.0.0.1", MULTICAST),
        ("ff02::1", MULTICAST),
        ("not an address", UNSPECIFIED),
        # Private addresses are probed: a primary behind the backup, on a LAN or a VPN.
        ("10.0.0.5", None),
        ("172.16.3.4", None),
        ("192.168.1.1", None),
        ("100.64.0.1", None),
        ("fd00::25", None),
        ("192.0.2.1", None),
        ("2001:db8::1", None),
    ],
)
def test_which_addresses_are_skipped(address: str, why: str | None) -> None:
    assert unsafe(address) == why


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.53.10", None),
        ("::ffff:127.0.53.10", None),
        ("fe80::25", None),
        ("127.0.0.1", LOOPBACK),  # outside the networks let in
        ("fe80:0:0:1::25", LINK_LOCAL),
        ("0.0.0.0", UNSPECIFIED),  # never let in
        ("ff02::1", MULTICAST),
    ],
)
def test_allowed_networks_let_loopback_and_link_local_in_and_nothing_else(
    address: str, why: str | None
) -> None:
    assert unsafe(address, LAB) == why


def expansion(
    dns: FakeDns,
    hops: Sequence[Nexthop] = (RECIPIENT_DOMAIN,),
    *,
    host: HostView = SELF,
    allowed: Sequence[Network] = (),
) -> Expansion:
    resolver = MxResolver(dns, host, shuffle=False, allowed=allowed)
    return asyncio.run(resolver.expand(hops, "example.com"))


def test_a_skipped_address_is_left_out_alone_and_named() -> None:
    dns = FakeDns(
        {"example.com": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
        {
            "mx1.example.com": ["127.0.0.1", "192.0.2.1", "0.0.0.0"],
            "mx2.example.com": ["169.254.1.1", "10.1.2.3"],
        },
    )
    out = expansion(dns)
    assert out.hops == tuple(addrs("192.0.2.1", "10.1.2.3"))
    assert out.secondary == frozenset(addrs("10.1.2.3"))
    assert out.skipped == (
        SkippedTarget("mx1.example.com", "127.0.0.1", LOOPBACK),
        SkippedTarget("mx1.example.com", "0.0.0.0", UNSPECIFIED),
        SkippedTarget("mx2.example.com", "169.254.1.1", LINK_LOCAL),
    )
    assert str(out.skipped[0]) == "mx1.example.com 127.0.0.1 (loopback)"


def test_every_address_skipped_is_route_unavailable_naming_them() -> None:
    dns = FakeDns(
        {"example.com": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
        {"mx1.example.com": ["127.0.0.1"], "mx2.example.com": ["::"]},
    )
    with pytest.raises(RouteUnavailable) as raised:
        expansion(dns)
    assert "mx1.example.com 127.0.0.1 (loopback)" in str(raised.value)
    assert "mx2.example.com :: (unspecified)" in str(raised.value)
    assert raised.value.skipped == (
        SkippedTarget("mx1.example.com", "127.0.0.1", LOOPBACK),
        SkippedTarget("mx2.example.com", "::", UNSPECIFIED),
    )


def test_a_skipped_best_mx_leaves_the_others_secondary() -> None:
    """The best MX host's addresses all skipped: the primary is as good as one that
    does not resolve, and the other MX hosts stay secondary (never final)."""
    dns = FakeDns(
        {"example.com": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
        {"mx1.example.com": ["127.0.0.2"], "mx2.example.com": ["192.0.2.2"]},
    )
    out = expansion(dns)
    assert out.hops == tuple(addrs("192.0.2.2"))
    assert out.secondary == frozenset(out.hops)


def test_allowed_networks_are_probed() -> None:
    dns = FakeDns({"example.com": [(10, "mx.example.com")]}, {"mx.example.com": ["127.0.53.10"]})
    assert expansion(dns, allowed=LAB).hops == tuple(addrs("127.0.53.10"))
    with pytest.raises(RouteUnavailable):
        expansion(dns)


def test_this_hosts_entry_and_those_after_it_are_named_too() -> None:
    dns = FakeDns(
        {
            "example.com": [
                (10, "mx1.example.com"),
                (20, "backup.example.net"),
                (30, "low.example.com"),
            ]
        },
        {
            "mx1.example.com": ["192.0.2.1"],
            "backup.example.net": ["192.0.2.20"],
            "low.example.com": NoRecords("low.example.com has no address records"),
        },
    )
    out = expansion(dns)
    assert out.hops == tuple(addrs("192.0.2.1"))
    assert out.skipped == (
        SkippedTarget("backup.example.net", "192.0.2.20", THIS_HOST),
        SkippedTarget("low.example.com", "", AFTER_THIS_HOST),
    )
    assert str(out.skipped[1]) == "low.example.com (after this host)"


def test_literal_hops_are_never_judged() -> None:
    """The operator's own ``[127.0.0.1]:2525`` is probed, loopback and all."""
    literal = Nexthop("127.0.0.1", 2525)
    assert expansion(FakeDns({}, {}), [literal]).hops == (literal,)


def test_each_skipped_target_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns(
        {"example.com": [(10, "mx1.example.com"), (20, "lo\n.example.com")]},
        {"mx1.example.com": ["192.0.2.1", "127.0.0.1"], "lo\n.example.com": ["0.0.0.0"]},
    )
    resolver = MxResolver(dns, SELF, shuffle=False)
    with caplog.at_level(logging.INFO, logger="callahead.resolve"):
        for _ in range(5):
            asyncio.run(resolver.expand([RECIPIENT_DOMAIN], "example.com"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == (
        "MX host mx1.example.com of example.com is at 127.0.0.1, loopback: never probed "
        "(CALLAHEAD_MX_ALLOW_NETWORKS can let its network through)"
    )
    # DNS data is quoted: a name cannot break the line.
    assert lines[1] == (
        "MX host lo\\x0a.example.com of example.com is at 0.0.0.0, unspecified: never probed"
    )


def test_the_log_memory_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    log = TargetLog()
    with caplog.at_level(logging.WARNING, logger="callahead.resolve"):
        for n in range(LOGGED_MAX + 10):
            log.note("example.com", SkippedTarget("mx", f"127.0.{n // 250}.{n % 250}", LOOPBACK))
        log.note("example.com", SkippedTarget("mx", "127.0.0.0", LOOPBACK))
    assert len(caplog.records) == LOGGED_MAX + 11  # each new one once; the first again
    assert len(log._logged) <= LOGGED_MAX


def test_nothing_left_is_undecided_and_nothing_is_connected_to(
    scripted: StartScripted,
) -> None:
    """An MX host at 127.0.0.1 where a server listens (this host's own service): it is
    never connected to, and the recipient gets the tempfail action, never a 550."""
    decoy = scripted(Script(rcpt_default="550 5.1.1 decoy: must never be probed"))
    dns = FakeDns({"example.com": [(10, "mx.example.com")]}, {"mx.example.com": [decoy.host]})
    hop = Nexthop("example.com", decoy.port, mx=True)

    async def go() -> ProbeResult:
        engine = ProbeEngine(probe_settings(), resolver=MxResolver(dns, SELF))
        try:
            result = await engine.probe("user@example.com", [hop])
        finally:
            await engine.aclose()
        assert (result.verdict, result.skipped) == (Verdict.TEMPFAIL, Skip.ROUTE_FAILED)
        assert "mx.example.com 127.0.0.1 (loopback)" in result.detail
        return result

    result = asyncio.run(go())
    assert decoy.connections == 0
    # Through the policy: the tempfail action, never a reject.
    for tempfail, action in (
        (TempfailAction.ACCEPT, Action.ACCEPT),
        (TempfailAction.DEFER, Action.DEFER),
    ):
        policy = Policy(
            routes=parse_routes(f"example.com=example.com:{decoy.port}"),
            cache=PositiveCache(ttl=3600, maxsize=10),
            prober=FixedProber(result),
            tempfail_action=tempfail,
        )
        decision = policy.decide("<user@example.com>")
        assert (decision.action, decision.reason) == (action, Reason.ROUTE_FAILED)
