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
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cachetools import TTLCache

from ..base.address import normalize_domain
from ..base.errors import CallaheadError
from .routes import RECIPIENT_DOMAIN, Nexthop, RouteError, RouteUnavailable, parse_nexthop

log = logging.getLogger("callahead.postfixmaps")

POSTCONF_TIMEOUT = 5.0
"""Seconds ``postconf`` may take when the configuration is (re)loaded."""
LOOKUP_TIMEOUT = 5.0
"""Seconds one ``postmap -q`` may take."""
LOOKUP_TTL = 60.0
"""Seconds a domain's route (or an address's regexp/pcre result) is kept."""
LOOKUP_CACHE_SIZE = 10_000
MAX_LOOKUPS = 4
"""``postmap`` processes running at once."""
PATTERN_TYPES = frozenset({"regexp", "pcre"})
"""Tables that Postfix searches with the whole address, never with parent domains."""
CHECK_KEY = "callahead-check.invalid"
"""The key with which each table is tried when the configuration is loaded."""
SETTINGS = (
    "relay_domains",
    "transport_maps",
    "parent_domain_matches_subdomains",
    "relay_transport",
    "relayhost",
    "myhostname",
    "inet_interfaces",
    "proxy_interfaces",
)


class PostfixConfigError(CallaheadError):
    """The Postfix configuration cannot be read, or a table in it cannot be searched."""


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def split_list(value: str) -> list[str]:
    """A Postfix list: items separated by whitespace or commas, except inside ``{}``
    (``inline:{a=b, c=d}`` is one item)."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if depth == 0 and (ch.isspace() or ch == ","):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(ch)
    if current:
        items.append("".join(current))
    return items


def _is_table(item: str) -> bool:
    """``type:name``, as opposed to a domain name or a ``/file``."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9_-]*:", item))


def _table_type(table: str) -> str:
    kind, _, rest = table.partition(":")
    if kind in ("proxy", "proxywrite"):
        kind = rest.partition(":")[0]
    return kind.lower()


def _direct(table: str) -> str:
    """``proxy:hash:/x`` is searched directly as ``hash:/x`` (no proxymap needed)."""
    kind, _, rest = table.partition(":")
    return rest if kind in ("proxy", "proxywrite") else table


@dataclass(frozen=True, slots=True)
class PostfixSettings:
    """What callahead reads from one Postfix configuration directory."""

    config_dir: str
    relay_domains: tuple[str, ...]
    transport_maps: tuple[str, ...]
    relay_parent_matches: bool
    """``relay_domains`` is in ``parent_domain_matches_subdomains``."""
    transport_parent_matches: bool
    """``transport_maps`` is in ``parent_domain_matches_subdomains``."""
    default_hops: tuple[Nexthop, ...]
    """Where a relay domain without a transport entry goes: ``relay_transport``'s
    nexthop, else ``relayhost``, else the recipient domain."""
    relay_transport: str
    myhostname: str
    interfaces: tuple[str, ...]
    """``inet_interfaces`` and ``proxy_interfaces`` entries."""
    smtp_services: frozenset[str]
    """master.cf services that run smtp(8)."""

    def describe(self) -> str:
        return (
            f"Postfix {self.config_dir} (relay_domains = {' '.join(self.relay_domains)}; "
            f"transport_maps = {' '.join(self.transport_maps)})"
        )


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=POSTCONF_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostfixConfigError(f"{argv[0]}: {exc}") from None


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "fatal:" in line or "warning:" in line]
    return (lines or text.splitlines() or [""])[0].strip()


def _hops(text: str, what: str) -> tuple[Nexthop, ...]:
    """Nexthops from a transport(5) nexthop list (empty: the recipient domain)."""
    items = split_list(text)
    if not items:
        return (RECIPIENT_DOMAIN,)
    try:
        return tuple(parse_nexthop(item) for item in items)
    except RouteError as exc:
        raise PostfixConfigError(f"{what}: {exc}") from None


