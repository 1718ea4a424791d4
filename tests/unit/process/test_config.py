"""Configuration: defaults, every variable parsed, every bad value named; and the CLI."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from callahead.core.policy import TempfailAction
from callahead.frontends.policyservice import LOOPBACK
from callahead.probing.engine import EngineSettings
from callahead.probing.loop import HANDOFF_MARGIN
from callahead.process.assembly import answer_time, engine_settings
from callahead.process.cli import main
from callahead.process.config import EX_CONFIG, Config, ConfigError, load_config
from callahead.process.endpoints import loopback_host
from callahead.process.postfixconf import default_helo_name, is_fully_qualified, postfix_seconds
from callahead.process.startchecks import answer_time_problem, exposure_warnings
from callahead.process.variables import DEFAULT_METRICS_LISTEN, DEFAULT_SOCKET, VARIABLES
from callahead.routing.postfixsettings import PostfixSettings
from callahead.routing.router import LOOKUP_WAIT
from callahead.routing.routes import Nexthop
from callahead.smtp.tls import TlsMode

GOOD_ENV: dict[str, str] = {
    "CALLAHEAD_ROUTES": "example.com=[127.0.0.1]:2525",
    "CALLAHEAD_HELO_NAME": "backup.example.net",
}


def env_with(**overrides: str) -> dict[str, str]:
    env = dict(GOOD_ENV)
    env.update(overrides)
    return env


# --- defaults --------------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config({})
    # A unix socket in Postfix's queue directory (root:postfix 0770): no TCP port that
    # any local user could reach, or bind first.
    assert config.socket == DEFAULT_SOCKET == "unix:/var/spool/postfix/callahead/milter.sock"
    assert config.milter_socket == "unix:/var/spool/postfix/callahead/milter.sock"
    assert exposure_warnings(config) == []
    assert not config.routes
    assert len(config.routes) == 0
    assert config.cache_ttl == 86400
    assert config.cache_size == 100000
    assert config.tempfail_action is TempfailAction.ACCEPT
    assert config.probe_timeout == 10
    assert config.probe_sender == ""
    assert config.helo_name == default_helo_name()
    assert config.metrics_listen == ("127.0.0.1", 9895)
    assert DEFAULT_METRICS_LISTEN == "127.0.0.1:9895"
    assert config.log_level == logging.INFO
    assert config.probe_tls is TlsMode.MAY
    assert config.pool_size == 4
    assert config.pool_idle == 30
    assert config.max_probes == 64
    assert config.probe_wait == 2
    assert config.primary_rate == 0
    assert config.site_primary_rate == 0
    assert config.breaker_failures == 5
    assert config.breaker_cooldown == 30
    assert config.client_unknown_limit == 20
    assert config.client_window == 600
    assert config.cache_file == ""
    assert config.cache_save_interval == 300
    assert config.cache_refresh == 0.1
    assert config.catchall_check == 3600
    assert config.controls == ()
    assert config.maillog == ""
    assert (config.redis_sentinels, config.redis_service) == ((), "")
    assert config.redis_password == config.redis_sentinel_password == ""
    assert config.shared_redis == ""
    assert config.dry_run is False
    assert config.admin_socket == "/run/callahead/admin.sock"
    assert config.policy_listen is None
    assert [str(n) for n in config.policy_clients] == ["127.0.0.0/8", "::1/128"]
    assert config.policy_clients == LOOPBACK  # the service's own default
    assert config.policy_max_connections == 200
    assert config.policy_max_idle == 300  # Postfix's smtpd_policy_service_max_idle
    # Every answer to Postfix stays well inside milter_command_timeout (30 s).
    assert config.probe_wait + config.probe_timeout < 30


def test_controls_are_normalized_deduplicated_and_written_back() -> None:
    config = load_config(
        env_with(CALLAHEAD_CONTROLS=" It@Example.COM., it@example.com,ops@bücher.de ")
    )
    assert config.controls == ("It@example.com", "it@example.com", "ops@xn--bcher-kva.de")
    written = dict(config.describe())["CALLAHEAD_CONTROLS"]
    assert load_config(env_with(CALLAHEAD_CONTROLS=written)).controls == config.controls


def test_documented_defaults_match_the_effective_ones() -> None:
    documented = {v.name: v.default for v in VARIABLES}
    described = dict(load_config({"CALLAHEAD_HELO_NAME": "h.example"}).describe())
    for name, default in documented.items():
        if name == "CALLAHEAD_HELO_NAME":
            continue
        assert described[name] == default, name


def test_variables_list_is_complete_and_ordered() -> None:
    names = [v.name for v in VARIABLES]
    assert names == [
        "CALLAHEAD_SOCKET",
        "CALLAHEAD_POLICY_LISTEN",
        "CALLAHEAD_POLICY_CLIENTS",
        "CALLAHEAD_POLICY_MAX_CONNECTIONS",
        "CALLAHEAD_POLICY_MAX_IDLE",
        "CALLAHEAD_ROUTES",
        "CALLAHEAD_POSTFIX_CONFIG",
        "CALLAHEAD_RESOLVER",
        "CALLAHEAD_MX_ALLOW_NETWORKS",
        "CALLAHEAD_CACHE_TTL",
        "CALLAHEAD_CACHE_SIZE",
        "CALLAHEAD_CACHE_FILE",
        "CALLAHEAD_CACHE_SAVE_INTERVAL",
        "CALLAHEAD_CACHE_REFRESH",
        "CALLAHEAD_CATCHALL_CHECK",
        "CALLAHEAD_CONTROLS",
        "CALLAHEAD_MAILLOG",
        "CALLAHEAD_REDIS_URL",
        "CALLAHEAD_REDIS_TIMEOUT",
        "CALLAHEAD_REDIS_LOCK_WAIT",
        "CALLAHEAD_REDIS_LOCAL_TTL",
        "CALLAHEAD_REDIS_SENTINELS",
        "CALLAHEAD_REDIS_SERVICE",
        "CALLAHEAD_REDIS_SENTINEL_PASSWORD",
        "CALLAHEAD_REDIS_PASSWORD",
        "CALLAHEAD_TEMPFAIL_ACTION",
        "CALLAHEAD_DRY_RUN",
        "CALLAHEAD_PROBE_TIMEOUT",
        "CALLAHEAD_PROBE_SENDER",
        "CALLAHEAD_PROBE_FALLBACK_SENDER",
        "CALLAHEAD_HELO_NAME",
        "CALLAHEAD_METRICS_LISTEN",
        "CALLAHEAD_ADMIN_SOCKET",
        "CALLAHEAD_LOG_LEVEL",
        "CALLAHEAD_EVENT_LOOP",
        "CALLAHEAD_PROBE_TLS",
        "CALLAHEAD_PROBE_PIPELINING",
        "CALLAHEAD_POOL_SIZE",
        "CALLAHEAD_POOL_IDLE",
        "CALLAHEAD_POOL_MAX_AGE",
        "CALLAHEAD_MAX_PROBES",
        "CALLAHEAD_PROBE_WAIT",
        "CALLAHEAD_PRIMARY_RATE",
        "CALLAHEAD_SITE_PRIMARY_RATE",
        "CALLAHEAD_BREAKER_FAILURES",
        "CALLAHEAD_BREAKER_COOLDOWN",
        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT",
        "CALLAHEAD_CLIENT_WINDOW",
        "CALLAHEAD_CLIENT_IPV6_PREFIX",
    ]
    assert [n for n, _ in load_config(GOOD_ENV).describe()] == names


def test_other_environment_variables_are_ignored() -> None:
    config = load_config({"PATH": "/bin", "HOME": "/root", "CALLAHEADX": "1"})
    assert config.socket == DEFAULT_SOCKET


# --- every variable parsed -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "milter_form"),
    [
        ("inet:127.0.0.1:10025", "inet:10025@127.0.0.1"),
        ("inet:localhost:10025", "inet:10025@localhost"),
        ("inet:10025@127.0.0.1", "inet:10025@127.0.0.1"),
        ("inet:10025@milter.example.net", "inet:10025@milter.example.net"),
        ("inet:[::1]:10025", "inet6:10025@::1"),
        ("inet:10025@[::1]", "inet6:10025@::1"),
        ("inet6:10025@::1", "inet6:10025@::1"),
        ("INET:127.0.0.1:1", "inet:1@127.0.0.1"),
        ("inet:127.0.0.1:65535", "inet:65535@127.0.0.1"),
        ("unix:/run/callahead/milter.sock", "unix:/run/callahead/milter.sock"),
        ("local:/run/callahead.sock", "unix:/run/callahead.sock"),
        ("  inet:127.0.0.1:10025  ", "inet:10025@127.0.0.1"),
    ],
)
def test_socket_forms(spec: str, milter_form: str) -> None:
    config = load_config(env_with(CALLAHEAD_SOCKET=spec))
    assert config.milter_socket == milter_form
    assert config.socket == spec.strip()


def test_routes_parsed() -> None:
    config = load_config(
        env_with(CALLAHEAD_ROUTES="example.com=[mx1.example.com]:2525, .example.org=[10.0.0.1]")
    )
    assert config.routes.lookup("example.com") == (Nexthop("mx1.example.com", 2525),)
    assert config.routes.lookup("a.example.org") == (Nexthop("10.0.0.1", 25),)
    described = dict(config.describe())
    assert described["CALLAHEAD_ROUTES"] == (
        "example.com=[mx1.example.com]:2525 .example.org=[10.0.0.1]:25"
    )


@pytest.mark.parametrize(("text", "value"), [("0", 0.0), ("3600", 3600.0), ("1.5", 1.5)])
def test_cache_ttl(text: str, value: float) -> None:
    assert load_config(env_with(CALLAHEAD_CACHE_TTL=text)).cache_ttl == value


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("1", 1), (" 500 ", 500)])
def test_cache_size(text: str, value: int) -> None:
    config = load_config(env_with(CALLAHEAD_CACHE_SIZE=text))
    assert config.cache_size == value
    assert isinstance(config.cache_size, int)


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("accept", TempfailAction.ACCEPT),
        ("defer", TempfailAction.DEFER),
        ("DEFER", TempfailAction.DEFER),
        (" Accept ", TempfailAction.ACCEPT),
    ],
)
def test_tempfail_action(text: str, action: TempfailAction) -> None:
    assert load_config(env_with(CALLAHEAD_TEMPFAIL_ACTION=text)).tempfail_action is action


@pytest.mark.parametrize(("text", "value"), [("0.5", 0.5), ("1", 1.0), ("300", 300.0)])
def test_probe_timeout(text: str, value: float) -> None:
    assert load_config(env_with(CALLAHEAD_PROBE_TIMEOUT=text)).probe_timeout == value


@pytest.mark.parametrize(
    ("text", "sender"),
    [
        ("", ""),
        ("<>", ""),
        ("probe@example.net", "probe@example.net"),
        ("<probe@example.net>", "probe@example.net"),
    ],
)
def test_probe_sender(text: str, sender: str) -> None:
    assert load_config(env_with(CALLAHEAD_PROBE_SENDER=text)).probe_sender == sender


def test_helo_name() -> None:
    assert load_config(env_with(CALLAHEAD_HELO_NAME="mx2.example.net")).helo_name == (
        "mx2.example.net"
    )
    assert load_config(env_with(CALLAHEAD_HELO_NAME="[192.0.2.1]")).helo_name == "[192.0.2.1]"
    assert load_config(env_with(CALLAHEAD_HELO_NAME="")).helo_name == default_helo_name()
    literal = "[IPv6:2001:db8::1]"
    assert load_config(env_with(CALLAHEAD_HELO_NAME=literal)).helo_name == literal


@pytest.mark.parametrize("literal", ["[a b]", "[]", "[300.1.1.1]", "[IPv6:192.0.2.1]", "[::1]"])
def test_helo_address_literal_must_be_one(literal: str) -> None:
    """aiosmtplib refuses what is not a host name or an address literal: refused here,
    at start, rather than in every probe."""
    with pytest.raises(ConfigError) as caught:
        load_config(env_with(CALLAHEAD_HELO_NAME=literal))
    assert caught.value.variable == "CALLAHEAD_HELO_NAME"


def test_helo_default_is_the_local_postfix_myhostname(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backup's own Postfix name, read with the real postconf (which honours
    MAIL_CONFIG), is what the primary already accepts from this host."""
    (tmp_path / "main.cf").write_text("myhostname = backup-mx.example.net\n")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    assert load_config({}).helo_name == "backup-mx.example.net"


