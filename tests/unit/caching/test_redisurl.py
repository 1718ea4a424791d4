"""The Redis URL: TLS checks the server's name by default (a real redis-server with
TLS, certificates from a test CA), a Redis off loopback without a password is not used
(the shared cache off, said by config, serve and doctor), and no form of password is
ever shown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from callahead.base.logfmt import redact_url
from callahead.caching.redisstore import RedisStore, SharedUnavailable, tls_options
from callahead.frontends.metrics import Metrics
from callahead.probing.loop import ProbeLoop
from callahead.process.assembly import Parts, build_policy, local_ttl, shared_delay
from callahead.process.cli import main
from callahead.process.config import Config, load_config
from callahead.process.doctor.checkup import redis_findings
from tests.harness.fixtures import make_workdir
from tests.harness.redis import RedisServer

ENV = {
    "CALLAHEAD_ROUTES": "example.com=[127.0.0.1]:2525",
    "CALLAHEAD_HELO_NAME": "backup.example.net",
}


@pytest.fixture(scope="module")
def tls_servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two TLS-only redis-servers on loopback: one with a certificate for
    ``localhost`` (the name the URL uses), one for another name."""
    with (
        make_workdir() as workdir,
        RedisServer(workdir, name="right", tls_names=("localhost",)) as right,
        RedisServer(workdir, name="wrong", tls_names=("redis.other.test",)) as wrong,
    ):
        yield right, wrong


async def ping(url: str) -> bool:
    store = RedisStore(url, timeout=2.0)
    try:
        return bool(await store.call("ping", lambda: store.client.ping()))
    except SharedUnavailable:
        return False
    finally:
        await store.aclose()


