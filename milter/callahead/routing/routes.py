"""Which primary answers for which recipient domain.

Routes are written the way Postfix transport(5) writes a nexthop, so an operator can copy
the right-hand side of a `transport_maps` entry: ``example.com=[mx1.example.com]:25``.
An entry for ``.example.com`` matches every subdomain of example.com (not example.com
itself, as in Postfix with ``parent_domain_matches_subdomains`` off).

A nexthop is either *literal* (``[host]:port``, or an address without brackets: connect
there) or needs an *MX lookup* (``host``, ``host:port``: the MX hosts of ``host``, else its
address; ``smtp:`` or ``relay`` with no host: the MX hosts of the recipient domain). The
lookups are made by resolve.py, on the probe loop; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..base.address import normalize_domain
from ..base.errors import CallaheadError
from .targets import SkippedTarget

DEFAULT_SMTP_PORT = 25

_TRANSPORT_PREFIXES = ("smtp:", "relay:")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)
_IPV6 = re.compile(r"^(?:ipv6:)?[0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?$")


class RouteError(CallaheadError, ValueError):
    """A route entry or nexthop that cannot be used; the message says what is allowed."""


class RouteUnavailable(CallaheadError):
    """The route of a domain cannot be told now (a Postfix map or DNS lookup failed, or
    the MX hosts left are none): the recipient is undecided, never rejected.
    ``skipped``: the MX targets left out on the way (targets.py)."""

    def __init__(self, message: str, skipped: Sequence[SkippedTarget] = ()) -> None:
        super().__init__(message)
        self.skipped = tuple(skipped)


class NoSuchDomain(CallaheadError):
    """The recipient domain of an MX-derived route does not exist (an authoritative
    NXDOMAIN) or accepts no mail (an RFC 7505 null MX): the recipient is unknown
    (``550 5.1.2``), as with Postfix's ``reject_unknown_recipient_domain``."""


@dataclass(frozen=True, slots=True)
class Nexthop:
    """One primary: the host to connect to and its port.

    With ``mx`` the host is a name whose MX records (else its addresses) give the hosts
    to connect to, as in Postfix for a nexthop without brackets; an empty host with
    ``mx`` is the recipient domain itself (``smtp:`` or ``relay`` with no host)."""

    host: str
    port: int
    mx: bool = False

    def __str__(self) -> str:
        if not self.mx:
            return f"[{self.host}]:{self.port}"
        if not self.host:
            return "smtp:" if self.port == DEFAULT_SMTP_PORT else f"smtp::{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Expansion:
    """A route's nexthops made literal (resolve.MxResolver), in the order to try."""

    hops: tuple[Nexthop, ...]
    secondary: frozenset[Nexthop] = frozenset()
    """The hops that come from an MX host outside the most-preferred group of their MX
    lookup (another backup MX of the site): their valid or unknown answers are never
    final. Literal hops (``[host]``) are never secondary: the operator named them."""
    hosts: Mapping[Nexthop, str] = field(default_factory=dict)
    """The primary each hop is an address of: its MX host and port (``mx.example.com:25``,
    as ``primary_name`` writes it). The engine keeps its per-primary state (breaker,
    budget, pool, metric labels) under that name, which stays the same while a large MX
    pool hands out other addresses at every lookup. A hop not listed (a literal one) is
    its own primary."""
    skipped: tuple[SkippedTarget, ...] = ()
    """The MX hosts' addresses left out (targets.py): this host's, loopback,
    unspecified, link-local, multicast; for ``probe --explain`` and ``doctor``."""

    def primary_of(self, hop: Nexthop) -> str:
        return self.hosts.get(hop) or str(hop)


def primary_name(host: str, port: int) -> str:
    """The name of an MX host's primary state: ``host:port``, as a route writes it."""
    return str(Nexthop(host, port, mx=True))


