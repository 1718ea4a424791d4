"""A site of two backup MXes for the tests that share a Redis (test_shared_cache.py,
test_sentinel_failover.py, test_site_budget.py): each backup a real Postfix built from
deploy/postfix-main.cf with its own ``callahead serve`` as its milter, one primary (the
harness's stand-in, which records every probe), and the Redis the test brings (one
redis-server, or a master, a replica and sentinels)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import Transaction, make_message, send
from tests.harness.ports import free_port
from tests.harness.postfix import SNIPPET, Listener, PostfixInstance, backup_mx_main_cf
from tests.harness.primary import Primary
from tests.integration.conftest import RAISED_LIMITS, SENDER, hop

DOMAIN = "shared.test"
"""The relay domain of the shared-cache and Sentinel sites."""

RedisT = TypeVar("RedisT")


@dataclass
class Backup:
    name: str
    callahead: CallaheadProcess
    postfix: PostfixInstance
    port: int

    def rcpt(self, *rcpts: str, body: bool = False) -> Transaction:
        message = make_message(SENDER, list(rcpts))[1] if body else None
        return send(self.port, SENDER, list(rcpts), message)

    def counter(self, name: str, **labels: str) -> float:
        return self.callahead.samples().get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class Site(Generic[RedisT]):
    """Two backups (``a``, ``b``) of ``DOMAIN`` sharing ``redis``; ``tag`` starts the
    local part of every address the test makes up."""

    redis: RedisT
    primary: Primary
    a: Backup
    b: Backup
    tag: str = "u"

    def new_user(self) -> str:
        address = self.new_address()
        self.primary.add_user(address)
        return address

    def new_address(self) -> str:
        return f"{self.tag}{uuid.uuid4().hex[:12]}@{DOMAIN}"


def site_env(primary: Primary, probe_timeout: float) -> dict[str, str]:
    """The settings every backup of such a site runs with, before its Redis's."""
    return {
        "CALLAHEAD_ROUTES": f"{DOMAIN}={hop(primary.port)}",
        "CALLAHEAD_PROBE_TIMEOUT": f"{probe_timeout:g}",
        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
        # A catch-all check is a background probe whose rejection asks a verified user
        # as its control: the primary's counts here are of the tests' own.
        "CALLAHEAD_CATCHALL_CHECK": "0",
    }


def shared_hits(backup: Backup) -> float:
    return backup.counter(
        "callahead_rcpt_decisions_total", decision="accept", reason="shared_cache_hit"
    )


def backup_mx(
    workdir: Path, name: str, callahead: CallaheadProcess, primary_port: int, domain: str = DOMAIN
) -> Backup:
    """A real Postfix backup MX built from deploy/postfix-main.cf, as conftest.py builds
    the stack's, with ``callahead`` as its milter; started."""
    directory = workdir / f"backup-{name}"
    directory.mkdir(mode=0o755)
    port = free_port()
    postfix = PostfixInstance(
        directory,
        backup_mx_main_cf(
            SNIPPET,
            workdir=directory,
            relay_domains=[domain],
            transports={domain: hop(primary_port)},
            milter=callahead.socket,
            hostname=f"backup-{name}.test",
        ),
        [Listener(port, RAISED_LIMITS)],
    )
    postfix.start()
    return Backup(name, callahead, postfix, port)


@contextlib.contextmanager
def two_backups(
    workdir: Path, env: dict[str, str], primary_port: int, domain: str = DOMAIN
) -> Iterator[tuple[Backup, Backup]]:
    """Backups a and b of ``domain``, each a real Postfix with its own ``callahead
    serve`` (``env``) as its milter, started; all stopped afterwards, even on failure."""
    started: list[CallaheadProcess] = []
    instances: list[PostfixInstance] = []
    try:
        backups: list[Backup] = []
        for name in ("a", "b"):
            callahead = CallaheadProcess(workdir, env, name=f"callahead-{name}")
            started.append(callahead)
            callahead.start()
            backup = backup_mx(workdir, name, callahead, primary_port, domain)
            instances.append(backup.postfix)
            backups.append(backup)
        yield backups[0], backups[1]
    finally:
        for instance in instances:
            instance.stop()
        # libmilter takes up to ~5 s to wind down: stop both side by side.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda process: process.stop(), started))