def test_helo_default_without_postfix_is_the_fqdn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path / "missing"))
    monkeypatch.setattr(socket, "getfqdn", lambda: "mx.fallback.example")
    assert load_config({}).helo_name == "mx.fallback.example"


@pytest.mark.parametrize(
    ("helo", "qualified"),
    [("localhost", False), ("vm", False), ("mx.example.net", True), ("[192.0.2.1]", True)],
)
def test_fully_qualified_helo(helo: str, qualified: bool) -> None:
    assert is_fully_qualified(helo) is qualified


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("", None),
        ("   ", None),
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("localhost:9100", ("localhost", 9100)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_metrics_listen(text: str, listen: tuple[str, int] | None) -> None:
    config = load_config(env_with(CALLAHEAD_METRICS_LISTEN=text))
    assert config.metrics_listen == listen
    described = dict(config.describe())["CALLAHEAD_METRICS_LISTEN"]
    assert described == text.strip()


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("DEBUG", logging.DEBUG),
        ("INFO", logging.INFO),
        ("WARNING", logging.WARNING),
        ("ERROR", logging.ERROR),
        ("debug", logging.DEBUG),
    ],
)
def test_log_level(text: str, level: int) -> None:
    assert load_config(env_with(CALLAHEAD_LOG_LEVEL=text)).log_level == level


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("none", TlsMode.NONE),
        ("may", TlsMode.MAY),
        ("encrypt", TlsMode.ENCRYPT),
        (" ENCRYPT ", TlsMode.ENCRYPT),
    ],
)
def test_probe_tls(text: str, mode: TlsMode) -> None:
    assert load_config(env_with(CALLAHEAD_PROBE_TLS=text)).probe_tls is mode