def load_settings(config_dir: str) -> PostfixSettings:
    """Read ``config_dir``'s settings and try every table in them once; raises
    ``PostfixConfigError`` with the reason (Postfix's own message) when something fails."""
    if not Path(config_dir, "main.cf").is_file():
        raise PostfixConfigError(f"{config_dir}/main.cf does not exist")
    done = _run([_tool("postconf"), "-c", config_dir, "-hx", *SETTINGS])
    values = done.stdout.split("\n")
    if done.returncode != 0 or len(values) < len(SETTINGS):
        raise PostfixConfigError(f"postconf -c {config_dir}: {_first_line(done.stderr)}")
    setting = dict(zip(SETTINGS, (v.strip() for v in values), strict=False))
    parents = set(split_list(setting["parent_domain_matches_subdomains"]))
    relay_transport = setting["relay_transport"]
    transport_name, _, relay_nexthop = relay_transport.partition(":")
    if relay_nexthop.strip():
        default_hops = _hops(relay_nexthop, "relay_transport")
    elif setting["relayhost"]:
        default_hops = _hops(setting["relayhost"], "relayhost")
    else:
        default_hops = (RECIPIENT_DOMAIN,)
    services = _run([_tool("postconf"), "-c", config_dir, "-M"])
    smtp_services = frozenset(
        fields[0]
        for fields in (line.split() for line in services.stdout.splitlines())
        if len(fields) >= 8 and fields[1] == "unix" and fields[7] == "smtp"
    )
    settings = PostfixSettings(
        config_dir=config_dir,
        relay_domains=tuple(split_list(setting["relay_domains"])),
        transport_maps=tuple(split_list(setting["transport_maps"])),
        relay_parent_matches="relay_domains" in parents,
        transport_parent_matches="transport_maps" in parents,
        default_hops=default_hops,
        relay_transport=transport_name or "relay",
        myhostname=setting["myhostname"].lower().rstrip("."),
        interfaces=tuple(
            split_list(setting["inet_interfaces"]) + split_list(setting["proxy_interfaces"])
        ),
        smtp_services=smtp_services or frozenset({"smtp", "relay"}),
    )
    for table in (*settings.transport_maps, *filter(_is_table, _relay_patterns(settings))):
        checked = _run([_tool("postmap"), "-c", config_dir, "-q", CHECK_KEY, _direct(table)])
        if checked.returncode not in (0, 1) or "fatal:" in checked.stderr:
            raise PostfixConfigError(f"{table}: {_first_line(checked.stderr)}")
    return settings


def _relay_patterns(settings: PostfixSettings) -> list[str]:
    """``relay_domains`` with ``/file`` entries replaced by the patterns in the file."""
    out: list[str] = []
    for item in settings.relay_domains:
        negated = item.startswith("!")
        body = item[1:] if negated else item
        if body.startswith("/"):
            try:
                text = Path(body).read_text()
            except OSError as exc:
                raise PostfixConfigError(f"relay_domains: {body}: {exc.strerror}") from None
            lines = (line.split("#", 1)[0] for line in text.splitlines())
            out += [("!" if negated else "") + p for line in lines for p in split_list(line)]
        else:
            out.append(item)
    return out


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
        self._patterns = _relay_patterns(settings)
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
        return any(_table_type(t) in PATTERN_TYPES for t in self._settings.transport_maps)

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
            if _is_table(pattern):
                keys = parent_keys(domain, parent_matches=s.relay_parent_matches)
                if _table_type(pattern) in PATTERN_TYPES:
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
        fixed = [t for t in s.transport_maps if _table_type(t) not in PATTERN_TYPES]
        keys = [*parent_keys(domain, parent_matches=s.transport_parent_matches), "*"]
        value = await self._first(fixed, keys) if fixed else None
        if value is None:
            return s.default_hops
        return self._route(value, domain)

    async def _address_lookup(self, address: str) -> str | None:
        with self._lock, contextlib.suppress(KeyError):
            return self._addresses[address]
        pattern = [t for t in self._settings.transport_maps if _table_type(t) in PATTERN_TYPES]
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
            return _hops(nexthop, f"transport_maps entry for {domain}")
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
        argv = [_tool("postmap"), "-c", self._settings.config_dir, "-q", "-", _direct(table)]
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
            raise RouteUnavailable(f"{table}: {_first_line(errors)}")
        values: dict[str, str] = {}
        for line in out.decode(errors="replace").splitlines():
            key, _, value = line.partition("\t")
            values.setdefault(key.strip().lower(), value.strip())
        return values
