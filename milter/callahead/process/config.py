"""Configuration: every ``CALLAHEAD_*`` variable, read once and validated.

``load_config`` turns an environment mapping into a frozen ``Config`` or raises
``ConfigError`` naming the variable, the value and what is allowed. Nothing else in the
package reads the environment.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import os
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..base.address import UnsendableAddress, wire_address
from ..base.errors import CallaheadError
from ..base.logfmt import HIDDEN, looks_like_credential, redact_url
from ..core.policy import TempfailAction
from ..probing.tls import TlsMode
from ..routing.postfixmaps import PostfixConfigError, PostfixSettings, load_settings
from ..routing.resolve import parse_resolver
from ..routing.routes import RouteError, RouteTable, parse_routes

EX_CONFIG = 78
"""Exit status for a bad configuration (sysexits.h EX_CONFIG)."""

DEFAULT_SOCKET = "inet:127.0.0.1:8895"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9895"
DEFAULT_ADMIN_SOCKET = "/run/callahead/admin.sock"
DEFAULT_POSTFIX_CONFIG = "/etc/postfix"
DEFAULT_POLICY_CLIENTS = "127.0.0.0/8 ::1/128"
POSTFIX_POLICY_MAX_IDLE = 300.0
"""Postfix's default smtpd_policy_service_max_idle, in seconds."""
POSTCONF_TIMEOUT = 5.0
"""Seconds ``postconf -h myhostname`` may take at start."""


class ConfigError(CallaheadError, ValueError):
    """A bad value: names the variable, the value and what is allowed."""

    def __init__(self, variable: str, value: str, allowed: str) -> None:
        super().__init__(f"{variable}={value!r} is invalid: {allowed}")
        self.variable = variable
        self.value = value
        self.allowed = allowed


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

T = TypeVar("T")


def _fmt_number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_number(
    name: str,
    value: str,
    convert: Callable[[str], T],
    *,
    what: str,
    minimum: float = 0,
    maximum: float = math.inf,
    exclusive_minimum: bool = False,
) -> T:
    try:
        number = convert(value.strip())
    except ValueError:
        raise ConfigError(name, value, what) from None
    if (
        not isinstance(number, int | float)
        or not math.isfinite(number)
        or number < minimum
        or (exclusive_minimum and number == minimum)
        or number > maximum
    ):
        raise ConfigError(name, value, what)
    return number


def _parse_port(text: str) -> int | None:
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def _valid_host(host: str) -> bool:
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return host.isascii() and all(
        part and part.replace("-", "").isalnum() for part in host.rstrip(".").split(".")
    )


def _split_hostport(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6addr]:port``; None when malformed."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        port = _parse_port(rest[1:])
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            return None
        port = _parse_port(port_text)
    if port is None or not _valid_host(host):
        return None
    return host, port


@dataclass(frozen=True, slots=True)
class Listen:
    """Where a front end listens: ``inet`` host and port, or a ``unix`` socket path."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def milter(self) -> str:
        """In libmilter's form: ``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/path``."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        family = "inet6" if ":" in self.host else "inet"
        return f"{family}:{self.port}@{self.host}"

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"inet:{_join_hostport(self.host, self.port)}"


def parse_socket(name: str, value: str) -> str:
    """Validate a milter socket spec and return it in libmilter's form."""
    return parse_listen(name, value).milter


def parse_listen(name: str, value: str) -> Listen:
    """``inet:HOST:PORT``, ``inet:[IPV6]:PORT``, ``inet:PORT@HOST``, ``inet6:PORT@HOST``
    or ``unix:/absolute/path``."""
    allowed = "expected inet:HOST:PORT, inet:PORT@HOST, inet6:PORT@HOST or unix:/absolute/path"
    kind, sep, rest = value.strip().partition(":")
    kind = kind.lower()
    if not sep or not rest:
        raise ConfigError(name, value, allowed)
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ConfigError(name, value, allowed)
        return Listen("unix", path=rest)
    if kind not in ("inet", "inet6"):
        raise ConfigError(name, value, allowed)
    if "@" in rest:
        port_text, _, host = rest.partition("@")
        port = _parse_port(port_text)
        if port is None or not _valid_host(host.strip("[]")):
            raise ConfigError(name, value, allowed)
        host = host.strip("[]")
    else:
        parsed = _split_hostport(rest)
        if parsed is None:
            raise ConfigError(name, value, allowed)
        host, port = parsed
    return Listen("inet", host=host, port=port)


