"""A primary that verifies by itself: a real Postfix edge with
``reject_unverified_recipient`` in front of a real Postfix mailbox server (virtual
mailboxes, no postmaster@), probed by callahead behind a real Postfix backup MX.

The edge polls its verify(8) service once (``address_verify_poll_count = 1``, Postfix's
own value under stress), so its first answer about an address is ``450 4.1.1 ...
unverified address: Address verification in progress``. callahead asks again on a new
session, where the edge answers from its verify cache: the unknown user gets the
edge's 550 (``unverified_recipient_reject_code = 550``, as ADDRESS_VERIFICATION_README
advises once verification works), the known user 250, and the mail is delivered."""

from __future__ import annotations

import os
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import make_message, send
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import (
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    policy_listener,
    primary_main_cf,
)
from tests.harness.waiting import wait_for

from .conftest import FRONT_ENDS, SENDER, hop

DOMAIN = "verifying.test"
KNOWN = {front_end: f"{front_end}-user@{DOMAIN}" for front_end in FRONT_ENDS}
"""The mailbox server's users: one per front end, so that each test's known user is
new to the edge's verify cache."""
PROBE_HELO = "backup.test"
"""callahead's EHLO name (CallaheadProcess); the backup MTA's own is another."""
IN_PROGRESS = "450 4.1.1 <{}>: Recipient address rejected: unverified address: " + (
    "Address verification in progress"
)
UNDELIVERABLE = "550 5.1.1 <{}>: Recipient address rejected: undeliverable address: "
DELIVERY_TIMEOUT = 30.0
LOG_TIMEOUT = 10.0


@dataclass
class Site:
    mailbox: PostfixInstance
    edge: PostfixInstance
    backup: PostfixInstance
    ports: dict[str, int]
    """The backup's listener per front end of callahead."""


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.skip("a real Postfix, whose master needs root")
    with make_workdir() as workdir:
        instances: list[PostfixInstance] = []
        callahead: CallaheadProcess | None = None
        try:
            dirs = {name: workdir / name for name in ("mailbox", "edge", "backup")}
            for path in dirs.values():
                path.mkdir(mode=0o755)
            mailbox_port, edge_port = free_port(), free_port()
            mailbox = PostfixInstance(
                dirs["mailbox"],
                primary_main_cf(
                    workdir=dirs["mailbox"], users=list(KNOWN.values()), hostname="mailbox.test"
                ),
                [Listener(mailbox_port)],
            )
            # The edge relays the domain to the mailbox server, as a backup MX does,
            # with its own verification in front.
            edge_cf = backup_mx_main_cf(
                workdir=dirs["edge"],
                relay_domains=[DOMAIN],
                transports={DOMAIN: hop(mailbox_port)},
                milter=None,
                hostname="edge.test",
            )
            edge_cf.update(
                {
                    # "permit" said, so that its log shows the accepted probe too.
                    "smtpd_recipient_restrictions": (
                        "reject_unauth_destination, reject_unverified_recipient, permit"
                    ),
                    "smtpd_log_access_permit_actions": "static:all",
                    "address_verify_poll_count": "1",
                    "unverified_recipient_reject_code": "550",
                }
            )
            edge = PostfixInstance(dirs["edge"], edge_cf, [Listener(edge_port)])
            for instance in (mailbox, edge):
                instance.start()
                instances.append(instance)
            callahead = CallaheadProcess(
                workdir,
                {
                    "CALLAHEAD_ROUTES": f"{DOMAIN}={hop(edge_port)}",
                    "CALLAHEAD_PROBE_TIMEOUT": "5",
                    "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
                    "CALLAHEAD_CATCHALL_CHECK": "0",
                },
                name="callahead-verifying",
            )
            callahead.start()
            ports = {front_end: free_port() for front_end in FRONT_ENDS}
            backup = PostfixInstance(
                dirs["backup"],
                backup_mx_main_cf(
                    workdir=dirs["backup"],
                    relay_domains=[DOMAIN],
                    transports={DOMAIN: hop(edge_port)},
                    milter=callahead.socket,
                    hostname="backup-mta.test",
                ),
                [
                    Listener(ports["milter"], {"smtpd_milters": callahead.socket}),
                    policy_listener(ports["policy"], callahead.policy_service),
                ],
            )
            backup.start()
            instances.append(backup)
            yield Site(mailbox, edge, backup, ports)
        finally:
            with ThreadPoolExecutor(len(instances) + 1) as pool:
                stops = [pool.submit(instance.stop) for instance in reversed(instances)]
                if callahead is not None:
                    stops.append(pool.submit(callahead.stop))
                for stop in stops:
                    stop.result()


_SMTPD = re.compile(r"/smtpd\[(\d+)\]: (.*)$")


def probe_sessions(maillog: str) -> dict[tuple[str, int], list[str]]:
    """The edge's smtpd sessions in which callahead's probes were answered, each as its
    log messages, by (smtpd pid, connection number of that process): an smtpd process
    serves one connection at a time, from its ``connect from`` line on."""
    sessions: dict[tuple[str, int], list[str]] = defaultdict(list)
    count: dict[str, int] = defaultdict(int)
    for line in maillog.splitlines():
        match = _SMTPD.search(line)
        if match is None:
            continue
        pid, message = match[1], match[2]
        if message.startswith("connect from "):
            count[pid] += 1
        sessions[(pid, count[pid])].append(message)
    return {
        key: messages
        for key, messages in sessions.items()
        if any(f"helo=<{PROBE_HELO}>" in message for message in messages)
    }


def session_of(site: Site, address: str, words: str) -> tuple[str, int]:
    """The edge's session that answered a probe of ``address`` with ``words``, once its
    log line is there."""

    def find() -> tuple[str, int] | None:
        for key, messages in probe_sessions(site.edge.maillog()).items():
            if any(words in m and f"to=<{address}>" in m for m in messages):
                return key
        return None

    found = wait_for(find, LOG_TIMEOUT, what=f"the edge's answer {words!r} about {address}")
    assert found is not None
    return found


def test_a_verifying_edge_is_asked_again_on_a_new_session(site: Site, front_end: str) -> None:
    known = KNOWN[front_end]
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@{DOMAIN}"
    token, body = make_message(SENDER, [known])

    tx = send(site.ports[front_end], SENDER, [known, unknown], body)

    assert tx.code(known) == 250
    assert tx.code(unknown) == 550
    assert tx.data is not None and tx.data[0] == 250
    wait_for(
        lambda: any(token.encode() in m for m in site.mailbox.mailbox(known)),
        DELIVERY_TIMEOUT,
        what="delivery to the mailbox server",
    )
    # The edge said "in progress" first, then answered on another session.
    for address, final in ((known, "permit: RCPT"), (unknown, UNDELIVERABLE.format(unknown))):
        first = session_of(site, address, IN_PROGRESS.format(address))
        assert session_of(site, address, final) != first
    assert "User unknown in virtual mailbox table" in site.edge.maillog()
