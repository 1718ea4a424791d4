"""Redis behind Sentinel in the configuration: the variables that name the sentinels, the
master's service name and the two passwords (their kinds, and the rows of the variables
table), how they combine with ``CALLAHEAD_REDIS_URL`` (one or the other), and when the
shared cache refuses them (as ``parsers.redis_url_refusal`` refuses a URL).

The rules: ``CALLAHEAD_REDIS_SENTINELS`` and ``CALLAHEAD_REDIS_URL`` exclude each other;
with sentinels, ``CALLAHEAD_REDIS_SERVICE`` is required; the service and the passwords
mean nothing without sentinels. Each of these is a ``ConfigError`` (exit 78: new
variables, no earlier release started with them). Sentinels off this host's loopback
without both passwords turn the shared cache off (whoever could reach them could name
any Redis as the master, or write to it): each backup verifies alone, and serve,
``config`` and ``doctor`` say why.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from ..base.logfmt import HIDDEN
from ..caching.redisclient import DEFAULT_SENTINEL_PORT, SentinelTarget, host_port
from .parsers import ConfigError, Kind, Variable

SENTINEL_VARIABLE = "CALLAHEAD_REDIS_SENTINELS"
_ALLOWED = (
    "expected HOST:PORT of each sentinel, separated by commas (an IPv6 address in "
    "brackets: [2001:db8::1]:26379; without a port, 26379)"
)


def _parse_sentinels(name: str, value: str) -> tuple[tuple[str, int], ...]:
    found: dict[tuple[str, int], None] = {}
    for item in value.replace(" ", ",").split(","):
        if not item:
            continue
        host, port = _host_port(name, value, item)
        found[(host, port)] = None
    return tuple(found)


def _host_port(name: str, value: str, item: str) -> tuple[str, int]:
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(name, value, f"{item!r}: {_ALLOWED}") from None
        if rest and not rest.startswith(":"):
            raise ConfigError(name, value, f"{item!r}: {_ALLOWED}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
        if ":" in port_text:
            raise ConfigError(name, value, f"{item!r}: {_ALLOWED}")
    if not host or any(not (c.isalnum() or c in "-._") for c in host.replace(":", "")):
        raise ConfigError(name, value, f"{item!r}: {_ALLOWED}")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(name, value, f"{item!r}: the port must be from 1 to 65535")
    return host, int(port_text)


def sentinels_text(sentinels: tuple[tuple[str, int], ...]) -> str:
    return ",".join(host_port(h, p) for h, p in sentinels)


def _parse_service(name: str, value: str) -> str:
    service = value.strip()
    if any(c.isspace() or not c.isprintable() for c in service) or len(service) > 200:
        raise ConfigError(
            name, value, "expected the master's name as the sentinels know it (no spaces)"
        )
    return service


def _hidden(value: str) -> str:
    return HIDDEN if value else ""


def _parse_password(name: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ConfigError(name, _hidden(value), "a password cannot hold a line break")
    return value


SENTINELS = Kind(_parse_sentinels, sentinels_text)
SERVICE = Kind(_parse_service, str)
PASSWORD = Kind(_parse_password, _hidden)
"""A password, shown as ``***`` (empty when none)."""

SENTINEL_VARIABLES: tuple[Variable, ...] = (
    Variable(
        SENTINEL_VARIABLE,
        "",
        "Redis behind Sentinel instead of CALLAHEAD_REDIS_URL (not both): the sentinels, "
        "HOST:PORT separated by commas ([IPv6]:PORT), asked where the master is; reads and "
        "writes follow the master across a failover, during which each backup goes on "
        "alone; off loopback both passwords below are required (else not used, with an "
        "error at start); empty: no Sentinel",
        kind=SENTINELS,
    ),
    Variable(
        "CALLAHEAD_REDIS_SERVICE",
        "",
        "with CALLAHEAD_REDIS_SENTINELS (and required there): the master's name in the "
        "sentinels' configuration (sentinel monitor NAME ...)",
        kind=SERVICE,
    ),
    Variable(
        "CALLAHEAD_REDIS_SENTINEL_PASSWORD",
        "",
        "with CALLAHEAD_REDIS_SENTINELS: the sentinels' password (their requirepass); never shown",
        kind=PASSWORD,
        secret=_hidden,
    ),
    Variable(
        "CALLAHEAD_REDIS_PASSWORD",
        "",
        "with CALLAHEAD_REDIS_SENTINELS: the password of the master and replicas (their "
        "requirepass); never shown (with CALLAHEAD_REDIS_URL the password is in the URL)",
        kind=PASSWORD,
        secret=_hidden,
    ),
)


def check_sentinels(config: Any, env: Mapping[str, str]) -> None:
    """How the Sentinel variables combine with each other and with the URL; raises
    ``ConfigError``."""
    sentinels = config.redis_sentinels
    if sentinels and config.redis_url:
        raise ConfigError(
            SENTINEL_VARIABLE,
            env.get(SENTINEL_VARIABLE, ""),
            "CALLAHEAD_REDIS_URL is set too: use one or the other (with sentinels, they "
            "name the master, and CALLAHEAD_REDIS_PASSWORD is its password)",
        )
    if sentinels and not config.redis_service:
        raise ConfigError(
            "CALLAHEAD_REDIS_SERVICE",
            "",
            "required with CALLAHEAD_REDIS_SENTINELS: the master's name in the sentinels' "
            "configuration (sentinel monitor NAME ...)",
        )
    if sentinels:
        return
    for variable in SENTINEL_VARIABLES[1:]:
        value = getattr(config, variable.field)
        if value:
            shown = variable.secret(value) if variable.secret is not None else value
            raise ConfigError(
                variable.name,
                shown,
                "only with CALLAHEAD_REDIS_SENTINELS (with CALLAHEAD_REDIS_URL, the "
                "password goes in the URL: redis://:PASSWORD@HOST)",
            )


def sentinel_target(config: Any) -> SentinelTarget | None:
    """The sentinels the configuration names, if any."""
    if not config.redis_sentinels:
        return None
    return SentinelTarget(
        config.redis_sentinels,
        config.redis_service,
        password=config.redis_password,
        sentinel_password=config.redis_sentinel_password,
    )


def sentinel_refusal(target: SentinelTarget) -> str:
    """Why callahead does not use ``target``, or empty: sentinels off loopback need a
    password for themselves and one for the data nodes."""
    remote = [h for h, _ in target.sentinels if not _loopback(h)]
    if not remote:
        return ""
    missing = [
        name
        for name, value in (
            ("CALLAHEAD_REDIS_SENTINEL_PASSWORD", target.sentinel_password),
            ("CALLAHEAD_REDIS_PASSWORD", target.password),
        )
        if not value
    ]
    if not missing:
        return ""
    return (
        f"sentinel {remote[0]} is off this host's loopback and {' and '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} empty: whoever can reach the sentinels "
        "could name any Redis as the master, or write to it, and decide which recipients "
        "every backup accepts; set both passwords"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
