"""Endpoints in the configuration: where the front ends listen (milter and policy
sockets, the metrics ``HOST:PORT``), which networks the policy service admits and
whether a host is loopback, the DNS resolver, and the route table; each read from its
text and written back, as a ``Kind`` of ``parsers``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..routing.resolve import parse_resolver
from ..routing.routes import RouteError, RouteTable, parse_routes
from .parsers import ConfigError, Kind, as_is

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_port(text: str) -> int | None:
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def valid_host(host: str) -> bool:
    """An IP address or a host name of ASCII letters, digits and hyphens."""
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
    if port is None or not valid_host(host):
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
        return f"inet:{join_hostport(self.host, self.port)}"


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
        if port is None or not valid_host(host.strip("[]")):
            raise ConfigError(name, value, allowed)
        host = host.strip("[]")
    else:
        parsed = _split_hostport(rest)
        if parsed is None:
            raise ConfigError(name, value, allowed)
        host, port = parsed
    return Listen("inet", host=host, port=port)


def _parse_socket_text(name: str, value: str) -> str:
    if value.strip():
        parse_socket(name, value)  # validates
    return value.strip()


SOCKET = Kind(_parse_socket_text, as_is)
"""The milter socket as the operator wrote it (validated); empty: no milter."""


def _parse_optional_listen(name: str, value: str) -> Listen | None:
    return parse_listen(name, value) if value.strip() else None


def _listen_text(listen: Listen | None) -> str:
    return "" if listen is None else str(listen)


OPTIONAL_LISTEN = Kind(_parse_optional_listen, _listen_text)


def _hostport_text(hostport: tuple[str, int] | None) -> str:
    return "" if hostport is None else join_hostport(*hostport)


def _parse_metrics(name: str, value: str) -> tuple[str, int] | None:
    if not value.strip():
        return None
    parsed = _split_hostport(value.strip())
    if parsed is None:
        raise ConfigError(name, value, "expected HOST:PORT or [IPV6]:PORT, or empty to disable")
    return parsed


METRICS = Kind(_parse_metrics, _hostport_text)


def _parse_resolver(name: str, value: str) -> tuple[str, int] | None:
    try:
        return parse_resolver(value)
    except ValueError:
        raise ConfigError(
            name, value, "expected an address with an optional port (HOST[:PORT], [IPV6]:PORT)"
        ) from None


RESOLVER = Kind(_parse_resolver, _hostport_text)


def _parse_route_table(name: str, value: str) -> RouteTable:
    try:
        return parse_routes(value)
    except RouteError as exc:
        raise ConfigError(name, value, str(exc)) from None


def _routes_text(routes: RouteTable) -> str:
    return " ".join(f"{d}={h}" for d, h in routes.entries())


ROUTES = Kind(_parse_route_table, _routes_text)


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


NETWORKS = Kind(_parse_networks, _networks_text)


_SKIPPED_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("127.0.0.0/8", "169.254.0.0/16", "::1/128", "fe80::/10")
)
"""The loopback and link-local networks, where an MX target is skipped unless let in."""


def _parse_mx_networks(name: str, value: str) -> tuple[Network, ...]:
    """Loopback or link-local networks as ``_parse_networks`` reads them; none for an
    empty value. A network outside them would let nothing more in, or (``0.0.0.0/0``)
    more than meant: it is refused."""
    if not value.replace(",", " ").strip():
        return ()
    networks = _parse_networks(name, value)
    for network in networks:
        first, last = network.network_address, network.broadcast_address
        if not any(first in n and last in n for n in _SKIPPED_NETWORKS):
            raise ConfigError(
                name,
                value,
                f"{network} is not a loopback or link-local network (127.0.0.0/8, "
                "169.254.0.0/16, ::1, fe80::/10): only those are skipped and can be let in",
            )
    return networks


MX_NETWORKS = Kind(_parse_mx_networks, _networks_text)


def loopback_network(network: Network) -> bool:
    """Whether a network holds loopback addresses only (IPv4-mapped ones too)."""
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
