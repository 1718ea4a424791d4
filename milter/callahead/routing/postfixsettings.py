"""Postfix's own settings, as callahead reads them for routes: postconf's answers for one
configuration directory (relay_domains, transport_maps, relayhost, this host's names
and interfaces, ...), the tables among them, and the bounded runner of Postfix's tools
that the map lookups (postfixmaps.py) use too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import CallaheadError
from .routes import RECIPIENT_DOMAIN, Nexthop, RouteError, parse_nexthop

POSTCONF_TIMEOUT = 5.0
"""Seconds ``postconf`` may take when the configuration is (re)loaded."""
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


def tool(name: str) -> str:
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


def run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
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


def first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "fatal:" in line or "warning:" in line]
    return (lines or text.splitlines() or [""])[0].strip()


def hops(text: str, what: str) -> tuple[Nexthop, ...]:
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
    done = run([tool("postconf"), "-c", config_dir, "-hx", *SETTINGS])
    values = done.stdout.split("\n")
    if done.returncode != 0 or len(values) < len(SETTINGS):
        raise PostfixConfigError(f"postconf -c {config_dir}: {first_line(done.stderr)}")
    setting = dict(zip(SETTINGS, (v.strip() for v in values), strict=False))
    parents = set(split_list(setting["parent_domain_matches_subdomains"]))
    relay_transport = setting["relay_transport"]
    transport_name, _, relay_nexthop = relay_transport.partition(":")
    if relay_nexthop.strip():
        default_hops = hops(relay_nexthop, "relay_transport")
    elif setting["relayhost"]:
        default_hops = hops(setting["relayhost"], "relayhost")
    else:
        default_hops = (RECIPIENT_DOMAIN,)
    services = run([tool("postconf"), "-c", config_dir, "-M"])
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
    for table in (*settings.transport_maps, *filter(is_table, relay_patterns(settings))):
        checked = run([tool("postmap"), "-c", config_dir, "-q", CHECK_KEY, direct(table)])
        if checked.returncode not in (0, 1) or "fatal:" in checked.stderr:
            raise PostfixConfigError(f"{table}: {first_line(checked.stderr)}")
    return settings


PATTERN_TYPES = frozenset({"regexp", "pcre"})
"""Tables that Postfix searches with the whole address, never with parent domains."""


CHECK_KEY = "callahead-check.invalid"
"""The key with which each table is tried when the configuration is loaded."""


def is_table(item: str) -> bool:
    """``type:name``, as opposed to a domain name or a ``/file``."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9_-]*:", item))


def table_type(table: str) -> str:
    kind, _, rest = table.partition(":")
    if kind in ("proxy", "proxywrite"):
        kind = rest.partition(":")[0]
    return kind.lower()


def direct(table: str) -> str:
    """``proxy:hash:/x`` is searched directly as ``hash:/x`` (no proxymap needed)."""
    kind, _, rest = table.partition(":")
    return rest if kind in ("proxy", "proxywrite") else table


def relay_patterns(settings: PostfixSettings) -> list[str]:
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