def _parse_metrics(name: str, value: str) -> tuple[str, int] | None:
    if not value.strip():
        return None
    parsed = _split_hostport(value.strip())
    if parsed is None:
        raise ConfigError(name, value, "expected HOST:PORT or [IPV6]:PORT, or empty to disable")
    return parsed


def _parse_address(name: str, value: str) -> str:
    sender = value.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if sender:
        try:
            wire_address(sender)
        except UnsendableAddress:
            raise ConfigError(
                name, value, "expected an ASCII email address (user@domain), or empty for <>"
            ) from None
    return sender


def postconf(name: str) -> str | None:
    """``postconf -h NAME`` of the local Postfix (its default config directory, or
    ``MAIL_CONFIG``); None without a configured Postfix."""
    directory = os.environ.get("MAIL_CONFIG") or DEFAULT_POSTFIX_CONFIG
    if not os.path.exists(os.path.join(directory, "main.cf")):
        # postconf would fail too, after the second msg_fatal sleeps before exiting.
        return None
    command = shutil.which("postconf") or "/usr/sbin/postconf"
    try:
        done = subprocess.run(
            [command, "-h", name],
            capture_output=True,
            text=True,
            timeout=POSTCONF_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def postfix_myhostname() -> str | None:
    """The local Postfix's ``myhostname``, the name this backup MX already gives in its
    own EHLO; None without a configured Postfix."""
    name = postconf("myhostname")
    return name if name is not None and _valid_host(name) else None


_POSTFIX_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def postfix_seconds(text: str) -> float | None:
    """A Postfix time value (``30s``, ``30``, ``1m``...) in seconds; None if malformed."""
    text = text.strip().lower()
    unit = _POSTFIX_TIME_UNITS.get(text[-1:]) if text[-1:].isalpha() else 1
    number = text[:-1] if text[-1:].isalpha() else text
    if unit is None or not number.isdigit():
        return None
    return float(int(number) * unit)


def postfix_milter_command_timeout() -> float | None:
    """The local Postfix's ``milter_command_timeout`` in seconds, if it can be read."""
    value = postconf("milter_command_timeout")
    return None if value is None else postfix_seconds(value)


def default_helo_name() -> str:
    """Postfix's ``myhostname``, else the host's FQDN."""
    return postfix_myhostname() or socket.getfqdn() or "localhost"


def is_fully_qualified(helo: str) -> bool:
    """What Postfix's ``reject_non_fqdn_helo_hostname`` accepts: a name with a dot in it,
    or an address literal."""
    return helo.startswith("[") or "." in helo.strip(".")


def _is_address_literal(helo: str) -> bool:
    """RFC 5321 4.1.3: ``[IPv4]`` or ``[IPv6:address]``."""
    if not (helo.startswith("[") and helo.endswith("]")):
        return False
    inner = helo[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            return ipaddress.ip_address(inner[5:]).version == 6
        except ValueError:
            return False
    try:
        return ipaddress.ip_address(inner).version == 4
    except ValueError:
        return False


def _parse_helo(name: str, value: str) -> str:
    helo = value.strip()
    if not helo:
        return default_helo_name()
    if not (_valid_host(helo) or _is_address_literal(helo)):
        raise ConfigError(
            name, value, "expected a host name or an address literal ([192.0.2.1], [IPv6:...])"
        )
    return helo


def _number(
    convert: Callable[[str], T],
    *,
    what: str,
    minimum: float = 0,
    maximum: float = math.inf,
    exclusive_minimum: bool = False,
) -> Callable[[str, str], T]:
    def parse(name: str, value: str) -> T:
        return _parse_number(
            name,
            value,
            convert,
            what=what,
            minimum=minimum,
            maximum=maximum,
            exclusive_minimum=exclusive_minimum,
        )

    return parse


def _whole(low: int, high: int) -> Callable[[str, str], int]:
    return _number(
        int, minimum=low, maximum=high, what=f"expected a whole number from {low} to {high}"
    )


def _seconds(*, positive: bool = False, high: float = 86400) -> Callable[[str, str], float]:
    low = "> 0" if positive else ">= 0"
    return _number(
        float,
        exclusive_minimum=positive,
        maximum=high,
        what=f"expected a number of seconds {low} and at most {high:g}",
    )


E = TypeVar("E", bound=enum.Enum)


def _choice(kind: type[E], allowed: str) -> Callable[[str, str], E]:
    def parse(name: str, value: str) -> E:
        try:
            choice: E = kind(value.strip().lower())
        except ValueError:
            raise ConfigError(name, value, allowed) from None
        return choice

    return parse


def _enum_value(value: enum.Enum) -> str:
    return str(value.value)


def _as_is(value: str) -> str:
    return value


def _parse_socket_text(name: str, value: str) -> str:
    if value.strip():
        parse_socket(name, value)  # validates
    return value.strip()


def _parse_optional_listen(name: str, value: str) -> Listen | None:
    return parse_listen(name, value) if value.strip() else None


def _listen_text(listen: Listen | None) -> str:
    return "" if listen is None else str(listen)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_networks(name: str, value: str) -> tuple[Network, ...]:
    """Networks separated by spaces or commas: ``192.0.2.0/24``, ``2001:db8::/32``, a
    bare address (one host), or Postfix's ``[2001:db8::]/32``."""
    allowed = (
        "expected networks separated by spaces or commas (192.0.2.0/24, 2001:db8::/32, "
        "a single address), at least one"
    )
    networks: list[Network] = []
    for word in value.replace(",", " ").split():
        text = word.replace("[", "").replace("]", "") if word.startswith("[") else word
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(name, value, allowed) from None
            raise ConfigError(
                name,
                value,
                f"{word} has host bits set: write {loose} for that network, or the "
                "address alone for one host",
            ) from None
        networks.append(network)
    if not networks:
        raise ConfigError(name, value, allowed)
    return tuple(networks)


def _networks_text(networks: tuple[Network, ...]) -> str:
    return " ".join(str(n) for n in networks)


def _loopback_network(network: Network) -> bool:
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}").is_loopback
    return network.is_loopback


def loopback_host(host: str) -> bool:
    """Whether a listening host is reachable from this machine only: a loopback address
    or ``localhost``. ``0.0.0.0``, ``::``, other addresses and other names are not."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _parse_route_table(name: str, value: str) -> RouteTable:
    try:
        return parse_routes(value)
    except RouteError as exc:
        raise ConfigError(name, value, str(exc)) from None


def _parse_postfix_config(name: str, value: str) -> PostfixSettings | None:
    path = value.strip()
    if not path:
        return None
    if not path.startswith("/"):
        raise ConfigError(name, value, "expected the absolute path of a Postfix config directory")
    try:
        return load_settings(path.rstrip("/") or "/")
    except PostfixConfigError as exc:
        raise ConfigError(name, value, f"cannot use this Postfix configuration: {exc}") from None


def _postfix_text(settings: PostfixSettings | None) -> str:
    return "" if settings is None else settings.config_dir


def _parse_resolver(name: str, value: str) -> tuple[str, int] | None:
    try:
        return parse_resolver(value)
    except ValueError:
        raise ConfigError(
            name, value, "expected an address with an optional port (HOST[:PORT], [IPV6]:PORT)"
        ) from None


def _resolver_text(server: tuple[str, int] | None) -> str:
    return "" if server is None else _join_hostport(*server)


def _routes_text(routes: RouteTable) -> str:
    return " ".join(f"{d}={h}" for d, h in routes.entries())


def _metrics_text(listen: tuple[str, int] | None) -> str:
    return "" if listen is None else _join_hostport(*listen)


_YES = ("yes", "true", "on", "1")
_NO = ("no", "false", "off", "0")


def _parse_yes_no(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in _YES:
        return True
    if word in _NO:
        return False
    raise ConfigError(name, value, "expected yes or no")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _parse_path(name: str, value: str) -> str:
    path = value.strip()
    if path and not path.startswith("/"):
        raise ConfigError(name, value, "expected an absolute path, or empty to turn it off")
    if "\0" in path:
        raise ConfigError(name, value, "a path cannot contain a NUL character")
    return path


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _parse_redis_url(name: str, value: str) -> str:
    url = value.strip()
    if not url:
        return ""
    allowed = "expected redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://... or unix:///path"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(name, value, allowed) from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(name, value, allowed)
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise ConfigError(name, value, allowed)
    elif not parts.hostname or (port is not None and not 0 < port < 65536):
        raise ConfigError(name, value, allowed)
    import redis.connection  # only with a URL: redis-py takes a while to import

    try:
        # What redis-py itself refuses at connect (?db=abc, ?socket_timeout=soon).
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(name, value, f"{allowed} ({exc})") from None
    return url


def _parse_log_level(name: str, value: str) -> int:
    level = value.strip().upper()
    if level not in _LOG_LEVELS:
        raise ConfigError(name, value, "expected " + ", ".join(_LOG_LEVELS))
    return logging.getLevelNamesMapping()[level]


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: its default, its meaning (for ``--help`` and docs/reference.md),
    the ``Config`` field it sets, how its text is parsed (raising ``ConfigError``) and how
    the effective value is written back (``callahead config``)."""

    name: str
    default: str
    """The text used when the variable is not set."""
    meaning: str
    field: str
    parse: Callable[[str, str], Any]
    """(variable name, text) -> the field's value."""
    render: Callable[[Any], str]
    shown: str = ""
    """The default as ``--help`` shows it, when it is computed (else ``default``)."""
    secret: Callable[[str], str] | None = None
    """For a value that can carry a secret (a password in a URL): how its text is shown
    in a ``ConfigError``, whatever is wrong with it (``render`` shows it redacted too)."""

    @property
    def shown_default(self) -> str:
        return self.shown or self.default


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "CALLAHEAD_SOCKET",
        DEFAULT_SOCKET,
        "where the milter listens: inet:HOST:PORT, inet:PORT@HOST or unix:/path; empty: "
        "no milter (the policy service alone)",
        field="socket",
        parse=_parse_socket_text,
        render=_as_is,
    ),
    Variable(
        "CALLAHEAD_POLICY_LISTEN",
        "",
        "where the Postfix policy service (check_policy_service) listens: inet:HOST:PORT, "
        "inet:[IPV6]:PORT or unix:/path; empty: no policy service",
        field="policy_listen",
        parse=_parse_optional_listen,
        render=_listen_text,
    ),
    Variable(
        "CALLAHEAD_POLICY_CLIENTS",
        DEFAULT_POLICY_CLIENTS,
        "networks whose clients the inet: policy service answers (CIDRs or addresses, "
        "separated by spaces or commas); any other client is disconnected at once "
        "(callahead_policy_refused_connections_total); a policy service listening off "
        "loopback must list its Postfix hosts here (else exit 78)",
        field="policy_clients",
        parse=_parse_networks,
        render=_networks_text,
    ),
    Variable(
        "CALLAHEAD_POLICY_MAX_CONNECTIONS",
        "200",
        "policy service connections open at once (1-10000; Postfix keeps one per smtpd "
        "process: keep it above smtpd's process limit); a new one beyond it is closed at "
        "once, the open ones are served on",
        field="policy_max_connections",
        parse=_whole(1, 10000),
        render=str,
    ),
    Variable(
        "CALLAHEAD_POLICY_MAX_IDLE",
        _fmt_number(POSTFIX_POLICY_MAX_IDLE),
        "Postfix's smtpd_policy_service_max_idle: a policy connection idle 5 s longer than "
        "this (one Postfix would have closed) is closed",
        field="policy_max_idle",
        parse=_seconds(positive=True, high=86400),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_ROUTES",
        "",
        "domain=nexthop entries, separated by spaces or commas; nexthop as in "
        "transport(5): [host] or [host]:port (no MX lookup), host or host:port (MX of "
        "host, then its address), optional smtp:/relay: prefix, smtp: or relay alone "
        "for the MX of the recipient domain; .example.com matches subdomains; a domain "
        "listed twice fails over in order; taken before CALLAHEAD_POSTFIX_CONFIG (serve "
        "and probe need one of the two)",
        field="routes",
        parse=_parse_route_table,
        render=_routes_text,
    ),
    Variable(
        "CALLAHEAD_POSTFIX_CONFIG",
        "",
        "a Postfix config directory (e.g. /etc/postfix) whose relay_domains and "
        "transport_maps give the routes, looked up with postconf and postmap (re-read "
        "on SIGHUP); empty: none",
        field="postfix",
        parse=_parse_postfix_config,
        render=_postfix_text,
    ),
    Variable(
        "CALLAHEAD_RESOLVER",
        "",
        "DNS server for MX routes, HOST[:PORT] (an address); empty: the system's "
        "(/etc/resolv.conf)",
        field="resolver",
        parse=_parse_resolver,
        render=_resolver_text,
    ),
    Variable(
        "CALLAHEAD_CACHE_TTL",
        "86400",
        "seconds a positive answer is trusted",
        field="cache_ttl",
        parse=_number(float, what="expected a number of seconds >= 0 (0 disables the cache)"),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_CACHE_SIZE",
        "100000",
        "most addresses kept in the positive cache",
        field="cache_size",
        parse=_number(int, what="expected a whole number >= 0 (0 disables the cache)"),
        render=str,
    ),
    Variable(
        "CALLAHEAD_CACHE_FILE",
        "",
        "where the positive cache is saved (atomically, at stop and every "
        "CALLAHEAD_CACHE_SAVE_INTERVAL seconds) and loaded at start with each entry's "
        "remaining TTL, so a restart does not probe every address again; a missing or "
        "bad file is logged and ignored; empty: not saved",
        field="cache_file",
        parse=_parse_path,
        render=_as_is,
    ),
    Variable(
        "CALLAHEAD_CACHE_SAVE_INTERVAL",
        "300",
        "seconds between two saves of CALLAHEAD_CACHE_FILE",
        field="cache_save_interval",
        parse=_seconds(positive=True),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_CACHE_REFRESH",
        "0.1",
        "last share of the TTL (0-0.9) in which a cached address that is asked for is "
        "verified again in the background, on spare probe slots only: hot addresses "
        "never wait for a probe and users deleted on the primary drop out; 0 disables",
        field="cache_refresh",
        parse=_number(float, maximum=0.9, what="expected a number from 0 to 0.9"),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_CATCHALL_CHECK",
        "3600",
        "seconds between two checks (one probe of a made-up address, in the background, "
        "at the first recipient after that time) of whether a routed domain's primary "
        "accepts every address; such a domain's recipients are accepted without a probe "
        "(reason accepts_all); 0 disables",
        field="catchall_check",
        parse=_seconds(high=604800),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_REDIS_URL",
        "",
        "Redis shared by the backup MXes of a site (redis://HOST:PORT/DB, rediss:// for "
        "TLS, unix:///path): positive answers and probes in flight are shared, flushes act "
        "on all; Redis down or slow: each backup goes on alone; empty: not shared",
        field="redis_url",
        parse=_parse_redis_url,
        render=redact_url,
        secret=redact_url,
    ),
    Variable(
        "CALLAHEAD_REDIS_TIMEOUT",
        "0.2",
        "seconds for one Redis round trip; past it (or on any error) the recipient is "
        "handled as without Redis, and after 3 failures in a row Redis is left alone for 5 s",
        field="redis_timeout",
        parse=_number(
            float,
            exclusive_minimum=True,
            maximum=5,
            what="expected a number of seconds > 0 and at most 5",
        ),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_REDIS_LOCK_WAIT",
        "2",
        "seconds a backup waits for another backup's probe of the same address before "
        "probing itself",
        field="redis_lock_wait",
        parse=_seconds(high=60),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_REDIS_LOCAL_TTL",
        "60",
        "with Redis, seconds a positive answer is kept in this backup's own cache in front "
        "of Redis (at most CALLAHEAD_CACHE_TTL): how long a flush missed while Redis was "
        "unreachable can go unseen, and how often an address is re-probed while it is",
        field="redis_local_ttl",
        parse=_seconds(positive=True, high=86400),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_TEMPFAIL_ACTION",
        "accept",
        "accept or defer, when the probe cannot decide",
        field="tempfail_action",
        parse=_choice(TempfailAction, "expected accept or defer"),
        render=_enum_value,
    ),
    Variable(
        "CALLAHEAD_DRY_RUN",
        "no",
        "yes: decide, log and count every recipient as usual, but never reject or defer "
        "(the log line says dry_run=yes and what would have happened)",
        field="dry_run",
        parse=_parse_yes_no,
        render=_yes_no,
    ),
    Variable(
        "CALLAHEAD_PROBE_TIMEOUT",
        "10",
        "seconds for a whole probe; keep well below Postfix's milter_command_timeout",
        field="probe_timeout",
        parse=_number(
            float,
            exclusive_minimum=True,
            maximum=300,
            what="expected a number of seconds > 0 and at most 300",
        ),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_PROBE_SENDER",
        "",
        "MAIL FROM of the probes; empty is <>",
        field="probe_sender",
        parse=_parse_address,
        render=_as_is,
    ),
    Variable(
        "CALLAHEAD_PROBE_FALLBACK_SENDER",
        "",
        "MAIL FROM for one retry when a primary refuses the probe sender (not the "
        "recipient), kept for that primary from then on; empty: no retry",
        field="probe_fallback_sender",
        parse=_parse_address,
        render=_as_is,
    ),
    Variable(
        "CALLAHEAD_HELO_NAME",
        "",
        "EHLO name of the probes; the primary must accept it (a name that is not "
        "fully qualified gets a warning at start)",
        field="helo_name",
        parse=_parse_helo,
        render=_as_is,
        shown="(Postfix's myhostname, else this host's FQDN)",
    ),
    Variable(
        "CALLAHEAD_METRICS_LISTEN",
        DEFAULT_METRICS_LISTEN,
        "HOST:PORT of the Prometheus /metrics endpoint; empty disables it",
        field="metrics_listen",
        parse=_parse_metrics,
        render=_metrics_text,
    ),
    Variable(
        "CALLAHEAD_ADMIN_SOCKET",
        DEFAULT_ADMIN_SOCKET,
        "unix socket (mode 0660) where serve answers callahead cache and callahead "
        "status; empty disables it",
        field="admin_socket",
        parse=_parse_path,
        render=_as_is,
    ),
    Variable(
        "CALLAHEAD_LOG_LEVEL",
        "INFO",
        "DEBUG, INFO, WARNING or ERROR",
        field="log_level",
        parse=_parse_log_level,
        render=logging.getLevelName,
    ),
    Variable(
        "CALLAHEAD_PROBE_TLS",
        "may",
        "STARTTLS for probes, as smtp_tls_security_level: none, may (when offered) or "
        "encrypt (required); certificates are not verified",
        field="probe_tls",
        parse=_choice(TlsMode, "expected none, may or encrypt"),
        render=_enum_value,
    ),
    Variable(
        "CALLAHEAD_POOL_SIZE",
        "4",
        "open probe sessions kept per primary (1-100)",
        field="pool_size",
        parse=_whole(1, 100),
        render=str,
    ),
    Variable(
        "CALLAHEAD_POOL_IDLE",
        "30",
        "seconds an idle probe session is kept open; keep below the primary's "
        "smtpd_timeout (300 s in Postfix, 10 s under stress)",
        field="pool_idle",
        parse=_seconds(positive=True, high=3600),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_POOL_MAX_AGE",
        "10",
        "seconds a probe session may live: a primary reads its tables when a session "
        "begins, so this bounds how old a view of a new user a verdict can rest on",
        field="pool_max_age",
        parse=_seconds(positive=True, high=3600),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_MAX_PROBES",
        "64",
        "probes in flight at once, all primaries (1-10000)",
        field="max_probes",
        parse=_whole(1, 10000),
        render=str,
    ),
    Variable(
        "CALLAHEAD_PROBE_WAIT",
        "2",
        "seconds a recipient may wait for a probe slot before the tempfail action "
        "(reason overload)",
        field="probe_wait",
        parse=_seconds(high=300),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_PRIMARY_RATE",
        "0",
        "probes per second each primary may get from this callahead (a token bucket "
        "holding a second's worth, at least one); a probe over it waits within "
        "CALLAHEAD_PROBE_WAIT, else the tempfail action (reason primary_budget); "
        "0: unlimited",
        field="primary_rate",
        parse=_number(float, maximum=100_000, what="expected a number from 0 to 100000"),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_BREAKER_FAILURES",
        "5",
        "consecutive connection-level failures after which a primary is treated as "
        "down (reason primary_down); 0 disables",
        field="breaker_failures",
        parse=_whole(0, 1000),
        render=str,
    ),
    Variable(
        "CALLAHEAD_BREAKER_COOLDOWN",
        "30",
        "seconds a primary treated as down gets no probes; then one trial probe",
        field="breaker_cooldown",
        parse=_seconds(positive=True, high=3600),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT",
        "20",
        "unknown recipients a client may send per window; past it, uncached recipients "
        "get 450 4.7.1 without a probe (reason client_limit); 0 disables",
        field="client_unknown_limit",
        parse=_whole(0, 1_000_000),
        render=str,
    ),
    Variable(
        "CALLAHEAD_CLIENT_WINDOW",
        "600",
        "seconds of the sliding window of CALLAHEAD_CLIENT_UNKNOWN_LIMIT; 0 disables",
        field="client_window",
        parse=_seconds(),
        render=_fmt_number,
    ),
    Variable(
        "CALLAHEAD_CLIENT_IPV6_PREFIX",
        "64",
        "IPv6 clients are counted by network of this many bits (a host often holds a "
        "whole /64); 128 counts each address",
        field="client_ipv6_prefix",
        parse=_whole(16, 128),
        render=str,
    ),
)