@pytest.mark.parametrize(
    ("variable", "attribute", "text", "value"),
    [
        ("CALLAHEAD_POOL_SIZE", "pool_size", "1", 1),
        ("CALLAHEAD_POOL_SIZE", "pool_size", "100", 100),
        ("CALLAHEAD_POOL_IDLE", "pool_idle", "0.5", 0.5),
        ("CALLAHEAD_POOL_IDLE", "pool_idle", "3600", 3600.0),
        ("CALLAHEAD_MAX_PROBES", "max_probes", "1", 1),
        ("CALLAHEAD_MAX_PROBES", "max_probes", "10000", 10000),
        ("CALLAHEAD_PROBE_WAIT", "probe_wait", "0", 0.0),
        ("CALLAHEAD_PROBE_WAIT", "probe_wait", "0.25", 0.25),
        ("CALLAHEAD_PRIMARY_RATE", "primary_rate", "0", 0.0),
        ("CALLAHEAD_PRIMARY_RATE", "primary_rate", "2.5", 2.5),
        ("CALLAHEAD_SITE_PRIMARY_RATE", "site_primary_rate", "0", 0.0),
        ("CALLAHEAD_SITE_PRIMARY_RATE", "site_primary_rate", "40", 40.0),
        ("CALLAHEAD_CATCHALL_CHECK", "catchall_check", "0", 0.0),
        ("CALLAHEAD_MAILLOG", "maillog", " journal ", "journal"),
        ("CALLAHEAD_MAILLOG", "maillog", "/var/log/mail.log", "/var/log/mail.log"),
        ("CALLAHEAD_MAILLOG", "maillog", "", ""),
        ("CALLAHEAD_CATCHALL_CHECK", "catchall_check", "600", 600.0),
        ("CALLAHEAD_BREAKER_FAILURES", "breaker_failures", "0", 0),
        ("CALLAHEAD_BREAKER_FAILURES", "breaker_failures", " 3 ", 3),
        ("CALLAHEAD_BREAKER_COOLDOWN", "breaker_cooldown", "0.5", 0.5),
        ("CALLAHEAD_BREAKER_COOLDOWN", "breaker_cooldown", "120", 120.0),
        ("CALLAHEAD_CLIENT_UNKNOWN_LIMIT", "client_unknown_limit", "0", 0),
        ("CALLAHEAD_CLIENT_UNKNOWN_LIMIT", "client_unknown_limit", "50", 50),
        ("CALLAHEAD_CLIENT_WINDOW", "client_window", "0", 0.0),
        ("CALLAHEAD_CLIENT_WINDOW", "client_window", "90.5", 90.5),
        ("CALLAHEAD_CLIENT_IPV6_PREFIX", "client_ipv6_prefix", "48", 48),
        ("CALLAHEAD_CLIENT_IPV6_PREFIX", "client_ipv6_prefix", "128", 128),
    ],
)
def test_engine_and_guard_variables(variable: str, attribute: str, text: str, value: float) -> None:
    config = load_config(env_with(**{variable: text}))
    parsed = getattr(config, attribute)
    assert parsed == value
    assert type(parsed) is type(value)
    assert dict(config.describe())[variable] == text.strip()


