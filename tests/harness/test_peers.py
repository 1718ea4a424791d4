"""Real peers' MTAs (Exim 4, OpenSMTPD from Debian 12) as SMTP primaries on loopback.

The replies are asserted verbatim (code and text): a change in what a real MTA answers
is what these tests are for."""

from __future__ import annotations

import contextlib
import os
import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.harness import fixtures
from tests.harness.peers import (
    EXIM_RATE_LIMIT_ACL,
    PRIMARIES,
    EximPrimary,
    PeerName,
    PeerPrimary,
)
from tests.harness.waiting import wait_for

DOMAIN = "peer.test"
USERS = ("alice", "bob@peer.test")

Reply = tuple[int, str]

# What each MTA answers at RCPT TO, measured (Debian 12: Exim 4.96 with exim4-config's
# configuration, OpenSMTPD 6.8). Exim sends no enhanced status codes.
KNOWN: dict[PeerName, Reply] = {
    "exim": (250, "Accepted"),
    "opensmtpd": (250, "2.1.5 Destination address valid: Recipient ok"),
}
UNKNOWN: dict[PeerName, str] = {
    # Debian's acl_check_rcpt: require verify = recipient.
    "exim": "550 Unrouteable address",
    # OpenSMTPD 6.8, a virtual table without the address.
    "opensmtpd": "524 5.2.4 Mailing list expansion problem: <{addr}>",
}
ELSEWHERE: dict[PeerName, str] = {
    "exim": "550 relay not permitted",
    "opensmtpd": "550 Invalid recipient: <{addr}>",
}
# postmaster@ without a mailbox: Debian's Exim ACL accepts it before verifying anything;
# OpenSMTPD refuses it like any unknown user.
POSTMASTER_WITHOUT_MAILBOX: dict[PeerName, str] = {
    "exim": "250 Accepted",
    "opensmtpd": UNKNOWN["opensmtpd"],
}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="peer MTAs need root (setuid, system users, apt-get download)"
)

Start = Callable[..., PeerPrimary]


@pytest.fixture
def start_peer() -> Iterator[Start]:
    """``start_peer(name, **keywords)``: a started primary of DOMAIN for USERS; every one
    started is stopped at teardown, whatever the test did."""
    # Only the missing root skips (above): anything else the peer lacks is a failure,
    # with start() naming it (peer_available, apt-get, ldd, useradd).
    with contextlib.ExitStack() as stack:

        def start(name: PeerName, **keywords: Any) -> PeerPrimary:
            workdir: Path = stack.enter_context(fixtures.make_workdir(prefix=f"callahead-{name}-"))
            peer = PRIMARIES[name](workdir, domain=DOMAIN, users=USERS, **keywords)
            stack.callback(peer.stop)  # also when start() fails half-way
            peer.start()
            return peer

        yield start


@pytest.fixture(params=["exim", "opensmtpd"])
def peer_name(request: pytest.FixtureRequest) -> PeerName:
    name: PeerName = request.param
    return name


@pytest.fixture
def primary(start_peer: Start, peer_name: PeerName) -> PeerPrimary:
    """The default primary: no postmaster@ mailbox."""
    return start_peer(peer_name)


