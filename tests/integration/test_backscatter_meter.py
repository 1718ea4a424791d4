"""The backscatter meter end to end: a real Postfix backup with callahead attached
(``CALLAHEAD_MAILLOG`` on the backup's own ``maillog_file``), a real Postfix primary
that knows one user per front end and has no postmaster@.

While the primary is down, a known and an unknown recipient are both accepted
(undecided, reason ``primary_down``) and queued; the mail log is rotated while they
wait (``postfix logrotate``: rename, then gzip; or copytruncate); the primary comes
back and the backup's queue is flushed: the known user is ``sent``, the unknown one
``bounced`` with a non-delivery notification to the sender, which callahead counts as
backscatter under ``primary_down``. Every line Postfix wrote is read once: none lost
across the rotation, none read twice.

Its own small rig (one callahead, one backup, one primary): the session's stack shares
its backup's log with every other test, so counts there would not be this test's.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import make_message, send
from tests.harness.ports import free_port
from tests.harness.postfix import (
    Listener,
    PostfixInstance,
    _tool,
    policy_listener,
)
from tests.harness.waiting import wait_for

from .conftest import SENDER, MetricsDelta
from .loggedbackup import logged_backup

DOMAIN = "meter.test"
TIMEOUT = 30.0
POSTSUPER = _tool("postsuper")


@dataclass
class Rig:
    workdir: Path
    callahead: CallaheadProcess
    backup: PostfixInstance
    primary: PostfixInstance
    ports: dict[str, int]

    def logs(self) -> list[Path]:
        """The backup's mail log and every rotated copy of it."""
        return sorted(self.backup.workdir.glob("maillog*"))

    def lines_written(self) -> int:
        total = 0
        for path in self.logs():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            total += data.count(b"\n")
        return total

    def all_log_text(self) -> str:
        out = []
        for path in self.logs():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            out.append(data.decode(errors="replace"))
        return "".join(out)

    def lines_read(self) -> float:
        return sum(
            v
            for (name, _), v in self.callahead.samples().items()
            if name == "callahead_maillog_lines_total"
        )

    def wait_all_read(self) -> None:
        """Until callahead has read, once, every line of every file of the log."""
        try:
            wait_for(
                lambda: self.lines_read() == self.lines_written(),
                TIMEOUT,
                what="every line of every log file read once",
            )
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}: read {self.lines_read()}, written {self.lines_written()}"
            ) from exc

    def postsuper(self, *args: str) -> None:
        subprocess.run(
            [POSTSUPER, "-c", str(self.backup.config_dir), *args],
            check=True,
            capture_output=True,
            timeout=30,
        )


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    ports = {"milter": free_port(), "policy": free_port()}
    with logged_backup(
        "callahead-meter-",
        DOMAIN,
        [f"known-milter@{DOMAIN}", f"known-policy@{DOMAIN}"],
        {
            # The first refused connection marks the primary down, for long enough.
            "CALLAHEAD_BREAKER_FAILURES": "1",
            "CALLAHEAD_BREAKER_COOLDOWN": "3600",
        },
        lambda callahead: [
            Listener(ports["milter"]),
            # Asked at RCPT only, as the production snippet asks: the first recipient
            # has no queue id yet, the second one brings it.
            policy_listener(ports["policy"], callahead.policy_service),
        ],
    ) as logged:
        yield Rig(logged.workdir, logged.callahead, logged.backup, logged.primary, ports)


def copytruncate(path: Path) -> None:
    """What logrotate's ``copytruncate`` does."""
    shutil.copyfile(path, path.with_name(path.name + ".1"))
    with path.open("r+b") as f:
        f.truncate(0)


@pytest.mark.parametrize(("front_end", "rotation"), [("milter", "rename"), ("policy", "copy")])
def test_sent_and_bounced_are_counted_across_a_rotation(
    rig: Rig, front_end: str, rotation: str
) -> None:
    delta = MetricsDelta(rig.callahead)
    port = rig.ports[front_end]
    known, unknown = f"known-{front_end}@{DOMAIN}", f"gone-{front_end}@{DOMAIN}"
    if rig.primary.running:
        rig.primary.stop()
    # Open the breaker: a first probe finds the primary refusing connections (only an
    # RCPT, no message: nothing queued, nothing to meter).
    send(port, SENDER, [f"warm-up@{DOMAIN}"])
    token, body = make_message(SENDER, [known, unknown])

    tx = send(port, SENDER, [known, unknown], body)

    assert tx.code(known) == 250 and tx.code(unknown) == 250
    assert tx.data is not None and tx.data[0] == 250
    queued = re.search(r"queued as (\w+)", tx.data[1])
    assert queued is not None, tx.data
    queue_id = queued.group(1)
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="primary_down") >= 2
    # The backup tries the primary, defers both: counted once each, whatever the retries.
    wait_for(
        lambda: (
            delta("callahead_relay_outcomes_total", reason="primary_down", outcome="deferred") == 2
        ),
        TIMEOUT,
        what="both deferrals counted",
    )

    # Rotate while the message waits (held, so that the log is quiet meanwhile). What
    # the writer adds after the reader's last read and before copytruncate's truncation
    # is lost to the reader (docs/reference.md): logrotate runs with the log read up.
    rig.postsuper("-h", queue_id)
    rig.wait_all_read()
    maillog = rig.backup.maillog_path
    if rotation == "rename":
        rig.backup.postfix("logrotate")  # mv, HUP to postlogd, sleep 1, gzip
        cause = "rotated"
    else:
        copytruncate(maillog)
        cause = "truncated"
    rig.postsuper("-H", queue_id)
    wait_for(
        lambda: delta("callahead_maillog_reopens_total", cause=cause) == 1, TIMEOUT, what=cause
    )

    rig.primary.start()
    rig.backup.flush()
    wait_for(
        lambda: delta("callahead_backscatter_total", reason="primary_down") == 1,
        TIMEOUT,
        what="the bounce and its notification read",
    )
    assert delta("callahead_relay_outcomes_total", reason="primary_down", outcome="sent") == 1
    assert delta("callahead_relay_outcomes_total", reason="primary_down", outcome="bounced") == 1
    assert delta("callahead_relay_outcomes_total", reason="primary_down", outcome="deferred") == 2
    assert any(token.encode() in m for m in rig.primary.mailbox(known))
    log = rig.all_log_text()
    assert re.search(rf"{queue_id}: to=<{known}>, .*status=sent \(250", log)
    assert re.search(rf"{queue_id}: to=<{unknown}>, .*dsn=5\.1\.1, status=bounced", log)
    assert re.search(
        rf"postfix-[^/ ]+/bounce\[\d+\]: {queue_id}: sender non-delivery notification", log
    )
    # The bounced address was accepted undecided, never verified: never cached.
    shown = rig.callahead.cli("cache", "show", unknown)
    assert shown.returncode == 1 and f"{unknown}: cached" not in shown.stdout, shown

    # No line lost and none read twice: callahead counted every line in every file.
    rig.wait_all_read()
    malformed = rig.callahead.samples().get(
        ("callahead_maillog_lines_total", (("result", "malformed"),)), 0.0
    )
    assert malformed == 0