def test_engine_settings_from_config() -> None:
    config = load_config(
        env_with(
            CALLAHEAD_PROBE_TIMEOUT="4",
            CALLAHEAD_PROBE_SENDER="probe@example.net",
            CALLAHEAD_PROBE_TLS="encrypt",
            CALLAHEAD_POOL_SIZE="7",
            CALLAHEAD_POOL_IDLE="12",
            CALLAHEAD_MAX_PROBES="9",
            CALLAHEAD_PROBE_WAIT="0.5",
            CALLAHEAD_BREAKER_FAILURES="2",
            CALLAHEAD_BREAKER_COOLDOWN="15",
            CALLAHEAD_PRIMARY_RATE="20",
        )
    )
    assert engine_settings(config) == EngineSettings(
        helo_name="backup.example.net",
        sender="probe@example.net",
        timeout=4.0,
        tls=TlsMode.ENCRYPT,
        pool_size=7,
        pool_idle=12.0,
        max_probes=9,
        probe_wait=0.5,
        breaker_failures=2,
        breaker_cooldown=15.0,
        pool_max_age=10.0,
        fallback_sender="",
        primary_rate=20.0,
    )
    assert engine_settings(config).longest_answer == 4.5


# --- every bad value -------------------------------------------------------------------


BAD_VALUES: list[tuple[str, str, str]] = [
    # (variable, value, a fragment of "what is allowed")
    ("CALLAHEAD_CACHE_TTL", "abc", "number of seconds"),
    ("CALLAHEAD_CACHE_TTL", "-1", "number of seconds"),
    ("CALLAHEAD_CACHE_TTL", "nan", "number of seconds"),
    ("CALLAHEAD_CACHE_TTL", "inf", "number of seconds"),
    ("CALLAHEAD_CACHE_TTL", "", "number of seconds"),
    ("CALLAHEAD_CACHE_SIZE", "1.5", "whole number"),
    ("CALLAHEAD_CACHE_SIZE", "-3", "whole number"),
    ("CALLAHEAD_CACHE_SIZE", "many", "whole number"),
    ("CALLAHEAD_ROUTES", "example.com", "domain=nexthop"),
    ("CALLAHEAD_ROUTES", "example.com=[mx]:25 example.org", "domain=nexthop"),
    ("CALLAHEAD_ROUTES", "example.com=2001:db8::1", "IPv6 address goes in brackets"),
    ("CALLAHEAD_ROUTES", "example.com=smtp:bad!host", "host name or address"),
    ("CALLAHEAD_POSTFIX_CONFIG", "etc/postfix", "absolute path"),
    ("CALLAHEAD_POSTFIX_CONFIG", "/nonexistent/postfix", "main.cf does not exist"),
    ("CALLAHEAD_RESOLVER", "dns.example.com", "HOST[:PORT]"),
    ("CALLAHEAD_RESOLVER", "127.0.0.1:0", "HOST[:PORT]"),
    ("CALLAHEAD_RESOLVER", "127.0.0.1:x", "HOST[:PORT]"),
    ("CALLAHEAD_MX_ALLOW_NETWORKS", "0.0.0.0/0", "not a loopback or link-local network"),
    ("CALLAHEAD_MX_ALLOW_NETWORKS", "127.0.53.0/24 10.0.0.0/8", "10.0.0.0/8 is not a loopback"),
    ("CALLAHEAD_MX_ALLOW_NETWORKS", "127.0.0.1/8", "host bits set"),
    ("CALLAHEAD_MX_ALLOW_NETWORKS", "loopback", "networks separated by spaces"),
    ("CALLAHEAD_ROUTES", "example.com=[mx.example.com", "]"),
    ("CALLAHEAD_ROUTES", "example.com=[h]:0", "1 to 65535"),
    ("CALLAHEAD_ROUTES", "example.com=[h]:99999", "1 to 65535"),
    ("CALLAHEAD_ROUTES", "example.com=[h]x", ":port"),
    ("CALLAHEAD_ROUTES", "example.com=[]:25", "host name or address"),
    ("CALLAHEAD_ROUTES", "example.com=[bad!host]", "host name or address"),
    ("CALLAHEAD_ROUTES", "=[mx]:25", "domain"),
    ("CALLAHEAD_TEMPFAIL_ACTION", "reject", "accept or defer"),
    ("CALLAHEAD_TEMPFAIL_ACTION", "", "accept or defer"),
    ("CALLAHEAD_SOCKET", "tcp:1:2", "inet:HOST:PORT"),
    ("CALLAHEAD_SOCKET", "inet:host", "inet:HOST:PORT"),
    ("CALLAHEAD_SOCKET", "unix:relative", "unix:/absolute/path"),
    ("CALLAHEAD_SOCKET", "inet:70000@127.0.0.1", "inet:PORT@HOST"),
    ("CALLAHEAD_SOCKET", "inet:127.0.0.1:0", "inet:HOST:PORT"),
    ("CALLAHEAD_SOCKET", "inet:", "inet:HOST:PORT"),
    ("CALLAHEAD_SOCKET", "/run/milter.sock", "unix:/absolute/path"),
    ("CALLAHEAD_PROBE_TIMEOUT", "0", "> 0 and at most 300"),
    ("CALLAHEAD_PROBE_TIMEOUT", "301", "> 0 and at most 300"),
    ("CALLAHEAD_PROBE_TIMEOUT", "-5", "> 0 and at most 300"),
    ("CALLAHEAD_PROBE_TIMEOUT", "soon", "> 0 and at most 300"),
    ("CALLAHEAD_PROBE_SENDER", "no-at-sign", "email address"),
    ("CALLAHEAD_PROBE_SENDER", "a b@example.net", "email address"),
    ("CALLAHEAD_HELO_NAME", "bad host!", "host name"),
    ("CALLAHEAD_METRICS_LISTEN", "9100", "HOST:PORT"),
    ("CALLAHEAD_METRICS_LISTEN", "127.0.0.1:0", "HOST:PORT"),
    ("CALLAHEAD_METRICS_LISTEN", "127.0.0.1:http", "HOST:PORT"),
    ("CALLAHEAD_METRICS_LISTEN", "::1:9100", "HOST:PORT"),
    ("CALLAHEAD_LOG_LEVEL", "TRACE", "DEBUG, INFO, WARNING, ERROR"),
    ("CALLAHEAD_LOG_LEVEL", "", "DEBUG, INFO, WARNING, ERROR"),
    ("CALLAHEAD_FOO", "1", "unknown variable"),
    ("CALLAHEAD_CACHETTL", "60", "unknown variable"),
    ("CALLAHEAD_PROBE_TLS", "ssl", "none, may or encrypt"),
    ("CALLAHEAD_PROBE_TLS", "", "none, may or encrypt"),
    ("CALLAHEAD_POOL_SIZE", "0", "whole number from 1 to 100"),
    ("CALLAHEAD_POOL_SIZE", "101", "whole number from 1 to 100"),
    ("CALLAHEAD_POOL_SIZE", "x", "whole number from 1 to 100"),
    ("CALLAHEAD_POOL_SIZE", "2.5", "whole number from 1 to 100"),
    ("CALLAHEAD_POOL_IDLE", "0", "seconds > 0"),
    ("CALLAHEAD_POOL_IDLE", "-1", "seconds > 0"),
    ("CALLAHEAD_MAX_PROBES", "0", "whole number from 1 to 10000"),
    ("CALLAHEAD_MAX_PROBES", "10001", "whole number from 1 to 10000"),
    ("CALLAHEAD_PROBE_WAIT", "-1", "seconds >= 0"),
    ("CALLAHEAD_PROBE_WAIT", "nan", "seconds >= 0"),
    ("CALLAHEAD_PRIMARY_RATE", "-1", "number from 0 to 100000"),
    ("CALLAHEAD_PRIMARY_RATE", "inf", "number from 0 to 100000"),
    ("CALLAHEAD_SITE_PRIMARY_RATE", "-1", "number from 0 to 100000"),
    ("CALLAHEAD_SITE_PRIMARY_RATE", "nan", "number from 0 to 100000"),
    ("CALLAHEAD_CATCHALL_CHECK", "-5", "seconds >= 0"),
    ("CALLAHEAD_CATCHALL_CHECK", "604801", "at most 604800"),
    ("CALLAHEAD_CONTROLS", "it@example.com nobody", "'nobody' is not an address"),
    ("CALLAHEAD_MAILLOG", "mail.log", "expected journal, an absolute path"),
    ("CALLAHEAD_MAILLOG", "Journal", "expected journal, an absolute path"),
    ("CALLAHEAD_MAILLOG", "/var/log/mail\0log", "expected journal, an absolute path"),
    ("CALLAHEAD_CONTROLS", "@example.com", "not an address"),
    ("CALLAHEAD_CONTROLS", "Postmaster@example.com", "name a user known to exist"),
    ("CALLAHEAD_CONTROLS", "a\x7fb@example.com", "cannot be sent in an SMTP command"),
    ("CALLAHEAD_BREAKER_FAILURES", "-1", "whole number from 0 to 1000"),
    ("CALLAHEAD_BREAKER_FAILURES", "many", "whole number from 0 to 1000"),
    ("CALLAHEAD_BREAKER_COOLDOWN", "0", "seconds > 0"),
    ("CALLAHEAD_BREAKER_COOLDOWN", "inf", "seconds > 0"),
    ("CALLAHEAD_CLIENT_UNKNOWN_LIMIT", "-1", "whole number from 0"),
    ("CALLAHEAD_CLIENT_UNKNOWN_LIMIT", "lots", "whole number from 0"),
    ("CALLAHEAD_CLIENT_WINDOW", "abc", "seconds >= 0"),
    ("CALLAHEAD_CLIENT_WINDOW", "-5", "seconds >= 0"),
    ("CALLAHEAD_CLIENT_IPV6_PREFIX", "129", "from 16 to 128"),
    ("CALLAHEAD_CLIENT_IPV6_PREFIX", "/64", "from 16 to 128"),
    ("CALLAHEAD_POLICY_CLIENTS", "", "at least one"),
    ("CALLAHEAD_POLICY_CLIENTS", "192.0.2.0/33", "networks separated by"),
    ("CALLAHEAD_POLICY_CLIENTS", "mx.example.com", "networks separated by"),
    ("CALLAHEAD_POLICY_CLIENTS", "10.1.2.3/8", "write 10.0.0.0/8"),
    ("CALLAHEAD_POLICY_MAX_CONNECTIONS", "0", "whole number from 1 to 10000"),
    ("CALLAHEAD_POLICY_MAX_IDLE", "0", "seconds > 0"),
]


