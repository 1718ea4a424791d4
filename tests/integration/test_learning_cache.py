"""The cache that learns, end to end: a real Postfix backup with callahead attached as
its milter (``CALLAHEAD_MAILLOG`` on the backup's own ``maillog_file``), relaying to a
real Postfix primary that knows two users and has no postmaster@.

(a) While the primary is down, a known user is accepted undecided and queued; once the
primary is back and the queue flushed, it is ``sent``. From a file, that teaches
nothing: any local user can write a line there that reads as Postfix's (``postlog -t
postfix/smtp``), so only the journal's entries logged by Postfix's own user teach
(tests/system/test_maillog_journal.py learns the same user end to end).

(b) A user still cached is deleted on the primary: the next message to it is accepted
(a cache hit), relayed and bounced by the primary with ``550 5.1.1``; callahead reads
the bounce and evicts it (``cache show``, ``callahead_cache_evictions_total``), and the
RCPT after that is probed and refused with 550.

Its own small rig: the session's stack shares its backup's log with every other test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from callahead.frontends.adminclient import ask
from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import make_message, send
from tests.harness.ports import free_port
from tests.harness.postfix import (
    Listener,
    PostfixInstance,
)
from tests.harness.waiting import wait_for

from .conftest import SENDER, MetricsDelta
from .loggedbackup import logged_backup

DOMAIN = "learn.test"
KNOWN, VICTIM = f"known@{DOMAIN}", f"victim@{DOMAIN}"
TIMEOUT = 30.0


@dataclass
class Rig:
    callahead: CallaheadProcess
    backup: PostfixInstance
    primary: PostfixInstance
    port: int

    def cached(self, address: str) -> bool:
        """``callahead cache show ADDRESS``: 0 and "cached" when it is, 1 when not."""
        shown = self.callahead.cli("cache", "show", address)
        assert shown.returncode in (0, 1), shown
        assert (shown.returncode == 0) == (f"{address}: cached" in shown.stdout), shown
        return shown.returncode == 0

    def controls(self) -> list[str]:
        answer = ask(str(self.callahead.admin_socket), {"op": "cache-recent", "domain": DOMAIN})
        assert answer["ok"], answer
        addresses: list[str] = answer["addresses"]
        return addresses

    def relay(self, rcpt: str) -> str:
        """Send one message to ``rcpt`` through the backup; its queue id there."""
        _, body = make_message(SENDER, [rcpt])
        tx = send(self.port, SENDER, [rcpt], body)
        assert tx.code(rcpt) == 250
        assert tx.data is not None and tx.data[0] == 250, tx.data
        queued = re.search(r"queued as (\w+)", tx.data[1])
        assert queued is not None, tx.data
        return queued.group(1)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    port = free_port()
    with logged_backup(
        "callahead-learn-",
        DOMAIN,
        [KNOWN, VICTIM],
        # Every probe tries the primary: refused while it is down (undecided), answered
        # at once when it is back.
        {"CALLAHEAD_BREAKER_FAILURES": "0"},
        lambda _: [Listener(port)],
    ) as logged:
        yield Rig(logged.callahead, logged.backup, logged.primary, port)


def test_a_user_sent_to_the_primary_is_not_learnt_from_a_file(rig: Rig) -> None:
    delta = MetricsDelta(rig.callahead)
    if rig.primary.running:
        rig.primary.stop()
    queue_id = rig.relay(KNOWN)
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="probe_tempfail") == 1
    assert not rig.cached(KNOWN), "accepted undecided: not cached"

    rig.primary.start()
    rig.backup.flush()
    wait_for(
        lambda: (
            delta("callahead_relay_outcomes_total", reason="probe_tempfail", outcome="sent") == 1
        ),
        TIMEOUT,
        what="the delivery to the primary read",
    )
    assert re.search(
        rf"{queue_id}: to=<{KNOWN}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent \(250",
        rig.backup.maillog(),
    )
    assert delta("callahead_cache_learned_total") == 0
    assert not rig.cached(KNOWN)
    assert rig.controls() == []


def test_a_user_deleted_on_the_primary_is_evicted_by_the_bounce(rig: Rig) -> None:
    if not rig.primary.running:
        rig.primary.start()
    send(rig.port, SENDER, [VICTIM])  # probed valid: cached
    assert rig.cached(VICTIM)
    delta = MetricsDelta(rig.callahead)
    rig.primary.set_virtual_users([KNOWN])

    queue_id = rig.relay(VICTIM)
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="cache_hit") == 1
    wait_for(
        lambda: delta("callahead_cache_evictions_total", cause="relay_bounce") == 1,
        TIMEOUT,
        what="the bounce read and the entry evicted",
    )
    assert re.search(
        rf"{queue_id}: to=<{VICTIM}>, .*dsn=5\.1\.1, status=bounced \(host .* said: 550 5\.1\.1",
        rig.backup.maillog(),
    )
    assert not rig.cached(VICTIM)
    assert VICTIM not in rig.controls()
    assert re.search(
        rf"evicted: rcpt=<{VICTIM}> was refused as unknown by 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ "
        rf"when queue id {queue_id} was relayed",
        rig.callahead.log(),
    ), rig.callahead.log()[-2000:]

    tx = send(rig.port, SENDER, [VICTIM])
    assert tx.code(VICTIM) == 550
    assert delta("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1
    assert delta("callahead_cache_evictions_total", cause="relay_bounce") == 1
