"""One real stack for the integration tests, started once per session.

* a real Postfix backup MX (Debian's package, a throwaway instance) configured from
  ``deploy/postfix-main.cf``, with two smtpd listeners: one attached to callahead with
  the default cache, one to a second callahead with ``CALLAHEAD_CACHE_TTL=1``;
* a primary that knows its users and stores what it receives (example.test);
* a primary that refuses the null sender at MAIL FROM (nullsender.test);
* a black-holed primary that accepts TCP and never greets (hang.test: callahead
  probes it, while Postfix delivers hang.test mail to the first primary, so nothing
  accepted is lost).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess, Samples
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, backup_mx_main_cf
from tests.harness.primary import Primary, SilentServer

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "deploy" / "postfix-main.cf"
PROBE_TIMEOUT = 2.0
SENDER = "sender@remote.test"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@dataclass
class Stack:
    workdir: Path
    primary: Primary
    null_primary: Primary
    silent: SilentServer
    callahead: CallaheadProcess
    callahead_ttl1: CallaheadProcess
    backup: PostfixInstance
    port: int
    """smtpd listener with callahead (default cache)."""
    port_ttl1: int
    """smtpd listener with the callahead whose cache TTL is 1 s."""

    def new_user(self, domain: str = "example.test", primary: Primary | None = None) -> str:
        """A fresh address that the primary knows (fresh: never cached by callahead)."""
        addr = self.new_address(domain)
        (primary or self.primary).add_user(addr)
        return addr

    @staticmethod
    def new_address(domain: str = "example.test") -> str:
        return f"u{uuid.uuid4().hex[:12]}@{domain}"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    with make_workdir() as workdir:
        primary = Primary([], hostname="primary.test")
        null_primary = Primary([], hostname="nullsender-primary.test", reject_null_sender=True)
        silent = SilentServer()
        started: list[Primary | SilentServer | CallaheadProcess | PostfixInstance] = []
        try:
            for server in (primary, null_primary, silent):
                server.start()
                started.append(server)
            routes = (
                f"example.test=[127.0.0.1]:{primary.port} "
                f"hang.test=[127.0.0.1]:{silent.port} "
                f"nullsender.test=[127.0.0.1]:{null_primary.port}"
            )
            common = {"CALLAHEAD_ROUTES": routes, "CALLAHEAD_PROBE_TIMEOUT": str(PROBE_TIMEOUT)}
            callahead = CallaheadProcess(workdir, common, name="callahead")
            callahead_ttl1 = CallaheadProcess(
                workdir, {**common, "CALLAHEAD_CACHE_TTL": "1"}, name="callahead-ttl1"
            )
            for process in (callahead, callahead_ttl1):
                process.start()
                started.append(process)
            port, port_ttl1 = free_port(), free_port()
            main_cf = backup_mx_main_cf(
                SNIPPET,
                workdir=workdir / "backup",
                relay_domains=["example.test", "hang.test", "nullsender.test", "unrouted.test"],
                transports={
                    "unrouted.test": f"[127.0.0.1]:{primary.port}",
                    "example.test": f"[127.0.0.1]:{primary.port}",
                    "hang.test": f"[127.0.0.1]:{primary.port}",
                    "nullsender.test": f"[127.0.0.1]:{null_primary.port}",
                },
                milter=callahead.socket,
            )
            backup = PostfixInstance(
                workdir / "backup",
                main_cf,
                [
                    Listener(port),
                    Listener(port_ttl1, {"smtpd_milters": callahead_ttl1.socket}),
                ],
            )
            backup.start()
            started.append(backup)
            yield Stack(
                workdir,
                primary,
                null_primary,
                silent,
                callahead,
                callahead_ttl1,
                backup,
                port,
                port_ttl1,
            )
        finally:
            for thing in reversed(started):
                thing.stop()


class MetricsDelta:
    """How far each counter of one callahead moved since this object was made."""

    def __init__(self, process: CallaheadProcess) -> None:
        self._process = process
        self._before: Samples = process.samples()

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        after = self._process.samples()
        return after.get(key, 0.0) - self._before.get(key, 0.0)


@pytest.fixture
def delta(stack: Stack) -> MetricsDelta:
    return MetricsDelta(stack.callahead)