@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_VALUES)
def test_bad_value_names_variable_value_and_what_is_allowed(
    variable: str, value: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env_with(**{variable: value}))
    exc = info.value
    message = str(exc)
    assert exc.variable == variable
    assert exc.value == value
    assert message.startswith(variable)
    assert repr(value) in message
    assert allowed in exc.allowed
    assert exc.allowed in message
    assert "\n" not in message


# --- through the CLI -------------------------------------------------------------------


CLI_COMMANDS: list[list[str]] = [["config"], ["probe", "user@example.com"], ["serve"]]


@pytest.mark.parametrize("argv", CLI_COMMANDS, ids=lambda a: a[0])
@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_VALUES[::4])
def test_cli_bad_value_exits_78_with_one_line(
    argv: list[str],
    variable: str,
    value: str,
    allowed: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(argv, env=env_with(**{variable: value}))
    assert status == EX_CONFIG == 78
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert variable in lines[0]
    assert repr(value) in lines[0]
    assert allowed in lines[0]


@pytest.mark.parametrize("argv", CLI_COMMANDS, ids=lambda a: a[0])
def test_cli_value_with_newline_still_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(argv, env=env_with(CALLAHEAD_ROUTES="example.com=[mx]:25\nbroken"))
    assert status == 78
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "CALLAHEAD_ROUTES" in err


def test_cli_config_prints_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["config"],
        env=env_with(CALLAHEAD_TEMPFAIL_ACTION="defer", CALLAHEAD_CACHE_TTL="60"),
    )
    assert status == 0
    out, err = capsys.readouterr()
    assert err == ""
    *lines, source = out.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [v.name for v in VARIABLES]
    assert source == "# routes from: CALLAHEAD_ROUTES example.com=[127.0.0.1]:2525"
    assert "CALLAHEAD_TEMPFAIL_ACTION=defer" in lines
    assert "CALLAHEAD_CACHE_TTL=60" in lines
    assert "CALLAHEAD_HELO_NAME=backup.example.net" in lines
    assert "CALLAHEAD_ROUTES=example.com=[127.0.0.1]:2525" in lines
    assert f"CALLAHEAD_SOCKET={DEFAULT_SOCKET}" in lines


