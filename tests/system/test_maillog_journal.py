"""The backscatter meter reading the systemd journal (``CALLAHEAD_MAILLOG=journal``), in
the booted container of conftest.py: Debian's Postfix logs through syslog() to
journald (no syslog daemon in the container: the journal alone has its lines, under
``postfix@-.service``, ``SYSLOG_IDENTIFIER`` ``postfix/smtp`` and so on); the package's
unit runs callahead with Debian's python3-systemd, installed with apt as the README says.

The system journal is readable by the systemd-journal group only: the unit's dynamic
user needs ``SupplementaryGroups=systemd-journal`` (a drop-in, as the README has the
operator add it). Without it the meter says so and stays off, rather than reading
nothing. With it: while the primary is down a known and an unknown recipient are both
accepted (``primary_down``) and queued; the journal is rotated and journald restarted
while they wait; the primary comes back and the queue is flushed: 1 ``sent``, 1
``bounced``, 1 backscatter, read from the journal's new file.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.client import make_message, send
from tests.harness.waiting import wait_for

from .conftest import BACKUP_HOST, DOMAIN, System

SENDER = "sender@remote.test"
ENV_FILE = "etc/default/callahead"
DROPIN = "/etc/systemd/system/callahead.service.d/maillog-journal.conf"
METER_ON = "backscatter meter: reading journal from its end"
METER_OFF = "backscatter meter off: no systemd journal file is readable"
TIMEOUT = 30.0


def samples(name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples of one counter (callahead's endpoint), by the values of ``labels``."""
    url = f"http://{BACKUP_HOST}:9895/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        tuple(sample.labels[label] for label in labels): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name == f"{name}_total"
    }


def restart(system: System) -> str:
    """Restart the unit, wait until it serves; the journal cursor from before."""
    cursor = system.cursor()
    system.sh("systemctl daemon-reload && systemctl restart callahead", timeout=60)
    system.wait_active()
    return cursor


@pytest.fixture(scope="module")
def journal_meter(system: System) -> Iterator[System]:
    """python3-systemd installed, ``CALLAHEAD_MAILLOG=journal`` in the unit's environment
    file; the drop-in is the test's. Put back as found after the module."""
    system.sh(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"
        " python3-systemd >/dev/null",
        timeout=300,
    )
    env = system.container.root / ENV_FILE
    saved = env.read_text()
    # The first refused connection marks the primary down, for the rest of the module.
    env.write_text(
        saved
        + "CALLAHEAD_MAILLOG=journal\nCALLAHEAD_BREAKER_FAILURES=1\n"
        + "CALLAHEAD_BREAKER_COOLDOWN=3600\n"
    )
    try:
        yield system
    finally:
        env.write_text(saved)
        system.sh(f"rm -f {DROPIN}")
        restart(system)


def test_without_the_journal_group_the_meter_says_it_is_off(journal_meter: System) -> None:
    system = journal_meter
    system.sh(f"rm -f {DROPIN}")
    cursor = restart(system)
    wait_for(
        lambda: METER_OFF in system.journal(cursor), TIMEOUT, interval=0.2, what="the off line"
    )
    (line,) = [x for x in system.journal(cursor).splitlines() if METER_OFF in x]
    assert " ERROR " in line and "SupplementaryGroups=systemd-journal" in line, line
    assert METER_ON not in system.journal(cursor)
    assert system.unit("ActiveState") == "active"  # callahead serves on without it


def test_known_sent_unknown_bounced_read_from_the_journal(journal_meter: System) -> None:
    system = journal_meter
    system.sh(
        f"mkdir -p {DROPIN.rsplit('/', 1)[0]}"
        f" && printf '[Service]\\nSupplementaryGroups=systemd-journal\\n' >{DROPIN}"
    )
    cursor = restart(system)  # the meter's counters start from 0 with the process
    wait_for(lambda: METER_ON in system.journal(cursor), TIMEOUT, interval=0.2, what="meter on")
    known = f"k{uuid.uuid4().hex[:12]}@{DOMAIN}"
    unknown = f"u{uuid.uuid4().hex[:12]}@{DOMAIN}"
    system.primary.add_user(known)

    system.primary.stop()
    try:
        # A first probe finds the primary refusing connections (an RCPT, no message).
        warm_up = f"warm-up@{DOMAIN}"
        assert send(25, SENDER, [warm_up], host=BACKUP_HOST).code(warm_up) == 250
        _token, body = make_message(SENDER, [known, unknown])
        tx = send(25, SENDER, [known, unknown], body, host=BACKUP_HOST)
        assert [tx.code(known), tx.code(unknown)] == [250, 250]
        assert tx.data is not None and tx.data[0] == 250, tx.data
        queue = system.sh("postqueue -j")
        assert known in queue and unknown in queue, queue
        # Postfix's first attempt, against the primary that is down, is in the journal.
        wait_for(
            lambda: (
                samples("callahead_relay_outcomes", "reason", "outcome").get(
                    ("primary_down", "deferred")
                )
                == 2
            ),
            TIMEOUT,
            interval=0.2,
            what="both deferred",
        )
        # The reader goes on into the new file, and past a restart of journald.
        system.sh("journalctl --rotate && systemctl restart systemd-journald")
    finally:
        system.primary.start()
    system.sh("postqueue -f")

    def fates() -> dict[tuple[str, ...], float]:
        got = samples("callahead_relay_outcomes", "reason", "outcome")
        return (
            got
            if got.get(("primary_down", "bounced")) and got.get(("primary_down", "sent"))
            else {}
        )

    outcomes = wait_for(fates, TIMEOUT, interval=0.2, what="sent and bounced")
    assert outcomes == {
        ("primary_down", "deferred"): 2.0,
        ("primary_down", "sent"): 1.0,
        ("primary_down", "bounced"): 1.0,
    }
    wait_for(
        lambda: samples("callahead_backscatter", "reason") == {("primary_down",): 1.0},
        TIMEOUT,
        interval=0.2,
        what="the backscatter",
    )
    assert system.primary.mailbox(known)
    # The delivery was logged by Postfix's own user (journald's _UID, which no local user
    # can forge): it teaches the cache, and the known user is valid without a probe.
    wait_for(
        lambda: f"{known}: cached" in system.sh(f"callahead cache show {known}", check=False),
        TIMEOUT,
        interval=0.2,
        what="the known user learnt from the journal",
    )
    assert f"{unknown}: cached" not in system.sh(f"callahead cache show {unknown}", check=False)
    lines = samples("callahead_maillog_lines", "result")
    assert lines.get(("parsed",), 0) >= 5, lines  # 2 deferred, sent, bounced, the DSN
    assert lines.get(("malformed",), 0) == 0, lines
    assert samples("callahead_maillog_errors") == {(): 0.0}
    # The DSN to the forged sender is the backscatter: it waits in the queue, for
    # remote.test has no mail server here. Not this test's to keep.
    dsn = [
        line.rsplit(": ", 1)[1]
        for line in system.sh(
            "journalctl -t postfix/bounce -o cat --no-pager | grep 'sender non-delivery'"
        ).splitlines()
    ]
    system.sh(f"postsuper -d {dsn[-1]}")
