"""A real redis-server for the shared-cache tests: one per module, emptied before each
test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.fixtures import make_workdir
from tests.harness.redis import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with make_workdir() as workdir, RedisServer(workdir) as server:
        yield server


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    assert redis_server.command("FLUSHALL") == "+OK"
    return redis_server