def test_cli_config_prints_the_engine_and_guard_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = {
        "CALLAHEAD_PROBE_TLS": "encrypt",
        "CALLAHEAD_POOL_SIZE": "8",
        "CALLAHEAD_POOL_IDLE": "20",
        "CALLAHEAD_MAX_PROBES": "32",
        "CALLAHEAD_PROBE_WAIT": "1.5",
        "CALLAHEAD_BREAKER_FAILURES": "0",
        "CALLAHEAD_BREAKER_COOLDOWN": "45",
        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "10",
        "CALLAHEAD_CLIENT_WINDOW": "300",
    }
    assert main(["config"], env=env_with(**values)) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, value in values.items():
        assert f"{name}={value}" in lines


def test_cli_serve_without_routes_exits_78(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["serve"], env={"CALLAHEAD_HELO_NAME": "backup.example.net"})
    assert status == 78
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "CALLAHEAD_ROUTES" in lines[0]


def test_cli_probe_without_routes_exits_78(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["probe", "user@example.com"], env={"CALLAHEAD_HELO_NAME": "h.example"})
    assert status == 78
    assert "CALLAHEAD_ROUTES" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["not-an-address", "user@", "a b@example.com"])
def test_cli_probe_usage_error_exits_64(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", address], env=GOOD_ENV) == 64
    assert capsys.readouterr().err.strip()


def test_cli_probe_unrouted_domain_exits_64(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "user@elsewhere.example"], env=GOOD_ENV) == 64
    assert "elsewhere.example" in capsys.readouterr().err


def _help_output(*args: str) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=30, check=False, env={"PATH": "/usr/bin"}
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _assert_lists_every_variable(text: str) -> None:
    lines = text.splitlines()
    for variable in VARIABLES:
        matching = [line for line in lines if line.strip().startswith(variable.name + " ")]
        assert len(matching) == 1, variable.name
        default = variable.shown_default or "empty"
        assert matching[0].rstrip().endswith(f"[{default}]"), matching[0]


def test_python_m_help_lists_every_variable_with_default() -> None:
    _assert_lists_every_variable(_help_output(sys.executable, "-m", "callahead", "--help"))


@pytest.mark.parametrize("command", ["serve", "probe", "config"])
def test_console_script_subcommand_help_lists_every_variable(command: str) -> None:
    script = Path(sys.executable).parent / "callahead"
    assert script.exists(), script
    _assert_lists_every_variable(_help_output(str(script), command, "--help"))


# --- values the parsers let through but the probe cannot use ----------------------------


@pytest.mark.parametrize("sender", ["jörg@example.net", "pro\x01be@example.net"])
def test_unsendable_probe_sender_is_refused(sender: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env_with(CALLAHEAD_PROBE_SENDER=sender))
    assert info.value.variable == "CALLAHEAD_PROBE_SENDER"


def test_cli_probe_with_non_ascii_sender_exits_78(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["probe", "user@example.com"], env=env_with(CALLAHEAD_PROBE_SENDER="jörg@x.net"))
    assert status == 78
    assert "CALLAHEAD_PROBE_SENDER" in capsys.readouterr().err


def test_non_ascii_helo_name_is_refused_or_encoded() -> None:
    try:
        config = load_config(env_with(CALLAHEAD_HELO_NAME="bücher.example"))
    except ConfigError as exc:
        assert exc.variable == "CALLAHEAD_HELO_NAME"
    else:
        assert config.helo_name.isascii(), config.helo_name


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CALLAHEAD_SOCKET", "inet:8895@bücher"), ("CALLAHEAD_METRICS_LISTEN", "bücher:9100")],
)
def test_non_ascii_listen_host_is_refused(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env_with(**{variable: value}))
    assert info.value.variable == variable


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("30", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1x", None), ("", None)],
)
def test_postfix_seconds(text: str, seconds: float | None) -> None:
    assert postfix_seconds(text) == seconds


def test_serve_refuses_answers_slower_than_postfix_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """This host's Postfix (read with the real postconf) gives up after 8 s; a probe may
    take 2 + 10 s: Postfix would stop asking callahead mid-session. Refused, exit 78."""
    (tmp_path / "main.cf").write_text("milter_command_timeout = 8s\n")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    env = {"CALLAHEAD_ROUTES": "example.com=[192.0.2.1]", "CALLAHEAD_HELO_NAME": "b.example"}
    assert main(["serve"], env=env) == EX_CONFIG
    err = capsys.readouterr().err
    assert "milter_command_timeout = 8s" in err
    assert "CALLAHEAD_PROBE_WAIT + CALLAHEAD_PROBE_TIMEOUT = 12s" in err


def test_answer_time_fits_postfix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "main.cf").write_text("milter_command_timeout = 1m\n")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    assert answer_time_problem(load_config(env_with())) is None
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path / "missing"))  # no Postfix: warn later
    assert answer_time_problem(load_config(env_with(CALLAHEAD_PROBE_TIMEOUT="300"))) is None


