"""Real peers' MTAs (Exim 4, OpenSMTPD from Debian 12) as SMTP primaries on loopback."""

from __future__ import annotations

import os
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from tests.harness import fixtures
from tests.harness.peers import PRIMARIES, PeerName, PeerPrimary
from tests.harness.waiting import wait_for

DOMAIN = "peer.test"
USERS = ("alice", "bob@peer.test")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="peer MTAs need root (setuid, system users, apt-get download)"
)


@pytest.fixture(params=["exim", "opensmtpd"])
def primary(request: pytest.FixtureRequest) -> Iterator[PeerPrimary]:
    # Only the missing root skips (above): anything else the peer lacks is a failure,
    # with start() naming it (peer_available, apt-get, ldd, useradd).
    name: PeerName = request.param
    with fixtures.make_workdir(prefix=f"callahead-{name}-") as workdir:
        peer = PRIMARIES[name](workdir, domain=DOMAIN, users=USERS, postmaster=True)
        try:
            peer.start()
            yield peer
        finally:
            peer.stop()


def _message(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@client.example.net"
    msg["To"] = to
    msg["Subject"] = "peer primary self-test"
    msg.set_content("hello\n")
    return msg


def test_rcpt_replies_and_delivery(primary: PeerPrimary) -> None:
    with smtplib.SMTP("127.0.0.1", primary.port, local_hostname="client.example.net") as smtp:
        code, _ = smtp.ehlo()
        assert code == 250
        assert smtp.docmd("MAIL FROM:<>")[0] == 250
        assert smtp.docmd(f"RCPT TO:<alice@{DOMAIN}>")[0] == 250
        code, text = smtp.docmd(f"RCPT TO:<nosuch@{DOMAIN}>")
        assert 500 <= code < 600, (code, text)
        assert smtp.docmd(f"RCPT TO:<postmaster@{DOMAIN}>")[0] == 250
        code, text = smtp.docmd("RCPT TO:<someone@elsewhere.example>")
        assert 500 <= code < 600, (code, text)
        assert smtp.docmd(f"RCPT TO:<BOB@{DOMAIN}>")[0] == 250
        smtp.rset()
        refused = smtp.send_message(
            _message(f"alice@{DOMAIN}"), from_addr="", to_addrs=[f"alice@{DOMAIN}"]
        )
        assert refused == {}
    wait_for(
        lambda: primary.mailbox_count(f"alice@{DOMAIN}") == 1,
        30.0,
        interval=0.05,
        what=f"delivery to alice@{DOMAIN}\n{primary.log()}",
    )
    assert b"peer primary self-test" in primary.mailbox(f"alice@{DOMAIN}")[0]
    assert primary.mailbox_count(f"bob@{DOMAIN}") == 0
    assert primary.mailbox_count(f"nosuch@{DOMAIN}") == 0
    assert "nosuch@" in primary.log()


def test_postmaster_is_deliverable(primary: PeerPrimary) -> None:
    with smtplib.SMTP("127.0.0.1", primary.port, local_hostname="client.example.net") as smtp:
        smtp.send_message(
            _message(f"postmaster@{DOMAIN}"), from_addr="", to_addrs=[f"postmaster@{DOMAIN}"]
        )
    wait_for(
        lambda: primary.mailbox_count(f"postmaster@{DOMAIN}") == 1,
        30.0,
        interval=0.05,
        what="delivery to postmaster",
    )


def test_stop_ends_every_process(primary: PeerPrimary) -> None:
    # A session left open keeps a child process busy in the daemon's session.
    smtp = smtplib.SMTP("127.0.0.1", primary.port, local_hostname="client.example.net")
    try:
        smtp.docmd("MAIL FROM:<>")
        assert primary.pid is not None
        assert primary.pid in primary.pids()
        wait_for(lambda: len(primary.pids()) > 1, 10.0, what="a child serving the session")
        primary.stop()
        assert primary.pids() == []
        assert not primary.running
        primary.stop()  # idempotent
    finally:
        smtp.close()
