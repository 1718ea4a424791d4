"""Routes from a Postfix configuration directory, looked up with Postfix's own tools.

``CALLAHEAD_POSTFIX_CONFIG=/etc/postfix``: the routed domains are those of that Postfix's
``relay_domains``, and the nexthop of each is what its ``transport_maps`` say. Settings are
read with ``postconf -c DIR -hx`` and every table with ``postmap -c DIR -q``, so every
map type that Postfix supports works (hash, lmdb, cdb, texthash, inline, regexp, pcre,
ldap, mysql, pgsql, sqlite...), with Postfix's own lookup order (transport(5)):

* regexp and pcre tables are searched with the whole recipient address, as Postfix does;
* the other tables with the domain, then its parent domains (``.parent`` entries, or
  ``parent`` itself when ``parent_domain_matches_subdomains`` lists ``transport_maps``),
  then ``*``; ``user@domain`` entries are not looked up (callahead routes domains);
* a result ``transport:nexthop`` whose transport runs smtp(8) in master.cf is a route
  (an empty nexthop is the recipient domain; several nexthops, as Postfix 3.5 allows,
  are tried in order); any other transport (``error:``, ``discard:``, ``lmtp:``,
  ``local:``...) means "not verified here"; no entry, or ``:`` alone, means
  ``relay_transport``'s nexthop, else ``relayhost``, else the recipient domain.

``relay_domains`` is matched as Postfix's match lists are: names (a name matches its
subdomains when ``parent_domain_matches_subdomains`` lists ``relay_domains``, Postfix's
default; otherwise ``.name`` matches them), ``!pattern`` to exclude, ``type:table`` (the
domain and its parents looked up), ``/file`` (patterns in a file).

Lookups are subprocesses run on the probe loop, at most ``MAX_LOOKUPS`` at once, each
within ``LOOKUP_TIMEOUT``; results are kept ``LOOKUP_TTL`` seconds. A failed lookup makes
the recipient undecided (``RouteUnavailable``), never rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence

from cachetools import TTLCache

from ..base.address import normalize_domain
from .postfixsettings import (
    PATTERN_TYPES,
    PostfixConfigError,
    PostfixSettings,
    direct,
    first_line,
    hops,
    is_table,
    relay_patterns,
    table_type,
    tool,
)
from .routes import Nexthop, RouteUnavailable

log = logging.getLogger("callahead.postfixmaps")

LOOKUP_TIMEOUT = 5.0
"""Seconds one ``postmap -q`` may take."""
LOOKUP_TTL = 60.0
"""Seconds a domain's route (or an address's regexp/pcre result) is kept."""
LOOKUP_CACHE_SIZE = 10_000
MAX_LOOKUPS = 4
"""``postmap`` processes running at once."""


def parent_keys(domain: str, *, parent_matches: bool) -> list[str]:
    """The keys Postfix tries for ``domain`` in a table, in order: the domain, then each
    parent as ``.parent`` (or ``parent`` when parent domains match subdomains)."""
    keys = [domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        parent = ".".join(labels[i:])
        keys.append(parent if parent_matches else "." + parent)
    return keys


def _name_matches(domain: str, pattern: str, *, parent_matches: bool) -> bool:
    """A name in a Postfix match list (match_hostname): ``name`` matches itself, and its
    subdomains when parent domains match subdomains; otherwise ``.name`` matches the
    subdomains (and then only then: with parent matching on, ``.name`` matches nothing)."""
    if domain == pattern:
        return True
    if parent_matches:
        return not pattern.startswith(".") and domain.endswith("." + pattern)
    return pattern.startswith(".") and domain.endswith(pattern)


class PostfixRoutes:
    """Routes of one Postfix configuration; ``lookup`` runs on the probe loop."""

    def __init__(self, settings: PostfixSettings) -> None:
        self._settings = settings
        self._patterns = relay_patterns(settings)
        self._domains: TTLCache[str, tuple[Nexthop, ...]] = TTLCache(
            LOOKUP_CACHE_SIZE, LOOKUP_TTL, timer=time.monotonic
        )
        self._addresses: TTLCache[str, str | None] = TTLCache(
            LOOKUP_CACHE_SIZE, LOOKUP_TTL, timer=time.monotonic
        )
        self._lock = threading.Lock()
        """The caches are read from libmilter threads (``cached``) too."""
        self._slots: asyncio.Semaphore | None = None

    @property
    def settings(self) -> PostfixSettings:
        return self._settings

    @property
    def uses_address(self) -> bool:
        """Some transport table is a regexp or pcre table, searched per address."""
        return any(table_type(t) in PATTERN_TYPES for t in self._settings.transport_maps)

    def cached(self, domain: str, address: str) -> tuple[Nexthop, ...] | None:
        """The route if it is known without a lookup; None otherwise."""
        if self.uses_address and address:
            return None
        with self._lock:
            return self._domains.get(normalize_domain(domain))

    async def lookup(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        """The nexthops for ``domain`` (empty: not routed here); raises
        ``RouteUnavailable`` when a table cannot be searched."""
        domain = normalize_domain(domain)
        pattern_hit: str | None = None
        if self.uses_address and address:
            pattern_hit = await self._address_lookup(address)
        if pattern_hit is None:
            with self._lock:
                known = self._domains.get(domain)
            if known is not None:
                return known
        if not await self._relayed(domain):
            hops: tuple[Nexthop, ...] = ()
        elif pattern_hit is not None:
            hops = self._route(pattern_hit, domain)
        else:
            hops = await self._transport(domain)
        if pattern_hit is None:
            with self._lock:
                self._domains[domain] = hops
        return hops

    async def _relayed(self, domain: str) -> bool:
        """Postfix's match_list over ``relay_domains``: the first pattern that matches
        decides (a ``!`` pattern that matches: not relayed)."""
        s = self._settings
        for item in self._patterns:
            negated = item.startswith("!")
            pattern = item[1:] if negated else item
            if is_table(pattern):
                keys = parent_keys(domain, parent_matches=s.relay_parent_matches)
                if table_type(pattern) in PATTERN_TYPES:
                    keys = keys[:1]
                matched = await self._first([pattern], keys) is not None
            else:
                matched = _name_matches(
                    domain, normalize_domain(pattern), parent_matches=s.relay_parent_matches
                )
            if matched:
                return not negated
        return False

    async def _transport(self, domain: str) -> tuple[Nexthop, ...]:
        s = self._settings
        fixed = [t for t in s.transport_maps if table_type(t) not in PATTERN_TYPES]
        keys = [*parent_keys(domain, parent_matches=s.transport_parent_matches), "*"]
        value = await self._first(fixed, keys) if fixed else None
        if value is None:
            return s.default_hops
        return self._route(value, domain)

    async def _address_lookup(self, address: str) -> str | None:
        with self._lock, contextlib.suppress(KeyError):
            return self._addresses[address]
        pattern = [t for t in self._settings.transport_maps if table_type(t) in PATTERN_TYPES]
        value = await self._first(pattern, [address])
        with self._lock:
            self._addresses[address] = value
        return value

    def _route(self, value: str, domain: str) -> tuple[Nexthop, ...]:
        """The hops of a transport(5) result; empty when it is not an SMTP transport."""
        s = self._settings
        transport, _, nexthop = value.strip().partition(":")
        if not transport and not nexthop.strip():
            return s.default_hops
        transport = transport or s.relay_transport
        if transport not in s.smtp_services:
            return ()
        try:
            return hops(nexthop, f"transport_maps entry for {domain}")
        except PostfixConfigError as exc:
            raise RouteUnavailable(str(exc)) from None

    async def _first(self, tables: Sequence[str], keys: Sequence[str]) -> str | None:
        """The value of the first key found, trying every table for each key in turn
        (Postfix's order); one ``postmap -q -`` per table with all the keys."""
        found: list[dict[str, str]] = []
        for table in tables:
            found.append(await self._postmap(table, keys))
        for key in keys:
            for values in found:
                if key.lower() in values:
                    return values[key.lower()]
        return None

    async def _postmap(self, table: str, keys: Sequence[str]) -> dict[str, str]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_LOOKUPS)
        argv = [tool("postmap"), "-c", self._settings.config_dir, "-q", "-", direct(table)]
        async with self._slots:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                raise RouteUnavailable(f"{argv[0]}: {exc}") from None
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT):
                    out, err = await proc.communicate("".join(f"{k}\n" for k in keys).encode())
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise RouteUnavailable(
                    f"postmap -q over {table} took over {LOOKUP_TIMEOUT:g}s"
                ) from None
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
        errors = err.decode(errors="replace")
        if proc.returncode not in (0, 1) or "fatal:" in errors:
            raise RouteUnavailable(f"{table}: {first_line(errors)}")
        values: dict[str, str] = {}
        for line in out.decode(errors="replace").splitlines():
            key, _, value = line.partition("\t")
            values.setdefault(key.strip().lower(), value.strip())
        return values