# --- exposure of the front ends --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "networks"),
    [
        ("127.0.0.0/8 ::1/128", ["127.0.0.0/8", "::1/128"]),
        ("192.0.2.0/24, 2001:db8::/32", ["192.0.2.0/24", "2001:db8::/32"]),
        ("192.0.2.7 ::1", ["192.0.2.7/32", "::1/128"]),
        ("[2001:db8::]/32 127.0.0.1", ["2001:db8::/32", "127.0.0.1/32"]),  # Postfix's form
    ],
)
def test_policy_clients(text: str, networks: list[str]) -> None:
    config = load_config(env_with(CALLAHEAD_POLICY_CLIENTS=text))
    assert [str(n) for n in config.policy_clients] == networks


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.1", False),
        ("mx.example.com", False),
    ],
)
def test_loopback_host(host: str, loopback: bool) -> None:
    assert loopback_host(host) is loopback


@pytest.mark.parametrize(
    "listen", ["inet:0.0.0.0:8896", "inet:[::]:8896", "inet:192.0.2.1:8896", "inet:mx.example:1"]
)
@pytest.mark.parametrize("clients", [None, "127.0.0.1", "::1/128 127.0.0.0/8 ::ffff:127.0.0.0/104"])
def test_a_policy_service_off_loopback_needs_its_clients_listed(
    listen: str, clients: str | None
) -> None:
    env = env_with(CALLAHEAD_POLICY_LISTEN=listen)
    if clients is not None:
        env["CALLAHEAD_POLICY_CLIENTS"] = clients
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert info.value.variable == "CALLAHEAD_POLICY_CLIENTS"
    assert "listens off loopback" in str(info.value)
    assert "learn which addresses exist" in str(info.value)


def test_a_policy_service_off_loopback_with_its_clients_listed_is_accepted() -> None:
    config = load_config(
        env_with(
            CALLAHEAD_POLICY_LISTEN="inet:0.0.0.0:8896",
            CALLAHEAD_POLICY_CLIENTS="127.0.0.0/8 ::1/128 192.0.2.0/24",
        )
    )
    assert str(config.policy_listen) == "inet:0.0.0.0:8896"
    assert len(config.policy_clients) == 3


@pytest.mark.parametrize(
    "listen", ["inet:127.0.0.1:8896", "inet:[::1]:8896", "inet:localhost:8896", "unix:/run/p.s"]
)
def test_a_policy_service_on_loopback_or_a_unix_socket_needs_no_list(listen: str) -> None:
    assert load_config(env_with(CALLAHEAD_POLICY_LISTEN=listen)).policy_listen is not None