def _message(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@client.example.net"
    msg["To"] = to
    msg["Subject"] = "peer primary self-test"
    msg.set_content("hello\n")
    return msg


def _session(primary: PeerPrimary) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", primary.port, local_hostname="client.example.net")
    code, _ = smtp.ehlo()
    assert code == 250
    return smtp


def _rcpt(smtp: smtplib.SMTP, addr: str) -> str:
    """The reply to ``RCPT TO:<addr>`` as one line: code, space, text."""
    code, text = smtp.docmd(f"RCPT TO:<{addr}>")
    return f"{code} {text.decode()}"


def _expected(table: dict[PeerName, str], name: PeerName, addr: str) -> str:
    return table[name].format(addr=addr)


def _known(name: PeerName) -> str:
    code, text = KNOWN[name]
    return f"{code} {text}"


def _wait_delivered(primary: PeerPrimary, addr: str, count: int = 1) -> None:
    wait_for(
        lambda: primary.mailbox_count(addr) == count,
        30.0,
        interval=0.05,
        what=f"delivery to {addr}\n{primary.log()}",
    )


def test_rcpt_replies_and_delivery(primary: PeerPrimary, peer_name: PeerName) -> None:
    nosuch, elsewhere = f"nosuch@{DOMAIN}", "someone@elsewhere.example"
    with _session(primary) as smtp:
        assert smtp.docmd("MAIL FROM:<>")[0] == 250
        assert _rcpt(smtp, f"alice@{DOMAIN}") == _known(peer_name)
        assert _rcpt(smtp, nosuch) == _expected(UNKNOWN, peer_name, nosuch)
        assert _rcpt(smtp, elsewhere) == _expected(ELSEWHERE, peer_name, elsewhere)
        assert _rcpt(smtp, f"BOB@{DOMAIN}") == _known(peer_name)
        smtp.rset()
        refused = smtp.send_message(
            _message(f"alice@{DOMAIN}"), from_addr="", to_addrs=[f"alice@{DOMAIN}"]
        )
        assert refused == {}
    _wait_delivered(primary, f"alice@{DOMAIN}")
    assert b"peer primary self-test" in primary.mailbox(f"alice@{DOMAIN}")[0]
    assert primary.mailbox_count(f"bob@{DOMAIN}") == 0
    assert primary.mailbox_count(nosuch) == 0
    assert nosuch in primary.log()


def test_no_postmaster_by_default(primary: PeerPrimary, peer_name: PeerName) -> None:
    postmaster = f"postmaster@{DOMAIN}"
    assert primary.users == {f"alice@{DOMAIN}", f"bob@{DOMAIN}"}
    with _session(primary) as smtp:
        assert smtp.docmd("MAIL FROM:<>")[0] == 250
        assert _rcpt(smtp, postmaster) == _expected(
            POSTMASTER_WITHOUT_MAILBOX, peer_name, postmaster
        )
        # The same session still answers for the users as before.
        assert _rcpt(smtp, f"alice@{DOMAIN}") == _known(peer_name)


def test_postmaster_mailbox_when_asked(start_peer: Start, peer_name: PeerName) -> None:
    postmaster = f"postmaster@{DOMAIN}"
    primary = start_peer(peer_name, postmaster=True)
    assert postmaster in primary.users
    with _session(primary) as smtp:
        assert smtp.docmd("MAIL FROM:<>")[0] == 250
        assert _rcpt(smtp, postmaster) == _known(peer_name)
        smtp.rset()
        assert smtp.send_message(_message(postmaster), from_addr="", to_addrs=[postmaster]) == {}
    _wait_delivered(primary, postmaster)


def test_exim_rate_limit_refuses_known_users_after_postmaster(start_peer: Start) -> None:
    """Debian's CHECK_RCPT_LOCAL_ACL_FILE hook sits after the postmaster accept and after
    ``require verify = recipient``: postmaster@ is accepted, an unknown user still gets
    Unrouteable address, and a known user gets the deny's bare message."""
    primary = start_peer("exim", rcpt_acl_extra=EXIM_RATE_LIMIT_ACL)
    assert isinstance(primary, EximPrimary)
    with _session(primary) as smtp:
        assert smtp.docmd("MAIL FROM:<>")[0] == 250
        assert _rcpt(smtp, f"postmaster@{DOMAIN}") == "250 Accepted"
        assert _rcpt(smtp, f"alice@{DOMAIN}") == "550 Sender rate overlimit"
        assert _rcpt(smtp, f"nosuch@{DOMAIN}") == "550 Unrouteable address"
        assert _rcpt(smtp, f"bob@{DOMAIN}") == "550 Sender rate overlimit"
    # A new session is refused the same way: the limit is per client address.
    with _session(primary) as smtp:
        assert smtp.docmd("MAIL FROM:<>")[0] == 250
        assert _rcpt(smtp, f"alice@{DOMAIN}") == "550 Sender rate overlimit"
    log = primary.log()
    assert f"rejected RCPT <alice@{DOMAIN}>: Sender rate overlimit" in log
    assert f"rejected RCPT <nosuch@{DOMAIN}>: Unrouteable address" in log


def test_exim_runs_debians_generated_config(start_peer: Start) -> None:
    """The config is update-exim4.conf's output from exim4-config's conf.d, with
    Debian's acl_check_rcpt as shipped."""
    primary = start_peer("exim")
    assert isinstance(primary, EximPrimary)
    config = primary.config_path.read_text()
    assert "This file was generated dynamically from" in config
    assert "DC_eximconfig_configtype=internet" in config
    assert f"MAIN_LOCAL_DOMAINS=@:localhost:{DOMAIN}" in config
    assert "acl_check_rcpt:" in config
    # Nothing of the system's /etc/exim4 is read: CONFDIR is the instance's own.
    assert f"CONFDIR = {primary.confdir}" in config


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
