"""From a route's nexthops to the addresses to probe, through the DNS, as Postfix's
smtp(8) does it.

* ``[host]:port`` (literal): no lookup; the session connects to ``host``.
* ``host`` / ``host:port``: the MX hosts of ``host``; with no MX records, ``host`` itself
  (RFC 5321 5.1 implicit MX); then the addresses (A, then AAAA) of each.
* ``smtp:`` or ``relay`` with no host: the same for the recipient domain.

MX hosts are tried by preference (equal ones shuffled, as RFC 5321 asks). **This host
is never probed**: an MX host whose name is this host's name (Postfix's ``myhostname``)
or one of whose addresses is this host's (``inet_interfaces`` and ``proxy_interfaces``
of the Postfix configuration; with ``all``, the addresses of this host's interfaces) is
dropped with every MX host of equal or lower preference, as smtp(8) does (it looks at
the addresses; RFC 5321 also names the host name, which catches a backup behind NAT).
Of the MX hosts left, an address that is unspecified, loopback, link-local or multicast
is skipped alone (targets.py: a relay domain's DNS must not point probes at this host's
own services; ``CALLAHEAD_MX_ALLOW_NETWORKS`` lets a loopback or link-local network
through). Every target left out is named in ``Expansion.skipped`` (or the
``RouteUnavailable``) for ``probe --explain`` and ``doctor``. When none is left (this
host is the best MX, or every address is skipped), or on any DNS failure (SERVFAIL,
REFUSED, a timeout, no server answering), the recipient is undecided
(``RouteUnavailable``).

**Only the primary's word counts.** Of one MX lookup, the hosts of the most-preferred
group (the lowest preference among *all* its MX records, whether they resolve or not;
an implicit MX is its own primary) are primaries; every other MX host is another
backup MX of the site, which accepts every address while the primary is down, so its
hops are returned in ``Expansion.secondary`` and the engine never takes their valid or
unknown answers as final. Literal hops are never secondary.

**No such domain.** When the recipient domain itself (a hostless hop: ``relay``,
``smtp:``) does not exist (dnspython's ``NXDOMAIN``) or has an RFC 7505 null MX (a lone
``MX 0 .``) and no other hop of the route is left to probe, ``NoSuchDomain`` is raised:
the recipient is unknown (``550 5.1.2``). An NXDOMAIN or a null MX of a *named* nexthop
host (``smtp:mx.example.com``) is the configuration's problem, not the recipient's:
undecided. A null MX among other MX records breaks RFC 7505: undecided too.

At most ``MAX_ADDRESSES`` addresses are returned (smtp_mx_address_limit). Answers are
cached for their TTL by dnspython's cache (bounded); ``flush`` empties it (SIGHUP).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
from collections.abc import Sequence
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from ..base.address import normalize_domain
from ..base.errors import CallaheadError
from .routes import Expansion, Nexthop, NoSuchDomain, RouteUnavailable, primary_name
from .targets import (
    AFTER_THIS_HOST,
    THIS_HOST,
    Network,
    SkippedTarget,
    TargetLog,
    describe,
    unsafe,
)
from .thishost import HostView

log = logging.getLogger("callahead.resolve")

MAX_ADDRESSES = 5
"""Addresses tried per recipient at most (Postfix's smtp_mx_address_limit)."""
DNS_CACHE_SIZE = 10_000
DNS_TIMEOUT = 5.0
"""Seconds for one name's lookups at most (within the probe's own deadline)."""


class NoRecords(CallaheadError):
    """The name exists and has no records of the type asked (NOERROR/NODATA)."""


class DnsFailure(CallaheadError):
    """NXDOMAIN, SERVFAIL, a timeout, no server answering: the reason in the message."""


class NameNotFound(DnsFailure):
    """An NXDOMAIN answer (dnspython's ``NXDOMAIN``): the name does not exist."""


class Dns(Protocol):
    """The lookups MX selection needs (``DnsPython`` is the real one)."""

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) pairs; raises NoRecords, NameNotFound (NXDOMAIN) or
        DnsFailure."""
        ...

    async def addresses(self, name: str) -> list[str]:
        """A then AAAA addresses; raises NoRecords or DnsFailure."""
        ...


def parse_resolver(text: str) -> tuple[str, int] | None:
    """``HOST[:PORT]`` or ``[IPV6]:PORT`` (HOST an address); None when empty; raises
    ValueError when malformed."""
    text = text.strip()
    if not text:
        return None
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?|([0-9A-Fa-f:.]+)", text)
    if not match:
        raise ValueError(text)
    host = match.group(1) or match.group(3) or match.group(5)
    port_text = match.group(2) or match.group(4)
    ipaddress.ip_address(host)  # raises ValueError
    port = int(port_text) if port_text else 53
    if not 0 < port < 65536:
        raise ValueError(text)
    return host, port


class DnsPython:
    """``Dns`` through dnspython's asyncio resolver: the system's servers, or one given."""

    def __init__(self, server: tuple[str, int] | None = None, timeout: float = DNS_TIMEOUT):
        self._resolver = dns.asyncresolver.Resolver(configure=server is None)
        if server is not None:
            self._resolver.nameservers = [server[0]]
            self._resolver.port = server[1]
        self._resolver.lifetime = timeout
        self._resolver.cache = dns.resolver.LRUCache(DNS_CACHE_SIZE)

    def flush(self) -> None:
        cache = self._resolver.cache
        if cache is not None:
            cache.flush()

    async def _query(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            raise NoRecords(f"{name} has no {rdtype} records") from None
        except dns.resolver.NXDOMAIN:
            raise NameNotFound(f"{name} does not exist (NXDOMAIN)") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"{rdtype} lookup of {name} failed: {exc}") from None
        return [rdata.to_text() for rdata in answer]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        out = []
        for text in await self._query(name, "MX"):
            preference, _, exchange = text.partition(" ")
            out.append((int(preference), exchange))
        return out

    async def addresses(self, name: str) -> list[str]:
        found: list[str] = []
        failure: DnsFailure | None = None
        for rdtype in ("A", "AAAA"):
            try:
                found += await self._query(name, rdtype)
            except NoRecords:
                pass
            except DnsFailure as exc:
                failure = failure or exc
        if found:
            return found
        if failure is not None:
            raise failure
        raise NoRecords(f"{name} has no address records")


class MxResolver:
    """Expands a route's nexthops into literal ones (engine.HopResolver). ``allowed``:
    the loopback and link-local networks an MX host's address may be in
    (``CALLAHEAD_MX_ALLOW_NETWORKS``, targets.py)."""

    def __init__(
        self,
        dns_: Dns,
        this_host: HostView,
        *,
        shuffle: bool = True,
        allowed: Sequence[Network] = (),
    ) -> None:
        self._dns = dns_
        self._this_host = this_host
        self._shuffle = shuffle
        self._allowed = tuple(allowed)
        self._skip_log = TargetLog()

    async def expand(self, hops: Sequence[Nexthop], domain: str) -> Expansion:
        """Literal nexthops for ``hops`` (the recipient ``domain`` for a hostless one),
        in order, at most ``MAX_ADDRESSES``, with the ones outside the most-preferred
        group of their MX lookup marked secondary, and the MX targets skipped
        (targets.py). Raises ``NoSuchDomain`` when none is left and the recipient
        domain's own lookup found it does not exist or takes no mail, else
        ``RouteUnavailable`` (with the targets skipped) when none is left."""
        out: list[Nexthop] = []
        primaries: set[Nexthop] = set()
        secondaries: set[Nexthop] = set()
        hosts: dict[Nexthop, str] = {}
        literal: set[Nexthop] = set()
        problems: list[str] = []
        skipped: list[SkippedTarget] = []
        no_domain: str | None = None
        for hop in hops:
            if not hop.mx:
                out.append(hop)
                primaries.add(hop)
                literal.add(hop)
                continue
            try:
                first, rest = await self._mx_hops(hop.host or domain, hop.port, hosts, skipped)
            except NoSuchDomain as exc:
                # Only the recipient domain's own answer says the recipient is unknown;
                # a named nexthop host that does not exist is a configuration problem.
                if not hop.host and no_domain is None:
                    no_domain = str(exc)
                problems.append(str(exc))
                continue
            except RouteUnavailable as exc:
                problems.append(str(exc))
                continue
            out += first + rest
            primaries.update(first)
            secondaries.update(rest)
        unique = list(dict.fromkeys(out))[:MAX_ADDRESSES]
        if not unique:
            if no_domain is not None:
                raise NoSuchDomain(no_domain)
            raise RouteUnavailable("; ".join(problems) or "no host to probe", skipped)
        # A hop that is a primary of any lookup (or literal) is a primary.
        secondary = frozenset(h for h in unique if h in secondaries and h not in primaries)
        # A literal hop is its own primary, even where an MX host has the same address.
        names = {h: hosts[h] for h in unique if h in hosts and h not in literal}
        return Expansion(tuple(unique), secondary, names, tuple(skipped))

    async def left_out(
        self, hops: Sequence[Nexthop], domain: str
    ) -> tuple[tuple[SkippedTarget, ...], bool]:
        """The MX targets ``expand`` leaves out for ``hops``, and whether any target is
        left to probe (for ``probe --explain`` and ``doctor``; a DNS answer already
        had is taken from the cache)."""
        try:
            return (await self.expand(hops, domain)).skipped, True
        except RouteUnavailable as exc:
            return exc.skipped, False
        except NoSuchDomain:
            return (), False

    async def _mx_hops(
        self, name: str, port: int, hosts: dict[Nexthop, str], skipped: list[SkippedTarget]
    ) -> tuple[list[Nexthop], list[Nexthop]]:
        """The hops of ``name``'s MX hosts in order: (the most-preferred group's, the
        others'); the MX host of each hop goes into ``hosts`` (the first one's, for an
        address two MX hosts share), each address left out into ``skipped``. Raises
        ``NoSuchDomain`` (NXDOMAIN, a lone null MX) or ``RouteUnavailable``."""
        name = normalize_domain(name)
        try:
            records = await self._dns.mx(name)
        except NoRecords:
            records = [(0, name)]  # implicit MX: the name is its own primary
        except NameNotFound:
            raise NoSuchDomain(f"{name} does not exist (NXDOMAIN)") from None
        except DnsFailure as exc:
            raise RouteUnavailable(str(exc)) from None
        exchanges = [(pref, normalize_domain(host)) for pref, host in records]
        if any(not host for _, host in exchanges):
            if len(exchanges) == 1:
                raise NoSuchDomain(f"{name} has a null MX (RFC 7505): it accepts no mail")
            raise RouteUnavailable(f"{name} has a null MX among other MX records (RFC 7505)")
        if not exchanges:
            raise RouteUnavailable(f"no MX host for {name}")
        best = min(pref for pref, _ in exchanges)
        exchanges.sort(key=lambda mx: (mx[0], random.random() if self._shuffle else 0))
        resolved: list[tuple[int, str, list[str]]] = []
        problems: list[str] = []
        for pref, host in exchanges:
            try:
                addresses = await self._dns.addresses(host)
            except (NoRecords, DnsFailure) as exc:
                problems.append(str(exc))
                addresses = []
            resolved.append((pref, host, addresses))
        this_host = self._this_host.current()
        cut = min(
            (pref for pref, host, addrs in resolved if this_host.is_self(host, addrs)),
            default=None,
        )
        kept: list[tuple[int, str, list[str]]] = []
        dropped: list[SkippedTarget] = []
        for pref, host, addrs in resolved:
            if cut is not None and pref >= cut:
                why = THIS_HOST if this_host.is_self(host, addrs) else AFTER_THIS_HOST
                dropped += [SkippedTarget(host, a, why) for a in addrs or [""]]
                continue
            safe = []
            for a in addrs:
                reason = unsafe(a, self._allowed)
                if reason is None:
                    safe.append(a)
                else:
                    dropped.append(SkippedTarget(host, a, reason))
            kept.append((pref, host, safe))
        for target in dropped:
            self._skip_log.note(name, target)
        skipped += dropped
        for _, host, addrs in kept:
            for a in addrs:
                hosts.setdefault(Nexthop(a, port), primary_name(host, port))
        first = [Nexthop(a, port) for pref, _, addrs in kept if pref == best for a in addrs]
        rest = [Nexthop(a, port) for pref, _, addrs in kept if pref != best for a in addrs]
        if not first and not rest:
            if cut is not None and not kept:
                raise RouteUnavailable(f"this host is the best MX host of {name}")
            unsafe_ones = [t for t in dropped if t.why not in (THIS_HOST, AFTER_THIS_HOST)]
            if unsafe_ones:
                problems.append(f"every address left is skipped: {describe(unsafe_ones)}")
            raise RouteUnavailable("; ".join(problems) or f"no address for the MX hosts of {name}")
        return first, rest