def test_cli_serve_with_an_open_policy_service_exits_78(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = env_with(CALLAHEAD_POLICY_LISTEN="inet:0.0.0.0:8896", CALLAHEAD_SOCKET="")
    assert main(["serve"], env=env) == EX_CONFIG
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "CALLAHEAD_POLICY_CLIENTS" in err


@pytest.mark.parametrize(
    ("socket_spec", "where"),
    [
        ("inet:127.0.0.1:8895", "loopback"),
        ("inet:8895@localhost", "loopback"),
        ("inet6:8895@::1", "loopback"),
        ("unix:/run/callahead/milter.sock", ""),
        ("", ""),
        ("inet:0.0.0.0:8895", "off"),
        ("inet6:8895@::", "off"),
        ("inet:8895@192.0.2.1", "off"),
    ],
)
def test_a_milter_on_a_tcp_port_gets_a_warning(socket_spec: str, where: str) -> None:
    """Any TCP port: on loopback every local user reaches it (and, unprivileged, can
    bind it first); off loopback other hosts too."""
    warnings = exposure_warnings(load_config(env_with(CALLAHEAD_SOCKET=socket_spec)))
    if not where:
        assert warnings == []
        return
    (warning,) = warnings
    assert warning.startswith("CALLAHEAD_SOCKET=inet:")
    assert "every local user can reach" in warning
    assert "dictionary guard" in warning
    assert "listen there first and get every message Postfix passes to its milter" in warning
    assert "CALLAHEAD_SOCKET=unix:/var/spool/postfix/callahead/milter.sock" in warning
    assert "smtpd_milters = unix:callahead/milter.sock" in warning
    assert ("listens off loopback" in warning) is (where == "off")
    assert ("firewall the port" in warning) is (where == "off")


@pytest.mark.parametrize(
    ("listen", "where"),
    [
        ("inet:127.0.0.1:8896", "loopback"),
        ("inet:[::1]:8896", "loopback"),
        ("inet:0.0.0.0:8896", "off"),
        ("unix:/var/spool/postfix/callahead/policy.sock", ""),
        ("", ""),
    ],
)
def test_a_policy_service_on_a_tcp_port_gets_a_warning(listen: str, where: str) -> None:
    env = env_with(
        CALLAHEAD_SOCKET="",
        CALLAHEAD_POLICY_LISTEN=listen,
        CALLAHEAD_POLICY_CLIENTS="127.0.0.0/8 192.0.2.0/24",
    )
    warnings = exposure_warnings(load_config(env))
    if not where:
        assert warnings == []
        return
    (warning,) = warnings
    assert warning.startswith(f"CALLAHEAD_POLICY_LISTEN={listen}")
    assert "every local user can reach" in warning
    assert "answer Postfix's policy requests (REDIRECT, BCC" in warning
    assert "check_policy_service unix:callahead/policy.sock" in warning
    assert ("every host that CALLAHEAD_POLICY_CLIENTS admits" in warning) is (where == "off")


def test_a_privileged_port_cannot_be_taken_first_so_the_warning_does_not_say_so() -> None:
    (warning,) = exposure_warnings(load_config(env_with(CALLAHEAD_SOCKET="inet:127.0.0.1:895")))
    assert "every local user can reach" in warning
    assert "listen there first" not in warning


def test_serve_says_at_start_that_every_local_user_can_reach_its_tcp_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start line: both TCP front ends named in warnings before serve listens."""
    import callahead.process.server as server

    (tmp_path / "main.cf").write_text("milter_command_timeout = 1m\n")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    monkeypatch.setattr(server, "serve", lambda config: 0)
    env = env_with(
        CALLAHEAD_SOCKET="inet:127.0.0.1:8895", CALLAHEAD_POLICY_LISTEN="inet:127.0.0.1:8896"
    )
    assert main(["serve"], env=env) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, warnings
    assert "CALLAHEAD_SOCKET=inet:127.0.0.1:8895 is a TCP port" in warnings[0]
    assert "CALLAHEAD_POLICY_LISTEN=inet:127.0.0.1:8896 is a TCP port" in warnings[1]
    assert all("every local user can reach" in line for line in warnings)


def _with_postfix_maps(config: Config) -> Config:
    """``config`` as with CALLAHEAD_POSTFIX_CONFIG (routes from a Postfix's maps)."""
    settings = PostfixSettings(
        config_dir="/etc/postfix",
        relay_domains=("ldap:/etc/postfix/relay.cf",),
        transport_maps=("mysql:/etc/postfix/transport.cf",),
        relay_parent_matches=True,
        transport_parent_matches=False,
        default_hops=(),
        relay_transport="relay",
        myhostname="backup.example.net",
        interfaces=("all",),
        smtp_services=frozenset({"smtp", "relay"}),
    )
    return dataclasses.replace(config, postfix=settings)


def test_the_answer_time_counts_the_route_lookups_in_the_postfix_maps() -> None:
    """A slow ldap or mysql map can hold a recipient LOOKUP_WAIT (11 s) before its probe
    even starts: that is part of the answer time Postfix waits for."""
    config = load_config(env_with())
    assert answer_time(config) == 2 + 10 + HANDOFF_MARGIN
    assert answer_time(_with_postfix_maps(config)) == LOOKUP_WAIT + 2 + 10 + HANDOFF_MARGIN == 24


def test_serve_refuses_what_the_route_lookups_push_past_postfix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "main.cf").write_text("milter_command_timeout = 20s\n")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    config = load_config(env_with())
    assert answer_time_problem(config) is None  # 13 s < 20 s
    problem = answer_time_problem(_with_postfix_maps(config))
    assert problem is not None
    assert "the 11s route lookups in CALLAHEAD_POSTFIX_CONFIG's maps" in problem
    assert "an answer can take 24s" in problem
    assert "milter_command_timeout = 20s" in problem


# --- the Redis password is never shown ------------------------------------------------

PASSWORD = "S3cretPW"

SHOWN_REDIS_URLS = [
    ("redis://:S3cretPW@10.0.0.7:6379/2", "redis://:***@10.0.0.7:6379/2"),
    ("redis://10.0.0.7:6379/2?password=S3cretPW", "redis://10.0.0.7:6379/2?password=***"),
    (
        "rediss://h.example/0?username=cache&password=S3cretPW&socket_timeout=1",
        "rediss://h.example/0?username=cache&password=***&socket_timeout=1",
    ),
    ("unix:///run/redis.sock?db=1&password=S3cretPW", "unix:///run/redis.sock?db=1&password=***"),
    ("unix://cache:S3cretPW@/run/redis.sock", "unix://cache:***@/run/redis.sock"),
]


@pytest.mark.parametrize(("url", "shown"), SHOWN_REDIS_URLS)
def test_callahead_config_never_shows_the_redis_password(
    url: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config"], env=env_with(CALLAHEAD_REDIS_URL=url)) == 0
    out = capsys.readouterr().out
    assert f"CALLAHEAD_REDIS_URL={shown}\n" in out
    assert PASSWORD not in out


BAD_REDIS_URLS = [
    "redis://:S3cretPW@10.0.0.7:99999/0",  # port out of range
    "redis://:S3cretPW@10.0.0.7:http/0",  # port not a number
    "redis://10.0.0.7:0/0?password=S3cretPW",
    "http://cache:S3cretPW@10.0.0.7",  # not a Redis scheme
    "redis://:S3cretPW@/0",  # no host
    "unix://:S3cretPW@relative.sock",
    "unix:relative.sock?password=S3cretPW",
    ":S3cretPW@10.0.0.7:6379",  # the scheme forgotten
    "cache:S3cretPW@10.0.0.7:6379",
    "redis://:S3cretPW@[::1/0",  # unparsable
    "redis://10.0.0.7/0?password=S3cretPW&db=abc",  # refused by redis-py
    "redis://:S3cretPW@10.0.0.7/0?socket_timeout=soon",
]


@pytest.mark.parametrize("url", BAD_REDIS_URLS)
def test_no_error_about_the_redis_url_shows_its_password(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env_with(CALLAHEAD_REDIS_URL=url))
    exc = info.value
    assert exc.variable == "CALLAHEAD_REDIS_URL"
    assert str(exc).startswith("CALLAHEAD_REDIS_URL=")
    for text in (str(exc), exc.value, repr(exc.args)):
        assert PASSWORD not in text
    assert exc.__context__ is None and exc.__cause__ is None  # nor in a traceback
    for command in CLI_COMMANDS:
        assert main(command, env=env_with(CALLAHEAD_REDIS_URL=url)) == EX_CONFIG
        err = capsys.readouterr().err
        assert "CALLAHEAD_REDIS_URL=" in err
        assert PASSWORD not in err


def test_an_unknown_variable_named_like_a_password_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env_with(CALLAHEAD_REDIS_PASSWD=PASSWORD))
    assert "CALLAHEAD_REDIS_PASSWD='***' is invalid: unknown variable" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_mx_allow_networks_take_loopback_and_link_local_networks() -> None:
    config = load_config({"CALLAHEAD_MX_ALLOW_NETWORKS": "127.0.53.0/24, [fe80::]/64 ::1"})
    assert [str(n) for n in config.mx_allow_networks] == ["127.0.53.0/24", "fe80::/64", "::1/128"]
    described = dict(config.describe())
    assert described["CALLAHEAD_MX_ALLOW_NETWORKS"] == "127.0.53.0/24 fe80::/64 ::1/128"
    assert load_config({}).mx_allow_networks == ()
