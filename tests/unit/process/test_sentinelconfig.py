"""Redis Sentinel in the configuration: the sentinels' addresses (IPv6 in brackets, the
default port), the service, how they combine with CALLAHEAD_REDIS_URL, sentinels off
loopback without both passwords refused (the shared cache off, said by config and
doctor, not exit 78), and neither password ever shown."""

from __future__ import annotations

import pytest

from callahead.caching.redisclient import SentinelTarget
from callahead.process.cli import main
from callahead.process.config import EX_CONFIG, ConfigError, load_config
from callahead.process.doctor.checkup import redis_findings

ENV = {"CALLAHEAD_ROUTES": "example.com=[127.0.0.1]:2525", "CALLAHEAD_HELO_NAME": "b.example"}
DATA_PW = "Data-Pw-9f3"
SENTINEL_PW = "Sentinel-Pw-4c1"
REMOTE = {
    "CALLAHEAD_REDIS_SENTINELS": "10.0.0.1:26379, [2001:db8::7]:26380,sentinel3.example",
    "CALLAHEAD_REDIS_SERVICE": "mymaster",
    "CALLAHEAD_REDIS_PASSWORD": DATA_PW,
    "CALLAHEAD_REDIS_SENTINEL_PASSWORD": SENTINEL_PW,
}


def test_sentinels_service_and_passwords_make_the_target() -> None:
    config = load_config({**ENV, **REMOTE})
    assert config.redis_sentinels == (
        ("10.0.0.1", 26379),
        ("2001:db8::7", 26380),
        ("sentinel3.example", 26379),
    )
    assert config.redis_refused == ""
    assert config.shared_redis == SentinelTarget(
        config.redis_sentinels, "mymaster", password=DATA_PW, sentinel_password=SENTINEL_PW
    )
    described = dict(config.describe())
    assert described["CALLAHEAD_REDIS_SENTINELS"] == (
        "10.0.0.1:26379,[2001:db8::7]:26380,sentinel3.example:26379"
    )
    assert described["CALLAHEAD_REDIS_PASSWORD"] == "***"
    assert described["CALLAHEAD_REDIS_SENTINEL_PASSWORD"] == "***"
    assert load_config(
        {
            **ENV,
            "CALLAHEAD_REDIS_SENTINELS": described["CALLAHEAD_REDIS_SENTINELS"],
            "CALLAHEAD_REDIS_SERVICE": "m",
        }
    ).redis_sentinels == (config.redis_sentinels)


@pytest.mark.parametrize(
    ("changes", "variable", "says"),
    [
        ({"CALLAHEAD_REDIS_SENTINELS": "10.0.0.1:0"}, "CALLAHEAD_REDIS_SENTINELS", "1 to 65535"),
        (
            {"CALLAHEAD_REDIS_SENTINELS": "2001:db8::1:26379"},
            "CALLAHEAD_REDIS_SENTINELS",
            "brackets",
        ),
        ({"CALLAHEAD_REDIS_SENTINELS": "[nope]:1"}, "CALLAHEAD_REDIS_SENTINELS", "brackets"),
        ({"CALLAHEAD_REDIS_SENTINELS": "a/b:1"}, "CALLAHEAD_REDIS_SENTINELS", "HOST:PORT"),
        ({"CALLAHEAD_REDIS_SERVICE": ""}, "CALLAHEAD_REDIS_SERVICE", "required with"),
        ({"CALLAHEAD_REDIS_SERVICE": "my master"}, "CALLAHEAD_REDIS_SERVICE", "no spaces"),
        (
            {"CALLAHEAD_REDIS_URL": "redis://:pw@10.0.0.9/0"},
            "CALLAHEAD_REDIS_SENTINELS",
            "one or the other",
        ),
        ({"CALLAHEAD_REDIS_SENTINELS": ""}, "CALLAHEAD_REDIS_SERVICE", "only with"),
    ],
)
def test_bad_or_clashing_values_are_configuration_errors(
    changes: dict[str, str], variable: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**ENV, **REMOTE, **changes}
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert info.value.variable == variable
    assert says in str(info.value)
    assert main(["config"], env=env) == EX_CONFIG
    err = capsys.readouterr().err
    for text in (str(info.value), err):
        assert DATA_PW not in text and SENTINEL_PW not in text


@pytest.mark.parametrize("name", ["CALLAHEAD_REDIS_PASSWORD", "CALLAHEAD_REDIS_SENTINEL_PASSWORD"])
def test_a_password_without_sentinels_is_refused_unshown(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({**ENV, name: DATA_PW})
    assert f"{name}='***' is invalid: only with CALLAHEAD_REDIS_SENTINELS" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config({**ENV, **REMOTE, name: "two\nlines" + DATA_PW})
    assert DATA_PW not in str(info.value) and "line break" in str(info.value)


@pytest.mark.parametrize(
    "missing", ["CALLAHEAD_REDIS_PASSWORD", "CALLAHEAD_REDIS_SENTINEL_PASSWORD"]
)
def test_remote_sentinels_without_both_passwords_turn_the_shared_cache_off(
    missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**ENV, **REMOTE}
    del env[missing]
    config = load_config(env)  # not exit 78: each backup goes on alone
    assert f"sentinel 10.0.0.1 is off this host's loopback and {missing} is empty" in (
        config.redis_refused
    )
    assert config.shared_redis == ""
    assert main(["config"], env=env) == 0
    out = capsys.readouterr().out
    assert "# shared cache: off, CALLAHEAD_REDIS_SENTINELS is not used: sentinel 10.0.0.1" in out
    [finding] = redis_findings(config)
    assert finding.ok is False and "is not used, the shared cache is off" in finding.what
    for text in (out, finding.what, finding.fix):
        assert DATA_PW not in text and SENTINEL_PW not in text


def test_loopback_sentinels_need_no_password() -> None:
    config = load_config(
        {
            **ENV,
            "CALLAHEAD_REDIS_SENTINELS": "127.0.0.1:26379,[::1]:26380,localhost",
            "CALLAHEAD_REDIS_SERVICE": "m",
        }
    )
    assert config.redis_refused == ""
    assert isinstance(config.shared_redis, SentinelTarget)
