"""The rig of the tests that read the backup's mail log (test_backscatter_meter.py,
test_learning_cache.py): a real Postfix backup MX writing its own ``maillog_file``, a
``callahead serve`` attached to it that reads that log (``CALLAHEAD_MAILLOG``), and a
real Postfix primary that knows the test's users, built but not started (the tests
start it when they want the primary up)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import (
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    instance_paths,
    primary_main_cf,
)


@dataclass
class LoggedBackup:
    workdir: Path
    callahead: CallaheadProcess
    backup: PostfixInstance
    primary: PostfixInstance
    """Not started."""


@contextlib.contextmanager
def logged_backup(
    prefix: str,
    domain: str,
    users: Sequence[str],
    env: dict[str, str],
    listeners: Callable[[CallaheadProcess], list[Listener]],
) -> Iterator[LoggedBackup]:
    """The rig for ``domain``: callahead with ``env`` beside its routes and
    ``CALLAHEAD_MAILLOG``, the backup with the ``listeners`` made for that callahead.
    Everything started is stopped afterwards, even on failure."""
    with make_workdir(prefix) as workdir:
        primary_dir, backup_dir = workdir / "primary", workdir / "backup"
        primary_dir.mkdir(mode=0o755)
        backup_dir.mkdir(mode=0o755)
        primary_port = free_port()
        primary = PostfixInstance(
            primary_dir,
            primary_main_cf(workdir=primary_dir, users=list(users), hostname="primary.test"),
            [Listener(primary_port)],
        )
        callahead = CallaheadProcess(
            workdir,
            {
                "CALLAHEAD_ROUTES": f"{domain}=[127.0.0.1]:{primary_port}",
                # Started before the backup: its log does not exist yet, and is read
                # from its first line once it appears.
                "CALLAHEAD_MAILLOG": str(instance_paths(backup_dir).maillog),
                # No catch-all check: a background probe at the domain's first recipient,
                # which would race the tests' own (a refusal of it opens the breaker).
                "CALLAHEAD_CATCHALL_CHECK": "0",
                **env,
            },
        )
        backup = PostfixInstance(
            backup_dir,
            backup_mx_main_cf(
                workdir=backup_dir,
                relay_domains=[domain],
                transports={domain: f"[127.0.0.1]:{primary_port}"},
                milter=callahead.socket,
            ),
            listeners(callahead),
        )
        callahead.start()
        try:
            backup.start()
            try:
                yield LoggedBackup(workdir, callahead, backup, primary)
            finally:
                backup.stop()
                primary.stop()
        finally:
            callahead.stop()