_NAMES = frozenset(v.name for v in VARIABLES)


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration."""

    socket: str
    """The milter socket as the operator wrote it; empty: no milter."""
    policy_listen: Listen | None
    policy_clients: tuple[Network, ...]
    policy_max_connections: int
    policy_max_idle: float
    routes: RouteTable
    postfix: PostfixSettings | None
    resolver: tuple[str, int] | None
    cache_ttl: float
    cache_size: int
    cache_file: str
    cache_save_interval: float
    cache_refresh: float
    catchall_check: float
    redis_url: str
    redis_timeout: float
    redis_lock_wait: float
    redis_local_ttl: float
    tempfail_action: TempfailAction
    dry_run: bool
    probe_timeout: float
    probe_sender: str
    probe_fallback_sender: str
    helo_name: str
    metrics_listen: tuple[str, int] | None
    admin_socket: str
    log_level: int
    probe_tls: TlsMode
    pool_size: int
    pool_idle: float
    pool_max_age: float
    max_probes: int
    probe_wait: float
    primary_rate: float
    breaker_failures: int
    breaker_cooldown: float
    client_unknown_limit: int
    client_window: float
    client_ipv6_prefix: int

    @property
    def milter_socket(self) -> str:
        """The socket in libmilter's form (``inet:PORT@HOST``, ``inet6:…``, ``unix:…``)."""
        return parse_socket("CALLAHEAD_SOCKET", self.socket)

    def describe(self) -> list[tuple[str, str]]:
        """(variable, effective value) pairs, in the order of ``VARIABLES``."""
        return [(v.name, v.render(getattr(self, v.field))) for v in VARIABLES]