RECIPIENT_DOMAIN = Nexthop("", DEFAULT_SMTP_PORT, mx=True)
"""``smtp:`` or ``relay`` with no host: the MX hosts of the recipient domain."""
_BARE_TRANSPORTS = ("smtp", "relay")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_nexthop(text: str) -> Nexthop:
    """Parse ``[host]``, ``[host]:port`` (literal), ``host`` or ``host:port`` (MX lookup of
    host, unless it is an address), with an optional ``smtp:`` or ``relay:`` transport
    prefix; ``smtp:``, ``relay:``, ``smtp`` or ``relay`` alone mean the MX hosts of the
    recipient domain."""
    spec = text.strip()
    if spec.lower() in _BARE_TRANSPORTS:
        return RECIPIENT_DOMAIN
    for prefix in _TRANSPORT_PREFIXES:
        if spec.lower().startswith(prefix):
            spec = spec[len(prefix) :]
            if not spec.strip():
                return RECIPIENT_DOMAIN
            break
    port_text: str | None = None
    mx = False
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise RouteError(f"nexthop {text!r} has '[' without ']'")
        host = spec[1:close]
        rest = spec[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise RouteError(f"nexthop {text!r}: expected ':port' after ']'")
            port_text = rest[1:]
    else:
        host, sep, port_text = spec.rpartition(":")
        if not sep:
            host, port_text = spec, None
        if ":" in host:
            raise RouteError(
                f"nexthop {text!r} must be [host], [host]:port, host or host:port "
                "(an IPv6 address goes in brackets)"
            )
        mx = not _is_address(host.strip())
    host = host.strip()
    if host.lower().startswith("ipv6:"):
        host = host[5:]
    if not host or not (_HOSTNAME.match(host) or (":" in host and _IPV6.match(host))):
        raise RouteError(f"nexthop {text!r}: {host!r} is not a host name or address")
    port = DEFAULT_SMTP_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RouteError(f"nexthop {text!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    return Nexthop(host=host.rstrip(".").lower() if mx else host, port=port, mx=mx)


class RouteTable:
    """Domain to nexthops. A domain listed more than once keeps its nexthops in order."""

    def __init__(self, entries: Iterable[tuple[str, Nexthop]] = ()) -> None:
        exact: dict[str, list[Nexthop]] = {}
        parents: dict[str, list[Nexthop]] = {}
        for domain, hop in entries:
            key = normalize_domain(domain)
            if key.startswith("."):
                parents.setdefault(key[1:], []).append(hop)
            else:
                exact.setdefault(key, []).append(hop)
        self._exact: Mapping[str, tuple[Nexthop, ...]] = {k: tuple(v) for k, v in exact.items()}
        self._parents: Mapping[str, tuple[Nexthop, ...]] = {k: tuple(v) for k, v in parents.items()}

    def __len__(self) -> int:
        return len(self._exact) + len(self._parents)

    def __bool__(self) -> bool:
        return bool(self._exact or self._parents)

    def lookup(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        """The nexthops for a recipient domain, or an empty tuple when it has no route
        (``address``, the whole recipient, is not needed here: see ``Routes``).

        An exact entry wins over a parent-domain entry; among parent entries the
        closest parent wins."""
        return self.match(domain)[1]

    def match(self, domain: str) -> tuple[str, tuple[Nexthop, ...]]:
        """The entry that routes a recipient domain: its key as written in the table
        (``example.com``, or ``.example.com`` for a parent entry) and its nexthops;
        ``("", ())`` when none does."""
        key = normalize_domain(domain)
        if not key:
            return "", ()
        hops = self._exact.get(key)
        if hops:
            return key, hops
        labels = key.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            hops = self._parents.get(parent)
            if hops:
                return "." + parent, hops
        return "", ()

    async def lookup_async(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        return self.lookup(domain, address)

    def route_key(self, domain: str) -> str:
        return self.match(domain)[0]

    def entries(self) -> list[tuple[str, Nexthop]]:
        """Every entry in a stable order, for printing the configuration."""
        out = [(d, h) for d, hops in self._exact.items() for h in hops]
        out += [("." + d, h) for d, hops in self._parents.items() for h in hops]
        return out


def parse_routes(text: str) -> RouteTable:
    """Parse ``domain=nexthop`` entries separated by whitespace or commas."""
    entries: list[tuple[str, Nexthop]] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        domain, sep, hop = item.partition("=")
        if not sep:
            raise RouteError(f"entry {item!r} has no '=' (expected domain=nexthop)")
        key = normalize_domain(domain)
        if not _HOSTNAME.match(key[1:] if key.startswith(".") else key):
            raise RouteError(f"entry {item!r}: {domain!r} is not a domain")
        entries.append((domain, parse_nexthop(hop)))
    return RouteTable(entries)


class Routes(Protocol):
    """Where the policy finds a domain's nexthops: a ``RouteTable``, or router.Router
    (the table, then the maps of a Postfix configuration)."""

    def lookup(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        """The nexthops of ``domain`` (``address`` is the whole recipient, for Postfix's
        regexp and pcre transport maps); empty when it has no route. Raises
        ``RouteUnavailable`` when that cannot be told now. From a thread other than the
        probe loop's."""
        ...

    async def lookup_async(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        """``lookup`` on the probe loop itself (the policy service)."""
        ...

    def route_key(self, domain: str) -> str:
        """The ``CALLAHEAD_ROUTES`` entry that routes ``domain`` (``example.com`` or
        ``.example.com``), the key of its catch-all state; empty when none does (routes
        from Postfix's maps are not checked: under a parent-domain entry the domain would
        be the sender's choice). No I/O."""
        ...