def test_tls_checks_the_host_name_by_default(
    tls_servers: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    right, wrong = tls_servers
    assert wrong.url.startswith("rediss://localhost:")
    assert asyncio.run(ping(right.url))
    # A certificate from a trusted CA, but for another name: refused (redis-py 4.3, as
    # Debian 12 has it, would take it unless told to check the name).
    assert not asyncio.run(ping(wrong.url))
    # The URL may say otherwise, and then it is said in the log.
    with caplog.at_level(logging.WARNING, logger="callahead.sharedcache"):
        assert asyncio.run(ping(wrong.url + "&ssl_check_hostname=false"))
        assert asyncio.run(ping(wrong.url + "&ssl_cert_reqs=none"))
    lines = [r.getMessage() for r in caplog.records if "can pose as Redis" in r.getMessage()]
    assert len(lines) == 2
    assert "not checked for its host name" in lines[0]
    assert "ssl_cert_reqs=none" in lines[1]


def test_tls_options_only_for_rediss() -> None:
    assert tls_options("redis://127.0.0.1/0") == {}
    assert tls_options("unix:///run/redis.sock") == {}
    assert tls_options("rediss://h/0") == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert tls_options("rediss://h/0?ssl_cert_reqs=none")["ssl_check_hostname"] is False


# -- who may reach Redis ------------------------------------------------------------------

OFF = "# shared cache: off, CALLAHEAD_REDIS_URL is not used: "


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.7:6379/0",
        "rediss://redis.example.com:6380/0",
        "redis://redis.example.com/0?username=cache",
        "redis://[2001:db8::7]:6379/0",
    ],
)
def test_a_redis_off_loopback_without_a_password_is_not_used(
    url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Not a configuration error (exit 78): callahead 0.1 ran with such a URL, and an
    upgrade must not stop it. The shared cache is off, and config, serve and doctor
    say why and what to write instead."""
    config = load_config({**ENV, "CALLAHEAD_REDIS_URL": url})
    assert config.redis_url == url
    assert "off this host's loopback and the URL gives no password" in config.redis_refused
    assert "redis://:PASSWORD@HOST" in config.redis_refused
    assert config.shared_redis_url == ""
    assert main(["config"], env={**ENV, "CALLAHEAD_REDIS_URL": url}) == 0
    out = capsys.readouterr().out
    assert f"CALLAHEAD_REDIS_URL={url}\n" in out
    assert OFF + "Redis at " in out

    parts = built(config, caplog)
    assert parts.shared is None
    assert local_ttl(config) == config.cache_ttl and shared_delay(config) == 0
    [line] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert line.getMessage().startswith(f"CALLAHEAD_REDIS_URL={url} is not used: Redis at ")
    assert "the shared cache is off" in line.getMessage()

    [finding] = redis_findings(config)
    assert finding.ok is False and finding.item == "redis"
    assert "the shared cache is off" in finding.what
    assert "redis://:PASSWORD@HOST" in finding.fix


def built(config: Config, caplog: pytest.LogCaptureFixture) -> Parts:
    """The decision core serve builds from ``config`` (its start-up lines in caplog)."""
    loop = ProbeLoop()
    with caplog.at_level(logging.INFO, logger="callahead"):
        return build_policy(config, loop, Metrics())


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://127.8.9.10/0",
        "redis://localhost/0",
        "redis://[::1]:6379/0",
        "unix:///run/redis/redis-server.sock",
        "redis://:secret@10.0.0.7:6379/0",
        "redis://cache:secret@10.0.0.7:6379/0",
        "redis://cache@10.0.0.7:6379/0?password=secret",
        "rediss://redis.example.com/0?ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/k.pem",
    ],
)
def test_a_local_redis_or_a_password_is_enough(url: str, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config({**ENV, "CALLAHEAD_REDIS_URL": url})
    assert config.redis_url == config.shared_redis_url == url
    assert config.redis_refused == ""
    assert built(config, caplog).shared is not None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    [finding] = redis_findings(config)
    assert finding.ok is True


def test_without_a_redis_url_there_is_nothing_to_refuse() -> None:
    config = load_config(ENV)
    assert (config.redis_refused, config.shared_redis_url) == ("", "")
    assert redis_findings(config) == []


def test_a_password_written_as_a_user_name_is_not_used_and_never_shown(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    url = "redis://S3cretPW@10.0.0.7:6379/0"
    config = load_config({**ENV, "CALLAHEAD_REDIS_URL": url})
    assert config.redis_refused.startswith("a user name without a password")
    assert "redis://:PASSWORD@HOST" in config.redis_refused
    assert "S3cretPW" not in config.redis_refused
    assert main(["config"], env={**ENV, "CALLAHEAD_REDIS_URL": url}) == 0
    out = capsys.readouterr().out
    assert "CALLAHEAD_REDIS_URL=redis://***@10.0.0.7:6379/0\n" in out
    assert OFF + "a user name without a password" in out
    assert "S3cretPW" not in out
    assert built(config, caplog).shared is None
    assert "CALLAHEAD_REDIS_URL=redis://***@10.0.0.7:6379/0 is not used" in caplog.text
    assert "S3cretPW" not in caplog.text
    [finding] = redis_findings(config)
    assert finding.ok is False and "S3cretPW" not in finding.what + finding.fix
    # On loopback too: redis-py would send the word as a user name, and Redis refuse it.
    local = load_config({**ENV, "CALLAHEAD_REDIS_URL": "redis://S3cretPW@127.0.0.1/0"})
    assert local.redis_refused.startswith("a user name without a password")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://S3cretPW@h.example/0", "redis://***@h.example/0"),
        ("redis://:S3cretPW@h.example/0", "redis://:***@h.example/0"),
        ("redis://cache:S3cretPW@h.example/0", "redis://cache:***@h.example/0"),
        ("redis://h.example/0?password=S3cretPW", "redis://h.example/0?password=***"),
        ("rediss://S3cretPW@h.example:6380", "rediss://***@h.example:6380"),
        ("unix://S3cretPW@/run/redis.sock", "unix://***@/run/redis.sock"),
        ("redis://h.example:6379/0", "redis://h.example:6379/0"),
    ],
)
def test_every_form_of_password_is_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
