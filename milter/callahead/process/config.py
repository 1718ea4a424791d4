"""Configuration: every ``CALLAHEAD_*`` variable, read once and validated.

``load_config`` turns an environment mapping into a frozen ``Config`` or raises
``ConfigError`` naming the variable, the value and what is allowed. Nothing else in the
package reads the environment. The variables are in ``variables``, the kinds of their
values in ``parsers`` and ``endpoints``, what comes from Postfix in ``postfixconf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base.logfmt import HIDDEN, looks_like_credential, redact_url
from ..caching.redisclient import SentinelTarget
from ..core.policy import TempfailAction
from ..probing.loop import LoopKind
from ..routing.postfixsettings import PostfixSettings
from ..routing.routes import RouteTable
from ..smtp.tls import TlsMode
from .endpoints import Listen, Network, loopback_host, loopback_network, parse_socket
from .parsers import ConfigError, Variable, redis_url_refusal
from .sentinelconfig import check_sentinels, sentinel_refusal, sentinel_target, sentinels_text
from .variables import DEFAULT_POLICY_CLIENTS, NAMES, VARIABLES

# The entry: load_config, what it gives and what it raises (ConfigError, of parsers).
__all__ = ["EX_CONFIG", "Config", "ConfigError", "load_config"]

EX_CONFIG = 78
"""Exit status for a bad configuration (sysexits.h EX_CONFIG)."""


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
    mx_allow_networks: tuple[Network, ...]
    cache_ttl: float
    cache_size: int
    cache_file: str
    cache_save_interval: float
    cache_refresh: float
    catchall_check: float
    controls: tuple[str, ...]
    maillog: str
    redis_url: str
    redis_timeout: float
    redis_lock_wait: float
    redis_local_ttl: float
    redis_sentinels: tuple[tuple[str, int], ...]
    redis_service: str
    redis_sentinel_password: str
    redis_password: str
    tempfail_action: TempfailAction
    dry_run: bool
    probe_timeout: float
    probe_sender: str
    probe_fallback_sender: str
    helo_name: str
    metrics_listen: tuple[str, int] | None
    admin_socket: str
    log_level: int
    event_loop: LoopKind
    probe_tls: TlsMode
    probe_pipelining: bool
    pool_size: int
    pool_idle: float
    pool_max_age: float
    max_probes: int
    probe_wait: float
    primary_rate: float
    site_primary_rate: float
    breaker_failures: int
    breaker_cooldown: float
    client_unknown_limit: int
    client_window: float
    client_ipv6_prefix: int

    @property
    def milter_socket(self) -> str:
        """The socket in libmilter's form (``inet:PORT@HOST``, ``inet6:…``, ``unix:…``)."""
        return parse_socket("CALLAHEAD_SOCKET", self.socket)

    @property
    def redis_refused(self) -> str:
        """Why ``CALLAHEAD_REDIS_URL`` (or the sentinels) is not used (the shared cache
        is off, each backup verifies alone), or empty (``parsers.redis_url_refusal``,
        ``sentinelconfig.sentinel_refusal``)."""
        target = sentinel_target(self)
        return redis_url_refusal(self.redis_url) if target is None else sentinel_refusal(target)

    @property
    def shared_redis_url(self) -> str:
        """The Redis URL the shared cache uses: empty without one, or when it is refused."""
        return "" if self.redis_refused else self.redis_url

    @property
    def shared_redis(self) -> str | SentinelTarget:
        """What the shared cache uses: the URL, or the sentinels; empty: none (not
        configured, or refused)."""
        target = sentinel_target(self)
        if target is None:
            return self.shared_redis_url
        return "" if self.redis_refused else target

    @property
    def redis_shown(self) -> str:
        """The Redis configured, for messages (no password)."""
        target = sentinel_target(self)
        if target is None:
            return f"CALLAHEAD_REDIS_URL={redact_url(self.redis_url)}"
        return f"CALLAHEAD_REDIS_SENTINELS={sentinels_text(target.sentinels)}"

    def describe(self) -> list[tuple[str, str]]:
        """(variable, effective value) pairs, in the order of ``VARIABLES``."""
        return [(v.name, v.kind.render(getattr(self, v.field))) for v in VARIABLES]


def _parse_variable(variable: Variable, text: str) -> Any:
    """``variable``'s value from ``text``; a ``ConfigError`` about a secret variable
    carries the value as ``variable.secret`` shows it, never as it was written."""
    try:
        return variable.kind.parse(variable.name, text)
    except ConfigError as exc:
        if variable.secret is None:
            raise
        error = exc
    # Raised outside the except block: the error with the secret is not its context.
    raise ConfigError(error.variable, variable.secret(error.value), error.allowed)


def load_config(env: Mapping[str, str]) -> Config:
    """Read and validate every ``CALLAHEAD_*`` variable from ``env``."""
    unknown = sorted(k for k in env if k.startswith("CALLAHEAD_") and k not in NAMES)
    if unknown:
        name = unknown[0]
        # CALLAHEAD_REDIS_PASSWD does not exist, but its value is a password.
        value = HIDDEN if looks_like_credential(name) else env[name]
        raise ConfigError(name, value, "unknown variable (see --help)")
    values = {v.field: _parse_variable(v, env.get(v.name, v.default)) for v in VARIABLES}
    config = Config(**values)
    check_sentinels(config, env)
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
    if all(loopback_network(n) for n in config.policy_clients):
        raise ConfigError(
            "CALLAHEAD_POLICY_CLIENTS",
            clients_text,
            f"CALLAHEAD_POLICY_LISTEN={listen} listens off loopback, and these networks "
            "admit loopback clients only: list the networks of the Postfix hosts that may "
            'ask (e.g. CALLAHEAD_POLICY_CLIENTS="127.0.0.0/8 ::1/128 192.0.2.0/24"), or '
            "listen on 127.0.0.1; anyone else who reaches the port could learn which "
            "addresses exist",
        )
