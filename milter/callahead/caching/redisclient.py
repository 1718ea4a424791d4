"""How the shared cache's clients are made: from a Redis URL, or from Redis Sentinel
(``SentinelTarget``: the sentinels, the master's service name and the two passwords),
through redis-py's own ``redis.asyncio.sentinel``. Either way with no retries of their own
(the store's breaker decides) and every socket operation bounded; a sentinel lookup runs
inside the same bound, as part of the connect of a data connection.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

DEFAULT_SENTINEL_PORT = 26379


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:26379``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """Redis behind Sentinel: where the sentinels are, the master's name in their
    configuration (``sentinel monitor NAME ...``), the data nodes' password and the
    sentinels' own (empty: none). ``repr`` never shows a password."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    password: str = field(default="", repr=False)
    sentinel_password: str = field(default="", repr=False)

    @property
    def shown(self) -> str:
        """For log lines: the sentinels and the service, no password."""
        where = ",".join(host_port(h, p) for h, p in self.sentinels)
        return f"sentinels {where} service {self.service}"


def tls_options(url: str) -> dict[str, Any]:
    """For ``rediss://``: the server's certificate checked, and its host name (redis-py
    4.3, Debian 12's, checks no name by default), unless the URL's own query says
    otherwise (``?ssl_cert_reqs=none``, ``?ssl_check_hostname=false``: redis-py takes
    the URL's word over these)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "rediss":
        return {}
    asked = urllib.parse.parse_qs(parts.query).get("ssl_cert_reqs", ["required"])[0]
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": asked.lower() != "none"}


def unchecked_tls(url: str) -> str:
    """What a ``rediss://`` URL turns off of the certificate checks, if anything."""
    parts = urllib.parse.urlsplit(url)
    query = {k: v[0].lower() for k, v in urllib.parse.parse_qs(parts.query).items()}
    if parts.scheme != "rediss":
        return ""
    if query.get("ssl_cert_reqs", "required") != "required":
        return f"the server's certificate is not required (ssl_cert_reqs={query['ssl_cert_reqs']})"
    if query.get("ssl_check_hostname", "true") in ("false", "0", "no", "f", "n", "off"):
        return "the server's certificate is not checked for its host name"
    return ""


def _bounded(timeout: float, *, blocking: bool = False) -> dict[str, Any]:
    """Socket bounds and no retries; ``blocking``: for the subscription, which waits for
    messages as long as it takes (a health check every 30 s finds a dead connection)."""
    return {
        "socket_timeout": None if blocking else timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 30 if blocking else 0,
    }


def url_client(url: str, timeout: float, *, blocking: bool = False) -> aioredis.Redis:
    """A client of the Redis at ``url``."""
    return aioredis.Redis.from_url(url, **_bounded(timeout, blocking=blocking), **tls_options(url))


def sentinel_manager(target: SentinelTarget, timeout: float) -> Sentinel:
    """The sentinels, each asked with ``timeout`` bounds and its password; no retries
    (discovery moves on to the next sentinel by itself)."""
    ask = _bounded(timeout)
    del ask["health_check_interval"], ask["retry_on_timeout"]  # redis-py 6+ warns of it
    if target.sentinel_password:
        ask["password"] = target.sentinel_password
    return Sentinel(list(target.sentinels), sentinel_kwargs=ask)


def master_client(
    sentinel: Sentinel, target: SentinelTarget, timeout: float, *, blocking: bool = False
) -> aioredis.Redis:
    """A client of the master the sentinels name: each new connection asks them where it
    is, and a connection to a master that became a replica (``READONLY``) is dropped, so
    the next call finds the new one (redis-py 4.3 and 8 alike)."""
    options = _bounded(timeout, blocking=blocking)
    if target.password:
        options["password"] = target.password
    client: aioredis.Redis = sentinel.master_for(target.service, **options)
    return client


def master_in_use(client: aioredis.Redis) -> tuple[str, int] | None:
    """The master address a Sentinel client's pool connects to now (None: not known yet,
    or not a Sentinel client)."""
    address = getattr(client.connection_pool, "master_address", None)
    if isinstance(address, tuple) and len(address) == 2:
        return str(address[0]), int(address[1])
    return None


async def close_client(client: aioredis.Redis) -> None:
    """Close ``client`` (``aclose`` from redis-py 5, ``close`` in 4.3)."""
    closer = getattr(client, "aclose", None) or client.close
    await closer()