def _parse_variable(variable: Variable, text: str) -> Any:
    """``variable``'s value from ``text``; a ``ConfigError`` about a secret variable
    carries the value as ``variable.secret`` shows it, never as it was written."""
    try:
        return variable.parse(variable.name, text)
    except ConfigError as exc:
        if variable.secret is None:
            raise
        error = exc
    # Raised outside the except block: the error with the secret is not its context.
    raise ConfigError(error.variable, variable.secret(error.value), error.allowed)


def load_config(env: Mapping[str, str]) -> Config:
    """Read and validate every ``CALLAHEAD_*`` variable from ``env``."""
    unknown = sorted(k for k in env if k.startswith("CALLAHEAD_") and k not in _NAMES)
    if unknown:
        name = unknown[0]
        # CALLAHEAD_REDIS_PASSWORD does not exist, but its value is a password.
        value = HIDDEN if looks_like_credential(name) else env[name]
        raise ConfigError(name, value, "unknown variable (see --help)")
    values = {v.field: _parse_variable(v, env.get(v.name, v.default)) for v in VARIABLES}
    config = Config(**values)
    _check_policy_exposure(config, env.get("CALLAHEAD_POLICY_CLIENTS", DEFAULT_POLICY_CLIENTS))
    return config


def _check_policy_exposure(config: Config, clients_text: str) -> None:
    """A policy service reachable from other hosts answers, to anyone who reaches it,
    which addresses exist, and the requester names its own ``client_address`` (the
    dictionary guard's key): listening off loopback takes an explicit list of the
    Postfix hosts that may ask. With only loopback listed, every remote smtpd would be
    disconnected and fall back to its default action, unverified and unnoticed."""
    listen = config.policy_listen
    if listen is None or listen.kind != "inet" or loopback_host(listen.host):
        return
    if all(_loopback_network(n) for n in config.policy_clients):
        raise ConfigError(
            "CALLAHEAD_POLICY_CLIENTS",
            clients_text,
            f"CALLAHEAD_POLICY_LISTEN={listen} listens off loopback, and these networks "
            "admit loopback clients only: list the networks of the Postfix hosts that may "
            'ask (e.g. CALLAHEAD_POLICY_CLIENTS="127.0.0.0/8 ::1/128 192.0.2.0/24"), or '
            "listen on 127.0.0.1; anyone else who reaches the port could learn which "
            "addresses exist",
        )
