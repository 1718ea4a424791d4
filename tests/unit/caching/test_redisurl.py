"""The Redis URL: TLS checks the server's name by default (a real redis-server with
TLS, certificates from a test CA), a Redis off loopback needs a password, and no form
of password is ever shown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from callahead.base.logfmt import redact_url
from callahead.caching.redisstore import RedisStore, SharedUnavailable, tls_options
from callahead.process.cli import main
from callahead.process.config import EX_CONFIG, ConfigError, load_config
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


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.7:6379/0",
        "rediss://redis.example.com:6380/0",
        "redis://redis.example.com/0?username=cache",
        "redis://[2001:db8::7]:6379/0",
    ],
)
def test_a_redis_off_loopback_needs_a_password(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="off this host's loopback and the URL gives no password"):
        load_config({**ENV, "CALLAHEAD_REDIS_URL": url})
    assert main(["config"], env={**ENV, "CALLAHEAD_REDIS_URL": url}) == EX_CONFIG
    assert "CALLAHEAD_REDIS_URL=" in capsys.readouterr().err


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
def test_a_local_redis_or_a_password_is_enough(url: str) -> None:
    assert load_config({**ENV, "CALLAHEAD_REDIS_URL": url}).redis_url == url


def test_a_password_written_as_a_user_name_is_refused_and_never_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "redis://S3cretPW@10.0.0.7:6379/0"
    with pytest.raises(ConfigError) as info:
        load_config({**ENV, "CALLAHEAD_REDIS_URL": url})
    assert "redis://:PASSWORD@HOST" in str(info.value)
    assert "S3cretPW" not in str(info.value)
    assert main(["config"], env={**ENV, "CALLAHEAD_REDIS_URL": url}) == EX_CONFIG
    err = capsys.readouterr().err
    assert "redis://***@10.0.0.7:6379/0" in err and "S3cretPW" not in err


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
